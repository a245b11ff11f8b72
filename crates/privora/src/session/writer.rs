//! The writer task: owns the sending half of the socket and the connection's bounded queue;
//! holds routed frames back until the login burst is written, drops second copies, pings for
//! delivery and on a heartbeat, and ends the connection on a cut-off, a shutdown or silence.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use foldhash::HashSet;
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use privora_protocol::ServerFrame;
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

use super::tracker::Tracker;
use super::{lock, Conn, CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN, REMEMBERED_IDS, WRITE_BATCH};
use crate::error::Error;
use crate::hub::{ConnId, OutFrame, Outbound};
use crate::metrics;
use crate::server::AppState;
use crate::signal::Signal;

/// Where the writer is: before the login burst it holds routed frames back.
pub(super) enum Phase {
    BeforeLogin {
        held: Vec<OutFrame>,
    },
    /// `written`: messages already written on this connection whose second copies are
    /// dropped: the login burst's, and with Redis every one (see `Writer::remember_live`).
    Active {
        written: HashSet<i64>,
    },
}

/// What the writer does after a batch of queue items.
pub(super) enum Flow {
    Continue,
    Stop,
}

/// What woke the idle writer up.
enum Wake {
    Shutdown,
    CutOff,
    Heartbeat,
    DeliveryPing,
    Item(Outbound),
}

/// The writer task's state: it owns the sending half of the socket.
pub(super) struct Writer {
    sink: SplitSink<WebSocket, Message>,
    tracker: Arc<Mutex<Tracker>>,
    phase: Phase,
    /// Whether live frames are remembered in `Phase::Active::written`. Only a catch-up after a
    /// Redis outage can bring a message written live a second time; on one node, a live frame
    /// can only repeat one of the login burst's, so only those are remembered and looked up
    /// (remembering every message cost a hash insert per message and a set that grew with
    /// the connection's traffic).
    remember_live: bool,
    max_held: usize,
    conn: ConnId,
    /// Raised on a cut-off (by the hub, or by this writer when too much is held back) and on a
    /// shutdown (by `state.connections`).
    cut_off: Arc<Signal>,
    /// Raised by the writer when it stops: the reader stops too.
    ended: Arc<Signal>,
    /// For the shutdown token (only looked at once `cut_off` is raised, to tell which it was)
    /// and the list of open connections this one leaves when it stops.
    state: Arc<AppState>,
    ping_interval: Duration,
    /// How far apart delivery pings are kept now: between the least (`PRIVORA_DELIVERY_PING_MS`)
    /// and the most (`PRIVORA_DELIVERY_PING_MAX_MS`), see `delivery_ping_due`.
    delivery_ping_spacing: Spacing,
    heartbeat: Interval,
    /// When the last ping that carried deliveries went out.
    last_delivery_ping: Option<Instant>,
    /// Armed while deliveries wait for the spacing between delivery pings to pass.
    delivery_timer: Option<Pin<Box<Sleep>>>,
}

fn close_frame(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

impl Writer {
    pub(super) fn new(sink: SplitSink<WebSocket, Message>, conn: &Conn, state: &Arc<AppState>) -> Writer {
        let ping_interval = state.config.ping_interval;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Writer {
            sink,
            tracker: conn.tracker.clone(),
            phase: Phase::BeforeLogin { held: Vec::new() },
            remember_live: matches!(state.hub.broker(), crate::hub::Broker::Redis(_)),
            max_held: state.config.outbound_queue,
            conn: conn.id,
            cut_off: conn.cut_off.clone(),
            ended: conn.ended.clone(),
            state: state.clone(),
            ping_interval,
            delivery_ping_spacing: Spacing::new(
                state.config.delivery_ping_spacing,
                state.config.delivery_ping_max_spacing,
            ),
            heartbeat,
            last_delivery_ping: None,
            delivery_timer: None,
        }
    }

    /// The writer task: writes queued frames, pings on a heartbeat, and stops on shutdown, on a
    /// cut-off, when the peer stops answering, or when every sender of the queue is gone.
    pub(super) async fn run(mut self, mut queue: mpsc::Receiver<Outbound>) {
        if let Err(error) = self.serve(&mut queue).await {
            tracing::debug!(%error, "write failed; connection over");
        }
        self.state.connections.close(self.conn);
        self.ended.raise();
    }

    async fn serve(&mut self, queue: &mut mpsc::Receiver<Outbound>) -> Result<(), axum::Error> {
        loop {
            // The queue before the timers: a wake-up for a frame (nearly every wake-up) does not
            // poll them; they are polled whenever the queue is empty, which a writer that keeps
            // up reaches after every batch. Only a connection whose queue never empties waits
            // for its heartbeat, and its delivery pings go out with its batches (`drain`).
            let wake = tokio::select! {
                biased;
                _ = self.cut_off.raised() => match self.state.shutdown.is_cancelled() {
                    true => Wake::Shutdown,
                    false => Wake::CutOff,
                },
                item = queue.recv() => match item {
                    Some(item) => {
                        metrics::outbound_queue(queue.len());
                        Wake::Item(item)
                    }
                    None => return Ok(()),
                },
                _ = self.heartbeat.tick() => Wake::Heartbeat,
                _ = armed(&mut self.delivery_timer), if self.delivery_timer.is_some() => Wake::DeliveryPing,
            };
            // Writing takes a future many times the size of waiting: boxed, it costs memory
            // only while it runs, not for as long as the connection sits idle.
            if let Flow::Stop = Box::pin(self.wake(wake, queue)).await? {
                return Ok(());
            }
        }
    }

    async fn wake(&mut self, wake: Wake, queue: &mut mpsc::Receiver<Outbound>) -> Result<Flow, axum::Error> {
        match wake {
            Wake::Shutdown => {
                self.sink.send(close_frame(CLOSE_GOING_AWAY, "server shutting down")).await?;
                Ok(Flow::Stop)
            }
            Wake::CutOff => {
                self.sink.feed(Message::Text(Error::SlowConsumer.frame().encode().into())).await?;
                self.sink.send(close_frame(CLOSE_TRY_AGAIN, "slow consumer")).await?;
                Ok(Flow::Stop)
            }
            Wake::Heartbeat => {
                let silent = lock(&self.tracker).last_heard.elapsed();
                if silent > self.ping_interval * 2 {
                    tracing::info!(silent_ms = silent.as_millis() as u64, "peer stopped answering pings");
                    self.sink.send(close_frame(CLOSE_TRY_AGAIN, "no answer to pings")).await?;
                    return Ok(Flow::Stop);
                }
                let seq = lock(&self.tracker).ping();
                self.ping(seq).await?;
                Ok(Flow::Continue)
            }
            Wake::DeliveryPing => {
                self.delivery_timer = None;
                if let Some(seq) = self.delivery_ping_due(false) {
                    self.ping(seq).await?;
                }
                Ok(Flow::Continue)
            }
            // A write can block on a peer that does not read; a cut-off or a shutdown must
            // still end the connection then (the unread messages stay pending).
            Wake::Item(first) => {
                let cut_off = self.cut_off.clone();
                tokio::select! {
                    biased;
                    _ = cut_off.raised() => Ok(Flow::Stop),
                    flow = self.drain(first, queue) => flow,
                }
            }
        }
    }

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
        if let Some(seq) = self.delivery_ping_due(false) {
            self.sink.feed(ping_frame(seq)).await?;
        }
        self.sink.flush().await?;
        Ok(Flow::Continue)
    }

    /// Whether to send a delivery ping now, and its sequence number if so.
    ///
    /// One delivery ping at a time, and at most one per spacing: a connection that receives a
    /// message now and then has it confirmed at once, while a busy one has its messages
    /// confirmed in groups, not a ping and a pong (and a store write) per message. Deliveries
    /// that must wait arm a timer for when the spacing has passed. `force` skips both rules: a
    /// ping for whatever was written goes out, if anything was.
    fn delivery_ping_due(&mut self, force: bool) -> Option<u64> {
        let mut tracker = lock(&self.tracker);
        let wanted = if force { !tracker.unpinged.is_empty() } else { tracker.wants_delivery_ping() };
        if !wanted {
            return None;
        }
        let now = Instant::now();
        match self.last_delivery_ping.map(|last| last + self.delivery_ping_spacing.current) {
            Some(next) if now < next && !force => {
                self.delivery_ping_spacing.waited = true;
                if self.delivery_timer.is_none() {
                    self.delivery_timer = Some(Box::pin(tokio::time::sleep_until(next)));
                }
                None
            }
            _ => {
                if !force {
                    self.delivery_ping_spacing.next();
                }
                self.last_delivery_ping = Some(now);
                Some(tracker.ping())
            }
        }
    }

    async fn handle(&mut self, item: Outbound) -> Result<Flow, axum::Error> {
        match item {
            Outbound::Own(frame) => self.write(*frame).await?,
            Outbound::Routed(frame) => match &mut self.phase {
                Phase::BeforeLogin { held } => {
                    if held.len() >= self.max_held {
                        self.cut_off.raise();
                    }
                    held.push(*frame);
                }
                Phase::Active { .. } => self.write_routed(*frame).await?,
            },
            Outbound::LoginBurst(frames) => {
                let written: HashSet<i64> = frames.iter().filter_map(|f| f.delivers).collect();
                for frame in *frames {
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
            Outbound::Pong => {
                // Whatever was written before gets its delivery ping first, spacing or not: the
                // client answers it before it sends anything after reading this pong.
                if let Some(seq) = self.delivery_ping_due(true) {
                    self.sink.feed(ping_frame(seq)).await?;
                }
                self.write(OutFrame::plain(ServerFrame::Pong.encode())).await?;
            }
            Outbound::Close(frame) => {
                self.sink.send(Message::Close(Some(*frame))).await?;
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Writes a frame routed from elsewhere, unless this connection already has the message
    /// it delivers (from the login burst, or, with Redis, live or from a catch-up).
    async fn write_routed(&mut self, frame: OutFrame) -> Result<(), axum::Error> {
        if let (Phase::Active { written }, Some(id)) = (&mut self.phase, frame.delivers) {
            let seen = match self.remember_live {
                true => !written.insert(id),
                false => written.contains(&id),
            };
            if seen {
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
                if self.remember_live {
                    written.insert(id);
                }
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
        self.sink.send(ping_frame(seq)).await
    }
}

/// The spacing between a connection's delivery pings. It doubles, up to the most, each time
/// deliveries had to wait for it, and drops back to the least once deliveries find it passed.
///
/// Every delivery ping costs the client a pong (a `sendto` of its own) and the server a read
/// and a store write; at the least spacing a busy connection paid that ten times a second. A
/// busy connection's messages are now confirmed about once a second (so a reconnect may bring
/// back up to a second of them, never fewer than were unconfirmed), while one that hears a
/// message now and then still has it confirmed at once. XMPP servers make the same trade by
/// count instead (stream management acks: jackal asks every 25 stanzas, MongooseIM's `ack_freq`
/// sets it).
pub(super) struct Spacing {
    least: Duration,
    most: Duration,
    current: Duration,
    /// Deliveries waited for the spacing to pass since the last delivery ping.
    waited: bool,
}

impl Spacing {
    pub(super) fn new(least: Duration, most: Duration) -> Spacing {
        Spacing { least, most: most.max(least), current: least, waited: false }
    }

    /// A delivery ping goes out: the spacing to keep before the next one.
    fn next(&mut self) {
        self.current = match std::mem::take(&mut self.waited) {
            true => (self.current * 2).min(self.most),
            false => self.least,
        };
    }
}

fn ping_frame(seq: u64) -> Message {
    Message::Ping(seq.to_be_bytes().to_vec().into())
}

/// Waits for the timer, if one is armed (the `select!` only polls this when it is).
async fn armed(timer: &mut Option<Pin<Box<Sleep>>>) {
    if let Some(timer) = timer {
        timer.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spacing_grows_while_deliveries_wait_and_drops_back_when_they_do_not() {
        let ms = Duration::from_millis;
        let mut spacing = Spacing::new(ms(100), ms(1000));
        spacing.next();
        assert_eq!(spacing.current, ms(100), "a quiet connection keeps the least spacing");
        for expected in [200, 400, 800, 1000, 1000] {
            spacing.waited = true;
            spacing.next();
            assert_eq!(spacing.current, ms(expected));
        }
        spacing.next();
        assert_eq!(spacing.current, ms(100), "deliveries that did not wait: back to the least");
    }
}
