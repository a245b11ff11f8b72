//! One WebSocket connection, from upgrade to close.
//!
//! A session is first `AwaitingLogin`, then `Active` for one verified user; the types make the
//! order impossible to get wrong (nothing but `login` can reach the store before there is an
//! identity). Two tasks share a connection: this module's reader, which handles the client's
//! frames strictly in order (so frames sent right after `login` wait for it), and a writer task
//! that owns the socket's sending half and a bounded queue.
//!
//! Delivery is confirmed at the transport level, because clients of the original protocol never
//! acknowledge anything: after writing message frames the writer sends a WebSocket ping, and
//! once the client's pong for it comes back every message written before it is marked delivered
//! in the store. A connection that dies before that loses nothing: the messages stay pending.
//!
//! The parts: `login` (AwaitingLogin and the login burst), `active` (a logged-in user's frames),
//! `presence` (online/offline for contacts), `writer` (the writer task), `tracker` (which
//! deliveries await a pong).

mod active;
mod login;
mod presence;
mod registry;
mod tracker;
mod writer;

use login::AwaitingLogin;
use tracker::Tracker;
use writer::Writer;

pub(crate) use presence::announce;
pub use registry::Connections;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use privora_protocol::LiveMessage;
use tokio::sync::mpsc;

use crate::error::Error;
use crate::hub::{ConnId, OutFrame, Outbound};
use crate::metrics;
use crate::server::AppState;
use crate::signal::Signal;
use crate::store::StoredMessage;

/// Close code for authentication failures only: clients sign the user out on it.
pub(super) const CLOSE_POLICY: u16 = 1008;
pub(super) const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a slow consumer or a peer that stopped answering: clients reconnect.
pub(super) const CLOSE_TRY_AGAIN: u16 = 1013;
/// Frames larger than this many times the frame limit are not answered but end the connection:
/// the transport refuses to buffer them.
pub const HARD_LIMIT_FACTOR: usize = 4;
/// Frames the writer writes before it flushes and considers a delivery ping.
pub(super) const WRITE_BATCH: usize = 256;
/// Message ids a writer remembers having written (to drop second copies); past this, it
/// forgets the ones the client has confirmed.
pub(super) const REMEMBERED_IDS: usize = 4096;

/// Runs one connection to its end.
///
/// Memory per idle connection is what limits a node (issue 5), and most of it is the two tasks'
/// futures: so this is a plain function that splits the socket and starts the writer before the
/// reader's future exists (an `async fn` would keep the whole `WebSocket` argument in its state
/// for the connection's life), and the reader boxes what it needs only briefly: the login, each
/// frame's handling, and the final wait for the writer. What stays is the state of waiting for
/// the next frame.
pub fn run(socket: WebSocket, state: Arc<AppState>) -> impl Future<Output = ()> + Send + 'static {
    let open = metrics::connection();
    let (sink, mut stream) = socket.split();
    let (out, queue) = mpsc::channel(state.config.outbound_queue);
    let conn = Conn {
        id: state.hub.next_conn_id(),
        out,
        tracker: Arc::new(Mutex::new(Tracker::new())),
        cut_off: Arc::new(Signal::default()),
        ended: Arc::new(Signal::default()),
    };
    state.connections.open(conn.id, &conn.cut_off, &state.shutdown);
    let writer = Writer::new(sink, &conn, &state);
    let writer = tokio::spawn(writer.run(queue));
    async move {
        let _open = open;
        let awaiting = AwaitingLogin { state, conn };
        let active = Box::pin(awaiting.run(&mut stream)).await;
        if let Some(mut active) = active {
            active.serve(&mut stream).await;
        }
        // Every sender of the queue is gone now (the hub's went with the `Online` guard): the
        // writer finishes what is queued and stops.
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(10), writer)).await;
    }
}

/// What the reader holds of its connection.
struct Conn {
    id: ConnId,
    out: mpsc::Sender<Outbound>,
    tracker: Arc<Mutex<Tracker>>,
    /// Raised by the hub when this connection's queue overflows, and by a shutdown
    /// (`Connections`).
    cut_off: Arc<Signal>,
    /// Raised by the writer when it stops: the reader stops too.
    ended: Arc<Signal>,
}

impl Conn {
    /// Queues an `error` frame. Waits if the client is not reading: back-pressure on this
    /// connection alone.
    async fn error(&self, error: &Error) {
        let _ = self.out.send(self.error_frame(error)).await;
    }

    /// The `error` frame for `error`, counted and logged, to be queued when its turn comes.
    fn error_frame(&self, error: &Error) -> Outbound {
        tracing::debug!(conn = self.id, code = error.code().as_str(), %error, "error frame");
        metrics::error(error.code(), metrics::Via::WebSocket);
        Outbound::Own(Box::new(OutFrame::plain(error.frame().encode())))
    }

    async fn close(&self, code: u16, reason: &str) {
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = self.out.send(Outbound::Close(Box::new(frame))).await;
    }

    fn heard(&self) {
        lock(&self.tracker).last_heard = Instant::now();
    }

    /// Reads the next frame, or None when the connection is over.
    async fn next(&self, stream: &mut SplitStream<WebSocket>) -> Option<Result<Message, axum::Error>> {
        tokio::select! {
            _ = self.ended.raised() => None,
            message = stream.next() => {
                self.heard();
                message
            }
        }
    }

    /// The frame-size rule shared by both states: oversized text gets `too_large`.
    fn check_size(&self, text: &str, limit: usize) -> Result<(), Error> {
        if text.len() > limit {
            return Err(Error::TooLarge { size: text.len(), limit });
        }
        Ok(())
    }

    /// A transport error while reading. An over-the-hard-limit frame is answered before closing.
    async fn read_failed(&self, error: axum::Error, limit: usize) {
        let text = error.to_string();
        if text.contains("Space limit exceeded")
            || text.contains("too long")
            || text.contains("Message too big")
        {
            self.error(&Error::TooLarge { size: limit * HARD_LIMIT_FACTOR + 1, limit }).await;
            self.close(CLOSE_TOO_BIG, "frame too large").await;
        } else {
            tracing::debug!(conn = self.id, %error, "read failed");
        }
    }
}

fn binary_frame() -> Error {
    Error::BadFrame("binary frames are not supported: send JSON text frames".into())
}

/// The `message` frame that delivers a message stored earlier, as a live one (a catch-up after
/// a Redis outage). A message just committed has its frame encoded before (`active.rs`).
pub(crate) fn live_frame(stored: StoredMessage) -> OutFrame {
    let id = stored.id;
    let live = LiveMessage {
        from: stored.sender,
        from_display_name: stored.sender_display_name,
        to: stored.recipient,
        message: stored.message,
        timestamp: stored.timestamp,
        id,
        msg_id: stored.msg_id,
    };
    OutFrame { text: live.encode_frame().into(), delivers: Some(id), committed: Some(Instant::now()) }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
