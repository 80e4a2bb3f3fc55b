//! Client protocol v1 frames (DESIGN §3): parsing what clients send and rendering the
//! server's replies. `msg` frames are not rendered here: ingest renders them once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Why the server closes a WebSocket connection (DESIGN §3, "Close codes"): each with its
/// code, the reason text sent with it, and the label it is counted under in
/// `fanout_connections_closed_total`. docs/protocol.md's table lists the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// 1002: a frame that breaks RFC 6455.
    ProtocolError,
    /// 1007: a text frame that is not UTF-8.
    InvalidPayload,
    /// 1008: too many frames a second, or too many bad frames in a row.
    Policy,
    /// 1009: a message larger than `server.max_frame_bytes`.
    TooBig,
    /// 1012: the node is draining; the reason carries a jittered `retry_ms`.
    Draining,
    /// 1013: the user already has `server.max_connections_per_user` connections here.
    UserFull,
    /// 1013: the node filled up during the handshake.
    NodeFull,
    /// 4000: nothing received for `heartbeat.timeout`, or a write not taken for as long.
    HeartbeatTimeout,
    /// 4001: the connection's queue overflowed.
    TooSlow,
    /// 4003: the token expired.
    TokenExpired,
    /// 4004: an operator disconnected the user (`POST /v1/users/{user}/disconnect`).
    Kicked,
    /// 4003: the user's tokens were revoked (`POST /v1/users/{user}/disconnect` with
    /// `{"revoke":true}`).
    TokenRevoked,
    /// 1011: a dependency the connection needs is unavailable (routed mode: its presence
    /// entry could not be written in time); the client retries with backoff.
    Unavailable,
}

impl Close {
    /// The close code sent.
    pub const fn code(self) -> u16 {
        match self {
            Close::ProtocolError => 1002,
            Close::InvalidPayload => 1007,
            Close::Policy => 1008,
            Close::TooBig => 1009,
            Close::Draining => 1012,
            Close::UserFull | Close::NodeFull => 1013,
            Close::HeartbeatTimeout => 4000,
            Close::TooSlow => 4001,
            Close::TokenExpired => 4003,
            Close::Kicked => 4004,
            Close::TokenRevoked => 4003,
            Close::Unavailable => 1011,
        }
    }

    /// The reason text sent, except for [`Close::Draining`], whose reason is made per
    /// connection ([`Close::reason`]).
    const fn text(self) -> &'static str {
        match self {
            Close::ProtocolError => "protocol error",
            Close::InvalidPayload => "invalid frame payload data",
            Close::Policy => "policy violation",
            Close::TooBig => "frame too big",
            Close::Draining => "",
            Close::UserFull => "too many connections for this user",
            Close::NodeFull => "node at its connection limit",
            Close::HeartbeatTimeout => "heartbeat timeout",
            Close::TooSlow => "too slow: queue overflowed",
            Close::TokenExpired => "token expired",
            Close::Kicked => "disconnected by an operator",
            Close::TokenRevoked => "token revoked",
            Close::Unavailable => "presence unavailable: retry with backoff",
        }
    }

    /// The reason sent with the code; a drain's is JSON with a `retry_ms` between 1000 and
    /// 4999, drawn now, so the clients of a node do not all come back at once.
    pub fn reason(self) -> String {
        match self {
            Close::Draining => {
                let retry_ms = 1000 + rand::random::<u64>() % 4000;
                format!(r#"{{"retry_ms":{retry_ms}}}"#)
            }
            other => other.text().to_owned(),
        }
    }

    /// The label of `fanout_connections_closed_total` (the code, as text).
    pub const fn label(self) -> &'static str {
        match self {
            Close::ProtocolError => "1002",
            Close::InvalidPayload => "1007",
            Close::Policy => "1008",
            Close::TooBig => "1009",
            Close::Draining => "1012",
            Close::UserFull | Close::NodeFull => "1013",
            Close::HeartbeatTimeout => "4000",
            Close::TooSlow => "4001",
            Close::TokenExpired => "4003",
            Close::Kicked => "4004",
            Close::TokenRevoked => "4003",
            Close::Unavailable => "1011",
        }
    }

    /// Every close, for exporting the metric's labels at zero.
    pub const ALL: [Close; 13] = [
        Close::ProtocolError,
        Close::InvalidPayload,
        Close::Policy,
        Close::TooBig,
        Close::Draining,
        Close::UserFull,
        Close::NodeFull,
        Close::HeartbeatTimeout,
        Close::TooSlow,
        Close::TokenExpired,
        Close::Kicked,
        Close::TokenRevoked,
        Close::Unavailable,
    ];

    /// A compact form for an atomic (0 is "none").
    pub const fn to_u8(self) -> u8 {
        self as u8 + 1
    }

    /// The inverse of [`to_u8`](Self::to_u8).
    pub fn from_u8(n: u8) -> Option<Close> {
        Close::ALL.get(usize::from(n).checked_sub(1)?).copied()
    }
}

/// An `error` frame for a client, counted in `errors` (`fanout_client_errors_total{code}`):
/// every error reply goes through here.
pub fn error_frame(
    errors: &prometheus::IntCounterVec,
    code: &str,
    message: &str,
    reference: Option<&str>,
) -> Utf8Bytes {
    errors.with_label_values(&[code]).inc();
    error(code, message, reference)
}

/// A frame a client sent.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Ping,
    Ack {
        ids: Vec<String>,
    },
    PrefsGet,
    PrefsSet {
        prefs: BTreeMap<String, bool>,
        reference: Option<String>,
    },
    /// `data` is kept verbatim, to be produced upstream byte for byte.
    Ask {
        reference: Option<String>,
        data: &'a RawValue,
    },
}

/// A client frame that cannot be understood: answered with `error` code `bad_frame`.
#[derive(Debug, PartialEq)]
pub struct BadFrame {
    pub message: String,
    pub reference: Option<String>,
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    t: Option<String>,
    #[serde(rename = "ref")]
    reference: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    ids: Option<Vec<String>>,
    prefs: Option<BTreeMap<String, bool>>,
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<ClientFrame<'_>, BadFrame> {
    let raw: RawFrame<'_> = serde_json::from_str(text).map_err(|e| BadFrame {
        message: format!("not a protocol frame: {e}"),
        reference: None,
    })?;
    let bad = |message: &str| BadFrame {
        message: message.to_owned(),
        reference: raw.reference.clone(),
    };
    match raw.t.as_deref() {
        Some("ping") => Ok(ClientFrame::Ping),
        Some("ack") => Ok(ClientFrame::Ack {
            ids: raw.ids.ok_or_else(|| bad("ack needs ids"))?,
        }),
        Some("prefs.get") => Ok(ClientFrame::PrefsGet),
        Some("prefs.set") => Ok(ClientFrame::PrefsSet {
            prefs: raw
                .prefs
                .clone()
                .ok_or_else(|| bad("prefs.set needs prefs"))?,
            reference: raw.reference,
        }),
        Some("ask") => Ok(ClientFrame::Ask {
            data: raw.data.ok_or_else(|| bad("ask needs data"))?,
            reference: raw.reference,
        }),
        Some(other) => Err(bad(&format!("unknown frame type `{other}`"))),
        None => Err(bad("missing field `t`")),
    }
}

/// `hello.resume`.
#[derive(Debug, Serialize)]
pub struct Resume {
    pub recovered: bool,
    pub replayed: u64,
}

/// The first frame of every connection.
#[derive(Debug, Serialize)]
pub struct Hello<'a> {
    pub conn: &'a str,
    pub user: &'a str,
    pub node: &'a str,
    pub heartbeat_ms: u64,
    pub prefs: &'a BTreeMap<String, bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

fn tagged<T: Serialize>(t: &'static str, body: &T) -> Utf8Bytes {
    let mut value = serde_json::to_value(body).expect("frame serializes");
    let mut out = serde_json::Map::new();
    out.insert("t".into(), t.into());
    if let serde_json::Value::Object(fields) = &mut value {
        out.append(fields);
    }
    serde_json::to_string(&out)
        .expect("frame serializes")
        .into()
}

impl Hello<'_> {
    pub fn render(&self) -> Utf8Bytes {
        tagged("hello", self)
    }
}

/// `{"t":"pong"}`
pub fn pong() -> Utf8Bytes {
    Utf8Bytes::from_static(r#"{"t":"pong"}"#)
}

/// `{"t":"prefs","prefs":{…}}`
pub fn prefs(prefs: &BTreeMap<String, bool>) -> Utf8Bytes {
    tagged("prefs", &serde_json::json!({ "prefs": prefs }))
}

/// `{"t":"ask.ok","ref":…}`
pub fn ask_ok(reference: Option<&str>) -> Utf8Bytes {
    match reference {
        Some(r) => tagged("ask.ok", &serde_json::json!({ "ref": r })),
        None => Utf8Bytes::from_static(r#"{"t":"ask.ok"}"#),
    }
}

/// `{"t":"error","code":…,"message":…,"ref":…}` (`ref` only when the client gave one).
pub fn error(code: &str, message: &str, reference: Option<&str>) -> Utf8Bytes {
    let mut body = serde_json::json!({ "code": code, "message": message });
    if let Some(r) = reference {
        body["ref"] = r.into();
    }
    tagged("error", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_close_has_one_code_label_and_compact_form() {
        for close in Close::ALL {
            assert_eq!(close.label(), close.code().to_string());
            assert_eq!(Close::from_u8(close.to_u8()), Some(close));
            assert!(!close.reason().is_empty());
        }
        assert_eq!(Close::from_u8(0), None);
        let reason = Close::Draining.reason();
        let retry: serde_json::Value = serde_json::from_str(&reason).unwrap();
        assert!((1000..5000).contains(&retry["retry_ms"].as_u64().unwrap()));
    }

    #[test]
    fn parses_every_client_frame() {
        assert!(matches!(parse(r#"{"t":"ping"}"#), Ok(ClientFrame::Ping)));
        assert!(
            matches!(parse(r#"{"t":"ack","ids":["a","b"]}"#), Ok(ClientFrame::Ack { ids }) if ids == ["a", "b"])
        );
        assert!(matches!(
            parse(r#"{"t":"prefs.get"}"#),
            Ok(ClientFrame::PrefsGet)
        ));
        assert!(matches!(
            parse(r#"{"t":"prefs.set","prefs":{"marketing":false}}"#),
            Ok(ClientFrame::PrefsSet { prefs, .. }) if prefs == BTreeMap::from([("marketing".to_owned(), false)])
        ));
        match parse(r#"{"t":"ask","ref":"q1","data":{"b":1,  "a":[2]}}"#).unwrap() {
            ClientFrame::Ask { reference, data } => {
                assert_eq!(reference.as_deref(), Some("q1"));
                assert_eq!(data.get(), r#"{"b":1,  "a":[2]}"#, "data stays verbatim");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_frames_say_why_and_keep_the_ref() {
        assert!(parse("garbage").is_err());
        assert!(parse("[]").is_err());
        assert_eq!(
            parse(r#"{"t":"nope","ref":"r"}"#)
                .unwrap_err()
                .reference
                .as_deref(),
            Some("r")
        );
        assert!(parse(r#"{"t":"ask","ref":"r"}"#)
            .unwrap_err()
            .message
            .contains("data"));
        assert!(parse(r#"{"ref":"r"}"#).unwrap_err().message.contains("`t`"));
    }

    #[test]
    fn server_frames_have_t_first() {
        assert_eq!(
            error("bad_frame", "x", Some("q")).as_str(),
            r#"{"t":"error","code":"bad_frame","message":"x","ref":"q"}"#
        );
        assert_eq!(ask_ok(Some("q")).as_str(), r#"{"t":"ask.ok","ref":"q"}"#);
        let prefs = BTreeMap::from([("a".to_owned(), true)]);
        let hello = Hello {
            conn: "c",
            user: "u",
            node: "n",
            heartbeat_ms: 5,
            prefs: &prefs,
            resume: None,
        }
        .render();
        assert_eq!(
            hello.as_str(),
            r#"{"t":"hello","conn":"c","user":"u","node":"n","heartbeat_ms":5,"prefs":{"a":true}}"#
        );
    }
}
