//! The store alone under the chat workload of `privora-bench throughput`: `--users` users, each
//! with one append in flight (as a session has), sending to random peers, and every message
//! confirmed delivered right after it is stored (as a live recipient's pong does). Prints the
//! messages per second and the process's CPU time per message (user + system, from
//! /proc/self/stat), so that store changes can be compared without the WebSocket layer, or
//! counted exactly under `valgrind --tool=callgrind`.
//!
//! `PEERS` (default: every user) is how many people each user writes to: the bench's random
//! peers make nearly every message a new conversation pair, while people mostly write to the
//! same few.
//!
//! With `STAGES` above 1 it also prints each of that many equal stretches of the run on its own,
//! to show how the cost per message moves as the database grows.
//!
//! cargo run --release -p privora --example store_workload -- [USERS] [MESSAGES] [PEERS] [STAGES]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use privora::store::sqlite::SqliteStore;
use privora::store::{NewMessage, Store, UserRecord};

/// User plus system CPU time of this process, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    ticks / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let users: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let messages: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200_000);
    let peers: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(users as u64).max(1);
    let stages: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1).max(1);
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(&dir.path().join("workload.db"), 2).await?);
    for u in 0..users {
        let record = UserRecord { user_id: format!("user{u}"), display_name: None, email: None };
        store.upsert_user(record).await?;
    }
    let per_user = messages / users;
    let done = Arc::new(AtomicU64::new(0));
    let stage_size = (per_user * users) as u64 / stages;
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let reporter = (stages > 1).then(|| {
        let done = done.clone();
        tokio::spawn(async move {
            let (mut cpu, mut at, mut stage) = (cpu, Instant::now(), 1);
            while stage <= stages {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                if done.load(Ordering::Relaxed) >= stage * stage_size {
                    let (now_cpu, now) = (cpu_seconds(), Instant::now());
                    println!(
                        "stage {stage}: {:.0} msg/s, {:.1} µs CPU per message",
                        stage_size as f64 / (now - at).as_secs_f64(),
                        (now_cpu - cpu) * 1e6 / stage_size as f64
                    );
                    (cpu, at, stage) = (now_cpu, now, stage + 1);
                }
            }
        })
    });
    let tasks: Vec<_> = (0..users)
        .map(|u| {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                let mut seed = (u as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                for i in 0..per_user {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    // One of this user's `peers` neighbours (everyone, by default).
                    let to = format!("user{}", (u as u64 + seed % peers) % users as u64);
                    let stored = store
                        .append(NewMessage {
                            sender: format!("user{u}").into(),
                            sender_display_name: format!("User {u}").into(),
                            recipient: to.clone(),
                            message: format!("{i:>56}"),
                            msg_id: None,
                            idempotent: false,
                        })
                        .await?;
                    store.mark_delivered(&to, vec![stored.id]).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let (cpu, secs) = (cpu_seconds() - cpu, started.elapsed().as_secs_f64());
    if let Some(reporter) = reporter {
        reporter.await?;
    }
    let total = (per_user * users) as f64;
    println!(
        "{users} users, {peers} peers each, {total} messages: {:.0} msg/s, {:.1} µs CPU per message",
        total / secs,
        cpu * 1e6 / total
    );
    store.close().await;
    Ok(())
}
