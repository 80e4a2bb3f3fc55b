//! Load generator for `scripts/bench`: opens many WebSocket connections to a fanout node or
//! to the socket.io peer (`../shared/peers/socketio`), keeps them alive (answers heartbeats),
//! counts the `msg` frames they get, checks sequence numbers and records latency, then prints
//! a one-line JSON summary on stdout.
//!
//! * `--proto fanout`: `ws://<target>/ws?user=<prefix><i>` (insecure auth), or with
//!   `--token-secret` an HS256 JWT (`sub` = the user) in `Authorization: Bearer`. A connection
//!   counts as connected when its `hello` frame arrives; tungstenite answers the server's Pings.
//! * `--proto socketio`: `ws://<target>/socket.io/?EIO=4&transport=websocket&user=<prefix><i>`;
//!   reads `0{…}`, sends `40`, reads `40{…}` (then connected), answers `2` with `3`; messages
//!   arrive as `42["msg",{…}]`.
//!
//! Connections `i` of `0..connections` with `i % M == K-1` belong to `--shard K/M` (one process
//! may hold at most ~20k open files, so `scripts/bench` runs several shards). Each is bound to a
//! source address 127.0.0.2 … 127.0.0.(1+`--sources`) before connecting, so that the ~28k
//! ephemeral ports of one source address are not a limit.
//!
//! Connection `i` is user `<prefix><offset + i>` (`--offset`: several generators aimed at
//! different nodes keep their users distinct).
//!
//! Messages (as `examples/publisher.rs` writes them): a frame is parsed only as far as
//! needed. In `data`: `t_us` (µs wall clock when it was produced; else `ts`, the Kafka record
//! timestamp in ms) gives latency = now − t_us, recorded in an HDR histogram in µs; `seq`
//! (0-based place of the message in its stream) and `n` (how many the stream has); `u`
//! (the user it is for). A seq seen twice on one connection is a duplicate; a message whose
//! `u` is not the connection's user, or any message on a connection that muted its type
//! (`--mute-odd TYPE`: odd user numbers, which the server was told about — the peer through
//! `mute=TYPE` in the query, fanout through its preference store), is a wrong delivery. At
//! the end each connection counts `max(n seen, --expect) − distinct seqs` as losses.
//!
//! Warm-up records (`data.warm` = round, `data.p` = partition, `data.of` = partitions) are
//! not counted: once the shard's first connection got every partition's record of one
//! round, `--warm-file` is written, so a script knows every consumer owns its partitions.
//!
//! SIGUSR1 prints an **interval** line and starts a new interval: `{"interval":k, "msgs",
//! "distinct" (first copies), "dups", "wrong", "p50_ms"…"max_ms", "dropped" (so far)}`. A
//! script runs one rate step per interval and computes losses as expected − distinct.
//!
//! The generator runs until SIGINT/SIGTERM, or `--duration` seconds after all its connections
//! were attempted. `--ready-file` is written (with the connect figures) as soon as every
//! connection was attempted, so a script knows when to measure.
//!
//! Summary fields: shard, proto, connected, failed, dropped (closed by the server or broken
//! before the end), connect_secs (start → last attempt done), start_ms/done_ms (Unix ms, to
//! add up shards), msgs, dups, wrong, losses, p50_ms/p99_ms/p999_ms/max_ms (null without
//! samples), errors (connect failures by kind).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Proto {
    Fanout,
    Socketio,
}

#[derive(Parser, Debug)]
#[command(about = "WebSocket load generator for scripts/bench")]
struct Args {
    /// Server protocol.
    #[arg(long, value_enum, default_value = "fanout")]
    proto: Proto,
    /// Server address host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Connections over all shards.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// This process's share: K/M takes connections i with i % M == K-1.
    #[arg(long, default_value = "1/1")]
    shard: String,
    /// Source addresses 127.0.0.2 … 127.0.0.(1+N); 0 lets the kernel choose.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Seconds one attempt (TCP + upgrade + first frame) may take.
    #[arg(long, default_value_t = 15.0)]
    connect_timeout: f64,
    /// Attempts after a failed one, each after a pause of one more second (as an app
    /// reconnects with backoff): a refusal under load (503 `overloaded` or
    /// `prefs_unavailable` during a connect storm) is retried; what still fails counts as
    /// failed. Every retry is counted (`retried` in the summary).
    #[arg(long, default_value_t = 2)]
    connect_retries: u32,
    /// User ids are <prefix><i>.
    #[arg(long, default_value = "u")]
    user_prefix: String,
    /// fanout: mint HS256 JWTs with this secret (else insecure `?user=`).
    #[arg(long)]
    token_secret: Option<String>,
    /// Extra query string appended to the URL (e.g. `mute=marketing` for the peer).
    #[arg(long)]
    query: Option<String>,
    /// Stop this many seconds after every connection was attempted (default: on a signal).
    #[arg(long)]
    duration: Option<f64>,
    /// Written when every connection was attempted.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Messages each connection should get (losses for connections that saw no `n`).
    #[arg(long, default_value_t = 0)]
    expect: u64,
    /// Connection i is user <prefix><offset + i>.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Odd connections have switched this message type off (see the module docs).
    #[arg(long)]
    mute_odd: Option<String>,
    /// Written once the first connection got a whole warm-up round.
    #[arg(long)]
    warm_file: Option<PathBuf>,
}

struct Stats {
    connected: u64,
    failed: u64,
    retried: u64,
    attempted: u64,
    dropped: u64,
    msgs: u64,
    dups: u64,
    wrong: u64,
    losses: u64,
    hist: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    /// The current SIGUSR1 interval and its figures.
    interval: Interval,
    /// Warm-up: partitions seen per round on the first connection; true once written.
    warm_rounds: BTreeMap<u64, u64>,
    warm_done: bool,
}

/// What one SIGUSR1 interval saw.
struct Interval {
    number: u64,
    msgs: u64,
    distinct: u64,
    dups: u64,
    wrong: u64,
    hist: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

impl Interval {
    fn new(number: u64) -> Self {
        Self {
            number,
            msgs: 0,
            distinct: 0,
            dups: 0,
            wrong: 0,
            hist: histogram(),
        }
    }
}

/// p50/p99/p99.9/max of `hist` in ms (null without samples), added to `into`.
fn add_quantiles(into: &mut serde_json::Value, hist: &Histogram<u64>) {
    let q = |p: f64| (!hist.is_empty()).then(|| hist.value_at_quantile(p) as f64 / 1000.0);
    let max = (!hist.is_empty()).then(|| hist.max() as f64 / 1000.0);
    if let Some(m) = into.as_object_mut() {
        for (k, v) in [
            ("p50_ms", q(0.5)),
            ("p99_ms", q(0.99)),
            ("p999_ms", q(0.999)),
            ("max_ms", max),
        ] {
            m.insert(k.into(), serde_json::json!(v));
        }
    }
}

thread_local! {
    // The runtime is current-thread: every task runs here, so no locks on the message path.
    static STATS: RefCell<Stats> = RefCell::new(Stats {
        connected: 0,
        failed: 0,
        retried: 0,
        attempted: 0,
        dropped: 0,
        msgs: 0,
        dups: 0,
        wrong: 0,
        losses: 0,
        hist: histogram(),
        errors: BTreeMap::new(),
        interval: Interval::new(0),
        warm_rounds: BTreeMap::new(),
        warm_done: false,
    });
}

fn with_stats<R>(f: impl FnOnce(&mut Stats) -> R) -> R {
    STATS.with(|s| f(&mut s.borrow_mut()))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The keys a frame is read for, each searcher built once: `str::find` builds a two-way
/// searcher on every call, which was ~45% of a generator's CPU at a million frames a second.
macro_rules! keys {
    ($($name:ident = $key:literal;)*) => {
        $(static $name: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new($key));)*
    };
}
keys! {
    DATA = "\"data\":";
    WARM = "\"warm\":";
    T_US = "\"t_us\":";
    TS = "\"ts\":";
    SEQ = "\"seq\":";
    N = "\"n\":";
    U = "\"u\":";
    P = "\"p\":";
    OF = "\"of\":";
}

/// Where `key` ends in `s`, if it is there. The keys are ASCII, so that is a char boundary.
fn after(s: &str, key: &Finder<'_>) -> Option<usize> {
    Some(key.find(s.as_bytes())? + key.needle().len())
}

/// The unsigned integer right after `key` (e.g. `"ts":`) in `s`, if any.
fn int_after(s: &str, key: &Finder<'_>) -> Option<u64> {
    let at = after(s, key)?;
    let digits = s[at..].trim_start();
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Sequence numbers seen on one connection (in the current interval), and who it is.
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    distinct: u64,
    n: u64,
    interval: u64,
}

/// One connection's identity as the checks need it.
struct Me {
    user: String,
    muted: bool,
    first: bool,
}

/// Sequence numbers beyond this are not tracked (a bad frame must not eat the memory).
const MAX_SEQ: u64 = 1 << 28;

impl Seen {
    /// Records `seq`; false if it was seen before.
    fn insert(&mut self, seq: u64) -> bool {
        if seq >= MAX_SEQ {
            return true;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        self.distinct += fresh as u64;
        fresh
    }
}

/// The string value right after `key` (e.g. `"u":`) in `s`, if any.
fn str_after<'a>(s: &'a str, key: &Finder<'_>) -> Option<&'a str> {
    let at = after(s, key)?;
    let rest = s[at..].trim_start().strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// Accounts one `msg` payload (the JSON object with `ts` and `data`).
fn on_msg(ctx: &Ctx, body: &str, me: &Me, seen: &mut Seen) {
    let now = now_us();
    let Some(at) = after(body, &DATA) else {
        return;
    };
    let data = &body[at..];
    // A measured record has a `seq` near the start of `data`; only one without it is looked
    // at for `warm` (a search that would otherwise run through the whole padding).
    let seq = int_after(data, &SEQ);
    if seq.is_none() {
        if let Some(round) = int_after(data, &WARM) {
            on_warm(ctx, me, round, data);
            return;
        }
    }
    let t_us =
        int_after(data, &T_US).or_else(|| int_after(body, &TS).map(|ms| ms.saturating_mul(1000)));
    let n = int_after(data, &N);
    let wrong = me.muted || str_after(data, &U).is_some_and(|u| u != me.user);
    let latency = t_us.map(|t| now.saturating_sub(t).max(1));
    with_stats(|s| {
        if seen.interval != s.interval.number {
            *seen = Seen {
                interval: s.interval.number,
                ..Seen::default()
            };
        }
        let fresh = seq.is_none_or(|q| seen.insert(q));
        if let Some(n) = n {
            seen.n = seen.n.max(n);
        }
        s.msgs += 1;
        s.dups += !fresh as u64;
        s.wrong += wrong as u64;
        let i = &mut s.interval;
        i.msgs += 1;
        i.distinct += fresh as u64;
        i.dups += !fresh as u64;
        i.wrong += wrong as u64;
        if let Some(l) = latency {
            s.hist.saturating_record(l);
            i.hist.saturating_record(l);
        }
    });
}

/// A warm-up record: once the first connection has a whole round, writes `--warm-file`.
fn on_warm(ctx: &Ctx, me: &Me, round: u64, data: &str) {
    let (Some(p), Some(of)) = (int_after(data, &P), int_after(data, &OF)) else {
        return;
    };
    if !me.first || p >= 64 {
        return;
    }
    let whole = with_stats(|s| {
        if s.warm_done {
            return false;
        }
        let mask = s.warm_rounds.entry(round).or_default();
        *mask |= 1 << p;
        s.warm_done = u64::from(mask.count_ones()) >= of;
        s.warm_done
    });
    if let (true, Some(path)) = (whole, &ctx.args.warm_file) {
        if let Err(e) = std::fs::write(path, format!("{round}\n")) {
            eprintln!("loadgen: cannot write {}: {e}", path.display());
        }
    }
}

/// Ends the current interval: prints its line and starts the next.
fn report_interval() {
    let line = with_stats(|s| {
        let next = Interval::new(s.interval.number + 1);
        let done = std::mem::replace(&mut s.interval, next);
        let mut line = serde_json::json!({
            "interval": done.number, "msgs": done.msgs, "distinct": done.distinct,
            "dups": done.dups, "wrong": done.wrong, "dropped": s.dropped,
        });
        add_quantiles(&mut line, &done.hist);
        line
    });
    println!("{line}");
}

struct Ctx {
    args: Args,
    addr: SocketAddr,
    shard_count: usize,
    total: u64,
    permits: Semaphore,
    all_attempted: Notify,
    stop: CancellationToken,
    key: Option<jsonwebtoken::EncodingKey>,
    /// This shard's first connection (the one that watches the warm-up).
    first: usize,
}

impl Ctx {
    /// True if connection `i`'s user number is odd (`--mute-odd`).
    fn is_odd(&self, i: usize) -> bool {
        (self.args.offset + i) % 2 == 1
    }
}

fn ws_config() -> WebSocketConfig {
    // Idle connections are the point of S1: keep the generator's own buffers small.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Close(c))) => anyhow::bail!("closed during handshake: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("eof during handshake"),
        }
    }
}

async fn open(ctx: &Ctx, i: usize) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    if ctx.args.sources > 0 {
        let host = 2 + ((i / ctx.shard_count) % ctx.args.sources as usize) as u8;
        socket.bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
            0,
        ))?;
    }
    let stream = socket.connect(ctx.addr).await?;
    stream.set_nodelay(true)?;
    let user = format!("{}{}", ctx.args.user_prefix, ctx.args.offset + i);
    let mut query = match (ctx.args.proto, &ctx.key) {
        (Proto::Fanout, Some(_)) => String::new(),
        (Proto::Fanout, None) => format!("user={user}"),
        (Proto::Socketio, _) => format!("EIO=4&transport=websocket&user={user}"),
    };
    if let (Proto::Socketio, Some(muted), true) =
        (ctx.args.proto, &ctx.args.mute_odd, ctx.is_odd(i))
    {
        query.push_str("&mute=");
        query.push_str(muted);
    }
    if let Some(extra) = &ctx.args.query {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(extra);
    }
    let path = match ctx.args.proto {
        Proto::Fanout => "/ws",
        Proto::Socketio => "/socket.io/",
    };
    let url = format!("ws://{}{path}?{query}", ctx.args.target);
    let mut req = url.into_client_request()?;
    if let Some(key) = &ctx.key {
        let exp = now_us() / 1_000_000 + 24 * 3600;
        let claims = serde_json::json!({ "sub": user, "exp": exp });
        let jwt = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, key)?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {jwt}").parse()?);
    }
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config())).await?;
    match ctx.args.proto {
        Proto::Fanout => {
            let hello = next_text(&mut ws).await?;
            anyhow::ensure!(hello.starts_with(r#"{"t":"hello""#), "first frame: {hello}");
        }
        Proto::Socketio => {
            let open = next_text(&mut ws).await?;
            anyhow::ensure!(open.starts_with('0'), "engine.io open: {open}");
            ws.send(Message::text("40")).await?;
            loop {
                let t = next_text(&mut ws).await?;
                if t.starts_with("40") {
                    break;
                }
                if t == "2" {
                    ws.send(Message::text("3")).await?;
                }
            }
        }
    }
    Ok(ws)
}

/// Short error kind for the summary (no addresses or ports, so that kinds add up).
fn kind(e: &anyhow::Error) -> String {
    let s = e.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s);
    s.chars().take(80).collect()
}

fn attempt_done(ctx: &Ctx) {
    let all = with_stats(|s| {
        s.attempted += 1;
        s.attempted == ctx.total
    });
    if all {
        ctx.all_attempted.notify_one();
    }
}

async fn connection(ctx: Arc<Ctx>, i: usize) {
    let timeout = Duration::from_secs_f64(ctx.args.connect_timeout);
    let mut retry = 0;
    let opened = loop {
        let permit = ctx.permits.acquire().await.expect("semaphore");
        let opened = tokio::select! {
            r = tokio::time::timeout(timeout, open(&ctx, i)) => r.unwrap_or_else(|_| Err(anyhow::anyhow!("connect timeout"))),
            _ = ctx.stop.cancelled() => break Err(anyhow::anyhow!("stopped while connecting")),
        };
        drop(permit);
        if opened.is_ok() || retry == ctx.args.connect_retries {
            break opened;
        }
        retry += 1;
        with_stats(|s| s.retried += 1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(retry.into())) => {}
            _ = ctx.stop.cancelled() => break opened,
        }
    };
    let mut ws = match opened {
        Ok(ws) => {
            with_stats(|s| s.connected += 1);
            attempt_done(&ctx);
            ws
        }
        Err(e) => {
            with_stats(|s| {
                s.failed += 1;
                *s.errors.entry(kind(&e)).or_default() += 1;
            });
            attempt_done(&ctx);
            return;
        }
    };
    let me = Me {
        user: format!("{}{}", ctx.args.user_prefix, ctx.args.offset + i),
        muted: ctx.args.mute_odd.is_some() && ctx.is_odd(i),
        first: i == ctx.first,
    };
    let mut seen = Seen::default();
    let socketio = ctx.args.proto == Proto::Socketio;
    // Made once: a fresh `cancelled()` per frame would lock the shared token twice a frame.
    let stop = ctx.stop.cancelled();
    tokio::pin!(stop);
    let dropped = loop {
        let frame = tokio::select! {
            biased;
            f = ws.next() => f,
            _ = &mut stop => break false,
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if socketio {
                    if let Some(body) = t.strip_prefix(r#"42["msg","#) {
                        on_msg(&ctx, body, &me, &mut seen);
                    } else if t == "2" && ws.send(Message::text("3")).await.is_err() {
                        break true;
                    }
                } else if t.starts_with(r#"{"t":"msg""#) {
                    on_msg(&ctx, t, &me, &mut seen);
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break true,
            Some(Ok(_)) => {} // Pings are answered by tungstenite on the next read.
        }
    };
    let expected = seen.n.max(ctx.args.expect);
    with_stats(|s| {
        s.dropped += dropped as u64;
        s.losses += expected.saturating_sub(seen.distinct);
    });
}

fn unix_ms() -> u64 {
    now_us() / 1000
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (k, m) = args
        .shard
        .split_once('/')
        .and_then(|(k, m)| Some((k.parse::<usize>().ok()?, m.parse::<usize>().ok()?)))
        .filter(|&(k, m)| k >= 1 && k <= m)
        .ok_or_else(|| anyhow::anyhow!("--shard K/M with 1 <= K <= M"))?;
    anyhow::ensure!(args.sources <= 253, "--sources at most 253");
    let addr = args
        .target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {}", args.target))?;
    let mine: Vec<usize> = (0..args.connections).filter(|i| i % m == k - 1).collect();
    let key = args
        .token_secret
        .as_deref()
        .map(|s| jsonwebtoken::EncodingKey::from_secret(s.as_bytes()));
    let ctx = Arc::new(Ctx {
        addr,
        shard_count: m,
        total: mine.len() as u64,
        permits: Semaphore::new(args.concurrency.max(1)),
        all_attempted: Notify::new(),
        stop: CancellationToken::new(),
        key,
        first: mine.first().copied().unwrap_or(usize::MAX),
        args,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(ctx, mine, k, m))
}

async fn run(ctx: Arc<Ctx>, mine: Vec<usize>, k: usize, m: usize) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    let start = Instant::now();
    let start_ms = unix_ms();
    let mut tasks = tokio::task::JoinSet::new();
    for &i in &mine {
        tasks.spawn(connection(ctx.clone(), i));
    }
    if mine.is_empty() {
        ctx.all_attempted.notify_one();
    }
    let mut connect_secs = None;
    let mut done_ms = start_ms;
    tokio::select! {
        _ = ctx.all_attempted.notified() => {
            connect_secs = Some(start.elapsed().as_secs_f64());
            done_ms = unix_ms();
        }
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    if let Some(secs) = connect_secs {
        let (connected, failed, retried) = with_stats(|s| (s.connected, s.failed, s.retried));
        eprintln!(
            "loadgen {k}/{m}: {connected} connected, {failed} failed ({retried} retries) in {secs:.2} s ({:.0}/s)",
            connected as f64 / secs.max(1e-9)
        );
        if let Some(path) = &ctx.args.ready_file {
            let ready = serde_json::json!({"connected": connected, "failed": failed, "retried": retried, "connect_secs": secs});
            std::fs::write(path, format!("{ready}\n"))?;
        }
        let hold = async {
            match ctx.args.duration {
                Some(d) => tokio::time::sleep(Duration::from_secs_f64(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(hold);
        loop {
            tokio::select! {
                _ = &mut hold => break,
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                _ = sigusr1.recv() => report_interval(),
            }
        }
    }
    ctx.stop.cancel();
    while tasks.join_next().await.is_some() {}
    let summary = with_stats(|s| {
        let mut summary = serde_json::json!({
            "shard": format!("{k}/{m}"),
            "proto": format!("{:?}", ctx.args.proto).to_lowercase(),
            "connected": s.connected,
            "failed": s.failed,
            "retried": s.retried,
            "dropped": s.dropped,
            "connect_secs": connect_secs,
            "start_ms": start_ms,
            "done_ms": done_ms,
            "msgs": s.msgs,
            "dups": s.dups,
            "wrong": s.wrong,
            "losses": s.losses,
            "errors": s.errors,
        });
        add_quantiles(&mut summary, &s.hist);
        summary
    });
    println!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_what_it_needs() {
        let body = r#"{"t":"msg","id":"m-1","type":"x","ts":1764000000000,"data":{"seq":7,"n":10,"text":"hi"}}"#;
        assert_eq!(int_after(body, &TS), Some(1_764_000_000_000));
        let data = &body[after(body, &DATA).unwrap()..];
        assert_eq!(int_after(data, &SEQ), Some(7));
        assert_eq!(int_after(data, &N), Some(10));
        assert_eq!(int_after(data, &WARM), None);
        assert_eq!(str_after(r#"{"u":"u42","seq":1}"#, &U), Some("u42"));
    }

    #[test]
    fn seen_counts_duplicates() {
        let mut seen = Seen::default();
        assert!(seen.insert(3));
        assert!(!seen.insert(3));
        assert!(seen.insert(130));
        assert_eq!(seen.distinct, 2);
    }
}
