//! A logged-in connection: the user's frames, handled strictly in order. A message is stored
//! (committed) before it is routed; a pong confirms what was written before its ping.
//!
//! The reader does not wait for one message's commit before reading the next frame: it queues
//! the message with the store and notes what the frame still owes (a `Step`). Steps are settled
//! strictly in the order their frames came, so the client sees exactly what it would if every
//! frame were handled to the end before the next (a refusal still comes before the `pong` of a
//! `ping` sent after it), while a client with eight messages in flight shares one commit, one
//! read and one wake-up among them instead of paying each eight times.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::SplitStream;
use privora_protocol::{ClientFrame, LiveFrameStart, ServerFrame};
use serde_json::Value;
use tokio::sync::mpsc;

use super::presence::Online;
use super::{binary_frame, lock, Conn};
use crate::error::Error;
use crate::hub::{OutFrame, Outbound};
use crate::metrics;
use crate::server::AppState;
use crate::store::{Appended, Commit, Full, NewMessage, Queued, Receipt, StoreError};

/// Frames whose steps may wait unsettled before the reader stops reading: the client's
/// pipeline depth that still gains from sharing commits, and a bound on what one connection
/// holds in the store's queue.
const MAX_STEPS: usize = 64;

/// A logged-in connection.
pub(super) struct Active {
    pub(super) state: Arc<AppState>,
    pub(super) conn: Conn,
    /// Shared with every message this connection sends (`NewMessage`).
    pub(super) user_id: Arc<str>,
    pub(super) display_name: Arc<str>,
    pub(super) limiter: Option<RateLimiter>,
    /// The client asked for an `ack` of each message stored (opt-in at login).
    pub(super) acks: bool,
    pub(super) _online: Online,
}

/// What a frame still owes, settled in the order the frames came.
enum Step {
    /// A message queued with the store: routed once committed, or refused with an error frame.
    Store(Commit<Appended>, Unrouted),
    /// Deliveries the client confirmed, queued with the store; a failure is only logged.
    Confirm(Commit<()>),
    /// A frame for the client (an error, a `pong`), queued once everything before it is.
    Send(Outbound),
}

/// What routing a queued message takes once it is committed, kept by the session (the store's
/// writer gets the message itself and drops it once written).
struct Unrouted {
    recipient: String,
    /// Encoded from the sender's frame as soon as it was read (see `LiveFrameStart`).
    frame: LiveFrameStart,
    /// For the `ack`, when the client asked for acks.
    msg_id: Option<Value>,
}

/// A step, settled.
enum Settled {
    Stored(Result<Appended, StoreError>, Unrouted),
    Confirmed(Result<(), StoreError>),
    Send(Outbound),
}

/// What handling a frame came to.
enum Handled {
    Flow(ControlFlow<()>),
    /// Boxed: only the rare paths allocate it.
    Wait(Box<Wait>),
}

/// What a frame has to wait for before the next is read: rare.
enum Wait {
    /// The store's queue is full: the message waits for room, then is a step like any other.
    Store(Full<Appended>, Unrouted),
    /// The same for a pong's confirmations.
    Confirm(Full<()>),
    /// Reading failed: what earlier frames owe goes out, then the answer to this one.
    ReadFailed(axum::Error),
}

/// What the reader does next.
enum Next {
    Settle(Settled),
    Frame(Option<Result<Message, axum::Error>>),
}

impl Active {
    /// Handles the user's frames until the connection ends. By reference: the caller's future
    /// already holds the `Active`, and a second copy in this one would cost every connection.
    pub(super) async fn serve(&mut self, stream: &mut SplitStream<WebSocket>) {
        // Empty (no allocation) while the connection is idle.
        let mut steps = VecDeque::new();
        loop {
            let room = steps.len() < MAX_STEPS;
            // The oldest step first: what is owed goes out before more is read.
            let next = tokio::select! {
                biased;
                settled = settle_front(&mut steps) => Next::Settle(settled),
                message = self.conn.next(stream), if room => Next::Frame(message),
            };
            let flow = match next {
                Next::Settle(settled) => {
                    if let Some(outbound) = self.settled(settled) {
                        match self.conn.out.try_send(outbound) {
                            // Boxed: waiting on the queue would otherwise be part of every
                            // idle connection's state.
                            Err(mpsc::error::TrySendError::Full(outbound)) => {
                                let _ = Box::pin(self.conn.out.send(outbound)).await;
                            }
                            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                        }
                    }
                    ControlFlow::Continue(())
                }
                Next::Frame(None) => ControlFlow::Break(()),
                Next::Frame(Some(message)) => match self.handle(message, &mut steps) {
                    Handled::Flow(flow) => flow,
                    // The rare paths that wait take a future many times the size of waiting
                    // for a frame: boxed, it costs memory only while it runs, not for as long
                    // as the connection sits idle.
                    Handled::Wait(wait) => Box::pin(self.wait(*wait, &mut steps)).await,
                },
            };
            if let ControlFlow::Break(()) = flow {
                break;
            }
        }
        // The connection is over, but what it queued is committed all the same: route it.
        Box::pin(self.settle_all(&mut steps)).await;
    }

    /// Settles every step, oldest first.
    async fn settle_all(&mut self, steps: &mut VecDeque<Step>) {
        while !steps.is_empty() {
            let settled = settle_front(steps).await;
            if let Some(outbound) = self.settled(settled) {
                let _ = self.conn.out.send(outbound).await;
            }
        }
    }

    /// Acts on a settled step: routes a committed message; returns the frame to queue for the
    /// client (a refusal, a `pong`, an `ack` if it asked for acks), if any. Not async, so that
    /// routing a committed message, what nearly every step comes to, takes no future (nor its
    /// allocation) of its own.
    fn settled(&mut self, settled: Settled) -> Option<Outbound> {
        match settled {
            // Sent again after a lost ack: stored and routed the first time, acked again now.
            Settled::Stored(Ok(Appended::Again(receipt)), unrouted) => {
                self.acks.then(|| ack_frame(&receipt, unrouted.msg_id))
            }
            Settled::Stored(Ok(Appended::New(receipt)), unrouted) => {
                metrics::message_in();
                let text = unrouted.frame.finish(&receipt.timestamp, receipt.id);
                // Delivery latency is measured from here: the message was committed just before.
                let frame = OutFrame {
                    text: text.into(),
                    delivers: Some(receipt.id),
                    committed: Some(Instant::now()),
                };
                self.state.hub.send(&unrouted.recipient, frame);
                self.acks.then(|| ack_frame(&receipt, unrouted.msg_id))
            }
            Settled::Stored(Err(error), _) => Some(self.conn.error_frame(&Error::from(error))),
            Settled::Confirmed(Ok(())) => None,
            Settled::Confirmed(Err(error)) => {
                // Not fatal: the messages stay pending and come again at the next login.
                tracing::warn!(conn = self.conn.id, %error, "could not mark messages delivered");
                None
            }
            Settled::Send(outbound) => Some(outbound),
        }
    }

    /// Handles one frame without waiting for anything: the common paths (a message queued
    /// with the store, a pong's confirmations, a ping) take no future. An `async fn` here made
    /// a future of over 1,100 bytes for every frame, allocated and freed each time, and past
    /// what glibc's per-thread cache serves (1,032 bytes): malloc's slow path on every frame
    /// (`perf`, session 13: most of the workers' allocator samples). What has to wait comes
    /// back as a `Wait`.
    fn handle(&mut self, message: Result<Message, axum::Error>, steps: &mut VecDeque<Step>) -> Handled {
        let message = match message {
            Ok(message) => message,
            Err(error) => return Handled::Wait(Box::new(Wait::ReadFailed(error))),
        };
        match message {
            Message::Text(text) => match self.handle_text(&text, steps) {
                Ok(None) => {}
                Ok(Some(wait)) => return Handled::Wait(Box::new(wait)),
                Err(error) => steps.push_back(Step::Send(self.conn.error_frame(&error))),
            },
            Message::Binary(_) => steps.push_back(Step::Send(self.conn.error_frame(&binary_frame()))),
            Message::Pong(payload) => {
                if let Some(wait) = self.confirm(&payload, steps) {
                    return Handled::Wait(Box::new(wait));
                }
            }
            Message::Ping(_) => {}
            Message::Close(_) => return Handled::Flow(ControlFlow::Break(())),
        }
        Handled::Flow(ControlFlow::Continue(()))
    }

    /// What a frame left to wait for.
    async fn wait(&mut self, wait: Wait, steps: &mut VecDeque<Step>) -> ControlFlow<()> {
        match wait {
            Wait::Store(full, unrouted) => match full.wait(self.state.store.writes()).await {
                Ok(commit) => steps.push_back(Step::Store(commit, unrouted)),
                Err(error) => steps.push_back(Step::Send(self.conn.error_frame(&Error::from(error)))),
            },
            Wait::Confirm(full) => match full.wait(self.state.store.writes()).await {
                Ok(commit) => steps.push_back(Step::Confirm(commit)),
                Err(error) => {
                    tracing::warn!(conn = self.conn.id, %error, "could not mark messages delivered")
                }
            },
            Wait::ReadFailed(error) => {
                // What earlier frames owe goes out before the answer to this one.
                self.settle_all(steps).await;
                self.conn.read_failed(error, self.state.config.max_frame_bytes).await;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn handle_text(&mut self, text: &str, steps: &mut VecDeque<Step>) -> Result<Option<Wait>, Error> {
        self.conn.check_size(text, self.state.config.max_frame_bytes)?;
        match ClientFrame::decode(text)? {
            ClientFrame::Message { to, message, msg_id } => {
                let (queued, unrouted) = self.send(to, message, msg_id)?;
                match queued {
                    Queued::Now(commit) => steps.push_back(Step::Store(commit, unrouted)),
                    Queued::Full(full) => return Ok(Some(Wait::Store(full, unrouted))),
                }
                Ok(None)
            }
            ClientFrame::Ping => {
                steps.push_back(Step::Send(Outbound::Pong));
                Ok(None)
            }
            ClientFrame::Login { .. } => Err(Error::BadFrame("already logged in".into())),
        }
    }

    /// Checks a message and queues it with the store (if its queue has room); it is routed
    /// once committed (nobody hears of it before).
    fn send(
        &mut self,
        to: String,
        message: String,
        msg_id: Option<serde_json::Value>,
    ) -> Result<(Queued<Appended>, Unrouted), Error> {
        let config = &self.state.config;
        if to.is_empty() {
            return Err(Error::BadFrame("field \"to\" is empty".into()));
        }
        if to.chars().count() > config.max_recipient_chars {
            return Err(Error::BadFrame(format!(
                "field \"to\" is longer than {} characters",
                config.max_recipient_chars
            )));
        }
        if message.is_empty() {
            return Err(Error::BadFrame("field \"message\" is empty".into()));
        }
        if message.chars().count() > config.max_message_chars {
            return Err(Error::BadFrame(format!(
                "field \"message\" is longer than {} characters",
                config.max_message_chars
            )));
        }
        if let Some(limiter) = &mut self.limiter {
            if !limiter.allow() {
                return Err(Error::RateLimited(limiter.per_second));
            }
        }
        let unrouted = Unrouted {
            frame: LiveFrameStart::new(&self.user_id, &self.display_name, &to, &message, msg_id.as_ref()),
            recipient: to.clone(),
            msg_id: if self.acks { msg_id.clone() } else { None },
        };
        let queued = self.state.store.writes().try_queue_append(NewMessage {
            sender: self.user_id.clone(),
            sender_display_name: self.display_name.clone(),
            recipient: to,
            message,
            // With acks, the client can tell what was stored and resends the rest after a
            // reconnect: its msg_id names the message. Without, msg_ids are the client's own
            // business (the original protocol says nothing of their being unique).
            idempotent: self.acks && msg_id.is_some(),
            msg_id,
        })?;
        Ok((queued, unrouted))
    }

    /// A pong came back: everything written before its ping has reached the client.
    fn confirm(&self, payload: &[u8], steps: &mut VecDeque<Step>) -> Option<Wait> {
        let Ok(seq) = <[u8; 8]>::try_from(payload).map(u64::from_be_bytes) else { return None };
        let (delivered, more) = lock(&self.conn.tracker).pong(seq);
        if more {
            let _ = self.conn.out.try_send(Outbound::PingNow);
        }
        if delivered.is_empty() {
            return None;
        }
        match self.state.store.writes().try_queue_delivered(&self.user_id, delivered) {
            Ok(Queued::Now(commit)) => steps.push_back(Step::Confirm(commit)),
            Ok(Queued::Full(full)) => return Some(Wait::Confirm(full)),
            // Not fatal: the messages stay pending and come again at the next login.
            Err(error) => tracing::warn!(conn = self.conn.id, %error, "could not mark messages delivered"),
        }
        None
    }
}

/// The `ack` of a stored message, for a client that asked for acks.
fn ack_frame(receipt: &Receipt, msg_id: Option<Value>) -> Outbound {
    let frame = ServerFrame::Ack { id: receipt.id, timestamp: receipt.timestamp.clone(), msg_id };
    Outbound::Own(Box::new(OutFrame::plain(frame.encode())))
}

/// Waits for the oldest step to settle and takes it off the queue; never resolves while the
/// queue is empty. Steps behind the oldest are not polled: the store commits in queue order,
/// so they are never ready before it.
async fn settle_front(steps: &mut VecDeque<Step>) -> Settled {
    poll_fn(|cx| {
        let settled = match steps.front_mut() {
            None => return Poll::Pending,
            Some(Step::Store(commit, _)) => {
                let result = std::task::ready!(Pin::new(commit).poll(cx));
                return match steps.pop_front() {
                    Some(Step::Store(_, unrouted)) => Poll::Ready(Settled::Stored(result, unrouted)),
                    _ => Poll::Pending,
                };
            }
            Some(Step::Confirm(commit)) => Settled::Confirmed(std::task::ready!(Pin::new(commit).poll(cx))),
            Some(Step::Send(_)) => match steps.pop_front() {
                Some(Step::Send(outbound)) => return Poll::Ready(Settled::Send(outbound)),
                _ => return Poll::Pending,
            },
        };
        steps.pop_front();
        Poll::Ready(settled)
    })
    .await
}

/// Token bucket: `per_second` sustained, `burst` at once.
pub(super) struct RateLimiter {
    pub(super) per_second: u32,
    pub(super) burst: f64,
    pub(super) tokens: f64,
    pub(super) last: Instant,
}

impl RateLimiter {
    pub(super) fn new(limit: crate::config::RateLimit) -> RateLimiter {
        RateLimiter {
            per_second: limit.per_second,
            burst: limit.burst as f64,
            tokens: limit.burst as f64,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second as f64)
            .min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_the_burst_then_refuses() {
        let mut limiter = RateLimiter::new(crate::config::RateLimit { per_second: 1, burst: 3 });
        assert!((0..3).all(|_| limiter.allow()));
        assert!(!limiter.allow());
    }
}
