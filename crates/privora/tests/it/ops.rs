//! Deployment and operations: the web client at `/`, `/api/config`, `/api/dev/token`,
//! `/metrics` and `/api/openapi.json`.

use serde_json::json;

use crate::support::cluster::Node;
use crate::support::TestServer;

#[tokio::test]
async fn serves_the_web_client_at_the_root() {
    let server = TestServer::start().await;
    let (status, page) = server.get_text("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>Privora</title>"), "{page}");
    let (status, script) = server.get_text("/app.js").await;
    assert_eq!(status, 200);
    assert!(script.contains("new WebSocket"));
    // The API keeps its paths next to the files.
    let (status, _) = server.get_text("/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = server.get_text("/no-such-file.txt").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn web_dir_none_serves_no_client() {
    let server = TestServer::start_with(&["--web-dir", "none"]).await;
    let (status, _) = server.get_text("/").await;
    assert_eq!(status, 404);
    let (status, _) = server.get_text("/api/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn client_config_says_how_to_sign_in() {
    let web_config = r#"{"apiKey":"key","projectId":"demo"}"#;
    let server = TestServer::start_with(&["--firebase-web-config", web_config]).await;
    for path in ["/config", "/api/config"] {
        let (status, body) = server.get(path, None).await;
        assert_eq!(status, 200);
        assert_eq!(body, json!({"auth": "development", "firebase": {"apiKey": "key", "projectId": "demo"}}));
    }
}

#[tokio::test]
async fn dev_token_registers_the_user_and_logs_in() {
    let server = TestServer::start().await;
    let (status, body) = server.post_json("/api/dev/token", json!({"name": "  Grace   Hopper "})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["userId"], "grace.hopper");
    assert_eq!(body["displayName"], "Grace Hopper");
    let token = body["token"].as_str().expect("a token").to_string();
    // Registered: others find her before her first login.
    let searcher = server.token("ada", Some("Ada"));
    let (status, found) = server.get("/api/search-users?q=hopper", Some(&searcher)).await;
    assert_eq!(status, 200);
    assert_eq!(found, json!([{"userId": "grace.hopper", "displayName": "Grace Hopper"}]));
    // The token logs in over the WebSocket.
    let mut client = server.connect().await;
    client.log_in(&token).await;
    client.expect_silence().await;
}

#[tokio::test]
async fn dev_token_refuses_insane_names() {
    let server = TestServer::start().await;
    for body in [
        json!({"name": ""}),
        json!({"name": "<b>x</b>"}),
        json!({"name": "x".repeat(41)}),
        json!({"nome": "x"}),
    ] {
        let (status, answer) = server.post_json("/dev/token", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["code"], "bad_request");
        assert!(answer["detail"].as_str().unwrap().contains("name"), "{answer}");
    }
    let (status, _) = server.post_json("/dev/token", json!({"name": "Bob", "userId": "bob smith"})).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn metrics_count_what_happens() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    alice.message("bob", "hello").await;
    bob.expect_type("message").await;
    alice.message("nobody", "hello?").await;
    alice.expect_error("unknown_recipient").await;
    let (status, text) = server.get_text("/metrics").await;
    assert_eq!(status, 200);
    // The recorder is shared by every server of this test process: check presence and floors.
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert!(value("privora_connections ") >= 2.0);
    assert!(value("privora_logins_total{result=\"ok\"}") >= 2.0);
    assert!(value("privora_messages_in_total ") >= 1.0);
    assert!(value("privora_messages_out_total ") >= 1.0);
    assert!(value("privora_errors_total{code=\"unknown_recipient\",via=\"websocket\"}") >= 1.0);
    assert!(value("privora_delivery_latency_seconds_count ") >= 1.0);
    assert!(value("privora_store_latency_seconds_count{op=\"append\",result=\"ok\"}") >= 1.0);
    // The message to nobody: refused by the store.
    assert!(value("privora_store_latency_seconds_count{op=\"append\",result=\"error\"}") >= 1.0);
    assert!(value("privora_store_latency_seconds_bucket{op=\"append\",result=\"ok\",le=\"+Inf\"}") >= 1.0);
    assert_eq!(text.matches("# TYPE privora_store_latency_seconds histogram").count(), 1);
    assert!(text.contains("# TYPE privora_outbound_queue_depth histogram"));
    assert!(text.contains("privora_pending_messages "));
    assert!(text.contains("privora_online_users "));
    // Nothing a person wrote ends up in the metrics.
    assert!(!text.contains("hello"));
}

#[tokio::test]
async fn openapi_describes_the_rest_endpoints() {
    let server = TestServer::start().await;
    let (status, doc) = server.get("/api/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/search-users", "/healthz", "/readyz", "/config", "/dev/token", "/metrics", "/openapi.json"]
    {
        assert!(doc["paths"][path].is_object(), "{path} missing from {}", doc["paths"]);
    }
    assert_eq!(doc["paths"]["/dev/token"]["post"]["requestBody"]["required"], true);
    assert!(doc["components"]["schemas"]["Contact"]["properties"]["userId"].is_object());
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}

/// The compose file passes the settings it does not set on as empty variables
/// (`FIREBASE_ADMIN_CREDENTIALS_JSON: ${FIREBASE_ADMIN_CREDENTIALS_JSON:-}`). Empty counts as
/// unset: the server starts, in development mode. (It did not: an empty credentials path and
/// an empty development secret were refused, and the compose stack's backend never came up.)
#[tokio::test]
async fn settings_given_as_empty_variables_count_as_unset() {
    let empty = [
        ("FIREBASE_ADMIN_CREDENTIALS_JSON", ""),
        ("FIREBASE_PROJECT_ID", ""),
        ("PRIVORA_FIREBASE_WEB_CONFIG", ""),
        ("PRIVORA_DEV_SECRET", ""),
        ("REDIS_URL", ""),
    ];
    let node = Node::spawn_with("sqlite://privora.db", None, &empty).await;
    let config: serde_json::Value =
        reqwest::get(node.url("/api/config")).await.expect("GET /api/config").json().await.expect("JSON");
    assert_eq!(config["auth"], "development", "{config}");
}
