//! The public HTTP API (DESIGN §5) beside `/ws` on the public port.
//!
//! Errors are JSON `{"error": "<code>", "message": "…"}` with a fitting status.

use std::sync::Arc;

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::config::Settings;
use crate::envelope;
use crate::gateway::auth::{Authenticator, Denied};
use crate::gateway::{self, Gateway};
use crate::kafka::Producer;
use crate::prefs::{Prefs, PrefsError};

/// A JSON error response.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

/// State of the HTTP API handlers.
pub struct Api {
    pub settings: Arc<Settings>,
    pub auth: Arc<Authenticator>,
    pub producer: Producer,
    pub prefs: Arc<Prefs>,
}

/// The public router: `/ws`, `/v1/types`, `/v1/publish`, `/v1/users/{user}/preferences`,
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
        .with_state(api);
    let routes = ws.merge(http);
    let routes = if demo {
        routes.merge(crate::demo::router())
    } else {
        routes
    };
    routes.fallback(|| async { json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
}

fn denied(d: Denied) -> Response {
    match d {
        Denied::Unauthenticated(e) => {
            json_error(StatusCode::UNAUTHORIZED, e.code(), &e.to_string())
        }
        Denied::Forbidden => json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not act for that user",
        ),
    }
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
    if !api.auth.is_admin(&headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "reload needs Authorization: Bearer <auth.admin_token>",
        );
    }
    match api.prefs.announce(&user).await {
        Ok(prefs) => prefs_body(&user, &prefs),
        Err(e) => prefs_error(e),
    }
}

/// `GET /v1/types`: the type registry.
async fn types(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
    // The configured registry, as written (names with their defaults).
    let types = &api.settings.types;
    Json(json!({ "types": types.registry, "unknown": types.unknown }))
}

/// `POST /v1/publish`: validates an envelope and produces it to the first topic, keyed
/// by the target user when there is exactly one.
async fn publish(State(api): State<Arc<Api>>, headers: HeaderMap, body: Bytes) -> Response {
    if !api.auth.is_admin(&headers) {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "POST /v1/publish needs Authorization: Bearer <auth.admin_token>",
        );
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
    let types = &api.prefs.types;
    if types.unknown == crate::config::UnknownTypes::Reject && !types.contains(&env.msg_type) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "unknown_type",
            "this type is not registered and types.unknown = \"reject\"",
        );
    }
    let topic = &kafka.topics[0];
    match api
        .producer
        .send(topic, env.to.single_user(), &body, &[])
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
