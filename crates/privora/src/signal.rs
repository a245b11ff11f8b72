//! A flag raised once that one task waits on. A connection has two: `ended` (the writer raises
//! it when it stops; the reader, which polls it beside every frame it reads, stops too) and
//! `cut_off` (raised by the hub for a slow consumer and by a shutdown; the writer polls it at
//! every wake-up).
//!
//! `CancellationToken`s did both before. Looking at one takes the token's lock, and waiting on
//! one takes its waiter list's lock too, at every poll: locks on every frame for flags that are
//! raised once in a connection's life (the writer's cut-off wait was 1.3 % of the workers'
//! samples, session 16). Here, an atomic load and a waker compare.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

#[derive(Debug, Default)]
pub struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Raises the flag and wakes the task waiting on it, if any.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Ready once raised. Only the task that polled last is woken: one waiter at a time.
    pub fn poll_raised(&self, cx: &mut Context<'_>) -> Poll<()> {
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

    pub async fn raised(&self) {
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
