//! REST: user search, the token check, health, CORS and the WebSocket origin check.

use serde_json::{json, Value};

use crate::support::TestServer;

fn names(body: &Value) -> Vec<String> {
    body.as_array()
        .expect("an array")
        .iter()
        .map(|u| u["displayName"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn search_users_needs_a_valid_token() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/search-users?q=ali", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["detail"], "Invalid token");
    assert!(body["reason"].as_str().unwrap().contains("Authorization"));
    let (status, body) = server.get("/search-users?q=ali", Some("forged")).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "invalid_token");
    // The bare token without "Bearer " is accepted, as the original did.
    let response = reqwest::Client::new()
        .get(server.url("/search-users?q=ali"))
        .header("Authorization", server.token("alice", None))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn search_users_matches_display_names_case_insensitively() {
    let server = TestServer::start().await;
    for (id, name) in [
        ("a@x.io", "Alice Smith"),
        ("b@x.io", "alicia keys"),
        ("c@x.io", "Bob"),
        ("d@x.io", "MALICE"),
        ("e@x.io", "Élodie Alì"),
    ] {
        server.register(id, Some(name)).await;
    }
    server.register("nameless@x.io", None).await;
    let token = server.token("a@x.io", Some("Alice Smith"));
    for prefix in ["", "/api"] {
        let (status, body) = server.get(&format!("{prefix}/search-users?q=ALI"), Some(&token)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(names(&body), ["Alice Smith", "alicia keys", "MALICE"]);
        assert_eq!(body[0], json!({"userId": "a@x.io", "displayName": "Alice Smith"}));
    }
    let (_, body) = server.get("/search-users?q=ob", Some(&token)).await;
    assert_eq!(names(&body), ["Bob"], "short queries work too");
    let (_, body) = server.get("/search-users?q=lodie%20al", Some(&token)).await;
    assert_eq!(names(&body), ["Élodie Alì"]);
    let (_, body) = server.get("/search-users?q=zzz", Some(&token)).await;
    assert_eq!(body, json!([]));
}

#[tokio::test]
async fn search_users_results_are_capped() {
    let server = TestServer::start().await;
    for i in 0..120 {
        server.register(&format!("u{i}@x.io"), Some(&format!("Member {i:03}"))).await;
    }
    let token = server.token("u0@x.io", None);
    let (_, body) = server.get("/search-users?q=member", Some(&token)).await;
    assert_eq!(names(&body).len(), 20, "default limit");
    let (_, body) = server.get("/search-users?q=member&limit=100", Some(&token)).await;
    assert_eq!(names(&body).len(), 100);
    let (_, body) = server.get("/search-users?q=member&limit=5", Some(&token)).await;
    assert_eq!(names(&body).len(), 5);
    for bad in ["limit=0", "limit=101", "limit=many"] {
        let (status, body) = server.get(&format!("/search-users?q=member&{bad}"), Some(&token)).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["detail"].as_str().unwrap().contains("limit"));
        assert_eq!(body["code"], "bad_request");
    }
    for empty in ["/search-users", "/search-users?q=", "/search-users?q=%20"] {
        let (status, body) = server.get(empty, Some(&token)).await;
        assert_eq!(status, 400, "{empty}");
        assert!(body["detail"].as_str().unwrap().contains("q"));
    }
}

#[tokio::test]
async fn logins_keep_the_directory_up_to_date() {
    let server = TestServer::start().await;
    let (client, _) = server.login_as("zed@x.io", Some("Zed Old")).await;
    drop(client);
    let (_client, _) = server.login_as("zed@x.io", Some("Zed Renamed")).await;
    let token = server.token("zed@x.io", None);
    let (_, body) = server.get("/search-users?q=renamed", Some(&token)).await;
    assert_eq!(names(&body), ["Zed Renamed"]);
    let (_, body) = server.get("/search-users?q=zed%20old", Some(&token)).await;
    assert_eq!(body, json!([]));
}

#[tokio::test]
async fn ws_test_health_and_readiness() {
    let server = TestServer::start().await;
    let token = server.token("alice@example.com", None);
    for prefix in ["", "/api"] {
        let (status, body) = server.get(&format!("{prefix}/ws_test"), Some(&token)).await;
        assert_eq!(status, 200);
        assert_eq!(body, json!({"message": "WebSocket connection secured!", "email": "alice@example.com"}));
        let (status, _) = server.get(&format!("{prefix}/ws_test"), None).await;
        assert_eq!(status, 401);
        let (status, body) = server.get(&format!("{prefix}/healthz"), None).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
        let (status, body) = server.get(&format!("{prefix}/readyz"), None).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    }
}

#[tokio::test]
async fn cors_preflight_allows_the_configured_origin_with_both_headers() {
    let server = TestServer::start().await;
    let preflight = |origin: &'static str| {
        reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, server.url("/api/search-users?q=x"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .header("Access-Control-Request-Headers", "authorization,content-type")
            .send()
    };
    let allowed = preflight("http://localhost:3000").await.unwrap();
    assert!(allowed.status().is_success());
    let headers = allowed.headers();
    assert_eq!(headers["access-control-allow-origin"], "http://localhost:3000");
    let allow_headers = headers["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allow_headers.contains("authorization") && allow_headers.contains("content-type"));

    let foreign = preflight("https://evil.example.com").await.unwrap();
    assert!(foreign.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn websockets_from_foreign_origins_are_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = TestServer::start().await;
    let with_origin = |origin: &str| {
        let mut request = server.ws_url().into_client_request().unwrap();
        request.headers_mut().insert("Origin", origin.parse().unwrap());
        request
    };
    match tokio_tungstenite::connect_async(with_origin("https://evil.example.com")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("not allowed") && body.contains("origin_not_allowed"), "{body}");
        }
        other => panic!("a foreign origin must be refused, got {:?}", other.map(|_| ())),
    }
    assert!(tokio_tungstenite::connect_async(with_origin("http://localhost:3000")).await.is_ok());
    let same = format!("http://{}", server.addr);
    assert!(tokio_tungstenite::connect_async(with_origin(&same)).await.is_ok(), "same origin is fine");
    // Native clients send no Origin at all.
    assert!(tokio_tungstenite::connect_async(server.ws_url()).await.is_ok());
    // /ws/ works as well as /ws.
    assert!(tokio_tungstenite::connect_async(format!("{}/", server.ws_url())).await.is_ok());
}
