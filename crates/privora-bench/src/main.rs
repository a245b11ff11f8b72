//! `privora-bench`: a load generator for Privora-compatible servers, speaking the protocol over
//! real WebSockets, with a bare relay to compare against. Each scenario is bounded in time,
//! shows a progress bar on stderr and writes a JSON report to stdout (or `--out FILE`).
//! Traffic goes only where it is pointed: the servers it starts listen on 127.0.0.1.

mod catchup;
mod client;
mod compare;
mod idle;
mod load;
mod plot;
mod relay;
mod report;
mod search;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::load::{LoadArgs, Pace};
use crate::report::Machine;
use crate::target::{Target, TargetArgs};

#[derive(Parser)]
#[command(name = "privora-bench", version, about = "Benchmarks for Privora-compatible chat servers")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Write the JSON report here instead of stdout.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// N users sending to random peers, W messages in flight each (closed loop).
    Throughput {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 8)]
        window: usize,
    },
    /// A fixed total rate (open loop); latency from each message's intended send time.
    Rate {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        load: LoadArgs,
        /// Messages per second, all users together.
        #[arg(long)]
        rate: f64,
    },
    /// N logged-in idle connections: the server's memory per connection.
    Idle {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 19_000)]
        connections: usize,
    },
    /// A user with K pending messages logs in: time to the last `offline` frame.
    Catchup {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 10_000)]
        pending: usize,
        /// Connections that send the pending messages.
        #[arg(long, default_value_t = 100)]
        senders: usize,
    },
    /// `/search-users` latency with M users loaded into a fresh SQLite directory.
    Search {
        #[arg(long, default_value = "target/release/privora")]
        privora: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        users: usize,
        #[arg(long, default_value_t = 2000)]
        queries: usize,
    },
    /// Privora against the bare relay, side by side: the ratio table and a latency plot.
    Compare(compare::CompareArgs),
    /// Run the bare relay (no storage, no auth) until killed.
    Relay {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

/// A scenario's report with the machine it ran on.
#[derive(Serialize)]
struct Envelope<T: Serialize> {
    scenario: &'static str,
    machine: Machine,
    report: T,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("privora-bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("privora-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.out;
    match cli.scenario {
        Scenario::Relay { listen } => relay::serve(&listen).await,
        Scenario::Throughput { target, load, window } => {
            let report = with_target(&target, |t| async move {
                let report = match load::user_tokens(&t, load.users).await {
                    Ok(tokens) => load::run(&t, &tokens, &load, Pace::Closed { window }).await,
                    Err(error) => Err(error),
                };
                (t, report)
            })
            .await?;
            emit(&out, "throughput", report)
        }
        Scenario::Rate { target, load, rate } => {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
            let report = with_target(&target, |t| async move {
                let report = match load::user_tokens(&t, load.users).await {
                    Ok(tokens) => load::run(&t, &tokens, &load, Pace::Open { rate }).await,
                    Err(error) => Err(error),
                };
                (t, report)
            })
            .await?;
            emit(&out, "rate", report)
        }
        Scenario::Idle { target, connections } => {
            let report = with_target(&target, |t| async move {
                let report = idle::run(&t, connections).await;
                (t, report)
            })
            .await?;
            emit(&out, "idle", report)
        }
        Scenario::Catchup { target, pending, senders } => {
            let report = with_target(&target, |t| async move {
                let report = catchup::run(&t, pending, senders).await;
                (t, report)
            })
            .await?;
            emit(&out, "catchup", report)
        }
        Scenario::Search { privora, users, queries } => {
            let report = search::run(&privora, users, queries).await?;
            emit(&out, "search", report)
        }
        Scenario::Compare(args) => {
            let report = compare::run(&args).await?;
            eprintln!("\n{}", compare::table(&report.rows));
            emit(&out, "compare", report)
        }
    }
}

/// Starts the target, runs `body`, stops the target whatever happened.
async fn with_target<T, F, Fut>(args: &TargetArgs, body: F) -> anyhow::Result<T>
where
    F: FnOnce(Target) -> Fut,
    Fut: std::future::Future<Output = (Target, anyhow::Result<T>)>,
{
    let target = Target::start(args, args.target).await?;
    let (target, result) = body(target).await;
    target.stop().await;
    result
}

fn emit<T: Serialize>(out: &Option<PathBuf>, scenario: &'static str, report: T) -> anyhow::Result<()> {
    let envelope = Envelope { scenario, machine: Machine::now(), report };
    let json = serde_json::to_string_pretty(&envelope)?;
    match out {
        Some(path) => std::fs::write(path, json + "\n")?,
        None => println!("{json}"),
    }
    Ok(())
}
