//! Copies the SQLite write-ahead log back into the database file on a thread of its own, so
//! that the writer's own checkpoints find little left to copy.
//!
//! SQLite checkpoints inside the commit that takes the log past `wal_autocheckpoint` pages:
//! under the throughput bench that was every half second or so, 8192 pages copied and the
//! database file synced while every append queued behind it (and 5 % of the writer thread's
//! CPU). A passive checkpoint from another connection takes neither the write lock nor the
//! readers': appends go on while it copies. Run a few times a second, it leaves the writer's
//! checkpoint only the pages committed since the last one.
//!
//! The writer's checkpoint stays: under steady writes a checkpoint from elsewhere never catches
//! up with the writer, and SQLite starts the log over only once one has (without it the log grew
//! by 25 MB a second, and every append went to a new place in the file: a tenth more of the
//! writer's CPU per message). A restarting checkpoint from here instead would hold the write
//! lock while it waited for readers, the writer among them as it tried to begin.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the log is copied. A page is copied once per checkpoint however many commits
/// rewrote it, so more often costs more pages written in all (five times a second cost no
/// measurable CPU at 25,000 or 65,000 msg/s).
const EVERY: Duration = Duration::from_millis(200);

/// The log pages past which a checkpoint that could not copy everything (a reader held old
/// pages) is logged: the log only grows while readers stay behind.
const LONG_LOG: i64 = 65_536;

/// The checkpoint thread; stopped (after a last checkpoint) by `stop` or when dropped.
pub struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens a connection of its own to `path` and starts checkpointing every `EVERY`.
    pub fn start(path: &Path) -> std::io::Result<Checkpointer> {
        let conn = rusqlite::Connection::open(path).map_err(std::io::Error::other)?;
        // The log is synced before pages are copied and the file after: the writer may start
        // the log over only once the copies are durable.
        conn.pragma_update(None, "synchronous", "full").map_err(std::io::Error::other)?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("privora-wal-checkpoint".into())
            .spawn(move || run(conn, &stopped))?;
        Ok(Checkpointer { stop, thread: Some(thread) })
    }

    /// Stops the thread after one last checkpoint; waits for it.
    pub fn stop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(conn: rusqlite::Connection, stop: &(Mutex<bool>, Condvar)) {
    let (lock, wake) = stop;
    let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let (guard, _) = wake.wait_timeout(stopped, EVERY).unwrap_or_else(|p| p.into_inner());
        stopped = guard;
        let last = *stopped;
        drop(stopped);
        checkpoint(&conn);
        if last {
            return;
        }
        stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
    }
}

/// One passive checkpoint: copies what no reader still needs, waits for no one.
fn checkpoint(conn: &rusqlite::Connection) {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match result {
        Ok((_, log, copied)) if log > LONG_LOG && copied < log => {
            tracing::warn!(log, copied, "the SQLite log is long and readers hold old pages");
        }
        Ok(_) => {}
        // Nothing is lost: the log keeps the pages and the next checkpoint copies them.
        Err(error) => tracing::warn!(%error, "a SQLite checkpoint failed"),
    }
}
