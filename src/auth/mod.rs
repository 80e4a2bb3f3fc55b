//! Who is connecting (DESIGN §3 "Authentication").
//!
//! A JWT is looked for, in order, in `Authorization: Bearer`, in `Sec-WebSocket-Protocol`
//! (`fanout.v1, bearer.<jwt>`), and in `?access_token=` when allowed. `exp` is required;
//! `nbf` is honoured with [`NBF_LEEWAY_SECS`] of clock skew; `iss`/`aud` are checked when
//! configured, `aud` as one string or an array of them (RFC 7519 §4.1.3). In insecure mode the
//! user comes from `?user=`. Either way the user id must pass [`user_id::validate`].
//!
//! A token whose user's tokens were revoked ([`Revocations`]) is refused like an invalid
//! one, wherever it is presented (`/ws`, the HTTP API).

mod revoked;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, StatusCode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, AuthMode};
use crate::envelope::Platform;
use crate::user_id::{self, UserIdError};
pub use revoked::Revocations;

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
    /// Issued at (seconds since the epoch): compared with a revocation of the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// The groups of the user (`to.group`), checked by [`check_groups`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
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
    /// The token's `iat`, seconds since the epoch (`None`: no claim, or insecure mode).
    pub issued_at: Option<i64>,
    /// The groups it is in (JWT claim `groups`, `?groups=a,b` in insecure mode).
    pub groups: Vec<String>,
}

/// Most groups one identity may be in.
pub const MAX_GROUPS: usize = 32;

/// Checks a `groups` claim (or `?groups=`): at most [`MAX_GROUPS`] names, each valid by
/// [`crate::envelope::check_group`]. Too many or a bad one refuses the connection (400
/// `bad_groups`): groups decide what a connection receives, so none is dropped silently.
pub fn check_groups(groups: &[String]) -> Result<(), AuthError> {
    if groups.len() > MAX_GROUPS {
        return Err(AuthError::BadGroups(format!(
            "{} groups; at most {MAX_GROUPS} are allowed",
            groups.len()
        )));
    }
    groups
        .iter()
        .try_for_each(|g| crate::envelope::check_group(g))
        .map_err(AuthError::BadGroups)
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
    #[error("this user's tokens issued before {before} (seconds since the epoch) were revoked: get a new token")]
    Revoked { before: i64 },
    /// The user id (`?user=` or the token's `sub`) breaks the rule of [`user_id`].
    #[error("{0}")]
    BadUser(#[from] UserIdError),
    /// The `groups` claim or `?groups=` breaks [`check_groups`].
    #[error("bad groups: {0}")]
    BadGroups(String),
}

impl AuthError {
    /// The `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::NoUser => "unauthenticated",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid { .. } => "token_not_yet_valid",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::Revoked { .. } => "token_revoked",
            AuthError::BadUser(_) => UserIdError::CODE,
            AuthError::BadGroups(_) => "bad_groups",
        }
    }

    /// The HTTP status: 400 for a bad user id or groups (no credential fixes it), else 401.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::BadUser(_) | AuthError::BadGroups(_) => StatusCode::BAD_REQUEST,
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
    /// Users whose older tokens are refused (filled by `crate::kick`).
    revoked: Revocations,
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
            revoked: Revocations::default(),
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
            let groups: Vec<String> = query
                .get("groups")
                .map(|g| {
                    g.split(',')
                        .filter(|g| !g.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            check_groups(&groups)?;
            return Ok(Identity {
                user: user.clone(),
                platform: None,
                exp: None,
                issued_at: None,
                groups,
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
        if self.revoked.refuses(&claims.sub, claims.iat) {
            let before = self.revoked.revoked_before(&claims.sub).unwrap_or_default();
            return Err(AuthError::Revoked { before });
        }
        let platform = match claims.platform.as_deref() {
            None => None,
            Some(p) => Some(
                Platform::parse(p)
                    .ok_or_else(|| AuthError::Invalid(format!("unknown platform claim `{p}`")))?,
            ),
        };
        let groups = claims.groups.unwrap_or_default();
        check_groups(&groups)?;
        Ok(Identity {
            user: claims.sub,
            platform,
            exp: Some(claims.exp),
            issued_at: claims.iat,
            groups,
        })
    }

    /// The users whose tokens issued before some time are refused.
    pub fn revocations(&self) -> &Revocations {
        &self.revoked
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
        iat: Some(unix_now() as i64),
        groups: None,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(cfg.jwt_secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
