//! Measures how long a preference change takes to reach another node: one user connected
//! to node A and node B; A sends `prefs.set`, we time until B's connection gets the `prefs`
//! frame. Used by `scripts/bench prefs`.
//!
//! usage: prefs_latency <ws-url-A> <ws-url-B> <jwt> <rounds>

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, token: &str) -> Ws {
    let mut req = url.into_client_request().expect("url");
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    next_kind(&mut ws, "hello").await;
    ws
}

/// Reads until a text frame of kind `t`.
async fn next_kind(ws: &mut Ws, t: &str) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame within 10 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = msg {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if v["t"] == t {
                return v;
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, a, b, token, rounds] = &args[..] else {
        eprintln!("usage: prefs_latency <ws-url-A> <ws-url-B> <jwt> <rounds>");
        std::process::exit(2);
    };
    let rounds: usize = rounds.parse().expect("rounds");
    let (mut on_a, mut on_b) = (connect(a, token).await, connect(b, token).await);
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let enabled = i % 2 == 0;
        let frame = serde_json::json!({"t":"prefs.set","prefs":{"marketing": enabled}}).to_string();
        let started = Instant::now();
        on_a.send(Message::Text(frame.into())).await.unwrap();
        let prefs = next_kind(&mut on_b, "prefs").await;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(prefs["prefs"]["marketing"], enabled, "B saw the change");
        next_kind(&mut on_a, "prefs").await;
        // Stay under server.max_frames_per_sec (50 by default), as a real client would.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "prefs.set on node A → prefs frame on node B, {rounds} rounds: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&samples, 0.50),
        percentile(&samples, 0.95),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}
