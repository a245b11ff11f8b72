//! Configuration: read once from flags, the environment and a `.env` file, validated at start.
//!
//! Every setting has a flag and an environment variable (`PRIVORA_*`); the original server's names
//! (`DATABASE_URL`, `ALLOWED_ORIGIN`, `FIREBASE_ADMIN_CREDENTIALS_JSON`) are honoured as they are.
//! `Settings` is what the user typed; `Config` is the checked result the server runs on, so a
//! typo is reported before anything listens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

pub use crate::client_addr::TrustedProxies;

/// The raw settings, shared by every subcommand that touches the database or tokens.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Where to listen for HTTP and WebSocket connections.
    #[arg(long, global = true, env = "PRIVORA_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: String,

    /// Database URL: `sqlite://FILE` (created if missing), a plain file path, or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE` (several nodes can share one).
    #[arg(long, global = true, env = "DATABASE_URL", default_value = "sqlite://privora.db")]
    pub database_url: String,

    /// Origins allowed for browsers (CORS and the WebSocket `Origin` check), comma-separated;
    /// `*` allows any. Same-origin pages are always allowed.
    #[arg(long, global = true, env = "ALLOWED_ORIGIN", default_value = "http://localhost:3000")]
    pub allowed_origin: String,

    /// Path to a Firebase service-account JSON. When unset, the server runs in development
    /// auth mode and accepts only tokens made by `privora token`.
    #[arg(long, global = true, env = "FIREBASE_ADMIN_CREDENTIALS_JSON")]
    pub firebase_credentials: Option<PathBuf>,

    /// Secret for development tokens. When unset, one is created on first use and kept in a
    /// file beside the database (`<database>.dev-secret`).
    #[arg(long, global = true, env = "PRIVORA_DEV_SECRET", hide_env_values = true)]
    pub dev_secret: Option<String>,

    /// How many of the latest messages the `history` frame holds (pending ones come on top).
    #[arg(long, global = true, env = "PRIVORA_HISTORY_LIMIT", default_value_t = 200)]
    pub history_limit: u32,

    /// Largest WebSocket text frame accepted, in bytes; larger ones get `too_large`.
    #[arg(long, global = true, env = "PRIVORA_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Longest message text, in characters.
    #[arg(long, global = true, env = "PRIVORA_MAX_MESSAGE_CHARS", default_value_t = 16 * 1024)]
    pub max_message_chars: usize,

    /// Seconds between server WebSocket pings (keep well under the proxy's idle timeout).
    #[arg(long, global = true, env = "PRIVORA_PING_INTERVAL", default_value_t = 25)]
    pub ping_interval: u64,

    /// Least milliseconds between two delivery pings on one connection: how long a message to
    /// a connection that is not busy may wait to be confirmed delivered (it stays pending until
    /// then).
    #[arg(long, global = true, env = "PRIVORA_DELIVERY_PING_MS", default_value_t = 100)]
    pub delivery_ping_ms: u64,

    /// Most milliseconds between two delivery pings on a busy connection: the spacing doubles
    /// from `PRIVORA_DELIVERY_PING_MS` up to this while deliveries keep waiting for it.
    #[arg(long, global = true, env = "PRIVORA_DELIVERY_PING_MAX_MS", default_value_t = 1000)]
    pub delivery_ping_max_ms: u64,

    /// Seconds a new connection has to send `login`.
    #[arg(long, global = true, env = "PRIVORA_LOGIN_TIMEOUT", default_value_t = 10)]
    pub login_timeout: u64,

    /// Messages a connection may send per second, sustained (0 = unlimited).
    #[arg(long, global = true, env = "PRIVORA_RATE_LIMIT", default_value_t = 100)]
    pub rate_limit: u32,

    /// Messages a connection may send in a burst above the sustained rate.
    #[arg(long, global = true, env = "PRIVORA_RATE_BURST", default_value_t = 200)]
    pub rate_burst: u32,

    /// Frames queued for one connection before it counts as a slow consumer and is cut off
    /// (its messages stay pending and come again at its next login).
    #[arg(long, global = true, env = "PRIVORA_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Connections in the database read pool.
    #[arg(long, global = true, env = "PRIVORA_DB_READERS", default_value_t = 4)]
    pub db_readers: u32,

    // --- Firebase (README, "Firebase") ---------------------------------------------------------
    /// Host:port of the Firebase Auth Emulator. When set, the server runs in Firebase mode
    /// against the emulator: unsigned emulator tokens are accepted. Never set it in production.
    #[arg(long, global = true, env = "FIREBASE_AUTH_EMULATOR_HOST")]
    pub firebase_auth_emulator_host: Option<String>,

    /// Firebase project id, when there is no credentials file (emulator only); the credentials'
    /// `project_id` wins otherwise.
    #[arg(long, global = true, env = "FIREBASE_PROJECT_ID")]
    pub firebase_project_id: Option<String>,

    /// Fallback for the project id, as the Admin SDKs read it.
    #[arg(long, global = true, env = "GOOGLE_CLOUD_PROJECT", hide = true)]
    pub google_cloud_project: Option<String>,

    /// Where Google's token-signing certificates are fetched from (x509, JSON by key id).
    #[arg(long, global = true, env = "PRIVORA_FIREBASE_CERTS_URL", default_value = crate::auth::firebase::GOOGLE_CERTS_URL)]
    pub firebase_certs_url: String,

    /// Refuse tokens of disabled users and tokens issued before a revocation (one Admin API
    /// lookup per user, cached briefly).
    #[arg(long, global = true, env = "PRIVORA_CHECK_REVOKED", value_parser = clap::builder::BoolishValueParser::new())]
    pub check_revoked: bool,

    /// Seconds between syncs of the user directory from Firebase (0 = only at start).
    #[arg(long, global = true, env = "PRIVORA_DIRECTORY_SYNC", default_value_t = 300)]
    pub directory_sync: u64,
    /// PostgreSQL only: connections in this node's pool (the writer takes one per batch).
    #[arg(long, global = true, env = "PRIVORA_DB_POOL", default_value_t = 10)]
    pub db_pool: u32,

    /// Redis URL (`redis://HOST:PORT/DB`). When set, nodes share live delivery and presence
    /// through it, so that several nodes can run behind one proxy; requires PostgreSQL.
    #[arg(long, global = true, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// With Redis: seconds after which a node that stopped sending heartbeats counts as dead
    /// and its users go offline for their contacts.
    #[arg(long, global = true, env = "PRIVORA_PRESENCE_TTL", default_value_t = 15)]
    pub presence_ttl: u64,

    /// Log filter, as `RUST_LOG` (e.g. `info`, `privora=debug`).
    #[arg(long, global = true, env = "PRIVORA_LOG", default_value = "info")]
    pub log: String,

    // --- deployment and operations (issue 7) ---
    /// Log format: `text` for people, `json` (one object a line) for log collectors.
    #[arg(long, global = true, value_enum, env = "PRIVORA_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Directory of the web client served at `/`. Defaults to the repository's `web/` (as built);
    /// `none` serves no web client.
    #[arg(long, global = true, env = "PRIVORA_WEB_DIR")]
    pub web_dir: Option<String>,

    /// The Firebase Web SDK configuration (a JSON object: apiKey, authDomain, projectId, ...),
    /// handed to the web client at `/api/config` so it can sign people in with Firebase.
    #[arg(long, global = true, env = "PRIVORA_FIREBASE_WEB_CONFIG")]
    pub firebase_web_config: Option<String>,

    /// Reverse proxies whose `X-Forwarded-For` is believed (comma-separated IPs or CIDRs, e.g.
    /// `127.0.0.1,10.0.0.0/8`). From any other peer the header is ignored.
    #[arg(long, global = true, env = "PRIVORA_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Which kind of database, and where.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite {
        path: PathBuf,
    },
    /// A PostgreSQL URL as given (it may hold a password: never log it, see `Debug`).
    Postgres {
        url: String,
    },
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            Database::Postgres { url } => f.debug_struct("Postgres").field("url", &redact(url)).finish(),
        }
    }
}

/// A URL with its password (if any) replaced by `***`, for logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Several nodes sharing fan-out and presence through Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub url: String,
    /// A node silent for this long is dead; its users go offline.
    pub presence_ttl: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("presence_ttl", &self.presence_ttl)
            .finish()
    }
}

/// How logins are verified. The two never mix in one process.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// Tokens signed locally with a shared secret (`privora token`): for development and tests.
    Development { secret: DevSecret },
    /// Firebase ID tokens (and the Firebase user directory).
    Firebase(FirebaseConfig),
}

/// Firebase mode: where the service account is, or the emulator.
#[derive(Debug, Clone)]
pub struct FirebaseConfig {
    /// The service-account JSON; required unless `emulator_host` is set.
    pub credentials: Option<PathBuf>,
    /// The Auth Emulator's host:port: unsigned emulator tokens are accepted.
    pub emulator_host: Option<String>,
    /// The project id from the environment (the credentials' `project_id` wins).
    pub project_id: Option<String>,
    pub certs_url: String,
    pub check_revoked: bool,
    /// Time between directory syncs; `None` = only at start.
    pub directory_sync: Option<Duration>,
}

/// Where the development secret comes from.
#[derive(Debug, Clone)]
pub enum DevSecret {
    Given(String),
    File(PathBuf),
}

/// The validated configuration the server runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database: Database,
    pub allowed_origins: AllowedOrigins,
    pub auth: AuthMode,
    pub history_limit: u32,
    pub max_frame_bytes: usize,
    pub max_message_chars: usize,
    pub max_recipient_chars: usize,
    pub ping_interval: Duration,
    /// Least time between two delivery pings of a connection (`Writer::delivery_ping_due`).
    pub delivery_ping_spacing: Duration,
    /// Most time between two delivery pings of a busy connection.
    pub delivery_ping_max_spacing: Duration,
    pub login_timeout: Duration,
    pub rate_limit: Option<RateLimit>,
    pub outbound_queue: usize,
    pub db_readers: u32,
    /// PostgreSQL pool size.
    pub db_pool: u32,
    /// None: one node, in-process fan-out and presence.
    pub redis: Option<RedisConfig>,
    /// Where the web client's files are, when it is served.
    pub web_dir: Option<PathBuf>,
    /// The Firebase Web SDK configuration for the web client, when sign-in uses Firebase.
    pub firebase_web_config: Option<serde_json::Value>,
    pub trusted_proxies: TrustedProxies,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// Browser origins that may use the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    Any,
    List(Vec<String>),
}

impl AllowedOrigins {
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::List(list) => {
                list.iter().any(|o| o.eq_ignore_ascii_case(origin.trim_end_matches('/')))
            }
        }
    }
}

/// A setting that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("PRIVORA_LISTEN / --listen {0:?} is not an address like 127.0.0.1:8000")]
    Listen(String),
    #[error("DATABASE_URL {0:?} is not supported: use sqlite://FILE or postgres://USER@HOST:PORT/DATABASE")]
    DatabaseUrl(String),
    #[error("REDIS_URL {0:?} is not a URL like redis://127.0.0.1:6379")]
    RedisUrl(String),
    #[error("REDIS_URL is set but DATABASE_URL is SQLite: several nodes must share one PostgreSQL database")]
    RedisNeedsPostgres,
    #[error("ALLOWED_ORIGIN entry {0:?} is not an origin like https://chat.example.com")]
    Origin(String),
    #[error("{name} must be {rule}, got {value}")]
    Range { name: &'static str, rule: &'static str, value: String },
    #[error("PRIVORA_DEV_SECRET must be at least 32 characters long")]
    ShortSecret,
    #[error(
        "FIREBASE_AUTH_EMULATOR_HOST is set but no project is named: set FIREBASE_PROJECT_ID \
         (e.g. demo-privora) or FIREBASE_ADMIN_CREDENTIALS_JSON"
    )]
    EmulatorProject,
    #[error("FIREBASE_AUTH_EMULATOR_HOST {0:?} is not a host:port like 127.0.0.1:9099")]
    EmulatorHost(String),
    #[error("PRIVORA_TRUSTED_PROXIES entry {0:?} is not an IP address or a CIDR like 10.0.0.0/8")]
    TrustedProxy(String),
    #[error(
        "PRIVORA_FIREBASE_WEB_CONFIG must be a JSON object (the Firebase console's web app config): {0}"
    )]
    FirebaseWebConfig(String),
}

impl Settings {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| ConfigError::Listen(self.listen.clone()))?;
        let database = parse_database_url(&self.database_url)?;
        let allowed_origins = parse_origins(&self.allowed_origin)?;
        let auth = match self.firebase_config()? {
            Some(firebase) => AuthMode::Firebase(firebase),
            None => AuthMode::Development { secret: self.dev_secret_source(&database)? },
        };
        let range = |name, rule, ok: bool, value: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Range { name, rule, value })
            }
        };
        range(
            "PRIVORA_HISTORY_LIMIT",
            "between 0 and 10000",
            self.history_limit <= 10_000,
            self.history_limit.to_string(),
        )?;
        range(
            "PRIVORA_MAX_FRAME_BYTES",
            "between 1024 and 16777216",
            (1024..=16 << 20).contains(&self.max_frame_bytes),
            self.max_frame_bytes.to_string(),
        )?;
        range(
            "PRIVORA_MAX_MESSAGE_CHARS",
            "at least 1",
            self.max_message_chars >= 1,
            self.max_message_chars.to_string(),
        )?;
        range(
            "PRIVORA_PING_INTERVAL",
            "between 1 and 280 seconds",
            (1..=280).contains(&self.ping_interval),
            self.ping_interval.to_string(),
        )?;
        range(
            "PRIVORA_DELIVERY_PING_MS",
            "between 1 and 10000 milliseconds",
            (1..=10_000).contains(&self.delivery_ping_ms),
            self.delivery_ping_ms.to_string(),
        )?;
        range(
            "PRIVORA_DELIVERY_PING_MAX_MS",
            "between PRIVORA_DELIVERY_PING_MS and 60000 milliseconds",
            (self.delivery_ping_ms..=60_000).contains(&self.delivery_ping_max_ms),
            self.delivery_ping_max_ms.to_string(),
        )?;
        range(
            "PRIVORA_LOGIN_TIMEOUT",
            "between 1 and 300 seconds",
            (1..=300).contains(&self.login_timeout),
            self.login_timeout.to_string(),
        )?;
        range(
            "PRIVORA_OUTBOUND_QUEUE",
            "between 16 and 1000000",
            (16..=1_000_000).contains(&self.outbound_queue),
            self.outbound_queue.to_string(),
        )?;
        range(
            "PRIVORA_DB_READERS",
            "between 1 and 64",
            (1..=64).contains(&self.db_readers),
            self.db_readers.to_string(),
        )?;
        range(
            "PRIVORA_DB_POOL",
            "between 2 and 1000",
            (2..=1000).contains(&self.db_pool),
            self.db_pool.to_string(),
        )?;
        range(
            "PRIVORA_PRESENCE_TTL",
            "between 2 and 3600 seconds",
            (2..=3600).contains(&self.presence_ttl),
            self.presence_ttl.to_string(),
        )?;
        let redis = self.redis_config(&database)?;
        let rate_limit = (self.rate_limit > 0)
            .then(|| RateLimit { per_second: self.rate_limit, burst: self.rate_burst.max(1) });
        Ok(Config {
            listen,
            database,
            allowed_origins,
            auth,
            history_limit: self.history_limit,
            max_frame_bytes: self.max_frame_bytes,
            max_message_chars: self.max_message_chars,
            max_recipient_chars: 320,
            ping_interval: Duration::from_secs(self.ping_interval),
            delivery_ping_spacing: Duration::from_millis(self.delivery_ping_ms),
            delivery_ping_max_spacing: Duration::from_millis(self.delivery_ping_max_ms),
            login_timeout: Duration::from_secs(self.login_timeout),
            rate_limit,
            outbound_queue: self.outbound_queue,
            db_readers: self.db_readers,
            db_pool: self.db_pool,
            redis,
            web_dir: resolve_web_dir(self.web_dir.as_deref()),
            firebase_web_config: parse_firebase_web_config(self.firebase_web_config.as_deref())?,
            trusted_proxies: TrustedProxies::parse(&self.trusted_proxies)
                .map_err(ConfigError::TrustedProxy)?,
        })
    }

    /// Firebase mode when credentials or the emulator are configured; `None` = development mode.
    fn firebase_config(&self) -> Result<Option<FirebaseConfig>, ConfigError> {
        let nonempty =
            |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
        let emulator_host = nonempty(&self.firebase_auth_emulator_host);
        if self.firebase_credentials.is_none() && emulator_host.is_none() {
            return Ok(None);
        }
        if let Some(host) = &emulator_host {
            let port = host.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
            if host.contains('/') || !matches!(port, Some(Ok(_))) {
                return Err(ConfigError::EmulatorHost(host.clone()));
            }
        }
        let project_id = nonempty(&self.firebase_project_id).or_else(|| nonempty(&self.google_cloud_project));
        if self.firebase_credentials.is_none() && project_id.is_none() {
            return Err(ConfigError::EmulatorProject);
        }
        Ok(Some(FirebaseConfig {
            credentials: self.firebase_credentials.clone(),
            emulator_host,
            project_id,
            certs_url: self.firebase_certs_url.clone(),
            check_revoked: self.check_revoked,
            directory_sync: (self.directory_sync > 0).then(|| Duration::from_secs(self.directory_sync)),
        }))
    }

    fn redis_config(&self, database: &Database) -> Result<Option<RedisConfig>, ConfigError> {
        let Some(url) = self.redis_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        if !(url.starts_with("redis://") || url.starts_with("redis+unix://") || url.starts_with("unix://")) {
            return Err(ConfigError::RedisUrl(redact(url)));
        }
        if let Database::Sqlite { .. } = database {
            return Err(ConfigError::RedisNeedsPostgres);
        }
        Ok(Some(RedisConfig { url: url.to_string(), presence_ttl: Duration::from_secs(self.presence_ttl) }))
    }

    fn dev_secret_source(&self, database: &Database) -> Result<DevSecret, ConfigError> {
        match &self.dev_secret {
            Some(secret) if secret.len() < 32 => Err(ConfigError::ShortSecret),
            Some(secret) => Ok(DevSecret::Given(secret.clone())),
            None => match database {
                Database::Sqlite { path } => {
                    let mut file = path.clone().into_os_string();
                    file.push(".dev-secret");
                    Ok(DevSecret::File(file.into()))
                }
                // No file beside a server database: the working directory. Several nodes must
                // share one secret, so they should be given PRIVORA_DEV_SECRET.
                Database::Postgres { .. } => Ok(DevSecret::File(PathBuf::from("privora.dev-secret"))),
            },
        }
    }
}

fn parse_database_url(url: &str) -> Result<Database, ConfigError> {
    let url = url.trim();
    if let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        // sqlx and SQLAlchemy spell an absolute path `sqlite:////abs/path`; take both forms.
        let path = rest.split('?').next().unwrap_or(rest);
        if path.is_empty() || path == ":memory:" {
            return Err(ConfigError::DatabaseUrl(url.to_string()));
        }
        let path = path.strip_prefix("//").map(|p| format!("/{p}")).unwrap_or(path.to_string());
        return Ok(Database::Sqlite { path: PathBuf::from(path) });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Database::Postgres { url: url.to_string() });
    }
    if url.contains("://") || url.is_empty() {
        return Err(ConfigError::DatabaseUrl(url.to_string()));
    }
    Ok(Database::Sqlite { path: PathBuf::from(url) })
}

/// `PRIVORA_WEB_DIR`, or the repository's `web/` when this binary was built from a checkout
/// that still has it (so `cargo run` serves the client with no setting at all).
fn resolve_web_dir(setting: Option<&str>) -> Option<PathBuf> {
    match setting.map(str::trim) {
        Some("none") | Some("") => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
            built.is_dir().then_some(built)
        }
    }
}

fn parse_firebase_web_config(text: Option<&str>) -> Result<Option<serde_json::Value>, ConfigError> {
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty()) else { return Ok(None) };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(Some(value)),
        Ok(_) => Err(ConfigError::FirebaseWebConfig("it is not an object".into())),
        Err(e) => Err(ConfigError::FirebaseWebConfig(e.to_string())),
    }
}

fn parse_origins(list: &str) -> Result<AllowedOrigins, ConfigError> {
    let entries: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if entries.contains(&"*") {
        return Ok(AllowedOrigins::Any);
    }
    let mut origins = Vec::new();
    for entry in entries {
        let origin = entry.trim_end_matches('/');
        let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
            && !origin["https://".len().min(origin.len())..].contains('/');
        if !valid {
            return Err(ConfigError::Origin(entry.to_string()));
        }
        origins.push(origin.to_ascii_lowercase());
    }
    Ok(AllowedOrigins::List(origins))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(
            parse_database_url("sqlite://chat.db").unwrap(),
            Database::Sqlite { path: "chat.db".into() }
        );
        assert_eq!(
            parse_database_url("sqlite:///tmp/x.db").unwrap(),
            Database::Sqlite { path: "/tmp/x.db".into() }
        );
        assert_eq!(
            parse_database_url("sqlite:////tmp/x.db").unwrap(),
            Database::Sqlite { path: "/tmp/x.db".into() }
        );
        assert_eq!(
            parse_database_url("sqlite:./chat.db?mode=rwc").unwrap(),
            Database::Sqlite { path: "./chat.db".into() }
        );
        assert_eq!(
            parse_database_url("data/privora.db").unwrap(),
            Database::Sqlite { path: "data/privora.db".into() }
        );
        assert!(parse_database_url("mysql://x").is_err());
        assert_eq!(
            parse_database_url("postgres://u:pw@db:5432/chat").unwrap(),
            Database::Postgres { url: "postgres://u:pw@db:5432/chat".into() }
        );
        assert!(format!("{:?}", parse_database_url("postgresql://u:pw@db/chat").unwrap())
            .contains("u:***@db/chat"));
        assert!(parse_database_url("sqlite::memory:").is_err());
    }

    #[test]
    fn redis_needs_postgres_and_a_redis_url() {
        let settings = |db: &str, redis: Option<&str>| {
            #[derive(clap::Parser)]
            struct Cli {
                #[command(flatten)]
                settings: Settings,
            }
            let mut s = <Cli as clap::Parser>::parse_from([
                "privora",
                "--database-url",
                db,
                "--dev-secret",
                &"s".repeat(32),
            ])
            .settings;
            s.redis_url = redis.map(str::to_string);
            s.validate()
        };
        assert!(settings("postgres://u@h/d", None).unwrap().redis.is_none());
        let redis = settings("postgres://u@h/d", Some("redis://127.0.0.1:6379")).unwrap().redis.unwrap();
        assert_eq!(redis.presence_ttl, Duration::from_secs(15));
        assert!(matches!(settings("sqlite://x.db", Some("redis://h")), Err(ConfigError::RedisNeedsPostgres)));
        assert!(matches!(settings("postgres://u@h/d", Some("http://h")), Err(ConfigError::RedisUrl(_))));
    }

    #[test]
    fn origins() {
        let list = parse_origins("http://localhost:3000, https://Chat.Example.com/").unwrap();
        assert!(list.allows("http://localhost:3000"));
        assert!(list.allows("https://chat.example.com"));
        assert!(!list.allows("https://evil.example.com"));
        assert_eq!(parse_origins("*").unwrap(), AllowedOrigins::Any);
        assert!(parse_origins("localhost:3000").is_err());
        assert!(parse_origins("http://x.io/path").is_err());
    }

    #[test]
    fn firebase_mode() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            settings: Settings,
        }
        let parse = |args: &[&str]| {
            let mut argv = vec!["privora", "--database-url", "sqlite://x.db"];
            argv.extend_from_slice(args);
            <Flags as clap::Parser>::try_parse_from(argv).expect("flags").settings.validate()
        };
        let emulator = ["--firebase-auth-emulator-host", "127.0.0.1:9099"];
        assert!(matches!(parse(&emulator), Err(ConfigError::EmulatorProject)));
        let config =
            parse(&[&emulator[..], &["--firebase-project-id", "demo-x", "--check-revoked"]].concat())
                .unwrap();
        let AuthMode::Firebase(firebase) = config.auth else { panic!("not Firebase mode") };
        assert_eq!(firebase.project_id.as_deref(), Some("demo-x"));
        assert!(firebase.check_revoked && firebase.credentials.is_none());
        assert!(matches!(
            parse(&["--firebase-auth-emulator-host", "http://x", "--firebase-project-id", "p"]),
            Err(ConfigError::EmulatorHost(_))
        ));
        let production = parse(&["--firebase-credentials", "/etc/sa.json", "--directory-sync", "0"]).unwrap();
        let AuthMode::Firebase(firebase) = production.auth else { panic!("not Firebase mode") };
        assert_eq!(firebase.directory_sync, None);
    }

    #[test]
    fn firebase_web_config_must_be_an_object() {
        assert_eq!(parse_firebase_web_config(None).unwrap(), None);
        assert_eq!(parse_firebase_web_config(Some(" ")).unwrap(), None);
        let config = parse_firebase_web_config(Some(r#"{"apiKey":"k","projectId":"p"}"#)).unwrap().unwrap();
        assert_eq!(config["projectId"], "p");
        assert!(parse_firebase_web_config(Some("[1]")).is_err());
        assert!(parse_firebase_web_config(Some("{apiKey:")).is_err());
    }
}
