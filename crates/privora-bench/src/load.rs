//! The `throughput` (closed loop) and `rate` (open loop) scenarios: N users each sending 1:1 to
//! random peers over their own WebSocket.
//!
//! Every message carries its sender, a per-sender sequence number and its send time (for the
//! open loop: its *intended* send time, so a stalled server cannot hide its queueing delay —
//! coordinated omission corrected). The recipient's reader measures the end-to-end latency,
//! marks the sequence number seen (a second sighting is a duplicate) and, in the closed loop,
//! gives the sender its window slot back. After the measured window the senders stop and the
//! bench waits for everything sent to arrive: whatever has not is lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use privora_protocol::{ClientFrame, ServerFrame};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Sink, Stream};
use crate::report::{self, Latency};
use crate::target::{self, Kind, Target};

/// After the senders stop, how long the bench waits without any message arriving before it
/// counts what is missing as lost, and how long it waits at most.
const DRAIN_IDLE: Duration = Duration::from_secs(5);
const DRAIN_MAX: Duration = Duration::from_secs(120);
/// Connections opened at once while setting up.
const CONNECT_PARALLELISM: usize = 64;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Users, each with its own connection.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Message text length in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Clients log in with `"acks": true` and give every message a `msg_id` (`SENDER-SEQ`), as
    /// a client that resends after a lost ack does: each message is then acknowledged to its
    /// sender and recorded by its msg_id (idempotent). The relay ignores both.
    #[arg(long)]
    pub acks: bool,
}

/// Closed loop (a window of messages in flight per user) or open loop (a fixed total rate).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pace {
    Closed { window: usize },
    Open { rate: f64 },
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub target: Kind,
    pub users: usize,
    pub pace: Pace,
    pub message_bytes: usize,
    /// Whether the clients asked for acks and sent msg_ids (`--acks`).
    pub acks: bool,
    pub measured_secs: f64,
    pub sent: u64,
    pub received: u64,
    /// `ack` frames the senders got (with `--acks` against Privora: one per message sent).
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// `error` frames and failed connections during the run.
    pub errors: u64,
    /// Messages received within the measured window, per second.
    pub delivered_per_sec: f64,
    pub latency: Latency,
    /// Server CPU time (user + system) per message delivered in the window, in microseconds.
    pub server_cpu_us_per_msg: Option<f64>,
    /// The same by server thread name (tokio's workers share one; the SQLite writer has its own),
    /// for the threads alive at the end of the window.
    pub server_cpu_by_thread_us_per_msg: Option<BTreeMap<String, f64>>,
    /// This load generator's own CPU time per message delivered in the window, in microseconds:
    /// on a machine it shares with the server, what the clients take is not the server's.
    pub bench_cpu_us_per_msg: Option<f64>,
    pub server_rss_bytes: Option<u64>,
}

/// What one user's peers know of it.
struct Peer {
    /// The closed loop's window: a slot per message in flight.
    slots: Semaphore,
    sent: AtomicU64,
    /// Bit per sequence number received from this sender.
    seen: Mutex<Vec<u64>>,
}

struct Shared {
    peers: Vec<Peer>,
    base: Instant,
    /// Nanoseconds since `base` of the measured window; messages sent inside it are measured.
    window_from: AtomicU64,
    window_to: AtomicU64,
    received: AtomicU64,
    in_window: AtomicU64,
    duplicated: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn in_window(&self, nanos: u64) -> bool {
        nanos >= self.window_from.load(Ordering::Relaxed) && nanos < self.window_to.load(Ordering::Relaxed)
    }
}

/// Tokens for the load's users `u0`, `u1`, ...: made once per server, reused by its runs.
pub async fn user_tokens(target: &Target, users: usize) -> anyhow::Result<Vec<String>> {
    anyhow::ensure!(users >= 2, "--users must be at least 2");
    let names: Vec<String> = (0..users).map(|i| format!("u{i}")).collect();
    let bar = report::progress(names.len() as u64, "tokens");
    let tokens = target.tokens(&names, &bar).await?;
    bar.finish_and_clear();
    Ok(tokens)
}

/// Runs one load against `target` (already started), `tokens` from `user_tokens`.
pub async fn run(
    target: &Target,
    tokens: &[String],
    args: &LoadArgs,
    pace: Pace,
) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(tokens.len() == args.users, "one token per user");
    target::raise_fd_limit();
    let bar = report::progress(tokens.len() as u64, "connecting");
    let connections = connect_all(&target.ws_url, tokens, args.acks, &bar).await?;
    bar.finish_and_clear();

    let shared = Arc::new(Shared {
        peers: (0..args.users)
            .map(|_| Peer {
                slots: Semaphore::new(match pace {
                    Pace::Closed { window } => window,
                    Pace::Open { .. } => 0,
                }),
                sent: AtomicU64::new(0),
                seen: Mutex::new(Vec::new()),
            })
            .collect(),
        base: Instant::now(),
        window_from: AtomicU64::new(u64::MAX),
        window_to: AtomicU64::new(u64::MAX),
        received: AtomicU64::new(0),
        in_window: AtomicU64::new(0),
        duplicated: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let (done_tx, done) = watch::channel(false);
    let start = tokio::time::Instant::now();
    let warmup = Duration::from_secs_f64(args.warmup);
    let measured = Duration::from_secs_f64(args.duration);
    let mut readers = Vec::with_capacity(args.users);
    let mut senders = Vec::with_capacity(args.users);
    for (me, (sink, stream)) in connections.into_iter().enumerate() {
        readers.push(tokio::spawn(read_loop(
            stream,
            shared.clone(),
            done.clone(),
            matches!(pace, Pace::Closed { .. }),
        )));
        let end = start + warmup + measured;
        senders.push(tokio::spawn(send_loop(
            sink,
            me,
            shared.clone(),
            pace,
            args.users,
            args.size,
            args.acks,
            start,
            end,
        )));
    }

    // Warm up, then measure.
    let bar = report::progress((args.warmup + args.duration).ceil() as u64, "load");
    let tick = |bar: &indicatif::ProgressBar, shared: &Shared, since: Instant, from: u64| {
        let rate =
            (shared.received.load(Ordering::Relaxed) - from) as f64 / since.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!("{rate:.0} msg/s"));
        bar.inc(1);
    };
    let begun = Instant::now();
    for _ in 0..args.warmup.ceil() as u64 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick(&bar, &shared, begun, 0);
    }
    tokio::time::sleep_until(start + warmup).await;
    let window_start = Instant::now();
    let cpu_before = target.pid.and_then(target::cpu_time);
    let threads_before = target.pid.and_then(target::cpu_by_thread);
    let bench_before = target::cpu_time(std::process::id());
    let from = shared.nanos(window_start);
    shared.window_from.store(from, Ordering::Relaxed);
    let received_before = shared.received.load(Ordering::Relaxed);
    let window_end_at = start + warmup + measured;
    while tokio::time::Instant::now() + Duration::from_secs(1) <= window_end_at {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick(&bar, &shared, window_start, received_before);
    }
    tokio::time::sleep_until(window_end_at).await;
    let window_end = Instant::now();
    shared.window_to.store(shared.nanos(window_end), Ordering::Relaxed);
    let cpu_after = target.pid.and_then(target::cpu_time);
    let threads_after = target.pid.and_then(target::cpu_by_thread);
    let bench_after = target::cpu_time(std::process::id());
    let rss = target.pid.and_then(target::rss_bytes);
    bar.finish_and_clear();

    // Stop sending, wait for what is on its way.
    shared.stop.store(true, Ordering::Relaxed);
    for peer in &shared.peers {
        peer.slots.close();
    }
    // The sinks come back and are kept: the connections stay open while draining.
    let mut sinks = Vec::with_capacity(senders.len());
    for sender in senders {
        if let Ok(sink) = sender.await {
            sinks.push(sink);
        }
    }
    let sent: u64 = shared.peers.iter().map(|p| p.sent.load(Ordering::Relaxed)).sum();
    // An overloaded server may still be working through a backlog: wait while messages keep
    // arriving, and call lost only what has not come once arrivals stop (or after DRAIN_MAX).
    let drain_until = Instant::now() + DRAIN_MAX;
    let mut last = (shared.received.load(Ordering::Relaxed), Instant::now());
    while shared.received.load(Ordering::Relaxed) < sent && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = shared.received.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= DRAIN_IDLE {
            break;
        }
    }
    let _ = done_tx.send(true);
    let mut histogram = report::histogram();
    for reader in readers {
        if let Ok(h) = reader.await {
            histogram.add(&h).context("merging histograms")?;
        }
    }
    drop(sinks);
    let received = shared.received.load(Ordering::Relaxed);
    let measured_secs = (window_end - window_start).as_secs_f64();
    let in_window = shared.in_window.load(Ordering::Relaxed);
    Ok(LoadReport {
        target: target.kind,
        users: args.users,
        pace,
        message_bytes: args.size,
        acks: args.acks,
        measured_secs,
        sent,
        received,
        acked: shared.acked.load(Ordering::Relaxed),
        lost: sent.saturating_sub(received),
        duplicated: shared.duplicated.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        delivered_per_sec: in_window as f64 / measured_secs,
        latency: Latency::of(&histogram),
        server_cpu_us_per_msg: per_message(cpu_before, cpu_after, in_window),
        server_cpu_by_thread_us_per_msg: match (threads_before, threads_after) {
            (Some(before), Some(after)) if in_window > 0 => Some(
                after
                    .into_iter()
                    .filter_map(|(name, cpu)| {
                        // A thread started within the window spent all its time in it.
                        let since = before.get(&name).copied().unwrap_or_default();
                        Some((name, per_message(Some(since), Some(cpu), in_window)?))
                    })
                    .collect(),
            ),
            _ => None,
        },
        bench_cpu_us_per_msg: per_message(bench_before, bench_after, in_window),
        server_rss_bytes: rss,
    })
}

/// CPU time spent between two readings, in microseconds per message delivered meanwhile.
fn per_message(before: Option<Duration>, after: Option<Duration>, messages: u64) -> Option<f64> {
    match (before, after) {
        (Some(a), Some(b)) if messages > 0 => Some(b.saturating_sub(a).as_secs_f64() * 1e6 / messages as f64),
        _ => None,
    }
}

/// Connects and logs in every user, a few at a time.
pub async fn connect_all(
    url: &str,
    tokens: &[String],
    acks: bool,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<(Sink, Stream)>> {
    let limit = Arc::new(Semaphore::new(CONNECT_PARALLELISM));
    let mut tasks = Vec::with_capacity(tokens.len());
    for token in tokens {
        let (url, token, limit, bar) = (url.to_string(), token.clone(), limit.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await?;
            let ws = client::open(&url, &token, acks).await?;
            bar.inc(1);
            anyhow::Ok(ws.split())
        }));
    }
    let mut connections = Vec::with_capacity(tasks.len());
    for task in tasks {
        connections.push(task.await??);
    }
    Ok(connections)
}

#[allow(clippy::too_many_arguments)]
async fn send_loop(
    mut sink: Sink,
    me: usize,
    shared: Arc<Shared>,
    pace: Pace,
    users: usize,
    size: usize,
    acks: bool,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) -> Sink {
    let peer = &shared.peers[me];
    let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
    let mut next = 0u64;
    let interval = match pace {
        Pace::Open { rate } => Duration::from_secs_f64(users as f64 / rate),
        Pace::Closed { .. } => Duration::ZERO,
    };
    // Spread the open-loop senders evenly over one interval.
    let offset = interval.mul_f64(me as f64 / users as f64);
    loop {
        let sent_at = match pace {
            Pace::Closed { .. } => {
                let Ok(slot) = peer.slots.acquire().await else { break };
                slot.forget();
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                Instant::now()
            }
            Pace::Open { .. } => {
                let intended = start + offset + interval.mul_f64(next as f64);
                if intended >= end {
                    break;
                }
                tokio::time::sleep_until(intended).await;
                intended.into_std()
            }
        };
        let to = loop {
            let to = rng.random_range(0..users);
            if to != me {
                break to;
            }
        };
        let seq = next;
        next += 1;
        let mut text = format!("{me}:{seq}:{}:", shared.nanos(sent_at));
        while text.len() < size {
            text.push('x');
        }
        let msg_id = acks.then(|| serde_json::Value::from(format!("{me}-{seq}")));
        let frame = ClientFrame::Message { to: format!("u{to}"), message: text, msg_id };
        if sink.send(client::text(&frame)).await.is_err() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        peer.sent.fetch_add(1, Ordering::Relaxed);
    }
    sink
}

async fn read_loop(
    mut stream: Stream,
    shared: Arc<Shared>,
    mut done: watch::Receiver<bool>,
    closed_loop: bool,
) -> Histogram<u64> {
    let mut histogram = report::histogram();
    loop {
        let message = tokio::select! {
            _ = done.changed() => break,
            message = stream.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                if !shared.stop.load(Ordering::Relaxed) {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
        };
        let now = Instant::now();
        match ServerFrame::decode(&text) {
            Ok(ServerFrame::Message(m)) => {
                let Some((sender, seq, sent_at)) = parse(&m.message) else {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let Some(peer) = shared.peers.get(sender) else { continue };
                if !mark_seen(peer, seq) {
                    shared.duplicated.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                shared.received.fetch_add(1, Ordering::Relaxed);
                if shared.in_window(shared.nanos(now)) {
                    shared.in_window.fetch_add(1, Ordering::Relaxed);
                }
                if shared.in_window(sent_at) {
                    report::record(
                        &mut histogram,
                        Duration::from_nanos(shared.nanos(now).saturating_sub(sent_at)),
                    );
                }
                if closed_loop {
                    peer.slots.add_permits(1);
                }
            }
            Ok(ServerFrame::Ack { .. }) => {
                shared.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(ServerFrame::Error { .. }) | Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
        }
    }
    histogram
}

/// `sender:seq:sent_nanos:padding`.
fn parse(text: &str) -> Option<(usize, u64, u64)> {
    let mut parts = text.splitn(4, ':');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Marks `seq` received from this peer; false if it already was (a duplicate).
fn mark_seen(peer: &Peer, seq: u64) -> bool {
    let mut seen = peer.seen.lock().unwrap_or_else(|e| e.into_inner());
    let (word, bit) = ((seq / 64) as usize, seq % 64);
    if seen.len() <= word {
        seen.resize(word + 1, 0);
    }
    let fresh = seen[word] & (1 << bit) == 0;
    seen[word] |= 1 << bit;
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_seen() {
        let peer = Peer { slots: Semaphore::new(0), sent: AtomicU64::new(0), seen: Mutex::new(Vec::new()) };
        assert!(mark_seen(&peer, 0));
        assert!(mark_seen(&peer, 130));
        assert!(!mark_seen(&peer, 130));
        assert!(!mark_seen(&peer, 0));
        assert_eq!(parse("12:7:99:xxxx"), Some((12, 7, 99)));
        assert_eq!(parse("12:7"), None);
    }
}
