//! The `idle` scenario: N logged-in connections that send nothing; the server's resident memory
//! growth per connection (VmRSS from /proc, before any connection and once all are logged in).

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::load::connect_all;
use crate::report;
use crate::target::{self, Kind, Target};

/// How long the connections sit idle before memory is read.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub target: Kind,
    pub connections: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_connection: f64,
    pub connect_secs: f64,
}

pub async fn run(target: &Target, connections: usize) -> anyhow::Result<IdleReport> {
    let pid =
        target.pid.context("the idle scenario needs the server's pid (--pid for an external server)")?;
    let limit = target::raise_fd_limit();
    anyhow::ensure!(
        (connections as u64) + 100 <= limit,
        "{connections} connections need more open files than this process may have ({limit})"
    );
    let names: Vec<String> = (0..connections).map(|i| format!("idle{i}")).collect();
    let bar = report::progress(connections as u64, "tokens");
    let tokens = target.tokens(&names, &bar).await?;
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = target::rss_bytes(pid).context("cannot read the server's /proc status")?;
    let started = std::time::Instant::now();
    let bar = report::progress(connections as u64, "connecting");
    let sockets = connect_all(&target.ws_url, &tokens, false, &bar).await?;
    bar.finish_and_clear();
    let connect_secs = started.elapsed().as_secs_f64();
    // Keep reading (the server pings; tungstenite answers while the stream is polled).
    let mut readers = Vec::with_capacity(sockets.len());
    let mut sinks = Vec::with_capacity(sockets.len());
    for (sink, mut stream) in sockets {
        sinks.push(sink);
        readers.push(tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = stream.next().await {}
        }));
    }
    tokio::time::sleep(SETTLE).await;
    let after = target::rss_bytes(pid).context("cannot read the server's /proc status")?;
    for reader in &readers {
        reader.abort();
    }
    drop(sinks);
    Ok(IdleReport {
        target: target.kind,
        connections,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_connection: after.saturating_sub(before) as f64 / connections as f64,
        connect_secs,
    })
}
