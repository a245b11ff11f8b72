//! The PostgreSQL store: the server database that several nodes can share.
//!
//! Same contract as the SQLite store and the same write path: one writer task per node commits
//! whatever has queued up in one transaction (group commit), so many senders share one commit
//! round trip. Reads go straight to the pool. With several nodes, ids are allocated by the
//! database in no particular commit order, which is why delivery goes by the rows of `pending`,
//! never by "ids above a cursor".
//!
//! When the database goes away, writes fail with `Unavailable` (the sender hears `unavailable`,
//! nothing pretends to be stored), reads are retried a few times first, and the pool reconnects
//! by itself once the database is back: no restart needed.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use privora_protocol::Contact;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, FromRow, Row};

use super::batch_queue::Batches;
use super::msg_ids::fingerprint;
use super::sqlite::now_iso8601;
use super::writer::{Reply, WriteOp, WriteQueue, WriterCache};
use super::{
    contacts_by_name, remembered_since, sent_again, unix_now, Appended, MessageRow, NewMessage, Receipt,
    Store, StoreError, StoredMessage, UserRecord, PRUNE_EVERY,
};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;
/// How long an operation waits for a pooled connection before the database counts as down.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most `sent_msg_ids` rows one prune deletes: a prune is a short pause for the writer. A prune
/// that deleted this many goes on with the next batch rather than a minute later. (The SQLite
/// writer deletes a range of its table's rowids instead: no limit needed.)
const PRUNE_ROWS: i64 = 10_000;
/// Attempts of a read before `Unavailable` reaches the caller, and the pause between them.
const READ_ATTEMPTS: u32 = 3;
const READ_RETRY_PAUSE: Duration = Duration::from_millis(300);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

pub struct PostgresStore {
    writes: WriteQueue,
    pool: PgPool,
}

impl PostgresStore {
    /// Connects (a pool of at most `pool_size`) and brings the schema up to date. Nodes
    /// starting together are safe: sqlx holds an advisory lock while it migrates.
    pub async fn open(url: &str, pool_size: u32) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Database(format!("DATABASE_URL is not a PostgreSQL URL: {e}")))?
            .application_name("privora")
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .min_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(format!("cannot migrate the PostgreSQL database: {e}")))?;
        let writes = WriteQueue::spawn(MAX_BATCH * 4, |queue| run_writer(pool.clone(), queue));
        Ok(PostgresStore { writes, pool })
    }

    /// Runs a read, again after a pause if the database is unavailable (it may be restarting).
    async fn read<T, F, Fut>(&self, run: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let mut attempt = 1;
        loop {
            match run().await.map_err(from_sqlx) {
                Err(StoreError::Unavailable(reason)) if attempt < READ_ATTEMPTS && !self.pool.is_closed() => {
                    tracing::debug!(%reason, attempt, "read failed, retrying");
                    tokio::time::sleep(READ_RETRY_PAUSE * attempt).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

const MESSAGE_COLUMNS: &str = "id, sender, sender_display_name, recipient, message, timestamp, client_msg_id";

#[async_trait]
impl Store for PostgresStore {
    fn writes(&self) -> &WriteQueue {
        &self.writes
    }

    async fn pending(&self, recipient: &str) -> Result<Vec<StoredMessage>, StoreError> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE id IN (SELECT message_id FROM pending WHERE recipient = $1) ORDER BY id"
        );
        let rows = self.read(|| sqlx::query(&sql).bind(recipient).fetch_all(&self.pool)).await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn latest(&self, user: &str, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        // Each arm walks its index backwards and stops after `limit` rows.
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id IN (
                 SELECT id FROM (
                     (SELECT id FROM messages WHERE sender = $1 ORDER BY id DESC LIMIT $2)
                     UNION
                     (SELECT id FROM messages WHERE recipient = $1 ORDER BY id DESC LIMIT $2)
                     ORDER BY id DESC LIMIT $2) latest)
             ORDER BY id"
        );
        let rows =
            self.read(|| sqlx::query(&sql).bind(user).bind(i64::from(limit)).fetch_all(&self.pool)).await?;
        rows.iter().map(message_from_row).collect()
    }

    async fn contacts(&self, user: &str) -> Result<Vec<Contact>, StoreError> {
        let rows = self
            .read(|| {
                sqlx::query(
                    "SELECT c.partner_id, u.display_name FROM contacts c
                     LEFT JOIN users u ON u.user_id = c.partner_id
                     WHERE c.user_id = $1",
                )
                .bind(user)
                .fetch_all(&self.pool)
            })
            .await?;
        Ok(sorted_contacts(&rows))
    }

    async fn upsert_user(&self, user: UserRecord) -> Result<(), StoreError> {
        self.writes.upsert_user(user).await
    }

    async fn display_name(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .read(|| {
                sqlx::query("SELECT display_name FROM users WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(&self.pool)
            })
            .await?;
        Ok(row.and_then(|row| row.get(0)))
    }

    async fn search_users(&self, query: &str, limit: u32) -> Result<Vec<Contact>, StoreError> {
        // ILIKE '%q%' is served by the trigram index (pg_trgm) for queries of three or more
        // characters; shorter ones scan, cut short by the LIMIT.
        let escaped = query.trim().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        let pattern = format!("%{escaped}%");
        let rows = self
            .read(|| {
                sqlx::query(
                    "SELECT user_id, display_name FROM users
                     WHERE display_name ILIKE $1 ESCAPE '\\' LIMIT $2",
                )
                .bind(&pattern)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
            })
            .await?;
        Ok(sorted_contacts(&rows))
    }

    async fn pending_count(&self) -> Result<Option<u64>, StoreError> {
        let count: i64 =
            self.read(|| sqlx::query_scalar("SELECT count(*) FROM pending").fetch_one(&self.pool)).await?;
        Ok(Some(count.max(0) as u64))
    }

    async fn check(&self) -> Result<(), StoreError> {
        if self.writes.is_closed() {
            return Err(StoreError::Closed);
        }
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(from_sqlx)?;
        Ok(())
    }

    async fn close(&self) {
        self.writes.close().await;
        self.pool.close().await;
    }
}

fn sorted_contacts(rows: &[PgRow]) -> Vec<Contact> {
    contacts_by_name(rows.iter().map(|row| (row.get(0), row.get(1))))
}

fn message_from_row(row: &PgRow) -> Result<StoredMessage, StoreError> {
    MessageRow::from_row(row).map(StoredMessage::from).map_err(from_sqlx)
}

/// Lost connections, a database shutting down or starting, too many clients, serialization
/// conflicts: "try again later". Anything else is a real fault.
fn from_sqlx(error: sqlx::Error) -> StoreError {
    let transient = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") // connection exception
                || code.starts_with("57P") // admin shutdown, crash shutdown, cannot connect now
                || code.starts_with("53") // insufficient resources
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock detected
        }),
        _ => false,
    };
    if transient {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Database(error.to_string())
    }
}

async fn run_writer(pool: PgPool, mut queue: Batches<WriteOp>) {
    let mut cache = WriterCache::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // At the start, then with the batches once `PRUNE_EVERY` has passed.
    let mut prune_due = prune_msg_ids(&pool).await;
    while queue.take(&mut batch, MAX_BATCH).await {
        if Instant::now() >= prune_due {
            prune_due = prune_msg_ids(&pool).await;
        }
        let mut shutdown = None;
        let mut work = Vec::with_capacity(batch.len());
        for op in batch.drain(..) {
            match op {
                WriteOp::Shutdown(done) => shutdown = Some(done),
                // Anything queued behind the shutdown is refused (its reply is dropped: Closed).
                _ if shutdown.is_some() => {}
                op => work.push(op),
            }
        }
        if !work.is_empty() {
            commit_batch(&pool, &mut cache, work).await;
        }
        cache.trim();
        if let Some(done) = shutdown {
            queue.close();
            let _ = done.send(());
            return;
        }
    }
}

/// Deletes the oldest `sent_msg_ids` rows past `MSG_ID_WINDOW` (at most `PRUNE_ROWS`); says
/// when to prune next.
async fn prune_msg_ids(pool: &PgPool) -> Instant {
    let before = remembered_since();
    let deleted = sqlx::query(
        "DELETE FROM sent_msg_ids WHERE (sender, msg_id) IN
             (SELECT sender, msg_id FROM sent_msg_ids WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
    )
    .bind(before)
    .bind(PRUNE_ROWS)
    .execute(pool)
    .await;
    match deleted {
        Ok(done) if done.rows_affected() as i64 >= PRUNE_ROWS => Instant::now(),
        Ok(_) => Instant::now() + PRUNE_EVERY,
        Err(error) => {
            // Nothing is lost: the rows only wait for the next prune.
            tracing::warn!(%error, "deleting old msg_ids failed");
            Instant::now() + PRUNE_EVERY
        }
    }
}

/// One operation's outcome, held until the batch commits.
enum Outcome {
    Message(Reply<Appended>, Result<Appended, StoreError>),
    Unit(Reply<()>),
}

/// Runs a batch in one transaction and answers every operation in it: with its own result once
/// committed, or with the database's error if the transaction failed (nothing in it is stored).
///
/// Rows that another node's batch may write too are written in one order on every node, so
/// that two batches wait for each other instead of deadlocking (PostgreSQL would abort one
/// after a second, refusing every message in it): the msg_id claims (`MsgIdClaims`), the users
/// (upserts first, by user id; an append after them only finds its recipient sooner), the
/// confirmations (`pending` deletes, after the appends, by recipient and id) and the
/// conversation pairs (`contacts`, all of the batch's at its end, sorted).
async fn commit_batch(pool: &PgPool, cache: &mut WriterCache, mut work: Vec<WriteOp>) {
    let mut outcomes = Vec::with_capacity(work.len());
    let claims = MsgIdClaims::of(&work);
    work.sort_by(|a, b| match (a, b) {
        (WriteOp::UpsertUser(a, _), WriteOp::UpsertUser(b, _)) => a.user_id.cmp(&b.user_id),
        (WriteOp::UpsertUser(..), _) => std::cmp::Ordering::Less,
        (_, WriteOp::UpsertUser(..)) => std::cmp::Ordering::Greater,
        _ => std::cmp::Ordering::Equal,
    });
    let mut pairs = Vec::new();
    let mut confirmed: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut ops = work.into_iter();
    let result: Result<(), sqlx::Error> = async {
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        claims.lock(&mut tx).await?;
        let timestamp = now_iso8601();
        for op in ops.by_ref() {
            match op {
                WriteOp::Append(message, reply) => {
                    let result = append_one(&mut tx, cache, &mut pairs, message, &timestamp).await;
                    match result {
                        Ok(stored) => outcomes.push(Outcome::Message(reply, stored)),
                        Err(error) => {
                            outcomes.push(Outcome::Message(reply, Err(StoreError::Closed)));
                            return Err(error);
                        }
                    }
                }
                WriteOp::Delivered { recipient, ids, reply } => {
                    outcomes.push(Outcome::Unit(reply));
                    confirmed.entry(recipient).or_default().extend(ids);
                }
                WriteOp::UpsertUser(user, reply) => {
                    outcomes.push(Outcome::Unit(reply));
                    sqlx::query(
                        "INSERT INTO users (user_id, display_name, email, updated_at)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (user_id) DO UPDATE SET
                             display_name = COALESCE(excluded.display_name, users.display_name),
                             email = COALESCE(excluded.email, users.email),
                             updated_at = excluded.updated_at
                         WHERE (excluded.display_name IS NOT NULL AND users.display_name IS DISTINCT FROM excluded.display_name)
                            OR (excluded.email IS NOT NULL AND users.email IS DISTINCT FROM excluded.email)",
                    )
                    .bind(&user.user_id)
                    .bind(&user.display_name)
                    .bind(&user.email)
                    .bind(&timestamp)
                    .execute(&mut *tx)
                    .await?;
                    cache.users.insert(user.user_id);
                }
                WriteOp::Shutdown(done) => {
                    let _ = done.send(());
                }
            }
        }
        delete_confirmed(&mut tx, confirmed).await?;
        insert_contacts(&mut tx, cache, pairs).await?;
        tx.commit().await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            for outcome in outcomes {
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
            let error = from_sqlx(error);
            tracing::error!(%error, "a write batch failed; nothing in it was stored");
            // The cache may name users or pairs whose insert was rolled back.
            *cache = WriterCache::default();
            for outcome in outcomes {
                match outcome {
                    Outcome::Message(reply, _) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    Outcome::Unit(reply) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            // Operations the failed transaction never reached fail the same way.
            for op in ops {
                match op {
                    WriteOp::Append(_, reply) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    WriteOp::Delivered { reply, .. } | WriteOp::UpsertUser(_, reply) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    WriteOp::Shutdown(done) => {
                        let _ = done.send(());
                    }
                }
            }
        }
    }
}

async fn append_one(
    tx: &mut PgConnection,
    cache: &mut WriterCache,
    pairs: &mut Vec<(String, String)>,
    message: NewMessage,
    timestamp: &str,
) -> Result<Result<Appended, StoreError>, sqlx::Error> {
    let msg_id = message.msg_id.as_ref().map(|v| v.to_string());
    let key = msg_id.as_deref().filter(|_| message.idempotent);
    if !cache.users.contains(&message.recipient) {
        let known = sqlx::query("SELECT 1 FROM users WHERE user_id = $1")
            .bind(&message.recipient)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !known {
            return Ok(Err(StoreError::UnknownRecipient(message.recipient)));
        }
        cache.users.insert(message.recipient.clone());
    }
    if let Some(key) = key {
        if let Some(first) = claim_msg_id(tx, &message.sender, key).await? {
            return Ok(first.and_then(|first| sent_again(first, &message)));
        }
    }
    // The message and its pending row in one round trip.
    let id: i64 = sqlx::query(
        "WITH m AS (
             INSERT INTO messages (sender, sender_display_name, recipient, message, timestamp, client_msg_id)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id)
         INSERT INTO pending (recipient, message_id) SELECT $3, id FROM m RETURNING message_id",
    )
    .bind(&*message.sender)
    .bind(&*message.sender_display_name)
    .bind(&message.recipient)
    .bind(&message.message)
    .bind(timestamp)
    .bind(&msg_id)
    .fetch_one(&mut *tx)
    .await?
    .get(0);
    let pair = (message.sender.to_string(), message.recipient.clone());
    if !cache.contacts.contains(&pair) {
        pairs.push(pair);
    }
    if let Some(key) = key {
        sqlx::query("UPDATE sent_msg_ids SET message_id = $3 WHERE sender = $1 AND msg_id = $2")
            .bind(&*message.sender)
            .bind(key)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    Ok(Ok(Appended::New(Receipt { id, timestamp: timestamp.to_string() })))
}

/// Deletes the `pending` rows of a batch's confirmations, recipient by recipient in key order
/// and each recipient's ids ascending, so that two nodes confirming the same messages (one
/// user's devices on both) take the rows' locks in one order and wait instead of deadlocking.
/// A confirmation can only follow its message's commit, so none is of an append of its batch.
async fn delete_confirmed(
    tx: &mut PgConnection,
    confirmed: BTreeMap<String, Vec<i64>>,
) -> Result<(), sqlx::Error> {
    for (recipient, mut ids) in confirmed {
        ids.sort_unstable();
        ids.dedup();
        sqlx::query(
            "DELETE FROM pending WHERE (recipient, message_id) IN
                 (SELECT recipient, message_id FROM pending
                  WHERE recipient = $1 AND message_id = ANY($2) ORDER BY message_id FOR UPDATE)",
        )
        .bind(&recipient)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Records the batch's new conversation pairs, both ways, in key order (see `commit_batch`).
async fn insert_contacts(
    tx: &mut PgConnection,
    cache: &mut WriterCache,
    pairs: Vec<(String, String)>,
) -> Result<(), sqlx::Error> {
    if pairs.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<(&str, &str)> =
        pairs.iter().flat_map(|(a, b)| [(a.as_str(), b.as_str()), (b.as_str(), a.as_str())]).collect();
    rows.sort_unstable();
    rows.dedup();
    let (users, partners): (Vec<&str>, Vec<&str>) = rows.into_iter().unzip();
    // Rows go in in the arrays' order (`unnest` yields them in order).
    sqlx::query(
        "INSERT INTO contacts (user_id, partner_id) SELECT * FROM unnest($1::text[], $2::text[])
         ON CONFLICT DO NOTHING",
    )
    .bind(&users)
    .bind(&partners)
    .execute(&mut *tx)
    .await?;
    // Rolled back with the batch if it fails: the cache is emptied then.
    cache.contacts.extend(pairs);
    Ok(())
}

/// The msg_ids a batch will claim, as the transaction-scoped advisory locks that guard them,
/// sorted.
///
/// Two nodes whose batches hold one sender's msg_ids in opposite orders (a client that resent
/// on a new connection to another node while its old one's batch was uncommitted) would each
/// claim one row and wait for the other's: PostgreSQL finds the deadlock after a second and
/// aborts a batch, refusing every message in it. Taking the locks first, in one order on every
/// node, makes the second batch wait for the first's commit instead, and then find its claims.
/// A lock is a sender's msg_id's `fingerprint` split in two halves (the two-key form: the
/// migration's one-key lock is another space); two msg_ids with one fingerprint only wait.
struct MsgIdClaims {
    high: Vec<i32>,
    low: Vec<i32>,
}

impl MsgIdClaims {
    fn of(work: &[WriteOp]) -> MsgIdClaims {
        let mut keys: Vec<u64> = work
            .iter()
            .filter_map(|op| match op {
                WriteOp::Append(message, _) if message.idempotent => {
                    message.msg_id.as_ref().map(|msg_id| fingerprint(&message.sender, &msg_id.to_string()))
                }
                _ => None,
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let (high, low) = keys.iter().map(|&key| ((key >> 32) as u32 as i32, key as u32 as i32)).unzip();
        MsgIdClaims { high, low }
    }

    /// Takes the locks in order (`unnest` yields the arrays' elements in order).
    async fn lock(&self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.high.is_empty() {
            return Ok(());
        }
        sqlx::query("SELECT pg_advisory_xact_lock(h, l) FROM unnest($1::int4[], $2::int4[]) AS t(h, l)")
            .bind(&self.high)
            .bind(&self.low)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// Claims a sender's `msg_id` for the message about to be stored (its row says message 0 until
/// the message has its id), or finds the message it already names: `Some` of that message.
///
/// Claiming first makes it exact across nodes: a node whose batch holds the same msg_id
/// uncommitted makes this insert wait for that commit (PostgreSQL waits on the conflicting
/// row), and then it names that message. A row past the window is taken over.
async fn claim_msg_id(
    tx: &mut PgConnection,
    sender: &str,
    key: &str,
) -> Result<Option<Result<StoredMessage, StoreError>>, sqlx::Error> {
    let claimed = sqlx::query(
        "INSERT INTO sent_msg_ids (sender, msg_id, message_id, created_at) VALUES ($1, $2, 0, $3)
         ON CONFLICT (sender, msg_id) DO UPDATE SET message_id = 0, created_at = excluded.created_at
             WHERE sent_msg_ids.created_at < $4
         RETURNING 1",
    )
    .bind(sender)
    .bind(key)
    .bind(unix_now())
    .bind(remembered_since())
    .fetch_optional(&mut *tx)
    .await?
    .is_some();
    if claimed {
        return Ok(None);
    }
    let first = sqlx::query(
        "SELECT m.id, m.sender, m.sender_display_name, m.recipient, m.message, m.timestamp, m.client_msg_id
         FROM sent_msg_ids s JOIN messages m ON m.id = s.message_id
         WHERE s.sender = $1 AND s.msg_id = $2",
    )
    .bind(sender)
    .bind(key)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(Some(match first {
        Some(row) => Ok(MessageRow::from_row(&row).map(StoredMessage::from)?),
        // A committed row always names a stored message (messages are never deleted).
        None => Err(StoreError::Database(format!("msg_id {key} names no stored message"))),
    }))
}
