//! Socket supervision: runs one relay socket at a time for the driver (the writer task, pings,
//! the idle timeout, reading paced by the outbound budget), and when a socket is lost
//! reconnects with jittered exponential backoff, next URL first. Knows nothing of sessions.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::builder::Settings;
use super::connection::Ctl;
use super::dial::{self, Socket, WsStream};
use super::driver::{Cmd, Driver};
use super::outbound::OUTBOUND_QUEUE_FRAMES;
use crate::RelayError;
use crate::protocol::{self, Frame};

/// First wait before reconnecting to a lost relay (jittered ±25%).
pub(crate) const RECONNECT_INITIAL_DELAY: Duration = Duration::from_millis(100);
/// Longest wait between reconnect rounds: a restarted relay is found within 10 s, and
/// thousands of clients do not hammer it in lockstep.
pub(crate) const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(10);
/// How often timers are checked (pings, idle, handshake expiry, the PEER_JOINED fallback).
pub(crate) const TICK: Duration = Duration::from_millis(500);
/// How long a disconnect waits for its CLOSE frames to be written.
const DISCONNECT_FLUSH: Duration = Duration::from_secs(2);

/// Pings after `ping` of silence from the relay; gives the socket up after `idle`.
pub(crate) struct KeepAlive {
    ping: Duration,
    idle: Duration,
    last_rx: Instant,
    last_ping: Instant,
}

/// What the keep-alive wants on a tick.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Send a PING.
    Ping,
    /// Nothing arrived for the idle timeout: give the socket up.
    Idle,
}

impl KeepAlive {
    pub(crate) fn new(now: Instant, ping: Duration, idle: Duration) -> Self {
        Self {
            ping,
            idle,
            last_rx: now,
            last_ping: now,
        }
    }

    /// Something arrived from the relay.
    pub(crate) fn on_receive(&mut self, now: Instant) {
        self.last_rx = now;
    }

    pub(crate) fn on_tick(&mut self, now: Instant) -> Option<Beat> {
        if now.duration_since(self.last_rx) >= self.idle {
            return Some(Beat::Idle);
        }
        if now.duration_since(self.last_rx.max(self.last_ping)) >= self.ping {
            self.last_ping = now;
            return Some(Beat::Ping);
        }
        None
    }
}

/// Exponential backoff between reconnect rounds, jittered.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self {
            next: RECONNECT_INITIAL_DELAY,
        }
    }

    /// The wait before the next round (±25%); each round doubles it up to the maximum.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = jitter(self.next, random_u16());
        self.next = (self.next * 2).min(RECONNECT_MAX_DELAY);
        d
    }
}

fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    match getrandom::fill(&mut b) {
        Ok(()) => u16::from_le_bytes(b),
        Err(_) => 0x8000,
    }
}

/// `d` scaled by 0.75 .. 1.25 as `r` goes from 0 to `u16::MAX`, so that clients of a
/// restarted relay do not all return at once.
fn jitter(d: Duration, r: u16) -> Duration {
    d.mul_f64(0.75 + f64::from(r) / f64::from(u16::MAX) / 2.0)
}

enum Outcome {
    /// The socket ended; reconnect, starting after URL `url_index`.
    Lost {
        url_index: usize,
    },
    Disconnect(oneshot::Sender<()>),
    /// The transport was dropped.
    Dropped,
}

pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Owns the relay link until the transport disconnects or is dropped: runs each socket, and
/// when one is lost ends every session (their connections read `None`), reconnects and
/// rejoins every room.
pub(crate) async fn supervise(
    settings: Arc<Settings>,
    mut driver: Driver,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
    first: Socket,
    mut cmds: mpsc::Receiver<Cmd>,
) {
    let mut socket = first;
    loop {
        let url_index = match run_socket(&settings, &mut driver, &mut ctl, socket, &mut cmds).await
        {
            Outcome::Lost { url_index } => url_index,
            Outcome::Disconnect(done) => {
                driver.finish();
                let _ = done.send(());
                return;
            }
            Outcome::Dropped => return driver.finish(),
        };
        match reconnect(&settings, &mut driver, &mut ctl, &mut cmds, url_index).await {
            Some(s) => socket = s,
            None => return,
        }
    }
}

/// Waits (serving the application and the connections meanwhile) and dials until a relay
/// answers; `None` when the transport is disconnected or dropped meanwhile.
async fn reconnect(
    settings: &Settings,
    driver: &mut Driver,
    ctl: &mut mpsc::UnboundedReceiver<Ctl>,
    cmds: &mut mpsc::Receiver<Cmd>,
    url_index: usize,
) -> Option<Socket> {
    let mut backoff = Backoff::new();
    let mut start = url_index + 1;
    loop {
        let wake = Instant::now() + backoff.next_delay();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                cmd = cmds.recv() => match cmd {
                    None => {
                        driver.finish();
                        return None;
                    }
                    Some(Cmd::Disconnect { done }) => {
                        driver.disconnect();
                        driver.finish();
                        let _ = done.send(());
                        return None;
                    }
                    Some(cmd) => driver.command(cmd),
                },
                Some(c) = ctl.recv() => driver.ctl(c),
            }
        }
        match dial::connect_any(settings, start).await {
            Ok(s) => return Some(s),
            Err(e) => {
                driver.record(e);
                start = 0;
            }
        }
    }
}

/// Runs one socket until it ends, the transport disconnects, or the transport is dropped.
/// Nothing here waits on the outbound queue except the branch that moves the socket task's
/// own frames into it, so timers keep running even when the relay stops reading us.
async fn run_socket(
    settings: &Settings,
    driver: &mut Driver,
    ctl: &mut mpsc::UnboundedReceiver<Ctl>,
    socket: Socket,
    cmds: &mut mpsc::Receiver<Cmd>,
) -> Outcome {
    let Socket {
        ws,
        me,
        max_frame,
        url_index,
        url,
    } = socket;
    let (sink, mut stream) = ws.split();
    let (out, out_rx) = mpsc::channel(OUTBOUND_QUEUE_FRAMES);
    // Aborted when this future is dropped (transport dropped), so the socket closes even
    // while the application still holds connections.
    let mut writer = AbortOnDrop(tokio::spawn(writer(sink, out_rx)));
    driver.socket_up(out, me, max_frame, url);
    let mut tick = tokio::time::interval(TICK);
    let mut alive = KeepAlive::new(Instant::now(), settings.keep_alive, settings.idle_timeout);
    let lost = |driver: &mut Driver, reason: String| {
        let url = driver.url().to_owned();
        driver.record(RelayError::Protocol { url, reason });
        driver.socket_lost();
        Outcome::Lost { url_index }
    };
    loop {
        let waiting = driver.outbound().waiting();
        let room = waiting.then(|| driver.outbound().room());
        let room = async move {
            match room {
                Some(room) => room.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = stream.next(), if driver.outbound().may_read() => {
                alive.on_receive(Instant::now());
                match msg {
                    Some(Ok(Message::Binary(b))) => match protocol::decode(&b) {
                        Ok(Frame::Relay(f)) => driver.relay_frame(f),
                        Ok(Frame::Ping(n)) => driver.send_frame(&Frame::Pong(n)),
                        Ok(_) => {}
                        Err(e) => return lost(driver, e.to_string()),
                    },
                    Some(Ok(Message::Close(c))) => {
                        let why = c.map(|c| format!("{} {}", u16::from(c.code), c.reason));
                        return lost(driver, format!("the relay closed the connection: {}", why.unwrap_or_default()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return lost(driver, format!("the relay connection ended: {e}")),
                    None => return lost(driver, "the relay connection ended".into()),
                }
            }
            cmd = cmds.recv() => match cmd {
                None => {
                    driver.socket_lost();
                    return Outcome::Dropped;
                }
                Some(Cmd::Disconnect { done }) => {
                    driver.disconnect();
                    let flushed = tokio::time::timeout(DISCONNECT_FLUSH, async {
                        driver.outbound().drain().await;
                        let _ = (&mut writer.0).await;
                    });
                    let _ = flushed.await;
                    return Outcome::Disconnect(done);
                }
                Some(cmd) => driver.command(cmd),
            },
            Some(c) = ctl.recv() => driver.ctl(c),
            permit = room, if waiting => match permit {
                Ok(p) => driver.outbound().send_reserved(p),
                Err(_) => return lost(driver, "the relay connection ended".into()),
            },
            _ = tick.tick() => {
                match alive.on_tick(Instant::now()) {
                    Some(Beat::Idle) => {
                        let ms = settings.idle_timeout.as_millis();
                        return lost(driver, format!("nothing received for {ms} ms"));
                    }
                    Some(Beat::Ping) => driver.send_frame(&Frame::Ping(1)),
                    None => {}
                }
                driver.tick();
            }
        }
    }
}

/// Writes queued frames to the relay socket, batching flushes.
pub(crate) async fn writer(
    mut sink: SplitSink<WsStream, Message>,
    mut rx: mpsc::Receiver<Message>,
) {
    while let Some(m) = rx.recv().await {
        let mut closing = matches!(m, Message::Close(_));
        if sink.feed(m).await.is_err() {
            return;
        }
        while !closing {
            match rx.try_recv() {
                Ok(m) => {
                    closing = matches!(m, Message::Close(_));
                    if sink.feed(m).await.is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        if sink.flush().await.is_err() || closing {
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
            return;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_pings_after_silence_and_gives_up_after_the_idle_timeout() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut k = KeepAlive::new(t0, s(20), s(60));
        assert_eq!(k.on_tick(t0 + s(19)), None);
        assert_eq!(k.on_tick(t0 + s(20)), Some(Beat::Ping));
        assert_eq!(k.on_tick(t0 + s(30)), None, "one ping per interval");
        assert_eq!(k.on_tick(t0 + s(40)), Some(Beat::Ping));
        k.on_receive(t0 + s(45));
        assert_eq!(k.on_tick(t0 + s(60)), None, "heard from it at 45 s");
        assert_eq!(k.on_tick(t0 + s(65)), Some(Beat::Ping));
        assert_eq!(k.on_tick(t0 + s(105)), Some(Beat::Idle));
    }

    #[test]
    fn backoff_doubles_to_the_maximum_with_jitter() {
        assert_eq!(jitter(Duration::from_secs(4), 0), Duration::from_secs(3));
        assert_eq!(
            jitter(Duration::from_secs(4), u16::MAX),
            Duration::from_secs(5)
        );
        let mut b = Backoff::new();
        let mut last = Duration::ZERO;
        for round in 0..12 {
            let d = b.next_delay();
            let base = (RECONNECT_INITIAL_DELAY * 2u32.pow(round)).min(RECONNECT_MAX_DELAY);
            assert!(d >= base.mul_f64(0.75) && d <= base.mul_f64(1.25), "{d:?}");
            last = d;
        }
        assert!(last >= RECONNECT_MAX_DELAY.mul_f64(0.75));
    }
}
