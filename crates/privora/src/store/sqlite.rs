//! The SQLite store: the embedded default, one file, no server.
//!
//! WAL mode, `synchronous = FULL` (a committed message survives a power cut). All writes go
//! through one writer task that owns the only writing connection and commits whatever has queued
//! up in one transaction (group commit): many senders share one fsync, and no write ever waits
//! on SQLite's lock. Reads go through a small pool of read-only connections, which WAL lets run
//! beside the writer. sqlx runs each connection on its own thread, so nothing here blocks the
//! async runtime.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use privora_protocol::Contact;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, FromRow, Row};
use tokio::sync::mpsc;

use super::writer::{Reply, WriteOp, WriteQueue, WriterCache};
use super::{contacts_by_name, MessageRow, NewMessage, Store, StoreError, StoredMessage, UserRecord};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 1024;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

pub struct SqliteStore {
    writes: WriteQueue,
    reads: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub async fn open(path: &Path, readers: u32) -> Result<SqliteStore, StoreError> {
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
            // The default 2 MB page cache made the writer spill and re-read index pages on every
            // batch (a fifth of its time in the profile); pages are only allocated when used.
            .pragma("cache_size", "-65536")
            // Checkpoint less often: a hot index page is copied once per checkpoint, however
            // many commits touched it (the default, 1000 pages, took 17 % of the writer).
            .pragma("wal_autocheckpoint", "8192")
            .disable_statement_logging();
        let mut writer = options.connect().await.map_err(|e| {
            StoreError::Unavailable(format!("cannot open the SQLite database {}: {e}", path.display()))
        })?;
        MIGRATOR
            .run(&mut writer)
            .await
            .map_err(|e| StoreError::Database(format!("cannot migrate {}: {e}", path.display())))?;
        let reads = SqlitePoolOptions::new()
            .max_connections(readers)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await
            .map_err(from_sqlx)?;
        let writes = WriteQueue::spawn(MAX_BATCH * 4, |queue| run_writer(writer, queue));
        Ok(SqliteStore { writes, reads })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, message: NewMessage) -> Result<StoredMessage, StoreError> {
        self.writes.append(message).await
    }

    async fn mark_delivered(&self, recipient: &str, ids: Vec<i64>) -> Result<(), StoreError> {
        self.writes.mark_delivered(recipient, ids).await
    }

    async fn pending(&self, recipient: &str) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT m.id, m.sender, m.sender_display_name, m.recipient, m.message, m.timestamp,
                    m.client_msg_id
             FROM pending p JOIN messages m ON m.id = p.message_id
             WHERE p.recipient = ?1 ORDER BY p.message_id",
        )
        .bind(recipient)
        .fetch_all(&self.reads)
        .await
        .map_err(from_sqlx)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn history(&self, user: &str, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        // Each arm walks its index backwards and stops after `limit` rows, so the cost does not
        // grow with the user's whole history.
        let rows = sqlx::query(
            "SELECT id, sender, sender_display_name, recipient, message, timestamp, client_msg_id
             FROM messages WHERE id IN (
                 SELECT id FROM (
                     SELECT id FROM (SELECT id FROM messages WHERE sender = ?1
                                     ORDER BY id DESC LIMIT ?2)
                     UNION
                     SELECT id FROM (SELECT id FROM messages WHERE recipient = ?1
                                     ORDER BY id DESC LIMIT ?2)
                     ORDER BY id DESC LIMIT ?2)
                 UNION
                 SELECT message_id FROM pending WHERE recipient = ?1)
             ORDER BY id",
        )
        .bind(user)
        .bind(limit)
        .fetch_all(&self.reads)
        .await
        .map_err(from_sqlx)?;
        rows.iter().map(message_from_row).collect()
    }

    async fn contacts(&self, user: &str) -> Result<Vec<Contact>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.partner_id, u.display_name FROM contacts c
             LEFT JOIN users u ON u.user_id = c.partner_id
             WHERE c.user_id = ?1",
        )
        .bind(user)
        .fetch_all(&self.reads)
        .await
        .map_err(from_sqlx)?;
        Ok(contacts_by_name(rows.iter().map(|row| (row.get(0), row.get(1)))))
    }

    async fn upsert_user(&self, user: UserRecord) -> Result<(), StoreError> {
        self.writes.upsert_user(user).await
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
        // The trigram index needs at least three characters; shorter queries scan names with
        // LIKE, which the LIMIT cuts short for the common letters people type first.
        let rows = if query.chars().count() >= 3 {
            sqlx::query(
                "SELECT u.user_id, u.display_name FROM users_search s
                 JOIN users u ON u.rowid = s.rowid
                 WHERE users_search MATCH ?1 LIMIT ?2",
            )
            .bind(format!("\"{}\"", query.replace('"', "\"\"")))
            .bind(limit)
            .fetch_all(&self.reads)
            .await
        } else {
            let escaped = query.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            sqlx::query(
                "SELECT user_id, display_name FROM users
                 WHERE display_name LIKE ?1 ESCAPE '\\' LIMIT ?2",
            )
            .bind(format!("%{escaped}%"))
            .bind(limit)
            .fetch_all(&self.reads)
            .await
        }
        .map_err(from_sqlx)?;
        Ok(contacts_by_name(rows.iter().map(|row| (row.get(0), row.get(1)))))
    }

    async fn pending_count(&self) -> Result<Option<u64>, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM pending")
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
    }
}

fn message_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<StoredMessage, StoreError> {
    MessageRow::from_row(row).map(StoredMessage::from).map_err(from_sqlx)
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

/// The answer owed to one operation of a batch, sent only once the batch is committed.
enum Owed {
    Message(Reply<StoredMessage>),
    Unit(Reply<()>),
}

/// What one operation came to, if its statements ran.
enum Done {
    Message(Result<StoredMessage, StoreError>),
    Unit,
}

async fn run_writer(mut conn: SqliteConnection, mut queue: mpsc::Receiver<WriteOp>) {
    let mut cache = WriterCache::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            break;
        }
        let mut shutdown = None;
        let mut work = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for op in batch.drain(..) {
            match op {
                WriteOp::Shutdown(done) => shutdown = Some(done),
                // Anything queued behind the shutdown is refused (its reply is dropped: Closed).
                _ if shutdown.is_some() => {}
                WriteOp::Append(message, reply) => {
                    work.push(Work::Append(message));
                    replies.push(Owed::Message(reply));
                }
                WriteOp::Delivered { recipient, ids, reply } => {
                    work.push(Work::Delivered { recipient, ids });
                    replies.push(Owed::Unit(reply));
                }
                WriteOp::UpsertUser(user, reply) => {
                    work.push(Work::UpsertUser(user));
                    replies.push(Owed::Unit(reply));
                }
            }
        }
        match write_batch(&mut conn, &mut cache, work).await {
            Ok(results) => {
                for (reply, done) in replies.into_iter().zip(results) {
                    match (reply, done) {
                        (Owed::Message(reply), Done::Message(result)) => {
                            let _ = reply.send(result);
                        }
                        (Owed::Unit(reply), _) => {
                            let _ = reply.send(Ok(()));
                        }
                        (Owed::Message(reply), Done::Unit) => {
                            let _ = reply.send(Err(StoreError::Database("writer mix-up".into())));
                        }
                    }
                }
            }
            Err(error) => {
                let error = from_sqlx(error);
                tracing::error!(%error, "a write batch failed; nothing in it was stored");
                // The cache may name users or pairs whose insert was rolled back.
                cache = WriterCache::default();
                for reply in replies {
                    match reply {
                        Owed::Message(reply) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                        Owed::Unit(reply) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        }
        cache.trim();
        if let Some(done) = shutdown {
            queue.close();
            let _ = conn.close().await;
            let _ = done.send(());
            return;
        }
    }
}

/// One operation of a batch, without its reply.
enum Work {
    Append(NewMessage),
    Delivered { recipient: String, ids: Vec<i64> },
    UpsertUser(UserRecord),
}

/// Runs every operation in one transaction. Per-operation refusals (an unknown recipient) do
/// not spoil the batch; a database failure fails every operation in it, and none is committed.
///
/// The statements per batch stay few whatever its size: sqlx runs each statement on the
/// connection's own thread, and that hand-off (not SQLite) dominated the cost per message
/// when every message took three statements. So the batch's messages go in with multi-row
/// INSERTs, with ids given explicitly (the write lock is held from BEGIN IMMEDIATE, so
/// `MAX(id) + 1..` are ours, exactly what SQLite would have chosen), their `pending` rows with
/// one INSERT ... SELECT over that id range, and delivery confirmations with one DELETE per
/// chunk. Row-value statements come in a few fixed sizes so that prepared statements are reused.
async fn write_batch(
    conn: &mut SqliteConnection,
    cache: &mut WriterCache,
    work: Vec<Work>,
) -> Result<Vec<Done>, sqlx::Error> {
    if work.is_empty() {
        return Ok(Vec::new());
    }
    let timestamp = now_iso8601();
    let mut results = Vec::with_capacity(work.len());
    // Messages to insert, with the index of their result.
    let mut accepted: Vec<(usize, NewMessage)> = Vec::new();
    let mut delivered: Vec<(String, i64)> = Vec::new();
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    for op in work {
        match op {
            Work::Append(message) => {
                if is_known(&mut tx, cache, &message.recipient).await? {
                    accepted.push((results.len(), message));
                    // Replaced below, once the message has its id.
                    results.push(Done::Unit);
                } else {
                    results.push(Done::Message(Err(StoreError::UnknownRecipient(message.recipient))));
                }
            }
            Work::Delivered { recipient, ids } => {
                delivered.extend(ids.into_iter().map(|id| (recipient.clone(), id)));
                results.push(Done::Unit);
            }
            Work::UpsertUser(user) => {
                sqlx::query(
                    "INSERT INTO users (user_id, display_name, email, updated_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (user_id) DO UPDATE SET
                         display_name = COALESCE(excluded.display_name, users.display_name),
                         email = COALESCE(excluded.email, users.email),
                         updated_at = excluded.updated_at
                     WHERE (excluded.display_name IS NOT NULL AND users.display_name IS NOT excluded.display_name)
                        OR (excluded.email IS NOT NULL AND users.email IS NOT excluded.email)",
                )
                .bind(&user.user_id)
                .bind(&user.display_name)
                .bind(&user.email)
                .bind(&timestamp)
                .execute(&mut *tx)
                .await?;
                cache.users.insert(user.user_id);
                results.push(Done::Unit);
            }
        }
    }
    if !accepted.is_empty() {
        let first: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM messages").fetch_one(&mut *tx).await?;
        insert_messages(&mut tx, &accepted, first, &timestamp).await?;
        let last = first + accepted.len() as i64 - 1;
        sqlx::query(
            "INSERT INTO pending (recipient, message_id)
             SELECT recipient, id FROM messages WHERE id BETWEEN ?1 AND ?2",
        )
        .bind(first)
        .bind(last)
        .execute(&mut *tx)
        .await?;
        insert_contacts(&mut tx, cache, &accepted).await?;
        for (offset, (index, message)) in accepted.into_iter().enumerate() {
            results[index] = Done::Message(Ok(StoredMessage {
                id: first + offset as i64,
                sender: message.sender,
                sender_display_name: message.sender_display_name,
                recipient: message.recipient,
                message: message.message,
                timestamp: timestamp.clone(),
                msg_id: message.msg_id,
            }));
        }
    }
    for chunk in chunks(&delivered) {
        let sql = format!(
            "DELETE FROM pending WHERE {}",
            vec!["recipient = ? AND message_id = ?"; chunk.len()].join(" OR ")
        );
        let mut query = sqlx::query(&sql);
        for (recipient, id) in chunk {
            query = query.bind(recipient).bind(id);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(results)
}

/// Is `user` in the users table? Remembered once seen.
async fn is_known(
    tx: &mut SqliteConnection,
    cache: &mut WriterCache,
    user: &str,
) -> Result<bool, sqlx::Error> {
    if cache.users.contains(user) {
        return Ok(true);
    }
    let known = sqlx::query("SELECT 1 FROM users WHERE user_id = ?1")
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    if known {
        cache.users.insert(user.to_string());
    }
    Ok(known)
}

/// Inserts the accepted messages with ids `first`, `first + 1`, ... in their order.
async fn insert_messages(
    tx: &mut SqliteConnection,
    accepted: &[(usize, NewMessage)],
    first: i64,
    timestamp: &str,
) -> Result<(), sqlx::Error> {
    let mut id = first;
    for chunk in chunks(accepted) {
        let sql = format!(
            "INSERT INTO messages (id, sender, sender_display_name, recipient, message, timestamp, client_msg_id) VALUES {}",
            vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(&sql);
        for (_, message) in chunk {
            query = query
                .bind(id)
                .bind(&message.sender)
                .bind(&message.sender_display_name)
                .bind(&message.recipient)
                .bind(&message.message)
                .bind(timestamp)
                .bind(message.msg_id.as_ref().map(|v| v.to_string()));
            id += 1;
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Records both directions of every conversation pair the writer has not seen yet.
async fn insert_contacts(
    tx: &mut SqliteConnection,
    cache: &mut WriterCache,
    accepted: &[(usize, NewMessage)],
) -> Result<(), sqlx::Error> {
    let mut fresh: Vec<(String, String)> = Vec::new();
    for (_, message) in accepted {
        let pair = (message.sender.clone(), message.recipient.clone());
        if !cache.contacts.contains(&pair) {
            cache.contacts.insert(pair.clone());
            fresh.push((pair.1.clone(), pair.0.clone()));
            fresh.push(pair);
        }
    }
    for chunk in chunks(&fresh) {
        let sql = format!(
            "INSERT OR IGNORE INTO contacts (user_id, partner_id) VALUES {}",
            vec!["(?, ?)"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(&sql);
        for (user, partner) in chunk {
            query = query.bind(user).bind(partner);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Splits `items` into chunks of a few fixed sizes (256, 64, 16, 4, 1), largest first: few statements
/// per batch, and few distinct statement texts to prepare.
fn chunks<T>(items: &[T]) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let size = [256, 64, 16, 4, 1].into_iter().find(|&size| size <= rest.len()).unwrap_or(1);
        let (chunk, tail) = rest.split_at(size);
        out.push(chunk);
        rest = tail;
    }
    out
}

/// Now, as the protocol writes timestamps: ISO 8601, UTC, milliseconds, `Z`.
pub fn now_iso8601() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
