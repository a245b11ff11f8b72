//! What the bench talks to: a `privora serve` it starts itself (temp database, rate limit off),
//! the bare relay in a child process, or any server URL with tokens from a command template.
//! Also where the server's CPU time and memory are read from /proc.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

/// The development secret of the servers the bench starts (never used outside loopback).
const BENCH_SECRET: &str = "privora-bench-development-secret-0123456789";
/// `privora token` runs at once while tokens are made.
const TOKEN_PARALLELISM: usize = 4;

/// Which server a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `privora serve` on SQLite (durable), started by the bench.
    Privora,
    /// The bare relay, started by the bench in a child process.
    Relay,
    /// A running server at `--url`, tokens from `--token-cmd`.
    External,
}

/// Where a server is and how to get in.
pub struct Target {
    pub kind: Kind,
    pub ws_url: String,
    pub http_url: String,
    /// The server's process id, when known: for RSS and CPU figures.
    pub pid: Option<u32>,
    tokens: TokenSource,
    child: Option<Child>,
    /// The temp directory holding the database; removed when the target is dropped.
    _dir: Option<tempfile::TempDir>,
}

#[derive(Clone)]
enum TokenSource {
    /// The token is the user id (the bare relay).
    UserId,
    /// `privora token USER` against the started server's database.
    Privora { binary: PathBuf, database_url: String },
    /// `sh -c TEMPLATE` with `{user}` replaced; the token is the command's trimmed stdout.
    Template(String),
}

/// Options for starting targets.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Server to run against.
    #[arg(long, value_enum, default_value = "privora")]
    pub target: Kind,
    /// The privora binary to start (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/privora")]
    pub privora: PathBuf,
    /// WebSocket URL of an external server (`--target external`), e.g. ws://127.0.0.1:8000/ws.
    #[arg(long)]
    pub url: Option<String>,
    /// Command that prints a token for `{user}` (`--target external`), run with `sh -c`.
    #[arg(long)]
    pub token_cmd: Option<String>,
    /// Process id of the external server, for memory and CPU figures.
    #[arg(long)]
    pub pid: Option<u32>,
}

impl Target {
    pub async fn start(args: &TargetArgs, kind: Kind) -> anyhow::Result<Target> {
        match kind {
            Kind::Privora => Target::start_privora(&args.privora, None).await,
            Kind::Relay => Target::start_relay().await,
            Kind::External => {
                let (Some(url), Some(cmd)) = (&args.url, &args.token_cmd) else {
                    bail!("--target external needs --url and --token-cmd");
                };
                Ok(Target {
                    kind,
                    http_url: http_of(url),
                    ws_url: url.clone(),
                    pid: args.pid,
                    tokens: TokenSource::Template(cmd.clone()),
                    child: None,
                    _dir: None,
                })
            }
        }
    }

    /// Starts `privora serve` on a free loopback port with a fresh database (or `prepared`, a
    /// directory holding `privora.db` already filled).
    pub async fn start_privora(binary: &Path, prepared: Option<tempfile::TempDir>) -> anyhow::Result<Target> {
        let binary = std::fs::canonicalize(binary).with_context(|| {
            format!("{} not found: run `cargo build --release -p privora`", binary.display())
        })?;
        let dir = match prepared {
            Some(dir) => dir,
            None => tempfile::tempdir()?,
        };
        let database_url = database_url(dir.path());
        let addr = free_port()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(&binary)
            .arg("serve")
            .env("PRIVORA_LISTEN", addr.to_string())
            .env("DATABASE_URL", &database_url)
            .env("PRIVORA_RATE_LIMIT", "0")
            .env("PRIVORA_LOG", "warn")
            .env("PRIVORA_DEV_SECRET", BENCH_SECRET)
            .env_remove("FIREBASE_ADMIN_CREDENTIALS_JSON")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id();
        wait_for_port(addr).await?;
        Ok(Target {
            kind: Kind::Privora,
            ws_url: format!("ws://{addr}/ws"),
            http_url: format!("http://{addr}"),
            pid,
            tokens: TokenSource::Privora { binary, database_url },
            child: Some(child),
            _dir: Some(dir),
        })
    }

    /// Starts the bare relay: this same binary, `relay` subcommand.
    pub async fn start_relay() -> anyhow::Result<Target> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["relay", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the relay did not start in 10 s")??
            .context("the relay exited")?;
        let addr = line.strip_prefix("listening ").context("unexpected relay output")?.to_string();
        Ok(Target {
            kind: Kind::Relay,
            ws_url: format!("ws://{addr}/ws"),
            http_url: format!("http://{addr}"),
            pid: child.id(),
            tokens: TokenSource::UserId,
            child: Some(child),
            _dir: None,
        })
    }

    /// Tokens for `users`, in order. Privora tokens come from `privora token` (which also
    /// registers the user), a few at a time.
    pub async fn tokens(
        &self,
        users: &[String],
        progress: &indicatif::ProgressBar,
    ) -> anyhow::Result<Vec<String>> {
        let limit = Arc::new(Semaphore::new(TOKEN_PARALLELISM));
        let mut tasks = Vec::with_capacity(users.len());
        for user in users {
            let source = self.tokens.clone();
            let user = user.clone();
            let limit = limit.clone();
            let progress = progress.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire_owned().await?;
                let token = token_for(&source, &user).await;
                progress.inc(1);
                token
            }));
        }
        let mut tokens = Vec::with_capacity(users.len());
        for task in tasks {
            tokens.push(task.await??);
        }
        Ok(tokens)
    }

    /// Stops a server the bench started.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

async fn token_for(source: &TokenSource, user: &str) -> anyhow::Result<String> {
    let output = match source {
        TokenSource::UserId => return Ok(user.to_string()),
        TokenSource::Privora { binary, database_url } => {
            Command::new(binary)
                .args(["token", user])
                .env("DATABASE_URL", database_url)
                .env("PRIVORA_LOG", "warn")
                .current_dir(std::env::temp_dir())
                .env("PRIVORA_DEV_SECRET", BENCH_SECRET)
                .env_remove("FIREBASE_ADMIN_CREDENTIALS_JSON")
                .output()
                .await?
        }
        TokenSource::Template(template) => {
            Command::new("sh").arg("-c").arg(template.replace("{user}", user)).output().await?
        }
    };
    if !output.status.success() {
        bail!("token command for {user} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let token = String::from_utf8(output.stdout)?.trim().to_string();
    if token.is_empty() {
        bail!("token command for {user} printed nothing");
    }
    Ok(token)
}

pub fn database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("privora.db").display())
}

fn http_of(ws_url: &str) -> String {
    let rest = ws_url.strip_prefix("wss://").map(|r| format!("https://{r}"));
    let rest = rest.unwrap_or_else(|| ws_url.replacen("ws://", "http://", 1));
    match rest.find("/ws") {
        Some(at) => rest[..at].to_string(),
        None => rest,
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = StdListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

async fn wait_for_port(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the server did not listen on {addr} within 30 s")
}

/// A process's resident memory in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A process's CPU time so far (user + system), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let (_, cpu) = parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(cpu)
}

/// The CPU time (user + system) of each live thread of a process, summed by thread name (tokio's
/// workers all share one), from /proc/PID/task/*/stat. Threads that ended are not counted.
pub fn cpu_by_thread(pid: u32) -> Option<BTreeMap<String, Duration>> {
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        if let Some((name, cpu)) = parse_stat(&text) {
            *threads.entry(name).or_insert(Duration::ZERO) += cpu;
        }
    }
    Some(threads)
}

/// The command (or thread) name and the CPU time (user + system) of a /proc `stat` line.
fn parse_stat(stat: &str) -> Option<(String, Duration)> {
    // The name may hold spaces and parentheses: it ends at the last closing paren.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((name, Duration::from_secs_f64(ticks as f64 / per_second as f64)))
}

/// Raises the open-file limit to the hard limit: thousands of sockets need it.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_the_name_and_user_plus_system_time() {
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let line = "42 (tokio (rt) worker) S 1 42 42 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 3";
        let (name, cpu) = parse_stat(line).expect("parsed");
        assert_eq!(name, "tokio (rt) worker");
        assert!((cpu.as_secs_f64() - 300.0 / per_second).abs() < 1e-9);
        assert_eq!(parse_stat("42 (cut short) S 1"), None);
    }

    #[test]
    fn this_process_has_threads_with_cpu_time() {
        let threads = cpu_by_thread(std::process::id()).expect("readable");
        assert!(!threads.is_empty());
        let total: Duration = threads.values().sum();
        assert!(total <= cpu_time(std::process::id()).expect("readable") + Duration::from_millis(20));
    }
}
