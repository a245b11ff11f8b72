//! Google's token-signing keys for Firebase ID tokens: x509 certificates by key id, fetched
//! over HTTP and cached for as long as the response's `Cache-Control: max-age` says.
//!
//! Keys rotate: a token may name a key id that appeared after the last fetch. Such an unknown
//! `kid` triggers a refetch, but at most one per `UNKNOWN_KID_REFETCH` interval, so that a flood
//! of forged key ids cannot become a flood of requests to Google.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jsonwebtoken::DecodingKey;
use x509_cert::der::DecodePem;
use x509_cert::Certificate;

/// At most one refetch for unknown key ids per this interval.
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(60);
/// How long keys are kept when the response names no `max-age`.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);
/// rsaEncryption (PKCS #1), the only key type Google uses for ID tokens.
const RSA_ENCRYPTION: x509_cert::der::asn1::ObjectIdentifier =
    x509_cert::der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeysError {
    #[error("cannot fetch Google's token-signing keys from {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("Google's token-signing keys at {url} are not usable: {reason}")]
    Invalid { url: String, reason: String },
}

/// What a lookup found.
pub enum Lookup {
    Found(DecodingKey),
    Unknown,
}

struct Cached {
    keys: HashMap<String, DecodingKey>,
    expires: Instant,
}

#[derive(Default)]
struct State {
    cached: Option<Cached>,
    last_unknown_refetch: Option<Instant>,
}

pub struct GoogleKeys {
    url: String,
    http: reqwest::Client,
    state: Mutex<State>,
    /// One fetch at a time; callers that waited re-read the cache.
    fetching: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

impl GoogleKeys {
    pub fn new(url: String, http: reqwest::Client) -> GoogleKeys {
        GoogleKeys {
            url,
            http,
            state: Mutex::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        }
    }

    /// How many times the certificates were fetched (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The key named `kid`. Fetches when the cache is empty or expired, and once per interval
    /// when `kid` is unknown. When a refetch fails but keys are cached, the stale keys serve.
    pub async fn get(&self, kid: &str) -> Result<Lookup, KeysError> {
        if let Some(found) = self.cached(kid, false) {
            return Ok(found);
        }
        let _one_at_a_time = self.fetching.lock().await;
        // Someone else may have fetched while this caller waited.
        if let Some(found) = self.cached(kid, true) {
            return Ok(found);
        }
        match self.fetch().await {
            Ok((keys, max_age)) => {
                let mut state = self.lock();
                let found = keys.get(kid).cloned();
                state.cached = Some(Cached { keys, expires: Instant::now() + max_age });
                Ok(found.map_or(Lookup::Unknown, Lookup::Found))
            }
            Err(error) => {
                let state = self.lock();
                match &state.cached {
                    Some(stale) => {
                        tracing::warn!(%error, "using stale Google keys");
                        Ok(stale.keys.get(kid).cloned().map_or(Lookup::Unknown, Lookup::Found))
                    }
                    None => Err(error),
                }
            }
        }
    }

    /// Answers from the cache when it can: `Some` when the key is there and fresh, or when it
    /// is unknown and the refetch allowance is used up. `after_wait` is true once the caller
    /// holds the fetch lock: then a fetch is about to happen and is recorded.
    fn cached(&self, kid: &str, after_wait: bool) -> Option<Lookup> {
        let now = Instant::now();
        let mut state = self.lock();
        let cached = state.cached.as_ref()?;
        if cached.expires <= now {
            return None;
        }
        if let Some(key) = cached.keys.get(kid) {
            return Some(Lookup::Found(key.clone()));
        }
        let recently =
            state.last_unknown_refetch.is_some_and(|at| now.duration_since(at) < UNKNOWN_KID_REFETCH);
        if recently {
            return Some(Lookup::Unknown);
        }
        if after_wait {
            state.last_unknown_refetch = Some(now);
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn fetch(&self) -> Result<(HashMap<String, DecodingKey>, Duration), KeysError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fetch_error = |reason: String| KeysError::Fetch { url: self.url.clone(), reason };
        let response = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| fetch_error(e.to_string()))?;
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age)
            .unwrap_or(DEFAULT_MAX_AGE);
        let certs: HashMap<String, String> = response.json().await.map_err(|e| fetch_error(e.to_string()))?;
        let mut keys = HashMap::with_capacity(certs.len());
        for (kid, pem) in certs {
            let key = rsa_key_of_certificate(&pem).map_err(|reason| KeysError::Invalid {
                url: self.url.clone(),
                reason: format!("key {kid}: {reason}"),
            })?;
            keys.insert(kid, key);
        }
        tracing::debug!(
            keys = keys.len(),
            max_age = max_age.as_secs(),
            "fetched Google's token-signing keys"
        );
        Ok((keys, max_age))
    }
}

/// `max-age=N` from a Cache-Control header.
fn max_age(header: &str) -> Option<Duration> {
    header
        .split(',')
        .filter_map(|part| part.trim().strip_prefix("max-age="))
        .find_map(|n| n.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The RSA public key of a PEM certificate.
fn rsa_key_of_certificate(pem: &str) -> Result<DecodingKey, String> {
    let cert = Certificate::from_pem(pem.as_bytes()).map_err(|e| format!("not an x509 certificate: {e}"))?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(format!("not an RSA key ({})", spki.algorithm.oid));
    }
    let pkcs1 = spki.subject_public_key.as_bytes().ok_or("the key's bit string is not whole bytes")?;
    Ok(DecodingKey::from_rsa_der(pkcs1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control() {
        assert_eq!(
            max_age("public, max-age=19302, must-revalidate, no-transform"),
            Some(Duration::from_secs(19302))
        );
        assert_eq!(max_age("no-cache"), None);
    }
}
