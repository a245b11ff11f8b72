//! One WebSocket connection, from upgrade to close.
//!
//! A session is first `AwaitingLogin`, then `Active` for one verified user; the types make the
//! order impossible to get wrong (nothing but `login` can reach the store before there is an
//! identity). Two tasks share a connection: this module's reader, which handles the client's
//! frames strictly in order (so frames sent right after `login` wait for it), and a writer task
//! that owns the socket's sending half and a bounded queue.
//!
//! Delivery is confirmed at the transport level, because clients of the original protocol never
//! acknowledge anything: after writing message frames the writer sends a WebSocket ping, and
//! once the client's pong for it comes back every message written before it is marked delivered
//! in the store. A connection that dies before that loses nothing: the messages stay pending.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use privora_protocol::{
    ClientFrame, Contact, HistoryEntry, LiveMessage, OfflineMessage, PresenceStatus,
    ServerFrame,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::error::Error;
use crate::hub::{ConnId, Device, OutFrame, Outbound};
use crate::metrics;
use crate::server::AppState;
use crate::store::{display_name_or_id, NewMessage, StoredMessage, UserRecord};

/// Close code for authentication failures only: clients sign the user out on it.
const CLOSE_POLICY: u16 = 1008;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a slow consumer or a peer that stopped answering: clients reconnect.
const CLOSE_TRY_AGAIN: u16 = 1013;
/// Frames larger than this many times the frame limit are not answered but end the connection:
/// the transport refuses to buffer them.
pub const HARD_LIMIT_FACTOR: usize = 4;
/// Frames the writer writes before it flushes and considers a delivery ping.
const WRITE_BATCH: usize = 256;
/// Message ids a writer remembers having written (to drop second copies); past this, it
/// forgets the ones the client has confirmed.
const REMEMBERED_IDS: usize = 4096;

/// Runs one connection to its end.
pub async fn run(socket: WebSocket, state: Arc<AppState>) {
    let _open = metrics::connection();
    let (sink, mut stream) = socket.split();
    let (out, queue) = mpsc::channel(state.config.outbound_queue);
    let conn = Conn {
        id: state.hub.next_conn_id(),
        out,
        tracker: Arc::new(Mutex::new(Tracker::new())),
        cut_off: CancellationToken::new(),
        ended: CancellationToken::new(),
    };
    let writer = tokio::spawn(write_loop(
        sink,
        queue,
        conn.tracker.clone(),
        conn.cut_off.clone(),
        conn.ended.clone(),
        state.shutdown.clone(),
        state.config.ping_interval,
        state.config.outbound_queue,
    ));
    let awaiting = AwaitingLogin { state: state.clone(), conn };
    if let Some(active) = awaiting.run(&mut stream).await {
        let conn = active.serve(&mut stream).await;
        drop(conn);
    }
    // Every sender of the queue is gone now (the hub's went with the `Online` guard): the
    // writer finishes what is queued and stops.
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
}

/// What the reader holds of its connection.
struct Conn {
    id: ConnId,
    out: mpsc::Sender<Outbound>,
    tracker: Arc<Mutex<Tracker>>,
    /// Cancelled by the hub when this connection's queue overflows.
    cut_off: CancellationToken,
    /// Cancelled by the writer when it stops: the reader stops too.
    ended: CancellationToken,
}

impl Conn {
    /// Queues one of our own frames. Waits if the client is not reading: back-pressure on this
    /// connection alone.
    async fn reply(&self, frame: &ServerFrame) {
        let _ = self.out.send(Outbound::Own(OutFrame::plain(frame.encode()))).await;
    }

    async fn error(&self, error: &Error) {
        tracing::debug!(conn = self.id, code = error.code().as_str(), %error, "error frame");
        metrics::error(error.code(), metrics::Via::WebSocket);
        self.reply(&error.frame()).await;
    }

    async fn close(&self, code: u16, reason: &str) {
        let _ = self.out.send(Outbound::Close { code, reason: reason.to_string() }).await;
    }

    fn heard(&self) {
        lock(&self.tracker).last_heard = Instant::now();
    }

    /// Reads the next frame, or None when the connection is over.
    async fn next(&self, stream: &mut SplitStream<WebSocket>) -> Option<Result<Message, axum::Error>> {
        tokio::select! {
            _ = self.ended.cancelled() => None,
            message = stream.next() => {
                self.heard();
                message
            }
        }
    }

    /// The frame-size rule shared by both states: oversized text gets `too_large`.
    fn check_size(&self, text: &str, limit: usize) -> Result<(), Error> {
        if text.len() > limit {
            return Err(Error::TooLarge { size: text.len(), limit });
        }
        Ok(())
    }

    /// A transport error while reading. An over-the-hard-limit frame is answered before closing.
    async fn read_failed(&self, error: axum::Error, limit: usize) {
        let text = error.to_string();
        if text.contains("Space limit exceeded") || text.contains("too long") || text.contains("Message too big") {
            self.error(&Error::TooLarge { size: limit * HARD_LIMIT_FACTOR + 1, limit }).await;
            self.close(CLOSE_TOO_BIG, "frame too large").await;
        } else {
            tracing::debug!(conn = self.id, %error, "read failed");
        }
    }
}

/// A connection that has not logged in yet.
struct AwaitingLogin {
    state: Arc<AppState>,
    conn: Conn,
}

impl AwaitingLogin {
    async fn run(self, stream: &mut SplitStream<WebSocket>) -> Option<Active> {
        let config = &self.state.config;
        let deadline = tokio::time::Instant::now() + config.login_timeout;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.conn.next(stream)).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => {
                    self.conn.read_failed(error, config.max_frame_bytes).await;
                    return None;
                }
                Ok(None) => return None,
                Err(_) => {
                    let error = Error::LoginTimeout(config.login_timeout.as_secs());
                    self.conn.error(&error).await;
                    self.conn.close(CLOSE_POLICY, "login required").await;
                    return None;
                }
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Binary(_) => {
                    self.conn.error(&binary_frame()).await;
                    continue;
                }
                Message::Close(_) => return None,
                Message::Ping(_) => continue,
                Message::Pong(_) => continue,
            };
            if let Err(error) = self.conn.check_size(&text, config.max_frame_bytes) {
                self.conn.error(&error).await;
                continue;
            }
            match ClientFrame::decode(&text) {
                Ok(ClientFrame::Login { token }) => return self.log_in(&token).await,
                Ok(_) => self.conn.error(&Error::LoginRequired).await,
                Err(error) => self.conn.error(&error.into()).await,
            }
        }
    }

    async fn log_in(self, token: &str) -> Option<Active> {
        let identity = match self.state.verifier.verify(token).await {
            Ok(identity) => identity,
            Err(reason) => {
                tracing::info!(conn = self.conn.id, %reason, "login refused");
                let error = Error::from(reason);
                self.conn.error(&error).await;
                match error {
                    Error::InvalidToken(_) => {
                        metrics::login(metrics::Login::InvalidToken);
                        self.conn.close(CLOSE_POLICY, "invalid token").await
                    }
                    _ => self.conn.close(CLOSE_TRY_AGAIN, "login failed, try again").await,
                }
                return None;
            }
        };
        let started = self.start(identity).await;
        metrics::login(if started.is_ok() { metrics::Login::Ok } else { metrics::Login::Failed });
        match started {
            Ok((user_id, display_name, online)) => Some(Active {
                limiter: self.state.config.rate_limit.map(RateLimiter::new),
                state: self.state,
                conn: self.conn,
                user_id,
                display_name,
                _online: online,
            }),
            Err(error) => {
                self.conn.error(&error).await;
                self.conn.close(CLOSE_TRY_AGAIN, "login failed, try again").await;
                None
            }
        }
    }

    /// Registers the user, then sends the login burst: `offline` frames, `history`, `contacts`
    /// and the presence of online contacts. The connection is registered with the hub *before*
    /// the store is read, so a message stored meanwhile is either in the burst or comes live
    /// (the writer drops a live copy of a message the burst already had).
    async fn start(&self, identity: Identity) -> Result<(String, String, Online), Error> {
        let state = &self.state;
        let user_id = identity.user_id().to_string();
        state
            .store
            .upsert_user(UserRecord {
                user_id: user_id.clone(),
                display_name: identity.display_name.clone(),
                email: identity.email.clone(),
            })
            .await?;
        // The name the users table has now: the token's, or the directory's when the token
        // carries none. Messages this session sends carry it.
        let known_name = state.store.display_name(&user_id).await?;
        let display_name = display_name_or_id(known_name.or(identity.display_name), &user_id);
        let contacts = state.store.contacts(&user_id).await?;
        let device = Device { conn: self.conn.id, queue: self.conn.out.clone(), cut_off: self.conn.cut_off.clone() };
        let first_here = state.hub.register(&user_id, device);
        let online = Online { state: state.clone(), user_id: user_id.clone(), conn: self.conn.id };
        let first = state.hub.join(&user_id, first_here).await;
        let pending = state.store.pending(&user_id).await?;
        let history = state.store.history(&user_id, state.config.history_limit).await?;
        if first {
            announce(state, &user_id, &contacts, PresenceStatus::Online);
        }
        let contact_ids: Vec<String> = contacts.iter().map(|c| c.user_id.clone()).collect();
        let online_contacts = state.hub.online_among(&contact_ids).await;
        let burst = login_burst(&pending, &history, contacts, |user| online_contacts.contains(user));
        let _ = self.conn.out.send(Outbound::LoginBurst(burst)).await;
        tracing::info!(conn = self.conn.id, user = %user_id, pending = pending.len(), "logged in");
        Ok((user_id, display_name, online))
    }
}

fn binary_frame() -> Error {
    Error::BadFrame("binary frames are not supported: send JSON text frames".into())
}

/// The frames that follow a login, in the order clients rely on.
fn login_burst(
    pending: &[StoredMessage],
    history: &[StoredMessage],
    contacts: Vec<Contact>,
    is_online: impl Fn(&str) -> bool,
) -> Vec<OutFrame> {
    let mut frames = Vec::with_capacity(pending.len() + 3);
    for m in pending {
        let frame = ServerFrame::Offline(OfflineMessage {
            from: m.sender.clone(),
            to: m.recipient.clone(),
            message: m.message.clone(),
            timestamp: m.timestamp.clone(),
            id: m.id,
            msg_id: m.msg_id.clone(),
        });
        frames.push(OutFrame { text: frame.encode().into(), delivers: Some(m.id), committed: None });
    }
    let messages = history
        .iter()
        .map(|m| HistoryEntry {
            from: m.sender.clone(),
            from_display_name: m.sender_display_name.clone(),
            to: m.recipient.clone(),
            message: m.message.clone(),
            timestamp: m.timestamp.clone(),
            id: m.id,
            msg_id: m.msg_id.clone(),
        })
        .collect();
    frames.push(OutFrame::plain(ServerFrame::History { messages }.encode()));
    let online: Vec<String> = contacts.iter().filter(|c| is_online(&c.user_id)).map(|c| c.user_id.clone()).collect();
    frames.push(OutFrame::plain(ServerFrame::Contacts { contacts }.encode()));
    for user_id in online {
        frames.push(OutFrame::plain(ServerFrame::Presence { user_id, status: PresenceStatus::Online }.encode()));
    }
    frames
}

/// A logged-in connection.
struct Active {
    state: Arc<AppState>,
    conn: Conn,
    user_id: String,
    display_name: String,
    limiter: Option<RateLimiter>,
    _online: Online,
}

impl Active {
    async fn serve(mut self, stream: &mut SplitStream<WebSocket>) -> Conn {
        let limit = self.state.config.max_frame_bytes;
        while let Some(message) = self.conn.next(stream).await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    self.conn.read_failed(error, limit).await;
                    break;
                }
            };
            match message {
                Message::Text(text) => {
                    if let Err(error) = self.handle_text(&text).await {
                        self.conn.error(&error).await;
                    }
                }
                Message::Binary(_) => self.conn.error(&binary_frame()).await,
                Message::Pong(payload) => self.confirm(&payload).await,
                Message::Ping(_) => {}
                Message::Close(_) => break,
            }
        }
        self.conn
    }

    async fn handle_text(&mut self, text: &str) -> Result<(), Error> {
        self.conn.check_size(text, self.state.config.max_frame_bytes)?;
        match ClientFrame::decode(text)? {
            ClientFrame::Message { to, message, msg_id } => self.send(to, message, msg_id).await,
            ClientFrame::Ping => {
                self.conn.reply(&ServerFrame::Pong).await;
                Ok(())
            }
            ClientFrame::Login { .. } => Err(Error::BadFrame("already logged in".into())),
        }
    }

    /// Stores a message (committed before anyone hears of it), then routes it live.
    async fn send(&mut self, to: String, message: String, msg_id: Option<serde_json::Value>) -> Result<(), Error> {
        let config = &self.state.config;
        if to.is_empty() {
            return Err(Error::BadFrame("field \"to\" is empty".into()));
        }
        if to.chars().count() > config.max_recipient_chars {
            return Err(Error::BadFrame(format!("field \"to\" is longer than {} characters", config.max_recipient_chars)));
        }
        if message.is_empty() {
            return Err(Error::BadFrame("field \"message\" is empty".into()));
        }
        if message.chars().count() > config.max_message_chars {
            return Err(Error::BadFrame(format!("field \"message\" is longer than {} characters", config.max_message_chars)));
        }
        if let Some(limiter) = &mut self.limiter {
            if !limiter.allow() {
                return Err(Error::RateLimited(limiter.per_second));
            }
        }
        let stored = self
            .state
            .store
            .append(NewMessage {
                sender: self.user_id.clone(),
                sender_display_name: self.display_name.clone(),
                recipient: to,
                message,
                msg_id,
            })
            .await?;
        metrics::message_in();
        self.state.hub.send(&stored.recipient, &live_frame(&stored));
        Ok(())
    }

    /// A pong came back: everything written before its ping has reached the client.
    async fn confirm(&self, payload: &[u8]) {
        let Ok(seq) = <[u8; 8]>::try_from(payload).map(u64::from_be_bytes) else { return };
        let (delivered, more) = lock(&self.conn.tracker).pong(seq);
        if !delivered.is_empty() {
            if let Err(error) = self.state.store.mark_delivered(&self.user_id, delivered).await {
                // Not fatal: the messages stay pending and come again at the next login.
                tracing::warn!(conn = self.conn.id, %error, "could not mark messages delivered");
            }
        }
        if more {
            let _ = self.conn.out.try_send(Outbound::PingNow);
        }
    }
}

/// While it lives, the user has this connection in the hub; dropping it unregisters the
/// connection and, if it was the user's last, tells the user's contacts (read afresh from the
/// store: conversations started during the session count too).
struct Online {
    state: Arc<AppState>,
    user_id: String,
    conn: ConnId,
}

/// The `message` frame that delivers a stored message live.
pub(crate) fn live_frame(stored: &StoredMessage) -> OutFrame {
    let frame = ServerFrame::Message(LiveMessage {
        from: stored.sender.clone(),
        from_display_name: stored.sender_display_name.clone(),
        to: stored.recipient.clone(),
        message: stored.message.clone(),
        timestamp: stored.timestamp.clone(),
        id: stored.id,
        msg_id: stored.msg_id.clone(),
    });
    // Delivery latency is measured from here: the message was committed just before.
    OutFrame { text: frame.encode().into(), delivers: Some(stored.id), committed: Some(std::time::Instant::now()) }
}

/// Tells `user_id`'s contacts, wherever they are connected, that it came online or went offline.
pub(crate) fn announce(state: &AppState, user_id: &str, contacts: &[Contact], status: PresenceStatus) {
    let frame = OutFrame::plain(ServerFrame::Presence { user_id: user_id.to_string(), status }.encode());
    for contact in contacts.iter().filter(|c| c.user_id != user_id) {
        state.hub.send(&contact.user_id, &frame);
    }
}

impl Drop for Online {
    fn drop(&mut self) {
        if !self.state.hub.unregister(&self.user_id, self.conn) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let state = self.state.clone();
        let user_id = std::mem::take(&mut self.user_id);
        runtime.spawn(async move {
            // Still connected on another node: say nothing.
            if !state.hub.leave(&user_id).await {
                return;
            }
            match state.store.contacts(&user_id).await {
                // Back already (another connection logged in meanwhile): say nothing.
                Ok(_) if state.hub.is_online(&user_id) => {}
                Ok(contacts) => announce(&state, &user_id, &contacts, PresenceStatus::Offline),
                Err(error) => tracing::warn!(%error, "could not read contacts for a presence change"),
            }
        });
    }
}

/// Which written message frames await a pong, and when the client was last heard.
struct Tracker {
    /// Delivered frames written since the last ping.
    unpinged: Vec<i64>,
    /// Pings sent and not yet answered, with the deliveries each confirms.
    in_flight: VecDeque<(u64, Vec<i64>)>,
    next_seq: u64,
    last_heard: Instant,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker { unpinged: Vec::new(), in_flight: VecDeque::new(), next_seq: 1, last_heard: Instant::now() }
    }

    /// One ping at a time carries deliveries: pings are coalesced, not one per message.
    fn wants_delivery_ping(&self) -> bool {
        !self.unpinged.is_empty() && self.in_flight.is_empty()
    }

    fn ping(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back((seq, std::mem::take(&mut self.unpinged)));
        seq
    }

    /// Returns the deliveries the pong confirms, and whether more wait for a ping.
    fn pong(&mut self, seq: u64) -> (Vec<i64>, bool) {
        let mut delivered = Vec::new();
        while self.in_flight.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, ids)) = self.in_flight.pop_front() {
                delivered.extend(ids);
            }
        }
        (delivered, !self.unpinged.is_empty())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Token bucket: `per_second` sustained, `burst` at once.
struct RateLimiter {
    per_second: u32,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(limit: crate::config::RateLimit) -> RateLimiter {
        RateLimiter { per_second: limit.per_second, burst: limit.burst as f64, tokens: limit.burst as f64, last: Instant::now() }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second as f64).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where the writer is: before the login burst it holds routed frames back.
enum Phase {
    BeforeLogin { held: Vec<OutFrame> },
    /// `written`: messages already written on this connection (by the burst, live, or a
    /// catch-up after a Redis outage), whose second copies are dropped.
    Active { written: HashSet<i64> },
}

/// What the writer does after a batch of queue items.
enum Flow {
    Continue,
    Stop,
}

/// The writer task's state: it owns the sending half of the socket.
struct Writer {
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
    async fn drain(&mut self, first: Outbound, queue: &mut mpsc::Receiver<Outbound>) -> Result<Flow, axum::Error> {
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
                if let Phase::BeforeLogin { held } = std::mem::replace(&mut self.phase, Phase::Active { written }) {
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
                let unconfirmed: HashSet<i64> =
                    tracker.unpinged.iter().chain(tracker.in_flight.iter().flat_map(|(_, ids)| ids)).copied().collect();
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
async fn write_loop(
    sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outbound>,
    tracker: Arc<Mutex<Tracker>>,
    cut_off: CancellationToken,
    ended: CancellationToken,
    shutdown: CancellationToken,
    ping_interval: Duration,
    max_held: usize,
) {
    let mut writer = Writer { sink, tracker, phase: Phase::BeforeLogin { held: Vec::new() }, max_held, cut_off: cut_off.clone() };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pong_confirms_everything_before_its_ping() {
        let mut t = Tracker::new();
        t.unpinged.extend([1, 2]);
        assert!(t.wants_delivery_ping());
        let first = t.ping();
        t.unpinged.push(3);
        assert!(!t.wants_delivery_ping(), "one delivery ping in flight at a time");
        let second = t.ping();
        assert_eq!(t.pong(first), (vec![1, 2], false));
        assert_eq!(t.pong(second), (vec![3], false));
        assert_eq!(t.pong(second), (vec![], false));
    }

    #[test]
    fn rate_limiter_allows_the_burst_then_refuses() {
        let mut limiter = RateLimiter::new(crate::config::RateLimit { per_second: 1, burst: 3 });
        assert!((0..3).all(|_| limiter.allow()));
        assert!(!limiter.allow());
    }
}
