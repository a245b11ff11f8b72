//! Nothing is lost: messages wait for offline users, survive restarts, and count as delivered
//! only once the client's stack has answered a ping sent after them.

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::TestServer;

#[tokio::test]
async fn offline_messages_come_at_the_next_login_in_order_exactly_once() {
    let server = TestServer::start().await;
    server.register("bob", Some("Bob")).await;
    let (mut alice, _) = server.login_as("alice", Some("Alice")).await;
    for i in 0..5 {
        alice
            .send_json(json!({"type": "message", "to": "bob", "message": format!("m{i}"), "msg_id": i}))
            .await;
    }
    alice.sync().await;

    let (mut bob, burst) = server.login("bob").await;
    let texts: Vec<&str> = burst.offline.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4"]);
    let first = &burst.offline[0];
    assert_eq!((first.from.as_str(), first.to.as_str()), ("alice", "bob"));
    assert_eq!(first.msg_id, Some(json!(0)));
    assert!(first.timestamp.ends_with('Z'));
    // History holds them too, after the offline frames (the oldest clients only read history).
    assert_eq!(burst.history.len(), 5);
    bob.confirm_delivery().await;
    bob.close().await;

    let (_, burst) = server.login("bob").await;
    assert!(burst.offline.is_empty(), "delivered once, not again: {:?}", burst.offline);
    assert_eq!(burst.history.len(), 5, "history keeps delivered messages");
}

#[tokio::test]
async fn pending_messages_survive_a_restart() {
    let server = TestServer::start().await;
    server.register("bob", None).await;
    let (mut alice, _) = server.login("alice").await;
    alice.message("bob", "before the restart").await;
    alice.sync().await;
    drop(alice);

    let server = server.restart().await;
    let (_, burst) = server.login("bob").await;
    assert_eq!(burst.offline.len(), 1);
    assert_eq!(burst.offline[0].message, "before the restart");
}

#[tokio::test]
async fn a_client_that_vanishes_before_answering_the_ping_gets_the_messages_again() {
    let server = TestServer::start().await;
    server.register("bob", None).await;
    let (mut alice, _) = server.login("alice").await;
    alice.message("bob", "are you there?").await;
    alice.sync().await;

    // Bob reads his login burst, then his connection dies before his stack reads the ping
    // that follows it: no pong ever reaches the server.
    let mut bob = server.connect().await;
    bob.send_json(json!({"type": "login", "token": server.token("bob", None)})).await;
    let mut seen = Vec::new();
    while let Some(Ok(message)) = bob.ws.next().await {
        if let Message::Text(text) = message {
            let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
            let ty = frame["type"].as_str().unwrap_or_default().to_string();
            seen.push(ty.clone());
            if ty == "contacts" {
                break;
            }
        }
    }
    assert_eq!(seen, ["offline", "history", "contacts"]);
    drop(bob); // no close frame, no pong: the socket just goes

    // He comes back: the message is still pending.
    let (mut bob, burst) = server.login("bob").await;
    assert_eq!(burst.offline.len(), 1, "not lost");
    assert_eq!(burst.offline[0].message, "are you there?");
    // This time his stack answers the ping: the message is delivered.
    bob.confirm_delivery().await;
    bob.close().await;
    let (_, burst) = server.login("bob").await;
    assert!(burst.offline.is_empty());
}

#[tokio::test]
async fn a_live_message_to_a_dead_socket_stays_pending() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    // Bob's connection goes half dead: he stops reading. Whatever reaches his socket is not
    // confirmed, so it must come again.
    alice.message("bob", "into the void").await;
    alice.sync().await;
    let frame = bob.recv_json().await; // the frame arrives, but bob never reads the ping after it
    assert_eq!(frame["message"], "into the void");
    drop(bob);

    let (_, burst) = server.login("bob").await;
    assert_eq!(burst.offline.len(), 1);
    assert_eq!(burst.offline[0].message, "into the void");
}

#[tokio::test]
async fn live_messages_are_confirmed_by_the_pong() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    for i in 0..20 {
        alice.message("bob", &format!("live {i}")).await;
    }
    for i in 0..20 {
        assert_eq!(bob.expect_type("message").await["message"], format!("live {i}"));
    }
    bob.confirm_delivery().await;
    bob.close().await;
    let (_, burst) = server.login("bob").await;
    assert!(burst.offline.is_empty(), "{:?}", burst.offline);
    assert_eq!(burst.history.len(), 20);
}

/// A busy connection gets at most one delivery ping per 100 ms (fewer as it stays busy: the
/// spacing grows up to a second), and the ping that waited for its turn still goes out:
/// everything ends up confirmed without any `ping` frame.
#[tokio::test]
async fn delivery_pings_are_spaced_and_the_last_one_still_comes() {
    let server = TestServer::start_with(&["--rate-limit", "0"]).await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    for i in 0..200 {
        alice.message("bob", &format!("burst {i}")).await;
    }
    let started = std::time::Instant::now();
    let (mut messages, mut pings) = (0, 0);
    // Bob reads (and so answers pings) until everything came and a quiet 1.5 s has passed:
    // long enough for a ping held back by the longest spacing (1 s) to go out and be answered.
    while let Ok(Some(Ok(frame))) =
        tokio::time::timeout(std::time::Duration::from_millis(1500), bob.ws.next()).await
    {
        match frame {
            Message::Text(_) => messages += 1,
            Message::Ping(_) => pings += 1,
            _ => {}
        }
    }
    let elapsed_ms = started.elapsed().as_millis();
    assert_eq!(messages, 200);
    // One per 100 ms, plus the first, plus a heartbeat ping or two.
    let most = elapsed_ms / 100 + 3;
    assert!(pings <= most, "{pings} delivery pings in {elapsed_ms} ms (at most {most})");
    bob.close().await;
    let (_, burst) = server.login("bob").await;
    assert!(burst.offline.is_empty(), "{} messages were never confirmed", burst.offline.len());
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_and_loses_nothing() {
    let server = TestServer::start_with(&["--outbound-queue", "16", "--rate-limit", "0"]).await;
    let (mut alice, _) = server.login("alice").await;
    let (mut bob, _) = server.login("bob").await;
    // Bob stops reading; alice sends far more than his socket buffers and queue can hold.
    let text = "x".repeat(8 * 1024);
    for i in 0..1000 {
        alice.message("bob", &format!("{i} {text}")).await;
    }
    alice.sync().await;
    // The server cuts him off without waiting for him.
    server.wait_until_offline("bob").await;
    // When bob reads again, he finds what reached his socket, and then the end.
    let mut received = Vec::new();
    while let crate::support::Event::Text(frame) = bob.next_event().await {
        let frame: serde_json::Value = serde_json::from_str(&frame).unwrap();
        if frame["type"] == "message" {
            received.push(
                frame["message"].as_str().unwrap().split(' ').next().unwrap().parse::<usize>().unwrap(),
            );
        }
    }
    assert!(received.len() < 1000, "the queue overflowed before everything was written");
    // Whatever his stack did not confirm comes again, in order: together, all 1000.
    let (_, burst) = server.login("bob").await;
    let again: Vec<usize> =
        burst.offline.iter().map(|m| m.message.split(' ').next().unwrap().parse().unwrap()).collect();
    // Pings confirm a prefix of what was written: what comes again is all the rest, in order.
    let first_again = again.first().copied().unwrap_or(1000);
    assert!(first_again <= received.len(), "only what reached him can have been confirmed");
    assert_eq!(again, (first_again..1000).collect::<Vec<_>>(), "nothing lost, in order");
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let server = TestServer::start_with(&["--ping-interval", "1"]).await;
    let (mut bob, _) = server.login("bob").await;
    // Bob's stack does not read for a while, so it answers no ping: the server gives up on
    // him after two silent intervals.
    let _ = &mut bob;
    server.wait_until_offline("bob").await;
    assert!(matches!(bob.next_event().await, crate::support::Event::Closed(_)));
}

/// A message stored while its recipient logs in can be both read into the login burst and
/// routed to the new connection live: the connection writes it once. On one node only the
/// burst's ids are remembered for this (no catch-up can bring a live message again).
#[tokio::test]
async fn messages_sent_while_the_recipient_logs_in_arrive_exactly_once() {
    let server = TestServer::start_with(&["--rate-limit", "0"]).await;
    server.register("bob", None).await;
    let (mut alice, _) = server.login("alice").await;
    for round in 0..30 {
        let sending = tokio::spawn(async move {
            for i in 0..100 {
                alice.message("bob", &format!("r{round} m{i}")).await;
            }
            alice.sync().await;
            alice
        });
        let mut bob = server.connect().await;
        bob.send_json(json!({"type": "login", "token": server.token("bob", None)})).await;
        alice = sending.await.expect("alice sends");
        // Everything alice sent was stored and routed before her pong, so before bob's.
        let frames = bob.sync().await;
        let delivered: Vec<&serde_json::Value> =
            frames.iter().filter(|f| f["type"] == "offline" || f["type"] == "message").collect();
        let mut ids = std::collections::HashSet::new();
        for frame in &delivered {
            assert!(ids.insert(frame["id"].as_i64().expect("id")), "written twice: {frame}");
        }
        let this_round = delivered
            .iter()
            .filter(|f| f["message"].as_str().is_some_and(|m| m.starts_with(&format!("r{round} "))))
            .count();
        assert_eq!(this_round, 100, "every message of round {round} reached bob");
        bob.confirm_delivery().await;
        bob.close().await;
    }
}
