//! The plumbing both stores share around their one writer (group commit; a task for PostgreSQL,
//! a thread for SQLite): the operations a writer is asked to do, the queue that carries them with
//! a reply each, and what the PostgreSQL writer remembers between batches. What a batch does in
//! SQL stays in each store.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Appended, Commit, NewMessage, StoreError, UserRecord};

/// Where a writer sends one operation's answer, once its batch is committed (or failed).
pub type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One write, as queued for the writer task.
pub enum WriteOp {
    Append(NewMessage, Reply<Appended>),
    Delivered { recipient: String, ids: Vec<i64>, reply: Reply<()> },
    UpsertUser(UserRecord, Reply<()>),
    Shutdown(oneshot::Sender<()>),
}

/// The sending side of a writer task: callers queue an operation and wait for its answer.
pub struct WriteQueue {
    writes: mpsc::Sender<WriteOp>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl WriteQueue {
    /// Starts `run` (the writer task) on a queue of `capacity` operations.
    pub fn spawn<F, Fut>(capacity: usize, run: F) -> WriteQueue
    where
        F: FnOnce(mpsc::Receiver<WriteOp>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (writes, queue) = mpsc::channel(capacity);
        let writer = tokio::spawn(run(queue));
        WriteQueue { writes, writer: Mutex::new(Some(writer)) }
    }

    /// Starts `run` (a blocking writer loop) on a thread of its own, on a queue of `capacity`
    /// operations: for a database library whose calls block (rusqlite).
    pub fn spawn_thread<F>(name: &str, capacity: usize, run: F) -> std::io::Result<WriteQueue>
    where
        F: FnOnce(mpsc::Receiver<WriteOp>) + Send + 'static,
    {
        let (writes, queue) = mpsc::channel(capacity);
        std::thread::Builder::new().name(name.to_string()).spawn(move || run(queue))?;
        // The thread is not joined: `close` waits for its answer to `Shutdown` instead.
        Ok(WriteQueue { writes, writer: Mutex::new(None) })
    }

    /// Queues one operation (waiting only for room in the queue); the answer comes once its
    /// batch is committed. `Closed` once shut down.
    ///
    /// Waiting for room is boxed: its future (the operation and the semaphore's wait) would
    /// otherwise be part of every session's frame-handling future, and made that future 1,288
    /// bytes, past what glibc's per-thread cache serves (1,032): every frame's allocation took
    /// `malloc`'s slow path. The queue is rarely full.
    pub async fn queue<T>(&self, op: impl FnOnce(Reply<T>) -> WriteOp) -> Result<Commit<T>, StoreError> {
        let (reply, answer) = oneshot::channel();
        crate::metrics::store_queue(self.writes.max_capacity() - self.writes.capacity());
        match self.writes.try_send(op(reply)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(op)) => {
                Box::pin(self.writes.send(op)).await.map_err(|_| StoreError::Closed)?
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(StoreError::Closed),
        }
        Ok(Commit::new(answer))
    }

    /// Queues a message to be committed and marked pending for its recipient; waits only for
    /// room in the queue. The commit fails with `UnknownRecipient` when the recipient is not in
    /// the users table, and with `MsgIdReused` when an idempotent message's `msg_id` named
    /// another message. Timed in `privora_store_latency_seconds` as `append`.
    pub async fn queue_append(&self, message: NewMessage) -> Result<Commit<Appended>, StoreError> {
        Ok(self.queue(|reply| WriteOp::Append(message, reply)).await?.timed("append"))
    }

    /// Queues "the recipient has these messages": they are no longer pending. Timed as
    /// `mark_delivered`.
    pub async fn queue_delivered(&self, recipient: &str, ids: Vec<i64>) -> Result<Commit<()>, StoreError> {
        if ids.is_empty() {
            let (reply, answer) = oneshot::channel();
            let _ = reply.send(Ok(()));
            return Ok(Commit::new(answer));
        }
        let recipient = recipient.to_string();
        Ok(self.queue(|reply| WriteOp::Delivered { recipient, ids, reply }).await?.timed("mark_delivered"))
    }

    /// `Store::upsert_user`, for every store that writes through this queue.
    pub async fn upsert_user(&self, user: UserRecord) -> Result<(), StoreError> {
        self.queue(|reply| WriteOp::UpsertUser(user, reply)).await?.await
    }

    pub fn is_closed(&self) -> bool {
        self.writes.is_closed()
    }

    /// Lets the writer finish everything queued, then waits for it to stop.
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.writes.send(WriteOp::Shutdown(done)).await.is_ok() {
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
            while let Some(op) = ops.recv().await {
                if let WriteOp::UpsertUser(_, reply) = op {
                    let _ = reply.send(Ok(()));
                }
            }
        });
        let user = |id: &str| UserRecord { user_id: id.into(), display_name: None, email: None };
        let first = queue.queue(|reply| WriteOp::UpsertUser(user("a"), reply)).await.unwrap();
        let second = queue.queue(|reply| WriteOp::UpsertUser(user("b"), reply));
        tokio::pin!(second);
        assert!(futures_util::poll!(&mut second).is_pending(), "the queue holds one operation");
        go.send(()).unwrap();
        let second = second.await.unwrap();
        first.await.unwrap();
        second.await.unwrap();
    }
}
