//! Benchmark: some clients stop reading their socket. They should be closed with 4001 (queue
//! overflow) while the other clients keep their latency and the node's memory stays
//! bounded. Used by `scripts/bench stalled`.
//!
//! usage: stalled_clients <ws-url> <publish-url> <admin-url> <server-pid> <clients>
//!        <stalled-percent> <messages> <payload-bytes> <rate-per-sec>
//!
//! * Warms up: one message to one extra client makes the whole trip first.
//! * Opens `clients` connections to `<ws-url>?user=u<i>` (auth.mode insecure, the embedded
//!   default) and waits for each `hello`.
//! * A stalled client reads its `hello`, then never polls its socket again; its TCP receive
//!   buffer is made small (SO_RCVBUF before connecting) so the server's writes really block,
//!   and its MSS that of Ethernet (see [`STALLED_MSS`]).
//! * Readers read every frame and record latency = now − `msg.ts` (the Kafka record time).
//! * Publishes `messages` broadcasts of `payload-bytes` through `POST <publish-url>` at
//!   `rate-per-sec`, sampling the server's VmRSS every 200 ms.
//! * At the end, each stalled client reads its socket for up to 10 s to collect its close
//!   frame; the server's own count of closes by code is read from `<admin-url>/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::{Error, Message};

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// SO_RCVBUF of a stalled client's socket (the kernel doubles it and applies its minimum).
const STALLED_RCVBUF: u32 = 4096;
/// TCP MSS of a stalled client's connection. Over loopback the MSS is ~64 KiB, which lets
/// the server's kernel size that socket's send buffer at its 4 MiB maximum
/// (`net.ipv4.tcp_wmem`) at once, so megabytes of backlog would sit in the kernel before
/// the node's queue saw any. A real network's MSS (1460) keeps the send buffer as small as
/// it starts over Ethernet.
const STALLED_MSS: i32 = 1460;
/// Connections opened at once while connecting.
const CONNECT_CONCURRENCY: usize = 64;
/// Publish requests in flight at once.
const PUBLISH_CONCURRENCY: usize = 32;
/// After the last publish, readers are given this long without any progress to finish.
const DRAIN_IDLE: Duration = Duration::from_secs(5);
/// ... and at most this long in all.
const DRAIN_MAX: Duration = Duration::from_secs(120);
/// How long stalled clients read at the end to collect their close frame.
const COLLECT: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Memory of all TCP sockets on this machine (`/proc/net/sockstat`, pages) in KiB: where a
/// stalled client's backlog sits once the server has written it to the socket.
fn tcp_mem_kib() -> u64 {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages: u64 = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Sets TCP_MAXSEG before connecting, so the SYN advertises `mss` (Linux).
fn set_mss(socket: &TcpSocket, mss: i32) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, value: *const i32, len: u32) -> i32;
    }
    const IPPROTO_TCP: i32 = 6;
    const TCP_MAXSEG: i32 = 2;
    // SAFETY: a valid socket descriptor and a pointer to an int that outlives the call.
    let rc = unsafe { setsockopt(socket.as_raw_fd(), IPPROTO_TCP, TCP_MAXSEG, &mss, 4) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("TCP_MAXSEG: {}", std::io::Error::last_os_error()))
    }
}

/// Opens one connection (with a small receive buffer and MSS when `rcvbuf` is given) and reads
/// up to its `hello`.
async fn connect(url: &str, user: &str, rcvbuf: Option<u32>) -> Result<Ws, String> {
    let full = format!("{url}?user={user}");
    let req = full
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let host = req.uri().host().ok_or("no host")?.to_owned();
    let port = req.uri().port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(size) = rcvbuf {
        // Before connect, so the advertised window (and its scale) is small from the start.
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| e.to_string())?;
        set_mss(&socket, STALLED_MSS)?;
    }
    let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| "no hello within 30 s")?
            .ok_or("closed before hello")?
            .map_err(|e| e.to_string())?;
        if let Message::Text(text) = frame {
            if text.contains(r#""t":"hello""#) {
                return Ok(ws);
            }
        }
    }
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    t: &'a str,
    ts: Option<i64>,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    n: Option<usize>,
}

/// How a client's connection ended (or that it did not).
fn ending(message: Option<Result<Message, Error>>) -> String {
    match message {
        None => "ended without close frame".to_owned(),
        Some(Ok(Message::Close(Some(frame)))) => format!("close {}", u16::from(frame.code)),
        Some(Ok(Message::Close(None))) => "close without code".to_owned(),
        Some(Ok(_)) => unreachable!("only called for endings"),
        Some(Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake))) => {
            "reset without close frame".to_owned()
        }
        Some(Err(e)) => format!("error: {e}"),
    }
}

#[derive(Default)]
struct ReaderResult {
    distinct: usize,
    duplicates: u64,
    latencies_ms: Vec<u32>,
    /// How the connection ended while reading, if it did.
    ended: Option<String>,
    ws: Option<Ws>,
}

async fn read_all(
    mut ws: Ws,
    messages: usize,
    progress: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> ReaderResult {
    let mut seen = vec![0u64; messages.div_ceil(64)];
    let mut r = ReaderResult {
        latencies_ms: Vec::with_capacity(messages),
        ..ReaderResult::default()
    };
    while r.distinct < messages {
        let next = tokio::select! {
            next = ws.next() => next,
            _ = stop.changed() => break,
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                r.ended = Some(ending(next));
                return r;
            }
            Some(Ok(_)) => continue,
        };
        let now = now_ms();
        let Ok(frame) = serde_json::from_str::<Frame>(text.as_str()) else {
            continue;
        };
        let (Some(ts), Some(n)) = (frame.ts, frame.data.and_then(|d| d.n)) else {
            continue;
        };
        if frame.t != "msg" || n >= messages {
            continue;
        }
        let (word, bit) = (n / 64, 1u64 << (n % 64));
        if seen[word] & bit != 0 {
            r.duplicates += 1;
            continue;
        }
        seen[word] |= bit;
        r.distinct += 1;
        r.latencies_ms
            .push((now - ts).clamp(0, u32::MAX as i64) as u32);
        progress.fetch_add(1, Ordering::Relaxed);
    }
    r.ws = Some(ws);
    r
}

/// What a stalled client finds when it finally reads: the frames buffered for it, then
/// (hopefully) the server's close frame.
async fn collect(mut ws: Ws, deadline: tokio::time::Instant) -> (u64, String) {
    let mut buffered = 0;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return (buffered, "still open".to_owned()),
            Ok(Some(Ok(Message::Text(_)))) => buffered += 1,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_)))) => {}
            Ok(Some(Ok(Message::Frame(_)))) => {}
            Ok(other) => return (buffered, ending(other)),
        }
    }
}

/// Waits until one message makes the whole trip, so the measured run does not start with
/// the burst of everything published while the node's Kafka consumer was still starting.
async fn warm_up(http: &reqwest::Client, ws_url: &str, publish_url: &str) {
    let mut ws = connect(ws_url, "warmup", None)
        .await
        .unwrap_or_else(|e| panic!("warm-up client: {e}"));
    let body = r#"{"type":"robot.reply","to":{"user":"warmup"},"data":{"warmup":true}}"#;
    let started = Instant::now();
    http.post(publish_url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("warm-up publish");
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.contains(r#""t":"msg""#) => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("warm-up message not delivered: {other:?}"),
        }
    }
    println!(
        "warm-up: first message delivered after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `fanout_connections_closed_total` and `fanout_dropped_total` lines of the server's metrics.
async fn server_counters(http: &reqwest::Client, admin: &str) -> Vec<String> {
    let url = format!("{}/metrics", admin.trim_end_matches('/'));
    let Ok(resp) = http.get(&url).send().await else {
        return vec![format!("(could not read {url})")];
    };
    let body = resp.text().await.unwrap_or_default();
    body.lines()
        .filter(|l| {
            (l.starts_with("fanout_connections_closed_total")
                || l.starts_with("fanout_dropped_total"))
                && !l.ends_with(" 0")
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, ws_url, publish_url, admin_url, pid, clients, stalled_pct, messages, payload, rate] =
        &args[..]
    else {
        eprintln!(
            "usage: stalled_clients <ws-url> <publish-url> <admin-url> <server-pid> <clients> \
             <stalled-percent> <messages> <payload-bytes> <rate-per-sec>"
        );
        std::process::exit(2);
    };
    let pid: u32 = pid.parse().expect("server-pid");
    let clients: usize = clients.parse().expect("clients");
    let stalled_pct: f64 = stalled_pct.parse().expect("stalled-percent");
    let messages: usize = messages.parse().expect("messages");
    let payload: usize = payload.parse().expect("payload-bytes");
    let rate: f64 = rate.parse().expect("rate-per-sec");
    let stalled_count = ((clients as f64) * stalled_pct / 100.0).round() as usize;
    // Spread the stalled clients evenly over the indices.
    let is_stalled = |i: usize| i * stalled_count / clients != (i + 1) * stalled_count / clients;
    let http = reqwest::Client::new();
    warm_up(&http, ws_url, publish_url).await;

    // RSS sampling every 200 ms for the whole run.
    let rss_before = rss_kib(pid);
    let tcp_before = tcp_mem_kib();
    let peak = Arc::new(AtomicU64::new(rss_before));
    let tcp_peak = Arc::new(AtomicU64::new(tcp_before));
    let sampler = {
        let (peak, tcp_peak) = (peak.clone(), tcp_peak.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tcp_peak.fetch_max(tcp_mem_kib(), Ordering::Relaxed);
            }
        })
    };

    println!(
        "{clients} clients ({stalled_count} stalled, {stalled_pct}%), {messages} messages of \
         {payload} B at {rate}/s"
    );
    let started = Instant::now();
    let ws_url = ws_url.clone();
    let connected: Vec<(usize, Ws)> = futures::stream::iter(0..clients)
        .map(|i| {
            let ws_url = ws_url.clone();
            let rcvbuf = is_stalled(i).then_some(STALLED_RCVBUF);
            async move {
                let ws = connect(&ws_url, &format!("u{i}"), rcvbuf)
                    .await
                    .unwrap_or_else(|e| panic!("client u{i}: {e}"));
                (i, ws)
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    println!("connected in {:.1} s", started.elapsed().as_secs_f64());
    // Let the server settle before the after-connect sample.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = rss_kib(pid);

    let progress = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut readers = Vec::new();
    let mut stalled = Vec::new();
    for (i, ws) in connected {
        if is_stalled(i) {
            // Held, never polled, until the end.
            stalled.push(ws);
        } else {
            readers.push(tokio::spawn(read_all(
                ws,
                messages,
                progress.clone(),
                stop_rx.clone(),
            )));
        }
    }
    let reader_count = readers.len();

    // Publish at the given rate, a few requests in flight so one slow answer does not
    // hold the schedule back.
    let pad = "x".repeat(payload);
    let permits = Arc::new(Semaphore::new(PUBLISH_CONCURRENCY));
    let publish_errors = Arc::new(AtomicU64::new(0));
    let publish_start = tokio::time::Instant::now();
    for n in 0..messages {
        tokio::time::sleep_until(publish_start + Duration::from_secs_f64(n as f64 / rate)).await;
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let body = format!(
            r#"{{"type":"robot.reply","to":{{"all":true}},"data":{{"pad":"{pad}","n":{n}}}}}"#
        );
        let (http, url, errors) = (http.clone(), publish_url.clone(), publish_errors.clone());
        tokio::spawn(async move {
            let ok = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ok {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    let _ = permits
        .acquire_many(PUBLISH_CONCURRENCY as u32)
        .await
        .expect("semaphore");
    let publish_secs = publish_start.elapsed().as_secs_f64();

    // Wait until every reader has everything, or progress stops.
    let expected = (reader_count * messages) as u64;
    let drain_start = Instant::now();
    let (mut last, mut last_change) = (progress.load(Ordering::Relaxed), Instant::now());
    while last < expected && last_change.elapsed() < DRAIN_IDLE && drain_start.elapsed() < DRAIN_MAX
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = progress.load(Ordering::Relaxed);
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
    }
    let _ = stop_tx.send(true);
    let mut latencies = Vec::with_capacity(expected as usize);
    let (mut received, mut duplicates) = (0u64, 0u64);
    let mut incomplete = 0;
    let mut reader_endings: BTreeMap<String, usize> = BTreeMap::new();
    let mut open_readers = Vec::new();
    for reader in readers {
        let mut r = reader.await.expect("reader task");
        received += r.distinct as u64;
        duplicates += r.duplicates;
        if r.distinct < messages {
            incomplete += 1;
        }
        latencies.append(&mut r.latencies_ms);
        if let Some(end) = r.ended {
            *reader_endings.entry(end).or_default() += 1;
        }
        open_readers.extend(r.ws);
    }

    // Stalled clients read now, to find their close frame behind what was buffered.
    let deadline = tokio::time::Instant::now() + COLLECT;
    let collected: Vec<(u64, String)> =
        futures::future::join_all(stalled.into_iter().map(|ws| collect(ws, deadline))).await;
    let mut stalled_endings: BTreeMap<String, usize> = BTreeMap::new();
    let mut buffered = Vec::new();
    for (n, end) in &collected {
        *stalled_endings.entry(end.clone()).or_default() += 1;
        buffered.push(*n);
    }
    buffered.sort_unstable();
    let rss_end = rss_kib(pid);
    let tcp_end = tcp_mem_kib();
    let counters = server_counters(&http, admin_url).await;
    sampler.abort();
    let rss_peak = peak.load(Ordering::Relaxed).max(rss_end);
    drop(open_readers);

    latencies.sort_unstable();
    let lost = expected - received;
    println!(
        "published {messages} in {publish_secs:.1} s ({:.0}/s), {} publish errors",
        messages as f64 / publish_secs,
        publish_errors.load(Ordering::Relaxed)
    );
    println!(
        "readers: {reader_count}, received {received} of {expected} ({lost} lost, {:.3}%), \
         {duplicates} duplicates, {incomplete} readers incomplete",
        lost as f64 * 100.0 / expected.max(1) as f64
    );
    if latencies.is_empty() {
        println!("reader latency: no samples");
    } else {
        println!(
            "reader latency (now - msg.ts): p50 {} ms, p90 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.90),
            percentile(&latencies, 0.99),
            percentile(&latencies, 0.999),
            latencies[latencies.len() - 1]
        );
    }
    if !reader_endings.is_empty() {
        println!("readers closed during the run: {reader_endings:?}");
    }
    if stalled_count > 0 {
        let got_4001 = stalled_endings.get("close 4001").copied().unwrap_or(0);
        let server_4001 = counters
            .iter()
            .find_map(|l| l.strip_prefix(r#"fanout_connections_closed_total{code="4001"} "#))
            .unwrap_or("0");
        println!(
            "stalled: {got_4001} of {stalled_count} saw close 4001 (the server counts \
             {server_4001} closes with 4001); how they ended: {stalled_endings:?}"
        );
        println!(
            "stalled: frames buffered for them when they read again: min {}, median {}, max {}",
            buffered[0],
            buffered[buffered.len() / 2],
            buffered[buffered.len() - 1]
        );
    }
    println!("server counters: {}", counters.join(", "));
    println!(
        "server RSS: before {}, after connect {} ({:.1} KiB/connection), peak {}, end {}",
        mib(rss_before),
        mib(rss_connected),
        rss_connected.saturating_sub(rss_before) as f64 / clients.max(1) as f64,
        mib(rss_peak),
        mib(rss_end)
    );
    println!(
        "TCP socket memory, whole machine (/proc/net/sockstat): before {}, peak {}, end {}",
        mib(tcp_before),
        mib(tcp_peak.load(Ordering::Relaxed).max(tcp_end)),
        mib(tcp_end)
    );
}
