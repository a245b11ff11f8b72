//! The HTTP surface: the WebSocket endpoint (`/ws`, `/ws/`) and the REST routes, each served
//! both at `/` and under `/api/` (client versions differ; the reverse proxy strips `/api`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query, State, WebSocketUpgrade};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use privora_protocol::Contact;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;
use tracing::Instrument;

use crate::auth::Identity;
use crate::client_addr::ClientAddr;
use crate::error::Error;
use crate::server::AppState;
use crate::session;

type SharedState = Arc<AppState>;

/// Default and largest number of `/search-users` results.
const SEARCH_DEFAULT_LIMIT: u32 = 20;
const SEARCH_MAX_LIMIT: u32 = 100;
/// Read buffer per WebSocket: small, so that idle connections cost little memory (chat frames
/// are a few hundred bytes; larger ones take a few more reads).
const WS_READ_BUFFER: usize = 1024;

pub fn router(state: SharedState) -> Router {
    let rest = Router::new()
        .route("/search-users", get(search_users))
        .route("/ws_test", get(ws_test))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // deployment and operations (issue 7)
        .route("/metrics", get(crate::metrics::render))
        .route("/openapi.json", get(crate::openapi::document))
        .route("/config", get(crate::web::config))
        .route("/dev/token", post(crate::web::dev_token));
    let origins = state.config.allowed_origins.clone();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin.to_str().is_ok_and(|o| origins.allows(o))
        }))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([AUTHORIZATION, CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(3600));
    let mut app = Router::new()
        .route("/ws", get(websocket))
        .route("/ws/", get(websocket))
        .merge(rest.clone())
        .nest("/api", rest);
    if let Some(files) = crate::web::files(&state) {
        app = app.fallback_service(files);
    }
    // Requests are logged with their path only: queries (search text) and headers (tokens)
    // stay out of the logs.
    let trace = TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<axum::body::Body>| {
        tracing::debug_span!("http", method = %request.method(), path = %request.uri().path())
    });
    app.layer(cors).layer(trace).with_state(state)
}

/// Upgrades to a WebSocket after checking the browser's `Origin` (CORS does not protect
/// WebSockets). Native clients send no `Origin` and are let through; so are same-origin pages.
async fn websocket(
    ws: WebSocketUpgrade,
    headers: HeaderMap,
    ClientAddr(client): ClientAddr,
    State(state): State<SharedState>,
) -> Result<Response, Error> {
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !state.config.allowed_origins.allows(origin) && !same_origin(origin, headers.get(HOST)) {
            tracing::info!(%origin, %client, "WebSocket refused: origin not allowed");
            return Err(Error::ForbiddenOrigin(origin.to_string()));
        }
    }
    if state.shutdown.is_cancelled() {
        return Err(Error::Unavailable);
    }
    let hard_limit = state.config.max_frame_bytes * session::HARD_LIMIT_FACTOR;
    let sessions = state.sessions.clone();
    Ok(ws
        .read_buffer_size(WS_READ_BUFFER)
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("ws", %client);
            // A task of its own, not axum's upgrade task: that one's future would carry the
            // upgrade's state next to the session's for the connection's life (memory per idle
            // connection, issue 5).
            sessions.spawn(session::run(socket, state).instrument(span));
            std::future::ready(())
        }))
}

fn same_origin(origin: &str, host: Option<&HeaderValue>) -> bool {
    let authority = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
    host.and_then(|h| h.to_str().ok()).is_some_and(|h| !h.is_empty() && h.eq_ignore_ascii_case(authority))
}

/// A request with a verified token: `Authorization: Bearer <token>` or, as the original
/// accepted, the bare token.
pub struct Authenticated(pub Identity);

impl FromRequestParts<SharedState> for Authenticated {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).and_then(|h| h.to_str().ok()).unwrap_or("");
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .unwrap_or(header)
            .trim();
        if token.is_empty() {
            return Err(Error::MissingToken);
        }
        Ok(Authenticated(state.verifier.verify(token).await?))
    }
}

/// `GET /search-users?q=<text>[&limit=N]`: users whose display name contains `q`.
#[utoipa::path(get, path = "/search-users", tag = "chat",
    params(
        ("q" = String, Query, description = "Text the display name contains (case-insensitive), 1 to 100 characters"),
        ("limit" = Option<u32>, Query, description = "At most this many results, 1 to 100 (default 20)"),
    ),
    responses(
        (status = 200, description = "Matching users", body = [Contact]),
        (status = 400, description = "q is empty or too long, or limit is out of range"),
        (status = 401, description = "No token, or a token that does not verify"),
    ),
    security(("bearer" = [])))]
pub(crate) async fn search_users(
    Authenticated(_): Authenticated,
    Query(params): Query<HashMap<String, String>>,
    State(state): State<SharedState>,
) -> Result<Json<Vec<Contact>>, Error> {
    let q = params.get("q").map(|q| q.trim()).unwrap_or("");
    if q.is_empty() {
        return Err(Error::BadRequest("query parameter q must not be empty".into()));
    }
    if q.chars().count() > 100 {
        return Err(Error::BadRequest("query parameter q is longer than 100 characters".into()));
    }
    let limit = match params.get("limit") {
        None => SEARCH_DEFAULT_LIMIT,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=SEARCH_MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(Error::BadRequest(format!(
                    "query parameter limit must be a whole number from 1 to {SEARCH_MAX_LIMIT}"
                )))
            }
        },
    };
    Ok(Json(state.store.search_users(q, limit).await?))
}

/// `GET /ws_test`: checks a token, as the original.
#[utoipa::path(get, path = "/ws_test", tag = "chat",
    responses((status = 200, description = "The token is valid"), (status = 401, description = "It is not")),
    security(("bearer" = [])))]
pub(crate) async fn ws_test(Authenticated(identity): Authenticated) -> Json<serde_json::Value> {
    Json(json!({"message": "WebSocket connection secured!", "email": identity.user_id()}))
}

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive")))]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready: the database answers. In Firebase mode it also says how old the last directory sync
/// is (search answers from it; a failing sync does not make the server unready).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, description = "The database does not answer")))]
pub(crate) async fn readyz(State(state): State<SharedState>) -> Response {
    match state.store.check().await {
        Ok(()) => {
            let mut body = json!({"status": "ready", "online_users": state.hub.online_users()});
            if let Some(directory) = &state.directory {
                body["directory"] = directory.report();
            }
            Json(body).into_response()
        }
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": error.to_string()})),
        )
            .into_response(),
    }
}
