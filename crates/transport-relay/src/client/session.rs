//! One peer's session, as a pure state machine: a handshake under way, then the established
//! session, which opens the peer's control chunks (CREDIT, CLOSE), polices the window this
//! side granted and seals this side's control chunks. A new session payload kind is an arm
//! of [`Live::on_frame`].

use std::sync::Arc;
use std::time::Instant;

use super::action::SessionId;
use super::flow::{Window, frame_cost};
use super::handshake::Handshake;
use super::wire::{self, CONTROL_NONCE_BASE, Chunk, chunk, kind};
use crate::error::SessionError;
use crate::protocol::{ConnId, RoomId};

/// A session with one peer (one relay connection id) in one room.
pub(crate) struct Session {
    pub(crate) id: SessionId,
    pub(crate) state: State,
}

/// Where a session is.
pub(crate) enum State {
    /// Handshaking since `started`.
    Pending { hs: Handshake, started: Instant },
    /// Established.
    Live(Live),
}

impl Session {
    /// The established session, if it is one.
    pub(crate) fn live(&self) -> Option<&Live> {
        match &self.state {
            State::Live(l) => Some(l),
            State::Pending { .. } => None,
        }
    }
}

/// An established session's state on the socket task's side (the connection holds the data
/// nonces and its send window).
pub(crate) struct Live {
    /// The hex of the peer's static key.
    pub(crate) peer_id: String,
    cipher: Option<Arc<snow::StatelessTransportState>>,
    /// Next nonce of the peer's control sequence.
    recv_ctl_nonce: u64,
    /// Next nonce of this side's control sequence.
    send_ctl_nonce: u64,
    /// What this side granted the peer, and what the peer used of it.
    recv: Window,
    /// The peer's total grant to this side (the connection's send window follows it).
    send_limit: u64,
}

/// What a frame of an established session amounts to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// Data for the connection (queued still sealed), using `cost` of the window.
    Data { cost: u64 },
    /// The peer's total grant to this side is now `limit`.
    Credit { limit: u64 },
    /// The peer closed the session.
    Close,
}

impl Live {
    /// A session whose peer granted `send_window`, granting it `recv_window`.
    pub(crate) fn new(
        peer_id: String,
        cipher: Option<Arc<snow::StatelessTransportState>>,
        send_window: u32,
        recv_window: u32,
    ) -> Self {
        Self {
            peer_id,
            cipher,
            recv_ctl_nonce: CONTROL_NONCE_BASE,
            send_ctl_nonce: CONTROL_NONCE_BASE,
            recv: Window::new(recv_window),
            send_limit: u64::from(send_window),
        }
    }

    /// Credit units this side granted the peer in total.
    pub(crate) fn granted(&self) -> u64 {
        self.recv.limit()
    }

    /// Credit units the peer may still send.
    pub(crate) fn remaining(&self) -> u64 {
        self.recv.remaining()
    }

    /// A peer frame (SEALED or PLAIN) of this session. An error ends the session.
    pub(crate) fn on_frame(&mut self, frame: &[u8]) -> Result<Event, SessionError> {
        let control = match (frame.first().copied(), self.cipher.as_deref()) {
            (Some(kind::SEALED), Some(cipher)) if wire::is_control_len(frame.len()) => {
                // Not sealed in the control sequence: a data frame of the same length.
                wire::open(cipher, self.recv_ctl_nonce, frame).ok()
            }
            (Some(kind::SEALED), Some(_)) => None,
            (Some(kind::PLAIN), None) => match frame.get(1) {
                Some(&(chunk::CREDIT | chunk::CLOSE)) => Some(frame[1..].to_vec()),
                _ => None,
            },
            (other, _) => {
                return Err(SessionError::Malformed {
                    what: format!(
                        "unexpected peer frame {:#04x} on an established session",
                        other.unwrap_or(0)
                    ),
                });
            }
        };
        let Some(plain) = control else {
            let cost = frame_cost(frame.len());
            self.recv
                .spend(cost)
                .map_err(|e| SessionError::WindowExceeded {
                    granted: e.limit,
                    used: e.needed,
                })?;
            return Ok(Event::Data { cost });
        };
        if self.cipher.is_some() {
            self.recv_ctl_nonce += 1;
        }
        match wire::decode_chunk(&plain)? {
            Chunk::Credit(n) => {
                self.send_limit = self.send_limit.saturating_add(n);
                Ok(Event::Credit {
                    limit: self.send_limit,
                })
            }
            Chunk::Close => Ok(Event::Close),
            Chunk::Data { .. } | Chunk::Abort => Err(SessionError::Malformed {
                what: "a data chunk in the control sequence".into(),
            }),
        }
    }

    /// Grants the peer `n` more credit units: the CREDIT relay frame to send. The window is
    /// raised first, so the peer is never policed with less than it may use.
    pub(crate) fn credit(
        &mut self,
        room: &RoomId,
        remote: ConnId,
        n: u64,
    ) -> Result<Vec<u8>, SessionError> {
        self.recv.grant(n);
        self.control(room, remote, chunk::CREDIT, &n.to_be_bytes())
    }

    /// The CLOSE relay frame that ends this session.
    pub(crate) fn close(&mut self, room: &RoomId, remote: ConnId) -> Result<Vec<u8>, SessionError> {
        self.control(room, remote, chunk::CLOSE, &[])
    }

    fn control(
        &mut self,
        room: &RoomId,
        remote: ConnId,
        flag: u8,
        body: &[u8],
    ) -> Result<Vec<u8>, SessionError> {
        wire::seal(
            self.cipher.as_deref(),
            &mut self.send_ctl_nonce,
            room,
            remote,
            flag,
            body,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::flow::{FLOW_FRAME_OVERHEAD, FLOW_MIN_WINDOW_BYTES};

    fn plain_chunk(flag: u8, body: &[u8]) -> Vec<u8> {
        [&[kind::PLAIN, flag][..], body].concat()
    }

    #[test]
    fn plain_control_chunks_and_data_within_the_window() {
        let mut s = Live::new("p".into(), None, 1000, FLOW_MIN_WINDOW_BYTES);
        let credit = plain_chunk(chunk::CREDIT, &7u64.to_be_bytes());
        assert_eq!(s.on_frame(&credit), Ok(Event::Credit { limit: 1007 }));
        let data = plain_chunk(chunk::LAST, b"hello");
        assert_eq!(
            s.on_frame(&data),
            Ok(Event::Data {
                cost: data.len() as u64 + FLOW_FRAME_OVERHEAD
            })
        );
        assert_eq!(
            s.on_frame(&plain_chunk(chunk::CLOSE, &[])),
            Ok(Event::Close)
        );
        assert!(matches!(
            s.on_frame(&plain_chunk(chunk::CREDIT, &[1])),
            Err(SessionError::Malformed { .. })
        ));
        assert!(matches!(
            s.on_frame(&[kind::SEALED, 0]),
            Err(SessionError::Malformed { .. })
        ));
    }

    #[test]
    fn data_beyond_the_window_is_refused_until_credit_is_granted() {
        let mut s = Live::new("p".into(), None, 1000, FLOW_MIN_WINDOW_BYTES);
        let frame = plain_chunk(chunk::MORE, &[0u8; 60_000]);
        let cost = frame_cost(frame.len());
        let fit = u64::from(FLOW_MIN_WINDOW_BYTES) / cost;
        for _ in 0..fit {
            s.on_frame(&frame).unwrap();
        }
        assert_eq!(
            s.on_frame(&frame),
            Err(SessionError::WindowExceeded {
                granted: u64::from(FLOW_MIN_WINDOW_BYTES),
                used: (fit + 1) * cost
            })
        );
        let credit = s.credit(&[0; 32], 1, cost).unwrap();
        assert_eq!(&credit[41..43], &[kind::PLAIN, chunk::CREDIT]);
        assert!(s.on_frame(&frame).is_ok(), "the granted credit is usable");
    }
}
