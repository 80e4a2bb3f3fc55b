//! Shutdown: turning SIGTERM/SIGINT into a cancellation, and closing sessions.
//!
//! Closing is one place so that its order is visible: sessions are told to close with 1012
//! and a `retry_ms` in the reason, then we wait for them up to `shutdown.drain`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Cancels `token` on the first SIGTERM or SIGINT; a second signal exits at once.
pub fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        // Cancel first: nothing (not even a failing log write) may stand between the
        // signal and the drain.
        token.cancel();
        tracing::info!("signal received: draining (a second signal exits at once)");
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Closes every session with 1012 and waits for them, at most `drain`.
pub async fn close_sessions(gateway: &Gateway, drain: &CancellationToken, limit: Duration) {
    let open = gateway.registry.connection_count();
    drain.cancel();
    gateway.sessions.close();
    if tokio::time::timeout(limit, gateway.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(open, "sessions still open after shutdown.drain");
    } else {
        tracing::info!(closed = open, "sessions closed");
    }
}
