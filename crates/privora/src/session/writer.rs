//! The writer task: owns the sending half of the socket and the connection's bounded queue;
//! holds routed frames back until the login burst is written, drops second copies, pings for
//! delivery and on a heartbeat, and ends the connection on a cut-off, a shutdown or silence.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::tracker::Tracker;
use super::{lock, CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN, REMEMBERED_IDS, WRITE_BATCH};
use crate::error::Error;
use crate::hub::{OutFrame, Outbound};
use crate::metrics;

/// Where the writer is: before the login burst it holds routed frames back.
pub(super) enum Phase {
    BeforeLogin {
        held: Vec<OutFrame>,
    },
    /// `written`: messages already written on this connection (by the burst, live, or a
    /// catch-up after a Redis outage), whose second copies are dropped.
    Active {
        written: HashSet<i64>,
    },
}

/// What the writer does after a batch of queue items.
pub(super) enum Flow {
    Continue,
    Stop,
}

/// The writer task's state: it owns the sending half of the socket.
pub(super) struct Writer {
    sink: SplitSink<WebSocket, Message>,
    tracker: Arc<Mutex<Tracker>>,
    phase: Phase,
    max_held: usize,
    cut_off: CancellationToken,
}

fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

impl Writer {
    /// Writes `first` and whatever else is queued (up to a batch), flushes, then sends a
    /// delivery ping if message frames were written and no such ping is in flight.
    async fn drain(
        &mut self,
        first: Outbound,
        queue: &mut mpsc::Receiver<Outbound>,
    ) -> Result<Flow, axum::Error> {
        let mut next = Some(first);
        let mut written = 0;
        while let Some(item) = next {
            if let Flow::Stop = self.handle(item).await? {
                return Ok(Flow::Stop);
            }
            written += 1;
            next = if written < WRITE_BATCH { queue.try_recv().ok() } else { None };
        }
        // The delivery ping goes out in the same write as the frames it follows: one syscall
        // per batch, not two.
        let ping = {
            let mut tracker = lock(&self.tracker);
            tracker.wants_delivery_ping().then(|| tracker.ping())
        };
        if let Some(seq) = ping {
            self.sink.feed(Message::Ping(seq.to_be_bytes().to_vec().into())).await?;
        }
        self.sink.flush().await?;
        Ok(Flow::Continue)
    }

    async fn handle(&mut self, item: Outbound) -> Result<Flow, axum::Error> {
        match item {
            Outbound::Own(frame) => self.write(frame).await?,
            Outbound::Routed(frame) => match &mut self.phase {
                Phase::BeforeLogin { held } => {
                    if held.len() >= self.max_held {
                        self.cut_off.cancel();
                    }
                    held.push(frame);
                }
                Phase::Active { .. } => self.write_routed(frame).await?,
            },
            Outbound::LoginBurst(frames) => {
                let written: HashSet<i64> = frames.iter().filter_map(|f| f.delivers).collect();
                for frame in frames {
                    self.write(frame).await?;
                }
                if let Phase::BeforeLogin { held } =
                    std::mem::replace(&mut self.phase, Phase::Active { written })
                {
                    for frame in held {
                        self.write_routed(frame).await?;
                    }
                }
            }
            Outbound::PingNow => {}
            Outbound::Close { code, reason } => {
                self.sink.send(close_frame(code, &reason)).await?;
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Writes a frame routed from elsewhere, unless this connection already has the message
    /// it delivers (from the login burst, live, or a catch-up after a Redis outage).
    async fn write_routed(&mut self, frame: OutFrame) -> Result<(), axum::Error> {
        if let (Phase::Active { written }, Some(id)) = (&mut self.phase, frame.delivers) {
            if !written.insert(id) {
                return Ok(());
            }
            if written.len() > REMEMBERED_IDS {
                // Forget what the client has confirmed: those are no longer pending in the
                // store, so no catch-up brings them again.
                let tracker = lock(&self.tracker);
                let unconfirmed: HashSet<i64> = tracker
                    .unpinged
                    .iter()
                    .chain(tracker.in_flight.iter().flat_map(|(_, ids)| ids))
                    .copied()
                    .collect();
                written.retain(|id| unconfirmed.contains(id));
                written.insert(id);
            }
        }
        self.write(frame).await
    }

    async fn write(&mut self, frame: OutFrame) -> Result<(), axum::Error> {
        self.sink.feed(Message::Text(frame.text)).await?;
        if let Some(id) = frame.delivers {
            metrics::message_out(frame.committed);
            lock(&self.tracker).unpinged.push(id);
        }
        Ok(())
    }

    async fn ping(&mut self, seq: u64) -> Result<(), axum::Error> {
        self.sink.send(Message::Ping(seq.to_be_bytes().to_vec().into())).await
    }
}

/// The writer task: writes queued frames, pings on a heartbeat, and stops on shutdown, on a
/// cut-off, when the peer stops answering, or when every sender of the queue is gone.
#[allow(clippy::too_many_arguments)]
pub(super) async fn write_loop(
    sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outbound>,
    tracker: Arc<Mutex<Tracker>>,
    cut_off: CancellationToken,
    ended: CancellationToken,
    shutdown: CancellationToken,
    ping_interval: Duration,
    max_held: usize,
) {
    let mut writer = Writer {
        sink,
        tracker,
        phase: Phase::BeforeLogin { held: Vec::new() },
        max_held,
        cut_off: cut_off.clone(),
    };
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<(), axum::Error> = async {
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    writer.sink.send(close_frame(CLOSE_GOING_AWAY, "server shutting down")).await?;
                    return Ok(());
                }
                _ = cut_off.cancelled() => {
                    writer.sink.feed(Message::Text(Error::SlowConsumer.frame().encode().into())).await?;
                    writer.sink.send(close_frame(CLOSE_TRY_AGAIN, "slow consumer")).await?;
                    return Ok(());
                }
                _ = heartbeat.tick() => {
                    let silent = lock(&writer.tracker).last_heard.elapsed();
                    if silent > ping_interval * 2 {
                        tracing::info!(silent_ms = silent.as_millis() as u64, "peer stopped answering pings");
                        writer.sink.send(close_frame(CLOSE_TRY_AGAIN, "no answer to pings")).await?;
                        return Ok(());
                    }
                    let seq = lock(&writer.tracker).ping();
                    writer.ping(seq).await?;
                    continue;
                }
                item = queue.recv() => match item {
                    Some(item) => {
                        metrics::outbound_queue(queue.len());
                        item
                    }
                    None => return Ok(()),
                },
            };
            // A write can block on a peer that does not read; a cut-off or a shutdown must
            // still end the connection then (the unread messages stay pending).
            let flow = tokio::select! {
                biased;
                _ = cut_off.cancelled() => return Ok(()),
                _ = shutdown.cancelled() => return Ok(()),
                flow = writer.drain(first, &mut queue) => flow?,
            };
            if let Flow::Stop = flow {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(error) = result {
        tracing::debug!(%error, "write failed; connection over");
    }
    ended.cancel();
}
