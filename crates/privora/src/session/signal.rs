//! A flag raised once that one task waits on: the writer raises `ended` when it stops, and the
//! reader, which polls it beside every frame it reads, stops too.
//!
//! A `CancellationToken` did this before. Waiting on one takes the token's lock to look at it,
//! and its waiter list's lock to register and again to deregister, every time the reader went
//! back to waiting for a frame: three locks a frame for a flag that is raised once in the
//! connection's life. Here, an atomic load and a waker compare.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

#[derive(Default)]
pub(super) struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Raises the flag and wakes the task waiting on it, if any.
    pub(super) fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once raised. Only the task that polled last is woken: one waiter at a time.
    pub(super) fn poll_raised(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.raised.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Raised between the look and the registration: `raise` may have found no waker.
        match self.raised.load(Ordering::Acquire) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    pub(super) async fn raised(&self) {
        poll_fn(|cx| self.poll_raised(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_waiting_task_wakes_when_the_signal_is_raised() {
        let signal = Arc::new(Signal::default());
        let waiting = tokio::spawn({
            let signal = signal.clone();
            async move { signal.raised().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "not raised yet");
        signal.raise();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("the task ends");
        // Raised stays raised.
        signal.raised().await;
    }
}
