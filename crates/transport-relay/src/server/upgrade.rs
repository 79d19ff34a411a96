//! From an accepted stream to a WebSocket: the request (served by hyper, `http`), the checks
//! the relay answers with a clear HTTP status (health check, plain HTTP, subprotocol, token,
//! NATS down, per-IP limit), then the upgraded stream as a WebSocket with the relay's frame
//! limits.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use hyper::{Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::conn;
use super::http::{self, Answer, Served};
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
pub(super) async fn handle<S>(shared: Arc<Shared>, stream: S, peer: SocketAddr, slot: IpSlot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = Instant::now() + shared.config.handshake_timeout;
    // The subprotocol of the 101, set by `answer`.
    let chosen = OnceLock::new();
    // Boxed: hyper's connection state lives on the heap only until the upgrade, instead of
    // widening this task's future for the connection's whole life.
    let served = Box::pin(http::serve(stream, |req| {
        answer(&shared, &slot, peer, req, &chosen)
    }));
    let (stream, read_ahead) = match tokio::time::timeout_at(deadline, served).await {
        Err(_) => {
            shared.metrics.dropped(DropReason::HandshakeTimeout);
            return;
        }
        Ok(Served::Refused(e)) => {
            shared.metrics.dropped(DropReason::BadUpgrade);
            tracing::debug!(%peer, error = %e, "malformed HTTP request");
            return;
        }
        Ok(Served::Answered | Served::Gone) => return,
        Ok(Served::Upgraded(stream, read_ahead)) => (stream, read_ahead),
    };
    // Always set with a 101.
    let Some(&chosen) = chosen.get() else { return };
    let max = shared.config.max_frame_bytes;
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WS_WRITE_BUFFER_BYTES + 2 * max);
    // Frames a client sent before the 101 (at most one head's worth) are its first frames.
    // Copied out (nothing, usually) and dropped: the `Bytes` is a view of hyper's whole read
    // buffer, which held on to it cost 3.6 KiB RSS per idle connection.
    let rest = read_ahead.to_vec();
    drop(read_ahead);
    let ws =
        WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(ws_config)).await;
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

/// The relay's answer to a parsed request head, in the order of its checks: the head itself
/// (`400`), the health check, plain HTTP (`426`), the subprotocol (`400`), the token
/// (`401`), NATS (`503`), the per-IP limit (`429`); then `101` with the newest subprotocol
/// both sides speak, also set in `chosen`. Every refusal is counted.
fn answer(
    shared: &Shared,
    slot: &IpSlot,
    peer: SocketAddr,
    req: &Request<Incoming>,
    chosen: &OnceLock<&'static str>,
) -> Answer {
    let refuse =
        |reason: DropReason, status: StatusCode, headers: &[(&'static str, &str)], body: String| {
            shared.metrics.dropped(reason);
            http::text(status, headers, body)
        };
    let head = match http::read_head(req) {
        Ok(head) => head,
        Err(e) => {
            return refuse(
                DropReason::BadUpgrade,
                StatusCode::BAD_REQUEST,
                &[],
                format!("malformed HTTP request: {e}\n"),
            );
        }
    };
    let Some(accept) = head.accept else {
        if req.uri().path() == "/healthz" {
            return http::text(StatusCode::OK, &[], "ok".into());
        }
        return refuse(
            DropReason::BadUpgrade,
            StatusCode::UPGRADE_REQUIRED,
            &[
                ("upgrade", "websocket"),
                (
                    "sec-websocket-protocol",
                    &format!("{SUBPROTOCOL_V2}, {SUBPROTOCOL}"),
                ),
            ],
            format!(
                "this is a pluresdb-sync relay: connect with a WebSocket using the {SUBPROTOCOL} or {SUBPROTOCOL_V2} subprotocol\n"
            ),
        );
    };
    // The newest version both sides speak.
    let Some(version) = SUBPROTOCOLS
        .into_iter()
        .find(|v| head.subprotocols.iter().any(|p| p == v))
    else {
        return refuse(
            DropReason::BadUpgrade,
            StatusCode::BAD_REQUEST,
            &[],
            format!(
                "unsupported WebSocket subprotocol {:?}: this relay speaks {SUBPROTOCOL} and {SUBPROTOCOL_V2}\n",
                head.subprotocols.join(", ")
            ),
        );
    };
    if !shared.config.auth_tokens.is_empty()
        && !token_ok(&shared.config.auth_tokens, head.bearer.as_deref())
    {
        return refuse(
            DropReason::Unauthorized,
            StatusCode::UNAUTHORIZED,
            &[("www-authenticate", "Bearer")],
            "this relay needs a valid bearer token\n".into(),
        );
    }
    if shared.nats.as_ref().is_some_and(|n| !*n.up.borrow()) {
        return refuse(
            DropReason::NatsDown,
            StatusCode::SERVICE_UNAVAILABLE,
            &[("retry-after", "1")],
            "this relay has lost its NATS connection; try another relay\n".into(),
        );
    }
    if slot.over_limit {
        return refuse(
            DropReason::PerIpLimit,
            StatusCode::TOO_MANY_REQUESTS,
            &[],
            format!(
                "more than {} connections from {}\n",
                shared.config.max_connections_per_ip,
                peer.ip()
            ),
        );
    }
    let (mut parts, ()) = accept.into_parts();
    parts
        .headers
        .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(version));
    let _ = chosen.set(version);
    Answer::from_parts(parts, String::new())
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
