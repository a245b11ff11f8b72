//! The hub: who is online on this node, and the fast path from a stored message to the
//! connections that should see it.
//!
//! It is only a cache of the store. Handing a frame to a device queue never blocks: a device
//! whose queue is full is a slow consumer and is cut off (its messages stay pending in the store
//! and come again at its next login), so one stuck client never holds up a sender or grows memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
#[derive(Debug)]
pub enum Outbound {
    /// A frame of this connection's own (an answer, an error): written in order.
    Own(OutFrame),
    /// A frame from elsewhere (a live message, a presence change): held back until the login
    /// burst has been written, so that it never comes before `offline`/`history`/`contacts`.
    Routed(OutFrame),
    /// The frames that follow a successful login, written as one burst before anything routed.
    LoginBurst(Vec<OutFrame>),
    /// Send a WebSocket ping now (more deliveries wait for confirmation).
    PingNow,
    /// Send a close frame and stop.
    Close { code: u16, reason: String },
}

/// How the hub reaches one connection.
#[derive(Debug, Clone)]
pub struct Device {
    pub conn: ConnId,
    pub queue: mpsc::Sender<Outbound>,
    /// Cancelled when the connection must go (slow consumer).
    pub cut_off: CancellationToken,
}

#[derive(Default)]
pub struct Hub {
    devices: RwLock<HashMap<String, Vec<Device>>>,
    next_conn: AtomicU64,
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
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

    /// Hands `frame` to every connection of `user`; returns how many took it. Never waits.
    pub fn send(&self, user: &str, frame: &OutFrame) -> usize {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let Some(list) = devices.get(user) else { return 0 };
        let mut taken = 0;
        for device in list {
            match device.queue.try_send(Outbound::Routed(frame.clone())) {
                Ok(()) => taken += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(conn = device.conn, "slow consumer: outbound queue full, cutting it off");
                    device.cut_off.cancel();
                }
                // The connection is ending; its messages stay pending.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        taken
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
        (Device { conn: hub.next_conn_id(), queue, cut_off: CancellationToken::new() }, rx)
    }

    #[test]
    fn first_and_last_device() {
        let hub = Hub::new();
        let (a, _ra) = device(&hub, 4);
        let (b, _rb) = device(&hub, 4);
        assert!(hub.register("u", a.clone()));
        assert!(!hub.register("u", b.clone()));
        assert_eq!(hub.send("u", &OutFrame::plain("x")), 2);
        assert!(!hub.unregister("u", a.conn));
        assert!(hub.is_online("u"));
        assert!(hub.unregister("u", b.conn));
        assert!(!hub.is_online("u"));
        assert_eq!(hub.send("u", &OutFrame::plain("x")), 0);
    }

    #[test]
    fn a_full_queue_cuts_the_device_off() {
        let hub = Hub::new();
        let (a, _ra) = device(&hub, 1);
        hub.register("u", a.clone());
        assert_eq!(hub.send("u", &OutFrame::plain("1")), 1);
        assert!(!a.cut_off.is_cancelled());
        assert_eq!(hub.send("u", &OutFrame::plain("2")), 0);
        assert!(a.cut_off.is_cancelled());
    }
}
