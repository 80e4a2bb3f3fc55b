//! The HTTP listeners: hyper's HTTP/1.1 connections under an accept loop of our own, so
//! that no client can hold a connection that is not a session (axum's `serve` sets no
//! header timeout and counts nothing).
//!
//! Bounds on every connection before it is a WebSocket session (docs/configuration.md):
//! * its request head must arrive within `server.header_timeout`, counted from when the
//!   server waits for it (hyper's header read timeout: a silent socket, a slowloris, an idle
//!   kept-alive connection all end there);
//! * its request body within `server.body_timeout` (HTTP 408), at most [`MAX_BODY`] bytes
//!   (413), its head at most [`MAX_HEAD`] bytes (431, hyper);
//! * at most `server.max_pending_connections` (`admin.max_connections` on the admin port)
//!   are open at once; a new one past the limit closes the oldest, so a flood of idle
//!   sockets cannot keep a real client out.
//!
//! A WebSocket upgrade ends the HTTP connection here: the socket becomes a session, counted
//! by `server.max_connections` instead.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::http::json_error;

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 2 << 20;
/// Largest request head (request line and headers), in bytes: room for tokens and cookies.
pub const MAX_HEAD: usize = 64 << 10;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// Most open connections that are not sessions.
    pub max_pending: usize,
}

/// The metrics of one listener.
#[derive(Clone)]
pub struct HttpMetrics {
    pub pending: IntGauge,
    pub evicted: IntCounter,
}

/// Serves `router` on `listener` until `stop`, then lets open requests finish (the caller
/// bounds how long it waits). Accepted sockets get `TCP_NODELAY`: a session writes each
/// batch of frames in one call, so Nagle's algorithm would only hold a small frame back
/// until the client's (delayed) ACK of the one before, for up to 40 ms.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    metrics: HttpMetrics,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let body_timeout = limits.body_timeout;
    let router = router.layer(axum::middleware::from_fn(move |req, next| {
        read_body_within(body_timeout, req, next)
    }));
    let pending = Arc::new(Pending::new(limits.max_pending, metrics));
    let connections = TaskTracker::new();
    let mut accept_errors = 0u64;
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to be freed.
                    accept_errors += 1;
                    if accept_errors.is_power_of_two() {
                        tracing::warn!(error = %e, count = accept_errors, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
        }
        let slot = Pending::admit(&pending);
        let service = TowerToHyperService::new(
            router
                .clone()
                .map_request(|req: Request<Incoming>| req.map(Body::new)),
        );
        let stop = stop.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                done = connection.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "http connection ended");
                    }
                }
                _ = slot.evicted.cancelled() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = connection => {}
                        _ = slot.evicted.cancelled() => {}
                    }
                }
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Reads the request body within `timeout` (408) and [`MAX_BODY`] (413) before the handler
/// runs, so that a slow body cannot hold a handler, and a handler, once running, is never
/// cut short (a publish is not abandoned half done).
async fn read_body_within(timeout: Duration, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("a request body may have at most {MAX_BODY} bytes"),
            )
        }
        Err(_) => {
            return json_error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive within server.body_timeout",
            )
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The open connections of a listener that are not sessions, oldest first.
struct Pending {
    max: usize,
    metrics: HttpMetrics,
    open: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
}

/// A connection's place among the pending ones; leaving it frees the place.
struct Slot {
    pending: Arc<Pending>,
    id: u64,
    /// Cancelled when a newer connection needs the place.
    evicted: CancellationToken,
}

impl Pending {
    fn new(max: usize, metrics: HttpMetrics) -> Self {
        Self {
            max,
            metrics,
            open: Mutex::new((0, BTreeMap::new())),
        }
    }

    /// Takes a place for a new connection, closing the oldest one if there is none left.
    fn admit(this: &Arc<Self>) -> Slot {
        let evicted = CancellationToken::new();
        let mut open = this.open.lock();
        while open.1.len() >= this.max {
            let Some((_, oldest)) = open.1.pop_first() else {
                break;
            };
            oldest.cancel();
            this.metrics.evicted.inc();
        }
        open.0 += 1;
        let id = open.0;
        open.1.insert(id, evicted.clone());
        this.metrics.pending.set(open.1.len() as i64);
        Slot {
            pending: this.clone(),
            id,
            evicted,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.pending.open.lock();
        open.1.remove(&self.id);
        self.pending.metrics.pending.set(open.1.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(max: usize) -> Arc<Pending> {
        let metrics = HttpMetrics {
            pending: IntGauge::new("p", "p").unwrap(),
            evicted: IntCounter::new("e", "e").unwrap(),
        };
        Arc::new(Pending::new(max, metrics))
    }

    #[test]
    fn a_new_connection_past_the_limit_closes_the_oldest() {
        let pending = pending(2);
        let first = Pending::admit(&pending);
        let second = Pending::admit(&pending);
        let third = Pending::admit(&pending);
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        assert_eq!(pending.metrics.evicted.get(), 1);
        assert_eq!(pending.metrics.pending.get(), 2);
        drop(second);
        let fourth = Pending::admit(&pending);
        assert!(!third.evicted.is_cancelled() && !fourth.evicted.is_cancelled());
        assert_eq!(pending.metrics.pending.get(), 2);
        drop(first);
        assert_eq!(
            pending.metrics.pending.get(),
            2,
            "the evicted one was out already"
        );
    }
}
