//! Prometheus metrics: every metric's name, labels and meaning live in this one module, so the
//! places that record are one line each (`metrics::message_in()`), and `/metrics` renders them.
//!
//! The recorder is process-wide (the `metrics` facade has one global recorder); it is installed
//! once, at the first server start, and shared by every server of the process (tests start
//! many). Gauges that describe the state of the world rather than events (pending messages,
//! online users) are read when Prometheus scrapes, not kept up to date on every change.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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

/// Handles of the metrics recorded for every message, registered once: looking a metric up by
/// name hashes its key and takes a lock, several times per message otherwise.
struct Hot {
    messages_in: Counter,
    messages_out: Counter,
    delivery_latency: Histogram,
    outbound_queue: Histogram,
    store_queue: Gauge,
    append_ok: Histogram,
    delivered_ok: Histogram,
}

static HOT: OnceLock<Hot> = OnceLock::new();

/// The hot handles, once the recorder is installed (before that, recording goes nowhere).
fn hot() -> Option<&'static Hot> {
    HOT.get()
}

/// Installs the process-wide recorder (once) and returns its handle; None when another recorder
/// was installed first (then `/metrics` says so).
pub fn install() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(OUTBOUND_QUEUE.into()), QUEUE_BUCKETS));
            let handle = match builder.map(|b| b.install_recorder()) {
                Ok(Ok(handle)) => handle,
                Ok(Err(error)) | Err(error) => {
                    tracing::warn!(%error, "metrics are off: cannot install the Prometheus recorder");
                    return None;
                }
            };
            describe();
            let _ = HOT.set(Hot {
                messages_in: counter!(MESSAGES_IN),
                messages_out: counter!(MESSAGES_OUT),
                delivery_latency: histogram!(DELIVERY_LATENCY),
                outbound_queue: histogram!(OUTBOUND_QUEUE),
                store_queue: gauge!(STORE_QUEUE),
                append_ok: histogram!(STORE_LATENCY, "op" => "append", "result" => "ok"),
                delivered_ok: histogram!(STORE_LATENCY, "op" => "mark_delivered", "result" => "ok"),
            });
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_gauge!(CONNECTIONS, "WebSocket connections open now");
    describe_counter!(CONNECTIONS_TOTAL, "WebSocket connections accepted");
    describe_counter!(LOGINS, "login attempts by result (ok, invalid_token, failed)");
    describe_counter!(MESSAGES_IN, "messages accepted from senders (stored)");
    describe_counter!(MESSAGES_OUT, "message frames written to recipients (live and offline)");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "live messages: from commit to the recipient's socket"
    );
    describe_histogram!(STORE_LATENCY, Unit::Seconds, "store operations by op and result");
    describe_gauge!(STORE_QUEUE, "writes waiting for the store's writer (group commit)");
    describe_histogram!(OUTBOUND_QUEUE, "frames queued for a connection when its writer wakes");
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
    if let Some(hot) = hot() {
        hot.messages_in.increment(1);
    }
}

/// A message frame went onto a recipient's socket; `committed` is when it was stored, for live
/// messages (offline ones waited on purpose and would only blur the latency).
pub fn message_out(committed: Option<Instant>) {
    let Some(hot) = hot() else { return };
    hot.messages_out.increment(1);
    if let Some(at) = committed {
        hot.delivery_latency.record(at.elapsed().as_secs_f64());
    }
}

/// Frames waiting in a connection's outbound queue.
pub fn outbound_queue(depth: usize) {
    if let Some(hot) = hot() {
        hot.outbound_queue.record(depth as f64);
    }
}

/// Writes waiting for the store's writer task.
pub fn store_queue(depth: usize) {
    if let Some(hot) = hot() {
        hot.store_queue.set(depth as f64);
    }
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
    handle.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render()).into_response()
}

/// Histograms are folded on every scrape and also every few seconds, so that a server nobody
/// scrapes does not keep every sample. Runs until `stop` is cancelled.
pub async fn upkeep(stop: tokio_util::sync::CancellationToken) {
    let Some(handle) = install() else { return };
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// A `Store` that times every operation of the one it wraps (`privora_store_latency_seconds`
/// by `op` and `result`). Wrapping here, rather than inside each database's code, measures
/// every backend the same way.
pub struct MeteredStore(pub Arc<dyn Store>);

async fn timed<T>(
    op: &'static str,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = work.await;
    store_op(op, started.elapsed().as_secs_f64(), result.is_ok());
    result
}

/// One store operation took `seconds` (for a queued write: from queueing to commit).
pub fn store_op(op: &'static str, seconds: f64, ok: bool) {
    match (op, ok, hot()) {
        ("append", true, Some(hot)) => hot.append_ok.record(seconds),
        ("mark_delivered", true, Some(hot)) => hot.delivered_ok.record(seconds),
        (_, ok, _) => {
            let outcome = if ok { "ok" } else { "error" };
            histogram!(STORE_LATENCY, "op" => op, "result" => outcome).record(seconds);
        }
    }
}

#[async_trait]
impl Store for MeteredStore {
    /// The writer's queue times `append` and `mark_delivered` itself (its methods are not
    /// wrapped here: see `Store::writes`).
    fn writes(&self) -> &WriteQueue {
        self.0.writes()
    }
    async fn pending(&self, recipient: &str) -> Result<Vec<StoredMessage>, StoreError> {
        timed("pending", self.0.pending(recipient)).await
    }
    async fn latest(&self, user: &str, limit: u32) -> Result<Vec<StoredMessage>, StoreError> {
        timed("latest", self.0.latest(user, limit)).await
    }
    async fn contacts(&self, user: &str) -> Result<Vec<Contact>, StoreError> {
        timed("contacts", self.0.contacts(user)).await
    }
    async fn upsert_user(&self, user: UserRecord) -> Result<(), StoreError> {
        timed("upsert_user", self.0.upsert_user(user)).await
    }
    async fn display_name(&self, user_id: &str) -> Result<Option<String>, StoreError> {
        timed("display_name", self.0.display_name(user_id)).await
    }
    async fn search_users(&self, query: &str, limit: u32) -> Result<Vec<Contact>, StoreError> {
        timed("search_users", self.0.search_users(query, limit)).await
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
