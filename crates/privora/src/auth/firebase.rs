//! Firebase ID tokens, verified as the Firebase Admin SDKs verify them, offline after the key
//! fetch: RS256 only, signed by one of Google's current keys (`google_keys`), for this project
//! (`aud`, `iss`), in date (`exp`, `iat`, `auth_time`), with a usable `sub`.
//!
//! Emulator mode (`FIREBASE_AUTH_EMULATOR_HOST`) also accepts the emulator's unsigned tokens
//! (`alg: none`), as the Admin SDKs do; every claim rule still applies to them, `exp` included.
//! With revocation checks on, the user is looked up (cached briefly): disabled users and tokens
//! issued before the user's `validSince` are refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::google_keys::{GoogleKeys, Lookup};
use super::{AuthError, Identity};
use crate::directory::admin::{AdminApi, AdminUser};

/// Where Google publishes the certificates that sign Firebase ID tokens.
pub const GOOGLE_CERTS_URL: &str =
    "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com";
/// Clock skew tolerated on `iat`, `auth_time` and `exp`, in seconds.
const LEEWAY: u64 = 5;
/// How long a revocation lookup is trusted.
const LOOKUP_TTL: Duration = Duration::from_secs(30);
/// Cached lookups before the cache is cleared (a bound on memory).
const LOOKUP_CACHE: usize = 100_000;
/// Largest token accepted, in bytes (Firebase tokens are about 1 KB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Option<serde_json::Value>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    iat: Option<f64>,
    #[serde(default)]
    auth_time: Option<f64>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

pub struct FirebaseVerifier {
    project_id: String,
    issuer: String,
    keys: GoogleKeys,
    emulator: bool,
    revocation: Option<Revocation>,
}

/// Revocation checks: the admin API and a short-lived cache of its answers.
struct Revocation {
    api: Arc<AdminApi>,
    cache: Mutex<HashMap<String, (Instant, Option<AdminUser>)>>,
}

impl FirebaseVerifier {
    /// `emulator`: accept the Auth Emulator's unsigned tokens. `revocation`: the admin API to
    /// look users up in, when revocation checks are on.
    pub fn new(
        project_id: String,
        certs_url: String,
        http: reqwest::Client,
        emulator: bool,
        revocation: Option<Arc<AdminApi>>,
    ) -> FirebaseVerifier {
        FirebaseVerifier {
            issuer: format!("https://securetoken.google.com/{project_id}"),
            project_id,
            keys: GoogleKeys::new(certs_url, http),
            emulator,
            revocation: revocation.map(|api| Revocation { api, cache: Mutex::new(HashMap::new()) }),
        }
    }

    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    pub fn is_emulator(&self) -> bool {
        self.emulator
    }

    pub fn checks_revocation(&self) -> bool {
        self.revocation.is_some()
    }

    /// How many times Google's certificates were fetched.
    pub fn key_fetches(&self) -> u64 {
        self.keys.fetches()
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed(format!("longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("not three dot-separated parts".into()));
        };
        let header: JoseHeader = decode_part(header, "header")?;
        self.check_signature(&header, token, signature).await?;
        let claims: Claims = decode_part(payload, "payload")?;
        let auth_time = self.check_claims(&claims)?;
        let uid = claims.sub.unwrap_or_default();
        if let Some(revocation) = &self.revocation {
            revocation.check(&uid, auth_time).await?;
        }
        Ok(Identity { uid, email: claims.email.filter(|e| !e.is_empty()), display_name: claims.name })
    }

    async fn check_signature(
        &self,
        header: &JoseHeader,
        token: &str,
        signature: &str,
    ) -> Result<(), AuthError> {
        match header.alg.as_str() {
            "RS256" => {}
            "none" if self.emulator && signature.is_empty() => return Ok(()),
            other => return Err(AuthError::Algorithm(other.to_string())),
        }
        let kid = header.kid.as_deref().filter(|k| !k.is_empty()).ok_or(AuthError::MissingKeyId)?;
        let key = match self.keys.get(kid).await {
            Ok(Lookup::Found(key)) => key,
            Ok(Lookup::Unknown) => return Err(AuthError::UnknownKey),
            Err(error) => {
                tracing::error!(%error, "cannot verify Firebase tokens");
                return Err(AuthError::Unavailable(error.to_string()));
            }
        };
        let message = &token[..token.len() - signature.len() - 1];
        match jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key, Algorithm::RS256) {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(AuthError::BadSignature),
        }
    }

    /// The claim rules, in the Admin SDK's order; returns `auth_time`.
    fn check_claims(&self, claims: &Claims) -> Result<u64, AuthError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let audience_ok = match &claims.aud {
            Some(serde_json::Value::String(aud)) => *aud == self.project_id,
            _ => false,
        };
        if !audience_ok {
            return Err(AuthError::Audience);
        }
        if claims.iss.as_deref() != Some(self.issuer.as_str()) {
            return Err(AuthError::Issuer);
        }
        let sub = claims.sub.as_deref().unwrap_or("");
        if sub.is_empty() || sub.len() > 128 {
            return Err(AuthError::Subject);
        }
        let time = |value: Option<f64>, name: &'static str| -> Result<u64, AuthError> {
            match value {
                Some(v) if v.is_finite() && v >= 0.0 => Ok(v as u64),
                _ => Err(AuthError::Malformed(format!("{name} is missing or not a number of seconds"))),
            }
        };
        let exp = time(claims.exp, "exp")?;
        if exp + LEEWAY <= now {
            return Err(AuthError::Expired);
        }
        if time(claims.iat, "iat")? > now + LEEWAY {
            return Err(AuthError::IssuedInFuture);
        }
        let auth_time = time(claims.auth_time, "auth_time")?;
        if auth_time > now + LEEWAY {
            return Err(AuthError::AuthTimeInFuture);
        }
        Ok(auth_time)
    }
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str, name: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed(format!("the {name} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::Malformed(format!("the {name} is not the expected JSON")))
}

impl Revocation {
    async fn check(&self, uid: &str, auth_time: u64) -> Result<(), AuthError> {
        let user = match self.cached(uid) {
            Some(user) => user,
            None => {
                let user = self.api.lookup(uid).await.map_err(|error| {
                    tracing::warn!(%error, "revocation lookup failed");
                    AuthError::Unavailable(format!("cannot check the account: {error}"))
                })?;
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= LOOKUP_CACHE {
                    cache.clear();
                }
                cache.insert(uid.to_string(), (Instant::now(), user.clone()));
                user
            }
        };
        let Some(user) = user else { return Err(AuthError::UnknownUser) };
        if user.disabled {
            return Err(AuthError::Disabled);
        }
        let valid_since = user.valid_since.as_deref().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        if auth_time < valid_since {
            return Err(AuthError::Revoked);
        }
        Ok(())
    }

    fn cached(&self, uid: &str) -> Option<Option<AdminUser>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(uid).filter(|(at, _)| at.elapsed() < LOOKUP_TTL).map(|(_, user)| user.clone())
    }
}
