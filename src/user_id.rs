//! What a user id may be: one rule, applied wherever an id enters the node — a JWT's `sub`,
//! `?user=` in insecure mode, `{user}` in the HTTP API paths, and an envelope's `to.user` /
//! `to.users` at ingest and at `POST /v1/publish`.
//!
//! An id is 1 to [`MAX_USER_ID_BYTES`] bytes of UTF-8 with no character from
//! [`is_refused`]. Everything else (spaces, `/`, `:`, `@`, any script) is the id, byte for
//! byte: the user's Kafka key, a part of a Redis key and a `TEXT` in the database.
//!
//! Why these: PostgreSQL `TEXT` cannot hold NUL (the preferences load failed, and the client
//! got a retryable 503); CR/LF, ESC and the other control characters forge or garble log
//! lines and terminals; Unicode line separators and bidirectional overrides make a log line
//! read differently from what it holds. The length bounds what a stranger makes the node
//! keep per connection, per history stream key and per log line.

/// Longest user id, in bytes (UTF-8). Room for a UUID (36), an email address (at most 254
/// by RFC 5321) or a tenant-prefixed id; far below PostgreSQL's B-tree entry limit (~2.7 KB)
/// on the `(user_id, msg_type)` primary key, where a longer id would fail the write.
pub const MAX_USER_ID_BYTES: usize = 256;

/// Why a string is not a user id; the message names the problem for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("the user id is empty")]
    Empty,
    #[error("the user id is {0} bytes long; at most {MAX_USER_ID_BYTES} are allowed")]
    TooLong(usize),
    #[error("the user id holds the character U+{:04X} at byte {at}; control characters, line separators and bidirectional controls are not allowed", *.ch as u32)]
    Refused { ch: char, at: usize },
}

impl UserIdError {
    /// The `error` code of a JSON error body (HTTP 400).
    pub const CODE: &'static str = "bad_user_id";
}

/// Checks `id` against the rule above.
pub fn validate(id: &str) -> Result<(), UserIdError> {
    if id.is_empty() {
        return Err(UserIdError::Empty);
    }
    if id.len() > MAX_USER_ID_BYTES {
        return Err(UserIdError::TooLong(id.len()));
    }
    match id.char_indices().find(|(_, ch)| is_refused(*ch)) {
        Some((at, ch)) => Err(UserIdError::Refused { ch, at }),
        None => Ok(()),
    }
}

/// Control characters (C0 incl. NUL, DEL, C1), the Unicode line and paragraph separators,
/// and the bidirectional embedding/override/isolate controls.
pub fn is_refused(ch: char) -> bool {
    ch.is_control()
        || matches!(ch, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_pass() {
        for id in [
            "alice",
            "550e8400-e29b-41d4-a716-446655440000",
            "ana.lópez@example.com",
            "tenant:42/user 7",
            "用户",
            &"x".repeat(MAX_USER_ID_BYTES),
        ] {
            assert_eq!(validate(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn empty_long_and_control_ids_are_refused_with_the_reason() {
        assert_eq!(validate(""), Err(UserIdError::Empty));
        let long = "x".repeat(10 * 1024);
        assert_eq!(validate(&long), Err(UserIdError::TooLong(10240)));
        // 129 two-byte characters: 258 bytes.
        assert_eq!(validate(&"é".repeat(129)), Err(UserIdError::TooLong(258)));
        for (id, ch, at) in [
            ("a\0b", '\0', 1),
            ("a\nb", '\n', 1),
            ("\rx", '\r', 0),
            ("a\u{1b}[31m", '\u{1b}', 1),
            ("ab\u{7f}", '\u{7f}', 2),
            ("a\u{85}", '\u{85}', 1),
            ("a\u{2028}", '\u{2028}', 1),
            ("user\u{202E}nimda", '\u{202E}', 4),
            ("a\u{2066}", '\u{2066}', 1),
        ] {
            assert_eq!(validate(id), Err(UserIdError::Refused { ch, at }), "{id:?}");
        }
        let message = validate("a\0").unwrap_err().to_string();
        assert!(message.contains("U+0000"), "{message}");
    }
}
