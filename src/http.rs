//! The HTTP error contract of both ports (DESIGN §5): every error is JSON
//! `{"error": "<code>", "message": "…"}` with a fitting status. A leaf: the API, the admin
//! port, the gateway's refusals and the listeners all answer through it.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// A JSON error response.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

/// Largest non-JSON error body [`json_errors`] carries over as the message (axum's
/// rejections are a line of text).
const MAX_ERROR_TEXT: usize = 4096;

/// Middleware (`axum::middleware::map_response`): an error status whose body is not JSON —
/// axum's empty 405, the plain text of a path, query or body rejection — gets the JSON error
/// body, with the status's name as code (`method_not_allowed`) and the text, if any, as
/// message. Other headers (`Allow`) stay.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let reason = status.canonical_reason().unwrap_or("error");
    let text = axum::body::to_bytes(body, MAX_ERROR_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = match (text.is_empty(), parts.headers.get(header::ALLOW)) {
        (false, _) => text,
        (true, Some(allow)) => format!(
            "{reason}; this endpoint accepts {}",
            allow.to_str().unwrap_or("other methods")
        ),
        (true, None) => reason.to_owned(),
    };
    let code = reason.to_ascii_lowercase().replace([' ', '-'], "_");
    let mut out = json_error(status, &code, &message);
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}
