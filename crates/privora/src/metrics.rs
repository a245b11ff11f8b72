//! Prometheus metrics: every metric's name, labels and meaning live in this one module, so the
//! places that record are one line each (`metrics::message_in()`), and `/metrics` renders them.
//!
//! The recorder is process-wide (the `metrics` facade has one global recorder); it is installed
//! once, at the first server start, and shared by every server of the process (tests start
//! many). Gauges that describe the state of the world rather than events (pending messages,
//! online users) are read when Prometheus scrapes, not kept up to date on every change.
//!
//! Histograms are this module's own (`FixedHistogram`: fixed buckets in atomic counters),
//! rendered after the recorder's counters and gauges; see that type for why.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use privora_protocol::{Contact, ErrorCode};

use crate::server::AppState;
use crate::store::{Store, StoreError, StoredMessage, UserRecord, WriteQueue};

const CONNECTIONS: &str = "privora_connections";
const CONNECTIONS_TOTAL: &str = "privora_connections_total";
const LOGINS: &str = "privora_logins_total";
const MESSAGES_IN: &str = "privora_messages_in_total";
const MESSAGES_OUT: &str = "privora_messages_out_total";
const DELIVERY_LATENCY: &str = "privora_delivery_latency_seconds";
const STORE_LATENCY: &str = "privora_store_latency_seconds";
const STORE_QUEUE: &str = "privora_store_write_queue";
const OUTBOUND_QUEUE: &str = "privora_outbound_queue_depth";
const ERRORS: &str = "privora_errors_total";
const PENDING: &str = "privora_pending_messages";
const ONLINE_USERS: &str = "privora_online_users";

/// Seconds: from half a millisecond (a local group commit) to ten seconds (something is wrong).
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Frames waiting in one connection's outbound queue when its writer wakes up.
const QUEUE_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The hot metrics are kept in shards, one per thread (about: threads take the shards in
/// turn), each on cache lines of its own: every message updates half a dozen of them, and with
/// one shared atomic per counter or bucket, every update on one core took the line away from
/// the other. A scrape adds the shards up.
const SHARDS: usize = 8;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

fn shard() -> usize {
    SHARD.with(|shard| *shard)
}

/// An atomic on cache lines of its own.
#[repr(align(128))]
struct Padded(AtomicU64);

/// A counter recorded for every message (`privora_messages_in_total`, `..._out_total`).
struct ShardedCounter([Padded; SHARDS]);

impl ShardedCounter {
    fn increment(&self) {
        self.0[shard()].0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.iter().map(|cell| cell.0.load(Ordering::Relaxed)).sum()
    }
}

static MESSAGES_IN_COUNT: ShardedCounter = ShardedCounter([const { Padded(AtomicU64::new(0)) }; SHARDS]);
static MESSAGES_OUT_COUNT: ShardedCounter = ShardedCounter([const { Padded(AtomicU64::new(0)) }; SHARDS]);

/// A store operation, as `privora_store_latency_seconds` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Append,
    MarkDelivered,
    Pending,
    Latest,
    Contacts,
    UpsertUser,
    DisplayName,
    SearchUsers,
}

impl StoreOp {
    /// Every op, in declaration order (`op as usize` is its place here).
    const ALL: [StoreOp; 8] = [
        StoreOp::Append,
        StoreOp::MarkDelivered,
        StoreOp::Pending,
        StoreOp::Latest,
        StoreOp::Contacts,
        StoreOp::UpsertUser,
        StoreOp::DisplayName,
        StoreOp::SearchUsers,
    ];

    fn as_str(self) -> &'static str {
        match self {
            StoreOp::Append => "append",
            StoreOp::MarkDelivered => "mark_delivered",
            StoreOp::Pending => "pending",
            StoreOp::Latest => "latest",
            StoreOp::Contacts => "contacts",
            StoreOp::UpsertUser => "upsert_user",
            StoreOp::DisplayName => "display_name",
            StoreOp::SearchUsers => "search_users",
        }
    }
}

/// A Prometheus histogram with fixed buckets, counted in atomics (sharded, see `SHARDS`).
///
/// The exporter's histograms keep every sample in lock-free blocks of 64 until its upkeep
/// folds them, and allocate a block of over a kilobyte every 64 samples: past glibc's
/// per-thread cache, so `malloc` takes its slow path and first consolidates its free lists,
/// which sends the small allocations after it down the slow path too. Three samples a message
/// made that most of the tokio workers' allocator time (`perf`, session 13). Here recording
/// is a search of a dozen bounds and two atomic updates.
struct FixedHistogram {
    bounds: &'static [f64],
    shards: Box<[HistogramShard]>,
}

/// Most bounds a histogram has (the `+Inf` bucket comes after them).
const MAX_BOUNDS: usize = 15;

/// One shard of a histogram, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct HistogramShard {
    /// One per bound, then the `+Inf` bucket; not cumulative (summed when rendered).
    counts: [AtomicU64; MAX_BOUNDS + 1],
    /// The sum of the samples, as `f64` bits (0 is 0.0).
    sum: AtomicU64,
}

impl FixedHistogram {
    fn new(bounds: &'static [f64]) -> FixedHistogram {
        assert!(bounds.len() <= MAX_BOUNDS, "a histogram has at most {MAX_BOUNDS} bounds");
        FixedHistogram { bounds, shards: (0..SHARDS).map(|_| HistogramShard::default()).collect() }
    }

    fn record(&self, value: f64) {
        let shard = &self.shards[shard()];
        // The first bucket whose bound is at least the value (Prometheus's `le`).
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        shard.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = shard.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    /// Samples in bucket `i` (the `+Inf` one at `bounds.len()`), all shards.
    fn bucket(&self, i: usize) -> u64 {
        self.shards.iter().map(|shard| shard.counts[i].load(Ordering::Relaxed)).sum()
    }

    fn count(&self) -> u64 {
        (0..=self.bounds.len()).map(|i| self.bucket(i)).sum()
    }

    /// The series' lines in the Prometheus text format; `labels` as `a="x",b="y"` or empty.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let comma = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for i in 0..=self.bounds.len() {
            cumulative += self.bucket(i);
            let _ = match self.bounds.get(i) {
                Some(bound) => writeln!(out, "{name}_bucket{{{labels}{comma}le=\"{bound}\"}} {cumulative}"),
                None => writeln!(out, "{name}_bucket{{{labels}{comma}le=\"+Inf\"}} {cumulative}"),
            };
        }
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let sum: f64 =
            self.shards.iter().map(|shard| f64::from_bits(shard.sum.load(Ordering::Relaxed))).sum();
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {cumulative}");
    }
}

/// Every histogram, process-wide like the recorder.
struct Histograms {
    delivery_latency: FixedHistogram,
    outbound_queue: FixedHistogram,
    /// By `StoreOp` (in `StoreOp::ALL`'s order): ok, then error.
    store_latency: Vec<[FixedHistogram; 2]>,
}

static HISTOGRAMS: LazyLock<Histograms> = LazyLock::new(|| Histograms {
    delivery_latency: FixedHistogram::new(LATENCY_BUCKETS),
    outbound_queue: FixedHistogram::new(QUEUE_BUCKETS),
    store_latency: StoreOp::ALL
        .iter()
        .map(|_| [FixedHistogram::new(LATENCY_BUCKETS), FixedHistogram::new(LATENCY_BUCKETS)])
        .collect(),
});

impl Histograms {
    /// The sharded counters and the histograms in the Prometheus text format: a histogram
    /// family once it has a sample.
    fn render(&self, out: &mut String) {
        // A blank line before each family, as the recorder separates its own.
        let family = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "\n# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(out, MESSAGES_IN, "messages accepted from senders (stored)", "counter");
        let _ = writeln!(out, "{MESSAGES_IN} {}", MESSAGES_IN_COUNT.get());
        family(out, MESSAGES_OUT, "message frames written to recipients (live and offline)", "counter");
        let _ = writeln!(out, "{MESSAGES_OUT} {}", MESSAGES_OUT_COUNT.get());
        let family = |out: &mut String, name: &str, help: &str| family(out, name, help, "histogram");
        if self.delivery_latency.count() > 0 {
            family(out, DELIVERY_LATENCY, "live messages: from commit to the recipient's socket");
            self.delivery_latency.render(out, DELIVERY_LATENCY, "");
        }
        let mut named = false;
        for (op, [ok, error]) in StoreOp::ALL.iter().zip(&self.store_latency) {
            for (histogram, result) in [(ok, "ok"), (error, "error")] {
                if histogram.count() == 0 {
                    continue;
                }
                if !named {
                    family(out, STORE_LATENCY, "store operations by op and result");
                    named = true;
                }
                histogram.render(out, STORE_LATENCY, &format!("op=\"{}\",result=\"{result}\"", op.as_str()));
            }
        }
        if self.outbound_queue.count() > 0 {
            family(out, OUTBOUND_QUEUE, "frames queued for a connection when its writer wakes");
            self.outbound_queue.render(out, OUTBOUND_QUEUE, "");
        }
    }
}

/// Installs the process-wide recorder (once) and returns its handle; None when another recorder
/// was installed first (then `/metrics` says so).
pub fn install() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let handle = match PrometheusBuilder::new().install_recorder() {
                Ok(handle) => handle,
                Err(error) => {
                    tracing::warn!(%error, "metrics are off: cannot install the Prometheus recorder");
                    return None;
                }
            };
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_gauge!(CONNECTIONS, "WebSocket connections open now");
    describe_counter!(CONNECTIONS_TOTAL, "WebSocket connections accepted");
    describe_counter!(LOGINS, "login attempts by result (ok, invalid_token, failed)");
    describe_gauge!(STORE_QUEUE, "writes waiting for the store's writer (group commit; read at scrape)");
    describe_counter!(ERRORS, "error frames (websocket) and error responses (http) by code");
    describe_gauge!(PENDING, "messages stored and not yet confirmed delivered (read at scrape)");
    describe_gauge!(ONLINE_USERS, "users with at least one connection to this node (read at scrape)");
}

/// Keeps `privora_connections` up while it lives: `let _open = metrics::connection();`.
pub struct OpenConnection(());

pub fn connection() -> OpenConnection {
    counter!(CONNECTIONS_TOTAL).increment(1);
    gauge!(CONNECTIONS).increment(1.0);
    OpenConnection(())
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        gauge!(CONNECTIONS).decrement(1.0);
    }
}

/// How a login ended.
#[derive(Debug, Clone, Copy)]
pub enum Login {
    Ok,
    InvalidToken,
    /// The token was good but the server could not start the session (the store failed).
    Failed,
}

pub fn login(result: Login) {
    let result = match result {
        Login::Ok => "ok",
        Login::InvalidToken => "invalid_token",
        Login::Failed => "failed",
    };
    counter!(LOGINS, "result" => result).increment(1);
}

/// A sender's message was stored.
pub fn message_in() {
    MESSAGES_IN_COUNT.increment();
}

/// A message frame went onto a recipient's socket; `committed` is when it was stored, for live
/// messages (offline ones waited on purpose and would only blur the latency).
pub fn message_out(committed: Option<Instant>) {
    MESSAGES_OUT_COUNT.increment();
    if let Some(at) = committed {
        HISTOGRAMS.delivery_latency.record(at.elapsed().as_secs_f64());
    }
}

/// Frames waiting in a connection's outbound queue.
pub fn outbound_queue(depth: usize) {
    HISTOGRAMS.outbound_queue.record(depth as f64);
}

/// An error the server answered with, by its stable code.
pub fn error(code: ErrorCode, via: Via) {
    let via = match via {
        Via::WebSocket => "websocket",
        Via::Http => "http",
    };
    counter!(ERRORS, "code" => code.as_str(), "via" => via).increment(1);
}

#[derive(Debug, Clone, Copy)]
pub enum Via {
    WebSocket,
    Http,
}

/// `GET /metrics`: the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn render(State(state): State<Arc<AppState>>) -> Response {
    let Some(handle) = install() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "metrics are off: another metrics recorder is installed\n")
            .into_response();
    };
    match state.store.pending_count().await {
        Ok(Some(count)) => gauge!(PENDING).set(count as f64),
        Ok(None) => {}
        Err(error) => tracing::debug!(%error, "cannot count pending messages for /metrics"),
    }
    gauge!(ONLINE_USERS).set(state.hub.online_users() as f64);
    gauge!(STORE_QUEUE).set(state.store.writes().waiting() as f64);
    let mut text = handle.render();
    HISTOGRAMS.render(&mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// A `Store` that times every operation of the one it wraps (`privora_store_latency_seconds`
/// by `op` and `result`). Wrapping here, rather than inside each database's code, measures
/// every backend the same way.
pub struct MeteredStore(pub Arc<dyn Store>);

async fn timed<T>(
    op: StoreOp,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = work.await;
    store_op(op, started.elapsed().as_secs_f64(), result.is_ok());
    result
}

/// One store operation took `seconds` (for a queued write: from queueing to commit).
pub fn store_op(op: StoreOp, seconds: f64, ok: bool) {
    HISTOGRAMS.store_latency[op as usize][usize::from(!ok)].record(seconds);
}

#[async_trait]
impl Store for MeteredStore {
    /// The writer's queue times `append` and `mark_delivered` itself (its methods are not
    /// wrapped here: see `Store::writes`).
    fn writes(&self) -> &WriteQueue {
        self.0.writes()
    }
    async fn pending(&self, recipient: &str) -> Result<Vec<StoredMessage>, StoreError> {
        timed(StoreOp::Pending, self.0.pending(recipient)).await
    }
    async fn latest(&self, user: &str, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        timed(StoreOp::Latest, self.0.latest(user, limit)).await
    }
    async fn contacts(&self, user: &str) -> Result<Vec<Contact>, StoreError> {
        timed(StoreOp::Contacts, self.0.contacts(user)).await
    }
    async fn upsert_user(&self, user: UserRecord) -> Result<(), StoreError> {
        timed(StoreOp::UpsertUser, self.0.upsert_user(user)).await
    }
    async fn display_name(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        timed(StoreOp::DisplayName, self.0.display_name(user_id)).await
    }
    async fn search_users(&self, query: &str, limit: u32) -> Result<Vec<Contact>, StoreError> {
        timed(StoreOp::SearchUsers, self.0.search_users(query, limit)).await
    }
    async fn pending_count(&self) -> Result<Option<u64>, StoreError> {
        self.0.pending_count().await
    }
    async fn check(&self) -> Result<(), StoreError> {
        self.0.check().await
    }
    async fn close(&self) {
        self.0.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_histogram_renders_cumulative_buckets_its_sum_and_count() {
        let histogram = FixedHistogram::new(&[0.5, 1.0, 2.5]);
        for value in [0.1, 0.5, 0.7, 3.0] {
            histogram.record(value);
        }
        let mut text = String::new();
        histogram.render(&mut text, "x_seconds", "op=\"a\"");
        assert_eq!(
            text,
            "x_seconds_bucket{op=\"a\",le=\"0.5\"} 2\n\
             x_seconds_bucket{op=\"a\",le=\"1\"} 3\n\
             x_seconds_bucket{op=\"a\",le=\"2.5\"} 3\n\
             x_seconds_bucket{op=\"a\",le=\"+Inf\"} 4\n\
             x_seconds_sum{op=\"a\"} 4.3\n\
             x_seconds_count{op=\"a\"} 4\n"
        );
        let mut text = String::new();
        histogram.render(&mut text, "y", "");
        assert!(text.starts_with("y_bucket{le=\"0.5\"} 2\n"));
        assert!(text.ends_with("y_sum 4.3\ny_count 4\n"));
    }

    #[test]
    fn samples_from_many_threads_add_up_across_the_shards() {
        static COUNTER: ShardedCounter = ShardedCounter([const { Padded(AtomicU64::new(0)) }; SHARDS]);
        let histogram = FixedHistogram::new(&[1.0]);
        std::thread::scope(|scope| {
            for _ in 0..2 * SHARDS {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        COUNTER.increment();
                        histogram.record(0.5);
                        histogram.record(2.0);
                    }
                });
            }
        });
        assert_eq!(COUNTER.get(), 2 * SHARDS as u64 * 1000);
        assert_eq!(histogram.bucket(0), 2 * SHARDS as u64 * 1000);
        assert_eq!(histogram.count(), 2 * 2 * SHARDS as u64 * 1000);
        let mut text = String::new();
        histogram.render(&mut text, "x", "");
        assert!(text.contains(&format!("x_sum {}\n", 2.5 * 2.0 * SHARDS as f64 * 1000.0)), "{text}");
    }
}
