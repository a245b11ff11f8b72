//! Who is logging in: a `Verifier` turns a login token into a verified `Identity`.
//!
//! The identity is the only source of a user's id and display name: nothing a client writes in a
//! frame can change who it is. `Verifier` is a closed enum rather than a trait object because
//! the set of modes is fixed (development tokens, Firebase ID tokens) and a process runs
//! exactly one of them.

pub mod dev;
pub mod firebase;
pub mod google_keys;

use std::fmt;

/// A verified user, as the token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Firebase uid (`sub`), or the development user id.
    pub uid: String,
    pub email: Option<String>,
    pub display_name: Option<String>,
}

impl Identity {
    /// The id users address each other by: the email when the token has one, else the uid
    /// (as the original server does).
    pub fn user_id(&self) -> &str {
        self.email.as_deref().unwrap_or(&self.uid)
    }
}

/// Why a token was refused. The text is for the client developer: it says which rule failed
/// and never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("token has the wrong audience (it was made for another project)")]
    Audience,
    #[error("token has the wrong issuer")]
    Issuer,
    #[error("token has no subject (user id)")]
    Subject,
    #[error("token was signed with an unknown key")]
    UnknownKey,
    // --- Firebase ID tokens -------------------------------------------------------------------
    #[error("token header names no signing key (kid)")]
    MissingKeyId,
    #[error("token was issued in the future (iat); check the device's clock")]
    IssuedInFuture,
    #[error("token's sign-in time (auth_time) is in the future; check the device's clock")]
    AuthTimeInFuture,
    #[error("the account no longer exists")]
    UnknownUser,
    #[error("the account is disabled")]
    Disabled,
    #[error("token has been revoked; sign in again")]
    Revoked,
    /// The server cannot check tokens right now (keys or the account lookup are unreachable):
    /// not the client's fault, so it must not be told to sign out.
    #[error("tokens cannot be checked right now, try again: {0}")]
    Unavailable(String),
}

/// The one verifier this process runs with.
pub enum Verifier {
    Development(dev::DevVerifier),
    Firebase(firebase::FirebaseVerifier),
}

impl Verifier {
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match self {
            Verifier::Development(v) => v.verify(token),
            Verifier::Firebase(v) => v.verify(token).await,
        }
    }

    /// The development token maker, when this process runs in development auth mode (the web
    /// client's `/api/dev/token` exists only then).
    pub fn dev_tokens(&self) -> Option<&dev::DevVerifier> {
        match self {
            Verifier::Development(v) => Some(v),
            Verifier::Firebase(_) => None,
        }
    }

    /// Words for the start-up log.
    pub fn describe(&self) -> &'static str {
        match self {
            Verifier::Development(_) => "development tokens (made by `privora token`)",
            Verifier::Firebase(v) if v.is_emulator() => {
                "Firebase ID tokens from the Auth Emulator (unsigned tokens accepted)"
            }
            Verifier::Firebase(_) => "Firebase ID tokens",
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}
