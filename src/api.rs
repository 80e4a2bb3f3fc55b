//! The public HTTP API (DESIGN §5) beside `/ws` on the public port.
//!
//! Errors are JSON `{"error": "<code>", "message": "…"}` with a fitting status — every
//! one, axum's own answers (404, 405, a rejected path or body) included: [`http::json_errors`]
//! wraps this router and the admin port's. A `{user}` in a path follows
//! [`user_id::validate`]; a `POST`/`PUT` from a browser page must come from an origin
//! `server.allowed_origins` lets in.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Authenticator, Denied};
use crate::config::Settings;
use crate::envelope;
use crate::gateway::{self, Gateway};
use crate::http::{self, json_error};
use crate::kafka::Producer;
use crate::kick::{KickError, Kicks};
use crate::prefs::{Prefs, PrefsError};
use crate::presence::Presence;
use crate::user_id::{self, UserIdError};

/// Middleware: a state-changing request (`POST`, `PUT`, …) whose `Origin` is not let in by
/// `server.allowed_origins` gets 403 before its handler runs (`/ws` checks on its own).
async fn check_origin(State(settings): State<Arc<Settings>>, req: Request, next: Next) -> Response {
    if !req.method().is_safe()
        && !gateway::origin::permits(&settings.server.allowed_origins, req.headers())
    {
        return json_error(
            StatusCode::FORBIDDEN,
            gateway::origin::REFUSED_CODE,
            gateway::origin::REFUSED_MESSAGE,
        );
    }
    next.run(req).await
}

/// A 400 naming the problem when a path's `{user}` is not a valid user id.
fn bad_user(user: &str) -> Option<Response> {
    let e = user_id::validate(user).err()?;
    Some(json_error(
        StatusCode::BAD_REQUEST,
        UserIdError::CODE,
        &e.to_string(),
    ))
}

/// State of the HTTP API handlers.
pub struct Api {
    pub settings: Arc<Settings>,
    pub auth: Arc<Authenticator>,
    pub producer: Producer,
    pub prefs: Arc<Prefs>,
    /// Disconnects and revocations.
    pub kicks: Arc<Kicks>,
    /// The cluster's presence, for `GET /v1/users/{user}/connections`.
    pub presence: Presence,
}

/// The public router: `/ws`, `/v1/types`, `/v1/publish`, `/v1/users/{user}/preferences`,
/// `/v1/users/{user}/connections`,
/// and the demo page at `/` when `server.demo_page` is on.
pub fn router(gateway: Arc<Gateway>, api: Arc<Api>) -> Router {
    let demo = api.settings.server.demo_page;
    let ws = Router::new()
        .route("/ws", get(gateway::upgrade))
        .with_state(gateway);
    let http = Router::new()
        .route("/v1/types", get(types))
        .route("/v1/publish", post(publish))
        .route(
            "/v1/users/{user}/preferences",
            get(get_prefs).put(put_prefs),
        )
        .route("/v1/users/{user}/preferences/reload", post(reload_prefs))
        .route("/v1/users/{user}/disconnect", post(disconnect))
        .route("/v1/users/{user}/connections", get(connections))
        .route_layer(middleware::from_fn_with_state(
            api.settings.clone(),
            check_origin,
        ))
        .with_state(api);
    let routes = ws.merge(http);
    let routes = if demo {
        routes.merge(crate::demo::router())
    } else {
        routes
    };
    routes
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(middleware::map_response(http::json_errors))
}

fn denied(d: Denied) -> Response {
    match d {
        Denied::Unauthenticated(e) => json_error(e.status(), e.code(), &e.to_string()),
        Denied::Forbidden => json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not act for that user",
        ),
    }
}

/// The 401 for an admin-only endpoint (`what`) called without `auth.admin_token`.
fn not_admin(auth: &Authenticator, headers: &HeaderMap, what: &str) -> Option<Response> {
    (!auth.is_admin(headers)).then(|| {
        json_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            &format!("{what} needs Authorization: Bearer <auth.admin_token>"),
        )
    })
}

fn prefs_error(e: PrefsError) -> Response {
    let status = match e {
        PrefsError::UnknownType(_) => StatusCode::BAD_REQUEST,
        PrefsError::Store(_) | PrefsError::Announce(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_error(status, e.code(), &e.to_string())
}

fn prefs_body(user: &str, prefs: &BTreeMap<String, bool>) -> Response {
    Json(json!({ "user": user, "prefs": prefs })).into_response()
}

/// `GET /v1/users/{user}/preferences`: every registered type, on or off.
async fn get_prefs(
    State(api): State<Arc<Api>>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(bad) = bad_user(&user) {
        return bad;
    }
    if let Err(d) = api.auth.may_act_for(&headers, &user) {
        return denied(d);
    }
    match api.prefs.load(&user).await {
        Ok(prefs) => prefs_body(&user, &prefs),
        Err(e) => prefs_error(e.into()),
    }
}

#[derive(Deserialize)]
struct PrefsBody {
    prefs: BTreeMap<String, bool>,
}

/// `PUT /v1/users/{user}/preferences` with `{"prefs":{…}}`: changes the listed types.
async fn put_prefs(
    State(api): State<Arc<Api>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(bad) = bad_user(&user) {
        return bad;
    }
    if let Err(d) = api.auth.may_act_for(&headers, &user) {
        return denied(d);
    }
    let body: PrefsBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("expected {{\"prefs\":{{\"<type>\":true|false}}}}: {e}"),
            )
        }
    };
    match api.prefs.set(&user, &body.prefs).await {
        Ok(prefs) => prefs_body(&user, &prefs),
        Err(e) => prefs_error(e),
    }
}

/// `POST /v1/users/{user}/preferences/reload` (admin): after a backend wrote
/// `fanout_preferences` directly, re-reads the user's rows and applies them on every node.
async fn reload_prefs(
    State(api): State<Arc<Api>>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(bad) = bad_user(&user) {
        return bad;
    }
    if let Some(refused) = not_admin(&api.auth, &headers, "reload") {
        return refused;
    }
    match api.prefs.announce(&user).await {
        Ok(prefs) => prefs_body(&user, &prefs),
        Err(e) => prefs_error(e),
    }
}

/// `GET /v1/users/{user}/connections` (the user's own token or the admin token): the user's
/// live connections on every live node, oldest first.
async fn connections(
    State(api): State<Arc<Api>>,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(bad) = bad_user(&user) {
        return bad;
    }
    if let Err(d) = api.auth.may_act_for(&headers, &user) {
        return denied(d);
    }
    match api.presence.connections(&user).await {
        Ok(conns) => {
            let conns: Vec<serde_json::Value> = conns
                .into_iter()
                .map(|c| {
                    json!({
                        "conn": c.conn,
                        "node": c.node,
                        "platform": c.platform,
                        "tab": c.tab,
                        "connected_at": c.connected_at,
                    })
                })
                .collect();
            Json(json!({ "user": user, "connections": conns })).into_response()
        }
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "presence unavailable");
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "presence_unavailable",
                "presence cannot be read now; retry with backoff",
            )
        }
    }
}

/// `GET /v1/types`: the type registry the node runs with (names with their defaults).
async fn types(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
    let types = &api.prefs.types;
    Json(json!({ "types": types.registered(), "unknown": types.unknown }))
}

/// `POST /v1/publish`: validates an envelope and produces it to the first topic, keyed
/// by the target user when there is exactly one (by the group for `to.group`).
async fn publish(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = not_admin(&api.auth, &headers, "POST /v1/publish") {
        return refused;
    }
    let kafka = &api.settings.kafka;
    let env = match envelope::decode(Some(&body), kafka.max_record_bytes) {
        Ok(env) => env,
        Err(reject) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                reject.as_str(),
                &reject.to_string(),
            )
        }
    };
    if !api.prefs.types.admits(&env.msg_type) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "unknown_type",
            "this type is not registered and types.unknown = \"reject\"",
        );
    }
    let topic = &kafka.topics[0];
    match api
        .producer
        .send(topic, env.to.kafka_key(), &body, &[])
        .await
    {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(json!({ "topic": topic, "type": env.msg_type })),
        )
            .into_response(),
        Err(e) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "kafka_unavailable",
            &e.to_string(),
        ),
    }
}

/// The body of `POST /v1/users/{user}/disconnect` (optional: empty means `{}`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    #[serde(default)]
    revoke: bool,
}

/// `POST /v1/users/{user}/disconnect` (admin): closes every connection of the user on every
/// node with 4004; with `{"revoke":true}`, also refuses their tokens issued before now, and
/// open connections close with 4003. Answers `{"user":…,"revoked":…}` (and the revocation's
/// `revoked_before`, the first `iat` accepted again).
async fn disconnect(
    State(api): State<Arc<Api>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(bad) = bad_user(&user) {
        return bad;
    }
    if let Some(refused) = not_admin(&api.auth, &headers, "disconnect") {
        return refused;
    }
    let body: DisconnectBody = if body.iter().all(u8::is_ascii_whitespace) {
        DisconnectBody::default()
    } else {
        // An object only: serde would also take `[]` (a struct as a sequence) for `{}`.
        let object = serde_json::from_slice::<serde_json::Value>(&body).and_then(|v| {
            if v.is_object() {
                serde_json::from_value(v)
            } else {
                Err(serde::de::Error::custom("the body must be a JSON object"))
            }
        });
        match object {
            Ok(b) => b,
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("expected no body, {{}} or {{\"revoke\":true|false}}: {e}"),
                )
            }
        }
    };
    if body.revoke && api.auth.is_insecure() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "revoke_unsupported",
            "auth.mode = \"insecure\" has no tokens to revoke: nothing was changed (disconnect without revoke works)",
        );
    }
    match api.kicks.disconnect(&user, body.revoke).await {
        Ok(None) => Json(json!({ "user": user, "revoked": false })).into_response(),
        Ok(Some(before)) => {
            Json(json!({ "user": user, "revoked": true, "revoked_before": before })).into_response()
        }
        Err(e @ KickError::Store(_)) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
        Err(e @ KickError::Announce(_)) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_announced",
            &e.to_string(),
        ),
    }
}
