//! End to end against the real Firebase Auth Emulator (scripts/test starts it): users made
//! through the emulator's REST API log in over /ws with their emulator ID tokens, chat, and
//! find each other by display name through the directory the server syncs from Firebase.

use serde_json::json;

use crate::support::firebase::{unique, Emulator};
use crate::support::TestServer;

#[tokio::test]
async fn emulator_users_log_in_chat_and_find_each_other() {
    let emulator = Emulator::get().await;
    let tag = unique();
    let alice = emulator.create_user(&format!("Alice {tag}")).await;
    let bob = emulator.create_user(&format!("Bob {tag}")).await;
    // Carol never logs in: only the directory sync can make her known.
    let carol = emulator.create_user(&format!("Carol {tag}")).await;
    let server = TestServer::start_firebase(emulator.config(300, false), &[]).await;
    server.wait_for_syncs(1).await;

    let (mut alice_ws, _) = server.login_with_token(&alice.id_token).await;
    let (mut bob_ws, _) = server.login_with_token(&bob.id_token).await;
    alice_ws.message(&bob.email, "hello from the emulator").await;
    let frame = bob_ws.expect_type("message").await;
    assert_eq!(frame["from"], alice.email.as_str());
    assert_eq!(frame["fromDisplayName"], alice.name.as_str());
    assert_eq!(frame["message"], "hello from the emulator");

    // Search by display name, case-insensitive, over the synced directory.
    let (status, found) = server.get(&format!("/search-users?q=bob%20{tag}"), Some(&alice.id_token)).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found, json!([{"userId": bob.email, "displayName": bob.name}]));
    let (_, found) = server.get(&format!("/api/search-users?q=Carol%20{tag}"), Some(&bob.id_token)).await;
    assert_eq!(found, json!([{"userId": carol.email, "displayName": carol.name}]));

    // A synced user who never logged in can be written to, and gets it at her first login.
    alice_ws.message(&carol.email, "waiting for you").await;
    alice_ws.sync().await;
    let (_, burst) = server.login_with_token(&carol.id_token).await;
    assert_eq!(burst.offline.len(), 1);
    assert_eq!(burst.offline[0].message, "waiting for you");
    assert_eq!(burst.contacts[0].display_name, alice.name);
}

#[tokio::test]
async fn a_user_created_after_start_is_found_after_the_next_sync() {
    let emulator = Emulator::get().await;
    let tag = unique();
    let alice = emulator.create_user(&format!("Alice {tag}")).await;
    let server = TestServer::start_firebase(emulator.config(1, false), &[]).await;
    server.wait_for_syncs(1).await;
    let query = format!("/search-users?q=Dave%20{tag}");
    assert_eq!(server.get(&query, Some(&alice.id_token)).await.1, json!([]));

    let dave = emulator.create_user(&format!("Dave {tag}")).await;
    server.wait_for_syncs(2).await;
    let (status, found) = server.get(&query, Some(&alice.id_token)).await;
    assert_eq!(status, 200);
    assert_eq!(found, json!([{"userId": dave.email, "displayName": dave.name}]));
    let (_, ready) = server.get("/readyz", None).await;
    assert!(ready["directory"]["last_sync_age_seconds"].as_u64().is_some(), "{ready}");
    assert!(ready["directory"]["users"].as_u64().is_some_and(|n| n >= 2), "{ready}");
}

#[tokio::test]
async fn a_disabled_user_is_refused_when_revocation_checks_are_on() {
    let emulator = Emulator::get().await;
    let tag = unique();
    let erin = emulator.create_user(&format!("Erin {tag}")).await;
    let frank = emulator.create_user(&format!("Frank {tag}")).await;
    emulator.disable(&frank.uid).await;
    let server = TestServer::start_firebase(emulator.config(300, true), &[]).await;

    let (mut erin_ws, _) = server.login_with_token(&erin.id_token).await;
    erin_ws.sync().await;

    let mut frank_ws = server.connect().await;
    frank_ws.send_json(json!({"type": "login", "token": frank.id_token})).await;
    let reason = frank_ws.expect_error("invalid_token").await;
    assert!(reason.contains("disabled"), "{reason}");
    assert_eq!(frank_ws.expect_close().await, 1008);
    let (status, body) = server.get("/ws_test", Some(&frank.id_token)).await;
    assert_eq!(status, 401);
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("disabled")), "{body}");
}

#[tokio::test]
async fn without_revocation_checks_the_token_alone_decides() {
    let emulator = Emulator::get().await;
    let grace = emulator.create_user(&format!("Grace {}", unique())).await;
    emulator.disable(&grace.uid).await;
    let server = TestServer::start_firebase(emulator.config(300, false), &[]).await;
    let (mut ws, _) = server.login_with_token(&grace.id_token).await;
    ws.sync().await;
}
