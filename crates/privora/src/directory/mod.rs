//! The user directory in Firebase mode: a background task copies every Firebase user into the
//! store's indexed users table, at start and then every `PRIVORA_DIRECTORY_SYNC` seconds, so
//! that `/search-users` answers from the local index instead of listing every Firebase user on
//! every request (as the original did). Logins refresh their own row in between (session.rs).
//!
//! API errors do not stop it: it retries with backoff while search keeps answering from the
//! last sync, and `/readyz` says how old that sync is.

pub mod admin;
pub mod credentials;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError, UserRecord};
use admin::{AdminApi, AdminError};

/// First retry after a failed sync; doubles up to the sync interval (or `MAX_BACKOFF`).
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// At most this many pages in one sync (1000 users each): a bound on a runaway page token.
const MAX_PAGES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Api(#[from] AdminError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the admin API returned the same page token twice")]
    PageLoop,
}

/// What `/readyz` reports.
#[derive(Default)]
struct Status {
    last_success: Option<Instant>,
    users: usize,
    last_error: Option<String>,
}

/// The running sync: its status, and a counter tests and probes can watch.
pub struct Directory {
    status: Mutex<Status>,
    completed: AtomicU64,
}

impl Directory {
    /// Starts the background sync; it stops when `shutdown` is cancelled.
    pub fn start(
        api: Arc<AdminApi>,
        store: Arc<dyn Store>,
        every: Option<Duration>,
        shutdown: CancellationToken,
    ) -> Arc<Directory> {
        let directory =
            Arc::new(Directory { status: Mutex::new(Status::default()), completed: AtomicU64::new(0) });
        let task = directory.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = task.run(&api, store.as_ref(), every) => {}
                () = shutdown.cancelled() => {}
            }
        });
        directory
    }

    /// How many syncs have completed.
    pub fn completed_syncs(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    /// The directory part of `/readyz`.
    pub fn report(&self) -> Value {
        let status = self.lock();
        json!({
            "last_sync_age_seconds": status.last_success.map(|at| at.elapsed().as_secs()),
            "users": status.users,
            "syncs": self.completed_syncs(),
            "last_error": status.last_error,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn run(&self, api: &AdminApi, store: &dyn Store, every: Option<Duration>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match sync_once(api, store).await {
                Ok(users) => {
                    tracing::info!(users, "user directory synced from Firebase");
                    {
                        let mut status = self.lock();
                        *status = Status { last_success: Some(Instant::now()), users, last_error: None };
                    }
                    self.completed.fetch_add(1, Ordering::AcqRel);
                    backoff = FIRST_BACKOFF;
                    match every {
                        Some(every) => tokio::time::sleep(every).await,
                        None => return,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = backoff.as_secs(), "user directory sync failed");
                    self.lock().last_error = Some(error.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff =
                        (backoff * 2).min(every.unwrap_or(MAX_BACKOFF).clamp(FIRST_BACKOFF, MAX_BACKOFF));
                }
            }
        }
    }
}

/// Pages through every Firebase user into the users table; returns how many there were.
/// A page's users are upserted concurrently, so the store's writer commits them in a few
/// group transactions; rows that did not change are not rewritten.
async fn sync_once(api: &AdminApi, store: &dyn Store) -> Result<usize, SyncError> {
    let mut page_token: Option<String> = None;
    let mut total = 0;
    for _ in 0..MAX_PAGES {
        let page = api.list_users(page_token.as_deref()).await?;
        total += page.users.len();
        let writes = page.users.into_iter().map(|user| store.upsert_user(record_of(user)));
        join_all(writes).await.into_iter().collect::<Result<Vec<()>, _>>()?;
        match page.next_page_token.filter(|t| !t.is_empty()) {
            Some(next) if page_token.as_deref() == Some(next.as_str()) => return Err(SyncError::PageLoop),
            Some(next) => page_token = Some(next),
            None => return Ok(total),
        }
    }
    Ok(total)
}

/// A Firebase user as a row of the users table: addressed by email, or uid without one, as
/// logins are (`Identity::user_id`).
pub fn record_of(user: admin::AdminUser) -> UserRecord {
    let email = user.email.filter(|e| !e.is_empty());
    UserRecord {
        user_id: email.clone().unwrap_or(user.local_id),
        display_name: user.display_name.filter(|n| !n.is_empty()),
        email,
    }
}
