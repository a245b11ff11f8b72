//! The store's contract, checked directly: what every `Store` implementation must do.

use privora::store::postgres::PostgresStore;
use privora::store::sqlite::{IndexPolicy, SqliteStore};
use privora::store::writer::WriteOp;
use privora::store::{Appended, NewMessage, Receipt, Store, StoreError, StoredMessage, UserRecord};
use privora_protocol::Contact;
use serde_json::json;

async fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db"), 2).await.unwrap();
    (dir, store)
}

/// A SQLite store that folds its tail into the indexes once it holds `rows` messages, two
/// messages per fold (and never on a timer).
async fn sqlite_folding_every(rows: i64) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open_with(&dir.path().join("store.db"), 2, sqlite_policy(rows)).await.unwrap();
    (dir, store)
}

/// The fold policy of `sqlite_folding_every`.
fn sqlite_policy(rows: i64) -> IndexPolicy {
    IndexPolicy {
        rows,
        chunk: 2,
        idle_rate: f64::INFINITY,
        idle_chunk: 2,
        interval: std::time::Duration::from_secs(3600),
        compact_messages: i64::MAX,
        compact_folds: 1,
    }
}

/// A PostgreSQL store on a fresh schema of the test database.
async fn postgres() -> PostgresStore {
    PostgresStore::open(&crate::support::cluster::pg_schema_url().await, 4).await.unwrap()
}

fn user(id: &str, name: Option<&str>) -> UserRecord {
    UserRecord { user_id: id.into(), display_name: name.map(str::to_string), email: None }
}

fn message(from: &str, to: &str, text: &str) -> NewMessage {
    NewMessage {
        sender: from.into(),
        sender_display_name: from.to_uppercase().into(),
        recipient: to.into(),
        message: text.into(),
        msg_id: None,
        idempotent: false,
    }
}

async fn conformance(store: &dyn Store) {
    for (id, name) in [("a", Some("Ann")), ("b", Some("Ben")), ("c", None)] {
        store.upsert_user(user(id, name)).await.unwrap();
    }
    // Unknown recipients are refused and nothing is stored.
    assert!(
        matches!(store.append(message("a", "zz", "x")).await, Err(StoreError::UnknownRecipient(r)) if r == "zz")
    );

    let first =
        store.append(NewMessage { msg_id: Some(json!("m-1")), ..message("a", "b", "one") }).await.unwrap();
    let second = store.append(message("c", "b", "two")).await.unwrap();
    let third = store.append(message("b", "a", "three")).await.unwrap();
    assert!(first.id < second.id && second.id < third.id);
    assert_eq!(first.msg_id, Some(json!("m-1")));
    assert!(chrono::DateTime::parse_from_rfc3339(&first.timestamp).is_ok());

    let pending = store.pending("b").await.unwrap();
    assert_eq!(pending, vec![first.clone(), second.clone()]);
    store.mark_delivered("b", vec![first.id]).await.unwrap();
    assert_eq!(store.pending("b").await.unwrap(), vec![second.clone()]);
    // Marking twice, or someone else's message, changes nothing.
    store.mark_delivered("b", vec![first.id]).await.unwrap();
    store.mark_delivered("c", vec![second.id]).await.unwrap();
    assert_eq!(store.pending("b").await.unwrap(), vec![second.clone()]);

    let history: Vec<i64> = store.history("b", 10).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(history, vec![first.id, second.id, third.id]);
    let latest: Vec<i64> = store.history("b", 1).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(latest, vec![second.id, third.id], "the latest one plus the pending one");
    let none_but_pending: Vec<i64> = store.history("b", 0).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(none_but_pending, vec![second.id]);
    let ids = |messages: Vec<StoredMessage>| messages.iter().map(|m| m.id).collect::<Vec<i64>>();
    assert_eq!(ids(store.latest("b", 10).await.unwrap()), vec![first.id, second.id, third.id]);
    assert_eq!(ids(store.latest("b", 1).await.unwrap()), vec![third.id], "pending or not, only the latest");
    assert_eq!(ids(store.latest("a", 1).await.unwrap()), vec![third.id]);
    assert!(store.latest("b", 0).await.unwrap().is_empty());

    assert_eq!(
        store.contacts("b").await.unwrap(),
        vec![
            Contact { user_id: "a".into(), display_name: "Ann".into() },
            Contact { user_id: "c".into(), display_name: "c".into() },
        ]
    );
    assert_eq!(
        store.contacts("a").await.unwrap(),
        vec![Contact { user_id: "b".into(), display_name: "Ben".into() }]
    );

    store.upsert_user(user("b", Some("Benjamin"))).await.unwrap();
    // A login whose token has no name keeps the known one.
    store.upsert_user(user("b", None)).await.unwrap();
    assert_eq!(store.display_name("b").await.unwrap().as_deref(), Some("Benjamin"));
    assert_eq!(store.display_name("c").await.unwrap(), None);
    assert_eq!(store.display_name("nobody").await.unwrap(), None);
    let found = store.search_users("JAM", 10).await.unwrap();
    assert_eq!(found, vec![Contact { user_id: "b".into(), display_name: "Benjamin".into() }]);
    assert!(store.search_users("Ben ", 10).await.unwrap().len() == 1);
    assert!(store.search_users("xyz", 10).await.unwrap().is_empty());
    // Long queries: a name that has the query's pieces but not the query is not found.
    store.upsert_user(user("d", Some("Jamie Benmin"))).await.unwrap();
    store.upsert_user(user("e", Some("EMILE Dubois"))).await.unwrap();
    let found = store.search_users("benjamin", 10).await.unwrap();
    assert_eq!(found, vec![Contact { user_id: "b".into(), display_name: "Benjamin".into() }]);
    let found = store.search_users("Emile dub", 10).await.unwrap();
    assert_eq!(found, vec![Contact { user_id: "e".into(), display_name: "EMILE Dubois".into() }]);
    assert!(store.search_users("benjamins", 10).await.unwrap().is_empty());

    // One confirmation of several messages (with the folding stores, some folded and some still
    // in the tail), among them one the confirming user did not receive: only its own settle.
    let mut more = Vec::new();
    for i in 0..3 {
        more.push(store.append(message("c", "b", &format!("more {i}"))).await.unwrap());
    }
    let to_a = store.append(message("b", "a", "to a")).await.unwrap();
    store.mark_delivered("b", vec![second.id, more[0].id, more[2].id, to_a.id]).await.unwrap();
    assert_eq!(ids(store.pending("b").await.unwrap()), vec![more[1].id]);
    assert_eq!(ids(store.pending("a").await.unwrap()), vec![third.id, to_a.id]);

    // Idempotent messages: a sender's msg_id names one message. Sent again, in the same batch or
    // later, it is that message; under a used msg_id another message is refused; another
    // sender's msg_id, a number for a string, or a message that is not idempotent, is new.
    let idempotent = |from: &str, to: &str, text: &str, msg_id: serde_json::Value| NewMessage {
        msg_id: Some(msg_id),
        idempotent: true,
        ..message(from, to, text)
    };
    // Queues the message and gives back its commit, to be awaited later (or not yet).
    #[allow(clippy::async_yields_async)]
    let append = |message: NewMessage| async move { store.writes().queue_append(message).await.unwrap() };
    let (once, twice) = (
        append(idempotent("a", "b", "hi", json!("k"))).await,
        append(idempotent("a", "b", "hi", json!("k"))).await,
    );
    let Ok(Appended::New(stored)) = once.await else { panic!("stored the first time") };
    assert_eq!(
        twice.await.unwrap(),
        Appended::Again(stored.clone()),
        "queued before the first was committed"
    );
    assert_eq!(
        append(idempotent("a", "b", "hi", json!("k"))).await.await.unwrap(),
        Appended::Again(stored.clone())
    );
    for reused in [idempotent("a", "b", "other", json!("k")), idempotent("a", "c", "hi", json!("k"))] {
        assert!(matches!(append(reused).await.await, Err(StoreError::MsgIdReused(id)) if id == "\"k\""));
    }
    for new in [
        idempotent("c", "b", "hi", json!("k")),
        idempotent("a", "b", "hi", json!(1)),
        idempotent("a", "b", "hi", json!("1")),
        NewMessage { msg_id: Some(json!("k")), ..message("a", "b", "hi") },
    ] {
        assert!(matches!(append(new).await.await, Ok(Appended::New(m)) if m.id > stored.id));
    }
    let pending = store.pending("b").await.unwrap();
    assert_eq!(pending.iter().filter(|m| m.id == stored.id).count(), 1);
    assert_eq!(pending.iter().filter(|m| m.id > stored.id).count(), 4);

    store.check().await.unwrap();
    store.close().await;
    assert!(matches!(store.append(message("a", "b", "late")).await, Err(StoreError::Closed)));
}

#[tokio::test]
async fn sqlite_store_conformance() {
    let (_dir, store) = sqlite().await;
    conformance(&store).await;
}

/// SQLite folds case beyond ASCII (PostgreSQL does so as its database's locale says).
#[tokio::test]
async fn sqlite_search_folds_case_beyond_ascii_in_short_and_long_queries() {
    let (_dir, store) = sqlite().await;
    store.upsert_user(user("e", Some("ÉLODIE Dubois"))).await.unwrap();
    let elodie = vec![Contact { user_id: "e".into(), display_name: "ÉLODIE Dubois".into() }];
    assert_eq!(store.search_users("élodie", 10).await.unwrap(), elodie);
    assert_eq!(store.search_users("élodie dub", 10).await.unwrap(), elodie);
    assert!(store.search_users("élodie dup", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_store_conformance_when_every_batch_is_folded() {
    let (_dir, store) = sqlite_folding_every(1).await;
    conformance(&store).await;
}

/// Two messages are folded, the third is in the tail: a confirmation lands on each side.
#[tokio::test]
async fn sqlite_store_conformance_with_part_of_the_messages_folded() {
    let (_dir, store) = sqlite_folding_every(2).await;
    conformance(&store).await;
}

/// Every message folded, and the folds' rows left waiting in `fold_rows` (never compacted).
#[tokio::test]
async fn sqlite_store_conformance_with_the_folds_rows_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let policy = IndexPolicy { compact_folds: usize::MAX, ..sqlite_policy(1) };
    let store = SqliteStore::open_with(&dir.path().join("store.db"), 2, policy).await.unwrap();
    conformance(&store).await;
}

/// A compaction starts once the waiting folds cover `compact_messages` messages, however few
/// folds that is.
/// The SQLite writer looks msg_ids up in memory (store/msg_ids.rs); a restart reads them back,
/// whether or not their messages were folded into the indexes yet.
#[tokio::test]
async fn sqlite_remembers_msg_ids_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let never = IndexPolicy {
        rows: i64::MAX,
        idle_rate: 0.0,
        interval: std::time::Duration::from_secs(3600),
        ..sqlite_policy(i64::MAX)
    };
    let hello = NewMessage { msg_id: Some(json!("k")), idempotent: true, ..message("a", "b", "hello") };
    let store = SqliteStore::open_with(&path, 2, never).await.unwrap();
    store.upsert_user(user("a", None)).await.unwrap();
    store.upsert_user(user("b", None)).await.unwrap();
    let first = store.append(hello.clone()).await.unwrap();
    store.close().await;

    let store = SqliteStore::open_with(&path, 2, never).await.unwrap();
    let again = store.writes().queue_append(hello).await.unwrap().await.unwrap();
    assert_eq!(again, Appended::Again(Receipt::from(&first)));
    store.close().await;
}

#[tokio::test]
async fn sqlite_compaction_starts_once_the_waiting_folds_cover_enough_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let policy = IndexPolicy { compact_messages: 6, compact_folds: usize::MAX, ..sqlite_policy(2) };
    let store = SqliteStore::open_with(&path, 2, policy).await.unwrap();
    for name in ["a", "b"] {
        store.upsert_user(user(name, None)).await.unwrap();
    }
    let waiting = || {
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
            .query_row("SELECT count(*) FROM fold_rows", [], |row| row.get::<_, i64>(0))
            .unwrap()
    };
    let mut rows = Vec::new();
    for _ in 0..6 {
        append_and_fold(&store, "a", "b").await;
        rows.push(waiting());
    }
    // A fold of two messages every second message gives a and b a row each; the third fold
    // brings the waiting messages to six, and the rows move into the chunks.
    assert_eq!(rows, [0, 2, 2, 4, 4, 0]);
    assert_eq!(store.latest("a", 10).await.unwrap().len(), 6);
    store.close().await;
}

/// Folds of two messages whose rows wait in `fold_rows` until three folds are there: the latest
/// messages and the contacts read the same whether an id is in the tail, in a fold's row or in
/// a chunk; and a compaction cut short (a user's rows moved into a chunk but not yet deleted)
/// duplicates nothing, neither in reads nor when it is done again.
#[tokio::test]
async fn sqlite_reads_agree_across_the_tail_the_fold_rows_and_the_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let policy = |compact_folds| IndexPolicy { compact_folds, ..sqlite_policy(2) };
    let store = SqliteStore::open_with(&path, 2, policy(3)).await.unwrap();
    let names = ["a", "b", "c", "d", "e"];
    for name in names {
        store.upsert_user(user(name, None)).await.unwrap();
    }
    // (id, sender, recipient) of every message; d writes to nobody but e, c hears from a only.
    // 32 folds and one message in the tail: the last two folds' rows wait.
    let mut sent: Vec<(i64, &str, &str)> = Vec::new();
    for i in 0..65 {
        let (from, to) = match i % 4 {
            0 => ("a", "b"),
            1 => ("b", if i % 3 == 0 { "a" } else { "e" }),
            2 => ("d", "e"),
            _ => ("a", if i % 5 == 0 { "c" } else { "e" }),
        };
        sent.push((store.append(message(from, to, &i.to_string())).await.unwrap().id, from, to));
    }
    let check = |store: SqliteStore, sent: Vec<(i64, &'static str, &'static str)>| async move {
        for name in names {
            let mine: Vec<i64> = sent.iter().filter(|m| m.1 == name || m.2 == name).map(|m| m.0).collect();
            for n in [1, 2, 3, 5, 8, 13, 30, 100] {
                let latest: Vec<i64> = store.latest(name, n).await.unwrap().iter().map(|m| m.id).collect();
                assert_eq!(latest, mine[mine.len().saturating_sub(n as usize)..], "latest {n} of {name}");
            }
            let mut partners: Vec<&str> = sent
                .iter()
                .filter_map(|m| {
                    if m.1 == name {
                        Some(m.2)
                    } else if m.2 == name {
                        Some(m.1)
                    } else {
                        None
                    }
                })
                .collect();
            partners.sort_unstable();
            partners.dedup();
            assert_eq!(contact_ids(&store, name).await, partners, "contacts of {name}");
        }
        store
    };
    let store = check(store, sent.clone()).await;
    let rw = rusqlite::Connection::open(&path).unwrap();
    let count = |sql: &str| rw.query_row(sql, [], |row| row.get::<_, i64>(0)).unwrap();
    assert!(count("SELECT count(*) FROM fold_rows") > 0, "some folds' rows are waiting");
    assert!(count("SELECT count(*) FROM timeline_chunks") > 0, "some were moved into chunks");
    store.close().await;

    // A compaction cut short: a's waiting ids moved into a chunk, the rows still there.
    let ids: Vec<i64> = rw
        .prepare("SELECT ids FROM fold_rows WHERE user_id = 'a' ORDER BY fold")
        .unwrap()
        .query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .flat_map(|ids| serde_json::from_str::<Vec<i64>>(&ids.unwrap()).unwrap())
        .collect();
    assert!(!ids.is_empty());
    rw.execute(
        "INSERT INTO timeline_chunks (user_id, last_id, ids) VALUES ('a', ?1, ?2)",
        rusqlite::params![ids[ids.len() - 1], serde_json::to_string(&ids).unwrap()],
    )
    .unwrap();
    let store = SqliteStore::open_with(&path, 2, policy(usize::MAX)).await.unwrap();
    let store = check(store, sent.clone()).await;
    store.close().await;

    // Done again (the writer compacts what waits as it starts): nothing is duplicated.
    let store = SqliteStore::open_with(&path, 2, policy(1)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count("SELECT count(*) FROM fold_rows") > 0 {
        assert!(std::time::Instant::now() < deadline, "the waiting rows were never moved");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        count("SELECT sum(json_array_length(ids)) FROM timeline_chunks WHERE user_id = 'a'"),
        count(
            "SELECT count(DISTINCT j.value) FROM timeline_chunks c, json_each(c.ids) j WHERE c.user_id = 'a'"
        ),
        "no id of a's is in two chunks"
    );
    check(store, sent).await.close().await;
}

#[tokio::test]
async fn a_tail_left_at_a_stop_is_folded_at_the_next_open() {
    let (dir, store) = sqlite_folding_every(i64::MAX).await;
    for id in ["a", "b", "c"] {
        store.upsert_user(user(id, None)).await.unwrap();
    }
    let first = store.append(message("a", "b", "one")).await.unwrap();
    let second = store.append(message("c", "b", "two")).await.unwrap();
    let third = store.append(message("b", "a", "three")).await.unwrap();
    store.mark_delivered("b", vec![first.id]).await.unwrap();
    assert_eq!(store.pending_count().await.unwrap(), Some(2));
    store.close().await;

    let store = SqliteStore::open(&dir.path().join("store.db"), 2).await.unwrap();
    assert_eq!(store.pending("b").await.unwrap(), vec![second.clone()]);
    assert_eq!(store.pending("a").await.unwrap(), vec![third.clone()]);
    assert_eq!(store.pending_count().await.unwrap(), Some(2));
    let history: Vec<i64> = store.history("b", 10).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(history, vec![first.id, second.id, third.id]);
    let partners: Vec<String> = store.contacts("b").await.unwrap().into_iter().map(|c| c.user_id).collect();
    assert_eq!(partners, vec!["a", "c"]);
    // New messages after the fold continue the ids, and confirmations of folded ones count.
    let fourth = store.append(message("a", "b", "four")).await.unwrap();
    assert!(fourth.id > third.id);
    store.mark_delivered("b", vec![second.id]).await.unwrap();
    assert_eq!(store.pending("b").await.unwrap(), vec![fourth]);
    store.close().await;
}

#[tokio::test]
async fn a_tail_left_after_a_burst_is_folded_once_the_writer_is_idle() {
    // Never folded by size or by the rate after a write: only a quiet queue can fold it.
    let dir = tempfile::tempdir().unwrap();
    let policy = IndexPolicy {
        rows: i64::MAX,
        chunk: 2,
        idle_rate: 0.0,
        idle_chunk: 2,
        interval: std::time::Duration::from_millis(200),
        compact_messages: i64::MAX,
        compact_folds: 1,
    };
    let path = dir.path().join("store.db");
    let store = SqliteStore::open_with(&path, 2, policy).await.unwrap();
    for id in ["a", "b"] {
        store.upsert_user(user(id, None)).await.unwrap();
    }
    let mut last = 0;
    for i in 0..5 {
        last = store.append(message("a", "b", &i.to_string())).await.unwrap().id;
    }
    // Nothing more is written: the writer folds the tail by itself, two messages at a time.
    let reader = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display())).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let folded: i64 =
            sqlx::query_scalar("SELECT indexed_upto FROM index_state").fetch_one(&reader).await.unwrap();
        if folded == last {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the tail is still unfolded: {folded} of {last}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let pending: Vec<String> = store.pending("b").await.unwrap().into_iter().map(|m| m.message).collect();
    assert_eq!(pending, ["0", "1", "2", "3", "4"], "and the folded messages are still pending, in order");
    store.close().await;
}

/// The log is copied into the database file by the checkpoint thread, well before the writer's
/// own checkpoint (at 8192 log pages) would: the file grows while nothing else is written, and
/// the messages read the same afterwards.
#[tokio::test]
async fn the_log_is_copied_into_the_database_file_in_the_background() {
    let (dir, store) = sqlite().await;
    for id in ["a", "b"] {
        store.upsert_user(user(id, None)).await.unwrap();
    }
    let path = dir.path().join("store.db");
    let size = || std::fs::metadata(&path).unwrap().len();
    let before = size();
    // About 300 pages of messages: far fewer than the writer's checkpoint waits for.
    let text = "x".repeat(4000);
    for _ in 0..300 {
        store.append(message("a", "b", &text)).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size() < before + 300 * 4000 {
        assert!(std::time::Instant::now() < deadline, "the database file is still {} bytes", size());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(store.pending("b").await.unwrap().len(), 300);
    store.close().await;
}

/// A fold gives each user one timeline chunk (several once it holds over 256 ids); the latest
/// messages come from the chunks newest first, cut at any point, with the tail's on top.
#[tokio::test]
async fn sqlite_latest_walks_the_timeline_chunks_and_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let policy = IndexPolicy {
        rows: 600,
        chunk: 600,
        idle_rate: f64::INFINITY,
        idle_chunk: 600,
        interval: std::time::Duration::from_secs(3600),
        compact_messages: i64::MAX,
        compact_folds: 1,
    };
    let store = SqliteStore::open_with(&path, 2, policy).await.unwrap();
    for id in ["a", "b", "c"] {
        store.upsert_user(user(id, None)).await.unwrap();
    }
    // b is in every message (600 in the fold: three chunks), a and c in every other one.
    let (mut of_a, mut of_b) = (Vec::new(), Vec::new());
    for i in 0..700 {
        let (from, to) = if i % 2 == 0 { ("a", "b") } else { ("b", "c") };
        let id = store.append(message(from, to, &i.to_string())).await.unwrap().id;
        of_b.push(id);
        if from == "a" {
            of_a.push(id);
        }
    }
    let last = |ids: &[i64], n: usize| ids[ids.len().saturating_sub(n)..].to_vec();
    let ids = |messages: Vec<StoredMessage>| messages.iter().map(|m| m.id).collect::<Vec<i64>>();
    let check = |store: SqliteStore| async {
        for n in [0, 1, 50, 100, 101, 256, 300, 357, 600, 699, 700, 800] {
            assert_eq!(ids(store.latest("b", n as u32).await.unwrap()), last(&of_b, n), "latest {n} of b");
        }
        for n in [1, 44, 45, 300, 350, 351] {
            assert_eq!(ids(store.latest("a", n as u32).await.unwrap()), last(&of_a, n), "latest {n} of a");
        }
        store
    };
    let store = check(store).await;
    let chunks: Vec<(String, i64)> = sqlx::query_as(
        "SELECT user_id, json_array_length(ids) FROM timeline_chunks ORDER BY user_id, last_id",
    )
    .fetch_all(&sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display())).await.unwrap())
    .await
    .unwrap();
    let b: Vec<i64> = chunks.iter().filter(|(u, _)| u == "b").map(|(_, n)| *n).collect();
    assert_eq!(b, [256, 256, 88], "b's 600 folded messages, in chunks of at most 256");
    store.close().await;
    // Reopened, the tail is folded too; nothing changes for the reader.
    let store = SqliteStore::open_with(&path, 2, policy).await.unwrap();
    check(store).await.close().await;
}

/// Migration 0003 turns the timeline's rows into chunks of at most 256 ids, in order.
#[test]
fn migration_0003_turns_timeline_rows_into_chunks() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    conn.execute_batch(
        "CREATE TABLE timeline (user_id TEXT NOT NULL, message_id INTEGER NOT NULL,
                                PRIMARY KEY (user_id, message_id)) WITHOUT ROWID;",
    )
    .unwrap();
    // Inserted out of order on purpose.
    for id in (1..=600).rev() {
        conn.execute("INSERT INTO timeline VALUES ('u', ?1)", [id * 2]).unwrap();
    }
    conn.execute_batch("INSERT INTO timeline VALUES ('v', 7), ('v', 3), ('v', 5);").unwrap();
    conn.execute_batch(include_str!("../../../../migrations/sqlite/0003_timeline_chunks.sql")).unwrap();
    let mut select =
        conn.prepare("SELECT user_id, last_id, ids FROM timeline_chunks ORDER BY user_id, last_id").unwrap();
    let chunks: Vec<(String, i64, Vec<i64>)> = select
        .query_map([], |row| {
            let ids: String = row.get(2)?;
            Ok((row.get(0)?, row.get(1)?, serde_json::from_str(&ids).unwrap()))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let u: Vec<i64> = (1..=600).map(|i| i * 2).collect();
    assert_eq!(
        chunks,
        vec![
            ("u".to_string(), 512, u[..256].to_vec()),
            ("u".to_string(), 1024, u[256..512].to_vec()),
            ("u".to_string(), 1200, u[512..].to_vec()),
            ("v".to_string(), 7, vec![3, 5, 7]),
        ]
    );
    let old: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'timeline'", [], |row| row.get(0))
        .unwrap();
    assert_eq!(old, 0, "the old table is gone");
}

/// Every fold gives a user one contact chunk; past 16 the writer merges them into one, and the
/// contacts read is the same before and after.
#[tokio::test]
async fn sqlite_contact_chunks_are_merged_and_read_the_same() {
    let (dir, store) = sqlite_folding_every(1).await;
    store.upsert_user(user("hub", Some("Hub"))).await.unwrap();
    let partners: Vec<String> = (0..40).map(|i| format!("p{i:02}")).collect();
    for partner in &partners {
        store.upsert_user(user(partner, None)).await.unwrap();
    }
    let chunks_of = |user: &'static str| contact_chunks_of(&dir, user);
    let mut most = 0;
    // Each message is a fold of its own (and twice over with p00, a repeat).
    for (i, partner) in partners.iter().enumerate() {
        let (from, to) = if i % 2 == 0 { ("hub", partner.as_str()) } else { (partner.as_str(), "hub") };
        store.append(message(from, to, "hi")).await.unwrap();
        store.append(message("p00", "hub", "again")).await.unwrap();
        assert_eq!(contact_ids(&store, "hub").await, partners[..=i], "after {} partners", i + 1);
        most = most.max(chunks_of("hub").await);
    }
    assert!(most <= 17, "the hub's chunks were merged (at most {most})");
    assert!(chunks_of("hub").await < 40);
    assert_eq!(contact_ids(&store, "p07").await, ["hub"]);
    store.close().await;
    // A new writer (counts forgotten) goes on from what the table holds.
    let store = SqliteStore::open_with(&dir.path().join("store.db"), 2, sqlite_policy(1)).await.unwrap();
    for _ in 0..20 {
        store.append(message("hub", "p39", "more")).await.unwrap();
    }
    assert!(chunks_of("hub").await <= 17);
    assert_eq!(contact_ids(&store, "hub").await, partners);
    store.close().await;
}

/// A fold writes a contacts chunk for a user only when it holds a partner not recorded yet; a
/// new writer, which knows none, records them again, and each is still listed once.
#[tokio::test]
async fn sqlite_a_fold_records_only_new_conversation_pairs() {
    let (dir, store) = sqlite_folding_every(1).await;
    for name in ["alice", "bob", "carol"] {
        store.upsert_user(user(name, None)).await.unwrap();
    }
    append_and_fold(&store, "alice", "bob").await;
    assert_eq!((contact_chunks_of(&dir, "alice").await, contact_chunks_of(&dir, "bob").await), (1, 1));
    // Each of these is a fold of its own, with nobody new in it.
    for (from, to) in [("alice", "bob"), ("bob", "alice"), ("alice", "bob"), ("bob", "alice")] {
        append_and_fold(&store, from, to).await;
    }
    assert_eq!((contact_chunks_of(&dir, "alice").await, contact_chunks_of(&dir, "bob").await), (1, 1));
    append_and_fold(&store, "alice", "carol").await;
    assert_eq!(contact_chunks_of(&dir, "alice").await, 2);
    assert_eq!(contact_chunks_of(&dir, "bob").await, 1);
    assert_eq!(contact_ids(&store, "alice").await, ["bob", "carol"]);
    assert_eq!(contact_ids(&store, "carol").await, ["alice"]);
    store.close().await;

    let store = SqliteStore::open_with(&dir.path().join("store.db"), 2, sqlite_policy(1)).await.unwrap();
    append_and_fold(&store, "alice", "bob").await;
    assert_eq!(contact_chunks_of(&dir, "alice").await, 3, "a new writer records the pair again");
    assert_eq!(contact_ids(&store, "alice").await, ["bob", "carol"]);
    assert_eq!(contact_ids(&store, "bob").await, ["alice"]);
    store.close().await;
}

/// Appends a message from `from` to `to` with a store folding every message, and returns once
/// that fold is done: the writer folds after a batch and before it takes the next, so a write
/// queued after the append (the recipient's confirmation) returns only then.
async fn append_and_fold(store: &SqliteStore, from: &str, to: &str) {
    let stored = store.append(message(from, to, "hi")).await.unwrap();
    store.mark_delivered(to, vec![stored.id]).await.unwrap();
}

/// The ids `store` lists as `user`'s contacts.
async fn contact_ids(store: &dyn Store, user: &str) -> Vec<String> {
    store.contacts(user).await.unwrap().into_iter().map(|c| c.user_id).collect()
}

/// How many `contact_chunks` rows `user` has in the test store in `dir` (a read-only connection
/// beside the store's own).
async fn contact_chunks_of(dir: &tempfile::TempDir, user: &str) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        dir.path().join("store.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row("SELECT count(*) FROM contact_chunks WHERE user_id = ?1", [user], |row| row.get(0))
        .unwrap()
}

/// Migration 0004 turns the contacts' rows into one chunk per user, sorted.
#[test]
fn migration_0004_turns_contact_rows_into_chunks() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    conn.execute_batch(
        "CREATE TABLE contacts (user_id TEXT NOT NULL, partner_id TEXT NOT NULL,
                                PRIMARY KEY (user_id, partner_id)) WITHOUT ROWID;
         INSERT INTO contacts VALUES ('b', 'c'), ('a', 'c'), ('b', 'a'), ('a', 'b'), ('c', 'b'), ('c', 'a');",
    )
    .unwrap();
    conn.execute_batch(include_str!("../../../../migrations/sqlite/0004_contact_chunks.sql")).unwrap();
    let mut select =
        conn.prepare("SELECT user_id, last_id, partners FROM contact_chunks ORDER BY user_id").unwrap();
    let chunks: Vec<(String, i64, String)> = select
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        chunks,
        vec![
            ("a".to_string(), 0, r#"["b","c"]"#.to_string()),
            ("b".to_string(), 0, r#"["a","c"]"#.to_string()),
            ("c".to_string(), 0, r#"["a","b"]"#.to_string()),
        ]
    );
}

#[tokio::test]
async fn postgres_store_conformance() {
    conformance(&postgres().await).await;
}

#[tokio::test]
async fn concurrent_appends_are_all_committed_in_batches() {
    let (_dir, store) = sqlite().await;
    concurrent_appends(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn concurrent_appends_are_all_committed_while_the_tail_is_folded() {
    let (_dir, store) = sqlite_folding_every(100).await;
    concurrent_appends(std::sync::Arc::new(store)).await;
}

#[tokio::test]
async fn concurrent_appends_are_all_committed_in_batches_on_postgres() {
    concurrent_appends(std::sync::Arc::new(postgres().await)).await;
}

async fn concurrent_appends(store: std::sync::Arc<dyn Store>) {
    store.upsert_user(user("r", None)).await.unwrap();
    let mut tasks = Vec::new();
    for s in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                store.append(message(&format!("s{s}"), "r", &format!("{i}"))).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let pending = store.pending("r").await.unwrap();
    assert_eq!(pending.len(), 1000);
    let ids: std::collections::HashSet<i64> = pending.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 1000);
    store.close().await;
}

/// Two PostgreSQL stores on one fresh schema: two nodes of a cluster, as far as the store goes.
async fn two_postgres_nodes() -> [PostgresStore; 2] {
    let url = crate::support::cluster::pg_schema_url().await;
    [PostgresStore::open(&url, 4).await.unwrap(), PostgresStore::open(&url, 4).await.unwrap()]
}

/// Two nodes on one PostgreSQL take the same client's resent messages (one sender, the same
/// msg_ids) at once, in opposite orders, each node's in one batch. Their claims of the msg_ids
/// used to deadlock, and PostgreSQL aborted one batch; now neither is refused, and each msg_id
/// is exactly one message, the same one on both nodes. (A refusal would be `Unavailable`,
/// which a client with acks meets by sending again: the loop below does that, so a failure
/// shows the count rather than a lost message.)
#[tokio::test]
async fn postgres_nodes_taking_one_senders_msg_ids_in_opposite_orders_store_each_once() {
    let nodes = two_postgres_nodes().await;
    for id in ["s", "r"] {
        nodes[0].upsert_user(user(id, None)).await.unwrap();
    }
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let resent =
        |key: &str| NewMessage { msg_id: Some(json!(key)), idempotent: true, ..message("s", "r", key) };
    let mut ids: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut refused = 0;
    for round in 0..5 {
        // Everything queued before anything is awaited, so that each node's writer takes its
        // messages as one batch.
        let mut commits = Vec::new();
        for (node, order) in [(0, keys.clone()), (1, keys.iter().rev().cloned().collect())] {
            for key in order {
                commits.push((
                    node,
                    key.clone(),
                    nodes[node].writes().queue_append(resent(&key)).await.unwrap(),
                ));
            }
        }
        for (node, key, commit) in commits {
            let mut answer = commit.await;
            for _ in 0..10 {
                match answer {
                    Err(StoreError::Unavailable(_)) => {
                        refused += 1;
                        let again = nodes[node].writes().queue_append(resent(&key)).await.unwrap();
                        answer = again.await;
                    }
                    _ => break,
                }
            }
            let id = match answer {
                Ok(appended) => appended.receipt().id,
                other => panic!("round {round}: {key} on node {node}: {other:?}"),
            };
            assert_eq!(*ids.entry(key.clone()).or_insert(id), id, "{key} is one message on both nodes");
        }
    }
    // Without the claims' locks taken in one order, a batch was aborted as a deadlock in every
    // round (200 refusals in five rounds, three runs of three).
    assert_eq!(refused, 0, "no batch is refused: the nodes' claims wait for each other");
    let pending = nodes[1].pending("r").await.unwrap();
    assert_eq!(
        pending.len(),
        keys.len(),
        "one message per msg_id ({refused} appends refused and sent again)"
    );
    let mut texts: Vec<String> = pending.into_iter().map(|m| m.message).collect();
    texts.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(texts, expected);
    for node in &nodes {
        node.close().await;
    }
}

/// Two nodes write the same rows in opposite orders at once, each node's operations as one
/// batch: both upsert the same users (new display names, so the rows change), and their
/// messages start the same conversations, one node's from the one side and in the reverse
/// order. Neither batch is refused (a deadlock made PostgreSQL abort one), and both sides of
/// every conversation are recorded.
#[tokio::test]
async fn postgres_nodes_writing_the_same_users_and_pairs_in_opposite_orders_are_not_refused() {
    let nodes = two_postgres_nodes().await;
    let people: Vec<String> = (0..40).map(|i| format!("p{i:02}")).collect();
    for person in &people {
        nodes[0].upsert_user(user(person, None)).await.unwrap();
    }
    let mut refused = Vec::new();
    for round in 0..3 {
        let pairs: Vec<(usize, usize)> = (0..20).map(|i| (i, 20 + (i + round) % 20)).collect();
        let (mut upserts, mut appends) = (Vec::new(), Vec::new());
        for (node, store) in nodes.iter().enumerate() {
            let mut names: Vec<&String> = people.iter().collect();
            let mut talks = pairs.clone();
            if node == 1 {
                names.reverse();
                talks.reverse();
            }
            let writes = store.writes();
            for person in names {
                let name = format!("round {round} node {node}");
                let record = user(person, Some(&name));
                upserts.push(writes.queue(|reply| WriteOp::UpsertUser(record, reply), None).await.unwrap());
            }
            for (a, b) in talks {
                let (from, to) = if node == 0 { (a, b) } else { (b, a) };
                appends.push(writes.queue_append(message(&people[from], &people[to], "hi")).await.unwrap());
            }
        }
        for upsert in upserts {
            if let Err(error) = upsert.await {
                refused.push(format!("round {round}: an upsert: {error}"));
            }
        }
        for append in appends {
            if let Err(error) = append.await {
                refused.push(format!("round {round}: an append: {error}"));
            }
        }
    }
    assert!(refused.is_empty(), "{} refused, first: {:?}", refused.len(), refused.first());
    let mut partners = contact_ids(&nodes[1], "p00").await;
    partners.sort();
    assert_eq!(partners, ["p20", "p21", "p22"], "each round's conversation, recorded once");
    for node in &nodes {
        node.close().await;
    }
}

/// One user's devices on two nodes confirm the same messages at once, each node's
/// confirmations of twenty conversations as one batch, in opposite orders (as happens when
/// other users' confirmations share the batches). Neither batch is refused (a deadlock made
/// PostgreSQL abort one, and its messages stayed pending), and nothing is left pending.
#[tokio::test]
async fn postgres_nodes_confirming_the_same_messages_in_opposite_orders_are_not_refused() {
    let nodes = two_postgres_nodes().await;
    let people: Vec<String> = (0..20).map(|i| format!("r{i:02}")).collect();
    nodes[0].upsert_user(user("s", None)).await.unwrap();
    for person in &people {
        nodes[0].upsert_user(user(person, None)).await.unwrap();
    }
    let mut refused = Vec::new();
    for round in 0..3 {
        let mut ids: Vec<(String, Vec<i64>)> = Vec::new();
        for person in &people {
            let mut theirs = Vec::new();
            for i in 0..10 {
                let stored = nodes[0].append(message("s", person, &format!("{round}.{i}"))).await.unwrap();
                theirs.push(stored.id);
            }
            ids.push((person.clone(), theirs));
        }
        let mut confirmations = Vec::new();
        for (node, store) in nodes.iter().enumerate() {
            let mut order = ids.clone();
            if node == 1 {
                order.reverse();
            }
            for (person, theirs) in order {
                confirmations.push(store.writes().queue_delivered(&person, theirs).await.unwrap());
            }
        }
        for confirmation in confirmations {
            if let Err(error) = confirmation.await {
                refused.push(format!("round {round}: {error}"));
            }
        }
    }
    assert!(refused.is_empty(), "{} refused, first: {:?}", refused.len(), refused.first());
    for person in &people {
        assert!(nodes[1].pending(person).await.unwrap().is_empty(), "{person} has nothing pending");
    }
    for node in &nodes {
        node.close().await;
    }
}
