//! A connection before and at login: `AwaitingLogin` reads frames until a `login`, verifies the
//! token, registers the connection and sends the login burst (`offline`*, `history`,
//! `contacts`, `presence`*) in the order clients rely on.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::SplitStream;
use privora_protocol::{ClientFrame, Contact, HistoryEntry, OfflineMessage, PresenceStatus, ServerFrame};

use super::active::{Active, RateLimiter};
use super::presence::{announce, Online};
use super::{binary_frame, Conn, CLOSE_POLICY, CLOSE_TRY_AGAIN};
use crate::auth::Identity;
use crate::error::Error;
use crate::hub::{Device, OutFrame, Outbound};
use crate::metrics;
use crate::server::AppState;
use crate::store::{display_name_or_id, with_pending, StoredMessage, UserRecord};

/// A connection that has not logged in yet.
pub(super) struct AwaitingLogin {
    pub(super) state: Arc<AppState>,
    pub(super) conn: Conn,
}

impl AwaitingLogin {
    pub(super) async fn run(self, stream: &mut SplitStream<WebSocket>) -> Option<Active> {
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
                Ok(ClientFrame::Login { token, acks }) => return self.log_in(&token, acks).await,
                Ok(_) => self.conn.error(&Error::LoginRequired).await,
                Err(error) => self.conn.error(&error.into()).await,
            }
        }
    }

    async fn log_in(self, token: &str, acks: bool) -> Option<Active> {
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
                user_id: user_id.into(),
                display_name: display_name.into(),
                acks,
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
        // Independent reads run side by side, each on a connection of the read pool.
        let (known_name, contacts) =
            tokio::try_join!(state.store.display_name(&user_id), state.store.contacts(&user_id))?;
        let display_name = display_name_or_id(known_name.or(identity.display_name), &user_id);
        let device =
            Device { conn: self.conn.id, queue: self.conn.out.clone(), cut_off: self.conn.cut_off.clone() };
        let first_here = state.hub.register(&user_id, device);
        let online = Online { state: state.clone(), user_id: user_id.clone(), conn: self.conn.id };
        let first = state.hub.join(&user_id, first_here).await;
        // Both read after the registration above; a message committed between the two reads is
        // in one or both, and comes live as well (the writer drops a second copy).
        let (pending, latest) = tokio::try_join!(
            state.store.pending(&user_id),
            state.store.latest(&user_id, state.config.history_limit)
        )?;
        let pending_count = pending.len();
        if first {
            announce(state, &user_id, &contacts, PresenceStatus::Online);
        }
        let contact_ids: Vec<String> = contacts.iter().map(|c| c.user_id.clone()).collect();
        let online_contacts = state.hub.online_among(&contact_ids).await;
        let burst = login_burst(pending, &latest, contacts, |user| online_contacts.contains(user));
        let _ = self.conn.out.send(Outbound::LoginBurst(Box::new(burst))).await;
        tracing::info!(conn = self.conn.id, user = %user_id, pending = pending_count, "logged in");
        Ok((user_id, display_name, online))
    }
}

/// The frames that follow a login, in the order clients rely on. `history` lists the latest
/// messages and every pending one.
fn login_burst(
    pending: Vec<StoredMessage>,
    latest: &[StoredMessage],
    contacts: Vec<Contact>,
    is_online: impl Fn(&str) -> bool,
) -> Vec<OutFrame> {
    let messages = with_pending(latest, &pending)
        .into_iter()
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
    let history = ServerFrame::History { messages }.encode();
    let mut frames = Vec::with_capacity(pending.len() + 3);
    for m in pending {
        let frame = ServerFrame::Offline(OfflineMessage {
            from: m.sender,
            to: m.recipient,
            message: m.message,
            timestamp: m.timestamp,
            id: m.id,
            msg_id: m.msg_id,
        });
        frames.push(OutFrame { text: frame.encode().into(), delivers: Some(m.id), committed: None });
    }
    frames.push(OutFrame::plain(history));
    let online: Vec<String> =
        contacts.iter().filter(|c| is_online(&c.user_id)).map(|c| c.user_id.clone()).collect();
    frames.push(OutFrame::plain(ServerFrame::Contacts { contacts }.encode()));
    for user_id in online {
        frames.push(OutFrame::plain(
            ServerFrame::Presence { user_id, status: PresenceStatus::Online }.encode(),
        ));
    }
    frames
}
