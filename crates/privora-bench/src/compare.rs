//! The `compare` scenario: Privora (SQLite, durable) against the bare relay, side by side in one
//! run, with the targets: throughput and CPU per message (interleaved rounds, median),
//! latency at fractions of the relay's maximum rate (plotted), idle memory, catch-up and search.

use std::path::PathBuf;

use serde::Serialize;

use crate::load::{self, LoadArgs, LoadReport, Pace};
use crate::plot::{self, Point};
use crate::report::{Latency, Machine};
use crate::target::{Kind, Target};
use crate::{catchup, idle, search};

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Messages in flight per user in the throughput rounds.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Interleaved rounds per measurement (relay, privora, relay, ...); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Open-loop load points, as fractions of the relay's measured maximum rate.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5,0.75")]
    pub rate_points: Vec<f64>,
    /// Idle connections per server (0 skips the idle comparison).
    #[arg(long, default_value_t = 19_000)]
    pub idle_connections: usize,
    /// Pending messages for the catch-up scenario (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub pending: usize,
    /// Users in the search directory (0 skips the search scenario).
    #[arg(long, default_value_t = 1_000_000)]
    pub directory: usize,
    #[arg(long, default_value_t = 2000)]
    pub queries: usize,
    /// Where to write the latency-vs-load plot.
    #[arg(long, default_value = "docs/performance-latency.png")]
    pub plot: PathBuf,
    /// The privora binary to start.
    #[arg(long, default_value = "target/release/privora")]
    pub privora: PathBuf,
}

/// One line of the ratio table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub figure: String,
    pub relay: Option<f64>,
    pub privora: f64,
    /// privora / relay, or the absolute value when there is no relay figure.
    pub ratio: Option<f64>,
    pub target: String,
    pub pass: bool,
}

#[derive(Debug, Serialize)]
pub struct CompareReport {
    pub machine: Machine,
    pub rows: Vec<Row>,
    pub throughput: Vec<LoadReport>,
    pub rate: Vec<LoadReport>,
    pub idle: Vec<idle::IdleReport>,
    pub catchup: Option<catchup::CatchupReport>,
    pub search: Option<search::SearchReport>,
    pub plot: Option<String>,
    pub machine_after: Machine,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn median_latency(runs: &[&LoadReport]) -> Latency {
    let of = |f: fn(&Latency) -> f64| median(runs.iter().map(|r| f(&r.latency)).collect());
    Latency {
        count: runs.iter().map(|r| r.latency.count).sum(),
        p50_ms: of(|l| l.p50_ms),
        p90_ms: of(|l| l.p90_ms),
        p99_ms: of(|l| l.p99_ms),
        p999_ms: of(|l| l.p999_ms),
        max_ms: of(|l| l.max_ms),
    }
}

pub async fn run(args: &CompareArgs) -> anyhow::Result<CompareReport> {
    let machine = Machine::now();
    let target_args = |kind| crate::target::TargetArgs {
        target: kind,
        privora: args.privora.clone(),
        url: None,
        token_cmd: None,
        pid: None,
    };
    let mut rows = Vec::new();
    let users = args.load.users;

    let relay = Target::start(&target_args(Kind::Relay), Kind::Relay).await?;
    let privora = Target::start(&target_args(Kind::Privora), Kind::Privora).await?;
    let relay_tokens = load::user_tokens(&relay, users).await?;
    let privora_tokens = load::user_tokens(&privora, users).await?;
    let both = [(&relay, &relay_tokens), (&privora, &privora_tokens)];

    // Throughput, closed loop, interleaved rounds.
    let mut throughput = Vec::new();
    for round in 0..args.rounds {
        for (target, tokens) in both {
            eprintln!("throughput round {}/{}: {:?}", round + 1, args.rounds, target.kind);
            throughput
                .push(load::run(target, tokens, &args.load, Pace::Closed { window: args.window }).await?);
        }
    }
    let of = |runs: &[LoadReport], kind: Kind, f: fn(&LoadReport) -> Option<f64>| {
        median(runs.iter().filter(|r| r.target == kind).filter_map(f).collect())
    };
    let relay_rate = of(&throughput, Kind::Relay, |r| Some(r.delivered_per_sec));
    let privora_rate = of(&throughput, Kind::Privora, |r| Some(r.delivered_per_sec));
    rows.push(ratio_row(
        format!("delivered msg/s, {users} users, window {} (median of {})", args.window, args.rounds),
        relay_rate,
        privora_rate,
        "≥ 0.60 × relay",
        |r| r >= 0.60,
    ));
    let relay_cpu = of(&throughput, Kind::Relay, |r| r.server_cpu_us_per_msg);
    let privora_cpu = of(&throughput, Kind::Privora, |r| r.server_cpu_us_per_msg);
    rows.push(ratio_row(
        "server CPU µs per delivered message".into(),
        relay_cpu,
        privora_cpu,
        "≤ 2 × relay",
        |r| r <= 2.0,
    ));
    rows.push(ratio_row(
        "load generator CPU µs per delivered message (same runs; it shares the cores)".into(),
        of(&throughput, Kind::Relay, |r| r.bench_cpu_us_per_msg),
        of(&throughput, Kind::Privora, |r| r.bench_cpu_us_per_msg),
        "reported",
        |_| true,
    ));
    let lost_or_duplicated = |runs: &[LoadReport]| runs.iter().map(|r| r.lost + r.duplicated).sum::<u64>();

    // Latency against offered load; the half-rate point is the target.
    let mut rate = Vec::new();
    let mut points = Vec::new();
    for &fraction in &args.rate_points {
        let offered = (relay_rate * fraction).max(1.0);
        let rounds = if (fraction - 0.5).abs() < 1e-9 { args.rounds } else { 1 };
        let first = rate.len();
        for round in 0..rounds {
            for (target, tokens) in both {
                eprintln!(
                    "rate {offered:.0} msg/s ({fraction} × relay max) round {}/{rounds}: {:?}",
                    round + 1,
                    target.kind
                );
                rate.push(load::run(target, tokens, &args.load, Pace::Open { rate: offered }).await?);
            }
        }
        for (label, kind) in [("relay", Kind::Relay), ("privora", Kind::Privora)] {
            let runs: Vec<&LoadReport> = rate[first..].iter().filter(|r| r.target == kind).collect();
            let latency = median_latency(&runs);
            points.push(Point { label, offered, p50_ms: latency.p50_ms, p99_ms: latency.p99_ms });
        }
        if (fraction - 0.5).abs() < 1e-9 {
            let at =
                |kind| median_latency(&rate[first..].iter().filter(|r| r.target == kind).collect::<Vec<_>>());
            let (r, p) = (at(Kind::Relay), at(Kind::Privora));
            let what = format!("at {offered:.0} msg/s (½ relay max, median of {rounds})");
            rows.push(ratio_row(
                format!("p50 latency ms {what}"),
                r.p50_ms,
                p.p50_ms,
                "≤ 1.5 × relay",
                |x| x <= 1.5,
            ));
            rows.push(ratio_row(
                format!("p90 latency ms {what}"),
                r.p90_ms,
                p.p90_ms,
                "≤ 1.5 × relay",
                |x| x <= 1.5,
            ));
            rows.push(ratio_row(format!("p99 latency ms {what}"), r.p99_ms, p.p99_ms, "reported", |_| true));
        }
    }
    let missing = lost_or_duplicated(&throughput) + lost_or_duplicated(&rate);
    relay.stop().await;
    privora.stop().await;

    let plot_path = match plot::latency_vs_load(
        &args.plot,
        &format!("Latency vs load, {users} users (2 shared cores)"),
        &points,
    ) {
        Ok(()) => Some(args.plot.display().to_string()),
        Err(error) => {
            eprintln!("plot skipped: {error:#}");
            None
        }
    };

    // Idle memory, each on a fresh server.
    let mut idle_reports = Vec::new();
    if args.idle_connections > 0 {
        for kind in [Kind::Relay, Kind::Privora] {
            eprintln!("idle: {} connections: {kind:?}", args.idle_connections);
            let target = Target::start(&target_args(kind), kind).await?;
            idle_reports.push(idle::run(&target, args.idle_connections).await?);
            target.stop().await;
        }
        let per =
            |kind| idle_reports.iter().find(|r| r.target == kind).map(|r| r.bytes_per_connection / 1000.0);
        if let (Some(r), Some(p)) = (per(Kind::Relay), per(Kind::Privora)) {
            rows.push(Row {
                figure: format!(
                    "idle RSS KB per logged-in connection ({} connections)",
                    args.idle_connections
                ),
                relay: Some(r),
                privora: p,
                ratio: Some(p / r),
                target: "≤ 8 KB".into(),
                pass: p <= 8.0,
            });
        }
    }

    let mut catchup_report = None;
    if args.pending > 0 {
        eprintln!("catchup: {} pending messages", args.pending);
        let target = Target::start(&target_args(Kind::Privora), Kind::Privora).await?;
        let report = catchup::run(&target, args.pending, 100.min(args.pending)).await?;
        target.stop().await;
        rows.push(Row {
            figure: format!("catch-up: ms to the last of {} offline frames", args.pending),
            relay: None,
            privora: report.to_last_offline_ms,
            ratio: None,
            target: "≤ 200 ms".into(),
            pass: report.to_last_offline_ms <= 200.0 && report.lost == 0 && report.duplicated == 0,
        });
        catchup_report = Some(report);
    }

    let mut search_report = None;
    if args.directory > 0 {
        eprintln!("search: {} users in the directory", args.directory);
        let report = search::run(&args.privora, args.directory, args.queries).await?;
        rows.push(Row {
            figure: format!("/search-users p99 ms, {} users", args.directory),
            relay: None,
            privora: report.latency.p99_ms,
            ratio: None,
            target: "≤ 5 ms".into(),
            pass: report.latency.p99_ms <= 5.0 && report.errors == 0 && report.empty_results == 0,
        });
        search_report = Some(report);
    }

    rows.push(Row {
        figure: "messages lost or duplicated (all load runs)".into(),
        relay: None,
        privora: missing as f64,
        ratio: None,
        target: "0".into(),
        pass: missing == 0,
    });
    Ok(CompareReport {
        machine,
        rows,
        throughput,
        rate,
        idle: idle_reports,
        catchup: catchup_report,
        search: search_report,
        plot: plot_path,
        machine_after: Machine::now(),
    })
}

fn ratio_row(figure: String, relay: f64, privora: f64, target: &str, pass: fn(f64) -> bool) -> Row {
    let ratio = privora / relay;
    Row {
        figure,
        relay: Some(relay),
        privora,
        ratio: Some(ratio),
        target: target.into(),
        pass: ratio.is_finite() && pass(ratio),
    }
}

/// The ratio table as Markdown, for the terminal and the README's Performance section.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | bare relay | privora | ratio | target | result |\n|---|---:|---:|---:|---|---|\n",
    );
    let num = |v: f64| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") };
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.figure,
            row.relay.map(num).unwrap_or_else(|| "–".into()),
            num(row.privora),
            row.ratio.map(|r| format!("{r:.2}")).unwrap_or_else(|| "–".into()),
            row.target,
            if row.pass { "pass" } else { "MISS" },
        ));
    }
    out
}
