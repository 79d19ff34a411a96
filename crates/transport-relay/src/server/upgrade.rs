//! From an accepted stream to a WebSocket: the HTTP head, the checks the relay answers with
//! a clear HTTP status (health check, plain HTTP, subprotocol, token, NATS down, per-IP
//! limit), then the upgrade with the relay's frame limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::conn;
use super::http::{self, HeadError, Prefixed};
use super::limits::IpSlot;
use super::metrics::DropReason;
use super::state::Shared;
use crate::protocol::{SUBPROTOCOL, SUBPROTOCOL_V2, SUBPROTOCOLS};

/// tungstenite's read chunk per connection (its default is 128 KiB). It dominates idle memory:
/// measured RSS per idle, joined connection (5,000 connections, release build) was 31 KiB with
/// 16 KiB, 23.6 KiB with 8 KiB and 17.7 KiB with 4 KiB. 8 KiB keeps a 64 KiB frame to eight
/// reads; the relay benchmark should settle this against throughput.
const WS_READ_BUFFER_BYTES: usize = 8 * 1024;
/// tungstenite batches writes up to this many bytes before writing to the socket.
const WS_WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Serves one accepted stream until its connection ends.
pub(super) async fn handle<S>(shared: Arc<Shared>, mut stream: S, peer: SocketAddr, slot: IpSlot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let head = match tokio::time::timeout_at(deadline, http::read_head(&mut stream)).await {
        Err(_) => {
            shared.metrics.dropped(DropReason::HandshakeTimeout);
            return;
        }
        Ok(Err(HeadError::TooLarge)) => {
            shared.metrics.dropped(DropReason::BadUpgrade);
            http::respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                "request head over 8 KiB\n",
            )
            .await;
            return;
        }
        Ok(Err(HeadError::Malformed(e))) => {
            shared.metrics.dropped(DropReason::BadUpgrade);
            http::respond(
                &mut stream,
                "400 Bad Request",
                "",
                &format!("malformed HTTP request: {e}\n"),
            )
            .await;
            return;
        }
        Ok(Err(HeadError::Io | HeadError::Eof)) => return,
        Ok(Ok(h)) => h,
    };
    let (head, buf) = head;
    if head.path == "/healthz" && !head.upgrade_websocket {
        http::respond(&mut stream, "200 OK", "", "ok").await;
        return;
    }
    if !head.upgrade_websocket {
        shared.metrics.dropped(DropReason::BadUpgrade);
        http::respond(
            &mut stream,
            "426 Upgrade Required",
            &format!("Upgrade: websocket\r\nSec-WebSocket-Protocol: {SUBPROTOCOL_V2}, {SUBPROTOCOL}\r\n"),
            &format!("this is a pluresdb-sync relay: connect with a WebSocket using the {SUBPROTOCOL} or {SUBPROTOCOL_V2} subprotocol\n"),
        )
        .await;
        return;
    }
    // The newest version both sides speak.
    let Some(chosen) = SUBPROTOCOLS
        .into_iter()
        .find(|v| head.subprotocols.iter().any(|p| p == v))
    else {
        shared.metrics.dropped(DropReason::BadUpgrade);
        http::respond(
            &mut stream,
            "400 Bad Request",
            "",
            &format!(
                "unsupported WebSocket subprotocol {:?}: this relay speaks {SUBPROTOCOL} and {SUBPROTOCOL_V2}\n",
                head.subprotocols.join(", ")
            ),
        )
        .await;
        return;
    };
    if !shared.config.auth_tokens.is_empty()
        && !token_ok(&shared.config.auth_tokens, head.bearer.as_deref())
    {
        shared.metrics.dropped(DropReason::Unauthorized);
        http::respond(
            &mut stream,
            "401 Unauthorized",
            "WWW-Authenticate: Bearer\r\n",
            "this relay needs a valid bearer token\n",
        )
        .await;
        return;
    }
    if shared.nats.as_ref().is_some_and(|n| !*n.up.borrow()) {
        shared.metrics.dropped(DropReason::NatsDown);
        http::respond(
            &mut stream,
            "503 Service Unavailable",
            "Retry-After: 1\r\n",
            "this relay has lost its NATS connection; try another relay\n",
        )
        .await;
        return;
    }
    if slot.over_limit {
        shared.metrics.dropped(DropReason::PerIpLimit);
        http::respond(
            &mut stream,
            "429 Too Many Requests",
            "",
            &format!(
                "more than {} connections from {}\n",
                shared.config.max_connections_per_ip,
                peer.ip()
            ),
        )
        .await;
        return;
    }
    let max = shared.config.max_frame_bytes;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WS_WRITE_BUFFER_BYTES + 2 * max);
    // The closure's error type is fixed by tungstenite's `Callback` trait.
    #[allow(clippy::result_large_err)]
    let callback = |_: &tungstenite::handshake::server::Request,
                    mut resp: tungstenite::handshake::server::Response| {
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tungstenite::http::HeaderValue::from_static(chosen),
        );
        Ok(resp)
    };
    let ws = match tokio::time::timeout_at(
        deadline,
        tokio_tungstenite::accept_hdr_async_with_config(
            Prefixed::new(buf, stream),
            callback,
            Some(ws_config),
        ),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            shared.metrics.dropped(DropReason::BadUpgrade);
            tracing::debug!(%peer, error = %e, "websocket upgrade failed");
            return;
        }
        Err(_) => {
            shared.metrics.dropped(DropReason::HandshakeTimeout);
            return;
        }
    };
    shared
        .metrics
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    conn::run(&shared, ws, &slot, chosen == SUBPROTOCOL_V2).await;
    shared
        .metrics
        .connections_open
        .fetch_sub(1, Ordering::Relaxed);
    drop(slot);
}

/// Constant-time comparison against every configured token.
fn token_ok(tokens: &[String], given: Option<&str>) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = given else { return false };
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        // ct_eq on slices of different lengths is false without looking at contents; the
        // token lengths are not secret enough to matter.
        ok |= t.as_bytes().ct_eq(given.as_bytes());
    }
    bool::from(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let tokens = vec!["secret-one".to_owned(), "two".to_owned()];
        assert!(token_ok(&tokens, Some("two")));
        assert!(token_ok(&tokens, Some("secret-one")));
        assert!(!token_ok(&tokens, Some("secret")));
        assert!(!token_ok(&tokens, Some("")));
        assert!(!token_ok(&tokens, None));
    }
}
