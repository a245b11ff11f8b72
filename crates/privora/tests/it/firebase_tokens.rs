//! Firebase ID-token verification against keys the test makes: certificates served from a
//! local endpoint with Cache-Control, tokens signed here. One accepted case, one refusal per
//! rule (each with its reason), key rotation and the key cache counted by fetches.

use privora::auth::AuthError;
use privora::config::FirebaseConfig;
use serde_json::{json, Value};

use crate::support::firebase::{
    claims, hs256_with_public_key, keys, now, service_account, token_with_header, CertServer, TEST_PROJECT,
};
use crate::support::TestServer;

#[tokio::test]
async fn a_valid_token_is_accepted() {
    let certs = CertServer::start(3600).await;
    certs.publish(&keys()[0]);
    let verifier = certs.verifier();
    let identity =
        verifier.verify(&keys()[0].sign(&claims(TEST_PROJECT, "alice"))).await.expect("valid token");
    assert_eq!(identity.uid, "alice");
    assert_eq!(identity.email.as_deref(), Some("alice@example.com"));
    assert_eq!(identity.display_name.as_deref(), Some("User alice"));
    assert_eq!(identity.user_id(), "alice@example.com");
}

/// `claims` for "alice" with `change` applied.
fn alice_with(change: impl FnOnce(&mut Value)) -> Value {
    let mut claims = claims(TEST_PROJECT, "alice");
    change(&mut claims);
    claims
}

#[tokio::test]
async fn each_rule_refuses_with_its_reason() {
    let certs = CertServer::start(3600).await;
    certs.publish(&keys()[0]);
    let verifier = certs.verifier();
    let [published, _, unpublished] = keys();
    let now = now();
    let cases: Vec<(&str, String, AuthError)> = vec![
        (
            "expired",
            published.sign(&alice_with(|c| {
                c["iat"] = json!(now - 7200);
                c["auth_time"] = json!(now - 7200);
                c["exp"] = json!(now - 3600);
            })),
            AuthError::Expired,
        ),
        (
            "iat in the future",
            published.sign(&alice_with(|c| c["iat"] = json!(now + 600))),
            AuthError::IssuedInFuture,
        ),
        (
            "auth_time in the future",
            published.sign(&alice_with(|c| c["auth_time"] = json!(now + 600))),
            AuthError::AuthTimeInFuture,
        ),
        (
            "wrong aud",
            published.sign(&alice_with(|c| c["aud"] = json!("another-project"))),
            AuthError::Audience,
        ),
        (
            "wrong iss",
            published
                .sign(&alice_with(|c| c["iss"] = json!("https://securetoken.google.com/another-project"))),
            AuthError::Issuer,
        ),
        ("unknown kid", unpublished.sign(&claims(TEST_PROJECT, "alice")), AuthError::UnknownKey),
        (
            "bad signature (another key under a published kid)",
            unpublished.sign_as_kid(&published.kid, &claims(TEST_PROJECT, "alice")),
            AuthError::BadSignature,
        ),
        (
            "alg none",
            token_with_header(
                &json!({"alg": "none", "kid": published.kid}),
                &claims(TEST_PROJECT, "alice"),
                b"",
            ),
            AuthError::Algorithm("none".into()),
        ),
        (
            "HS256 signed with the public key",
            hs256_with_public_key(published, &claims(TEST_PROJECT, "alice")),
            AuthError::Algorithm("HS256".into()),
        ),
        (
            "RS512",
            token_with_header(
                &json!({"alg": "RS512", "kid": published.kid}),
                &claims(TEST_PROJECT, "alice"),
                b"sig",
            ),
            AuthError::Algorithm("RS512".into()),
        ),
        (
            "missing sub",
            published.sign(&alice_with(|c| {
                c.as_object_mut().expect("claims object").remove("sub");
            })),
            AuthError::Subject,
        ),
        ("empty sub", published.sign(&alice_with(|c| c["sub"] = json!(""))), AuthError::Subject),
        (
            "sub over 128 chars",
            published.sign(&alice_with(|c| c["sub"] = json!("u".repeat(129)))),
            AuthError::Subject,
        ),
        (
            "no kid",
            token_with_header(&json!({"alg": "RS256"}), &claims(TEST_PROJECT, "alice"), b"sig"),
            AuthError::MissingKeyId,
        ),
    ];
    for (case, token, expected) in cases {
        let refused = verifier.verify(&token).await.expect_err(case);
        assert_eq!(refused, expected, "{case}");
        let reason = refused.to_string();
        assert!(!reason.contains(&token[..20]), "{case}: the reason echoes the token: {reason}");
    }
    assert!(matches!(verifier.verify("garbage").await, Err(AuthError::Malformed(_))));
    assert_eq!(certs.fetches(), 2, "one fetch, plus one refetch for the one unknown kid");
}

#[tokio::test]
async fn rotated_keys_are_fetched_and_the_cache_is_honoured() {
    let certs = CertServer::start(3600).await;
    let [old, new, _] = keys();
    certs.publish(old);
    let verifier = certs.verifier();
    for uid in ["a", "b", "c"] {
        verifier.verify(&old.sign(&claims(TEST_PROJECT, uid))).await.expect("old key");
    }
    assert_eq!(certs.fetches(), 1, "max-age=3600: one fetch serves every token");

    // Google rotates: a new key appears, tokens signed with it arrive.
    certs.publish(new);
    verifier.verify(&new.sign(&claims(TEST_PROJECT, "d"))).await.expect("new key after rotation");
    assert_eq!(certs.fetches(), 2, "the unknown kid made one refetch");
    verifier.verify(&old.sign(&claims(TEST_PROJECT, "e"))).await.expect("old key still published");
    verifier.verify(&new.sign(&claims(TEST_PROJECT, "f"))).await.expect("new key cached");
    assert_eq!(certs.fetches(), 2);
}

#[tokio::test]
async fn a_flood_of_forged_kids_makes_one_refetch() {
    let certs = CertServer::start(3600).await;
    certs.publish(&keys()[0]);
    let verifier = certs.verifier();
    verifier.verify(&keys()[0].sign(&claims(TEST_PROJECT, "a"))).await.expect("valid");
    for n in 0..50 {
        let forged = keys()[2].sign_as_kid(&format!("forged-{n}"), &claims(TEST_PROJECT, "a"));
        assert_eq!(verifier.verify(&forged).await, Err(AuthError::UnknownKey));
    }
    assert_eq!(certs.fetches(), 2);
}

#[tokio::test]
async fn max_age_zero_means_fetch_every_time() {
    let certs = CertServer::start(0).await;
    certs.publish(&keys()[0]);
    let verifier = certs.verifier();
    for uid in ["a", "b", "c"] {
        verifier.verify(&keys()[0].sign(&claims(TEST_PROJECT, uid))).await.expect("valid");
    }
    assert_eq!(certs.fetches(), 3, "an expired cache is refetched");
}

#[tokio::test]
async fn emulator_mode_accepts_unsigned_tokens_but_keeps_every_claim_rule() {
    let verifier = privora::auth::firebase::FirebaseVerifier::new(
        TEST_PROJECT.into(),
        "http://127.0.0.1:9/unused".into(),
        reqwest::Client::new(),
        true,
        None,
    );
    let none = json!({"alg": "none", "typ": "JWT"});
    let identity = verifier
        .verify(&token_with_header(&none, &claims(TEST_PROJECT, "emu"), b""))
        .await
        .expect("unsigned");
    assert_eq!(identity.uid, "emu");
    let expired = alice_with(|c| {
        c["iat"] = json!(now() - 7200);
        c["auth_time"] = json!(now() - 7200);
        c["exp"] = json!(now() - 3600);
    });
    assert_eq!(verifier.verify(&token_with_header(&none, &expired, b"")).await, Err(AuthError::Expired));
    let wrong_aud = alice_with(|c| c["aud"] = json!("other"));
    assert_eq!(verifier.verify(&token_with_header(&none, &wrong_aud, b"")).await, Err(AuthError::Audience));
    // An `alg: none` token that carries a signature is not an emulator token.
    let signed_none = token_with_header(&none, &claims(TEST_PROJECT, "emu"), b"x");
    assert_eq!(verifier.verify(&signed_none).await, Err(AuthError::Algorithm("none".into())));
}

/// The whole server in production Firebase mode (a service account, keys from the local
/// endpoint): a refused login says why and closes with 1008; REST answers 401 with the reason;
/// an OAuth endpoint that cannot be reached leaves the directory sync failing with backoff,
/// which `/readyz` reports while search still answers.
#[tokio::test]
async fn server_in_firebase_mode_says_why_a_token_is_refused() {
    let certs = CertServer::start(3600).await;
    certs.publish(&keys()[0]);
    let dir = tempfile::tempdir().expect("temp dir");
    let credentials = service_account(dir.path(), &keys()[0], "http://127.0.0.1:9/token");
    let config = FirebaseConfig {
        credentials: Some(credentials),
        emulator_host: None,
        project_id: None,
        certs_url: certs.url(),
        check_revoked: false,
        directory_sync: None,
    };
    let server = TestServer::start_firebase(config, &[]).await;

    let good = keys()[0].sign(&claims(TEST_PROJECT, "carol"));
    let mut client = server.connect().await;
    client.send_json(json!({"type": "login", "token": good})).await;
    let burst = client.login_burst().await;
    assert!(burst.history.is_empty());

    let wrong_project = keys()[0].sign(&claims("another-project", "mallory"));
    let mut refused = server.connect().await;
    refused.send_json(json!({"type": "login", "token": wrong_project})).await;
    let reason = refused.expect_error("invalid_token").await;
    assert!(reason.contains("audience"), "{reason}");
    assert_eq!(refused.expect_close().await, 1008);

    let (status, body) = server.get("/search-users?q=carol", Some(&wrong_project)).await;
    assert_eq!(status, 401);
    assert_eq!(body["detail"], "Invalid token");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("audience")), "{body}");

    let (status, body) = server.get("/search-users?q=User%20car", Some(&good)).await;
    assert_eq!(status, 200);
    assert_eq!(body[0]["userId"], "carol@example.com");

    let body = server.wait_for_readyz(|body| !body["directory"]["last_error"].is_null()).await;
    let directory = &body["directory"];
    assert!(directory["last_sync_age_seconds"].is_null(), "{body}");
    assert!(directory["last_error"].as_str().is_some_and(|e| e.contains("OAuth")), "{body}");
    let (status, _) = server.get("/search-users?q=User%20car", Some(&good)).await;
    assert_eq!(status, 200, "search answers from the local table while the sync fails");
}
