//! Criterion benchmarks of the hot paths a message takes: decoding the client's frame, the
//! store's batched append (group commit on a real SQLite file), the hub's routing to a device
//! queue, and encoding the frame the recipient gets. End-to-end figures come from
//! `privora-bench` (crates/privora-bench); these isolate one step each.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::future::join_all;
use privora::hub::{Device, Hub, OutFrame};
use privora::store::sqlite::SqliteStore;
use privora::store::{NewMessage, Store, UserRecord};
use privora_protocol::{ClientFrame, LiveMessage, ServerFrame};
use tokio::sync::mpsc;

const CLIENT_FRAME: &str = r#"{"type":"message","to":"bob@example.com","message":"Hello Bob, are we still on for tomorrow at ten?","msg_id":"c0ffee-42"}"#;

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode client message", |b| {
        b.iter(|| ClientFrame::decode(std::hint::black_box(CLIENT_FRAME)))
    });
    let frame = ServerFrame::Message(LiveMessage {
        from: "alice@example.com".into(),
        from_display_name: "Alice".into(),
        to: "bob@example.com".into(),
        message: "Hello Bob, are we still on for tomorrow at ten?".into(),
        timestamp: "2026-11-26T09:40:17.123Z".into(),
        id: 123_456,
        msg_id: Some(serde_json::json!("c0ffee-42")),
    });
    group.bench_function("encode server message", |b| b.iter(|| std::hint::black_box(&frame).encode()));
    group.finish();
}

/// `batch` appends issued at once: the writer commits them in as few transactions as it can.
fn store_append(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = runtime.block_on(async {
        let store = SqliteStore::open(&dir.path().join("bench.db"), 2).await.expect("open store");
        for user in ["alice", "bob"] {
            let record = UserRecord { user_id: user.into(), display_name: None, email: None };
            store.upsert_user(record).await.expect("user");
        }
        store
    });
    let mut group = c.benchmark_group("store");
    for batch in [1usize, 64, 1024] {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("append, {batch} at once"), |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iterations {
                        let appends = (0..batch).map(|i| {
                            store.append(NewMessage {
                                sender: "alice".into(),
                                sender_display_name: "Alice".into(),
                                recipient: "bob".into(),
                                message: format!("message {i}"),
                                msg_id: None,
                                idempotent: false,
                            })
                        });
                        for result in join_all(appends).await {
                            result.expect("append");
                        }
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
    runtime.block_on(store.close());
}

fn hub_routing(c: &mut Criterion) {
    let hub = Hub::new();
    let mut receivers = Vec::new();
    for user in 0..10_000 {
        let (queue, rx) = mpsc::channel(1 << 16);
        let device = Device { conn: hub.next_conn_id(), queue, cut_off: Default::default() };
        hub.register(&format!("user{user}"), device);
        receivers.push(rx);
    }
    let frame = OutFrame { text: CLIENT_FRAME.into(), delivers: Some(1), committed: None };
    let targets: Vec<(String, usize)> =
        (0..1024).map(|i| (i * 7919) % 10_000).map(|u| (format!("user{u}"), u)).collect();
    let mut group = c.benchmark_group("hub");
    group.throughput(Throughput::Elements(1024));
    group.bench_function("route 1024 frames to online users", |b| {
        b.iter(|| {
            for (user, index) in &targets {
                hub.send(user, frame.clone());
                while receivers[*index].try_recv().is_ok() {}
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = frames, store_append, hub_routing
}
criterion_main!(benches);
