//! Bad input gets a clear `error` frame, never a crash, a stall or a silent drop; only a bad
//! token closes the connection (with 1008).

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::TestServer;

#[tokio::test]
async fn frames_before_login_get_login_required() {
    let server = TestServer::start().await;
    server.register("bob", None).await;
    let mut client = server.connect().await;
    client.message("bob", "too early").await;
    client.expect_error("login_required").await;
    client.send_json(json!({"type": "ping"})).await;
    client.expect_error("login_required").await;
    // The connection is still usable: now log in.
    client.send_json(json!({"type": "login", "token": server.token("alice", None)})).await;
    client.login_burst().await;
}

#[tokio::test]
async fn an_invalid_token_gets_an_error_then_close_1008() {
    let server = TestServer::start().await;
    for token in ["garbage", "", "a.b.c"] {
        let mut client = server.connect().await;
        client.send_json(json!({"type": "login", "token": token})).await;
        let message = client.expect_error("invalid_token").await;
        assert!(message.starts_with("invalid token: "), "{message}");
        assert!(token.is_empty() || !message.contains(token), "the token is not echoed: {message}");
        assert_eq!(client.expect_close().await, 1008);
    }
    // A token signed with another secret says why it failed.
    let other =
        privora::auth::dev::DevVerifier::new(&privora::config::DevSecret::Given("x".repeat(40))).unwrap();
    let mut client = server.connect().await;
    client
        .send_json(
            json!({"type": "login", "token": other.mint("alice", None, std::time::Duration::from_secs(60))}),
        )
        .await;
    assert!(client.expect_error("invalid_token").await.contains("signature"));
    assert_eq!(client.expect_close().await, 1008);
}

#[tokio::test]
async fn no_login_in_time_closes_with_1008() {
    let server = TestServer::start_with(&["--login-timeout", "1"]).await;
    let mut client = server.connect().await;
    client.expect_error("login_required").await;
    assert_eq!(client.expect_close().await, 1008);
}

#[tokio::test]
async fn malformed_frames_get_bad_frame_and_the_connection_stays_open() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    let cases: Vec<(String, &str)> = vec![
        ("this is not json".into(), "not valid JSON"),
        ("[1, 2, 3]".into(), "JSON object"),
        ("\"login\"".into(), "JSON object"),
        (json!({"to": "bob"}).to_string(), "type"),
        (json!({"type": 3}).to_string(), "type"),
        (json!({"type": "message", "message": "no recipient"}).to_string(), "\"to\""),
        (json!({"type": "message", "to": "bob"}).to_string(), "\"message\""),
        (json!({"type": "message", "to": 42, "message": "x"}).to_string(), "\"to\" must be a string"),
        (
            json!({"type": "message", "to": "bob", "message": ["x"]}).to_string(),
            "\"message\" must be a string",
        ),
        (json!({"type": "message", "to": "", "message": "x"}).to_string(), "\"to\" is empty"),
        (json!({"type": "message", "to": "bob", "message": ""}).to_string(), "\"message\" is empty"),
        (json!({"type": "message", "to": "b".repeat(400), "message": "x"}).to_string(), "longer than"),
        (json!({"type": "message", "to": "bob", "message": "x".repeat(20_000)}).to_string(), "longer than"),
        (json!({"type": "login", "token": "again"}).to_string(), "already logged in"),
    ];
    for (frame, expected) in cases {
        alice.send_text(&frame).await;
        let message = alice.expect_error("bad_frame").await;
        assert!(message.contains(expected), "{frame}: {message:?} should mention {expected:?}");
    }
    alice.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert!(alice.expect_error("bad_frame").await.contains("binary"));
    alice.message("bob", "still open").await;
    assert_eq!(bob.expect_type("message").await["message"], "still open");
}

#[tokio::test]
async fn oversized_frames_get_too_large() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    // Over the 64 KiB limit: refused, the connection stays open.
    alice.message("bob", &"x".repeat(100 * 1024)).await;
    assert!(alice.expect_error("too_large").await.contains("65536"));
    alice.send_json(json!({"type": "ping"})).await;
    alice.expect_type("pong").await;
    // A 1 MiB frame: refused without being buffered whole, and the connection is closed (1009).
    alice.message("bob", &"x".repeat(1024 * 1024)).await;
    alice.expect_error("too_large").await;
    assert_eq!(alice.expect_close().await, 1009);
    // The server goes on serving everyone else.
    let (mut carol, _) = server.login("carol").await;
    let (mut dave, _) = server.login("dave").await;
    carol.message("dave", "all fine").await;
    assert_eq!(dave.expect_type("message").await["message"], "all fine");
}

#[tokio::test]
async fn unknown_recipients_are_refused() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let message = {
        alice.message("nobody@example.com", "hello?").await;
        alice.expect_error("unknown_recipient").await
    };
    assert!(message.contains("nobody@example.com"));
}

#[tokio::test]
async fn senders_over_the_rate_limit_are_told() {
    let server = TestServer::start_with(&["--rate-limit", "1", "--rate-burst", "3"]).await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    for i in 0..4 {
        alice.message("bob", &format!("m{i}")).await;
    }
    alice.expect_error("rate_limited").await;
    for i in 0..3 {
        assert_eq!(bob.expect_type("message").await["message"], format!("m{i}"));
    }
}

#[tokio::test]
async fn a_database_failure_is_internal_and_nothing_pretends_to_be_stored() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    // Break the schema under the running server, from another connection.
    server.execute_sql("ALTER TABLE messages RENAME TO messages_gone").await;
    alice.message("bob", "doomed").await;
    alice.expect_error("internal").await;
    bob.expect_silence().await;
}

#[tokio::test]
async fn a_closed_store_is_unavailable() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    server.server().state().store.close().await;
    alice.message("alice", "nowhere to go").await;
    alice.expect_error("unavailable").await;
    let (status, body) = server.get("/readyz", None).await;
    assert_eq!(status, 503, "{body}");
}
