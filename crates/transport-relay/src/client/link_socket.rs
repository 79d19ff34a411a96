//! The datagram link's socket task: dials (`pluresdb-relay.v2`, URLs in order), runs one
//! socket at a time (the writer task, which joins queued datagram frames, pings and the idle timeout, the link machine's frames
//! in order within a budget), hands received datagrams straight to the owner (dropped when
//! the owner's queue is full) and membership events in order (the relay is not read while
//! the owner's event queue is full), and on loss redials with jittered backoff, next URL
//! first. Ends when the link closes or its owner drops the receivers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::coalesce;
use super::datagram::{Datagram, LINK_EVENT_QUEUE, LinkEvent, Out, Shared};
use super::dial::{self, Socket};
use super::link_machine::{LinkMachine, Step};
use super::outbound::{OUTBOUND_QUEUE_FRAMES, Outbound};
use super::supervisor::{AbortOnDrop, Backoff, Beat, KeepAlive, TICK};
use crate::RelayError;
use crate::protocol::{self, DATAGRAM_OVERHEAD, Frame, SUBPROTOCOL_V2, decode_datagram_from};

/// Why a socket ended.
enum Ended {
    /// Lost: redial, starting after URL `url_index`.
    Lost { url_index: usize },
    /// The link closed or its owner is gone.
    Closed,
}

/// The owner's ends and the events waiting for room in theirs.
struct Owner {
    datagrams: mpsc::Sender<Datagram>,
    events: mpsc::Sender<LinkEvent>,
    waiting: VecDeque<LinkEvent>,
}

impl Owner {
    /// Queues `e` after the events waiting before it.
    fn event(&mut self, e: LinkEvent) {
        self.waiting.push_back(e);
        self.flush();
    }

    fn flush(&mut self) {
        while let Some(e) = self.waiting.pop_front() {
            match self.events.try_send(e) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(e)) => {
                    self.waiting.push_front(e);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.waiting.clear();
                    return;
                }
            }
        }
    }

    /// Whether the relay may be read (the owner keeps up with events).
    fn may_read(&self) -> bool {
        self.waiting.len() < LINK_EVENT_QUEUE
    }

    fn gone(&self) -> bool {
        self.events.is_closed() && self.datagrams.is_closed()
    }
}

/// Runs the link until it closes.
pub(crate) async fn run(
    shared: Arc<Shared>,
    datagrams: mpsc::Sender<Datagram>,
    events: mpsc::Sender<LinkEvent>,
) {
    let mut owner = Owner {
        datagrams,
        events,
        waiting: VecDeque::new(),
    };
    let mut machine = LinkMachine::default();
    let mut link = 0u64;
    let mut start = 0;
    let mut backoff = Backoff::new();
    loop {
        if shared.state().closed || owner.gone() {
            return;
        }
        let dialled = tokio::select! {
            d = dial::connect_any_with(&shared.settings, start, SUBPROTOCOL_V2) => d,
            () = closed(&shared) => return,
        };
        match dialled {
            Ok(socket) => {
                link += 1;
                backoff = Backoff::new();
                match run_socket(&shared, &mut machine, &mut owner, socket, link).await {
                    Ended::Lost { url_index } => start = url_index + 1,
                    Ended::Closed => return,
                }
            }
            Err(e) => {
                shared.errors.record("", e);
                start = 0;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = closed(&shared) => return,
        }
    }
}

/// Resolves once the link is closed.
async fn closed(shared: &Shared) {
    loop {
        let changed = shared.changed.notified();
        if shared.state().closed {
            return;
        }
        // A change that is not a close is read by the next socket from the state anyway.
        changed.await;
    }
}

/// Carries out the machine's steps.
fn apply(steps: Vec<Step>, out: &mut Outbound, owner: &mut Owner) {
    for step in steps {
        match step {
            Step::Send(f) => out.push(Message::Binary(Frame::Client(f).encode().into())),
            Step::Event(e) => owner.event(e),
        }
    }
}

async fn run_socket(
    shared: &Arc<Shared>,
    machine: &mut LinkMachine,
    owner: &mut Owner,
    socket: Socket,
    link: u64,
) -> Ended {
    let Socket {
        ws,
        me,
        max_frame,
        url_index,
        url,
    } = socket;
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE_FRAMES);
    let max_frame = max_frame.max(DATAGRAM_OVERHEAD + 1);
    let _writer = AbortOnDrop(tokio::spawn(coalesce::writer(sink, rx, max_frame)));
    let mut out = Outbound::dead();
    out.replace(tx.clone());
    let wanted = {
        let mut st = shared.state();
        st.out = Some(Out {
            link,
            tx,
            max_frame,
        });
        st.wanted.clone()
    };
    tracing::debug!(relay = %url, link, me, "datagram link up");
    apply(machine.want(&wanted), &mut out, owner);
    apply(machine.socket_up(link, me, url.clone()), &mut out, owner);
    let mut tick = tokio::time::interval(TICK);
    let s = &shared.settings;
    let mut alive = KeepAlive::new(Instant::now(), s.keep_alive, s.idle_timeout);
    let ended = loop {
        let waiting = out.waiting();
        let room = waiting.then(|| out.room());
        let room = async move {
            match room {
                Some(room) => room.await,
                None => std::future::pending().await,
            }
        };
        let events_waiting = !owner.waiting.is_empty();
        let events_room = owner.events.clone();
        let events_room = async move {
            if events_waiting {
                events_room.reserve_owned().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            msg = stream.next(), if out.may_read() && owner.may_read() => {
                alive.on_receive(Instant::now());
                match msg {
                    Some(Ok(Message::Binary(b))) => {
                        if let Some(d) = decode_datagram_from(&b) {
                            let datagram = Datagram {
                                link,
                                room: d.room,
                                from: d.from,
                                segment: d.segment,
                                payload: b.slice(DATAGRAM_OVERHEAD..),
                            };
                            let counter = match owner.datagrams.try_send(datagram) {
                                Ok(()) => &shared.received,
                                Err(_) => &shared.received_dropped,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        match protocol::decode(&b) {
                            Ok(Frame::Relay(f)) => apply(machine.on_frame(f), &mut out, owner),
                            Ok(Frame::Ping(n)) => out.push(Message::Binary(Frame::Pong(n).encode().into())),
                            Ok(_) => {}
                            Err(e) => break lost(url_index, format!("bad frame from the relay: {e}")),
                        }
                    }
                    Some(Ok(Message::Close(c))) => {
                        let why = c.map(|c| format!("{} {}", u16::from(c.code), c.reason));
                        break lost(url_index, format!("the relay closed the connection: {}", why.unwrap_or_default()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break lost(url_index, format!("the relay connection ended: {e}")),
                    None => break lost(url_index, "the relay connection ended".into()),
                }
            }
            () = shared.changed.notified() => {
                let (closed, wanted) = {
                    let st = shared.state();
                    (st.closed, st.wanted.clone())
                };
                apply(machine.want(&wanted), &mut out, owner);
                if closed {
                    // The LEAVEs go out first, then the close.
                    let flush = async {
                        out.drain().await;
                    };
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flush).await;
                    break (Ended::Closed, "the link closed".to_owned());
                }
            }
            permit = room, if waiting => match permit {
                Ok(p) => out.send_reserved(p),
                Err(_) => break lost(url_index, "the relay connection ended".into()),
            },
            permit = events_room, if events_waiting => match permit {
                Ok(p) => {
                    if let Some(e) = owner.waiting.pop_front() {
                        p.send(e);
                    }
                    owner.flush();
                }
                Err(_) if owner.datagrams.is_closed() => break (Ended::Closed, "the owner is gone".to_owned()),
                Err(_) => owner.waiting.clear(),
            },
            _ = tick.tick() => {
                if owner.gone() {
                    break (Ended::Closed, "the owner is gone".to_owned());
                }
                match alive.on_tick(Instant::now()) {
                    Some(Beat::Idle) => {
                        let ms = s.idle_timeout.as_millis();
                        break lost(url_index, format!("nothing received for {ms} ms"));
                    }
                    Some(Beat::Ping) => out.push(Message::Binary(Frame::Ping(1).encode().into())),
                    None => {}
                }
            }
        }
    };
    let (ended, reason) = ended;
    {
        let mut st = shared.state();
        if st.out.as_ref().is_some_and(|o| o.link == link) {
            st.out = None;
        }
    }
    if matches!(ended, Ended::Lost { .. }) {
        shared.errors.record(
            &url,
            RelayError::Protocol {
                url: url.clone(),
                reason: reason.clone(),
            },
        );
    }
    apply(machine.socket_lost(reason), &mut out, owner);
    ended
}

fn lost(url_index: usize, reason: String) -> (Ended, String) {
    (Ended::Lost { url_index }, reason)
}
