//! A small client of the Identity Toolkit admin API (what the Firebase Admin SDKs call for
//! `listUsers` and `getUser`), authorised with an OAuth2 access token of the service account,
//! or with the emulator's admin bearer `owner`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use super::credentials::ServiceAccount;

const PRODUCTION_BASE: &str = "https://identitytoolkit.googleapis.com";
/// The scopes the Admin SDKs ask for user management.
const SCOPES: &str =
    "https://www.googleapis.com/auth/cloud-platform https://www.googleapis.com/auth/identitytoolkit";
/// A token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// Users per `accounts:batchGet` page (the API's maximum).
pub const PAGE_SIZE: u32 = 1000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach {what}: {reason}")]
    Network { what: &'static str, reason: String },
    #[error("{what} answered {status}: {body}")]
    Status { what: &'static str, status: u16, body: String },
    #[error("cannot sign the OAuth grant with the service account's key: {0}")]
    Signing(String),
    #[error("{what} answered something unexpected: {reason}")]
    Decode { what: &'static str, reason: String },
}

/// One user as the admin API describes it (the fields Privora uses).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdminUser {
    pub local_id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    /// Seconds since the epoch, as a string: tokens issued before it are revoked.
    #[serde(default)]
    pub valid_since: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    #[serde(default)]
    pub users: Vec<AdminUser>,
    #[serde(default)]
    pub next_page_token: Option<String>,
}

/// How requests are authorised. (One per process: the size difference does not matter.)
#[allow(clippy::large_enum_variant)]
enum Bearer {
    /// The Auth Emulator accepts `Authorization: Bearer owner` as an admin.
    Emulator,
    ServiceAccount {
        account: ServiceAccount,
        key: EncodingKey,
        token: tokio::sync::Mutex<Option<AccessToken>>,
    },
}

struct AccessToken {
    value: String,
    renew_at: Instant,
}

pub struct AdminApi {
    base: String,
    project_id: String,
    http: reqwest::Client,
    bearer: Bearer,
}

#[derive(Serialize)]
struct GrantClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl AdminApi {
    /// Against Google, authorised by the service account.
    pub fn production(account: ServiceAccount, http: reqwest::Client) -> Result<AdminApi, AdminError> {
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|e| AdminError::Signing(e.to_string()))?;
        Ok(AdminApi {
            base: PRODUCTION_BASE.into(),
            project_id: account.project_id.clone(),
            http,
            bearer: Bearer::ServiceAccount { account, key, token: tokio::sync::Mutex::new(None) },
        })
    }

    /// Against the Auth Emulator at `host` (host:port).
    pub fn emulator(host: &str, project_id: String, http: reqwest::Client) -> AdminApi {
        AdminApi {
            base: format!("http://{host}/identitytoolkit.googleapis.com"),
            project_id,
            http,
            bearer: Bearer::Emulator,
        }
    }

    /// The same API at another address (tests serve a local stand-in for Google's).
    pub fn with_base(mut self, base: &str) -> AdminApi {
        self.base = base.trim_end_matches('/').to_string();
        self
    }

    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// One page of every user (`accounts:batchGet`), from `page_token` on.
    pub async fn list_users(&self, page_token: Option<&str>) -> Result<Page, AdminError> {
        let url = format!("{}/v1/projects/{}/accounts:batchGet", self.base, self.project_id);
        let mut query = vec![("maxResults", PAGE_SIZE.to_string())];
        if let Some(token) = page_token {
            query.push(("nextPageToken", token.to_string()));
        }
        let request = self.http.get(url).query(&query);
        self.send("accounts:batchGet", request).await
    }

    /// The user with this uid, or `None` when there is none (`accounts:lookup`).
    pub async fn lookup(&self, uid: &str) -> Result<Option<AdminUser>, AdminError> {
        let url = format!("{}/v1/projects/{}/accounts:lookup", self.base, self.project_id);
        let request = self.http.post(url).json(&serde_json::json!({"localId": [uid]}));
        let page: Page = self.send("accounts:lookup", request).await?;
        Ok(page.users.into_iter().find(|u| u.local_id == uid))
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, AdminError> {
        let bearer = self.access_token().await?;
        let response = request
            .bearer_auth(bearer)
            .send()
            .await
            .map_err(|e| AdminError::Network { what, reason: e.to_string() })?;
        decode(what, response).await
    }

    /// The bearer for the next request: cached until shortly before it expires.
    async fn access_token(&self) -> Result<String, AdminError> {
        let Bearer::ServiceAccount { account, key, token } = &self.bearer else {
            return Ok("owner".into());
        };
        let mut cached = token.lock().await;
        if let Some(current) = cached.as_ref().filter(|t| t.renew_at > Instant::now()) {
            return Ok(current.value.clone());
        }
        let fresh = self.grant(account, key).await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// The signed-JWT bearer grant (RFC 7523) at the credentials' `token_uri`.
    async fn grant(&self, account: &ServiceAccount, key: &EncodingKey) -> Result<AccessToken, AdminError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = GrantClaims {
            iss: &account.client_email,
            scope: SCOPES,
            aud: &account.token_uri,
            iat: now,
            exp: now + 3600,
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = account.private_key_id.clone();
        let assertion =
            jsonwebtoken::encode(&header, &claims, key).map_err(|e| AdminError::Signing(e.to_string()))?;
        let what = "the OAuth token endpoint";
        let response = self
            .http
            .post(&account.token_uri)
            .form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|e| AdminError::Network { what, reason: e.to_string() })?;
        let token: TokenResponse = decode(what, response).await?;
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(3600));
        Ok(AccessToken {
            value: token.access_token,
            renew_at: Instant::now() + lifetime.saturating_sub(RENEW_BEFORE),
        })
    }
}

async fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    response: reqwest::Response,
) -> Result<T, AdminError> {
    let status = response.status();
    if !status.is_success() {
        let body: String = response.text().await.unwrap_or_default().chars().take(500).collect();
        return Err(AdminError::Status { what, status: status.as_u16(), body });
    }
    response.json().await.map_err(|e| AdminError::Decode { what, reason: e.to_string() })
}
