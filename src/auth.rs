//! Who is connecting (DESIGN §3 "Authentication").
//!
//! A JWT is looked for, in order, in `Authorization: Bearer`, in `Sec-WebSocket-Protocol`
//! (`fanout.v1, bearer.<jwt>`), and in `?access_token=` when allowed. `exp` is required;
//! `nbf` is honoured with [`NBF_LEEWAY_SECS`] of clock skew; `iss`/`aud` are checked when
//! configured, `aud` as one string or an array of them (RFC 7519 §4.1.3). In insecure mode the
//! user comes from `?user=`. Either way the user id must pass [`user_id::validate`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, AuthMode};
use crate::envelope::Platform;
use crate::user_id::{self, UserIdError};

/// The subprotocol a browser lists, and the server answers with.
pub const SUBPROTOCOL: &str = "fanout.v1";
const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// How far in the future a token's `nbf` may lie and the token still be accepted: the clock
/// skew between its issuer and this node. `exp` gets no leeway (a session closes at `exp`).
pub const NBF_LEEWAY_SECS: u64 = 60;

/// Claims fanout reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    /// Not before (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Accepted (DESIGN §3), not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// The `aud` claim: one audience or several (RFC 7519 §4.1.3). jsonwebtoken checks it
/// against `auth.audience`; fanout only has to accept both shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub platform: Option<Platform>,
    /// Token expiry, seconds since the epoch (`None` in insecure mode).
    pub exp: Option<u64>,
}

/// Why a client was not let in (HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send Authorization: Bearer <jwt> or the bearer.<jwt> subprotocol")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid before {nbf} (now {now}, seconds since the epoch)")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("insecure mode needs ?user=<id>")]
    NoUser,
    /// The user id (`?user=` or the token's `sub`) breaks the rule of [`user_id`].
    #[error("{0}")]
    BadUser(#[from] UserIdError),
}

impl AuthError {
    /// The `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::NoUser => "unauthenticated",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid { .. } => "token_not_yet_valid",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::BadUser(_) => UserIdError::CODE,
        }
    }

    /// The HTTP status: 400 for a bad user id (no credential fixes it), else 401.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::BadUser(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

/// Checks tokens with the configured keys.
pub struct Authenticator {
    mode: AuthMode,
    allow_query_token: bool,
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: String,
    audience: String,
    admin_token: String,
}

impl Authenticator {
    /// Builds the verifier; fails if a configured key cannot be parsed.
    pub fn new(cfg: &AuthConfig) -> Result<Self, String> {
        let mut keys = Vec::new();
        if !cfg.jwt_secret.is_empty() {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(cfg.jwt_secret.as_bytes()),
            ));
        }
        if !cfg.jwt_public_key.is_empty() {
            let pem = cfg.jwt_public_key.as_bytes();
            let key = DecodingKey::from_rsa_pem(pem)
                .map(|k| (Algorithm::RS256, k))
                .or_else(|_| DecodingKey::from_ec_pem(pem).map(|k| (Algorithm::ES256, k)))
                .map_err(|e| {
                    format!("auth.jwt_public_key is neither an RSA nor an EC public key: {e}")
                })?;
            keys.push(key);
        }
        Ok(Self {
            mode: cfg.mode,
            allow_query_token: cfg.allow_query_token,
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            admin_token: cfg.admin_token.clone(),
        })
    }

    /// True in insecure mode.
    pub fn is_insecure(&self) -> bool {
        self.mode == AuthMode::Insecure
    }

    /// Authenticates a WebSocket upgrade request. Returns the identity and whether the
    /// client offered the `fanout.v1` subprotocol (then the answer must name it).
    pub fn authenticate_upgrade(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Result<Identity, AuthError> {
        if self.mode == AuthMode::Insecure {
            let user = query
                .get("user")
                .filter(|u| !u.is_empty())
                .ok_or(AuthError::NoUser)?;
            user_id::validate(user)?;
            return Ok(Identity {
                user: user.clone(),
                platform: None,
                exp: None,
            });
        }
        let token = bearer_header(headers)
            .or_else(|| bearer_subprotocol(headers))
            .or_else(|| {
                self.allow_query_token
                    .then(|| query.get("access_token").cloned())
                    .flatten()
            })
            .ok_or(AuthError::Missing)?;
        self.verify(&token)
    }

    /// Verifies one token.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let key = self
            .keys
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, k)| k)
            .ok_or_else(|| {
                AuthError::Invalid(format!("algorithm {:?} is not accepted", header.alg))
            })?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 0;
        let mut required = vec!["exp", "sub"];
        if !self.issuer.is_empty() {
            validation.set_issuer(&[&self.issuer]);
            required.push("iss");
        }
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&self.audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        if let Some(nbf) = claims.nbf {
            let now = unix_now();
            if nbf > now + NBF_LEEWAY_SECS {
                return Err(AuthError::NotYetValid { nbf, now });
            }
        }
        user_id::validate(&claims.sub)?;
        let platform = match claims.platform.as_deref() {
            None => None,
            Some(p) => Some(
                Platform::parse(p)
                    .ok_or_else(|| AuthError::Invalid(format!("unknown platform claim `{p}`")))?,
            ),
        };
        Ok(Identity {
            user: claims.sub,
            platform,
            exp: Some(claims.exp),
        })
    }

    /// True if `headers` carry `auth.admin_token` (always true in insecure mode).
    pub fn is_admin(&self, headers: &HeaderMap) -> bool {
        if self.mode == AuthMode::Insecure {
            return true;
        }
        !self.admin_token.is_empty()
            && bearer_header(headers).is_some_and(|t| constant_time_eq(&t, &self.admin_token))
    }
}

/// Why an HTTP caller may not act for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No usable credentials (401).
    Unauthenticated(AuthError),
    /// Valid credentials for someone else (403).
    Forbidden,
}

impl Authenticator {
    /// Allows the admin token, or a valid JWT whose `sub` is `user` (anyone in insecure mode).
    pub fn may_act_for(&self, headers: &HeaderMap, user: &str) -> Result<(), Denied> {
        if self.is_admin(headers) {
            return Ok(());
        }
        let token = bearer_header(headers).ok_or(Denied::Unauthenticated(AuthError::Missing))?;
        let identity = self.verify(&token).map_err(Denied::Unauthenticated)?;
        if identity.user == user {
            Ok(())
        } else {
            Err(Denied::Forbidden)
        }
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn bearer_header(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// The protocols listed in every `Sec-WebSocket-Protocol` header.
pub fn offered_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn bearer_subprotocol(headers: &HeaderMap) -> Option<String> {
    offered_protocols(headers)
        .find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX))
        .map(str::to_owned)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Mints an HS256 token (for `fanout token`, tests and ops).
pub fn mint(
    cfg: &AuthConfig,
    user: &str,
    ttl: Duration,
    platform: Option<Platform>,
) -> Result<String, String> {
    if cfg.jwt_secret.is_empty() {
        return Err("auth.jwt_secret is not set: cannot mint an HS256 token".into());
    }
    user_id::validate(user).map_err(|e| e.to_string())?;
    let claims = Claims {
        sub: user.to_owned(),
        exp: unix_now() + ttl.as_secs(),
        nbf: None,
        platform: platform.map(|p| p.as_str().to_owned()),
        device: None,
        iss: (!cfg.issuer.is_empty()).then(|| cfg.issuer.clone()),
        aud: (!cfg.audience.is_empty()).then(|| Audience::One(cfg.audience.clone())),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(cfg.jwt_secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn cfg() -> AuthConfig {
        AuthConfig {
            jwt_secret: "s3cret".into(),
            ..Default::default()
        }
    }

    fn with_header(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn token_is_found_in_header_subprotocol_and_allowed_query() {
        let auth = Authenticator::new(&cfg()).unwrap();
        let token = mint(
            &cfg(),
            "alice",
            Duration::from_secs(60),
            Some(Platform::Ios),
        )
        .unwrap();
        let none = HashMap::new();
        let id = auth
            .authenticate_upgrade(
                &with_header(header::AUTHORIZATION, &format!("Bearer {token}")),
                &none,
            )
            .unwrap();
        assert_eq!(
            (id.user.as_str(), id.platform),
            ("alice", Some(Platform::Ios))
        );
        let proto = with_header(
            header::SEC_WEBSOCKET_PROTOCOL,
            &format!("fanout.v1, bearer.{token}"),
        );
        assert_eq!(
            auth.authenticate_upgrade(&proto, &none).unwrap().user,
            "alice"
        );
        let query = HashMap::from([("access_token".to_owned(), token.clone())]);
        assert_eq!(
            auth.authenticate_upgrade(&HeaderMap::new(), &query),
            Err(AuthError::Missing)
        );
        let open = Authenticator::new(&AuthConfig {
            allow_query_token: true,
            ..cfg()
        })
        .unwrap();
        assert_eq!(
            open.authenticate_upgrade(&HeaderMap::new(), &query)
                .unwrap()
                .user,
            "alice"
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        let auth = Authenticator::new(&cfg()).unwrap();
        assert!(matches!(auth.verify("garbage"), Err(AuthError::Invalid(_))));
        let other = mint(
            &AuthConfig {
                jwt_secret: "other".into(),
                ..cfg()
            },
            "a",
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        assert!(matches!(auth.verify(&other), Err(AuthError::Invalid(_))));
        let expired = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &Claims {
                sub: "a".into(),
                exp: 1,
                nbf: None,
                platform: None,
                device: None,
                iss: None,
                aud: None,
            },
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let strict = AuthConfig {
            issuer: "me".into(),
            audience: "app".into(),
            ..cfg()
        };
        let auth = Authenticator::new(&strict).unwrap();
        assert!(auth
            .verify(&mint(&strict, "a", Duration::from_secs(60), None).unwrap())
            .is_ok());
        assert!(auth
            .verify(&mint(&cfg(), "a", Duration::from_secs(60), None).unwrap())
            .is_err());
    }

    fn signed(alg: Algorithm, private_pem: &[u8], sub: &str) -> String {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem).unwrap(),
            _ => EncodingKey::from_ec_pem(private_pem).unwrap(),
        };
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let claims = Claims {
            sub: sub.into(),
            exp,
            nbf: None,
            platform: None,
            device: None,
            iss: None,
            aud: None,
        };
        jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).unwrap()
    }

    #[test]
    fn rs256_and_es256_tokens_verify_with_the_public_key() {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
        let read = |f: &str| std::fs::read(format!("{fixtures}{f}")).unwrap();
        for (alg, private, public) in [
            (Algorithm::RS256, "rsa-private.pem", "rsa-public.pem"),
            (Algorithm::ES256, "ec-private.pem", "ec-public.pem"),
        ] {
            let cfg = AuthConfig {
                jwt_public_key: String::from_utf8(read(public)).unwrap(),
                ..Default::default()
            };
            let auth = Authenticator::new(&cfg).unwrap();
            assert_eq!(
                auth.verify(&signed(alg, &read(private), "kai"))
                    .unwrap()
                    .user,
                "kai",
                "{alg:?}"
            );
            // An HS256 token is refused when only a public key is configured.
            let hs = mint(
                &AuthConfig {
                    jwt_secret: "s".into(),
                    ..Default::default()
                },
                "kai",
                Duration::from_secs(60),
                None,
            )
            .unwrap();
            assert!(auth.verify(&hs).is_err(), "{alg:?} config accepted HS256");
        }
        // A token signed by another key pair is refused.
        let rsa_cfg = AuthConfig {
            jwt_public_key: String::from_utf8(read("rsa-public.pem")).unwrap(),
            ..Default::default()
        };
        let es_token = signed(Algorithm::ES256, &read("ec-private.pem"), "kai");
        assert!(Authenticator::new(&rsa_cfg)
            .unwrap()
            .verify(&es_token)
            .is_err());
    }

    /// An HS256 token with `secret` "s3cret" and these claims.
    fn hs256(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap()
    }

    #[test]
    fn nbf_is_honoured_with_a_small_leeway() {
        let auth = Authenticator::new(&cfg()).unwrap();
        let now = unix_now();
        let at = |nbf: u64| hs256(serde_json::json!({"sub": "a", "exp": now + 7200, "nbf": nbf}));
        assert!(matches!(
            auth.verify(&at(now + 3600)),
            Err(AuthError::NotYetValid { .. })
        ));
        assert_eq!(
            auth.verify(&at(now + 3600)).unwrap_err().code(),
            "token_not_yet_valid"
        );
        assert!(auth.verify(&at(now + NBF_LEEWAY_SECS + 5)).is_err());
        // Clock skew: an issuer a little ahead of us.
        assert!(auth.verify(&at(now + NBF_LEEWAY_SECS / 2)).is_ok());
        assert!(auth.verify(&at(now - 10)).is_ok());
        assert!(matches!(
            auth.verify(&hs256(
                serde_json::json!({"sub": "a", "exp": now + 60, "nbf": "soon"})
            )),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn audience_may_be_a_string_or_an_array() {
        let strict = AuthConfig {
            audience: "app".into(),
            ..cfg()
        };
        let auth = Authenticator::new(&strict).unwrap();
        let exp = unix_now() + 60;
        let with =
            |aud: serde_json::Value| hs256(serde_json::json!({"sub": "a", "exp": exp, "aud": aud}));
        assert!(auth.verify(&with("app".into())).is_ok());
        assert!(auth
            .verify(&with(serde_json::json!(["other", "app"])))
            .is_ok());
        assert!(auth.verify(&with(serde_json::json!(["other"]))).is_err());
        assert!(auth.verify(&with("other".into())).is_err());
        // With no audience configured, either shape is accepted as it is.
        let open = Authenticator::new(&cfg()).unwrap();
        assert!(open.verify(&with(serde_json::json!(["x", "y"]))).is_ok());
    }

    #[test]
    fn a_bad_user_id_is_refused_with_400_wherever_it_comes_from() {
        let auth = Authenticator::new(&cfg()).unwrap();
        let exp = unix_now() + 60;
        for sub in ["a\0b".to_owned(), "x".repeat(10 * 1024), String::new()] {
            let token = hs256(serde_json::json!({"sub": sub, "exp": exp}));
            let err = auth.verify(&token).unwrap_err();
            assert_eq!(
                (err.status(), err.code()),
                (StatusCode::BAD_REQUEST, "bad_user_id"),
                "{sub:?}"
            );
        }
        let insecure = Authenticator::new(&AuthConfig {
            mode: AuthMode::Insecure,
            ..cfg()
        })
        .unwrap();
        let query = |u: &str| HashMap::from([("user".to_owned(), u.to_owned())]);
        let err = insecure
            .authenticate_upgrade(&HeaderMap::new(), &query("a\nb"))
            .unwrap_err();
        assert_eq!(err.code(), "bad_user_id");
        assert!(insecure
            .authenticate_upgrade(&HeaderMap::new(), &query("ada"))
            .is_ok());
        assert!(mint(&cfg(), "a\u{0}", Duration::from_secs(60), None).is_err());
    }

    #[test]
    fn admin_token_is_compared_exactly() {
        let auth = Authenticator::new(&AuthConfig {
            admin_token: "adm".into(),
            ..cfg()
        })
        .unwrap();
        assert!(auth.is_admin(&with_header(header::AUTHORIZATION, "Bearer adm")));
        assert!(!auth.is_admin(&with_header(header::AUTHORIZATION, "Bearer adx")));
        assert!(!auth.is_admin(&HeaderMap::new()));
    }
}
