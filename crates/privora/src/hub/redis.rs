//! The Redis broker: how several nodes behind one proxy share live delivery and presence.
//!
//! Design (see ARCHITECTURE.md, "Many nodes"): one pub/sub channel per node, plus a presence
//! map in Redis that says which nodes hold a connection of each user.
//!
//! - `privora:nodes` (sorted set): node id -> time of its last heartbeat (Redis's clock).
//! - `privora:user:<uid>:nodes` (set): the nodes where the user has a connection.
//! - `privora:node:<id>:users` (set): the users a node holds, so a dead node can be cleaned up.
//! - channel `privora:node:<id>`: frames for the connections of one node.
//!
//! Sending to a user runs one script: it reads the user's live nodes and publishes the frame on
//! each one's channel (never the sender's own: the hub has already delivered locally). Every
//! node heartbeats; one that stops for `presence_ttl` is reaped by whichever live node claims it
//! first, and its users go offline for their contacts unless another node holds them.
//!
//! Redis is only the fast path. A publish that cannot be made is retried for a while; whenever
//! the node (re)subscribes it first writes its users back into the presence map (Redis may have
//! restarted empty) and then re-reads every local user's pending messages from the store, which
//! reaches anything published while it was not listening. A connection never gets one message
//! twice: its writer drops ids it has already written.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use privora_protocol::PresenceStatus;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::config::RedisConfig;
use crate::hub::OutFrame;
use crate::server::AppState;

/// Publishes queued and not yet made; beyond this a publish is dropped (the message stays
/// pending in the store and comes at the recipient's next login or its node's catch-up).
const PUBLISH_QUEUE: usize = 64 * 1024;
/// How long a publish is retried while Redis is unreachable before it is given up.
const PUBLISH_RETRY_FOR: Duration = Duration::from_secs(30);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Counts the live nodes of a user's node set. KEYS[1] = the set, KEYS[2] = `privora:nodes`.
const LIVE_COUNT: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function live_nodes(set, nodes, ttl)
  local oldest = now_ms() - ttl
  local live = {}
  for _, node in ipairs(redis.call('SMEMBERS', set)) do
    local seen = redis.call('ZSCORE', nodes, node)
    if seen and tonumber(seen) >= oldest then table.insert(live, node) end
  end
  return live
end
";

/// The node joins a user. KEYS: user's nodes, node's users, nodes. ARGV: node, user, ttl ms.
/// Returns how many live nodes hold the user now (1: the user just came online).
const JOIN: &str = r"
redis.call('ZADD', KEYS[3], now_ms(), ARGV[1])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return #live_nodes(KEYS[1], KEYS[3], tonumber(ARGV[3]))
";

/// The node leaves a user (also used to reap a dead node). Same KEYS and ARGV as JOIN.
/// Returns how many live nodes still hold the user (0: the user went offline).
const LEAVE: &str = r"
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
local n = 0
for _, node in ipairs(live_nodes(KEYS[1], KEYS[3], tonumber(ARGV[3]))) do
  if node ~= ARGV[1] then n = n + 1 end
end
return n
";

/// Publishes to every live node of a user but the sender's. KEYS: user's nodes, nodes.
/// ARGV: payload, sending node, ttl ms, channel prefix. Returns the number of nodes.
const PUBLISH: &str = r"
local sent = 0
for _, node in ipairs(live_nodes(KEYS[1], KEYS[2], tonumber(ARGV[3]))) do
  if node ~= ARGV[2] then
    redis.call('PUBLISH', ARGV[4] .. node, ARGV[1])
    sent = sent + 1
  end
end
return sent
";

/// Which of the given users are online anywhere. KEYS[1] = nodes, KEYS[2..] = users' node sets.
const ONLINE: &str = r"
local flags = {}
for i = 2, #KEYS do
  flags[i - 1] = (#live_nodes(KEYS[i], KEYS[1], tonumber(ARGV[1])) > 0) and 1 or 0
end
return flags
";

/// Heartbeat: refreshes this node and writes its users back (Redis may have lost them), then
/// returns the nodes silent for longer than the TTL. KEYS: nodes, node's users.
/// ARGV: node, ttl ms, user prefix, user suffix, users...
const HEARTBEAT: &str = r"
local now = now_ms()
local rejoined = redis.call('ZADD', KEYS[1], now, ARGV[1])
for i = 5, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('SADD', ARGV[3] .. ARGV[i] .. ARGV[4], ARGV[1])
end
local answer = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2])))
table.insert(answer, 1, tostring(rejoined))
return answer
";

const NODES: &str = "privora:nodes";
const CHANNEL_PREFIX: &str = "privora:node:";

fn user_nodes(user: &str) -> String {
    format!("privora:user:{user}:nodes")
}

fn node_users(node: &str) -> String {
    format!("privora:node:{node}:users")
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot reach Redis at {url}: {source}")]
    Connect { url: String, source: redis::RedisError },
}

/// A frame on its way to another node.
#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The user whose connections get it.
    u: String,
    /// The stored message it delivers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<i64>,
    /// The encoded frame.
    t: String,
}

enum Publish {
    Frame {
        user: String,
        payload: String,
    },
    /// Everything queued before this has been published (or given up); answered then.
    Flush(oneshot::Sender<()>),
}

/// The Redis side of one node.
pub struct RedisBroker {
    node: String,
    ttl_ms: u64,
    client: redis::Client,
    conn: ConnectionManager,
    publishes: mpsc::Sender<Publish>,
    queue: std::sync::Mutex<Option<mpsc::Receiver<Publish>>>,
    scripts: Scripts,
}

struct Scripts {
    join: Script,
    leave: Script,
    publish: Script,
    online: Script,
    heartbeat: Script,
}

impl RedisBroker {
    /// Connects; fails if Redis cannot be reached now (a node should not start half-blind).
    pub async fn connect(config: &RedisConfig) -> Result<RedisBroker, BrokerError> {
        let url = crate::config::redact(&config.url);
        let client = redis::Client::open(config.url.as_str())
            .map_err(|source| BrokerError::Connect { url: url.clone(), source })?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        let conn = client
            .get_connection_manager_with_config(manager)
            .await
            .map_err(|source| BrokerError::Connect { url, source })?;
        let (publishes, queue) = mpsc::channel(PUBLISH_QUEUE);
        let script = |body: &str| Script::new(&format!("{LIVE_COUNT}\n{body}"));
        Ok(RedisBroker {
            node: format!("{:016x}", rand::random::<u64>()),
            ttl_ms: config.presence_ttl.as_millis() as u64,
            client,
            conn,
            publishes,
            queue: std::sync::Mutex::new(Some(queue)),
            scripts: Scripts {
                join: script(JOIN),
                leave: script(LEAVE),
                publish: script(PUBLISH),
                online: script(ONLINE),
                heartbeat: script(HEARTBEAT),
            },
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// This node now holds `user`. True when no other live node did: the user came online.
    pub async fn join(&self, user: &str) -> Result<bool, redis::RedisError> {
        let live: i64 = self
            .scripts
            .join
            .key(user_nodes(user))
            .key(node_users(&self.node))
            .key(NODES)
            .arg(&self.node)
            .arg(user)
            .arg(self.ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(live <= 1)
    }

    /// `node` no longer holds `user`. True when no other live node does: the user went offline.
    async fn leave_on(&self, node: &str, user: &str) -> Result<bool, redis::RedisError> {
        let others: i64 = self
            .scripts
            .leave
            .key(user_nodes(user))
            .key(node_users(node))
            .key(NODES)
            .arg(node)
            .arg(user)
            .arg(self.ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(others == 0)
    }

    pub async fn leave(&self, user: &str) -> Result<bool, redis::RedisError> {
        self.leave_on(&self.node, user).await
    }

    /// Which of `users` have a connection on some live node.
    pub async fn online(&self, users: &[String]) -> Result<Vec<bool>, redis::RedisError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.scripts.online.key(NODES);
        for user in users {
            invocation.key(user_nodes(user));
        }
        let flags: Vec<i64> = invocation.arg(self.ttl_ms).invoke_async(&mut self.conn.clone()).await?;
        Ok(flags.into_iter().map(|f| f == 1).collect())
    }

    /// Queues `frame` for `user`'s connections on other nodes. Never waits.
    pub fn publish(&self, user: &str, frame: &OutFrame) {
        let envelope =
            Envelope { u: user.to_string(), d: frame.delivers, t: frame.text.as_str().to_string() };
        let Ok(payload) = serde_json::to_string(&envelope) else { return };
        if self.publishes.try_send(Publish::Frame { user: user.to_string(), payload }).is_err() {
            tracing::warn!(
                user,
                "Redis publish queue full: this frame reaches other nodes only by catch-up or login"
            );
        }
    }

    /// Waits until everything queued has been published, then leaves the node list.
    pub async fn close(&self) {
        let (done, flushed) = oneshot::channel();
        if self.publishes.send(Publish::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(PUBLISH_RETRY_FOR, flushed).await;
        }
        let mut conn = self.conn.clone();
        let _: Result<(), _> =
            redis::pipe().zrem(NODES, &self.node).del(node_users(&self.node)).query_async(&mut conn).await;
    }
}

/// Starts the node's Redis tasks: publisher, subscriber (with catch-up), heartbeat (with the
/// reaping of dead nodes). They stop at shutdown.
pub fn spawn(state: Arc<AppState>, broker: Arc<RedisBroker>) {
    if let Some(queue) = broker.queue.lock().ok().and_then(|mut q| q.take()) {
        tokio::spawn(publisher(broker.clone(), queue));
    }
    tokio::spawn(subscriber(state.clone(), broker.clone()));
    tokio::spawn(heartbeat(state, broker));
}

async fn publisher(broker: Arc<RedisBroker>, mut queue: mpsc::Receiver<Publish>) {
    let mut conn = broker.conn.clone();
    while let Some(item) = queue.recv().await {
        let (user, payload) = match item {
            Publish::Frame { user, payload } => (user, payload),
            Publish::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        // In order, one at a time: two messages to one user never overtake each other.
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let result: Result<i64, _> = broker
                .scripts
                .publish
                .key(user_nodes(&user))
                .key(NODES)
                .arg(&payload)
                .arg(&broker.node)
                .arg(broker.ttl_ms)
                .arg(CHANNEL_PREFIX)
                .invoke_async(&mut conn)
                .await;
            match result {
                Ok(_) => break,
                Err(error) if started.elapsed() < PUBLISH_RETRY_FOR => {
                    tracing::debug!(%error, "Redis publish failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
                Err(error) => {
                    tracing::warn!(%error, user, "Redis publish given up; the message stays pending in the store");
                    break;
                }
            }
        }
    }
}

async fn subscriber(state: Arc<AppState>, broker: Arc<RedisBroker>) {
    let channel = format!("{CHANNEL_PREFIX}{}", broker.node);
    let mut pause = Duration::from_millis(50);
    loop {
        if state.shutdown.is_cancelled() {
            return;
        }
        let subscribed = async {
            let mut pubsub = broker.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        match subscribed {
            Ok(pubsub) => {
                pause = Duration::from_millis(50);
                // Listening now: write our users back into the presence map, then read what
                // may have been published while we were not listening.
                if let Err(error) = beat(&state, &broker).await {
                    tracing::warn!(%error, "presence refresh after subscribing failed");
                }
                catch_up(&state).await;
                tracing::info!(node = %broker.node, "subscribed to Redis");
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        _ = state.shutdown.cancelled() => return,
                        message = messages.next() => match message {
                            Some(message) => deliver(&state, message.get_payload_bytes()),
                            None => break,
                        },
                    }
                }
                tracing::warn!("lost the Redis subscription; resubscribing");
            }
            Err(error) => tracing::warn!(%error, "cannot subscribe to Redis; retrying"),
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}

fn deliver(state: &AppState, payload: &[u8]) {
    match serde_json::from_slice::<Envelope>(payload) {
        Ok(envelope) => {
            state.hub.deliver_local(
                &envelope.u,
                OutFrame { text: envelope.t.into(), delivers: envelope.d, committed: None },
            );
        }
        Err(error) => tracing::warn!(%error, "ignoring a malformed frame from Redis"),
    }
}

/// Re-sends every local user's pending messages to its connections (which drop the ones they
/// already have).
async fn catch_up(state: &AppState) {
    for user in state.hub.local_users() {
        match state.store.pending(&user).await {
            Ok(messages) => {
                for message in messages {
                    state.hub.deliver_local(&user, crate::session::live_frame(message));
                }
            }
            Err(error) => {
                tracing::warn!(%error, user, "catch-up read failed; the messages come at next login")
            }
        }
    }
}

async fn heartbeat(state: Arc<AppState>, broker: Arc<RedisBroker>) {
    let every = Duration::from_millis((broker.ttl_ms / 3).max(200));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The very first beat always adds this node; that is a start, not a rejoin.
    let mut first = true;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match beat(&state, &broker).await {
            Ok(Beat { rejoined, dead }) => {
                if rejoined && !first {
                    tracing::warn!(node = %broker.node, "this node had dropped out of the live set; catching up");
                    catch_up(&state).await;
                }
                for node in dead {
                    reap(&state, &broker, &node).await;
                }
                first = false;
            }
            Err(error) => tracing::debug!(%error, "heartbeat failed"),
        }
    }
}

/// What one heartbeat found.
struct Beat {
    /// This node was not in the live set: it had been reaped (a stall longer than the TTL) or
    /// Redis restarted empty. Its users were just written back; what was published to them
    /// meanwhile went nowhere and must be caught up from the store.
    rejoined: bool,
    /// Other nodes that have stopped beating.
    dead: Vec<String>,
}

/// One heartbeat: refreshes this node and its users in the presence map.
async fn beat(state: &AppState, broker: &RedisBroker) -> Result<Beat, redis::RedisError> {
    let users = state.hub.local_users();
    let mut invocation = broker.scripts.heartbeat.key(NODES);
    invocation
        .key(node_users(&broker.node))
        .arg(&broker.node)
        .arg(broker.ttl_ms)
        .arg("privora:user:")
        .arg(":nodes");
    for user in &users {
        invocation.arg(user);
    }
    let mut answer: Vec<String> = invocation.invoke_async(&mut broker.conn.clone()).await?;
    let rejoined = !answer.is_empty() && answer.remove(0) == "1";
    Ok(Beat { rejoined, dead: answer.into_iter().filter(|n| n != &broker.node).collect() })
}

/// Cleans up after a dead node, if this node wins the claim on it: its users go offline for
/// their contacts unless they are connected elsewhere.
async fn reap(state: &AppState, broker: &RedisBroker, node: &str) {
    let mut conn = broker.conn.clone();
    let claimed: i64 = match conn.zrem(NODES, node).await {
        Ok(n) => n,
        Err(_) => return,
    };
    if claimed != 1 {
        return;
    }
    let users: Vec<String> = conn.smembers(node_users(node)).await.unwrap_or_default();
    tracing::info!(dead = node, users = users.len(), "a node stopped beating; its users go offline");
    for user in users {
        match broker.leave_on(node, &user).await {
            Ok(true) if !state.hub.is_online(&user) => match state.store.contacts(&user).await {
                Ok(contacts) => crate::session::announce(state, &user, &contacts, PresenceStatus::Offline),
                Err(error) => tracing::warn!(%error, "could not read contacts for a presence change"),
            },
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not clean up a dead node's user"),
        }
    }
    let _: Result<(), _> = conn.del(node_users(node)).await;
}
