//! The demo page (DESIGN §5): `GET /` and the browser client it uses, compiled into the
//! binary so the embedded default needs no files. Served when `server.demo_page = true`.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const PAGE: &str = include_str!("../demo/index.html");
const CLIENT: &str = include_str!("../clients/js/fanout.js");

/// `/` and `/client/fanout.js`.
pub fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
            }),
        )
        .route(
            "/client/fanout.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    CLIENT,
                )
                    .into_response()
            }),
        )
}
