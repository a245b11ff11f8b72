//! The `catchup` scenario: a user with K pending messages logs in; how long until the last
//! `offline` frame arrives. The messages are sent for real, over WebSockets, by a few senders
//! while the user is away; a `ping` after each sender's last message comes back only once all
//! of them are stored (a session handles its frames in order).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use privora_protocol::{ClientFrame, ServerFrame};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::client;
use crate::report;
use crate::target::{Kind, Target};

#[derive(Debug, Clone, Serialize)]
pub struct CatchupReport {
    pub target: Kind,
    pub pending: usize,
    pub senders: usize,
    /// From sending `login` to the last `offline` frame.
    pub to_last_offline_ms: f64,
    /// From sending `login` to `contacts`, the end of the login burst.
    pub to_login_complete_ms: f64,
    pub received: usize,
    pub lost: usize,
    pub duplicated: usize,
}

pub async fn run(target: &Target, pending: usize, senders: usize) -> anyhow::Result<CatchupReport> {
    ensure!(target.kind != Kind::Relay, "the bare relay stores nothing: catch-up needs a server");
    ensure!(senders >= 1 && pending >= senders, "need at least one sender and one message per sender");
    let mut names: Vec<String> = (0..senders).map(|i| format!("sender{i}")).collect();
    names.push("returning".to_string());
    let bar = report::progress(names.len() as u64, "tokens");
    let tokens = target.tokens(&names, &bar).await?;
    bar.finish_and_clear();

    let bar = report::progress(pending as u64, "storing");
    let mut tasks = Vec::new();
    for (s, token) in tokens[..senders].iter().enumerate() {
        let (url, token, bar) = (target.ws_url.clone(), token.clone(), bar.clone());
        let count = pending / senders + usize::from(s < pending % senders);
        tasks.push(tokio::spawn(async move {
            let mut ws = client::open(&url, &token, false).await?;
            for i in 0..count {
                let frame = ClientFrame::Message {
                    to: "returning".into(),
                    message: format!("{s}:{i}"),
                    msg_id: None,
                };
                ws.feed(client::text(&frame)).await?;
                bar.inc(1);
            }
            ws.send(client::text(&ClientFrame::Ping)).await?;
            while let Some(message) = ws.next().await {
                let Message::Text(text) = message? else { continue };
                match ServerFrame::decode(&text)? {
                    ServerFrame::Pong => return anyhow::Ok(()),
                    ServerFrame::Error { code, message } => {
                        bail!("sending failed: {} {message}", code.as_str())
                    }
                    _ => {}
                }
            }
            bail!("the server closed a sender's connection")
        }));
    }
    for task in tasks {
        task.await??;
    }
    bar.finish_and_clear();

    let mut ws = client::connect(&target.ws_url).await?;
    let mut ids = HashSet::with_capacity(pending);
    let (mut received, mut duplicated) = (0, 0);
    let mut last_offline = None;
    let started = Instant::now();
    client::log_in(&mut ws, &tokens[senders], false, |frame| {
        if let ServerFrame::Offline(m) = frame {
            received += 1;
            if !ids.insert(m.id) {
                duplicated += 1;
            }
            last_offline = Some(Instant::now());
        }
    })
    .await?;
    let complete = started.elapsed();
    let last = last_offline.context("no offline frame arrived")?.duration_since(started);
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    Ok(CatchupReport {
        target: target.kind,
        pending,
        senders,
        to_last_offline_ms: last.as_secs_f64() * 1e3,
        to_login_complete_ms: complete.as_secs_f64() * 1e3,
        received,
        lost: pending.saturating_sub(ids.len()),
        duplicated,
    })
}
