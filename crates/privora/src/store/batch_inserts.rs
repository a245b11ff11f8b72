//! The rows a SQLite write batch adds for every message, inserted together in multi-row
//! statements: the messages themselves and the confirmations of the tail's messages.
//!
//! One row per statement, SQLite's statement machinery cost about as much as the row: starting
//! the statement, opening a cursor, seeking the row's key from the root of the table (a binary
//! search on every level), closing it all again. Together, a batch's rows share a statement and
//! a cursor per `ROWS_PER_INSERT` rows (callgrind over `store_workload 1000 100000`: the
//! batches' instructions on the writer thread from 12,650 to 8,170 a message).
//!
//! A batch's new messages are kept here and go in when the batch commits (or earlier, when the
//! batch reads `messages`). Their id is left to SQLite: the rowid after the largest, which is
//! the writer's next id (it is the only writer, and reads the largest at the start of every
//! batch), so that each row is appended where the cursor stands, at the end of the table,
//! without a search. The ids SQLite gave are checked against the writer's. Confirmations go in
//! sorted, each next to the one before.
//!
//! rusqlite binds every string with `SQLITE_TRANSIENT`: SQLite frees the parameter's previous
//! buffer, allocates a new one and copies the text into it, five or six times a message on the
//! one thread every write goes through (2,580 instructions a message more than what follows,
//! counted as above). The messages' text is bound here with `SQLITE_STATIC` instead: SQLite
//! reads it where it lies and copies it once, into the row. The strings only have to outlive
//! the `sqlite3_step`: each statement is reset and its bindings cleared before `flush` drops
//! the rows, so no pointer to them is left behind. That is the crate's only `unsafe` code:
//! prepared statements owned by the writer beside its connection, finalized before the
//! connection closes.

use std::ffi::{c_char, c_int, CStr};
use std::ptr::{self, NonNull};
use std::sync::LazyLock;

use rusqlite::ffi;

use super::NewMessage;

/// Rows per statement at most (6 parameters each for a message, far under SQLite's limit of
/// 32,766). Rows go in as statements of powers of two up to this, at most seven of them for
/// any count below it, so that a handful of statements stay prepared.
pub(super) const ROWS_PER_INSERT: usize = 64;

/// For each `k`, the statement that inserts `2^k` rows of `row`.
fn statements(head: &str, row: &str) -> Vec<String> {
    (0..=ROWS_PER_INSERT.ilog2()).map(|k| format!("{head} VALUES {}", vec![row; 1 << k].join(","))).collect()
}

static INSERT_MESSAGES: LazyLock<Vec<String>> = LazyLock::new(|| {
    statements(
        "INSERT INTO messages (sender, sender_display_name, recipient, message, timestamp, client_msg_id)",
        "(?,?,?,?,?,?)",
    )
});

static INSERT_DELIVERED: LazyLock<Vec<String>> =
    LazyLock::new(|| statements("INSERT OR IGNORE INTO delivered (message_id)", "(?)"));

/// `items` cut into runs of powers of two, the largest first, none over `ROWS_PER_INSERT`; with
/// the index of each run's statement.
fn runs<T>(items: &[T]) -> impl Iterator<Item = (usize, &[T])> {
    let mut rest = items;
    std::iter::from_fn(move || {
        let k = rest.len().min(ROWS_PER_INSERT).checked_ilog2()?;
        let (run, after) = rest.split_at(1 << k);
        rest = after;
        Some((k as usize, run))
    })
}

/// A message waiting in the batch for its insert.
struct Row {
    id: i64,
    message: NewMessage,
    /// The client's msg_id as JSON text.
    msg_id: Option<String>,
}

/// The batch's new rows and the statements that insert them. It must be dropped before the
/// connection its statements were prepared on: the writer declares it before its connection,
/// and Rust drops fields in declaration order (a connection closed with a statement left
/// would fail to close).
pub(super) struct MessageRows {
    rows: Vec<Row>,
    /// The statement for `2^k` rows at `k`, prepared the first time a batch needs it.
    inserts: Vec<Option<NonNull<ffi::sqlite3_stmt>>>,
}

// SAFETY: SQLite is built threadsafe (serialized), and the statements are used only by the
// writer, which owns them and their connection and moves them to its thread together.
unsafe impl Send for MessageRows {}

impl MessageRows {
    pub(super) fn new() -> MessageRows {
        MessageRows { rows: Vec::new(), inserts: vec![None; INSERT_MESSAGES.len()] }
    }

    /// Message `id` goes in with the next flush.
    pub(super) fn push(&mut self, id: i64, message: NewMessage, msg_id: Option<String>) {
        self.rows.push(Row { id, message, msg_id });
    }

    /// Inserts every row pushed since the last flush, all with `timestamp`, and lets go of them
    /// (also when the insert fails: the batch is then rolled back as a whole). `conn` is the
    /// connection the statements are prepared on, every time: the writer's own.
    pub(super) fn flush(&mut self, conn: &rusqlite::Connection, timestamp: &str) -> rusqlite::Result<()> {
        let inserts = &mut self.inserts;
        let result =
            runs(&self.rows).try_for_each(|(k, rows)| insert(&mut inserts[k], conn, k, rows, timestamp));
        self.rows.clear();
        result
    }

    /// Lets go of rows a failed batch will not insert.
    pub(super) fn discard(&mut self) {
        self.rows.clear();
    }
}

impl Drop for MessageRows {
    fn drop(&mut self) {
        for stmt in self.inserts.iter().flatten() {
            // SAFETY: the statement is live and not used again.
            unsafe {
                ffi::sqlite3_finalize(stmt.as_ptr());
            }
        }
    }
}

/// Inserts `rows` (`2^k` of them) in one statement, prepared into `slot` if it is not yet.
fn insert(
    slot: &mut Option<NonNull<ffi::sqlite3_stmt>>,
    conn: &rusqlite::Connection,
    k: usize,
    rows: &[Row],
    timestamp: &str,
) -> rusqlite::Result<()> {
    let stmt = match slot {
        Some(stmt) => stmt.as_ptr(),
        None => slot.insert(prepare(conn, &INSERT_MESSAGES[k])?).as_ptr(),
    };
    // SAFETY: `stmt` is a live statement of this connection. Every text pointer is valid for
    // the length given until the bindings are cleared below, before this function returns
    // and so before `rows` can be dropped.
    unsafe {
        let mut rc = ffi::SQLITE_OK;
        for (n, row) in rows.iter().enumerate() {
            let first = (n * 6) as c_int + 1;
            let message = &row.message;
            let texts = [
                &*message.sender,
                &*message.sender_display_name,
                &message.recipient,
                &message.message,
                timestamp,
            ];
            for (place, text) in texts.into_iter().enumerate() {
                if rc == ffi::SQLITE_OK {
                    rc = bind_text(stmt, first + place as c_int, text);
                }
            }
            if rc == ffi::SQLITE_OK {
                rc = match &row.msg_id {
                    Some(text) => bind_text(stmt, first + 5, text),
                    None => ffi::sqlite3_bind_null(stmt, first + 5),
                };
            }
        }
        if rc == ffi::SQLITE_OK {
            rc = match ffi::sqlite3_step(stmt) {
                ffi::SQLITE_DONE => ffi::SQLITE_OK,
                other => other,
            };
        }
        // The error, if any, is read before the reset (which may replace the message).
        let db = conn.handle();
        let result = if rc != ffi::SQLITE_OK {
            Err(failure(db, rc))
        } else {
            // Rows of one statement get consecutive rowids: the last one right means all are.
            let (given, expected) = (ffi::sqlite3_last_insert_rowid(db), rows[rows.len() - 1].id);
            if given == expected {
                Ok(())
            } else {
                let message = format!("messages got ids up to {given}, the writer counted to {expected}");
                Err(rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_INTERNAL), Some(message)))
            }
        };
        ffi::sqlite3_reset(stmt);
        ffi::sqlite3_clear_bindings(stmt);
        result
    }
}

/// Prepares `sql` for the life of the connection.
fn prepare(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<NonNull<ffi::sqlite3_stmt>> {
    // SAFETY: `handle` is the connection's open database; the statement pointer is written by
    // SQLite, checked for null, and owned by the caller.
    unsafe {
        let db = conn.handle();
        let mut stmt = ptr::null_mut();
        let rc = ffi::sqlite3_prepare_v3(
            db,
            sql.as_ptr().cast::<c_char>(),
            sql.len() as c_int,
            ffi::SQLITE_PREPARE_PERSISTENT as _,
            &mut stmt,
            ptr::null_mut(),
        );
        match NonNull::new(stmt) {
            Some(stmt) if rc == ffi::SQLITE_OK => Ok(stmt),
            Some(stmt) => {
                ffi::sqlite3_finalize(stmt.as_ptr());
                Err(failure(db, rc))
            }
            None => Err(failure(db, rc)),
        }
    }
}

/// Binds `text` by reference.
///
/// # Safety
/// `stmt` must be live, and `text` must stay valid until the parameter is rebound or cleared.
unsafe fn bind_text(stmt: *mut ffi::sqlite3_stmt, index: c_int, text: &str) -> c_int {
    let Ok(len) = c_int::try_from(text.len()) else { return ffi::SQLITE_TOOBIG };
    // SAFETY: as the caller promises; the pointer and length describe `text`.
    unsafe { ffi::sqlite3_bind_text(stmt, index, text.as_ptr().cast::<c_char>(), len, ffi::SQLITE_STATIC()) }
}

/// The error `rc` as rusqlite reports it, with SQLite's message.
///
/// # Safety
/// `db` must be an open database handle.
unsafe fn failure(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    // SAFETY: as the caller promises; SQLite's message is a NUL-terminated string it owns.
    let message = unsafe {
        let text = ffi::sqlite3_errmsg(db);
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}

/// Records the batch's confirmed tail messages (`ids`, sorted here) in `delivered`. In id order
/// each row goes in next to the one before.
pub(super) fn insert_delivered(conn: &rusqlite::Connection, ids: &mut Vec<i64>) -> rusqlite::Result<()> {
    ids.sort_unstable();
    ids.dedup();
    runs(ids).try_for_each(|(k, run)| {
        conn.prepare_cached(&INSERT_DELIVERED[k])?.execute(rusqlite::params_from_iter(run)).map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn connection() -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY, sender TEXT NOT NULL,
                 sender_display_name TEXT NOT NULL, recipient TEXT NOT NULL,
                 message TEXT NOT NULL CHECK (message <> 'refused'), timestamp TEXT NOT NULL,
                 client_msg_id TEXT)",
        )
        .expect("schema");
        conn
    }

    fn message(sender: &str, text: &str) -> NewMessage {
        NewMessage {
            sender: Arc::from(sender),
            sender_display_name: Arc::from("Alice"),
            recipient: "bob".into(),
            message: text.into(),
            msg_id: None,
            idempotent: false,
        }
    }

    fn stored(conn: &rusqlite::Connection) -> Vec<(i64, String, String, Option<String>)> {
        conn.prepare("SELECT id, sender, message, client_msg_id FROM messages ORDER BY id")
            .expect("select")
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows")
    }

    #[test]
    fn every_row_pushed_is_stored_as_given_in_statements_of_any_size() {
        let conn = connection();
        let mut rows = MessageRows::new();
        let mut expected = Vec::new();
        let mut id = 0;
        // One row, a full statement and a remainder, then exactly two full statements.
        for count in [1, ROWS_PER_INSERT + 3, 2 * ROWS_PER_INSERT] {
            for _ in 0..count {
                id += 1;
                let (sender, text) = (format!("alice{id}"), "é".repeat(id as usize % 7 + 1));
                let msg_id = (id % 2 == 0).then(|| format!("\"c-{id}\""));
                expected.push((id, sender.clone(), text.clone(), msg_id.clone()));
                rows.push(id, message(&sender, &text), msg_id);
            }
            rows.flush(&conn, "2026-11-28T01:00:00.000Z").expect("flush");
        }
        assert_eq!(stored(&conn), expected);
    }

    #[test]
    fn runs_are_powers_of_two_largest_first_and_cover_everything_once() {
        let items: Vec<usize> = (0..2 * ROWS_PER_INSERT + 13).collect();
        let runs: Vec<(usize, &[usize])> = runs(&items).collect();
        let sizes: Vec<usize> = runs
            .iter()
            .map(|(k, run)| {
                assert_eq!(run.len(), 1 << k);
                run.len()
            })
            .collect();
        assert_eq!(sizes, vec![ROWS_PER_INSERT, ROWS_PER_INSERT, 8, 4, 1]);
        assert_eq!(runs.iter().flat_map(|(_, run)| run.iter().copied()).collect::<Vec<_>>(), items);
        assert_eq!(super::runs::<u8>(&[]).count(), 0);
    }

    #[test]
    fn confirmations_go_in_once_each_whatever_their_order() {
        let conn = rusqlite::Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE delivered (message_id INTEGER PRIMARY KEY); INSERT INTO delivered VALUES (5)",
        )
        .expect("schema");
        let mut ids: Vec<i64> = (1..=100).rev().chain([5, 7, 7]).collect();
        insert_delivered(&conn, &mut ids).expect("insert");
        let stored: Vec<i64> = conn
            .prepare("SELECT message_id FROM delivered ORDER BY message_id")
            .expect("select")
            .query_map([], |row| row.get(0))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert_eq!(stored, (1..=100).collect::<Vec<i64>>());
    }

    #[test]
    fn a_failed_insert_is_an_error_lets_go_of_its_rows_and_the_next_goes_in() {
        let conn = connection();
        let mut rows = MessageRows::new();
        rows.push(1, message("alice", "first"), None);
        rows.flush(&conn, "t").expect("first");
        rows.push(2, message("alice", "second"), None);
        rows.push(3, message("alice", "refused"), None);
        let error = rows.flush(&conn, "t").expect_err("a row the table refuses");
        assert!(error.to_string().contains("CHECK"), "{error}");
        rows.push(2, message("alice", "third"), None);
        rows.flush(&conn, "t").expect("after the failure");
        let stored: Vec<(i64, String)> =
            stored(&conn).into_iter().map(|(id, _, text, _)| (id, text)).collect();
        assert_eq!(
            stored,
            vec![(1, "first".into()), (2, "third".into())],
            "the failed statement stored none of its rows"
        );
        rows.push(7, message("alice", "an id the table would not give"), None);
        let error = rows.flush(&conn, "t").expect_err("ids out of step");
        assert!(error.to_string().contains("up to 3, the writer counted to 7"), "{error}");
        // Dropped before the connection, as the writer does.
        drop(rows);
        conn.close().map_err(|(_, error)| error).expect("closes with no statement left open");
    }
}
