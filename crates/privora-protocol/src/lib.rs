//! Privora's wire protocol: the JSON text frames a client and the server exchange over `/ws`.
//!
//! One crate for both sides so that the server, the load generator and the tests cannot drift
//! apart. Field names follow the original Privora server exactly (`from`, `fromDisplayName`,
//! `msg_id`, `userId`, ...): an existing client must work unchanged. Decoding of client frames
//! is strict and explains itself (`DecodeError`), because every bad frame gets an `error` frame
//! that a client developer should be able to act on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest client `msg_id` we carry through (as JSON text). Clients use UUIDs or counters.
pub const MAX_MSG_ID_LEN: usize = 128;

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    /// Must come first; `token` is a Firebase ID token (or a development token).
    Login {
        token: String,
        /// Opt-in, for clients newer than the original: every `message` frame is then answered,
        /// in frame order, by an `ack` once the message is stored or by an `error` when it is not.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        acks: bool,
    },
    /// A one-to-one message. `msg_id` is the client's own id, carried through unchanged.
    Message {
        to: String,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        msg_id: Option<Value>,
    },
    /// Application-level keep-alive; answered by `pong`.
    Ping,
}

/// Why a client frame could not be decoded. Each maps to an `error` frame code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON, not an object, no `type`, or a field missing or of the wrong type.
    BadFrame(String),
    /// Well-formed, but a `type` this server does not handle. Never closes the connection:
    /// newer clients send frame types (reactions, call signalling) that we may not know.
    UnknownType(String),
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadFrame(_) => ErrorCode::BadFrame,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
        }
    }

    pub fn message(&self) -> String {
        match self {
            DecodeError::BadFrame(reason) => reason.clone(),
            DecodeError::UnknownType(ty) => format!("unknown frame type {ty:?}"),
        }
    }
}

/// The fields of a well-formed client frame, decoded in one pass without building a `Value`
/// tree for the whole frame (half the cost of decoding a message). Unknown fields are skipped.
#[derive(Deserialize)]
struct Fields {
    #[serde(rename = "type")]
    ty: String,
    to: Option<String>,
    message: Option<String>,
    token: Option<String>,
    msg_id: Option<Value>,
    acks: Option<bool>,
}

impl ClientFrame {
    /// Decodes one text frame, saying precisely what is wrong with it when it is not valid.
    ///
    /// Well-formed frames take the fast path; anything it does not accept (a missing field, a
    /// wrong type, a repeated key, an unknown `type`) is decoded again by `decode_explained`,
    /// which decides and says why.
    pub fn decode(text: &str) -> Result<ClientFrame, DecodeError> {
        match ClientFrame::decode_fast(text) {
            Some(frame) => Ok(frame),
            None => ClientFrame::decode_explained(text),
        }
    }

    /// A well-formed frame, or None (never a frame `decode_explained` would refuse).
    fn decode_fast(text: &str) -> Option<ClientFrame> {
        // A struct also decodes from a JSON array (by position): only objects come this way.
        if !text.trim_start().starts_with('{') {
            return None;
        }
        let fields: Fields = serde_json::from_str(text).ok()?;
        match fields.ty.as_str() {
            "message" => {
                let msg_id = match fields.msg_id {
                    None => None,
                    Some(id @ (Value::String(_) | Value::Number(_)))
                        if id.to_string().len() <= MAX_MSG_ID_LEN =>
                    {
                        Some(id)
                    }
                    Some(_) => return None,
                };
                Some(ClientFrame::Message { to: fields.to?, message: fields.message?, msg_id })
            }
            "login" => Some(ClientFrame::Login { token: fields.token?, acks: fields.acks.unwrap_or(false) }),
            "ping" => Some(ClientFrame::Ping),
            _ => None,
        }
    }

    /// Decodes through a `Value`, to say precisely what is wrong with a frame.
    fn decode_explained(text: &str) -> Result<ClientFrame, DecodeError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| DecodeError::BadFrame(format!("frame is not valid JSON: {e}")))?;
        let Value::Object(mut fields) = value else {
            return Err(DecodeError::BadFrame("frame must be a JSON object".into()));
        };
        let ty = match fields.get("type") {
            Some(Value::String(ty)) => ty.clone(),
            Some(_) => return Err(DecodeError::BadFrame("field \"type\" must be a string".into())),
            None => return Err(DecodeError::BadFrame("frame has no \"type\" field".into())),
        };
        match ty.as_str() {
            "login" => {
                let token = take_string(&mut fields, "token")?;
                let acks = match fields.remove("acks") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(acks)) => acks,
                    Some(_) => {
                        return Err(DecodeError::BadFrame("field \"acks\" must be true or false".into()))
                    }
                };
                Ok(ClientFrame::Login { token, acks })
            }
            "message" => {
                let to = take_string(&mut fields, "to")?;
                let message = take_string(&mut fields, "message")?;
                let msg_id = match fields.remove("msg_id") {
                    None | Some(Value::Null) => None,
                    Some(id @ (Value::String(_) | Value::Number(_))) => {
                        if id.to_string().len() > MAX_MSG_ID_LEN {
                            return Err(DecodeError::BadFrame(format!(
                                "field \"msg_id\" is longer than {MAX_MSG_ID_LEN} characters"
                            )));
                        }
                        Some(id)
                    }
                    Some(_) => {
                        return Err(DecodeError::BadFrame(
                            "field \"msg_id\" must be a string or a number".into(),
                        ))
                    }
                };
                // `fromDisplayName` may be present (older clients send it); it is ignored: the
                // sender's name comes from the verified token only.
                Ok(ClientFrame::Message { to, message, msg_id })
            }
            "ping" => Ok(ClientFrame::Ping),
            _ => Err(DecodeError::UnknownType(ty)),
        }
    }

    /// Encodes the frame as a client sends it (used by the load generator and tests).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("client frames always serialize")
    }
}

fn take_string(fields: &mut Map<String, Value>, name: &str) -> Result<String, DecodeError> {
    match fields.remove(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(DecodeError::BadFrame(format!("field {name:?} must be a string"))),
        None => Err(DecodeError::BadFrame(format!("frame has no {name:?} field"))),
    }
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    /// A live message for this user.
    Message(LiveMessage),
    /// A message that waited while the user was away; sent right after login, oldest first.
    Offline(OfflineMessage),
    /// The user's latest messages plus everything still pending, oldest first; once per login.
    History { messages: Vec<HistoryEntry> },
    /// Every conversation partner. No other frame may have a top-level `contacts` field:
    /// the original web client looks for it on every frame.
    Contacts { contacts: Vec<Contact> },
    /// A contact came online or went offline.
    Presence {
        #[serde(rename = "userId")]
        user_id: String,
        status: PresenceStatus,
    },
    /// Answer to a client `ping`.
    Pong,
    /// The client's message is stored (committed) under `id`: sent only to clients that asked
    /// for acks at login, in the order of their `message` frames.
    Ack {
        id: i64,
        /// When it was stored, as the recipient sees it.
        timestamp: String,
        /// The client's own id for the message, unchanged, when it sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        msg_id: Option<Value>,
    },
    /// Something the client sent was refused; the connection stays open unless said otherwise.
    Error { code: ErrorCode, message: String },
}

impl ServerFrame {
    pub fn encode(&self) -> String {
        match self {
            // The frame sent for every message delivered: see `LiveMessage::encode_frame`.
            ServerFrame::Message(live) => live.encode_frame(),
            _ => serde_json::to_string(self).expect("server frames always serialize"),
        }
    }

    pub fn decode(text: &str) -> Result<ServerFrame, serde_json::Error> {
        serde_json::from_str(text)
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerFrame {
        ServerFrame::Error { code, message: message.into() }
    }
}

/// `{"type":"message",...}` as a recipient gets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveMessage {
    pub from: String,
    #[serde(rename = "fromDisplayName")]
    pub from_display_name: String,
    pub to: String,
    pub message: String,
    /// ISO 8601, UTC, millisecond precision (`2026-11-26T09:40:17.123Z`).
    pub timestamp: String,
    /// The server's id of the stored message.
    pub id: i64,
    /// The sender's own id for the message, unchanged, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<Value>,
}

impl LiveMessage {
    /// The `message` frame for this message, byte for byte as serde encodes
    /// `ServerFrame::Message` (the test below holds it to that), from a reference. A server
    /// that stores messages encodes with `LiveFrameStart` instead, before the commit.
    ///
    /// Written out by hand because this runs for every message delivered: serde's path for an
    /// internally tagged enum serializes the struct as a map and escapes every string byte by
    /// byte, about 4,000 instructions for a short message (a fifth of a session's work per
    /// message, counted with callgrind). Here a string that needs no escaping, nearly all of
    /// them, is copied as it is.
    pub fn encode_frame(&self) -> String {
        LiveFrameStart::new(
            &self.from,
            &self.from_display_name,
            &self.to,
            &self.message,
            self.msg_id.as_ref(),
        )
        .finish(&self.timestamp, self.id)
    }
}

/// A live `message` frame encoded before the message is stored: all of it but its timestamp
/// and id, which the store gives it.
///
/// A server encodes it as soon as it has decoded the sender's frame, while the message's
/// strings are still in the reading core's cache, and finishes it after the commit by
/// appending a few bytes. Encoding it all after the commit read the strings again a
/// millisecond or more later, once other work (and another core: the store's writer) had
/// pushed them out: that reading was the largest user-space item of Privora's worker threads
/// (`perf`, session 13), about seven times what the same encoding cost in the bare relay.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveFrameStart {
    /// Up to and including `"timestamp":`, with room for the rest.
    text: String,
    /// `msg_id`'s compact JSON, when the sender gave one.
    msg_id: Option<String>,
}

impl LiveFrameStart {
    pub fn new(from: &str, from_display_name: &str, to: &str, message: &str, msg_id: Option<&Value>) -> Self {
        let msg_id = msg_id.map(Value::to_string);
        let strings = [from, from_display_name, to, message];
        // The fixed parts, the timestamp (24 bytes), an id and the msg_id.
        let capacity =
            128 + strings.iter().map(|s| s.len()).sum::<usize>() + msg_id.as_ref().map_or(0, |m| m.len());
        let mut text = String::with_capacity(capacity);
        text.push_str(r#"{"type":"message","from":"#);
        push_json_string(&mut text, from);
        text.push_str(r#","fromDisplayName":"#);
        push_json_string(&mut text, from_display_name);
        text.push_str(r#","to":"#);
        push_json_string(&mut text, to);
        text.push_str(r#","message":"#);
        push_json_string(&mut text, message);
        text.push_str(r#","timestamp":"#);
        LiveFrameStart { text, msg_id }
    }

    /// The whole frame, once the message is stored with `id` at `timestamp`.
    pub fn finish(self, timestamp: &str, id: i64) -> String {
        use std::fmt::Write;
        let LiveFrameStart { mut text, msg_id } = self;
        push_json_string(&mut text, timestamp);
        let _ = write!(text, r#","id":{id}"#);
        if let Some(msg_id) = msg_id {
            text.push_str(r#","msg_id":"#);
            text.push_str(&msg_id);
        }
        text.push('}');
        text
    }
}

/// Appends `text` as a JSON string, escaped exactly as serde_json escapes it: only `"`, `\` and
/// control characters need it, and a string without any is copied as it is.
fn push_json_string(out: &mut String, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        out.push_str(&Value::from(text).to_string());
    }
}

/// `{"type":"offline",...}`: the original's fields plus our id and the client's `msg_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfflineMessage {
    pub from: String,
    pub to: String,
    pub message: String,
    pub timestamp: String,
    pub id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<Value>,
}

/// One message inside a `history` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub from: String,
    #[serde(rename = "fromDisplayName")]
    pub from_display_name: String,
    pub to: String,
    pub message: String,
    pub timestamp: String,
    pub id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<Value>,
}

/// A conversation partner, in `contacts` frames and `/search-users` results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Contact {
    #[serde(rename = "userId")]
    pub user_id: String,
    #[serde(rename = "displayName")]
    pub display_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    Online,
    Offline,
}

/// The `code` of an `error` frame. Stable strings: clients may switch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A frame other than `login` came before a successful login.
    LoginRequired,
    /// The login token failed verification; the connection is then closed with code 1008.
    InvalidToken,
    /// Not JSON, not an object, a field missing, empty, too long or of the wrong type.
    BadFrame,
    /// The frame is larger than the server's limit.
    TooLarge,
    /// A frame `type` the server does not handle.
    UnknownType,
    /// The recipient is not a known user.
    UnknownRecipient,
    /// Too many messages too fast; the message was not stored.
    RateLimited,
    /// The server could not store the message right now; it was not stored, send it again.
    Unavailable,
    /// The client did not read its frames fast enough; the server closes the connection
    /// (code 1013) and the unread messages come again at the next login.
    SlowConsumer,
    /// A bug or an unexpected failure on the server; the message was not stored.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::LoginRequired => "login_required",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnknownRecipient => "unknown_recipient",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Internal => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_live_message_encodes_from_a_reference_as_its_frame_does() {
        let mut live = LiveMessage {
            from: "alice".into(),
            from_display_name: "Alice \"A\" Ünal".into(),
            to: "bob".into(),
            message: "hi\n".into(),
            timestamp: "2026-11-26T09:40:17.123Z".into(),
            id: 7,
            msg_id: None,
        };
        let serde = |live: &LiveMessage| serde_json::to_string(&ServerFrame::Message(live.clone())).unwrap();
        assert_eq!(live.encode_frame(), serde(&live));
        assert_eq!(ServerFrame::Message(live.clone()).encode(), serde(&live));
        for msg_id in [json!("c-1"), json!(42), json!(-1.5), json!("q\"\\\u{1}"), json!({"a": [1, null]})] {
            live.msg_id = Some(msg_id);
            assert_eq!(live.encode_frame(), serde(&live));
        }
        assert!(live.encode_frame().starts_with(r#"{"type":"message","from":"alice""#));
        // Every ASCII character, and some that are not, at the start, inside and alone, in
        // every string field: escaped exactly as serde escapes them.
        let specials = (0u8..0x80).map(char::from).chain(['é', 'Ü', '€', '😀', '\u{2028}', '\u{7f}']);
        for c in specials {
            for text in [format!("{c}"), format!("{c}ab"), format!("a{c}b{c}"), format!("ab{c}")] {
                for field in 0..5 {
                    let mut live = live.clone();
                    let target = match field {
                        0 => &mut live.from,
                        1 => &mut live.from_display_name,
                        2 => &mut live.to,
                        3 => &mut live.message,
                        _ => &mut live.timestamp,
                    };
                    *target = text.clone();
                    assert_eq!(live.encode_frame(), serde(&live), "{c:?} in field {field}");
                }
            }
        }
        live.id = i64::MIN;
        assert_eq!(live.encode_frame(), serde(&live));
    }

    #[test]
    fn decodes_the_original_frames() {
        assert_eq!(
            ClientFrame::decode(r#"{"type":"login","token":"abc"}"#),
            Ok(ClientFrame::Login { token: "abc".into(), acks: false })
        );
        assert_eq!(
            ClientFrame::decode(r#"{"type":"login","token":"abc","acks":true}"#),
            Ok(ClientFrame::Login { token: "abc".into(), acks: true })
        );
        assert_eq!(
            ClientFrame::decode(
                r#"{"type":"message","to":"b@x.io","message":"hi","fromDisplayName":"Mallory"}"#
            ),
            Ok(ClientFrame::Message { to: "b@x.io".into(), message: "hi".into(), msg_id: None })
        );
        assert_eq!(
            ClientFrame::decode(r#"{"type":"message","to":"b","message":"hi","msg_id":"m-1"}"#),
            Ok(ClientFrame::Message { to: "b".into(), message: "hi".into(), msg_id: Some(json!("m-1")) })
        );
        assert_eq!(ClientFrame::decode(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping));
    }

    #[test]
    fn the_fast_path_agrees_with_the_explaining_one() {
        let long_id =
            format!(r#"{{"type":"message","to":"b","message":"m","msg_id":"{}"}}"#, "x".repeat(200));
        let frames = [
            r#"{"type":"message","to":"b","message":"hi"}"#,
            r#" {"type":"message","to":"b","message":"hi","msg_id":7,"fromDisplayName":"M"}"#,
            r#"{"type":"message","to":"b","message":"hi","msg_id":null}"#,
            r#"{"type":"message","to":"b","message":"hi","msg_id":{}}"#,
            r#"{"type":"message","to":"b","message":"hi","msg_id":true}"#,
            r#"{"type":"message","to":"b","to":"c","message":"hi"}"#,
            r#"{"type":"message","to":null,"message":"hi"}"#,
            r#"{"type":"message","to":"b"}"#,
            r#"{"type":"message","to":"b","message":5}"#,
            r#"{"type":"message","to":"b\u00e9\n","message":"\ud83d\ude00"}"#,
            r#"{"type":"login","token":"t"}"#,
            r#"{"type":"login","token":"t","acks":true}"#,
            r#"{"type":"login","token":"t","acks":null}"#,
            r#"{"type":"login","token":"t","acks":"yes"}"#,
            r#"{"type":"login","token":"t","type":"ping"}"#,
            r#"{"type":"login"}"#,
            r#"{"type":"ping","extra":[1,{"a":2}]}"#,
            r#"{"type":"reaction"}"#,
            r#"{"type":7}"#,
            r#"{}"#,
            r#"["message","b","hi",null,null]"#,
            r#"{"type":"ping"} x"#,
            "not json",
            long_id.as_str(),
        ];
        for text in frames {
            let explained = ClientFrame::decode_explained(text);
            if let Some(fast) = ClientFrame::decode_fast(text) {
                assert_eq!(Ok(fast), explained, "{text}");
            }
            assert_eq!(ClientFrame::decode(text), explained, "{text}");
        }
        assert!(ClientFrame::decode_fast(frames[0]).is_some(), "the common frame takes the fast path");
    }

    #[test]
    fn explains_bad_frames() {
        let bad = |text: &str| match ClientFrame::decode(text) {
            Err(DecodeError::BadFrame(reason)) => reason,
            other => panic!("{text}: expected bad frame, got {other:?}"),
        };
        assert!(bad("not json").contains("not valid JSON"));
        assert!(bad("[1,2]").contains("JSON object"));
        assert!(bad(r#"{"to":"x"}"#).contains("no \"type\""));
        assert!(bad(r#"{"type":7}"#).contains("\"type\" must be a string"));
        assert!(bad(r#"{"type":"message","message":"hi"}"#).contains("\"to\""));
        assert!(bad(r#"{"type":"message","to":"b","message":5}"#).contains("\"message\" must be a string"));
        assert!(bad(r#"{"type":"message","to":"b","message":"m","msg_id":{}}"#).contains("msg_id"));
        assert!(bad(r#"{"type":"login","token":"t","acks":1}"#).contains("\"acks\" must be true or false"));
        assert_eq!(
            ClientFrame::decode(r#"{"type":"reaction","emoji":"+1"}"#),
            Err(DecodeError::UnknownType("reaction".into()))
        );
    }

    #[test]
    fn server_frames_have_the_original_field_names() {
        let frame = ServerFrame::Message(LiveMessage {
            from: "a@x.io".into(),
            from_display_name: "Alice".into(),
            to: "b@x.io".into(),
            message: "hi".into(),
            timestamp: "2026-11-26T09:40:17.123Z".into(),
            id: 7,
            msg_id: None,
        });
        let value: Value = serde_json::from_str(&frame.encode()).unwrap();
        assert_eq!(
            value,
            json!({"type":"message","from":"a@x.io","fromDisplayName":"Alice","to":"b@x.io",
                   "message":"hi","timestamp":"2026-11-26T09:40:17.123Z","id":7})
        );
        let presence = ServerFrame::Presence { user_id: "a".into(), status: PresenceStatus::Online };
        assert_eq!(presence.encode(), r#"{"type":"presence","userId":"a","status":"online"}"#);
        assert_eq!(ServerFrame::Pong.encode(), r#"{"type":"pong"}"#);
        let ack = ServerFrame::Ack { id: 42, timestamp: "2026-11-26T09:41:02.512Z".into(), msg_id: None };
        assert_eq!(ack.encode(), r#"{"type":"ack","id":42,"timestamp":"2026-11-26T09:41:02.512Z"}"#);
        assert_eq!(
            ServerFrame::error(ErrorCode::BadFrame, "x").encode(),
            r#"{"type":"error","code":"bad_frame","message":"x"}"#
        );
        let contacts = ServerFrame::Contacts {
            contacts: vec![Contact { user_id: "a".into(), display_name: "A".into() }],
        };
        assert_eq!(contacts.encode(), r#"{"type":"contacts","contacts":[{"userId":"a","displayName":"A"}]}"#);
    }

    #[test]
    fn error_code_strings_match_serde() {
        for code in [
            ErrorCode::LoginRequired,
            ErrorCode::InvalidToken,
            ErrorCode::BadFrame,
            ErrorCode::TooLarge,
            ErrorCode::UnknownType,
            ErrorCode::UnknownRecipient,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
            ErrorCode::SlowConsumer,
            ErrorCode::Internal,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
    }
}
