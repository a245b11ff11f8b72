//! The bare relay: the physical limit Privora is compared against.
//!
//! A minimal in-memory WebSocket relay speaking the same frames: no storage, no auth (the login
//! token *is* the user id), no delivery confirmation. It decodes each client frame with the
//! protocol crate and encodes the same `message` frame a Privora server sends (with an id and a
//! timestamp), so both sides move the same bytes. Same transport as Privora: tokio-tungstenite
//! with 4 KiB read buffers, one reader and one writer task per connection, a bounded queue per
//! connection and a write batch flushed once. It runs as its own process (`privora-bench relay`)
//! so that its memory and CPU are measured exactly like the server's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use futures_util::{SinkExt, StreamExt};
use privora_protocol::{ClientFrame, LiveMessage, ServerFrame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Read buffer per socket: tungstenite's default (128 KiB) would dominate idle memory.
pub const READ_BUFFER: usize = 4096;
/// Frames queued per connection before the relay drops (it has nowhere to keep them).
const QUEUE: usize = 1024;
/// Frames written before one flush.
const WRITE_BATCH: usize = 256;

#[derive(Default)]
struct Relay {
    users: RwLock<HashMap<String, mpsc::Sender<Message>>>,
    next_id: AtomicI64,
}

/// The WebSocket settings both the relay and the bench's clients use.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(READ_BUFFER)
}

/// Serves until the process is killed. Prints `listening <addr>` on stdout once bound.
pub async fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let relay = Arc::new(Relay::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, relay.clone()));
    }
}

async fn connection(stream: TcpStream, relay: Arc<Relay>) {
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await else { return };
    let (mut sink, mut stream) = ws.split();
    let (out, mut queue) = mpsc::channel::<Message>(QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(first) = queue.recv().await {
            let mut next = Some(first);
            let mut written = 0;
            while let Some(message) = next {
                if sink.feed(message).await.is_err() {
                    return;
                }
                written += 1;
                next = if written < WRITE_BATCH { queue.try_recv().ok() } else { None };
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut user: Option<String> = None;
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else { continue };
        match (ClientFrame::decode(&text), &user) {
            (Ok(ClientFrame::Login { token, .. }), None) => {
                relay.users.write().unwrap_or_else(|e| e.into_inner()).insert(token.clone(), out.clone());
                let contacts = ServerFrame::Contacts { contacts: Vec::new() }.encode();
                let _ = out.send(Message::Text(contacts.into())).await;
                user = Some(token);
            }
            (Ok(ClientFrame::Message { to, message, msg_id }), Some(from)) => {
                let frame = ServerFrame::Message(LiveMessage {
                    from: from.clone(),
                    from_display_name: from.clone(),
                    to: to.clone(),
                    message,
                    timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    id: relay.next_id.fetch_add(1, Ordering::Relaxed) + 1,
                    msg_id,
                });
                let text = Message::Text(frame.encode().into());
                let users = relay.users.read().unwrap_or_else(|e| e.into_inner());
                if let Some(queue) = users.get(&to) {
                    let _ = queue.try_send(text);
                }
            }
            (Ok(ClientFrame::Ping), _) => {
                let _ = out.send(Message::Text(ServerFrame::Pong.encode().into())).await;
            }
            _ => {}
        }
    }
    if let Some(user) = user {
        relay.users.write().unwrap_or_else(|e| e.into_inner()).remove(&user);
    }
    drop(out);
    let _ = writer.await;
}
