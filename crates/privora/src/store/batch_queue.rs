//! The queue in front of a store's one writer: bounded, many senders, one consumer that takes
//! everything queued at once (group commit), waiting as a thread (SQLite) or as a task
//! (PostgreSQL).
//!
//! tokio's mpsc channel, used before, allocated a block of 32 slots every 32 operations (for a
//! `WriteOp`, several kilobytes: past glibc's per-thread cache, so each went through malloc's
//! slow path and its frees into consolidations) and the writer took the operations one
//! `try_recv` at a time. Here a sender pushes onto a `Vec` under a mutex held for the push
//! alone, and the writer swaps the whole `Vec` for its own drained one: once warm, queueing
//! allocates nothing, and a batch costs one lock.
//!
//! Bounded twice: by the number of items and by what they weigh (`Weigh`, the bytes of the
//! messages they carry), so that a queue long enough for the many small messages of an ordinary
//! overload still holds only so many bytes of large ones.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

/// What an item holds in memory, roughly in bytes, for the queue's byte bound.
pub trait Weigh {
    fn weight(&self) -> usize;
}

/// How the consumer waits for items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumer {
    /// A thread of its own, blocked in `Batches::take_blocking`.
    Thread,
    /// A task, in `Batches::take`.
    Task,
}

/// The sending side. Dropping it closes the queue: the consumer takes what is left, then hears
/// that it is closed.
pub struct BatchQueue<T> {
    shared: Arc<Shared<T>>,
}

/// The consumer's side. Dropping it (or `close`) refuses every later push and drops what is
/// queued.
pub struct Batches<T> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    max_weight: usize,
    consumer: Consumer,
    thread_wake: Condvar,
    task_wake: Notify,
    /// Senders waiting for room.
    room: Notify,
}

struct State<T> {
    items: Vec<T>,
    /// What `items` weigh together.
    weight: usize,
    closed: bool,
    /// The consumer found the queue empty and waits (or is about to): the next push wakes it.
    consumer_waiting: bool,
    /// A sender found the queue full: the next take wakes the waiting senders.
    room_wanted: bool,
}

/// Why an item was not queued; the item comes back.
#[derive(Debug)]
pub enum PushError<T> {
    Full(T),
    Closed(T),
}

/// What `Batches::take_blocking` came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Items were moved into the batch.
    Some,
    /// Nothing came before the deadline.
    TimedOut,
    /// The queue is closed and empty.
    Closed,
}

/// A queue of at most `capacity` items weighing at most `max_weight` together (an item heavier
/// than that on its own is taken when the queue is empty), and its consumer's side.
pub fn batch_queue<T: Weigh>(
    capacity: usize,
    max_weight: usize,
    consumer: Consumer,
) -> (BatchQueue<T>, Batches<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: Vec::with_capacity(capacity.min(1024)),
            weight: 0,
            closed: false,
            consumer_waiting: false,
            room_wanted: false,
        }),
        capacity: capacity.max(1),
        max_weight,
        consumer,
        thread_wake: Condvar::new(),
        task_wake: Notify::new(),
        room: Notify::new(),
    });
    (BatchQueue { shared: shared.clone() }, Batches { shared })
}

impl<T> Shared<T> {
    /// The lock is held only for pushes and takes, which cannot panic midway; a poisoned lock's
    /// state is still whole.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_consumer(&self) {
        match self.consumer {
            Consumer::Thread => self.thread_wake.notify_one(),
            Consumer::Task => self.task_wake.notify_one(),
        }
    }

    fn close(&self) {
        let dropped = {
            let mut state = self.lock();
            state.closed = true;
            state.weight = 0;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock: an item's drop may wake whoever waits on its reply.
        drop(dropped);
        self.wake_consumer();
        self.room.notify_waiters();
    }
}

impl<T: Weigh> BatchQueue<T> {
    /// Queues `item` if there is room, without waiting.
    pub fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let weight = item.weight();
        let mut state = self.shared.lock();
        if state.closed {
            return Err(PushError::Closed(item));
        }
        let too_heavy = !state.items.is_empty() && state.weight + weight > self.shared.max_weight;
        if state.items.len() >= self.shared.capacity || too_heavy {
            state.room_wanted = true;
            return Err(PushError::Full(item));
        }
        state.weight += weight;
        state.items.push(item);
        let wake = std::mem::take(&mut state.consumer_waiting);
        drop(state);
        if wake {
            self.shared.wake_consumer();
        }
        Ok(())
    }

    /// Queues `item`, waiting for room if need be; the item comes back if the queue is closed.
    pub async fn push(&self, mut item: T) -> Result<(), T> {
        loop {
            // Registered before looking, so that room made meanwhile is not missed.
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(back)) => return Err(back),
                Err(PushError::Full(back)) => item = back,
            }
            room.await;
        }
    }

    /// Items queued and not yet taken.
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }
}

impl<T> Drop for BatchQueue<T> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake_consumer();
    }
}

impl<T: Weigh> Batches<T> {
    /// Moves up to `max` queued items, oldest first, into `batch` (empty on entry) if any are
    /// queued. Nothing is allocated when all of them fit: the two vectors are swapped.
    fn take_locked(&self, state: &mut State<T>, batch: &mut Vec<T>, max: usize) -> bool {
        if state.items.is_empty() {
            return false;
        }
        if state.items.len() <= max && batch.is_empty() {
            std::mem::swap(&mut state.items, batch);
            state.weight = 0;
        } else {
            let n = max.max(1).min(state.items.len());
            let taken: usize = state.items[..n].iter().map(Weigh::weight).sum();
            state.weight -= taken;
            batch.extend(state.items.drain(..n));
        }
        true
    }

    /// After a take: wakes senders that found the queue full.
    fn made_room(&self, mut state: MutexGuard<'_, State<T>>) {
        let wanted = std::mem::take(&mut state.room_wanted);
        drop(state);
        if wanted {
            self.shared.room.notify_waiters();
        }
    }

    /// Takes up to `max` items into `batch`, blocking this thread until one is queued, the
    /// queue is closed (and empty), or `deadline` passes. For a `Consumer::Thread` queue.
    pub fn take_blocking(&mut self, batch: &mut Vec<T>, max: usize, deadline: Option<Instant>) -> Taken {
        let mut state = self.shared.lock();
        loop {
            if self.take_locked(&mut state, batch, max) {
                state.consumer_waiting = false;
                self.made_room(state);
                return Taken::Some;
            }
            if state.closed {
                return Taken::Closed;
            }
            state.consumer_waiting = true;
            state = match deadline {
                None => self.shared.thread_wake.wait(state).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        state.consumer_waiting = false;
                        return Taken::TimedOut;
                    }
                    let waited = self.shared.thread_wake.wait_timeout(state, deadline - now);
                    waited.unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }

    /// Takes up to `max` items into `batch`, waiting until one is queued; false once the queue
    /// is closed and empty. For a `Consumer::Task` queue.
    pub async fn take(&mut self, batch: &mut Vec<T>, max: usize) -> bool {
        loop {
            {
                let mut state = self.shared.lock();
                if self.take_locked(&mut state, batch, max) {
                    state.consumer_waiting = false;
                    self.made_room(state);
                    return true;
                }
                if state.closed {
                    return false;
                }
                state.consumer_waiting = true;
            }
            // A push after the flag was set stores a permit if this is not waiting yet.
            self.shared.task_wake.notified().await;
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.shared.lock().items.is_empty()
    }

    /// Refuses every later push and drops what is queued (their senders hear it through
    /// their replies).
    pub fn close(&mut self) {
        self.shared.close();
    }
}

impl<T> Drop for Batches<T> {
    fn drop(&mut self) {
        self.shared.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An integer weighs what it says.
    impl Weigh for i32 {
        fn weight(&self) -> usize {
            self.unsigned_abs() as usize
        }
    }

    impl Weigh for u32 {
        fn weight(&self) -> usize {
            1
        }
    }

    impl Weigh for (usize, usize) {
        fn weight(&self) -> usize {
            1
        }
    }

    #[test]
    fn a_take_gets_everything_queued_in_order_up_to_the_most_asked_for() {
        let (queue, mut batches) = batch_queue(8, usize::MAX, Consumer::Thread);
        for i in 0..5 {
            queue.try_push(i).unwrap();
        }
        let mut batch = Vec::new();
        assert_eq!(batches.take_blocking(&mut batch, 3, None), Taken::Some);
        assert_eq!(batch, [0, 1, 2]);
        batch.clear();
        assert_eq!(batches.take_blocking(&mut batch, 3, None), Taken::Some);
        assert_eq!(batch, [3, 4]);
        batch.clear();
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(batches.take_blocking(&mut batch, 3, Some(soon)), Taken::TimedOut);
        assert!(batch.is_empty());
    }

    #[test]
    fn a_full_queue_hands_the_item_back_and_a_closed_one_too() {
        let (queue, mut batches) = batch_queue(2, usize::MAX, Consumer::Thread);
        queue.try_push(1).unwrap();
        queue.try_push(2).unwrap();
        assert!(matches!(queue.try_push(3), Err(PushError::Full(3))));
        batches.close();
        assert!(matches!(queue.try_push(4), Err(PushError::Closed(4))));
        assert!(queue.is_empty(), "closing drops what was queued");
    }

    #[test]
    fn a_queue_holds_no_more_than_its_weight_but_always_one_item() {
        let (queue, mut batches) = batch_queue(8, 10, Consumer::Thread);
        assert!(queue.try_push(50).is_ok(), "an item heavier than the bound goes into an empty queue");
        assert!(matches!(queue.try_push(1), Err(PushError::Full(1))));
        let mut batch = Vec::new();
        assert_eq!(batches.take_blocking(&mut batch, 8, None), Taken::Some);
        for i in [4, 3, 3] {
            queue.try_push(i).unwrap();
        }
        assert!(matches!(queue.try_push(1), Err(PushError::Full(1))), "10 weighed already");
        batch.clear();
        assert_eq!(batches.take_blocking(&mut batch, 1, None), Taken::Some);
        assert_eq!(batch, [4]);
        queue.try_push(4).unwrap();
        assert!(matches!(queue.try_push(1), Err(PushError::Full(1))), "a take frees what it took");
    }

    #[test]
    fn the_consumer_takes_what_is_left_after_the_senders_are_gone() {
        let (queue, mut batches) = batch_queue(4, usize::MAX, Consumer::Thread);
        queue.try_push(7).unwrap();
        drop(queue);
        let mut batch = Vec::new();
        assert_eq!(batches.take_blocking(&mut batch, 4, None), Taken::Some);
        assert_eq!(batch, [7]);
        batch.clear();
        assert_eq!(batches.take_blocking(&mut batch, 4, None), Taken::Closed);
    }

    /// Many senders on other threads, a consumer thread that blocks: everything arrives once,
    /// each sender's items in its order, and senders that found the queue full got through.
    #[test]
    fn items_from_many_threads_all_arrive_in_each_senders_order() {
        let (queue, mut batches) = batch_queue::<(usize, usize)>(16, usize::MAX, Consumer::Thread);
        let queue = Arc::new(queue);
        let consumer = std::thread::spawn(move || {
            let mut seen = vec![Vec::new(); 4];
            let mut batch = Vec::new();
            while batches.take_blocking(&mut batch, 5, None) == Taken::Some {
                for (sender, i) in batch.drain(..) {
                    seen[sender].push(i);
                }
            }
            seen
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).build().unwrap();
        runtime.block_on(async {
            let mut senders = Vec::new();
            for sender in 0..4 {
                let queue = queue.clone();
                senders.push(tokio::spawn(async move {
                    for i in 0..2000 {
                        queue.push((sender, i)).await.unwrap();
                    }
                }));
            }
            for sender in senders {
                sender.await.unwrap();
            }
        });
        drop(queue);
        let seen = consumer.join().unwrap();
        for items in seen {
            assert_eq!(items, (0..2000).collect::<Vec<_>>());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_consumer_wakes_for_pushes_and_ends_when_closed() {
        let (queue, mut batches) = batch_queue::<u32>(4, usize::MAX, Consumer::Task);
        let consumer = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut batch = Vec::new();
            while batches.take(&mut batch, 4).await {
                all.append(&mut batch);
            }
            all
        });
        for i in 0..100 {
            queue.push(i).await.unwrap();
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        drop(queue);
        assert_eq!(consumer.await.unwrap(), (0..100).collect::<Vec<_>>());
    }
}
