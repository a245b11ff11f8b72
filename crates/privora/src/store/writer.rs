//! The plumbing both stores share around their one writer (group commit; a task for PostgreSQL,
//! a thread for SQLite): the operations a writer is asked to do, the queue that carries them with
//! a reply each, and what the PostgreSQL writer remembers between batches. What a batch does in
//! SQL stays in each store.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::batch_queue::{batch_queue, BatchQueue, Batches, Consumer, PushError, Weigh};
use super::{Appended, Commit, NewMessage, StoreError, UserRecord};
use crate::metrics::StoreOp;

/// Where a writer sends one operation's answer, once its batch is committed (or failed).
pub type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One write, as queued for the writer task.
pub enum WriteOp {
    Append(NewMessage, Reply<Appended>),
    Delivered { recipient: String, ids: Vec<i64>, reply: Reply<()> },
    UpsertUser(UserRecord, Reply<()>),
    Shutdown(oneshot::Sender<()>),
}

/// What the operations in a writer's queue may carry together, in bytes. The queue's length
/// bounds how many operations wait; this bounds what they hold: 4,096 ordinary messages are a
/// megabyte or two, 4,096 of the largest (64 KiB frames) would be a quarter of a gigabyte.
pub const QUEUE_BYTES: usize = 64 << 20;

impl Weigh for WriteOp {
    fn weight(&self) -> usize {
        // The operation's own slot is counted by the queue's length; this is what it points to.
        match self {
            WriteOp::Append(message, _) => {
                message.message.len() + message.recipient.len() + message.msg_id.as_ref().map_or(0, |_| 64)
            }
            WriteOp::Delivered { recipient, ids, .. } => recipient.len() + ids.len() * 8,
            WriteOp::UpsertUser(user, _) => {
                user.user_id.len()
                    + user.display_name.as_ref().map_or(0, String::len)
                    + user.email.as_ref().map_or(0, String::len)
            }
            WriteOp::Shutdown(_) => 0,
        }
    }
}

/// What queueing an operation without waiting came to.
pub enum Queued<T> {
    /// Queued: its commit, to be awaited.
    Now(Commit<T>),
    /// The queue was full: nothing queued yet.
    Full(Full<T>),
}

impl<T> Queued<T> {
    /// The commit, once the operation is queued (waiting for room if the queue was full).
    pub async fn queued(self, queue: &WriteQueue) -> Result<Commit<T>, StoreError> {
        match self {
            Queued::Now(commit) => Ok(commit),
            Queued::Full(full) => full.wait(queue).await,
        }
    }
}

/// An operation the writer's queue had no room for.
pub struct Full<T> {
    op: WriteOp,
    answer: oneshot::Receiver<Result<T, StoreError>>,
    timed: Option<StoreOp>,
}

impl<T> Full<T> {
    /// Waits for room in the queue, then queues the operation.
    ///
    /// Waiting is boxed: the wait for room and the operation would otherwise be part of the
    /// caller's future, which runs on every frame while this runs almost never.
    pub async fn wait(self, queue: &WriteQueue) -> Result<Commit<T>, StoreError> {
        Box::pin(queue.writes.push(self.op)).await.map_err(|_| StoreError::Closed)?;
        Ok(Commit::new(self.answer).timed_as(self.timed))
    }
}

/// The sending side of a writer task: callers queue an operation and wait for its answer.
pub struct WriteQueue {
    writes: BatchQueue<WriteOp>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl WriteQueue {
    /// Starts `run` (the writer task) on a queue of `capacity` operations weighing at most
    /// `QUEUE_BYTES`.
    pub fn spawn<F, Fut>(capacity: usize, run: F) -> WriteQueue
    where
        F: FnOnce(Batches<WriteOp>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (writes, queue) = batch_queue(capacity, QUEUE_BYTES, Consumer::Task);
        let writer = tokio::spawn(run(queue));
        WriteQueue { writes, writer: Mutex::new(Some(writer)) }
    }

    /// Starts `run` (a blocking writer loop) on a thread of its own, on a queue of `capacity`
    /// operations weighing at most `QUEUE_BYTES`: for a database library whose calls block
    /// (rusqlite).
    pub fn spawn_thread<F>(name: &str, capacity: usize, run: F) -> std::io::Result<WriteQueue>
    where
        F: FnOnce(Batches<WriteOp>) + Send + 'static,
    {
        let (writes, queue) = batch_queue(capacity, QUEUE_BYTES, Consumer::Thread);
        std::thread::Builder::new().name(name.to_string()).spawn(move || run(queue))?;
        // The thread is not joined: `close` waits for its answer to `Shutdown` instead.
        Ok(WriteQueue { writes, writer: Mutex::new(None) })
    }

    /// Queues one operation if the queue has room, as it nearly always has: no future, so a
    /// session handles a frame without allocating one (see `session/active.rs`). When the
    /// queue is full, the operation comes back, to be queued with `Full::wait`. `Closed` once
    /// shut down. `timed`: the name the commit is timed under (`Commit::timed_as`).
    pub fn try_queue<T>(
        &self,
        op: impl FnOnce(Reply<T>) -> WriteOp,
        timed: Option<StoreOp>,
    ) -> Result<Queued<T>, StoreError> {
        let (reply, answer) = oneshot::channel();
        match self.writes.try_push(op(reply)) {
            Ok(()) => Ok(Queued::Now(Commit::new(answer).timed_as(timed))),
            Err(PushError::Full(op)) => Ok(Queued::Full(Full { op, answer, timed })),
            Err(PushError::Closed(_)) => Err(StoreError::Closed),
        }
    }

    /// Queues one operation, waiting for room in the queue if need be; the answer comes once
    /// its batch is committed.
    pub async fn queue<T>(
        &self,
        op: impl FnOnce(Reply<T>) -> WriteOp,
        timed: Option<StoreOp>,
    ) -> Result<Commit<T>, StoreError> {
        self.try_queue(op, timed)?.queued(self).await
    }

    /// Queues a message to be committed and marked pending for its recipient, if the queue has
    /// room (`try_queue`). The commit fails with `UnknownRecipient` when the recipient is not
    /// in the users table, and with `MsgIdReused` when an idempotent message's `msg_id` named
    /// another message. Timed in `privora_store_latency_seconds` as `append`.
    pub fn try_queue_append(&self, message: NewMessage) -> Result<Queued<Appended>, StoreError> {
        self.try_queue(|reply| WriteOp::Append(message, reply), Some(StoreOp::Append))
    }

    /// `try_queue_append`, waiting for room in the queue if need be.
    pub async fn queue_append(&self, message: NewMessage) -> Result<Commit<Appended>, StoreError> {
        self.queue(|reply| WriteOp::Append(message, reply), Some(StoreOp::Append)).await
    }

    /// Queues "the recipient has these messages" (they are no longer pending) if the queue has
    /// room. Timed as `mark_delivered`.
    pub fn try_queue_delivered(&self, recipient: &str, ids: Vec<i64>) -> Result<Queued<()>, StoreError> {
        if ids.is_empty() {
            let (reply, answer) = oneshot::channel();
            let _ = reply.send(Ok(()));
            return Ok(Queued::Now(Commit::new(answer)));
        }
        let recipient = recipient.to_string();
        self.try_queue(|reply| WriteOp::Delivered { recipient, ids, reply }, Some(StoreOp::MarkDelivered))
    }

    /// `try_queue_delivered`, waiting for room in the queue if need be.
    pub async fn queue_delivered(&self, recipient: &str, ids: Vec<i64>) -> Result<Commit<()>, StoreError> {
        self.try_queue_delivered(recipient, ids)?.queued(self).await
    }

    /// `Store::upsert_user`, for every store that writes through this queue.
    pub async fn upsert_user(&self, user: UserRecord) -> Result<(), StoreError> {
        self.queue(|reply| WriteOp::UpsertUser(user, reply), None).await?.await
    }

    /// Operations queued and not yet taken by the writer (`privora_store_write_queue`, read
    /// when scraped rather than set at every operation).
    pub fn waiting(&self) -> usize {
        self.writes.len()
    }

    pub fn is_closed(&self) -> bool {
        self.writes.is_closed()
    }

    /// Lets the writer finish everything queued, then waits for it to stop.
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.writes.push(WriteOp::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

/// Known users and contact pairs the writer remembers, to skip lookups; cleared when full.
pub const WRITER_CACHE: usize = 100_000;

/// What a writer remembers between batches to skip lookups and no-op inserts.
#[derive(Default)]
pub struct WriterCache {
    pub users: HashSet<String>,
    pub contacts: HashSet<(String, String)>,
}

impl WriterCache {
    pub fn trim(&mut self) {
        if self.users.len() > WRITER_CACHE {
            self.users.clear();
        }
        if self.contacts.len() > WRITER_CACHE {
            self.contacts.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full queue makes `queue` wait for room, not fail: the second operation goes in once
    /// the writer has taken the first, and both are answered.
    #[tokio::test]
    async fn a_full_queue_waits_for_room() {
        let (go, wait) = oneshot::channel::<()>();
        let queue = WriteQueue::spawn(1, move |mut ops| async move {
            let _ = wait.await;
            let mut batch = Vec::new();
            while ops.take(&mut batch, 1).await {
                for op in batch.drain(..) {
                    if let WriteOp::UpsertUser(_, reply) = op {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        });
        let user = |id: &str| UserRecord { user_id: id.into(), display_name: None, email: None };
        let first = queue.queue(|reply| WriteOp::UpsertUser(user("a"), reply), None).await.unwrap();
        // Without waiting, the second comes back: the queue holds one operation.
        let Ok(Queued::Full(full)) = queue.try_queue(|reply| WriteOp::UpsertUser(user("b"), reply), None)
        else {
            panic!("the queue holds one operation");
        };
        let second = full.wait(&queue);
        tokio::pin!(second);
        assert!(futures_util::poll!(&mut second).is_pending(), "the queue holds one operation");
        go.send(()).unwrap();
        let second = second.await.unwrap();
        first.await.unwrap();
        second.await.unwrap();
    }
}
