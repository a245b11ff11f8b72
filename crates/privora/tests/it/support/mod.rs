//! Shared test helpers: start a real server on a temporary SQLite file (or, with
//! `PRIVORA_TEST_DATABASE=postgres`, a fresh schema of the test PostgreSQL), mint tokens, and
//! talk to it with real WebSocket and HTTP clients. Every test file uses these; none copies them.
//! `cluster` starts real processes: `privora serve` nodes, a private Redis, a private PostgreSQL.

#![allow(dead_code)]

pub mod cluster;
pub mod firebase;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use privora::auth::dev::DevVerifier;
use privora::config::{DevSecret, Settings};
use privora::store::UserRecord;
use privora::RunningServer;
use privora_protocol::{Contact, HistoryEntry, OfflineMessage, ServerFrame};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a frame it expects.
pub const PATIENCE: Duration = Duration::from_secs(10);
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    settings: Settings,
}

/// A running server with its own database directory.
pub struct TestServer {
    server: Option<RunningServer>,
    pub dir: Arc<TempDir>,
    pub addr: SocketAddr,
    args: Vec<String>,
    /// The `--database-url` this server runs on (kept across restarts).
    pub database_url: String,
    tokens: DevVerifier,
    /// `Some` for a server in Firebase mode (support/firebase.rs); development mode otherwise.
    firebase: Option<privora::config::FirebaseConfig>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(&[]).await
    }

    /// Starts with extra flags, e.g. `&["--rate-limit", "2"]`.
    pub async fn start_with(extra: &[&str]) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let args = extra.iter().map(|s| s.to_string()).collect();
        let database_url = TestServer::fresh_database_url(dir.path()).await;
        TestServer::launch(dir, args, database_url, None).await
    }

    /// Starts in Firebase mode with this configuration (see `support::firebase`).
    pub async fn start_firebase(firebase: privora::config::FirebaseConfig, extra: &[&str]) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let args = extra.iter().map(|s| s.to_string()).collect();
        let database_url = TestServer::fresh_database_url(dir.path()).await;
        TestServer::launch(dir, args, database_url, Some(firebase)).await
    }

    /// A new, empty database on the backend the tests run on (PRIVORA_TEST_DATABASE).
    async fn fresh_database_url(dir: &std::path::Path) -> String {
        match cluster::test_backend() {
            cluster::Backend::Sqlite => format!("sqlite://{}", dir.join("privora.db").display()),
            cluster::Backend::Postgres => cluster::pg_schema_url().await,
        }
    }

    async fn launch(
        dir: Arc<TempDir>,
        args: Vec<String>,
        database_url: String,
        firebase: Option<privora::config::FirebaseConfig>,
    ) -> TestServer {
        let mut argv: Vec<String> = vec![
            "privora".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--database-url".into(),
            database_url.clone(),
            "--dev-secret".into(),
            SECRET.into(),
            "--allowed-origin".into(),
            "http://localhost:3000".into(),
        ];
        argv.extend(args.iter().cloned());
        let settings = Flags::try_parse_from(&argv).expect("test flags parse").settings;
        let mut config = settings.validate().expect("test config is valid");
        // The tests must never pick up a developer's Firebase credentials from the environment.
        config.auth = match &firebase {
            Some(firebase) => privora::config::AuthMode::Firebase(firebase.clone()),
            None => privora::config::AuthMode::Development { secret: DevSecret::Given(SECRET.into()) },
        };
        let server = privora::start(config).await.expect("server starts");
        let tokens = DevVerifier::new(&DevSecret::Given(SECRET.into())).expect("verifier");
        TestServer { addr: server.addr(), server: Some(server), dir, args, database_url, tokens, firebase }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("privora.db")
    }

    /// Runs one SQL statement on this server's database from a separate connection, whichever
    /// the backend (for tests that break the database under a running server).
    pub async fn execute_sql(&self, sql: &str) {
        use sqlx::Connection;
        if self.database_url.starts_with("postgres") {
            let mut conn =
                sqlx::PgConnection::connect(&self.database_url).await.expect("connect to PostgreSQL");
            sqlx::query(sql).execute(&mut conn).await.expect("SQL runs");
        } else {
            let mut conn =
                sqlx::SqliteConnection::connect(&self.database_url).await.expect("connect to SQLite");
            sqlx::query(sql).execute(&mut conn).await.expect("SQL runs");
        }
    }

    /// Runs a query that returns one integer (a count) on this server's database.
    pub async fn query_i64(&self, sql: &str) -> i64 {
        use sqlx::Connection;
        if self.database_url.starts_with("postgres") {
            let mut conn =
                sqlx::PgConnection::connect(&self.database_url).await.expect("connect to PostgreSQL");
            sqlx::query_scalar(sql).fetch_one(&mut conn).await.expect("SQL runs")
        } else {
            let mut conn =
                sqlx::SqliteConnection::connect(&self.database_url).await.expect("connect to SQLite");
            sqlx::query_scalar(sql).fetch_one(&mut conn).await.expect("SQL runs")
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("server is running")
    }

    /// Stops the server gracefully and starts a new one on the same database.
    pub async fn restart(mut self) -> TestServer {
        self.stop().await;
        TestServer::launch(
            self.dir.clone(),
            self.args.clone(),
            self.database_url.clone(),
            self.firebase.clone(),
        )
        .await
    }

    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// A development token, as `privora token USER --name NAME` prints.
    pub fn token(&self, user: &str, name: Option<&str>) -> String {
        self.tokens.mint(user, name, Duration::from_secs(3600))
    }

    /// Makes a user known, as a first login or `privora token` does.
    pub async fn register(&self, user: &str, name: Option<&str>) {
        self.server()
            .state()
            .store
            .upsert_user(UserRecord {
                user_id: user.into(),
                display_name: name.map(str::to_string),
                email: user.contains('@').then(|| user.to_string()),
            })
            .await
            .expect("register user");
    }

    /// Waits (up to the patience) until the server no longer has `user` online.
    pub async fn wait_until_offline(&self, user: &str) {
        let hub = &self.server().state().hub;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while hub.is_online(user) {
            assert!(tokio::time::Instant::now() < deadline, "{user} is still online");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A WebSocket connection that has not logged in.
    pub async fn connect(&self) -> Client {
        Client::connect_to(&self.ws_url()).await
    }

    /// Connects and logs in as `user` (display name = the user id), reading the login burst.
    pub async fn login(&self, user: &str) -> (Client, Burst) {
        self.login_as(user, Some(user)).await
    }

    /// Connects and logs in as `user` asking for acks, as newer clients may.
    pub async fn login_with_acks(&self, user: &str) -> (Client, Burst) {
        let mut client = self.connect().await;
        let token = self.token(user, Some(user));
        client.send_json(serde_json::json!({"type": "login", "token": token, "acks": true})).await;
        let burst = client.login_burst().await;
        (client, burst)
    }

    pub async fn login_as(&self, user: &str, name: Option<&str>) -> (Client, Burst) {
        let mut client = self.connect().await;
        let burst = client.log_in(&self.token(user, name)).await;
        (client, burst)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = reqwest::Client::new().get(self.url(path));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let response = request.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let body = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            // Best effort: tests that care call stop() or restart() themselves.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(server.shutdown());
            }
        }
    }
}

/// What follows a login, in order.
#[derive(Debug)]
pub struct Burst {
    pub offline: Vec<OfflineMessage>,
    pub history: Vec<HistoryEntry>,
    pub contacts: Vec<Contact>,
    pub online: Vec<String>,
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the next read brought.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Closed(Option<CloseFrame>),
}

impl Client {
    /// A WebSocket connection to `url` that has not logged in.
    pub async fn connect_to(url: &str) -> Client {
        Client::connect_url(url, None).await
    }

    /// Sends `login` with `token` and reads the login burst.
    pub async fn log_in(&mut self, token: &str) -> Burst {
        self.send_json(serde_json::json!({"type": "login", "token": token})).await;
        self.login_burst().await
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn message(&mut self, to: &str, text: &str) {
        self.send_json(serde_json::json!({"type": "message", "to": to, "message": text})).await;
    }

    /// The next text frame or the close; WebSocket pings are answered by the client stack.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let next =
                tokio::time::timeout(PATIENCE, self.ws.next()).await.expect("a frame within the patience");
            match next {
                Some(Ok(Message::Text(text))) => return Event::Text(text.to_string()),
                Some(Ok(Message::Close(frame))) => return Event::Closed(frame),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Event::Closed(None),
            }
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        match self.next_event().await {
            Event::Text(text) => serde_json::from_str(&text).expect("server frames are JSON"),
            Event::Closed(frame) => panic!("connection closed ({frame:?}) while a frame was expected"),
        }
    }

    pub async fn recv(&mut self) -> ServerFrame {
        let value = self.recv_json().await;
        serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("unknown frame {value}: {e}"))
    }

    /// Expects an `error` frame with this code; returns its message.
    pub async fn expect_error(&mut self, code: &str) -> String {
        let frame = self.recv_json().await;
        assert_eq!(frame["type"], "error", "expected an error frame, got {frame}");
        assert_eq!(frame["code"], code, "wrong error code in {frame}");
        frame["message"].as_str().expect("error message is a string").to_string()
    }

    /// Expects the server to close the connection; returns the close code.
    pub async fn expect_close(&mut self) -> u16 {
        match self.next_event().await {
            Event::Closed(frame) => frame.map(|f| u16::from(f.code)).unwrap_or(1006),
            Event::Text(text) => panic!("expected a close, got {text}"),
        }
    }

    /// Sends `{"type":"ping"}` and returns every frame that came before the `pong`: since the
    /// server handles a connection's frames in order, everything sent before has been handled.
    pub async fn sync(&mut self) -> Vec<Value> {
        self.send_json(serde_json::json!({"type": "ping"})).await;
        let mut before = Vec::new();
        loop {
            let frame = self.recv_json().await;
            if frame["type"] == "pong" {
                return before;
            }
            before.push(frame);
        }
    }

    /// Asserts that nothing arrives for a moment (a positive check always comes first in the
    /// tests that use this, so the wait is short).
    pub async fn expect_silence(&mut self) {
        let frames = self.sync().await;
        assert!(frames.is_empty(), "expected no frames, got {frames:?}");
    }

    /// Reads the login burst: `offline`*, `history`, `contacts`, `presence`*.
    pub async fn login_burst(&mut self) -> Burst {
        let mut offline = Vec::new();
        let history = loop {
            match self.recv().await {
                ServerFrame::Offline(m) => offline.push(m),
                ServerFrame::History { messages } => break messages,
                other => panic!("unexpected frame in the login burst: {other:?}"),
            }
        };
        let contacts = match self.recv().await {
            ServerFrame::Contacts { contacts } => contacts,
            other => panic!("expected contacts after history, got {other:?}"),
        };
        let mut online = Vec::new();
        for frame in self.sync().await {
            match serde_json::from_value::<ServerFrame>(frame.clone()) {
                Ok(ServerFrame::Presence { user_id, .. }) => online.push(user_id),
                _ => panic!("unexpected frame after contacts: {frame}"),
            }
        }
        Burst { offline, history, contacts, online }
    }

    /// Waits for the next frame of this type, checking that nothing else came first.
    pub async fn expect_type(&mut self, ty: &str) -> Value {
        let frame = self.recv_json().await;
        assert_eq!(frame["type"], ty, "expected a {ty} frame, got {frame}");
        frame
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Read until the server's close answer, so that the server has seen the close.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, self.ws.next()).await {}
    }
}

impl Client {
    /// For a client that sent frames before its login was answered: reads the burst and every
    /// frame up to the `pong` of a `ping` it sent last, and returns them as JSON.
    pub async fn login_burst_before_pong(&mut self) -> Vec<serde_json::Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.recv_json().await;
            if frame["type"] == "pong" {
                return frames;
            }
            frames.push(frame);
        }
    }
}

impl Client {
    /// Makes sure the server has taken this client's answers to its delivery pings: the first
    /// `ping` round trip makes the client stack read (and answer) every WebSocket ping sent so
    /// far, the second proves the server has handled those answers, since a connection's
    /// frames are handled in order.
    pub async fn confirm_delivery(&mut self) -> Vec<Value> {
        let mut frames = self.sync().await;
        frames.extend(self.sync().await);
        frames
    }
}

// --- deployment and operations (issue 7) -------------------------------------------------------

/// The repository's root directory (where web/, deploy/ and tests/browser/ are).
/// Waits (up to the patience) until `check` says yes.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The first of `candidates` that is an executable file, or a panic that says how to get it:
/// a test whose tool is missing fails, it does not skip.
pub fn require_program(what: &str, candidates: &[&str], install: &str) -> PathBuf {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{what} is not installed ({}); scripts/test installs it: {install}", candidates.join(", "))
    })
}

/// A free TCP port on 127.0.0.1 (for a child process that cannot be told to use port 0).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

impl TestServer {
    pub async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let response =
            reqwest::Client::new().post(self.url(path)).json(&body).send().await.expect("HTTP request");
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap_or(Value::Null))
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        get_text(&self.url(path)).await
    }
}

/// GET any URL (e.g. through a proxy) and return the status and body text.
pub async fn get_text(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.expect("HTTP request");
    (response.status().as_u16(), response.text().await.unwrap_or_default())
}

impl Client {
    /// A WebSocket to any URL (e.g. through a proxy), sending `origin` like a browser would.
    pub async fn connect_url(url: &str, origin: Option<&str>) -> Client {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("WebSocket URL");
        if let Some(origin) = origin {
            request.headers_mut().insert("Origin", origin.parse().expect("origin header"));
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("WebSocket connects");
        Client { ws }
    }
}
