//! What the web client (`web/`) needs from the server: its files at `/`, how to sign in
//! (`/api/config`), and, in development auth mode only, a token for a name (`/api/dev/token`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tower_http::services::ServeDir;
use utoipa::ToSchema;

use crate::client_addr::ClientAddr;
use crate::error::Error;
use crate::server::AppState;
use crate::store::UserRecord;

/// How long a token from `/api/dev/token` is valid.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_NAME_CHARS: usize = 40;
const MAX_USER_ID_CHARS: usize = 64;

/// The web client's files, when a directory is configured (`PRIVORA_WEB_DIR`).
pub fn files(state: &AppState) -> Option<ServeDir> {
    let dir = state.config.web_dir.as_ref()?;
    if !dir.join("index.html").is_file() {
        tracing::warn!(dir = %dir.display(), "PRIVORA_WEB_DIR has no index.html: the web client is not served");
        return None;
    }
    Some(ServeDir::new(dir))
}

/// How the web client signs people in.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientConfig {
    /// `development` (a name is enough: `POST /api/dev/token`) or `firebase`.
    auth: &'static str,
    /// The Firebase Web SDK configuration (`PRIVORA_FIREBASE_WEB_CONFIG`), when set.
    #[schema(value_type = Option<Object>)]
    firebase: Option<serde_json::Value>,
}

/// `GET /config`: what the web client needs to know before anyone signs in.
#[utoipa::path(get, path = "/config", tag = "web client",
    responses((status = 200, description = "How to sign in", body = ClientConfig)))]
pub async fn config(State(state): State<Arc<AppState>>) -> Json<ClientConfig> {
    let auth = if state.verifier.dev_tokens().is_some() { "development" } else { "firebase" };
    Json(ClientConfig { auth, firebase: state.config.firebase_web_config.clone() })
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DevTokenRequest {
    /// The name others see and search for: 1 to 40 letters, digits, spaces or `.-_'`.
    name: String,
    /// The user id; by default made from the name (`Alice Smith` -> `alice.smith`), so the same
    /// name signs in to the same account again.
    #[serde(rename = "userId", default)]
    user_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DevTokenResponse {
    token: String,
    #[serde(rename = "userId")]
    user_id: String,
    #[serde(rename = "displayName")]
    display_name: String,
    /// Seconds until the token expires.
    #[serde(rename = "expiresIn")]
    expires_in: u64,
}

/// `POST /dev/token {"name": "Alice"}`: a development token for that name, with the user
/// registered (as `privora token` does). Exists only in development auth mode: 404 otherwise.
#[utoipa::path(post, path = "/dev/token", tag = "web client", request_body = DevTokenRequest,
    responses(
        (status = 200, description = "A development token", body = DevTokenResponse),
        (status = 400, description = "The name or user id is not acceptable"),
        (status = 404, description = "The server is not in development auth mode"),
    ))]
pub async fn dev_token(
    State(state): State<Arc<AppState>>,
    ClientAddr(client): ClientAddr,
    body: Bytes,
) -> Response {
    let Some(tokens) = state.verifier.dev_tokens() else {
        return (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response();
    };
    let request: DevTokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return Error::BadRequest(format!("send JSON like {{\"name\": \"Alice\"}}: {e}")).into_response()
        }
    };
    let (name, user_id) = match validate(&request) {
        Ok(valid) => valid,
        Err(reason) => return Error::BadRequest(reason).into_response(),
    };
    let user = UserRecord {
        user_id: user_id.clone(),
        display_name: Some(name.clone()),
        email: user_id.contains('@').then(|| user_id.clone()),
    };
    if let Err(error) = state.store.upsert_user(user).await {
        return Error::from(error).into_response();
    }
    tracing::info!(user = %user_id, %client, "development token issued");
    let token = tokens.mint(&user_id, Some(&name), DEV_TOKEN_TTL);
    Json(DevTokenResponse { token, user_id, display_name: name, expires_in: DEV_TOKEN_TTL.as_secs() })
        .into_response()
}

/// The display name and user id of a request, or why they are refused.
fn validate(request: &DevTokenRequest) -> Result<(String, String), String> {
    let name = request.name.split_whitespace().collect::<Vec<_>>().join(" ");
    let name_ok = |c: char| c.is_alphanumeric() || " .-_'".contains(c);
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || !name.chars().all(name_ok) {
        return Err(format!("name must be 1 to {MAX_NAME_CHARS} letters, digits, spaces or . - _ '"));
    }
    let user_id = match request.user_id.as_deref().map(str::trim) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => user_id_from(&name),
    };
    let id_ok = |c: char| c.is_ascii_alphanumeric() || "._@+-".contains(c);
    if user_id.is_empty() || user_id.chars().count() > MAX_USER_ID_CHARS || !user_id.chars().all(id_ok) {
        return Err(format!("userId must be 1 to {MAX_USER_ID_CHARS} of a-z, 0-9 and . _ @ + -"));
    }
    Ok((name, user_id))
}

/// `Alice Smith` -> `alice.smith`; letters outside ASCII become their code points, so that
/// every valid name has an id (`Zoë` -> `zo-eb`).
fn user_id_from(name: &str) -> String {
    let mut id = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        match c {
            'a'..='z' | '0'..='9' | '_' | '-' => id.push(c),
            c if c.is_alphanumeric() => id.push_str(&format!("-{:x}", u32::from(c))),
            _ if !id.ends_with('.') && !id.is_empty() => id.push('.'),
            _ => {}
        }
    }
    id.trim_end_matches('.').chars().take(MAX_USER_ID_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str, user_id: Option<&str>) -> DevTokenRequest {
        DevTokenRequest { name: name.into(), user_id: user_id.map(str::to_string) }
    }

    #[test]
    fn names_make_user_ids() {
        assert_eq!(
            validate(&request("  Alice   Smith ", None)),
            Ok(("Alice Smith".into(), "alice.smith".into()))
        );
        assert_eq!(validate(&request("O'Brien", None)), Ok(("O'Brien".into(), "o.brien".into())));
        assert_eq!(validate(&request("Zoë", None)).unwrap().1, "zo-eb");
        assert_eq!(validate(&request("Bob", Some("bob@example.com"))).unwrap().1, "bob@example.com");
    }

    #[test]
    fn refuses_insane_names() {
        for name in ["", "   ", "<script>", "a\u{0}b", "x/y", &"n".repeat(41)] {
            assert!(validate(&request(name, None)).is_err(), "{name:?}");
        }
        assert!(validate(&request("Bob", Some("bob smith"))).is_err());
        assert!(validate(&request("Bob", Some(&"b".repeat(65)))).is_err());
    }
}
