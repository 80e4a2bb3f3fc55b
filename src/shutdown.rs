//! Shutdown: turning SIGTERM/SIGINT into a cancellation, and closing sessions.
//!
//! Closing is one place so that its order is visible: new connections are refused, open
//! ones are closed with 1012 and a `retry_ms` in the reason, in waves spread over
//! `shutdown.drain`; the caller then waits for the close handshakes within `shutdown.grace`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::protocol::Close;

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

/// How often a wave of closes goes out.
const WAVE_EVERY: Duration = Duration::from_millis(50);

/// When each of `n` connections closes, as an offset into `window`: evenly spread, the
/// first at once, the last one step before the end.
fn close_offsets(n: usize, window: Duration) -> impl Iterator<Item = Duration> {
    (0..n).map(move |k| window.mul_f64(k as f64 / n.max(1) as f64))
}

/// Drains the node's sessions (DESIGN §8): refuses new upgrades, then closes the open
/// connections with 1012 (each with its own jittered `retry_ms`) in waves spread evenly
/// over `window`, in random order, so the cluster is not hit by a reconnect storm. The
/// connections not closed yet keep receiving messages. Stragglers (an upgrade that was
/// already under way) are closed at the end. Returns without waiting for the close
/// handshakes (`gateway.sessions` tells when they are done).
pub async fn close_sessions(gateway: &Gateway, drain: &CancellationToken, window: Duration) {
    use rand::seq::SliceRandom;
    gateway.stopping.cancel();
    let mut conns = Vec::with_capacity(gateway.registry.connection_count());
    gateway.registry.for_each(|c| conns.push(c.clone()));
    conns.shuffle(&mut rand::rng());
    let open = conns.len();
    tracing::info!(open, window = ?window, "draining: closing connections in waves");
    let start = tokio::time::Instant::now();
    let mut due = close_offsets(open, window).zip(conns).peekable();
    let mut ticks = tokio::time::interval(WAVE_EVERY);
    while due.peek().is_some() {
        ticks.tick().await;
        let elapsed = start.elapsed();
        while let Some((_, conn)) = due.next_if(|(at, _)| *at <= elapsed) {
            conn.close(Close::Draining);
        }
    }
    // Stragglers (an upgrade already under way when the list was taken): a session that
    // registers from now on sees `drain` cancelled and closes itself.
    drain.cancel();
    gateway
        .registry
        .for_each(|conn| conn.close(Close::Draining));
    gateway.sessions.close();
    tracing::info!(closed = open, "every connection asked to close");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_spread_evenly_over_the_window() {
        let window = Duration::from_secs(10);
        let at: Vec<Duration> = close_offsets(300, window).collect();
        assert_eq!(at.len(), 300);
        assert_eq!(at[0], Duration::ZERO);
        assert!(at.windows(2).all(|w| w[0] <= w[1]));
        assert!(*at.last().unwrap() < window);
        let first_tenth = at.iter().filter(|t| **t < window / 10).count();
        assert_eq!(
            first_tenth, 30,
            "a tenth of the window closes a tenth of them"
        );
        assert_eq!(close_offsets(0, window).count(), 0);
    }
}
