//! Several real `privora serve` processes on one PostgreSQL and a private Redis: live chat and
//! presence across nodes, a node killed under traffic, Redis restarted under traffic, and a
//! private PostgreSQL stopped and started under a running node.

use std::collections::{BTreeSet, HashSet};

use serde_json::Value;

use crate::support::cluster::{pg_schema_url, Node, PrivatePostgres, PrivateRedis};
use crate::support::Client;

/// Two nodes sharing a fresh schema of the test PostgreSQL and a private Redis.
async fn two_nodes() -> (PrivateRedis, Node, Node) {
    let redis = PrivateRedis::start().await;
    let db = pg_schema_url().await;
    let one = Node::spawn(&db, Some(&redis.url())).await;
    let two = Node::spawn(&db, Some(&redis.url())).await;
    (redis, one, two)
}

/// Sends `text` and reports whether the server took it: it answers a connection's frames in
/// order, so no `error` before the `pong` means the message is stored.
async fn send_checked(client: &mut Client, to: &str, text: &str) -> Result<(), String> {
    client.message(to, text).await;
    let answers = client.sync().await;
    match answers.iter().find(|f| f["type"] == "error") {
        Some(error) => Err(error["code"].as_str().unwrap_or_default().to_string()),
        None => {
            assert!(answers.is_empty(), "unexpected frames after a send: {answers:?}");
            Ok(())
        }
    }
}

/// Reads `message` frames until `want` distinct texts have come, failing on a second copy of
/// one message on this connection. Presence frames are skipped.
async fn read_messages(client: &mut Client, want: usize) -> BTreeSet<String> {
    let mut ids = HashSet::new();
    let mut texts = BTreeSet::new();
    while texts.len() < want {
        let frame = client.recv_json().await;
        if frame["type"] != "message" {
            assert_eq!(frame["type"], "presence", "unexpected frame {frame}");
            continue;
        }
        assert!(ids.insert(frame["id"].as_i64().expect("id")), "delivered twice to one connection: {frame}");
        texts.insert(frame["message"].as_str().expect("text").to_string());
    }
    texts
}

fn presence(frame: &Value) -> (String, String) {
    assert_eq!(frame["type"], "presence", "expected a presence frame, got {frame}");
    (frame["userId"].as_str().unwrap_or_default().into(), frame["status"].as_str().unwrap_or_default().into())
}

#[tokio::test]
async fn users_on_different_nodes_chat_live_and_see_each_other() {
    let (_redis, one, two) = two_nodes().await;
    let (mut bob, _) = two.login("bob").await;
    let (mut alice, _) = one.login("alice").await;

    send_checked(&mut alice, "bob", "hello from node one").await.unwrap();
    let frame = bob.expect_type("message").await;
    assert_eq!(
        (frame["from"].as_str(), frame["message"].as_str()),
        (Some("alice"), Some("hello from node one"))
    );
    send_checked(&mut bob, "alice", "hi from node two").await.unwrap();
    assert_eq!(alice.expect_type("message").await["message"], "hi from node two");

    // Now they are contacts: presence crosses nodes both ways.
    alice.close().await;
    assert_eq!(presence(&bob.recv_json().await), ("alice".into(), "offline".into()));
    let (mut alice, burst) = one.login("alice").await;
    assert_eq!(burst.online, vec!["bob".to_string()], "bob, on the other node, is online");
    assert_eq!(presence(&bob.recv_json().await), ("alice".into(), "online".into()));
    // A second device of bob on node one: bob stays online when his node-two device leaves.
    let (bob_two, _) = one.login("bob").await;
    bob.close().await;
    send_checked(&mut alice, "bob", "to the other device").await.unwrap();
    let mut bob_two = bob_two;
    assert_eq!(bob_two.expect_type("message").await["message"], "to the other device");
    alice.expect_silence().await;
}

/// The same idempotent message sent through two nodes at the same moment (a client that
/// resent it through another node before the first answered) is stored once: the second
/// node's commit waits for the first's and then takes its message.
#[tokio::test]
async fn a_message_resent_through_another_node_at_the_same_moment_is_stored_once() {
    let (_redis, one, two) = two_nodes().await;
    let (mut bob, _) = one.login("bob").await;
    let (mut on_one, _) = one.login_with_acks("alice").await;
    let (mut on_two, _) = two.login_with_acks("alice").await;
    for i in 0..40 {
        let frame =
            serde_json::json!({"type": "message", "to": "bob", "message": format!("m{i}"), "msg_id": i});
        tokio::join!(on_one.send_json(frame.clone()), on_two.send_json(frame.clone()));
        let (a, b) = tokio::join!(on_one.expect_type("ack"), on_two.expect_type("ack"));
        assert_eq!(a["id"], b["id"], "one message for msg_id {i}: {a} and {b}");
    }
    assert_eq!(read_messages(&mut bob, 40).await.len(), 40);
    assert!(bob.sync().await.iter().all(|f| f["type"] != "message"), "no second copies");
}

#[tokio::test]
async fn a_killed_node_s_users_go_offline_and_get_every_message_on_another_node() {
    let (_redis, one, mut two) = two_nodes().await;
    let (mut bob, _) = two.login("bob").await;
    let (mut alice, _) = one.login("alice").await;
    send_checked(&mut bob, "alice", "let's talk").await.unwrap();
    alice.expect_type("message").await;

    // Traffic towards bob, and his node dies in the middle of it.
    let mut sent = BTreeSet::new();
    for i in 0..10 {
        let text = format!("m{i}");
        alice.message("bob", &text).await;
        sent.insert(text);
    }
    two.kill();
    assert!(alice.sync().await.is_empty(), "every send was stored");
    for i in 10..20 {
        let text = format!("m{i}");
        send_checked(&mut alice, "bob", &text).await.unwrap();
        sent.insert(text);
    }
    // Whatever reached bob's old connection before it died.
    let mut got = BTreeSet::new();
    let mut ids = HashSet::new();
    while let crate::support::Event::Text(text) = bob.next_event().await {
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "message" {
            assert!(ids.insert(frame["id"].as_i64().unwrap()), "delivered twice to one connection");
            got.insert(frame["message"].as_str().unwrap().to_string());
        }
    }

    // The dead node stops beating; a live node reaps it and bob goes offline for alice.
    loop {
        let (user, status) = presence(&alice.recv_json().await);
        if user == "bob" && status == "offline" {
            break;
        }
    }

    // Bob comes back through the proxy to the surviving node and gets everything not confirmed.
    let (mut bob, burst) = one.login("bob").await;
    let offline_ids: HashSet<i64> = burst.offline.iter().map(|m| m.id).collect();
    assert_eq!(offline_ids.len(), burst.offline.len(), "no message twice in one burst");
    got.extend(burst.offline.iter().map(|m| m.message.clone()));
    assert_eq!(
        got.intersection(&sent).count(),
        sent.len(),
        "every message reached bob: missing {:?}",
        sent.difference(&got).collect::<Vec<_>>()
    );
    assert_eq!(presence(&alice.recv_json().await), ("bob".into(), "online".into()));
    bob.expect_silence().await;
}

#[tokio::test]
async fn a_stalled_node_that_was_reaped_catches_up_when_it_wakes() {
    let (_redis, one, two) = two_nodes().await;
    let (mut bob, _) = two.login("bob").await;
    let (mut alice, _) = one.login("alice").await;
    send_checked(&mut bob, "alice", "hi").await.unwrap();
    alice.expect_type("message").await;

    // Bob's node stalls longer than the presence TTL: the other node reaps it.
    two.pause();
    loop {
        let (user, status) = presence(&alice.recv_json().await);
        if user == "bob" && status == "offline" {
            break;
        }
    }
    // Sent while nobody in Redis knows where bob is: stored, published nowhere.
    let mut sent = BTreeSet::new();
    for i in 0..5 {
        let text = format!("while stalled {i}");
        send_checked(&mut alice, "bob", &text).await.unwrap();
        sent.insert(text);
    }
    // The node wakes up, finds it had dropped out, writes its users back and catches up:
    // bob gets them on the connection he never left.
    two.resume();
    assert_eq!(read_messages(&mut bob, sent.len()).await, sent);
    send_checked(&mut alice, "bob", "and live again").await.unwrap();
    assert_eq!(bob.expect_type("message").await["message"], "and live again");
}

#[tokio::test]
async fn redis_restarting_under_traffic_loses_nothing_and_duplicates_nothing() {
    let (mut redis, one, two) = two_nodes().await;
    let (mut bob, _) = two.login("bob").await;
    let (mut alice, _) = one.login("alice").await;
    let mut sent = BTreeSet::new();
    let mut send = |i: usize| {
        let text = format!("m{i}");
        sent.insert(text.clone());
        text
    };
    for i in 0..10 {
        let text = send(i);
        send_checked(&mut alice, "bob", &text).await.unwrap();
    }
    redis.stop();
    for i in 10..20 {
        let text = send(i);
        send_checked(&mut alice, "bob", &text).await.expect("Redis down: messages are still stored");
    }
    redis.start_again().await;
    for i in 20..30 {
        let text = send(i);
        send_checked(&mut alice, "bob", &text).await.unwrap();
    }
    // All on bob's one connection, each once: live, or by his node's catch-up after it
    // resubscribed, whichever came first.
    assert_eq!(read_messages(&mut bob, sent.len()).await, sent);
    bob.expect_silence().await;

    // And the fast path works again afterwards.
    send_checked(&mut alice, "bob", "after").await.unwrap();
    assert_eq!(bob.expect_type("message").await["message"], "after");
}

#[tokio::test]
async fn a_postgres_outage_answers_unavailable_and_the_node_recovers_by_itself() {
    let pg = PrivatePostgres::start().await;
    let node = Node::spawn(&pg.url(), None).await;
    let (mut bob, _) = node.login("bob").await;
    let (mut alice, _) = node.login("alice").await;
    let http = reqwest::Client::new();
    let ready = |node: &Node| {
        let request = http.get(node.url("/readyz"));
        async move { request.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };

    let mut stored = Vec::new();
    for i in 0..5 {
        let text = format!("before {i}");
        send_checked(&mut alice, "bob", &text).await.unwrap();
        stored.push(text);
    }
    pg.stop();
    for i in 0..2 {
        let refused = send_checked(&mut alice, "bob", &format!("during {i}")).await;
        assert_eq!(refused, Err("unavailable".to_string()), "a send while the database is down");
    }
    assert_eq!(ready(&node).await, 503, "/readyz is red while the database is down");

    pg.start_again().await;
    // The node reconnects by itself; /readyz says when.
    let mut recovered = false;
    for _ in 0..100 {
        if ready(&node).await == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "the node did not recover:\n{}", node.log_text());
    for i in 0..5 {
        let text = format!("after {i}");
        send_checked(&mut alice, "bob", &text).await.unwrap();
        stored.push(text);
    }

    // Bob got every stored message live, and nothing that was refused.
    let live = read_messages(&mut bob, stored.len()).await;
    assert_eq!(live, stored.iter().cloned().collect::<BTreeSet<_>>());
    bob.expect_silence().await;
    bob.close().await;
    let (_bob, burst) = node.login("bob").await;
    let history: Vec<String> = burst.history.iter().map(|m| m.message.clone()).collect();
    assert_eq!(history, stored, "the history holds exactly what was accepted, in order");
}
