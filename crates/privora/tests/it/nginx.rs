//! The real nginx (Debian's package) with deploy/nginx.conf in front of a real server: the web
//! client at `/`, REST under `/api/` (prefix stripped), and a whole chat over `/ws`.
//!
//! The config is used as shipped, with only what must differ here replaced: the upstream host
//! names (`backend:8000`, `frontend:80`) become the test server's 127.0.0.1 port, and `listen
//! 80` a free port. nginx runs in the foreground as a child of the test, with its own prefix,
//! pid file and error log in a temporary directory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::{free_port, get_text, repo_root, require_program, Client, TestServer};

struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with deploy/nginx.conf pointed at `backend` (which also serves the web
    /// client, standing in for the frontend container).
    async fn start(backend: &TestServer) -> Nginx {
        let nginx =
            require_program("nginx", &["/usr/sbin/nginx", "/usr/bin/nginx"], "apt-get install -y nginx");
        let shipped =
            std::fs::read_to_string(repo_root().join("deploy/nginx.conf")).expect("deploy/nginx.conf");
        let port = free_port();
        let upstream = format!("127.0.0.1:{}", backend.addr.port());
        let mut conf = shipped.clone();
        for (from, to) in [
            ("server backend:8000;", format!("server {upstream};")),
            ("server frontend:80;", format!("server {upstream};")),
            ("listen 80;", format!("listen 127.0.0.1:{port};")),
            ("access_log /dev/stdout privora;", "access_log off;".to_string()),
        ] {
            assert!(conf.contains(from), "deploy/nginx.conf no longer has {from:?}: update this test");
            conf = conf.replace(from, &to);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = dir.path().display().to_string();
        // Temp files live in the prefix too: the test does not need /var/lib/nginx.
        let temp_paths: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .iter()
            .map(|kind| {
                std::fs::create_dir_all(dir.path().join(kind)).expect("temp dir");
                format!("    {kind}_temp_path {prefix}/{kind};\n")
            })
            .collect();
        assert!(conf.contains("http {\n"), "deploy/nginx.conf has no http block");
        conf = conf.replacen("http {\n", &format!("http {{\n{temp_paths}"), 1);
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let globals = format!("daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log warn;");
        let check = Command::new(&nginx)
            .args(["-t", "-p", &prefix, "-c", &conf_path.display().to_string(), "-g", &globals])
            .output()
            .expect("run nginx -t");
        assert!(
            check.status.success(),
            "nginx -t refused the config:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(&nginx)
            .args(["-p", &prefix, "-c", &conf_path.display().to_string(), "-g", &globals])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx");
        let nginx = Nginx { child, port, dir };
        nginx.wait_until_listening().await;
        nginx
    }

    /// Waits (bounded) until nginx accepts connections.
    async fn wait_until_listening(&self) {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nginx did not listen on {} within 5 s:\n{}", self.port, self.error_log());
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which stops its workers and exits; SIGKILL would leave the
    /// workers running (and listening) as orphans. SIGKILL only if it has not gone in 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_with_token(url: &str, token: &str) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new().get(url).bearer_auth(token).send().await.expect("HTTP request");
    (response.status().as_u16(), response.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn the_deploy_config_routes_web_api_and_websocket() {
    let server = TestServer::start().await;
    let nginx = Nginx::start(&server).await;
    assert!(
        Path::new(&nginx.dir.path().join("nginx.pid")).exists(),
        "nginx wrote its pid into the temp prefix"
    );

    // `/`: the web client.
    let (status, page) = get_text(&nginx.url("/")).await;
    assert_eq!(status, 200, "{}", nginx.error_log());
    assert!(page.contains("<title>Privora</title>"));

    // `/api/`: the REST endpoints, prefix stripped.
    server.register("bob@x.io", Some("Bob Builder")).await;
    let token = server.token("alice@x.io", Some("Alice"));
    let (status, found) = get_with_token(&nginx.url("/api/search-users?q=build"), &token).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found, json!([{"userId": "bob@x.io", "displayName": "Bob Builder"}]));
    let (status, config) = get_with_token(&nginx.url("/api/config"), &token).await;
    assert_eq!((status, config["auth"].as_str()), (200, Some("development")));
    // The metrics stay inside the network.
    let (status, _) = get_text(&nginx.url("/api/metrics")).await;
    assert_eq!(status, 404);

    // `/ws`: a whole chat, with the Origin a browser on the proxy's address sends (the
    // backend's same-origin check sees the proxy's Host, port included).
    let origin = nginx.url("");
    let mut alice = Client::connect_url(&format!("ws://127.0.0.1:{}/ws", nginx.port), Some(&origin)).await;
    alice.log_in(&token).await;
    let mut bob = Client::connect_url(&format!("ws://127.0.0.1:{}/ws", nginx.port), Some(&origin)).await;
    let burst = bob.log_in(&server.token("bob@x.io", Some("Bob Builder"))).await;
    assert!(burst.history.is_empty());
    alice.message("bob@x.io", "through the proxy").await;
    let live = bob.expect_type("message").await;
    assert_eq!(
        (live["from"].as_str(), live["message"].as_str()),
        (Some("alice@x.io"), Some("through the proxy"))
    );
    bob.message("alice@x.io", "and back").await;
    let reply = alice.expect_type("message").await;
    assert_eq!(reply["message"], "and back");
    // Application pings and WebSocket pings (delivery confirmation) pass the proxy too.
    bob.confirm_delivery().await;
    bob.close().await;
    // Bob was away: the message waits and comes at his next login, through the proxy.
    alice.message("bob@x.io", "while you were away").await;
    alice.sync().await;
    let mut bob = Client::connect_url(&format!("ws://127.0.0.1:{}/ws", nginx.port), Some(&origin)).await;
    let missed = bob.log_in(&server.token("bob@x.io", Some("Bob Builder"))).await;
    let offline: Vec<&str> = missed.offline.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(offline, ["while you were away"]);
}
