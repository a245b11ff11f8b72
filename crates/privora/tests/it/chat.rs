//! The protocol as a client lives it: log in, send, receive, see who is online.

use privora_protocol::{Contact, ServerFrame};
use serde_json::{json, Value};

use crate::support::{eventually, Client, TestServer};

#[tokio::test]
async fn a_message_reaches_an_online_recipient_with_the_original_fields() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login_as("alice@example.com", Some("Alice")).await;
    let (mut bob, _) = server.login_as("bob@example.com", Some("Bob")).await;

    alice
        .send_json(
            json!({"type": "message", "to": "bob@example.com", "message": "Hi there!", "msg_id": "c-1"}),
        )
        .await;
    let frame = bob.recv_json().await;
    assert_eq!(frame["type"], "message");
    assert_eq!(frame["from"], "alice@example.com");
    assert_eq!(frame["fromDisplayName"], "Alice");
    assert_eq!(frame["to"], "bob@example.com");
    assert_eq!(frame["message"], "Hi there!");
    assert_eq!(frame["msg_id"], "c-1", "the client's msg_id is carried through unchanged");
    assert!(frame["id"].as_i64().is_some_and(|id| id > 0));
    let timestamp = frame["timestamp"].as_str().expect("timestamp is a string");
    assert!(
        chrono::DateTime::parse_from_rfc3339(timestamp).is_ok() && timestamp.ends_with('Z'),
        "timestamp {timestamp} is ISO 8601 UTC"
    );
    // The sender hears nothing back: the original protocol has no acknowledgement.
    alice.expect_silence().await;
}

#[tokio::test]
async fn the_display_name_comes_from_the_token_not_the_frame() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login_as("alice@example.com", Some("Alice")).await;
    let (mut bob, _) = server.login_as("bob@example.com", Some("Bob")).await;
    alice
        .send_json(json!({"type": "message", "to": "bob@example.com", "message": "hi", "fromDisplayName": "The Bank"}))
        .await;
    let frame = bob.recv_json().await;
    assert_eq!(frame["fromDisplayName"], "Alice");
    let (_, burst) = server.login("bob@example.com").await;
    assert_eq!(burst.history.last().map(|m| m.from_display_name.as_str()), Some("Alice"));
}

#[tokio::test]
async fn every_connection_of_a_user_receives_and_none_replaces_another() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let (mut alice_phone, _) = server.login("alice").await;
    let (mut bob_tab1, _) = server.login("bob").await;
    let (mut bob_tab2, _) = server.login("bob").await;

    alice.message("bob", "to both tabs").await;
    for tab in [&mut bob_tab1, &mut bob_tab2] {
        assert_eq!(tab.expect_type("message").await["message"], "to both tabs");
    }
    alice.sync().await;
    // A user's own sent messages are not echoed to the user's other connections.
    alice_phone.expect_silence().await;

    // Except a message to oneself, which every connection of the user gets.
    alice.message("alice", "note to self").await;
    assert_eq!(alice.expect_type("message").await["message"], "note to self");
    assert_eq!(alice_phone.expect_type("message").await["message"], "note to self");
}

#[tokio::test]
async fn frames_sent_right_after_login_are_handled_in_order() {
    let server = TestServer::start().await;
    let (mut bob, _) = server.login("bob").await;
    server.register("alice", Some("alice")).await;

    let mut alice = server.connect().await;
    // login, two messages and a ping in one go, before the server has answered anything.
    alice.send_json(json!({"type": "login", "token": server.token("alice", Some("Alice"))})).await;
    alice.message("bob", "one").await;
    alice.message("bob", "two").await;
    alice.send_json(json!({"type": "ping"})).await;
    let burst = alice.login_burst_before_pong().await;
    assert!(burst.iter().all(|f| f["type"] != "error"), "no frame was refused: {burst:?}");

    assert_eq!(bob.expect_type("message").await["message"], "one");
    assert_eq!(bob.expect_type("message").await["message"], "two");
}

#[tokio::test]
async fn ping_gets_pong_and_unknown_frame_types_leave_the_connection_open() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    alice.send_json(json!({"type": "ping"})).await;
    assert_eq!(alice.recv().await, ServerFrame::Pong);
    // Frames newer clients send (reactions, call signalling) and ones nobody sends yet.
    for ty in ["reaction", "signal_session_claim", "call_offer", "typing_v9"] {
        alice.send_json(json!({"type": ty, "to": "bob", "emoji": "+1"})).await;
        let message = alice.expect_error("unknown_type").await;
        assert!(message.contains(ty), "{message}");
    }
    alice.message("bob", "still here").await;
    assert_eq!(bob.expect_type("message").await["message"], "still here");
}

#[tokio::test]
async fn the_login_burst_has_history_then_contacts_then_presence() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login_as("alice", Some("Alice")).await;
    let (mut bob, _) = server.login_as("bob", Some("Bob")).await;
    server.register("carol", Some("Carol")).await;
    alice.message("bob", "1").await;
    bob.expect_type("message").await;
    bob.message("alice", "2").await;
    alice.expect_type("message").await;
    alice.message("carol", "3").await;
    alice.sync().await;

    let (_, burst) = server.login_as("alice", Some("Alice")).await;
    let texts: Vec<&str> = burst.history.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(texts, ["1", "2", "3"], "history is oldest first");
    assert_eq!(
        burst.contacts,
        vec![
            Contact { user_id: "bob".into(), display_name: "Bob".into() },
            Contact { user_id: "carol".into(), display_name: "Carol".into() },
        ]
    );
    assert_eq!(burst.online, vec!["bob".to_string()], "presence for online contacts only");
}

#[tokio::test]
async fn history_is_capped_but_keeps_every_pending_message() {
    let server = TestServer::start_with(&["--history-limit", "3"]).await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    for i in 0..5 {
        alice.message("bob", &format!("seen {i}")).await;
        bob.expect_type("message").await;
    }
    bob.confirm_delivery().await; // those five are delivered now
    bob.close().await;
    for i in 0..4 {
        alice.message("bob", &format!("missed {i}")).await;
    }
    alice.sync().await;

    let (_, burst) = server.login("bob").await;
    let offline: Vec<&str> = burst.offline.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(offline, ["missed 0", "missed 1", "missed 2", "missed 3"]);
    let history: Vec<&str> = burst.history.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(history, ["missed 0", "missed 1", "missed 2", "missed 3"], "3 latest plus all pending");
}

#[tokio::test]
async fn presence_goes_to_contacts_only() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    let (mut carol, _) = server.login("carol").await;
    alice.message("bob", "hello").await; // alice and bob are contacts now; carol is no one's
    bob.expect_type("message").await;
    bob.close().await;
    let offline = alice.expect_type("presence").await;
    assert_eq!(offline, json!({"type": "presence", "userId": "bob", "status": "offline"}));

    let (bob_again, burst) = server.login("bob").await;
    assert_eq!(burst.online, vec!["alice".to_string()]);
    let online = alice.expect_type("presence").await;
    assert_eq!(online, json!({"type": "presence", "userId": "bob", "status": "online"}));
    // A second connection of an online user changes nothing.
    let (_bob_tab, _) = server.login("bob").await;
    alice.expect_silence().await;
    carol.expect_silence().await;
    drop(bob_again);
}

#[tokio::test]
async fn shutdown_closes_connections_with_going_away() {
    let mut server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    server.stop().await;
    assert_eq!(alice.expect_close().await, 1001);
}

#[tokio::test]
async fn a_token_without_a_name_uses_the_name_the_directory_knows() {
    let server = TestServer::start().await;
    server.register("alice@example.com", Some("Alice From The Directory")).await;
    let (mut alice, _) = server.login_as("alice@example.com", None).await;
    let (mut bob, _) = server.login("bob@example.com").await;
    alice.message("bob@example.com", "hi").await;
    assert_eq!(bob.expect_type("message").await["fromDisplayName"], "Alice From The Directory");
}

#[tokio::test]
async fn a_burst_from_one_sender_is_stored_and_answered_in_order() {
    let server = TestServer::start_with(&["--rate-limit", "0"]).await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    // Sent without waiting for answers: the server reads on while earlier messages are being
    // stored, yet answers each frame in its place.
    for i in 0..200 {
        if i == 100 {
            alice.message("nobody", "refused in its place").await;
        }
        if i == 101 {
            // Known to be wrong at once, but answered after the refusal above all the same.
            alice.send_json(json!({"type": "message", "message": "no recipient"})).await;
        }
        alice.message("bob", &i.to_string()).await;
    }
    let answers = alice.sync().await;
    let codes: Vec<&Value> = answers.iter().map(|a| &a["code"]).collect();
    assert_eq!(codes, [&json!("unknown_recipient"), &json!("bad_frame")], "in order, before the pong");
    let mut last_id = 0;
    for i in 0..200 {
        let frame = bob.expect_type("message").await;
        assert_eq!(frame["message"], i.to_string(), "one sender's messages arrive in order");
        let id = frame["id"].as_i64().unwrap();
        assert!(id > last_id, "and are stored in order");
        last_id = id;
    }
}

/// A newer client asks for acks at login: each message it sends is answered, in order, by an
/// `ack` naming the stored message (with its own `msg_id`) or by an `error` when it was not
/// stored. A client that did not ask never sees an `ack`.
#[tokio::test]
async fn a_client_that_asks_for_acks_hears_each_message_stored_or_refused_in_order() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login_with_acks("alice").await;
    let (mut bob, _) = server.login("bob").await;
    alice.send_json(json!({"type": "message", "to": "bob", "message": "one", "msg_id": "c-1"})).await;
    alice.message("nobody", "refused").await;
    alice.send_json(json!({"type": "message", "to": "bob", "message": "two", "msg_id": 7})).await;
    alice.message("bob", "three").await;

    let one = alice.expect_type("ack").await;
    assert_eq!(one["msg_id"], "c-1");
    assert_eq!(alice.expect_type("error").await["code"], "unknown_recipient");
    let two = alice.expect_type("ack").await;
    assert_eq!(two["msg_id"], 7);
    let three = alice.expect_type("ack").await;
    assert!(three.get("msg_id").is_none(), "no msg_id sent, none in the ack: {three}");
    // Each ack names the message as its recipient has it.
    for ack in [&one, &two, &three] {
        let received = bob.expect_type("message").await;
        assert_eq!((&received["id"], &received["timestamp"]), (&ack["id"], &ack["timestamp"]));
    }
    // Bob did not ask for acks: his own message gets none.
    bob.message("alice", "back").await;
    assert_eq!(alice.expect_type("message").await["message"], "back");
    bob.expect_silence().await;
    alice.expect_silence().await;
}

/// A client with acks that lost its connection before an ack resends the message with the same
/// `msg_id`: it hears the first ack again and the recipient gets the message once. The same
/// `msg_id` for another message is refused; a client without acks is not deduplicated (the
/// original protocol never said a msg_id was unique).
#[tokio::test]
async fn a_message_resent_after_a_lost_ack_is_stored_once() {
    let server = TestServer::start().await;
    let (mut bob, alice, hello, first) = hello_with_acks(&server).await;

    // The ack "was lost": a new connection sends the message again, twice (the client's queue
    // and a retry timer, say).
    alice.close().await;
    let (mut alice, _) = server.login_with_acks("alice").await;
    alice.send_json(hello.clone()).await;
    alice.send_json(hello.clone()).await;
    for _ in 0..2 {
        assert_eq!(alice.expect_type("ack").await, first, "the first ack again, id and timestamp");
    }
    assert_eq!(messages(bob.sync().await), Vec::<Value>::new(), "bob has it already");
    // Another message under a used msg_id is refused, not taken for the first one.
    alice.send_json(json!({"type": "message", "to": "bob", "message": "other", "msg_id": "c-1"})).await;
    assert!(alice.expect_error("bad_frame").await.contains("msg_id \"c-1\" was already used"));
    // The number 1 is not the string "1", nor someone else's "c-1".
    alice.send_json(json!({"type": "message", "to": "bob", "message": "one", "msg_id": 1})).await;
    let one = alice.expect_type("ack").await;
    let received = messages(bob.sync().await);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["id"], one["id"]);
    bob.send_json(json!({"type": "message", "to": "alice", "message": "hello", "msg_id": "c-1"})).await;
    assert_eq!(alice.expect_type("message").await["message"], "hello");

    // Without acks, msg_ids are not looked at: the same frame is a new message each time.
    let (mut old_client, _) = server.login("alice").await;
    old_client.send_json(hello).await;
    let again = bob.expect_type("message").await;
    assert_ne!(again["id"], first["id"]);
}

/// Bob logs in, then Alice with acks; she sends him "hello" as `c-1` and he gets it. Returns
/// Bob, Alice, her frame and its ack.
async fn hello_with_acks(server: &TestServer) -> (Client, Client, Value, Value) {
    let (mut bob, _) = server.login("bob").await;
    let (mut alice, _) = server.login_with_acks("alice").await;
    let hello = json!({"type": "message", "to": "bob", "message": "hello", "msg_id": "c-1"});
    alice.send_json(hello.clone()).await;
    let ack = alice.expect_type("ack").await;
    assert_eq!(bob.expect_type("message").await["id"], ack["id"]);
    (bob, alice, hello, ack)
}

/// The frames that are not `presence` (which come and go with the other side's connections).
fn messages(frames: Vec<Value>) -> Vec<Value> {
    frames.into_iter().filter(|frame| frame["type"] != "presence").collect()
}

/// A msg_id is remembered for a day (`MSG_ID_WINDOW`): an older one no longer names a message,
/// and the writer deletes it.
#[tokio::test]
async fn a_msg_id_older_than_a_day_is_forgotten() {
    let server = TestServer::start().await;
    let (bob, alice, hello, first) = hello_with_acks(&server).await;
    alice.close().await;
    bob.close().await;
    // A day and an hour pass. The writer deletes such rows when it starts (and every minute).
    let remembered = "SELECT count(*) FROM sent_msg_ids";
    assert_eq!(server.query_i64(remembered).await, 1, "recorded with the message");
    server.execute_sql("UPDATE sent_msg_ids SET created_at = created_at - 90000").await;
    let server = server.restart().await;
    eventually("the old msg_id is deleted", || async { server.query_i64(remembered).await == 0 }).await;
    let (mut alice, _) = server.login_with_acks("alice").await;
    let (mut bob, _) = server.login("bob").await;
    alice.sync().await;
    alice.send_json(hello).await;
    let second = alice.expect_type("ack").await;
    assert_ne!(second["id"], first["id"], "stored anew");
    assert_eq!(bob.expect_type("message").await["id"], second["id"]);
    assert_eq!(server.query_i64(remembered).await, 1, "the new one is recorded");
}
