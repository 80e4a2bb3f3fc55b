//! The public HTTP API (DESIGN §5) beside `/ws` on the public port.
//!
//! Errors are JSON `{"error": "<code>", "message": "…"}` with a fitting status.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::Settings;
use crate::envelope;
use crate::gateway::auth::Authenticator;
use crate::gateway::{self, Gateway};
use crate::kafka::Producer;

/// A JSON error response.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

/// State of the HTTP API handlers.
pub struct Api {
    pub settings: Arc<Settings>,
    pub auth: Arc<Authenticator>,
    pub producer: Producer,
}

/// The public router: `/ws`, `/v1/types`, `/v1/publish`.
pub fn router(gateway: Arc<Gateway>, api: Arc<Api>) -> Router {
    let ws = Router::new()
        .route("/ws", get(gateway::upgrade))
        .with_state(gateway);
    let http = Router::new()
        .route("/v1/types", get(types))
        .route("/v1/publish", post(publish))
        .with_state(api);
    ws.merge(http)
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
}

/// `GET /v1/types`: the type registry.
async fn types(State(api): State<Arc<Api>>) -> Json<serde_json::Value> {
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
