//! Development tokens: HS256 JWTs signed with a local secret, made by `privora token`.
//!
//! They let a laptop run Privora with no Firebase project at all. They are accepted only when no
//! Firebase credentials are configured, and the server says so loudly at start.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{
    decode, encode, errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use super::{AuthError, Identity};
use crate::config::DevSecret;

/// Issuer and audience of development tokens, so that they can never pass for Firebase ones.
const DEV_ISSUER: &str = "privora-dev";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
}

pub struct DevVerifier {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the development secret {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot create the development secret {path}: {source}")]
    Create { path: String, source: std::io::Error },
    #[error("the development secret file {0} is empty or too short; delete it to make a new one")]
    Short(String),
}

impl DevVerifier {
    pub fn new(secret: &DevSecret) -> Result<DevVerifier, SecretError> {
        let secret = match secret {
            DevSecret::Given(s) => s.clone(),
            DevSecret::File(path) => load_or_create(path)?,
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[DEV_ISSUER]);
        validation.set_audience(&[DEV_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Ok(DevVerifier {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        })
    }

    /// Makes a token for `user_id` (an email or any id), valid for `ttl`.
    pub fn mint(&self, user_id: &str, name: Option<&str>, ttl: Duration) -> String {
        let now = unix_now();
        let claims = Claims {
            sub: user_id.to_string(),
            email: user_id.contains('@').then(|| user_id.to_string()),
            name: name.map(str::to_string),
            iss: DEV_ISSUER.into(),
            aud: DEV_ISSUER.into(),
            iat: now,
            exp: now + ttl.as_secs(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm => AuthError::Algorithm("other than HS256".into()),
            ErrorKind::InvalidAudience => AuthError::Audience,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::MissingRequiredClaim(claim) if claim == "sub" => AuthError::Subject,
            _ => AuthError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > 128 {
            return Err(AuthError::Subject);
        }
        Ok(Identity { uid: claims.sub, email: claims.email, display_name: claims.name })
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Reads the secret file, or creates it (readable by its owner only) on first use.
fn load_or_create(path: &Path) -> Result<String, SecretError> {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().to_string()),
        Ok(_) => return Err(SecretError::Short(shown)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SecretError::Read { path: shown, source }),
    }
    let secret: String = {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(secret.as_bytes())
                .map_err(|source| SecretError::Create { path: shown, source })?;
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(path),
        Err(source) => Err(SecretError::Create { path: shown, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(secret: &str) -> DevVerifier {
        DevVerifier::new(&DevSecret::Given(secret.into())).unwrap()
    }

    #[test]
    fn round_trip() {
        let v = verifier("0123456789abcdef0123456789abcdef");
        let token = v.mint("alice@example.com", Some("Alice"), Duration::from_secs(60));
        let id = v.verify(&token).unwrap();
        assert_eq!(id.user_id(), "alice@example.com");
        assert_eq!(id.display_name.as_deref(), Some("Alice"));
        let bare = v.verify(&v.mint("bob", None, Duration::from_secs(60))).unwrap();
        assert_eq!((bare.user_id(), bare.email.as_deref()), ("bob", None));
    }

    #[test]
    fn refuses_other_secrets_and_garbage() {
        let v = verifier("0123456789abcdef0123456789abcdef");
        let other = verifier("ffffffffffffffffffffffffffffffff");
        let token = other.mint("alice", None, Duration::from_secs(60));
        assert_eq!(v.verify(&token), Err(AuthError::BadSignature));
        assert!(matches!(v.verify("not-a-token"), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn secret_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db.dev-secret");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }
}
