//! The one error type of the server, and the only place where errors become protocol `error`
//! frames (WebSocket) or HTTP statuses with a JSON reason (REST).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use privora_protocol::{DecodeError, ErrorCode, ServerFrame};
use serde_json::json;

use crate::auth::AuthError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("log in first: send {{\"type\":\"login\",\"token\":\"<ID token>\"}} as the first frame")]
    LoginRequired,
    #[error("no login within {0} seconds")]
    LoginTimeout(u64),
    #[error("invalid token: {0}")]
    InvalidToken(AuthError),
    #[error("missing token: send the header Authorization: Bearer <ID token>")]
    MissingToken,
    #[error("{0}")]
    BadFrame(String),
    #[error("frame of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("{0:?} is not a known user")]
    UnknownRecipient(String),
    #[error("too many messages: at most {0} per second; this one was not stored")]
    RateLimited(u32),
    #[error("{0}")]
    BadRequest(String),
    #[error("origin {0:?} is not allowed (see ALLOWED_ORIGIN)")]
    ForbiddenOrigin(String),
    #[error("you are not reading your frames fast enough; reconnect (unread messages come again)")]
    SlowConsumer,
    #[error("the database is unavailable; nothing was stored, try again")]
    Unavailable,
    #[error("internal error; nothing was stored")]
    Internal,
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::LoginRequired | Error::LoginTimeout(_) => ErrorCode::LoginRequired,
            Error::InvalidToken(_) | Error::MissingToken => ErrorCode::InvalidToken,
            Error::BadFrame(_) | Error::BadRequest(_) | Error::ForbiddenOrigin(_) => ErrorCode::BadFrame,
            Error::TooLarge { .. } => ErrorCode::TooLarge,
            Error::UnknownType(_) => ErrorCode::UnknownType,
            Error::UnknownRecipient(_) => ErrorCode::UnknownRecipient,
            Error::RateLimited(_) => ErrorCode::RateLimited,
            Error::Unavailable => ErrorCode::Unavailable,
            Error::SlowConsumer => ErrorCode::SlowConsumer,
            Error::Internal => ErrorCode::Internal,
        }
    }

    /// The `code` of a REST error body: the frame code, or a REST-only one.
    pub fn rest_code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::ForbiddenOrigin(_) => "origin_not_allowed",
            _ => self.code().as_str(),
        }
    }

    /// The protocol `error` frame for this error.
    pub fn frame(&self) -> ServerFrame {
        ServerFrame::error(self.code(), self.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidToken(_) | Error::MissingToken | Error::LoginRequired | Error::LoginTimeout(_) => {
                StatusCode::UNAUTHORIZED
            }
            Error::ForbiddenOrigin(_) => StatusCode::FORBIDDEN,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::UnknownRecipient(_) => StatusCode::NOT_FOUND,
            Error::BadFrame(_) | Error::BadRequest(_) | Error::UnknownType(_) => StatusCode::BAD_REQUEST,
            Error::Unavailable | Error::SlowConsumer => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A token the server cannot check right now is `unavailable` (try again), not `invalid_token`
/// (which clients answer by signing out).
impl From<AuthError> for Error {
    fn from(error: AuthError) -> Error {
        match error {
            AuthError::Unavailable(reason) => {
                tracing::warn!(%reason, "token verification unavailable");
                Error::Unavailable
            }
            other => Error::InvalidToken(other),
        }
    }
}

impl From<DecodeError> for Error {
    fn from(error: DecodeError) -> Error {
        match error {
            DecodeError::BadFrame(reason) => Error::BadFrame(reason),
            DecodeError::UnknownType(ty) => Error::UnknownType(ty),
        }
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Error {
        match error {
            StoreError::UnknownRecipient(user) => Error::UnknownRecipient(user),
            reused @ StoreError::MsgIdReused(_) => Error::BadFrame(reused.to_string()),
            StoreError::Unavailable(reason) => {
                tracing::warn!(%reason, "database unavailable");
                Error::Unavailable
            }
            StoreError::Closed => Error::Unavailable,
            StoreError::Database(reason) => {
                tracing::error!(%reason, "database error");
                Error::Internal
            }
        }
    }
}

/// REST errors: the original's `{"detail": ...}` body (clients show it), plus a stable `code`
/// and, for token errors, the precise reason.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        crate::metrics::error(self.code(), crate::metrics::Via::Http);
        let body = match &self {
            Error::InvalidToken(reason) => {
                json!({"detail": "Invalid token", "code": self.rest_code(), "reason": reason.to_string()})
            }
            Error::MissingToken => {
                json!({"detail": "Invalid token", "code": self.rest_code(), "reason": self.to_string()})
            }
            _ => json!({"detail": self.to_string(), "code": self.rest_code()}),
        };
        (self.status(), Json(body)).into_response()
    }
}
