//! Presence: a user is online while at least one connection is registered; contacts hear when
//! the first connection comes and the last one goes.

use std::sync::Arc;

use privora_protocol::{Contact, PresenceStatus, ServerFrame};

use crate::hub::{ConnId, OutFrame};
use crate::server::AppState;

/// While it lives, the user has this connection in the hub; dropping it unregisters the
/// connection and, if it was the user's last, tells the user's contacts (read afresh from the
/// store: conversations started during the session count too).
pub(super) struct Online {
    pub(super) state: Arc<AppState>,
    pub(super) user_id: String,
    pub(super) conn: ConnId,
}

/// Tells `user_id`'s contacts, wherever they are connected, that it came online or went offline.
pub(crate) fn announce(state: &AppState, user_id: &str, contacts: &[Contact], status: PresenceStatus) {
    let frame = OutFrame::plain(ServerFrame::Presence { user_id: user_id.to_string(), status }.encode());
    for contact in contacts.iter().filter(|c| c.user_id != user_id) {
        state.hub.send(&contact.user_id, frame.clone());
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
