//! The Kafka envelope (DESIGN §2): decoding a record's value, and rendering the client
//! `msg` frame exactly once per message.
//!
//! Invariant: a value either decodes into an [`Envelope`] whose `to` is one valid
//! [`Target`], or yields a [`Reject`] naming a metric-friendly reason. Nothing here panics
//! on any input (the fuzz target `envelope` checks that).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::user_id;

/// A client platform (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    H5,
    Ios,
    Android,
}

impl Platform {
    /// The wire name (`h5`, `ios`, `android`).
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::H5 => "h5",
            Platform::Ios => "ios",
            Platform::Android => "android",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "h5" => Some(Platform::H5),
            "ios" => Some(Platform::Ios),
            "android" => Some(Platform::Android),
            _ => None,
        }
    }
}

/// Who a message is for (the envelope's `to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection of one user, optionally narrowed to a platform or one tab.
    User {
        user: String,
        platform: Option<Platform>,
        tab: Option<String>,
    },
    /// Every connection of each listed user (decoded sorted, without duplicates).
    Users(Vec<String>),
    /// One connection, by the id the server gave it.
    Conn(String),
    /// Every connection whose identity is in this group (JWT claim `groups`).
    Group(String),
    /// Every connected user.
    All,
}

/// Longest group name, in bytes (UTF-8).
pub const MAX_GROUP_BYTES: usize = 128;

/// Longest `collapse` key, in bytes (UTF-8).
pub const MAX_COLLAPSE_BYTES: usize = 128;

/// Checks a group name: 1 to [`MAX_GROUP_BYTES`] bytes with no character a user id may not
/// hold ([`user_id::is_refused`]). One rule for `to.group`, the JWT claim `groups` and
/// `?groups=`: a group name is part of a Redis key and of log lines, like a user id.
pub fn check_group(name: &str) -> Result<(), String> {
    check_key("group name", name, MAX_GROUP_BYTES)
}

/// Checks a `collapse` key: 1 to [`MAX_COLLAPSE_BYTES`] bytes, no refused character.
pub fn check_collapse(key: &str) -> Result<(), String> {
    check_key("`collapse`", key, MAX_COLLAPSE_BYTES)
}

fn check_key(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if s.len() > max {
        return Err(format!(
            "the {what} is {} bytes long; at most {max} are allowed",
            s.len()
        ));
    }
    match s.char_indices().find(|(_, ch)| user_id::is_refused(*ch)) {
        Some((at, ch)) => Err(format!(
            "the {what} holds the character U+{:04X} at byte {at}; control characters, line separators and bidirectional controls are not allowed",
            ch as u32
        )),
        None => Ok(()),
    }
}

/// The JSON shape of `to`: exactly one selector, `platform`/`tab` only beside `user`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TargetRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    users: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tab: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all: Option<bool>,
}

impl TryFrom<TargetRepr> for Target {
    type Error = &'static str;

    fn try_from(r: TargetRepr) -> Result<Self, Self::Error> {
        let selectors = [
            r.user.is_some(),
            r.users.is_some(),
            r.conn.is_some(),
            r.group.is_some(),
            r.all.is_some(),
        ];
        if selectors.iter().filter(|s| **s).count() != 1 {
            return Err("`to` needs exactly one of user, users, conn, group, all");
        }
        if r.user.is_none() && (r.platform.is_some() || r.tab.is_some()) {
            return Err("`platform` and `tab` go with `user`");
        }
        if let Some(user) = r.user {
            if user.is_empty() {
                return Err("`to.user` is empty");
            }
            return Ok(Target::User {
                user,
                platform: r.platform,
                tab: r.tab,
            });
        }
        if let Some(mut users) = r.users {
            if users.is_empty() || users.iter().any(String::is_empty) {
                return Err("`to.users` must list non-empty user ids");
            }
            // A user listed twice still gets the message once.
            users.sort_unstable();
            users.dedup();
            return Ok(Target::Users(users));
        }
        if let Some(conn) = r.conn {
            return Ok(Target::Conn(conn));
        }
        if let Some(group) = r.group {
            if group.is_empty() {
                return Err("`to.group` is empty");
            }
            return Ok(Target::Group(group));
        }
        match r.all {
            Some(true) => Ok(Target::All),
            _ => Err("`to.all` must be true"),
        }
    }
}

impl From<&Target> for TargetRepr {
    fn from(t: &Target) -> Self {
        match t {
            Target::User {
                user,
                platform,
                tab,
            } => TargetRepr {
                user: Some(user.clone()),
                platform: *platform,
                tab: tab.clone(),
                ..Default::default()
            },
            Target::Users(users) => TargetRepr {
                users: Some(users.clone()),
                ..Default::default()
            },
            Target::Conn(conn) => TargetRepr {
                conn: Some(conn.clone()),
                ..Default::default()
            },
            Target::Group(group) => TargetRepr {
                group: Some(group.clone()),
                ..Default::default()
            },
            Target::All => TargetRepr {
                all: Some(true),
                ..Default::default()
            },
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        TargetRepr::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Target::try_from(TargetRepr::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Target {
    /// Checks every user id of `to.user` / `to.users` against [`user_id::validate`] (and a
    /// `to.group` against [`check_group`]). Done
    /// where an envelope enters (ingest, `POST /v1/publish`), not in `Deserialize`: a bus
    /// message from a node with another rule must still reach its recipients.
    pub fn check_user_ids(&self) -> Result<(), String> {
        match self {
            Target::User { user, .. } => {
                user_id::validate(user).map_err(|e| format!("`to.user`: {e}"))
            }
            Target::Users(users) => users.iter().try_for_each(|user| {
                user_id::validate(user).map_err(|e| format!("`to.users` entry: {e}"))
            }),
            Target::Group(group) => check_group(group).map_err(|e| format!("`to.group`: {e}")),
            Target::Conn(_) | Target::All => Ok(()),
        }
    }

    /// The Kafka key of a record to this target: the user when there is exactly one, else
    /// the group of `to.group` (its members then get its messages in order).
    pub fn kafka_key(&self) -> Option<&str> {
        match self {
            Target::Group(group) => Some(group),
            _ => self.single_user(),
        }
    }

    /// The user a record should be keyed by in Kafka, when there is exactly one.
    pub fn single_user(&self) -> Option<&str> {
        match self {
            Target::User { user, .. } => Some(user),
            Target::Users(users) if users.len() == 1 => Some(&users[0]),
            _ => None,
        }
    }
}

/// A decoded, valid envelope.
#[derive(Debug)]
pub struct Envelope {
    pub msg_type: String,
    pub to: Target,
    /// `data`, verbatim (JSON `null` when absent).
    pub data: Box<RawValue>,
    pub ttl_ms: Option<u64>,
    /// `collapse`: in a history stream this message replaces the earlier one with the same
    /// key (checked with [`check_collapse`]).
    pub collapse: Option<String>,
}

/// Why a record was rejected; `as_str` is the `reason` label of
/// `fanout_ingest_rejected_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("record has no value")]
    Empty,
    #[error("record of {0} bytes is larger than kafka.max_record_bytes")]
    TooLarge(usize),
    #[error("value is not a JSON object: {0}")]
    NotJson(String),
    #[error("a field has the wrong shape: {0}")]
    Invalid(String),
    #[error("no `type`")]
    NoType,
    #[error("bad `to`: {0}")]
    BadTarget(String),
    #[error("type `{0}` is not registered and types.unknown = \"reject\"")]
    UnknownType(String),
}

impl Reject {
    /// Stable label for metrics and the dead-letter header.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reject::Empty => "empty",
            Reject::TooLarge(_) => "too_large",
            Reject::NotJson(_) => "not_json",
            Reject::Invalid(_) => "invalid",
            Reject::NoType => "no_type",
            Reject::BadTarget(_) => "bad_target",
            Reject::UnknownType(_) => "unknown_type",
        }
    }

    /// Every reason, so metrics can be pre-registered at zero.
    pub const ALL: [&'static str; 7] = [
        "empty",
        "too_large",
        "not_json",
        "invalid",
        "no_type",
        "bad_target",
        "unknown_type",
    ];
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", default)]
    msg_type: Option<String>,
    #[serde(borrow, default)]
    to: Option<&'a RawValue>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    /// The producer's own id (DESIGN §2): accepted if a string, not used.
    #[serde(borrow, default, rename = "id")]
    _id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default)]
    collapse: Option<String>,
}

/// Decodes a record value. `max_bytes` is `kafka.max_record_bytes`.
pub fn decode(value: Option<&[u8]>, max_bytes: usize) -> Result<Envelope, Reject> {
    let value = value.filter(|v| !v.is_empty()).ok_or(Reject::Empty)?;
    if value.len() > max_bytes {
        return Err(Reject::TooLarge(value.len()));
    }
    let raw: RawEnvelope<'_> = serde_json::from_slice(value).map_err(|e| {
        if e.is_data() {
            Reject::Invalid(e.to_string())
        } else {
            Reject::NotJson(e.to_string())
        }
    })?;
    let msg_type = raw
        .msg_type
        .filter(|t| !t.is_empty())
        .ok_or(Reject::NoType)?;
    let to_raw = raw.to.ok_or_else(|| Reject::BadTarget("missing".into()))?;
    let to: Target =
        serde_json::from_str(to_raw.get()).map_err(|e| Reject::BadTarget(e.to_string()))?;
    to.check_user_ids().map_err(Reject::BadTarget)?;
    if let Some(key) = &raw.collapse {
        check_collapse(key).map_err(Reject::Invalid)?;
    }
    let data = raw
        .data
        .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"));
    Ok(Envelope {
        msg_type,
        to,
        data,
        ttl_ms: raw.ttl_ms,
        collapse: raw.collapse,
    })
}

/// Renders the client frame `{"t":"msg","id":…,"type":…,"ts":…,"data":…}`; done once
/// per message at ingest, the bytes are then shared by every recipient.
pub fn render_msg_frame(id: &str, msg_type: &str, ts_ms: i64, data: &RawValue) -> String {
    render_msg_frame_with(id, msg_type, ts_ms, data, None)
}

/// [`render_msg_frame`] with the envelope's `collapse` key, rendered as `"collapse":…`
/// (after `data`) only when there is one.
pub fn render_msg_frame_with(
    id: &str,
    msg_type: &str,
    ts_ms: i64,
    data: &RawValue,
    collapse: Option<&str>,
) -> String {
    #[derive(Serialize)]
    struct MsgFrame<'a> {
        t: &'static str,
        id: &'a str,
        #[serde(rename = "type")]
        msg_type: &'a str,
        ts: i64,
        data: &'a RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        collapse: Option<&'a str>,
    }
    serde_json::to_string(&MsgFrame {
        t: "msg",
        id,
        msg_type,
        ts: ts_ms,
        data,
        collapse,
    })
    .expect("serializing strings and raw JSON cannot fail")
}

#[cfg(test)]
mod tests;
