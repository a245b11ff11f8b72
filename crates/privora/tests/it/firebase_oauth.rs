//! The production admin-API path as far as it can run here: the service account's signed JWT
//! bearer grant (checked by a local token endpoint with the account's public key), the access
//! token cached across calls, and `accounts:batchGet` paging with that token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use privora::directory::admin::AdminApi;
use privora::directory::credentials::ServiceAccount;
use serde_json::{json, Value};

use crate::support::firebase::{keys, service_account, TEST_PROJECT};

struct Google {
    grants: AtomicU64,
    public_pem: String,
    token_uri: String,
}

async fn token(
    State(google): State<Arc<Google>>,
    Form(form): Form<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[google.token_uri.as_str()]);
    validation.set_issuer(&[format!("firebase-adminsdk@{TEST_PROJECT}.iam.gserviceaccount.com")]);
    let key = DecodingKey::from_rsa_pem(google.public_pem.as_bytes()).expect("public key");
    let grant_type = form.get("grant_type").map(String::as_str);
    let assertion = form.get("assertion").map(String::as_str).unwrap_or("");
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation);
    match (grant_type, claims) {
        (Some("urn:ietf:params:oauth:grant-type:jwt-bearer"), Ok(data))
            if data.claims["scope"].as_str().is_some_and(|s| s.contains("identitytoolkit")) =>
        {
            let n = google.grants.fetch_add(1, Ordering::SeqCst) + 1;
            (
                StatusCode::OK,
                Json(
                    json!({"access_token": format!("token-{n}"), "expires_in": 3600, "token_type": "Bearer"}),
                ),
            )
        }
        (_, claims) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "detail": format!("{claims:?}")})),
        ),
    }
}

async fn batch_get(
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    if headers.get("authorization").and_then(|h| h.to_str().ok()) != Some("Bearer token-1") {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "bad bearer"}})));
    }
    let page = match query.get("nextPageToken").map(String::as_str) {
        None => {
            json!({"users": [{"localId": "u1", "email": "ann@example.com", "displayName": "Ann"}], "nextPageToken": "p2"})
        }
        Some("p2") => json!({"users": [{"localId": "u2", "displayName": "No Email", "disabled": true}]}),
        Some(_) => return (StatusCode::BAD_REQUEST, Json(json!({}))),
    };
    (StatusCode::OK, Json(page))
}

#[tokio::test]
async fn the_service_account_grant_is_signed_cached_and_used() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let google = Arc::new(Google {
        grants: AtomicU64::new(0),
        public_pem: keys()[0].public_pem.clone(),
        token_uri: format!("{base}/token"),
    });
    let app = Router::new()
        .route("/token", post(token))
        .route(&format!("/v1/projects/{TEST_PROJECT}/accounts:batchGet"), get(batch_get))
        .with_state(google.clone());
    let serve = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("temp dir");
    let account =
        ServiceAccount::load(&service_account(dir.path(), &keys()[0], &google.token_uri)).expect("account");
    let api = AdminApi::production(account, reqwest::Client::new()).expect("api").with_base(&base);
    let first = api.list_users(None).await.expect("first page");
    assert_eq!(first.users[0].display_name.as_deref(), Some("Ann"));
    let second = api.list_users(first.next_page_token.as_deref()).await.expect("second page");
    assert!(second.users[0].disabled && second.next_page_token.is_none());
    assert_eq!(google.grants.load(Ordering::SeqCst), 1, "the access token is cached across calls");
    let rows: Vec<_> =
        first.users.into_iter().chain(second.users).map(privora::directory::record_of).collect();
    assert_eq!(rows[0].user_id, "ann@example.com");
    assert_eq!(rows[1].user_id, "u2", "a user without email is addressed by uid, as logins are");
    serve.abort();
}
