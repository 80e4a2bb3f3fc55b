//! Which browser pages may open `/ws` or send a state-changing HTTP API request (`POST`,
//! `PUT`): `server.allowed_origins`.
//!
//! A request without `Origin` (curl, native apps, servers) is never refused here: only a
//! browser sends one, and only a browser can be made to send a request by a page the user
//! did not mean to trust. An empty list allows any origin (production, where every request
//! needs a token a foreign page does not have); the embedded default, whose insecure auth
//! trusts `?user=`, lists the loopback origins ([`crate::config::EMBEDDED_ALLOWED_ORIGINS`]).
//!
//! An entry matches exactly (`https://app.example.com`), or, ending in `:*`, with any port
//! or none (`http://localhost:*` matches `http://localhost` and `http://localhost:5173`).

use axum::http::{header, HeaderMap};

/// The `error` code of the 403 a refused origin gets.
pub const REFUSED_CODE: &str = "origin_not_allowed";
/// Its message.
pub const REFUSED_MESSAGE: &str = "this Origin is not in server.allowed_origins (the embedded default lets in pages from localhost, 127.0.0.1 and [::1] only)";

/// True if `headers` carry no `Origin`, or one that `allowed` lets in.
pub fn permits(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    allowed.is_empty()
        || origin
            .to_str()
            .is_ok_and(|origin| allowed.iter().any(|entry| matches(entry, origin)))
}

/// True if `origin` (as a browser serializes it: `scheme://host[:port]`) matches `entry`.
fn matches(entry: &str, origin: &str) -> bool {
    let Some(base) = entry.strip_suffix(":*") else {
        return entry == origin;
    };
    match origin.strip_prefix(base) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix(':')
            .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    use crate::config::EMBEDDED_ALLOWED_ORIGINS;

    fn origin(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn the_embedded_list_lets_in_loopback_pages_only() {
        let list: Vec<String> = EMBEDDED_ALLOWED_ORIGINS.map(str::to_owned).to_vec();
        for ok in [
            "http://localhost",
            "http://localhost:8080",
            "https://localhost:5173",
            "http://127.0.0.1:8080",
            "http://[::1]:3000",
        ] {
            assert!(permits(&list, &origin(ok)), "{ok}");
        }
        for refused in [
            "https://evil.example",
            "http://localhost.evil.example",
            "http://localhost:8080.evil.example",
            "http://127.0.0.1.nip.io:8080",
            "http://localhost:",
            "null",
        ] {
            assert!(!permits(&list, &origin(refused)), "{refused}");
        }
        assert!(
            permits(&list, &HeaderMap::new()),
            "no Origin: not a browser"
        );
    }

    #[test]
    fn an_empty_list_allows_any_and_a_listed_origin_matches_exactly() {
        assert!(permits(&[], &origin("https://evil.example")));
        let list = vec!["https://app.example.com".to_owned()];
        assert!(permits(&list, &origin("https://app.example.com")));
        assert!(!permits(&list, &origin("https://app.example.com:8443")));
        assert!(!permits(&list, &origin("http://app.example.com")));
    }
}
