//! The store: where messages, delivery state and users live. The database is the truth.
//!
//! `Store` is the seam between the chat logic and a database; every implementation passes the
//! same conformance tests (`tests/it/store.rs`). Writes are batched by one writer task per store
//! (group commit): a caller hears back only after its write is committed. A caller may queue
//! several writes before waiting for the first (`WriteQueue::queue_append`): one writer commits
//! them in the order they were queued, so a session keeps its messages in order without waiting
//! a commit per message.

mod batch_inserts;
pub mod batch_queue;
pub mod checkpointer;
mod known_pairs;
pub mod msg_ids;
pub mod postgres;
pub mod sqlite;
pub mod tail_recipients;
pub mod writer;

pub use writer::{Full, Queued, WriteQueue};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use privora_protocol::Contact;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::metrics::StoreOp;

/// A message as a sender's session hands it to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Shared with the session that sends, which would otherwise copy both strings for every
    /// message (and the writer thread free them: glibc frees into the arena of the thread
    /// that allocated, under its lock).
    pub sender: Arc<str>,
    pub sender_display_name: Arc<str>,
    pub recipient: String,
    pub message: String,
    pub msg_id: Option<Value>,
    /// The sender's `msg_id` names this message (a client that asked for acks): a second
    /// message from the same sender with the same `msg_id` within `MSG_ID_WINDOW` is the same
    /// message sent again after a lost ack, and is not stored again.
    pub idempotent: bool,
}

/// How long a `msg_id` of an idempotent message is remembered. A client resends what it sent
/// without an ack when it reconnects, within seconds or minutes; a day covers a device that
/// was offline overnight. (Stripe keeps idempotency keys for 24 hours; Matrix homeservers keep
/// a device's transaction ids for at least its session.)
pub const MSG_ID_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What an append came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Appended {
    /// Stored now.
    New(Receipt),
    /// An idempotent message whose `msg_id` the sender used before for the same message: the
    /// message stored then, not stored (nor routed) again.
    Again(Receipt),
}

impl Appended {
    pub fn receipt(self) -> Receipt {
        match self {
            Appended::New(receipt) | Appended::Again(receipt) => receipt,
        }
    }
}

/// What the store gave a message it committed. The sender's session kept the rest (and
/// encoded the live frame from it before the commit, see `LiveFrameStart`); the writer drops
/// its copy instead of handing back strings that the session would read again from a cold
/// cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub id: i64,
    /// ISO 8601, UTC, milliseconds.
    pub timestamp: String,
}

impl From<&StoredMessage> for Receipt {
    fn from(message: &StoredMessage) -> Receipt {
        Receipt { id: message.id, timestamp: message.timestamp.clone() }
    }
}

impl NewMessage {
    /// The message as committed with `id` at `timestamp`.
    pub fn stored(self, id: i64, timestamp: &str) -> StoredMessage {
        StoredMessage {
            id,
            sender: self.sender.to_string(),
            sender_display_name: self.sender_display_name.to_string(),
            recipient: self.recipient,
            message: self.message,
            timestamp: timestamp.to_string(),
            msg_id: self.msg_id,
        }
    }
}

/// A committed message.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub id: i64,
    pub sender: String,
    pub sender_display_name: String,
    pub recipient: String,
    pub message: String,
    /// ISO 8601, UTC, milliseconds.
    pub timestamp: String,
    pub msg_id: Option<Value>,
}

/// A `messages` row as both stores select it; `client_msg_id` is the client's `msg_id` as JSON
/// text.
#[derive(sqlx::FromRow)]
pub(crate) struct MessageRow {
    id: i64,
    sender: String,
    sender_display_name: String,
    recipient: String,
    message: String,
    timestamp: String,
    client_msg_id: Option<String>,
}

impl From<MessageRow> for StoredMessage {
    fn from(row: MessageRow) -> StoredMessage {
        StoredMessage {
            id: row.id,
            sender: row.sender,
            sender_display_name: row.sender_display_name,
            recipient: row.recipient,
            message: row.message,
            timestamp: row.timestamp,
            msg_id: row.client_msg_id.and_then(|text| serde_json::from_str(&text).ok()),
        }
    }
}

/// A user as a login (or the directory) describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub user_id: String,
    pub display_name: Option<String>,
    pub email: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0:?} is not a known user")]
    UnknownRecipient(String),
    /// An idempotent message whose `msg_id` the sender used within `MSG_ID_WINDOW` for a
    /// different message (another recipient or text): refused, not taken for the first one.
    #[error("msg_id {0} was already used for another message; this one was not stored")]
    MsgIdReused(String),
    /// The database cannot be reached or is busy; the operation did not happen.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("the store is shut down")]
    Closed,
}

/// A queued write: resolves once the write is committed (or has failed).
///
/// Writes queued one after another are committed in that order, so a caller can queue many and
/// wait for them in turn.
pub struct Commit<T> {
    answer: oneshot::Receiver<Result<T, StoreError>>,
    /// Set by `MeteredStore`: the operation's name and when it was queued.
    timed: Option<(StoreOp, Instant)>,
}

impl<T> Commit<T> {
    pub fn new(answer: oneshot::Receiver<Result<T, StoreError>>) -> Commit<T> {
        Commit { answer, timed: None }
    }

    /// Records the time from now until the answer in `privora_store_latency_seconds`, under
    /// `op`'s name, if it has one.
    pub fn timed_as(mut self, op: Option<StoreOp>) -> Commit<T> {
        self.timed = op.map(|op| (op, Instant::now()));
        self
    }
}

impl<T> Future for Commit<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match Pin::new(&mut self.answer).poll(cx) {
            Poll::Pending => return Poll::Pending,
            // The writer stopped without answering: shut down.
            Poll::Ready(answer) => answer.unwrap_or(Err(StoreError::Closed)),
        };
        if let Some((op, started)) = self.timed.take() {
            crate::metrics::store_op(op, started.elapsed().as_secs_f64(), result.is_ok());
        }
        Poll::Ready(result)
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The queue of the store's one writer (group commit), where messages and confirmations
    /// are queued (`queue_append`, `queue_delivered`). Handed out rather than wrapped in trait
    /// methods: an `async` trait method boxes its future, and these two run for every message
    /// and every delivery ping.
    fn writes(&self) -> &WriteQueue;

    /// Queues a message and waits for its commit (`WriteQueue::queue_append`). An idempotent
    /// message sent again gives back the id and timestamp it was stored with the first time.
    async fn append(&self, message: NewMessage) -> Result<StoredMessage, StoreError> {
        let kept = message.clone();
        let receipt = self.writes().queue_append(message).await?.await?.receipt();
        Ok(kept.stored(receipt.id, &receipt.timestamp))
    }

    /// Queues "the recipient has these messages" and waits for its commit.
    async fn mark_delivered(&self, recipient: &str, ids: Vec<i64>) -> Result<(), StoreError> {
        self.writes().queue_delivered(recipient, ids).await?.await
    }

    /// Every message still pending for `recipient`, oldest first.
    async fn pending(&self, recipient: &str) -> Result<Vec<StoredMessage>, StoreError>;

    /// The `limit` latest messages `user` sent or received, oldest first.
    async fn latest(&self, user: &str, limit: u32) -> Result<Vec<StoredMessage>, StoreError>;

    /// The `limit` latest messages `user` sent or received, plus every message still pending
    /// for `user`, oldest first: what the login's `history` frame lists.
    async fn history(&self, user: &str, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        let (pending, latest) = tokio::try_join!(self.pending(user), self.latest(user, limit))?;
        Ok(with_pending(&latest, &pending).into_iter().cloned().collect())
    }

    /// Every conversation partner of `user`, with display names from the users table.
    async fn contacts(&self, user: &str) -> Result<Vec<Contact>, StoreError>;

    /// Creates or refreshes a user (every login and every directory sync does). A missing name
    /// or email keeps the one already known: a token without a `name` claim does not erase the
    /// display name the directory sync found.
    async fn upsert_user(&self, user: UserRecord) -> Result<(), StoreError>;

    /// The user's display name as the users table has it (from logins and the directory sync).
    async fn display_name(&self, user_id: &str) -> Result<Option<String>, StoreError>;

    /// Users whose display name contains `query` (case-insensitive), at most `limit`.
    async fn search_users(&self, query: &str, limit: u32) -> Result<Vec<Contact>, StoreError>;

    /// How many messages wait for delivery in all, for the `privora_pending_messages` gauge.
    /// None when a backend cannot count cheaply (the gauge is then left out).
    async fn pending_count(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }

    /// Is the database reachable? (For `/readyz`.)
    async fn check(&self) -> Result<(), StoreError>;

    /// Finishes every queued write, then stops the writer. Later writes fail with `Closed`.
    async fn close(&self);
}

/// The latest messages and the pending ones (both oldest first) as one list, oldest first, each
/// message once. A login has the pending messages already (for its `offline` frames), so its
/// history reads only the latest ones: reading 10,000 pending messages twice cost a returning
/// user a third of the catch-up time.
pub fn with_pending<'a>(latest: &'a [StoredMessage], pending: &'a [StoredMessage]) -> Vec<&'a StoredMessage> {
    let mut merged = Vec::with_capacity(latest.len() + pending.len());
    let (mut l, mut p) = (latest.iter().peekable(), pending.iter().peekable());
    loop {
        let next = match (l.peek(), p.peek()) {
            (Some(a), Some(b)) if a.id == b.id => {
                p.next();
                l.next()
            }
            (Some(a), Some(b)) if a.id < b.id => l.next(),
            (Some(_), Some(_)) | (None, Some(_)) => p.next(),
            (Some(_), None) => l.next(),
            (None, None) => break,
        };
        merged.extend(next);
    }
    merged
}

/// An idempotent message met the message its sender stored before with the same `msg_id`: the
/// same message sent again (same recipient and text), or a `msg_id` reused for another one.
pub fn sent_again(first: StoredMessage, message: &NewMessage) -> Result<Appended, StoreError> {
    if first.recipient == message.recipient && first.message == message.message {
        Ok(Appended::Again(Receipt::from(&first)))
    } else {
        Err(StoreError::MsgIdReused(first.msg_id.map(|id| id.to_string()).unwrap_or_default()))
    }
}

/// Now in Unix seconds, as `sent_msg_ids.created_at` records it.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// The oldest `created_at` of a `sent_msg_ids` row that still names a message (the window).
pub fn remembered_since() -> i64 {
    unix_now() - MSG_ID_WINDOW.as_secs() as i64
}

/// How often the writers delete `sent_msg_ids` rows older than `MSG_ID_WINDOW`.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The name shown for a user without a display name.
pub fn display_name_or_id(display_name: Option<String>, user_id: &str) -> String {
    display_name.filter(|n| !n.is_empty()).unwrap_or_else(|| user_id.to_string())
}

/// Users as `(user_id, display_name)` rows become contacts sorted by name, case-insensitively.
pub fn contacts_by_name(rows: impl IntoIterator<Item = (String, Option<String>)>) -> Vec<Contact> {
    let mut contacts: Vec<Contact> = rows
        .into_iter()
        .map(|(user_id, name)| Contact { display_name: display_name_or_id(name, &user_id), user_id })
        .collect();
    contacts.sort_by_cached_key(|c| c.display_name.to_lowercase());
    contacts
}

#[cfg(test)]
mod tests {
    use super::{with_pending, StoredMessage};

    fn message(id: i64) -> StoredMessage {
        StoredMessage {
            id,
            sender: "a".into(),
            sender_display_name: "A".into(),
            recipient: "b".into(),
            message: format!("m{id}"),
            timestamp: "2026-11-26T09:40:17.123Z".into(),
            msg_id: None,
        }
    }

    fn ids(latest: &[i64], pending: &[i64]) -> Vec<i64> {
        let latest: Vec<StoredMessage> = latest.iter().copied().map(message).collect();
        let pending: Vec<StoredMessage> = pending.iter().copied().map(message).collect();
        with_pending(&latest, &pending).into_iter().map(|m| m.id).collect()
    }

    #[test]
    fn history_is_the_latest_and_the_pending_in_id_order_each_once() {
        assert_eq!(ids(&[], &[]), Vec::<i64>::new());
        assert_eq!(ids(&[5, 6], &[]), vec![5, 6]);
        assert_eq!(ids(&[], &[1, 2]), vec![1, 2]);
        // Pending messages older than the latest ones come first.
        assert_eq!(ids(&[7, 8, 9], &[1, 3]), vec![1, 3, 7, 8, 9]);
        // Overlaps appear once; interleaved ids keep their order.
        assert_eq!(ids(&[4, 6, 8], &[2, 4, 5, 8, 10]), vec![2, 4, 5, 6, 8, 10]);
    }
}
