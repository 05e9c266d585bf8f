//! The connection's writer task: everything the relay sends on the control stream
//! leaves from here, and the device's deliveries are made here.
//!
//! It coalesces whatever is ready into one stream write; holds the answers that wait
//! for a commit ([`Out::Later`]) and writes each once it resolves; and, once the
//! connection is authenticated, owns the device's [`Delivering`]: it pulls on the
//! mailbox's wake-ups, with the pulled frames going into its next write, and applies
//! the acks the reader hands it. A delivery is thus one wake-up of one task, not a
//! delivery task's followed by the writer's.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use bytes::BytesMut;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tern_proto::frame;
use tokio::sync::mpsc;
use tracing::warn;

use super::push::{Delivering, Woken};
use super::{AckCmd, Frame, Later, Out};

/// Bytes the writer coalesces into one stream write.
const WRITE_BATCH: usize = 64 * 1024;

/// An answer the writer holds. A panic in one is caught, as a task of its own would
/// have it, so the connection's other answers go on.
type Answer = futures::future::CatchUnwind<AssertUnwindSafe<Later>>;

/// The writer's state beside the stream.
struct Writer {
    rx: mpsc::Receiver<Out>,
    /// Answers waiting for their commits.
    later: FuturesUnordered<Answer>,
    /// Frames to write next: answers resolved while the writer was busy, deliveries.
    ready: VecDeque<Frame>,
    /// Requests for the delivery taken while coalescing, handled after the write.
    requests: VecDeque<Out>,
    /// Acks waiting for a place among the answers in flight: until then the writer
    /// takes nothing more from the reader, which in turn reads no more requests.
    held: VecDeque<Box<AckCmd>>,
    /// An ack freed room in the window: pull before anything else.
    pull_now: bool,
    delivering: Option<Box<Delivering>>,
    /// The reader may still send.
    open: bool,
    /// The stream broke: frames are dropped, answers still run to their end.
    broken: bool,
}

/// Writes until every producer is gone and every answer resolved. If the stream
/// breaks, the answers it holds and is handed still run to their end: each one's
/// commit, and the wake-ups that follow it (other nodes, devices without a
/// connection), still happen.
pub(super) async fn write_frames(mut send: quinn::SendStream, rx: mpsc::Receiver<Out>) {
    let mut w = Writer {
        rx,
        later: FuturesUnordered::new(),
        ready: VecDeque::new(),
        requests: VecDeque::new(),
        held: VecDeque::new(),
        pull_now: false,
        delivering: None,
        open: true,
        broken: false,
    };
    let mut buf = BytesMut::new();
    while let Some(first) = w.next_frame().await {
        if w.broken {
            continue;
        }
        let queued = w.rx.len() + w.ready.len();
        let next = || w.next_ready();
        frame::encode_ready(&first, queued, next, WRITE_BATCH, &mut buf);
        let write = send.write_chunk(buf.split().freeze());
        if w.answering(write).await.is_err() {
            w.broke();
        }
    }
    if !w.broken {
        let _ = send.finish();
    }
}

impl Writer {
    /// The next frame to write, after whatever must happen first (a delivery's
    /// requests, answers, pulls); `None` once the reader is gone and every answer is
    /// written.
    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            while let Some(request) = self.requests.pop_front() {
                self.take(request).await;
            }
            if !self.held.is_empty() {
                self.take_held();
            }
            if std::mem::take(&mut self.pull_now) {
                self.pull().await;
            }
            if let Some(f) = self.ready.pop_front() {
                return Some(f);
            }
            let wants = self.open && self.held.is_empty();
            let has_delivering = self.delivering.is_some();
            let delivering = self.delivering.as_deref_mut();
            tokio::select! {
                Some(answer) = self.later.next(), if !self.later.is_empty() => {
                    self.ready.extend(answered(answer));
                }
                m = self.rx.recv(), if wants => match m {
                    Some(Out::Frame(f)) => return Some(f),
                    Some(request) => self.take(request).await,
                    None => {
                        self.open = false;
                        // The reader is gone: no more acks, so the delivery ends.
                        self.delivering = None;
                    }
                },
                woken = woken(delivering), if has_delivering => match woken {
                    Woken::Pull => self.pull().await,
                    Woken::Displaced => self.delivering = None,
                },
                else => return None,
            }
        }
    }

    /// A frame ready to join the write being coalesced, without waiting. Polled here,
    /// `later` registers no waker of ours; it is polled again with this task's own
    /// before it sleeps (the write, or `next_frame`).
    fn next_ready(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Some(f);
            }
            if !self.requests.is_empty() || !self.held.is_empty() || !self.open {
                return None;
            }
            match self.rx.try_recv() {
                Ok(Out::Frame(f)) => return Some(f),
                Ok(Out::Later(answer)) => self.later.push(hold(answer)),
                // Handled once this write is under way.
                Ok(request) => {
                    self.requests.push_back(request);
                    return None;
                }
                Err(_) => match self.later.next().now_or_never() {
                    Some(Some(answer)) => {
                        if let Some(f) = answered(answer) {
                            return Some(f);
                        }
                    }
                    _ => return None,
                },
            }
        }
    }

    /// Handles what the reader handed over besides a frame.
    async fn take(&mut self, request: Out) {
        match request {
            Out::Frame(f) => self.ready.push_back(f),
            Out::Later(answer) => self.later.push(hold(answer)),
            Out::Ack(cmd) => {
                self.held.push_back(cmd);
                self.take_held();
            }
            Out::Deliver(start) => {
                if self.delivering.is_none() && !self.broken {
                    // Boxed: the claim's database call would otherwise size the
                    // writer's state, which every idle connection keeps.
                    let start = Box::pin(Delivering::start(*start));
                    let started = self.answering(start).await;
                    self.delivering = Some(started);
                }
            }
        }
    }

    /// Applies the held acks while answers may wait for their commits (the cap on
    /// answers in flight); one that freed room in the window makes a pull follow.
    fn take_held(&mut self) {
        let Some(delivering) = self.delivering.as_deref_mut() else {
            // Displaced, or the stream broke: the connection is closing, and its acks
            // are not applied (the reader answers those before authentication).
            self.held.clear();
            return;
        };
        while !self.held.is_empty() {
            let Some(place) = delivering.place() else {
                return;
            };
            let Some(cmd) = self.held.pop_front() else {
                return;
            };
            let (answer, pull) = delivering.ack(*cmd, place);
            self.later.push(hold(answer));
            self.pull_now |= pull;
        }
    }

    async fn pull(&mut self) {
        let Some(mut delivering) = self.delivering.take() else {
            return;
        };
        let mut frames = Vec::new();
        self.answering(delivering.pull(&mut frames)).await;
        self.ready.extend(frames);
        self.delivering = Some(delivering);
    }

    /// Runs `f` while resolving the answers held, which go into `ready`.
    async fn answering<F: Future>(&mut self, f: F) -> F::Output {
        tokio::pin!(f);
        loop {
            tokio::select! {
                out = &mut f => return out,
                Some(answer) = self.later.next(), if !self.later.is_empty() => {
                    self.ready.extend(answered(answer));
                }
            }
        }
    }

    /// The stream broke: nothing more is written or delivered (what was pushed and not
    /// acknowledged is owed a push wake-up), and the answers go on to their end.
    fn broke(&mut self) {
        self.broken = true;
        self.ready.clear();
        self.delivering = None;
    }
}

async fn woken(delivering: Option<&mut Delivering>) -> Woken {
    match delivering {
        Some(d) => d.woken().await,
        None => std::future::pending().await,
    }
}

fn hold(answer: Later) -> Answer {
    AssertUnwindSafe(answer).catch_unwind()
}

/// The frame of a resolved answer; `None` (logged) if it panicked.
fn answered(answer: std::thread::Result<Frame>) -> Option<Frame> {
    match answer {
        Ok(frame) => Some(frame),
        Err(_) => {
            warn!("answering a request panicked");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_size<A, B, F>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every authenticated connection keeps the writer's state, deliveries included:
    /// a database call held in it unboxed (the cluster claim's is 3.6 KiB) would grow
    /// every idle connection.
    #[test]
    fn the_writers_state_stays_small() {
        let size = state_size(write_frames);
        assert!(size <= 1024, "the writer's state is {size} bytes");
    }
}
