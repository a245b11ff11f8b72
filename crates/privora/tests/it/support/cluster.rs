//! Real outside parts for the tests: a fresh schema of the shared test PostgreSQL per server,
//! and processes a test starts and owns: `privora serve` nodes, a private `redis-server`, a
//! private PostgreSQL cluster (initdb + pg_ctl). Nothing here ever stops a server it did not
//! start: the machine's shared PostgreSQL and Redis are only ever used, never stopped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sqlx::Connection;
use tempfile::TempDir;

use super::{Burst, Client, SECRET};

/// Which database the WebSocket tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// `PRIVORA_TEST_DATABASE=postgres` runs every `TestServer` on PostgreSQL; unset or `sqlite`
/// on SQLite. Anything else is a mistake worth stopping for.
pub fn test_backend() -> Backend {
    match std::env::var("PRIVORA_TEST_DATABASE").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => Backend::Sqlite,
        Ok("postgres") => Backend::Postgres,
        Ok(other) => panic!("PRIVORA_TEST_DATABASE={other:?}: use sqlite or postgres"),
    }
}

/// The shared test PostgreSQL (trust auth, database `test`).
pub fn pg_base_url() -> String {
    std::env::var("PRIVORA_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Schemas of earlier runs older than this are dropped, so the test database does not fill up;
/// a run in progress is never touched.
const STALE_SCHEMA_SECS: u64 = 3600;

/// A URL for a brand-new, empty schema of the test database: every server or store gets its
/// own, so tests and concurrent runs never see each other's rows.
pub async fn pg_schema_url() -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let schema = format!("privora_t_{now}_{:016x}", rand::random::<u64>());
    let mut conn = sqlx::PgConnection::connect(&pg_base_url()).await.unwrap_or_else(|e| {
        panic!("the test PostgreSQL at {} must answer (scripts/test starts it): {e}", pg_base_url())
    });
    static CLEANED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    CLEANED
        .get_or_init(|| async {
            let Ok(mut conn) = sqlx::PgConnection::connect(&pg_base_url()).await else { return };
            let old: Vec<String> = sqlx::query_scalar(
                "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'privora\\_t\\_%'",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
            for name in old {
                let born = name.split('_').nth(2).and_then(|t| t.parse::<u64>().ok()).unwrap_or(now);
                if now.saturating_sub(born) > STALE_SCHEMA_SECS {
                    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                        .execute(&mut conn)
                        .await;
                }
            }
        })
        .await;
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&mut conn)
        .await
        .expect("create a test schema");
    let base = pg_base_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options[search_path]={schema}")
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Waits (bounded) until `ready` says yes; panics with `what` if it never does.
pub async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    for _ in 0..300 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gave up waiting: {what}");
}

/// A development token for `user` (display name = the user id), valid for an hour.
pub fn token(user: &str) -> String {
    privora::auth::dev::DevVerifier::new(&privora::config::DevSecret::Given(SECRET.into()))
        .expect("verifier")
        .mint(user, Some(user), Duration::from_secs(3600))
}

/// A `privora serve` process of this test.
pub struct Node {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Node {
    /// Starts `privora serve` on an ephemeral port, with a short presence TTL so a dead node's
    /// users go offline quickly.
    pub async fn spawn(database_url: &str, redis_url: Option<&str>) -> Node {
        Node::spawn_with(database_url, redis_url, &[]).await
    }

    /// `spawn` with more environment variables, set last (so they may override the above).
    pub async fn spawn_with(database_url: &str, redis_url: Option<&str>, env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("node.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_privora"));
        command
            .arg("serve")
            .current_dir(dir.path())
            .env_remove("FIREBASE_ADMIN_CREDENTIALS_JSON")
            .env_remove("REDIS_URL")
            .env("PRIVORA_LISTEN", "127.0.0.1:0")
            .env("DATABASE_URL", database_url)
            .env("PRIVORA_DEV_SECRET", SECRET)
            .env("PRIVORA_PRESENCE_TTL", "2")
            .env("PRIVORA_LOG", "info,privora=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(url) = redis_url {
            command.env("REDIS_URL", url);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("privora serve starts");
        let mut addr = None;
        for _ in 0..300 {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            addr = listening_addr(&text);
            if addr.is_some() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("privora serve exited with {status}:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let addr = addr.unwrap_or_else(|| {
            panic!("privora serve never listened:\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        Node { child, addr, log, _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn connect(&self) -> Client {
        Client::connect_to(&format!("ws://{}/ws", self.addr)).await
    }

    pub async fn login(&self, user: &str) -> (Client, Burst) {
        let mut client = self.connect().await;
        let burst = client.log_in(&token(user)).await;
        (client, burst)
    }

    /// Logs in asking for acks (docs/protocol.md).
    pub async fn login_with_acks(&self, user: &str) -> (Client, Burst) {
        let mut client = self.connect().await;
        client.send_json(serde_json::json!({"type": "login", "token": token(user), "acks": true})).await;
        let burst = client.login_burst().await;
        (client, burst)
    }

    /// SIGKILL: no goodbye, no cleanup; what it held must survive elsewhere.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP / SIGCONT: a node that stalls (a VM pause, a swap storm) and then goes on.
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The address in the "privora is listening" log line.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("privora is listening"))?;
    let start = line.find("addr=")? + "addr=".len();
    line[start..].split_whitespace().next()?.parse().ok()
}

/// A `redis-server` of this test alone, on a free port, keeping nothing on disk.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let mut redis =
            PrivateRedis { port: free_port(), child: None, dir: tempfile::tempdir().expect("temp dir") };
        redis.start_again().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port, empty: as a Redis without persistence restarts.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "this Redis is already running");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_until("the private redis-server answers", || redis_answers(port)).await;
    }

    /// Kills it; everything it held is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

/// A PostgreSQL cluster of this test alone (initdb + pg_ctl from the installed binaries), on a
/// free port, trust auth. initdb refuses to run as root, so as root it runs as `postgres`.
pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    dir: TempDir,
}

impl PrivatePostgres {
    pub async fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (scripts/test installs it)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::Builder::new().prefix("privora-pg-").tempdir_in("/tmp").expect("temp dir");
        if running_as_root() {
            let status =
                Command::new("chown").arg("postgres:postgres").arg(dir.path()).status().expect("chown");
            assert!(status.success(), "chown of the private PostgreSQL directory failed");
        }
        let pg = PrivatePostgres { port: free_port(), bin, dir };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &["-D", path_str(&data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
        );
        pg.start_again().await;
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub async fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            path_str(self.dir.path())
        );
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        self.run("pg_ctl", &["-D", path_str(&data), "-l", path_str(&log), "-o", &options, "-w", "start"]);
        let port = self.port;
        wait_until("the private PostgreSQL listens", || TcpStream::connect(("127.0.0.1", port)).is_ok())
            .await;
    }

    /// Stops it (fast mode: open connections are cut, as in a crash or a failover).
    pub fn stop(&self) {
        let data = self.dir.path().join("data");
        self.run("pg_ctl", &["-D", path_str(&data), "-m", "fast", "-w", "stop"]);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let output = command.args(args).current_dir(self.dir.path()).output().expect("run a PostgreSQL tool");
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        if data.join("postmaster.pid").exists() {
            let path = self.bin.join("pg_ctl");
            let args = ["-D", path_str(&data), "-m", "immediate", "-w", "stop"];
            let _ = if running_as_root() {
                Command::new("runuser").args(["-u", "postgres", "--"]).arg(&path).args(args).output()
            } else {
                Command::new(&path).args(args).output()
            };
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn signal(pid: u32, which: &str) {
    let status = Command::new("kill").args([which, &pid.to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill {which} {pid} failed");
}
