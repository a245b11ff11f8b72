//! Every open connection's cut-off signal, so that a shutdown reaches each one.
//!
//! Each connection had a child of the server's shutdown token before, which its writer polled at
//! every wake-up (two locks each time, for something that happens once in a server's life). A
//! connection's cut-off is a `Signal` now, and a shutdown walks this list and raises each: one
//! lock per connection when it opens and when it ends.

use std::sync::{Arc, Mutex};

use foldhash::HashMap;
use tokio_util::sync::CancellationToken;

use super::lock;
use crate::hub::ConnId;
use crate::signal::Signal;

#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<ConnId, Arc<Signal>>>,
}

impl Connections {
    /// Adds a connection's cut-off: raised by `cut_all`, or at once if the shutdown has begun.
    pub(super) fn open(&self, conn: ConnId, cut_off: &Arc<Signal>, shutdown: &CancellationToken) {
        lock(&self.open).insert(conn, cut_off.clone());
        // A shutdown that began before the insert may have walked the list without it; one that
        // begins after it finds it there.
        if shutdown.is_cancelled() {
            cut_off.raise();
        }
    }

    pub(super) fn close(&self, conn: ConnId) {
        lock(&self.open).remove(&conn);
    }

    /// Raises every open connection's cut-off. Called once the shutdown token is cancelled, so
    /// that each writer, woken, can tell a shutdown from a slow-consumer cut-off.
    pub fn cut_all(&self) {
        for cut_off in lock(&self.open).values() {
            cut_off.raise();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shutdown_raises_every_open_cut_off_and_one_opened_after_it() {
        let connections = Connections::default();
        let shutdown = CancellationToken::new();
        let (a, b, late) =
            (Arc::new(Signal::default()), Arc::new(Signal::default()), Arc::new(Signal::default()));
        connections.open(1, &a, &shutdown);
        connections.open(2, &b, &shutdown);
        connections.close(2);
        shutdown.cancel();
        connections.cut_all();
        assert!(a.is_raised());
        assert!(!b.is_raised(), "closed before the shutdown");
        connections.open(3, &late, &shutdown);
        assert!(late.is_raised(), "opened after the shutdown began");
    }
}
