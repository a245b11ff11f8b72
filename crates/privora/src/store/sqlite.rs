//! The SQLite store: the embedded default, one file, no server.
//!
//! WAL mode, `synchronous = FULL` (a committed message survives a power cut). All writes go
//! through one writer thread that owns the only writing connection (rusqlite, prepared
//! statements, no hand-off per statement) and commits whatever has queued up in one transaction
//! (group commit): many senders share one fsync, and no write ever waits on SQLite's lock.
//!
//! Storing a message is one append at the end of `messages`. The indexes that find a user's
//! messages and partners (`timeline_chunks`, `pending`, `contact_chunks`) are brought up to date
//! by the same thread in sorted folds every few thousand messages; reads add the short unfolded
//! tail by scanning it (see migrations/sqlite/0002_indexed_tail.sql for why, and 0003 and 0004
//! for the chunks). A fold writes its users' rows in fold order (`fold_rows`, 0005), and every
//! eight large folds or so the writer moves them into the per-user chunks, a slice of users at
//! a time.
//!
//! Reads go through a small pool of read-only sqlx connections, which WAL lets run beside the
//! writer, each on its own thread, so nothing here blocks the async runtime. The reads that
//! return many rows (a user's pending and latest messages, and contacts) use as many read-only
//! rusqlite connections of their own on blocking threads (`ListReads`).

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::TryStreamExt;
use privora_protocol::Contact;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::oneshot;

use super::batch_inserts::{insert_delivered, MessageRows};
use super::batch_queue::{Batches, Taken};
use super::checkpointer::Checkpointer;
use super::known_pairs::KnownPairs;
use super::msg_ids::{fingerprint, RecentMsgIds, Remembered};
use super::tail_recipients::TailRecipients;
use super::writer::{Reply, WriteOp, WriteQueue, WRITER_CACHE};
use super::{
    contacts_by_name, remembered_since, sent_again, unix_now, Appended, MessageRow, NewMessage, Receipt,
    Store, StoreError, StoredMessage, UserRecord, PRUNE_EVERY,
};

/// How a search text is put to the FTS5 trigram index (`users_search`).
#[derive(Debug, PartialEq)]
enum TrigramQuery {
    /// Under three characters: no trigram to look up.
    TooShort,
    /// Up to `PHRASE_MAX_CHARS`: the query as an FTS5 phrase, every trigram at its place.
    Phrase(String),
    /// Longer: every third trigram (and the last) ANDed, the names checked afterwards. A phrase
    /// walks one doclist per trigram, and for a full name that is a dozen lists of tens of
    /// thousands of rows each; a third of them narrows the candidates to nearly the same rows.
    /// Measured on 1,000,000 names: full-name queries 3.5 ms → 1.9 ms at p50, 5.0 → 2.7 at p99.
    Candidates(String),
}

/// Longest query sent as a phrase. Sampling the trigrams of a short query keeps too few to be
/// selective, and the names that hold them all but not the query cost more to reject than the
/// phrase costs.
const PHRASE_MAX_CHARS: usize = 6;

impl TrigramQuery {
    fn of(query: &str) -> TrigramQuery {
        let chars: Vec<char> = query.chars().collect();
        let quoted = |text: String| format!("\"{}\"", text.replace('"', "\"\""));
        match chars.len() {
            0..=2 => TrigramQuery::TooShort,
            3..=PHRASE_MAX_CHARS => TrigramQuery::Phrase(quoted(query.to_string())),
            n => {
                let mut starts: Vec<usize> = (0..n - 2).step_by(3).collect();
                if starts.last() != Some(&(n - 3)) {
                    starts.push(n - 3);
                }
                let grams: Vec<String> =
                    starts.into_iter().map(|i| quoted(chars[i..i + 3].iter().collect())).collect();
                TrigramQuery::Candidates(grams.join(" AND "))
            }
        }
    }
}

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 1024;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// When the writer folds the tail (the newest messages) into the indexes.
///
/// Larger folds write each index page less often; a longer tail makes reads that scan it
/// (login, contacts) slower, and appends wait while a fold runs. Measured with the
/// `store_workload` example (1000 users, random peers), CPU per message with folds of 1024,
/// 4096, 16,384 and 65,536 messages: 34, 21, 18 and 13 µs (the last hardly folds at all). At
/// 16,384 messages a tail scan takes a few milliseconds.
///
/// A fold's cost is mostly the index pages it dirties, one or more per user it touches, so
/// small folds cost more per message: under the throughput bench (1000 users, 33k msg/s),
/// folding 1024 messages whenever the queue was momentarily empty cost 27 µs per message
/// against 8 µs for folds of 16,384, and kept the writer folding three quarters of its time.
/// So small folds are for a writer with time to spare: a low rate, an empty queue.
#[derive(Debug, Clone, Copy)]
pub struct IndexPolicy {
    /// Fold once the tail holds this many messages, `chunk` at a time.
    pub rows: i64,
    /// Most messages one fold takes once the tail reached `rows`.
    pub chunk: i64,
    /// Below this rate (messages per second since the last fold), a writer whose queue is empty
    /// folds `idle_chunk` messages at a time, so that no append waits long behind a fold. A queue
    /// that stays empty for a quarter of `interval` counts as idle whatever the rate.
    pub idle_rate: f64,
    /// Most messages a small fold takes; it runs once the tail holds this many, or once
    /// `interval` has passed since the last fold.
    pub idle_chunk: i64,
    pub interval: Duration,
    /// The writer moves the rows waiting in `fold_rows` into the per-user chunks (migration
    /// 0005) once they cover this many messages: a compaction writes a page or two per user
    /// it meets, so the more messages it covers, the less it costs each.
    pub compact_messages: i64,
    /// ... or once this many folds wait, whatever their size: a read looks a user's rows up
    /// once per waiting fold.
    pub compact_folds: usize,
}

impl Default for IndexPolicy {
    fn default() -> IndexPolicy {
        IndexPolicy {
            rows: 16_384,
            chunk: 16_384,
            idle_rate: 8_000.0,
            idle_chunk: 1024,
            interval: Duration::from_secs(1),
            compact_messages: 8 * 16_384,
            compact_folds: 64,
        }
    }
}

pub struct SqliteStore {
    writes: WriteQueue,
    reads: SqlitePool,
    lists: Arc<ListReads>,
    checkpointer: Mutex<Option<Checkpointer>>,
}

/// Read-only rusqlite connections for the reads that return many rows (a login's pending and
/// latest messages, and its contacts, read again at logout for the presence change). Rows
/// become values on a blocking thread, straight from the statement; through sqlx each row is
/// first copied into a row value and handed over from the connection's thread, with a wake-up
/// of the reader each: a 10,000-message catch-up read cost several times the query, and a user
/// with 845 contacts cost the server 7.3-9.4 ms of CPU to log in and out (4.0-5.8 this way,
/// `scripts/perf/login-storm`).
struct ListReads {
    path: PathBuf,
    /// At most `PRIVORA_DB_READERS` of these reads at a time (a login storm waits here).
    permits: tokio::sync::Semaphore,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

impl ListReads {
    fn connect(&self) -> rusqlite::Result<rusqlite::Connection> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "cache_size", -65536)?;
        Ok(conn)
    }

    /// Runs `read` on an idle connection (or a new one) on a blocking thread.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self.permits.acquire().await.map_err(|_| StoreError::Closed)?;
        let lists = self.clone();
        tokio::task::spawn_blocking(move || {
            let idle = lists.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match idle {
                Some(conn) => conn,
                None => lists.connect().map_err(from_rusqlite)?,
            };
            let result = read(&conn).map_err(from_rusqlite);
            lists.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Database(format!("a read did not finish: {e}")))?
    }

    /// The messages `sql` selects (the columns of `MessageRow`, in order) with `user` as ?1.
    async fn messages(
        self: &Arc<Self>,
        sql: &'static str,
        user: &str,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let user = user.to_string();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(sql)?;
            let mut rows = statement.query([&user])?;
            let mut messages = Vec::new();
            while let Some(row) = rows.next()? {
                messages.push(message_row(row)?);
            }
            Ok(messages)
        })
        .await
    }

    /// The user's newest `limit` messages, in id order, in one snapshot: the tail's (scanned)
    /// and the timeline chunks' (walked newest first, until they hold enough).
    async fn latest(self: &Arc<Self>, user: &str, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        let user = user.to_string();
        self.read(move |conn| {
            let wanted = limit as usize;
            let snapshot = conn.unchecked_transaction()?;
            // Newest first.
            let mut ids = snapshot
                .prepare_cached(
                    "SELECT id FROM messages
                     WHERE id > (SELECT indexed_upto FROM index_state) AND (sender = ?1 OR recipient = ?1)
                     ORDER BY id DESC LIMIT ?2",
                )?
                .query_map(rusqlite::params![user, limit], |row| row.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            // The folds' rows not yet moved into the chunks: only ids newer than the newest chunk
            // (a compaction under way leaves moved rows in place until it ends).
            let newest: i64 = snapshot
                .prepare_cached("SELECT coalesce(max(last_id), 0) FROM timeline_chunks WHERE user_id = ?1")?
                .query_row([&user], |row| row.get(0))?;
            let mut recent = snapshot.prepare_cached(
                "SELECT ids FROM fold_rows
                 WHERE user_id = ?1 AND fold IN (SELECT fold FROM recent_folds) ORDER BY fold DESC",
            )?;
            let mut rows = recent.query([&user])?;
            while ids.len() < wanted {
                let Some(row) = rows.next()? else { break };
                let fold: Vec<i64> = from_json(row.get_ref(0)?.as_str()?)?;
                let left = wanted - ids.len();
                ids.extend(fold.iter().rev().take_while(|&&id| id > newest).take(left));
            }
            drop(rows);
            let mut chunks = snapshot
                .prepare_cached("SELECT ids FROM timeline_chunks WHERE user_id = ?1 ORDER BY last_id DESC")?;
            let mut rows = chunks.query([&user])?;
            while ids.len() < wanted {
                let Some(row) = rows.next()? else { break };
                let chunk: Vec<i64> = from_json(row.get_ref(0)?.as_str()?)?;
                ids.extend(chunk.iter().rev().take(wanted - ids.len()));
            }
            drop(rows);
            let mut fetch = snapshot.prepare_cached(
                "SELECT id, sender, sender_display_name, recipient, message, timestamp, client_msg_id
                 FROM messages WHERE id = ?1",
            )?;
            let mut messages = Vec::with_capacity(ids.len());
            for &id in ids.iter().rev() {
                messages.push(fetch.query_row([id], message_row)?);
            }
            Ok(messages)
        })
        .await
    }

    /// Everyone `user` has written to or heard from, with their display names, sorted by name:
    /// the partners in the contact chunks, in the folds not yet moved into them, and in the
    /// unfolded tail.
    async fn contacts(self: &Arc<Self>, user: &str) -> Result<Vec<Contact>, StoreError> {
        let user = user.to_string();
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT p.partner_id, u.display_name FROM (
                     SELECT j.value AS partner_id FROM contact_chunks c, json_each(c.partners) j
                     WHERE c.user_id = ?1
                     UNION
                     SELECT j.value FROM fold_rows r, json_each(r.partners) j
                     WHERE r.user_id = ?1 AND r.fold IN (SELECT fold FROM recent_folds)
                     UNION
                     SELECT recipient FROM messages
                     WHERE id > (SELECT indexed_upto FROM index_state) AND sender = ?1
                     UNION
                     SELECT sender FROM messages
                     WHERE id > (SELECT indexed_upto FROM index_state) AND recipient = ?1
                 ) p LEFT JOIN users u ON u.user_id = p.partner_id",
            )?;
            let rows = statement
                .query_map([&user], |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(contacts_by_name(rows))
        })
        .await
    }
}

/// A row of the columns of `MessageRow`, in order, as a message.
fn message_row(row: &rusqlite::Row) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage::from(MessageRow {
        id: row.get(0)?,
        sender: row.get(1)?,
        sender_display_name: row.get(2)?,
        recipient: row.get(3)?,
        message: row.get(4)?,
        timestamp: row.get(5)?,
        client_msg_id: row.get(6)?,
    }))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path, readers: u32) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, readers, IndexPolicy::default()).await
    }

    /// `open`, with a chosen fold policy (the tests fold after every batch, or never).
    pub async fn open_with(
        path: &Path,
        readers: u32,
        policy: IndexPolicy,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("cannot create the folder {}: {e}", parent.display()))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .pragma("temp_store", "memory")
            // 64 MB per reader, allocated only as used: the search index of a large directory and
            // a long catch-up stay in memory (16 MB made search p99 three times slower).
            .pragma("cache_size", "-65536")
            .disable_statement_logging();
        let mut migrations = options.connect().await.map_err(|e| {
            StoreError::Unavailable(format!("cannot open the SQLite database {}: {e}", path.display()))
        })?;
        MIGRATOR
            .run(&mut migrations)
            .await
            .map_err(|e| StoreError::Database(format!("cannot migrate {}: {e}", path.display())))?;
        let _ = migrations.close().await;
        let owned = path.to_path_buf();
        let writer = tokio::task::spawn_blocking(move || Writer::open(&owned, policy))
            .await
            .map_err(|e| StoreError::Database(format!("the SQLite writer did not start: {e}")))?
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot open the SQLite database {}: {e}", path.display()))
            })?;
        let writes =
            WriteQueue::spawn_thread("privora-sqlite-writer", MAX_BATCH * 4, move |queue| writer.run(queue))
                .map_err(|e| StoreError::Database(format!("cannot start the SQLite writer thread: {e}")))?;
        let reads = SqlitePoolOptions::new()
            .max_connections(readers)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await
            .map_err(from_sqlx)?;
        let lists = Arc::new(ListReads {
            path: path.to_path_buf(),
            permits: tokio::sync::Semaphore::new(readers as usize),
            idle: Mutex::new(Vec::new()),
        });
        let checkpointer = Checkpointer::start(path)
            .map_err(|e| StoreError::Database(format!("cannot start the SQLite checkpoint thread: {e}")))?;
        Ok(SqliteStore { writes, reads, lists, checkpointer: Mutex::new(Some(checkpointer)) })
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn writes(&self) -> &WriteQueue {
        &self.writes
    }

    // Every read below is one statement, so one snapshot: `index_state`, the indexes and the
    // tail (`id > indexed_upto`, scanned by rowid) always agree.

    async fn pending(&self, recipient: &str) -> Result<Vec<StoredMessage>, StoreError> {
        const PENDING: &str =
            "SELECT id, sender, sender_display_name, recipient, message, timestamp, client_msg_id
             FROM messages WHERE id IN (
                 SELECT message_id FROM pending WHERE recipient = ?1
                 UNION ALL
                 SELECT id FROM messages
                 WHERE id > (SELECT indexed_upto FROM index_state) AND recipient = ?1
                   AND id NOT IN (SELECT message_id FROM delivered))
             ORDER BY id";
        self.lists.messages(PENDING, recipient).await
    }

    async fn latest(&self, user: &str, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        self.lists.latest(user, limit).await
    }

    async fn contacts(&self, user: &str) -> Result<Vec<Contact>, StoreError> {
        self.lists.contacts(user).await
    }

    async fn upsert_user(&self, user: UserRecord) -> Result<(), StoreError> {
        // Most logins are returning users whose token says what the table already has: a read
        // answers them, without waiting behind the writer's queue and its commits.
        let known: Option<(Option<String>, Option<String>)> =
            sqlx::query_as("SELECT display_name, email FROM users WHERE user_id = ?1")
                .bind(&user.user_id)
                .fetch_optional(&self.reads)
                .await
                .map_err(from_sqlx)?;
        let unchanged = |new: &Option<String>, old: &Option<String>| new.is_none() || new == old;
        match known {
            Some((name, email)) if unchanged(&user.display_name, &name) && unchanged(&user.email, &email) => {
                Ok(())
            }
            _ => self.writes.upsert_user(user).await,
        }
    }

    async fn display_name(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT display_name FROM users WHERE user_id = ?1")
            .bind(user_id)
            .fetch_optional(&self.reads)
            .await
            .map_err(from_sqlx)?;
        Ok(row.and_then(|row| row.get(0)))
    }

    async fn search_users(&self, query: &str, limit: u32) -> Result<Vec<Contact>, StoreError> {
        let query = query.trim();
        let rows: Vec<(String, Option<String>)> = match TrigramQuery::of(query) {
            TrigramQuery::TooShort => {
                // The trigram index needs three characters; shorter queries scan names with
                // LIKE, which the LIMIT cuts short for the common letters people type first.
                let escaped = query.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
                sqlx::query_as(
                    "SELECT user_id, display_name FROM users
                     WHERE display_name LIKE ?1 ESCAPE '\\' LIMIT ?2",
                )
                .bind(format!("%{escaped}%"))
                .bind(limit)
                .fetch_all(&self.reads)
                .await
                .map_err(from_sqlx)?
            }
            TrigramQuery::Phrase(phrase) => sqlx::query_as(
                "SELECT u.user_id, u.display_name FROM users_search s
                 JOIN users u ON u.rowid = s.rowid
                 WHERE users_search MATCH ?1 LIMIT ?2",
            )
            .bind(phrase)
            .bind(limit)
            .fetch_all(&self.reads)
            .await
            .map_err(from_sqlx)?,
            TrigramQuery::Candidates(candidates) => {
                // Rows that have every sampled trigram; the name itself says whether the whole
                // query is in it.
                let wanted = query.to_lowercase();
                let mut rows = sqlx::query_as::<_, (String, Option<String>)>(
                    "SELECT u.user_id, u.display_name FROM users_search s
                     JOIN users u ON u.rowid = s.rowid
                     WHERE users_search MATCH ?1",
                )
                .bind(candidates)
                .fetch(&self.reads);
                let mut found = Vec::new();
                while found.len() < limit as usize {
                    let Some(row) = rows.try_next().await.map_err(from_sqlx)? else { break };
                    if row.1.as_deref().is_some_and(|name| name.to_lowercase().contains(&wanted)) {
                        found.push(row);
                    }
                }
                found
            }
        };
        Ok(contacts_by_name(rows))
    }

    async fn pending_count(&self) -> Result<Option<u64>, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM pending)
                  + (SELECT count(*) FROM messages WHERE id > (SELECT indexed_upto FROM index_state))
                  - (SELECT count(*) FROM delivered)",
        )
        .fetch_one(&self.reads)
        .await
        .map_err(from_sqlx)?;
        Ok(Some(count.max(0) as u64))
    }

    async fn check(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reads).await.map_err(from_sqlx)?;
        if self.writes.is_closed() {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    async fn close(&self) {
        self.writes.close().await;
        self.reads.close().await;
        self.lists.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let checkpointer = self.checkpointer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut checkpointer) = checkpointer {
            let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
        }
    }
}

/// Busy, locked, I/O and pool errors mean "try again later"; anything else is a real fault.
fn from_sqlx(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(error.to_string())
        }
        sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("5") | Some("6") | Some("10") | Some("13")) =>
        {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Database(error.to_string()),
    }
}

/// The writer thread: the only connection that writes. It commits whatever has queued up in one
/// transaction (group commit), answers each operation once that is committed, and between
/// batches folds the tail into the indexes.
struct Writer {
    /// The batch's new messages, inserted together. Declared before `conn`, so that its
    /// statements are finalized before the connection closes.
    new_rows: MessageRows,
    conn: rusqlite::Connection,
    /// The answers owed to the batch being written.
    outcomes: Vec<Outcome>,
    /// Tail messages confirmed in the batch being written, checked against `tail_recipients`
    /// (`mark_delivered`), inserted into `delivered` together before it commits.
    confirmed: Vec<i64>,
    /// Users known to exist (recipients are checked against the users table).
    known_users: HashSet<String>,
    /// The id the next message gets: the write lock is ours alone, so ids are assigned here.
    next_id: i64,
    /// Messages up to here are in the indexes; the rest are the tail.
    indexed_upto: i64,
    /// How many `contact_chunks` rows a user has, for the users the writer has looked at; forgotten
    /// when a fold fails (it was rolled back) and re-read from the table when next needed.
    contact_chunks: HashMap<String, u32>,
    /// Conversation pairs already in `contact_chunks`.
    known_pairs: KnownPairs,
    last_fold: Instant,
    /// How many folds have rows in `fold_rows`, and how many messages they cover (about: read
    /// afresh when a compaction ends).
    waiting: Waiting,
    /// The compaction under way, if any.
    compaction: Option<Compaction>,
    policy: IndexPolicy,
    /// When `sent_msg_ids` rows past `MSG_ID_WINDOW` are next deleted.
    prune_due: Instant,
    /// The msg_ids of the idempotent messages of the last `MSG_ID_WINDOW` (`sent_msg_ids`).
    msg_ids: RecentMsgIds,
    /// The first id of the batch being written: a batch that fails takes its msg_ids back.
    batch_from: i64,
    /// Who the tail's messages went to, to check confirmations without reading `messages`.
    tail_recipients: TailRecipients,
}

/// What waits in `fold_rows` for a compaction.
#[derive(Debug, Default, Clone, Copy)]
struct Waiting {
    folds: usize,
    messages: i64,
}

/// Users to compact per transaction: each costs a page or two of chunks, so a slice keeps
/// appends waiting a few milliseconds at most.
const COMPACTION_SLICE: usize = 128;

/// A compaction under way: moving the rows of the folds up to `upto` from `fold_rows` into the
/// per-user chunks, a slice of users per transaction, between batches.
struct Compaction {
    upto: i64,
    /// The users whose rows are still to be moved, in reverse key order (taken from the end).
    users: Vec<String>,
}

/// What one operation of a batch came to, with the reply it is owed.
enum Outcome {
    Message(Reply<Appended>, Result<Appended, StoreError>),
    Unit(Reply<()>),
}

impl Writer {
    fn open(path: &Path, policy: IndexPolicy) -> rusqlite::Result<Writer> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "full")?;
        conn.pragma_update(None, "temp_store", "memory")?;
        // Hot pages stay in memory between batches and folds; allocated only when used.
        conn.pragma_update(None, "cache_size", -65536)?;
        // Checkpoint less often: a page is copied once per checkpoint, however many commits
        // touched it. The checkpoint thread (`store/checkpointer.rs`) copies most pages before
        // this one runs, which copies the rest and lets the log start over.
        conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
        conn.set_prepared_statement_cache_capacity(64);
        let mut writer = Writer {
            new_rows: MessageRows::new(),
            conn,
            confirmed: Vec::new(),
            outcomes: Vec::new(),
            known_users: HashSet::new(),
            // Both are read afresh at the start of every transaction.
            next_id: 1,
            indexed_upto: 0,
            contact_chunks: HashMap::new(),
            known_pairs: KnownPairs::default(),
            last_fold: Instant::now(),
            waiting: Waiting::default(),
            compaction: None,
            policy,
            prune_due: Instant::now(),
            msg_ids: RecentMsgIds::default(),
            batch_from: 1,
            tail_recipients: TailRecipients::default(),
        };
        writer.msg_ids = remembered_msg_ids(&writer.conn)?;
        // A tail left by the last run (a crash, or a stop between folds) is folded now.
        loop {
            writer.fold(policy.chunk)?;
            if writer.indexed_upto >= writer.next_id - 1 {
                break;
            }
        }
        writer.waiting = writer.count_waiting()?;
        Ok(writer)
    }

    fn run(mut self, mut queue: Batches<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // When to look at the tail again if nothing arrives; None: nothing to fold, wait on.
        // At once at the start: a compaction may have been left waiting by the last run.
        let mut due: Option<Instant> = Some(Instant::now());
        loop {
            match queue.take_blocking(&mut batch, MAX_BATCH, due) {
                Taken::Some => {}
                Taken::Closed => return,
                Taken::TimedOut => {
                    // The queue stayed empty until the deadline: the writer is idle.
                    due = self.fold_if_due(true);
                    continue;
                }
            }
            let shutdown = self.write(&mut batch);
            if let Some(done) = shutdown {
                queue.close();
                let _ = done.send(());
                return;
            }
            due = self.fold_if_due(queue.is_empty() && self.slow_since_fold());
        }
    }

    /// Whether fewer than `idle_rate` messages a second came since the last fold.
    fn slow_since_fold(&self) -> bool {
        let tail = self.next_id - 1 - self.indexed_upto;
        (tail as f64) < self.policy.idle_rate * self.last_fold.elapsed().as_secs_f64()
    }

    /// Folds if a fold is due, and says when to look again if no write comes meanwhile.
    ///
    /// Under load the tail grows to a large fold, cheap per message. A writer with time to spare
    /// (`idle`: its queue empty and the rate low, or nothing came for a while) folds a little at
    /// a time, so that no append waits long behind a fold, and goes on until the tail is folded
    /// even when no more writes come: reads scan the unfolded tail, so a tail left after a burst
    /// would slow every login until the next burst.
    fn fold_if_due(&mut self, idle: bool) -> Option<Instant> {
        if Instant::now() >= self.prune_due {
            self.prune_msg_ids();
        }
        let tail = self.next_id - 1 - self.indexed_upto;
        let since = self.last_fold.elapsed();
        let limit = if tail >= self.policy.rows {
            Some(self.policy.chunk)
        } else if idle && (tail >= self.policy.idle_chunk || (tail > 0 && since >= self.policy.interval)) {
            Some(self.policy.idle_chunk)
        } else {
            None
        };
        if let Some(limit) = limit {
            if let Err(error) = self.fold(limit) {
                // Nothing is lost: the tail stays the tail and the next fold tries again.
                tracing::error!(%error, "folding the message tail into the indexes failed");
                self.contact_chunks.clear();
                return Some(Instant::now() + self.policy.interval);
            }
        }
        if let Err(error) = self.compact_slice() {
            // Nothing is lost: the rows stay in `fold_rows` and the next compaction moves them.
            tracing::error!(%error, "moving fold rows into the per-user chunks failed");
            self.contact_chunks.clear();
            self.compaction = None;
            return Some(Instant::now() + self.policy.interval);
        }
        let tail = self.next_id - 1 - self.indexed_upto;
        match (tail, limit) {
            // Nothing to fold; a compaction under way goes on while the queue is empty.
            (0, _) if self.compaction.is_some() => Some(Instant::now()),
            (0, _) => None,
            // More to fold: go on at once unless a write is waiting.
            (_, Some(_)) => Some(Instant::now()),
            (_, None) => Some(Instant::now() + self.policy.interval / 4),
        }
    }

    /// Writes one batch and answers every operation in it. Returns the shutdown request, if
    /// the batch held one (operations queued behind it are refused: their replies drop).
    fn write(&mut self, batch: &mut Vec<WriteOp>) -> Option<oneshot::Sender<()>> {
        let mut shutdown = None;
        if let Some(at) = batch.iter().position(|op| matches!(op, WriteOp::Shutdown(_))) {
            if let Some(WriteOp::Shutdown(done)) = batch.drain(at..).next() {
                shutdown = Some(done);
            }
        }
        if batch.is_empty() {
            return shutdown;
        }
        // The batch and its answers in vectors kept from batch to batch: a batch's worth of
        // operations is several kilobytes, past glibc's per-thread cache, on every batch.
        let mut outcomes = std::mem::take(&mut self.outcomes);
        match self.write_batch(batch, &mut outcomes) {
            Ok(()) => {
                for outcome in outcomes.drain(..) {
                    match outcome {
                        Outcome::Message(reply, result) => {
                            let _ = reply.send(result);
                        }
                        Outcome::Unit(reply) => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(error) => {
                let error = from_rusqlite(error);
                tracing::error!(%error, "a write batch failed; nothing in it was stored");
                // Rolled back: the cache may name users whose insert was undone (the next batch
                // reads the next id afresh), and the batch's msg_ids name nothing.
                self.known_users.clear();
                self.msg_ids.forget_from(self.batch_from);
                self.tail_recipients.forget();
                for reply in outcomes.drain(..) {
                    match reply {
                        Outcome::Message(reply, _) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                        Outcome::Unit(reply) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        }
        self.outcomes = outcomes;
        if self.known_users.len() > WRITER_CACHE {
            self.known_users.clear();
        }
        shutdown
    }

    /// Runs every operation of `work` (emptied) in one transaction, an outcome for each in
    /// `outcomes`. Per-operation refusals (an unknown recipient) do not spoil the batch; a
    /// database failure fails every operation in it, and none is committed (the error comes
    /// back, and every outcome is owed it).
    ///
    /// A message is one insert at the end of `messages` (its rowid): no index is touched here.
    fn write_batch(&mut self, work: &mut Vec<WriteOp>, outcomes: &mut Vec<Outcome>) -> rusqlite::Result<()> {
        let timestamp = now_iso8601();
        // Until this batch has its first id, a failure has nothing of it to take back.
        self.batch_from = i64::MAX;
        let tx = match Tx::begin(&self.conn) {
            Ok(tx) => tx,
            Err(error) => {
                outcomes.extend(work.drain(..).filter_map(owed));
                return Err(error);
            }
        };
        match progress(&tx) {
            Ok((next_id, indexed_upto)) => {
                (self.next_id, self.indexed_upto) = (next_id, indexed_upto);
                self.batch_from = next_id;
                self.tail_recipients.start_batch(next_id);
            }
            Err(error) => {
                outcomes.extend(work.drain(..).filter_map(owed));
                return Err(error);
            }
        }
        let mut failure = None;
        let mut statements = match BatchStatements::prepare(&tx) {
            Ok(statements) => statements,
            Err(error) => {
                outcomes.extend(work.drain(..).filter_map(owed));
                return Err(error);
            }
        };
        for op in work.drain(..) {
            // Once a statement failed, the rest only collect their replies (they fail too).
            if failure.is_some() {
                outcomes.extend(owed(op));
                continue;
            }
            let done = match op {
                WriteOp::Append(message, reply) => {
                    let (known_users, next_id) = (&mut self.known_users, &mut self.next_id);
                    let (msg_ids, tail) = (&mut self.msg_ids, &mut self.tail_recipients);
                    match append(
                        &tx,
                        &mut self.new_rows,
                        &mut statements,
                        known_users,
                        msg_ids,
                        tail,
                        next_id,
                        message,
                        &timestamp,
                    ) {
                        Ok(result) => Ok(Outcome::Message(reply, result)),
                        Err(error) => Err((error, Outcome::Message(reply, Err(StoreError::Closed)))),
                    }
                }
                WriteOp::Delivered { recipient, ids, reply } => {
                    let (tail, confirmed) = (&self.tail_recipients, &mut self.confirmed);
                    match mark_delivered(
                        &mut statements,
                        tail,
                        self.indexed_upto,
                        &recipient,
                        &ids,
                        confirmed,
                    ) {
                        Ok(()) => Ok(Outcome::Unit(reply)),
                        Err(error) => Err((error, Outcome::Unit(reply))),
                    }
                }
                WriteOp::UpsertUser(user, reply) => {
                    match upsert_user(&tx, &mut self.known_users, user, &timestamp) {
                        Ok(()) => Ok(Outcome::Unit(reply)),
                        Err(error) => Err((error, Outcome::Unit(reply))),
                    }
                }
                WriteOp::Shutdown(_) => continue,
            };
            match done {
                Ok(outcome) => outcomes.push(outcome),
                Err((error, outcome)) => {
                    outcomes.push(outcome);
                    failure = Some(error);
                }
            }
        }
        drop(statements);
        if failure.is_none() {
            failure = self.new_rows.flush(&tx, &timestamp).err();
        }
        if failure.is_none() {
            failure = insert_delivered(&tx, &mut self.confirmed).err();
        }
        self.new_rows.discard();
        self.confirmed.clear();
        // Dropping an uncommitted transaction rolls it back.
        match failure {
            Some(error) => Err(error),
            None => tx.commit(),
        }
    }

    /// Folds the tail into the indexes in one transaction. The tail is read once, in id order,
    /// and each index gets its rows in key order, so a B-tree page is written once per fold, not
    /// once per message: `fold_rows` one row per user touched, at the end of the table (see
    /// migration 0005; compaction later moves them into `timeline_chunks` and `contact_chunks`),
    /// `pending` one per message not confirmed by now (in `delivered`).
    fn fold(&mut self, limit: i64) -> rusqlite::Result<()> {
        self.last_fold = Instant::now();
        let tx = Tx::begin(&self.conn)?;
        (self.next_id, self.indexed_upto) = progress(&tx)?;
        let top = (self.next_id - 1).min(self.indexed_upto + limit);
        if top <= self.indexed_upto {
            return Ok(());
        }
        let tail = Tail::read(&tx, self.indexed_upto, top)?;
        let numbers: Vec<u32> = tail.users.iter().map(|user| self.known_pairs.number(user)).collect();
        {
            // Users in key order, so the rows go in at the end of `fold_rows`, page after page.
            let mut insert = tx.prepare_cached(
                "INSERT INTO fold_rows (fold, user_id, ids, partners) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut contacts = tail.contacts.chunk_by(|a, b| a.0 == b.0).peekable();
            for (user, ids) in tail.timeline.iter().enumerate() {
                let mut partners: Vec<&str> = Vec::new();
                if let Some(pairs) = contacts.next_if(|pairs| pairs[0].0 == user) {
                    partners.extend(
                        pairs
                            .iter()
                            .filter(|&&(_, partner)| {
                                !self.known_pairs.contains(numbers[user], numbers[partner])
                            })
                            .map(|&(_, partner)| tail.users[partner].as_str()),
                    );
                }
                let partners = (!partners.is_empty()).then(|| to_json(&partners));
                insert.execute(rusqlite::params![top, tail.users[user], to_json(ids), partners])?;
            }
            tx.prepare_cached("INSERT INTO recent_folds (fold) VALUES (?1)")?.execute([top])?;
            let mut insert =
                tx.prepare_cached("INSERT OR IGNORE INTO pending (recipient, message_id) VALUES (?1, ?2)")?;
            for &(recipient, id) in &tail.pending {
                insert.execute(rusqlite::params![tail.users[recipient], id])?;
            }
        }
        tx.prepare_cached("DELETE FROM delivered WHERE message_id <= ?1")?.execute([top])?;
        tx.prepare_cached("UPDATE index_state SET indexed_upto = ?1")?.execute([top])?;
        tx.commit()?;
        tracing::debug!(from = self.indexed_upto + 1, to = top, "folded the message tail into the indexes");
        self.waiting.folds += 1;
        self.waiting.messages += top - self.indexed_upto;
        self.indexed_upto = top;
        self.tail_recipients.folded(top);
        for &(user, partner) in &tail.contacts {
            self.known_pairs.insert(numbers[user], numbers[partner]);
        }
        self.known_pairs.trim(WRITER_CACHE);
        Ok(())
    }

    /// Forgets the msg_ids past `MSG_ID_WINDOW` (or beyond `MAX_REMEMBERED`) and deletes their
    /// rows: the oldest, at the front of the table.
    fn prune_msg_ids(&mut self) {
        self.prune_due = Instant::now() + PRUNE_EVERY;
        let Some(upto) = self.msg_ids.expire(remembered_since()) else { return };
        let deleted = self
            .conn
            .prepare_cached("DELETE FROM sent_msg_ids WHERE message_id <= ?1")
            .and_then(|mut delete| delete.execute([upto]));
        if let Err(error) = deleted {
            // Nothing is lost: the writer has forgotten them; their rows go with a later prune
            // or are skipped when it starts.
            tracing::error!(%error, "deleting old msg_ids failed");
        }
    }

    /// The folds waiting in `fold_rows` and about how many messages they cover (from the first
    /// waiting fold's newest id: its own size is not recorded).
    fn count_waiting(&self) -> rusqlite::Result<Waiting> {
        let (folds, first): (i64, Option<i64>) =
            self.conn.query_row("SELECT count(*), min(fold) FROM recent_folds", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        let messages = first.map_or(0, |first| (self.indexed_upto - first + 1).max(0));
        Ok(Waiting { folds: folds as usize, messages })
    }

    /// Moves one slice of users' rows from `fold_rows` into the per-user chunks, starting a
    /// compaction once the waiting folds cover `compact_messages` messages or `compact_folds`
    /// folds wait. The last slice deletes the moved rows, whole folds at the front of the table.
    fn compact_slice(&mut self) -> rusqlite::Result<()> {
        if self.compaction.is_none() {
            if self.waiting.folds == 0
                || (self.waiting.folds < self.policy.compact_folds.max(1)
                    && self.waiting.messages < self.policy.compact_messages)
            {
                return Ok(());
            }
            let upto: Option<i64> =
                self.conn.query_row("SELECT max(fold) FROM recent_folds", [], |row| row.get(0))?;
            let Some(upto) = upto else {
                self.waiting = Waiting::default();
                return Ok(());
            };
            let mut users = self
                .conn
                .prepare("SELECT DISTINCT user_id FROM fold_rows WHERE fold <= ?1 ORDER BY user_id DESC")?
                .query_map([upto], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            users.shrink_to_fit();
            self.compaction = Some(Compaction { upto, users });
        }
        let Some(compaction) = self.compaction.as_mut() else { return Ok(()) };
        let upto = compaction.upto;
        let slice = compaction.users.split_off(compaction.users.len().saturating_sub(COMPACTION_SLICE));
        let last = compaction.users.is_empty();
        let tx = Tx::begin(&self.conn)?;
        for user in slice.iter().rev() {
            compact_user(&tx, &mut self.contact_chunks, user, upto)?;
        }
        if last {
            tx.prepare_cached("DELETE FROM fold_rows WHERE fold <= ?1")?.execute([upto])?;
            tx.prepare_cached("DELETE FROM recent_folds WHERE fold <= ?1")?.execute([upto])?;
        }
        tx.commit()?;
        if last {
            self.compaction = None;
            self.waiting = self.count_waiting()?;
            tracing::debug!(upto, "moved the fold rows into the per-user chunks");
        }
        if self.contact_chunks.len() > WRITER_CACHE {
            self.contact_chunks.clear();
        }
        Ok(())
    }
}

/// Moves `user`'s rows of the folds up to `upto` into their chunks: the ids newer than their
/// newest timeline chunk (older ones were moved before: a compaction cut short by a crash),
/// and the partners as one contacts chunk.
fn compact_user(
    tx: &rusqlite::Connection,
    contact_chunks: &mut HashMap<String, u32>,
    user: &str,
    upto: i64,
) -> rusqlite::Result<()> {
    let newest: i64 = tx
        .prepare_cached("SELECT coalesce(max(last_id), 0) FROM timeline_chunks WHERE user_id = ?1")?
        .query_row([user], |row| row.get(0))?;
    let mut ids: Vec<i64> = Vec::new();
    let mut partners: Vec<String> = Vec::new();
    let mut last = 0;
    {
        let mut select = tx.prepare_cached(
            "SELECT ids, partners FROM fold_rows
             WHERE user_id = ?1 AND fold IN (SELECT fold FROM recent_folds WHERE fold <= ?2)
             ORDER BY fold",
        )?;
        let mut rows = select.query(rusqlite::params![user, upto])?;
        while let Some(row) = rows.next()? {
            let fold_ids: Vec<i64> = from_json(row.get_ref(0)?.as_str()?)?;
            last = last.max(fold_ids.last().copied().unwrap_or(0));
            ids.extend(fold_ids.into_iter().filter(|&id| id > newest));
            if let Some(list) = row.get_ref(1)?.as_str_or_null()? {
                partners.extend(from_json::<String>(list)?);
            }
        }
    }
    let mut insert =
        tx.prepare_cached("INSERT INTO timeline_chunks (user_id, last_id, ids) VALUES (?1, ?2, ?3)")?;
    for chunk in ids.chunks(CHUNK_IDS) {
        insert.execute(rusqlite::params![user, chunk[chunk.len() - 1], to_json(chunk)])?;
    }
    partners.sort_unstable();
    partners.dedup();
    if !partners.is_empty() {
        let partners: Vec<&str> = partners.iter().map(String::as_str).collect();
        add_contact_chunk(tx, contact_chunks, user, last, &partners)?;
    }
    Ok(())
}

/// Most `contact_chunks` rows a user has before the writer merges them into one.
const CONTACT_CHUNKS: u32 = 16;

/// Adds one fold's partners of `user` as a chunk, and merges the user's chunks into one once
/// there are more than `CONTACT_CHUNKS`: a user's contacts stay a few rows to read, and a
/// user's full list is rewritten only every so many folds.
fn add_contact_chunk(
    tx: &rusqlite::Connection,
    counts: &mut HashMap<String, u32>,
    user: &str,
    last: i64,
    partners: &[&str],
) -> rusqlite::Result<()> {
    // A compaction repeated after a crash writes the same chunk again.
    tx.prepare_cached(
        "INSERT OR REPLACE INTO contact_chunks (user_id, last_id, partners) VALUES (?1, ?2, ?3)",
    )?
    .execute(rusqlite::params![user, last, to_json(partners)])?;
    let chunks = match counts.get_mut(user) {
        Some(chunks) => {
            *chunks += 1;
            *chunks
        }
        None => {
            let chunks: u32 = tx
                .prepare_cached("SELECT count(*) FROM contact_chunks WHERE user_id = ?1")?
                .query_row([user], |row| row.get(0))?;
            counts.insert(user.to_string(), chunks);
            chunks
        }
    };
    if chunks <= CONTACT_CHUNKS {
        return Ok(());
    }
    let mut merged = std::collections::BTreeSet::new();
    let mut newest = last;
    {
        let mut select =
            tx.prepare_cached("SELECT last_id, partners FROM contact_chunks WHERE user_id = ?1")?;
        let mut rows = select.query([user])?;
        while let Some(row) = rows.next()? {
            newest = newest.max(row.get(0)?);
            let chunk: Vec<String> = from_json(row.get_ref(1)?.as_str()?)?;
            merged.extend(chunk);
        }
    }
    tx.prepare_cached("DELETE FROM contact_chunks WHERE user_id = ?1")?.execute([user])?;
    let merged: Vec<String> = merged.into_iter().collect();
    tx.prepare_cached("INSERT INTO contact_chunks (user_id, last_id, partners) VALUES (?1, ?2, ?3)")?
        .execute(rusqlite::params![user, newest, to_json(&merged)])?;
    counts.insert(user.to_string(), 1);
    Ok(())
}

/// Most message ids in one `timeline_chunks` row: a chunk stays a small row (about 2 KB).
const CHUNK_IDS: usize = 256;

/// A stretch of the tail as the fold writes it: each index's rows in key order. Users are
/// referred to by their place in `users` (sorted, so that order is the text keys' order): a
/// fold of 16,384 messages would otherwise allocate and compare some 80,000 strings.
struct Tail {
    /// Every user who sent or received a message in the stretch, sorted.
    users: Vec<String>,
    /// For each user, the ids of the messages they sent or received, ascending.
    timeline: Vec<Vec<i64>>,
    /// (recipient, id) of each message not confirmed by now, sorted.
    pending: Vec<(usize, i64)>,
    /// Conversation pairs, both ways, sorted, each once.
    contacts: Vec<(usize, usize)>,
}

impl Tail {
    /// Reads the messages with `after < id <= upto`, in id order, and the confirmations of them.
    fn read(tx: &rusqlite::Connection, after: i64, upto: i64) -> rusqlite::Result<Tail> {
        let delivered = tx
            .prepare_cached("SELECT message_id FROM delivered WHERE message_id > ?1 AND message_id <= ?2")?
            .query_map([after, upto], |row| row.get(0))?
            .collect::<rusqlite::Result<HashSet<i64>>>()?;
        // Users numbered as they come; renumbered in key order below.
        let mut numbers: HashMap<String, usize> = HashMap::new();
        let mut number = |user: &str| match numbers.get(user) {
            Some(&n) => n,
            None => {
                let n = numbers.len();
                numbers.insert(user.to_string(), n);
                n
            }
        };
        let mut messages: Vec<(i64, usize, usize)> = Vec::with_capacity((upto - after) as usize);
        let mut select =
            tx.prepare_cached("SELECT id, sender, recipient FROM messages WHERE id > ?1 AND id <= ?2")?;
        let mut rows = select.query([after, upto])?;
        while let Some(row) = rows.next()? {
            let sender = number(row.get_ref(1)?.as_str()?);
            let recipient = number(row.get_ref(2)?.as_str()?);
            messages.push((row.get(0)?, sender, recipient));
        }
        let mut users: Vec<(String, usize)> = numbers.into_iter().collect();
        users.sort_unstable();
        let mut rank = vec![0; users.len()];
        for (place, (_, n)) in users.iter().enumerate() {
            rank[*n] = place;
        }
        let mut tail = Tail {
            timeline: vec![Vec::new(); users.len()],
            users: users.into_iter().map(|(user, _)| user).collect(),
            pending: Vec::new(),
            contacts: Vec::with_capacity(messages.len() * 2),
        };
        for (id, sender, recipient) in messages {
            let (sender, recipient) = (rank[sender], rank[recipient]);
            tail.timeline[sender].push(id);
            if recipient != sender {
                tail.timeline[recipient].push(id);
            }
            if !delivered.contains(&id) {
                tail.pending.push((recipient, id));
            }
            tail.contacts.push((sender, recipient));
            tail.contacts.push((recipient, sender));
        }
        tail.pending.sort_unstable();
        tail.contacts.sort_unstable();
        tail.contacts.dedup();
        Ok(tail)
    }
}

/// A chunk's list (`timeline_chunks.ids`, `contact_chunks.partners`) as stored: a JSON array.
fn to_json<T: serde::Serialize>(list: &[T]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

/// A chunk's list read back.
fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> rusqlite::Result<Vec<T>> {
    serde_json::from_str(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

/// One of the writer's transactions: `BEGIN IMMEDIATE` to `COMMIT`, rolled back if dropped
/// uncommitted. rusqlite's `Transaction` runs both through `execute_batch`, which parses the SQL
/// every time; here they are cached statements. At low rates, where a batch is a message or two,
/// parsing them was about a tenth of the writer thread's instructions.
struct Tx<'c> {
    conn: &'c rusqlite::Connection,
    open: bool,
}

impl<'c> Tx<'c> {
    fn begin(conn: &'c rusqlite::Connection) -> rusqlite::Result<Tx<'c>> {
        if !conn.is_autocommit() {
            // A rollback that failed left the last transaction open: end it first.
            conn.prepare_cached("ROLLBACK")?.execute([])?;
        }
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(Tx { conn, open: true })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = rusqlite::Connection;

    fn deref(&self) -> &rusqlite::Connection {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        // SQLite may have rolled back already (after some I/O errors). A rollback that fails
        // here is retried by the next `begin`; the caller has its error already.
        if self.open && !self.conn.is_autocommit() {
            let _ = self.conn.prepare_cached("ROLLBACK").and_then(|mut rollback| rollback.execute([]));
        }
    }
}

/// The next message id and the fold's progress, read afresh inside the transaction that holds
/// the write lock: another process on the same file (`privora token` beside a running server)
/// may have appended or folded since.
fn progress(tx: &rusqlite::Connection) -> rusqlite::Result<(i64, i64)> {
    // One step down the rowid B-tree, not a scan.
    let last: Option<i64> =
        tx.prepare_cached("SELECT MAX(id) FROM messages")?.query_row([], |row| row.get(0))?;
    let next_id = last.unwrap_or(0) + 1;
    let indexed_upto =
        tx.prepare_cached("SELECT indexed_upto FROM index_state")?.query_row([], |row| row.get(0))?;
    Ok((next_id, indexed_upto))
}

/// The msg_ids of the last `MSG_ID_WINDOW`, read back when the writer starts.
fn remembered_msg_ids(conn: &rusqlite::Connection) -> rusqlite::Result<RecentMsgIds> {
    let mut msg_ids = RecentMsgIds::default();
    let mut select = conn.prepare(
        "SELECT message_id, fingerprint, created_at FROM sent_msg_ids WHERE created_at >= ?1 ORDER BY message_id",
    )?;
    let mut rows = select.query([remembered_since()])?;
    while let Some(row) = rows.next()? {
        let fingerprint: i64 = row.get(1)?;
        msg_ids.remember(Remembered {
            message_id: row.get(0)?,
            fingerprint: fingerprint as u64,
            created_at: row.get(2)?,
        });
    }
    // Those that expired while the writer was stopped (a scan, once).
    conn.execute("DELETE FROM sent_msg_ids WHERE created_at < ?1", [remembered_since()])?;
    Ok(msg_ids)
}

/// The reply an operation is owed when its batch fails before reaching it.
fn owed(op: WriteOp) -> Option<Outcome> {
    match op {
        WriteOp::Append(_, reply) => Some(Outcome::Message(reply, Err(StoreError::Closed))),
        WriteOp::Delivered { reply, .. } | WriteOp::UpsertUser(_, reply) => Some(Outcome::Unit(reply)),
        WriteOp::Shutdown(_) => None,
    }
}

/// The statements a batch runs once per message, prepared once per batch: taking a statement
/// from rusqlite's cache and putting it back costs an allocation and a hash lookup each time.
struct BatchStatements<'tx> {
    delivered_in_tail: rusqlite::CachedStatement<'tx>,
    delete_pending: rusqlite::CachedStatement<'tx>,
    insert_msg_id: rusqlite::CachedStatement<'tx>,
}

impl<'tx> BatchStatements<'tx> {
    fn prepare(tx: &'tx rusqlite::Connection) -> rusqlite::Result<BatchStatements<'tx>> {
        Ok(BatchStatements {
            // Still in the tail: the fold will not make it pending.
            delivered_in_tail: tx.prepare_cached(
                "INSERT OR IGNORE INTO delivered (message_id)
                 SELECT id FROM messages WHERE id = ?1 AND recipient = ?2",
            )?,
            delete_pending: tx
                .prepare_cached("DELETE FROM pending WHERE recipient = ?1 AND message_id = ?2")?,
            insert_msg_id: tx.prepare_cached(
                "INSERT INTO sent_msg_ids (message_id, fingerprint, created_at) VALUES (?1, ?2, ?3)",
            )?,
        })
    }
}

/// Appends one message with the next id, unless its recipient is unknown or it is an
/// idempotent message sent before (refusals, not failures: the batch goes on).
#[allow(clippy::too_many_arguments)]
fn append(
    tx: &rusqlite::Connection,
    new_rows: &mut MessageRows,
    statements: &mut BatchStatements,
    known_users: &mut HashSet<String>,
    msg_ids: &mut RecentMsgIds,
    tail: &mut TailRecipients,
    next_id: &mut i64,
    message: NewMessage,
    timestamp: &str,
) -> rusqlite::Result<Result<Appended, StoreError>> {
    let msg_id = message.msg_id.as_ref().map(|v| v.to_string());
    let key =
        msg_id.as_deref().filter(|_| message.idempotent).map(|key| (key, fingerprint(&message.sender, key)));
    if let Some((key, print)) = key {
        if let Some(first_id) = msg_ids.get(print) {
            // The first may be in this batch, not inserted yet.
            new_rows.flush(tx, timestamp)?;
            let first = tx
                .prepare_cached(
                    "SELECT id, sender, sender_display_name, recipient, message, timestamp, client_msg_id
                     FROM messages WHERE id = ?1",
                )?
                .query_row([first_id], message_row)?;
            // A fingerprint names one message; another sender's or msg_id's is a collision.
            let same = *first.sender == *message.sender
                && first.msg_id.as_ref().map(|id| id.to_string()).as_deref() == Some(key);
            if same {
                return Ok(sent_again(first, &message));
            }
        }
    }
    let known = known_users.contains(&message.recipient) || {
        let found =
            tx.prepare_cached("SELECT 1 FROM users WHERE user_id = ?1")?.exists([&message.recipient])?;
        if found {
            known_users.insert(message.recipient.clone());
        }
        found
    };
    if !known {
        return Ok(Err(StoreError::UnknownRecipient(message.recipient)));
    }
    let id = *next_id;
    if let Some(print) = key.map(|(_, print)| print) {
        let remembered = Remembered { message_id: id, fingerprint: print, created_at: unix_now() };
        statements.insert_msg_id.execute(rusqlite::params![id, print as i64, remembered.created_at])?;
        msg_ids.remember(remembered);
    }
    tail.push(id, &message.recipient);
    new_rows.push(id, message, msg_id);
    *next_id += 1;
    Ok(Ok(Appended::New(Receipt { id, timestamp: timestamp.to_string() })))
}

/// `recipient` confirmed `ids`. A confirmation of someone else's message changes nothing. The
/// tail's messages known to be the recipient's go into `confirmed`, for `insert_delivered`.
fn mark_delivered(
    statements: &mut BatchStatements,
    tail: &TailRecipients,
    indexed_upto: i64,
    recipient: &str,
    ids: &[i64],
    confirmed: &mut Vec<i64>,
) -> rusqlite::Result<()> {
    let hashed = tail.hash(recipient);
    for &id in ids {
        if id > indexed_upto {
            match tail.sent_to(id, hashed) {
                Some(true) => {
                    confirmed.push(id);
                    0
                }
                Some(false) => 0,
                None => statements.delivered_in_tail.execute(rusqlite::params![id, recipient])?,
            };
        } else {
            statements.delete_pending.execute(rusqlite::params![recipient, id])?;
        }
    }
    Ok(())
}

fn upsert_user(
    tx: &rusqlite::Connection,
    known_users: &mut HashSet<String>,
    user: UserRecord,
    timestamp: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO users (user_id, display_name, email, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id) DO UPDATE SET
             display_name = COALESCE(excluded.display_name, users.display_name),
             email = COALESCE(excluded.email, users.email),
             updated_at = excluded.updated_at
         WHERE (excluded.display_name IS NOT NULL AND users.display_name IS NOT excluded.display_name)
            OR (excluded.email IS NOT NULL AND users.email IS NOT excluded.email)",
    )?
    .execute(rusqlite::params![user.user_id, user.display_name, user.email, timestamp])?;
    known_users.insert(user.user_id);
    Ok(())
}

/// Busy, locked and I/O errors mean "try again later"; anything else is a real fault.
fn from_rusqlite(error: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match error.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | CannotOpen) => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Database(error.to_string()),
    }
}

/// Now, as the protocol writes timestamps: ISO 8601, UTC, milliseconds, `Z`.
pub fn now_iso8601() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::TrigramQuery;

    #[test]
    fn short_queries_are_phrases_and_long_ones_sample_every_third_trigram() {
        assert_eq!(TrigramQuery::of("be"), TrigramQuery::TooShort);
        assert_eq!(TrigramQuery::of("ben"), TrigramQuery::Phrase("\"ben\"".into()));
        assert_eq!(TrigramQuery::of("a\"b c"), TrigramQuery::Phrase("\"a\"\"b c\"".into()));
        // Starts 0 and 3, then the last trigram so the query's end is covered.
        assert_eq!(
            TrigramQuery::of("benjamin"),
            TrigramQuery::Candidates("\"ben\" AND \"jam\" AND \"min\"".into())
        );
        assert_eq!(
            TrigramQuery::of("abcdefghi"),
            TrigramQuery::Candidates("\"abc\" AND \"def\" AND \"ghi\"".into())
        );
        // Characters, not bytes.
        assert_eq!(TrigramQuery::of("élodie"), TrigramQuery::Phrase("\"élodie\"".into()));
        assert_eq!(
            TrigramQuery::of("éloïse d"),
            TrigramQuery::Candidates("\"élo\" AND \"ïse\" AND \"e d\"".into())
        );
    }
}
