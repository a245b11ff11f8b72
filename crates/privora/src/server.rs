//! Builds the shared state and the HTTP server, runs it, and shuts it down gracefully:
//! stop accepting, close every WebSocket with 1001, then finish every queued write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::dev::{DevVerifier, SecretError};
use crate::auth::Verifier;
use crate::config::{AuthMode, Config, Database};
use crate::directory::Directory;
use crate::firebase::{Firebase, SetupError};
use crate::hub::redis::{BrokerError, RedisBroker};
use crate::hub::{Broker, Hub};
use crate::session::Connections;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// Everything a request or a session needs, shared by all of them.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub verifier: Verifier,
    pub hub: Hub,
    /// The Firebase user directory sync (Firebase mode only).
    pub directory: Option<Arc<Directory>>,
    /// Cancelled when the server shuts down; sessions close with 1001.
    pub shutdown: CancellationToken,
    /// Every running session, so that shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Every open connection's cut-off, so that shutdown can close them.
    pub connections: Connections,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Firebase(#[from] SetupError),
}

/// A server that is listening.
pub struct RunningServer {
    addr: SocketAddr,
    state: Arc<AppState>,
    serve: JoinHandle<std::io::Result<()>>,
}

/// Opens the store, binds the listener and starts serving.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    crate::metrics::install();
    // The store first: it creates the database's folder, where the development secret lives.
    let store: Arc<dyn Store> = Arc::new(crate::metrics::MeteredStore(open_store(&config).await?));
    let (verifier, firebase) = match &config.auth {
        AuthMode::Development { secret } => (Verifier::Development(DevVerifier::new(secret)?), None),
        AuthMode::Firebase(firebase) => {
            let Firebase { verifier, admin } = Firebase::setup(firebase)?;
            (Verifier::Firebase(verifier), Some((admin, firebase.directory_sync)))
        }
    };
    let shutdown = CancellationToken::new();
    let directory =
        firebase.map(|(admin, every)| Directory::start(admin, store.clone(), every, shutdown.child_token()));
    let broker = match &config.redis {
        Some(redis) => Broker::Redis(Arc::new(RedisBroker::connect(redis).await?)),
        None => Broker::Local,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let state = Arc::new(AppState {
        config,
        store,
        verifier,
        hub: Hub::with_broker(broker),
        directory,
        shutdown,
        sessions: TaskTracker::new(),
        connections: Connections::default(),
    });
    if let Broker::Redis(redis) = state.hub.broker() {
        crate::hub::redis::spawn(state.clone(), redis.clone());
    }
    let app = crate::api::router(state.clone());
    let stop = state.shutdown.clone();
    // Without TCP_NODELAY a frame written while the connection's previous one is unacknowledged
    // waits for the client's delayed ACK (up to 40 ms on Linux): that was the p99 at moderate
    // rates. Measured in session 10 (README, Performance, item 26). Go's servers (Centrifugo,
    // Tinode) get it by default.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
        }
    });
    let serve = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    Ok(RunningServer { addr, state, serve })
}

/// Opens the configured database (creating and migrating it as needed).
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    match &config.database {
        Database::Sqlite { path } => Ok(Arc::new(SqliteStore::open(path, config.db_readers).await?)),
        Database::Postgres { url } => Ok(Arc::new(PostgresStore::open(url, config.db_pool).await?)),
    }
}

impl RunningServer {
    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Waits until the server stops by itself (it only does on a fatal listener error).
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.serve).await {
            Ok(result) => result,
            Err(join) => Err(std::io::Error::other(join)),
        }
    }

    /// Graceful shutdown: no new connections, sessions closed with 1001, writes finished.
    pub async fn shutdown(self) {
        let state = self.state;
        state.shutdown.cancel();
        state.connections.cut_all();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.serve).await;
        state.sessions.close();
        if tokio::time::timeout(Duration::from_secs(10), state.sessions.wait()).await.is_err() {
            tracing::warn!("some sessions did not end within 10 s of shutdown");
        }
        state.hub.close().await;
        state.store.close().await;
    }
}
