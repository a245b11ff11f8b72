//! A logged-in connection: the user's frames, handled strictly in order. A message is stored
//! (committed) before it is routed; a pong confirms what was written before its ping.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::SplitStream;
use privora_protocol::ClientFrame;

use super::presence::Online;
use super::{binary_frame, live_frame, lock, Conn};
use crate::error::Error;
use crate::hub::Outbound;
use crate::metrics;
use crate::server::AppState;
use crate::store::NewMessage;

/// A logged-in connection.
pub(super) struct Active {
    pub(super) state: Arc<AppState>,
    pub(super) conn: Conn,
    pub(super) user_id: String,
    pub(super) display_name: String,
    pub(super) limiter: Option<RateLimiter>,
    pub(super) _online: Online,
}

impl Active {
    /// Handles the user's frames until the connection ends. By reference: the caller's future
    /// already holds the `Active`, and a second copy in this one would cost every connection.
    pub(super) async fn serve(&mut self, stream: &mut SplitStream<WebSocket>) {
        while let Some(message) = self.conn.next(stream).await {
            // Handling a frame (storing a message, confirming deliveries, answering) takes a
            // future many times the size of waiting for one: boxed, it costs memory only while
            // it runs, not for as long as the connection sits idle.
            if let ControlFlow::Break(()) = Box::pin(self.handle(message)).await {
                break;
            }
        }
    }

    async fn handle(&mut self, message: Result<Message, axum::Error>) -> ControlFlow<()> {
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                self.conn.read_failed(error, self.state.config.max_frame_bytes).await;
                return ControlFlow::Break(());
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
            Message::Close(_) => return ControlFlow::Break(()),
        }
        ControlFlow::Continue(())
    }

    async fn handle_text(&mut self, text: &str) -> Result<(), Error> {
        self.conn.check_size(text, self.state.config.max_frame_bytes)?;
        match ClientFrame::decode(text)? {
            ClientFrame::Message { to, message, msg_id } => self.send(to, message, msg_id).await,
            ClientFrame::Ping => {
                let _ = self.conn.out.send(Outbound::Pong).await;
                Ok(())
            }
            ClientFrame::Login { .. } => Err(Error::BadFrame("already logged in".into())),
        }
    }

    /// Stores a message (committed before anyone hears of it), then routes it live.
    async fn send(
        &mut self,
        to: String,
        message: String,
        msg_id: Option<serde_json::Value>,
    ) -> Result<(), Error> {
        let config = &self.state.config;
        if to.is_empty() {
            return Err(Error::BadFrame("field \"to\" is empty".into()));
        }
        if to.chars().count() > config.max_recipient_chars {
            return Err(Error::BadFrame(format!(
                "field \"to\" is longer than {} characters",
                config.max_recipient_chars
            )));
        }
        if message.is_empty() {
            return Err(Error::BadFrame("field \"message\" is empty".into()));
        }
        if message.chars().count() > config.max_message_chars {
            return Err(Error::BadFrame(format!(
                "field \"message\" is longer than {} characters",
                config.max_message_chars
            )));
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

/// Token bucket: `per_second` sustained, `burst` at once.
pub(super) struct RateLimiter {
    pub(super) per_second: u32,
    pub(super) burst: f64,
    pub(super) tokens: f64,
    pub(super) last: Instant,
}

impl RateLimiter {
    pub(super) fn new(limit: crate::config::RateLimit) -> RateLimiter {
        RateLimiter {
            per_second: limit.per_second,
            burst: limit.burst as f64,
            tokens: limit.burst as f64,
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second as f64)
            .min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_the_burst_then_refuses() {
        let mut limiter = RateLimiter::new(crate::config::RateLimit { per_second: 1, burst: 3 });
        assert!((0..3).all(|_| limiter.allow()));
        assert!(!limiter.allow());
    }
}
