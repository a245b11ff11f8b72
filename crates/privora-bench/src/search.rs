//! The `search` scenario: `/search-users` latency with M users in the directory.
//!
//! The directory is loaded straight into the database file before the server starts: the
//! schema comes from `privora migrate` (the server's own migrations), the rows go in through
//! plain INSERTs into `users`, so the server's own triggers fill its search index exactly as
//! logins would. Queries are what people type: a few letters of a name, a whole first or last
//! name, a full name, taken from names that exist (so every query must find someone).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::report::{self, Latency};
use crate::target::{self, Kind, Target};

const SYLLABLES: &[&str] = &[
    "al", "an", "ar", "be", "bo", "ca", "da", "de", "el", "en", "fa", "ga", "ha", "he", "is", "ja", "jo",
    "ka", "ki", "la", "le", "li", "lo", "ma", "mi", "mo", "na", "ne", "ni", "no", "ol", "pa", "ra", "re",
    "ri", "ro", "sa", "se", "si", "so", "ta", "te", "ti", "to", "ul", "va", "vi", "wa", "ya", "za",
];
/// Rows per transaction while loading.
const LOAD_BATCH: usize = 20_000;

#[derive(Debug, Clone, Serialize)]
pub struct SearchReport {
    pub target: Kind,
    pub users: usize,
    pub queries: usize,
    pub load_secs: f64,
    pub latency: Latency,
    /// Queries that found nobody (each query is part of an existing name: must be 0).
    pub empty_results: usize,
    pub errors: usize,
}

fn name(rng: &mut StdRng) -> String {
    fn part(rng: &mut StdRng, n: usize) -> String {
        let mut s: String = (0..n).map(|_| SYLLABLES[rng.random_range(0..SYLLABLES.len())]).collect();
        s[..1].make_ascii_uppercase();
        s
    }
    let n = 2 + usize::from(rng.random_bool(0.5));
    let first = part(rng, n);
    let n = 2 + rng.random_range(0..3);
    let last = part(rng, n);
    format!("{first} {last}")
}

/// Writes `users` rows into the (migrated) database in `dir`.
async fn load_directory(privora: &Path, dir: &Path, users: usize) -> anyhow::Result<()> {
    let status = tokio::process::Command::new(privora)
        .arg("migrate")
        .env("DATABASE_URL", target::database_url(dir))
        .env_remove("FIREBASE_ADMIN_CREDENTIALS_JSON")
        .current_dir(dir)
        .status()
        .await
        .with_context(|| format!("cannot run {} migrate", privora.display()))?;
    ensure!(status.success(), "privora migrate failed");
    let mut conn = SqliteConnectOptions::new()
        .filename(dir.join("privora.db"))
        .pragma("synchronous", "OFF")
        .disable_statement_logging()
        .connect()
        .await?;
    let mut rng = StdRng::seed_from_u64(42);
    let bar = report::progress(users as u64, "directory");
    let mut done = 0;
    while done < users {
        let mut tx = conn.begin().await?;
        for i in done..(done + LOAD_BATCH).min(users) {
            sqlx::query("INSERT INTO users (user_id, display_name, email) VALUES (?1, ?2, ?1)")
                .bind(format!("user{i}@directory.test"))
                .bind(name(&mut rng))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let batch = LOAD_BATCH.min(users - done);
        done += batch;
        bar.inc(batch as u64);
    }
    bar.finish_and_clear();
    conn.close().await?;
    Ok(())
}

/// Loads the directory, starts `privora serve` on it and measures `queries` searches.
pub async fn run(privora: &Path, users: usize, queries: usize) -> anyhow::Result<SearchReport> {
    let privora = &std::fs::canonicalize(privora).with_context(|| {
        format!("{} not found: run `cargo build --release -p privora`", privora.display())
    })?;
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    load_directory(privora, dir.path(), users).await?;
    let load_secs = started.elapsed().as_secs_f64();
    let target = Target::start_privora(privora, Some(dir)).await?;
    let report = measure(&target, users, queries, load_secs).await;
    target.stop().await;
    report
}

/// Queries a server holding the loader's directory. The query texts are cut from its names.
pub async fn measure(
    target: &Target,
    users: usize,
    queries: usize,
    load_secs: f64,
) -> anyhow::Result<SearchReport> {
    let bar = report::progress(1, "tokens");
    let token = target.tokens(&["searcher@directory.test".to_string()], &bar).await?.remove(0);
    bar.finish_and_clear();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    // The loader's names, made again from the same seed.
    let mut names = StdRng::seed_from_u64(42);
    let names: Vec<String> = (0..users).map(|_| name(&mut names)).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let mut histogram = report::histogram();
    let (mut empty, mut errors) = (0, 0);
    let warmup = 100;
    let bar = report::progress((queries + warmup) as u64, "search");
    for i in 0..queries + warmup {
        let full = names[rng.random_range(0..names.len())].clone();
        let (first, last) = full.split_once(' ').unwrap_or((&full, ""));
        let query = match rng.random_range(0..10) {
            0..=3 => first[..3.min(first.len())].to_lowercase(),
            4..=5 => first.to_string(),
            6..=7 => last.to_string(),
            8 => full.clone(),
            _ => first[..2].to_string(),
        };
        let sent = Instant::now();
        let response = client
            .get(format!("{}/search-users", target.http_url))
            .query(&[("q", query.as_str())])
            .bearer_auth(&token)
            .send()
            .await;
        let body = match response {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            _ => None,
        };
        let elapsed = sent.elapsed();
        bar.inc(1);
        if i < warmup {
            continue;
        }
        match body {
            Some(body) => {
                report::record(&mut histogram, elapsed);
                if body.trim() == "[]" {
                    empty += 1;
                }
            }
            None => errors += 1,
        }
    }
    bar.finish_and_clear();
    Ok(SearchReport {
        target: target.kind,
        users,
        queries,
        load_secs,
        latency: Latency::of(&histogram),
        empty_results: empty,
        errors,
    })
}
