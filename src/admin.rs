//! The admin port: `/metrics`, `/healthz`, `/readyz`, `/v1/stats` (DESIGN §5).
//!
//! `/readyz` answers 200 only while Kafka, the bus and the database are usable and the
//! node is not draining; otherwise 503 with the reasons, so an operator sees why.
//! Errors carry the JSON body of DESIGN §5 like the public port's ([`http::json_errors`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::bus::{Bus, Channel};
use crate::http::{self, json_error};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// What readiness depends on, updated by the tasks that know.
pub struct Health {
    /// Last Kafka probe succeeded.
    pub kafka: AtomicBool,
    /// Last database probe succeeded.
    pub database: AtomicBool,
    /// The node is shutting down.
    pub draining: AtomicBool,
    pub bus: Arc<dyn Bus>,
}

impl Health {
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        Self {
            kafka: AtomicBool::new(false),
            database: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            bus,
        }
    }

    /// Empty when ready; otherwise why not.
    pub fn problems(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.draining.load(Ordering::Relaxed) {
            out.push("draining");
        }
        if !self.kafka.load(Ordering::Relaxed) {
            out.push("kafka unreachable");
        }
        if !self.database.load(Ordering::Relaxed) {
            out.push("database unreachable");
        }
        if !self.bus.is_connected() {
            out.push("redis unreachable");
        }
        out
    }
}

/// Shared state of the admin endpoints.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub registry: Arc<Registry>,
    pub node_id: String,
}

/// The admin router.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/v1/stats", get(stats))
        .with_state(admin)
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::middleware::map_response(http::json_errors))
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let problems = admin.health.problems();
    if problems.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        let message = problems.join(", ");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": "not_ready",
                "message": message,
                "status": "not_ready",
                "problems": problems,
            })),
        )
            .into_response()
    }
}

async fn stats(State(admin): State<Arc<Admin>>) -> Json<serde_json::Value> {
    let m = &admin.metrics;
    Json(json!({
        "node": admin.node_id,
        "connections": admin.registry.connection_count(),
        "users": admin.registry.user_count(),
        "kafka_partitions": m.kafka_partitions.get(),
        "messages_in": m.ingest_records.get(),
        "bus_received": m.bus_received.with_label_values(&[Channel::Bus.as_str()]).get()
            + m.bus_received.with_label_values(&[Channel::Node.as_str()]).get(),
        "messages_out": m.deliveries.get(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::local::LocalBus;
    use crate::config::RecoveryConfig;
    use crate::registry::Limits;
    use std::future::IntoFuture;

    /// The admin router on a port of its own; its address.
    async fn serve_admin() -> std::net::SocketAddr {
        let metrics = Arc::new(Metrics::new());
        let bus: Arc<dyn Bus> = Arc::new(LocalBus::new(16, &RecoveryConfig::default()));
        let admin = Arc::new(Admin {
            registry: Registry::new(Limits::small(), metrics.clone()),
            metrics,
            health: Arc::new(Health::new(bus)), // Kafka and the database not yet probed
            node_id: "n".into(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, router(admin)).into_future());
        addr
    }

    #[tokio::test]
    async fn every_error_carries_the_json_error_body() {
        let addr = serve_admin().await;
        let http = reqwest::Client::new();
        for (method, path, status, code) in [
            (reqwest::Method::GET, "/readyz", 503, "not_ready"),
            (reqwest::Method::POST, "/metrics", 405, "method_not_allowed"),
            (reqwest::Method::GET, "/nope", 404, "not_found"),
        ] {
            let r = http
                .request(method, format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), status, "{path}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"], code, "{path}: {body}");
            assert!(body["message"].is_string(), "{path}: {body}");
        }
        let r = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["message"], "kafka unreachable, database unreachable");
        assert_eq!(
            body["status"], "not_ready",
            "the fields operators read stay"
        );
    }
}
