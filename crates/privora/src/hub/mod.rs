//! The hub: who is online on this node, and the fast path from a stored message to the
//! connections that should see it.
//!
//! It is only a cache of the store. Handing a frame to a device queue never blocks: a device
//! whose queue is full is a slow consumer and is cut off (its messages stay pending in the store
//! and come again at its next login), so one stuck client never holds up a sender or grows memory.
//!
//! The `Broker` is the seam to other nodes: `Local` (one node, nothing to share) or `Redis`
//! (`redis.rs`). The code above the hub is the same either way: sessions `join`, `leave`, `send`
//! and ask `online_among`; the hub delivers locally and, with Redis, to the other nodes.

pub mod redis;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::{CloseFrame, Utf8Bytes};
use foldhash::HashMap;
use tokio::sync::mpsc;

use crate::signal::Signal;

/// One WebSocket connection's id, unique in this process.
pub type ConnId = u64;

/// An encoded frame on its way to one connection. Encoded once, shared by every recipient.
#[derive(Debug, Clone)]
pub struct OutFrame {
    pub text: Utf8Bytes,
    /// The stored message this frame delivers, if any: its delivery is confirmed once the
    /// client answers a WebSocket ping sent after it.
    pub delivers: Option<i64>,
    /// When a live message was committed, for the delivery-latency metric.
    pub committed: Option<std::time::Instant>,
}

impl OutFrame {
    pub fn plain(text: impl Into<Utf8Bytes>) -> OutFrame {
        OutFrame { text: text.into(), delivers: None, committed: None }
    }
}

/// What a connection's writer task is asked to do.
///
/// Kept to two words: tokio's bounded queue allocates its first block of 32 slots up front, so
/// every byte here costs 32 bytes on every connection, idle or not (72-byte items made that block
/// 2.3 KiB). The payloads are boxed instead; one small allocation per queued frame is little next
/// to encoding and writing it.
#[derive(Debug)]
pub enum Outbound {
    /// A frame of this connection's own (an answer, an error): written in order.
    Own(Box<OutFrame>),
    /// A frame from elsewhere (a live message, a presence change): held back until the login
    /// burst has been written, so that it never comes before `offline`/`history`/`contacts`.
    Routed(Box<OutFrame>),
    /// The frames that follow a successful login, written as one burst before anything routed.
    LoginBurst(Box<Vec<OutFrame>>),
    /// More deliveries wait for confirmation: send a delivery ping (now, or once the spacing
    /// between delivery pings has passed).
    PingNow,
    /// The answer to the client's `ping` frame: written after a delivery ping for everything
    /// written so far, so that a client's ping round trip also settles its deliveries.
    Pong,
    /// Send this close frame and stop.
    Close(Box<CloseFrame>),
}

const _: () = assert!(std::mem::size_of::<Outbound>() <= 16, "Outbound is one queue slot: keep it small");

/// How the hub reaches one connection.
#[derive(Debug, Clone)]
pub struct Device {
    pub conn: ConnId,
    pub queue: mpsc::Sender<Outbound>,
    /// Raised when the connection must go (slow consumer).
    pub cut_off: Arc<Signal>,
}

impl Device {
    /// Queues `frame` for this connection without waiting; false when it did not take it. A
    /// full queue means a slow consumer: it is cut off (its messages stay pending).
    fn take(&self, frame: OutFrame) -> bool {
        match self.queue.try_send(Outbound::Routed(Box::new(frame))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(conn = self.conn, "slow consumer: outbound queue full, cutting it off");
                self.cut_off.raise();
                false
            }
            // The connection is ending; its messages stay pending.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Where frames for users on other nodes go, and where presence is kept.
#[derive(Default)]
pub enum Broker {
    /// One node: this hub is the whole truth about who is online.
    #[default]
    Local,
    /// Several nodes sharing Redis.
    Redis(Arc<redis::RedisBroker>),
}

#[derive(Default)]
pub struct Hub {
    devices: RwLock<HashMap<String, Vec<Device>>>,
    next_conn: AtomicU64,
    broker: Broker,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    pub fn with_broker(broker: Broker) -> Hub {
        Hub { broker, ..Hub::default() }
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Adds `user` to the shared presence. True when the user was
    /// online nowhere before: its contacts should hear it came online. Once this returns, frames
    /// sent to the user from any node reach this connection.
    ///
    /// Call it right after `register`, with what `register` returned.
    pub async fn join(&self, user: &str, first_here: bool) -> bool {
        match &self.broker {
            Broker::Local => first_here,
            Broker::Redis(_) if !first_here => false,
            Broker::Redis(redis) => redis.join(user).await.unwrap_or_else(|error| {
                tracing::warn!(%error, user, "Redis presence unavailable; the heartbeat will add the user");
                true
            }),
        }
    }

    /// After `unregister` said the user's last connection here is gone: true when the user is
    /// now online nowhere, so its contacts should hear it went offline.
    pub async fn leave(&self, user: &str) -> bool {
        match &self.broker {
            Broker::Local => !self.is_online(user),
            Broker::Redis(redis) => {
                let offline = redis.leave(user).await.unwrap_or_else(|error| {
                    tracing::warn!(%error, user, "Redis presence unavailable; the user expires with the heartbeat");
                    false
                });
                // A connection of the user arrived here meanwhile: keep it routable.
                if self.is_online(user) {
                    let _ = redis.join(user).await;
                    return false;
                }
                offline
            }
        }
    }

    /// Which of `users` are online on any node.
    pub async fn online_among(&self, users: &[String]) -> HashSet<String> {
        if let Broker::Redis(redis) = &self.broker {
            match redis.online(users).await {
                Ok(flags) => {
                    return users.iter().zip(flags).filter(|(_, on)| *on).map(|(u, _)| u.clone()).collect();
                }
                Err(error) => {
                    tracing::warn!(%error, "Redis presence unavailable; answering for this node only")
                }
            }
        }
        users.iter().filter(|u| self.is_online(u)).cloned().collect()
    }

    /// Users with a connection on this node.
    pub fn local_users(&self) -> Vec<String> {
        self.devices.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// Hands `frame` to every connection of `user` on this node and, with Redis, queues it for
    /// the other nodes. Returns how many local connections took it. Never waits.
    pub fn send(&self, user: &str, frame: OutFrame) -> usize {
        if let Broker::Redis(redis) = &self.broker {
            redis.publish(user, &frame);
        }
        self.deliver_local(user, frame)
    }

    /// Publishes what is queued for other nodes and leaves the shared presence (at shutdown,
    /// after the sessions have ended).
    pub async fn close(&self) {
        if let Broker::Redis(redis) = &self.broker {
            redis.close().await;
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a connection of `user`. True when it is the user's first: the user came online.
    pub fn register(&self, user: &str, device: Device) -> bool {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let list = devices.entry(user.to_string()).or_default();
        list.push(device);
        list.len() == 1
    }

    /// Removes a connection. True when it was the user's last: the user went offline.
    pub fn unregister(&self, user: &str, conn: ConnId) -> bool {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let Some(list) = devices.get_mut(user) else { return false };
        list.retain(|d| d.conn != conn);
        if list.is_empty() {
            devices.remove(user);
            true
        } else {
            false
        }
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.devices.read().unwrap_or_else(|e| e.into_inner()).contains_key(user)
    }

    /// Hands `frame` to every connection of `user` on this node; returns how many took it.
    /// By value: the last connection (nearly always the only one) takes the frame itself, and
    /// only the others get copies (a copy of the frame's text is an allocation and two atomic
    /// operations, for every message).
    pub fn deliver_local(&self, user: &str, frame: OutFrame) -> usize {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let Some((last, others)) = devices.get(user).and_then(|list| list.split_last()) else { return 0 };
        let taken = others.iter().filter(|device| device.take(frame.clone())).count();
        taken + usize::from(last.take(frame))
    }

    /// Number of users with at least one connection here.
    pub fn online_users(&self) -> usize {
        self.devices.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(hub: &Hub, capacity: usize) -> (Device, mpsc::Receiver<Outbound>) {
        let (queue, rx) = mpsc::channel(capacity);
        (Device { conn: hub.next_conn_id(), queue, cut_off: Arc::default() }, rx)
    }

    #[test]
    fn first_and_last_device() {
        let hub = Hub::new();
        let (a, _ra) = device(&hub, 4);
        let (b, _rb) = device(&hub, 4);
        assert!(hub.register("u", a.clone()));
        assert!(!hub.register("u", b.clone()));
        assert_eq!(hub.send("u", OutFrame::plain("x")), 2);
        assert!(!hub.unregister("u", a.conn));
        assert!(hub.is_online("u"));
        assert!(hub.unregister("u", b.conn));
        assert!(!hub.is_online("u"));
        assert_eq!(hub.send("u", OutFrame::plain("x")), 0);
    }

    #[tokio::test]
    async fn the_local_broker_answers_from_this_hub() {
        let hub = Hub::new();
        let (a, _ra) = device(&hub, 4);
        let (b, _rb) = device(&hub, 4);
        let first = hub.register("u", a.clone());
        assert!(hub.join("u", first).await, "first connection anywhere");
        let first = hub.register("u", b.clone());
        assert!(!hub.join("u", first).await);
        let online = hub.online_among(&["u".to_string(), "v".to_string()]).await;
        assert_eq!(online, HashSet::from(["u".to_string()]));
        assert!(!hub.unregister("u", a.conn) && !hub.leave("u").await, "still online through b");
        assert!(hub.unregister("u", b.conn) && hub.leave("u").await, "gone everywhere");
    }

    #[test]
    fn a_full_queue_cuts_the_device_off() {
        let hub = Hub::new();
        let (a, _ra) = device(&hub, 1);
        hub.register("u", a.clone());
        assert_eq!(hub.send("u", OutFrame::plain("1")), 1);
        assert!(!a.cut_off.is_raised());
        assert_eq!(hub.send("u", OutFrame::plain("2")), 0);
        assert!(a.cut_off.is_raised());
    }
}
