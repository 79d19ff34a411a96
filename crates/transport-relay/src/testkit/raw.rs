//! A raw relay-protocol client over a plain WebSocket: frames as the wire carries them, no
//! sessions, no Noise. Tests use it to act as well-behaved or hostile clients; the benchmark
//! uses it to measure the server alone. Every wait ends after [`WAIT`].

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};

use super::WAIT;
use crate::protocol::{
    ClientFrame, ConnId, Frame, RelayFrame, RoomId, SUBPROTOCOL, SUBPROTOCOL_V2, decode,
};

/// A raw WebSocket to a relay.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket upgrade request for `url` offering the subprotocol `protocol` (the relay's is
/// [`SUBPROTOCOL`]; `None` offers none) and, with `token`, an `Authorization: Bearer` header.
pub fn upgrade_request(
    url: &str,
    protocol: Option<&str>,
    token: Option<&str>,
) -> Result<Request, tungstenite::Error> {
    let mut req = url.into_client_request()?;
    let header = |v: &str| HeaderValue::from_str(v).map_err(tungstenite::http::Error::from);
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", header(p)?);
    }
    if let Some(t) = token {
        req.headers_mut()
            .insert("Authorization", header(&format!("Bearer {t}"))?);
    }
    Ok(req)
}

/// Opens a WebSocket with [`upgrade_request`]`(url, protocol, token)`; the upgrade response
/// too. A refused upgrade is `tungstenite::Error::Http` with the relay's response.
pub async fn connect_with(
    url: &str,
    protocol: Option<&str>,
    token: Option<&str>,
) -> Result<(Ws, Response), tungstenite::Error> {
    let req = upgrade_request(url, protocol, token)?;
    tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .map_err(|_| {
            tungstenite::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no WebSocket upgrade from {url} within {WAIT:?}"),
            ))
        })?
}

/// Opens a WebSocket to the relay at `url` offering [`SUBPROTOCOL`]; the upgrade response
/// too.
pub async fn connect(url: &str) -> Result<(Ws, Response), tungstenite::Error> {
    connect_with(url, Some(SUBPROTOCOL), None).await
}

/// A client on the relay at `url` after its WELCOME, and the connection id the relay gave it.
pub async fn client(url: &str) -> anyhow::Result<(Ws, ConnId)> {
    let (mut ws, _) = connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let (conn, _) = welcome(&mut ws).await?;
    Ok((ws, conn))
}

/// [`client`] speaking [`SUBPROTOCOL_V2`] (datagrams).
pub async fn client_v2(url: &str) -> anyhow::Result<(Ws, ConnId)> {
    let (mut ws, resp) = connect_with(url, Some(SUBPROTOCOL_V2), None)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let chosen = resp.headers().get("sec-websocket-protocol");
    if chosen.and_then(|v| v.to_str().ok()) != Some(SUBPROTOCOL_V2) {
        bail!("the relay did not select {SUBPROTOCOL_V2}: {chosen:?}");
    }
    let (conn, _) = welcome(&mut ws).await?;
    Ok((ws, conn))
}

/// Reads the WELCOME, which must be the first frame: the connection id and the announced
/// frame limit.
pub async fn welcome(ws: &mut Ws) -> anyhow::Result<(ConnId, u32)> {
    match next(ws).await? {
        Frame::Relay(RelayFrame::Welcome {
            conn, max_frame, ..
        }) => Ok((conn, max_frame)),
        other => bail!("expected WELCOME, got {other:?}"),
    }
}

/// The next relay frame. Text, ping and pong messages are skipped; a close, the end of the
/// stream, an undecodable frame or [`WAIT`] without a frame is an error.
pub async fn next(ws: &mut Ws) -> anyhow::Result<Frame> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .map_err(|_| anyhow!("no frame from the relay within {WAIT:?}"))?
            .context("the relay connection ended")?
            .context("reading from the relay")?;
        match msg {
            Message::Binary(b) => {
                return decode(&b).with_context(|| format!("undecodable frame {b:02x?}"));
            }
            Message::Close(c) => bail!("the relay closed the connection: {c:?}"),
            _ => {}
        }
    }
}

/// The next relay frame that is not a relay PING.
pub async fn next_data(ws: &mut Ws) -> anyhow::Result<Frame> {
    loop {
        match next(ws).await? {
            Frame::Ping(_) => {}
            f => return Ok(f),
        }
    }
}

/// Sends one frame.
pub async fn send(ws: &mut Ws, frame: Frame) -> anyhow::Result<()> {
    ws.send(Message::Binary(frame.encode().into()))
        .await
        .context("sending a frame to the relay")
}

/// Joins `room` and waits for its JOINED (relay PINGs before it are skipped); returns the
/// members JOINED lists.
pub async fn joined(ws: &mut Ws, room: RoomId) -> anyhow::Result<Vec<ConnId>> {
    send(ws, Frame::Client(ClientFrame::Join { room })).await?;
    match next_data(ws).await? {
        Frame::Relay(RelayFrame::Joined { peers, .. }) => Ok(peers),
        other => bail!("expected JOINED, got {other:?}"),
    }
}

/// Reads until the relay closes the connection; returns the close code and reason. A stream
/// that ends without a close frame, or a close frame without a code, is an error.
pub async fn closed(ws: &mut Ws) -> anyhow::Result<(u16, String)> {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .map_err(|_| anyhow!("the relay did not close the connection within {WAIT:?}"))?;
        match msg {
            Some(Ok(Message::Close(Some(c)))) => {
                return Ok((u16::from(c.code), c.reason.to_string()));
            }
            Some(Ok(Message::Close(None))) => bail!("the relay closed without a close code"),
            Some(Ok(_)) => {}
            other => bail!("the connection ended without a close frame: {other:?}"),
        }
    }
}
