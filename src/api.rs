//! The public HTTP API (DESIGN §5) beside `/ws` on the public port.
//!
//! Errors are JSON `{"error": "<code>", "message": "…"}` with a fitting status.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::config::TypesConfig;
use crate::gateway::{self, Gateway};

/// A JSON error response.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

/// The public router: `/ws` and `/v1/types`.
pub fn router(gateway: Arc<Gateway>, types: Arc<TypesConfig>) -> Router {
    let ws = Router::new().route("/ws", get(gateway::upgrade)).with_state(gateway);
    let types_route = Router::new().route(
        "/v1/types",
        get(move || {
            let types = types.clone();
            async move { Json(json!({ "types": types.registry, "unknown": types.unknown })) }
        }),
    );
    ws.merge(types_route).fallback(|| async { json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
}
