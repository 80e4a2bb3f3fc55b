//! Kafka publisher for `scripts/bench`: produces envelopes (DESIGN §2) at a steady rate, each
//! stamped so that a load generator can check and time it end to end. The same records
//! serve fanout and the socket.io peer (`../shared/peers/socketio`), which reads the same
//! envelope.
//!
//! `data` of message `k` of a run is `{"seq":…,"n":…,"t_us":…,"pad":"x…"}`:
//! * `--to all`: every message is `{"all":true}`; `seq` = k, `n` = the run's messages.
//! * `--to users`: message k is for user `<prefix><k mod users>` (Kafka key = the user,
//!   `data.u` = the user too, so a client can tell a wrong delivery); `seq` = k div users,
//!   the message's place in that user's stream, and `n` = how many that user gets.
//!   `t_us` is the wall clock (µs since the epoch) when the record was handed to the
//!   producer; `pad` fills `data` to about `--payload` bytes.
//!
//! `--burst-every-ms T` sends the same records in bursts: every T ms, those due in that time
//! at once (`--rate 200 --burst-every-ms 100`: bursts of 20, ten a second).
//!
//! `--warmup FILE`: instead of a run, produces one `{"type":"warm","to":{"all":true}}`
//! record to every partition every 250 ms until FILE exists (a load generator writes it
//! once a connection got a whole round), so that every consumer group has joined and owns
//! its partitions before anything is measured; fails after `--warmup-timeout` seconds.
//!
//! Prints one JSON line: `{"sent","failed","seconds","rate"}`. Exits non-zero if any record
//! was not acknowledged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum To {
    All,
    Users,
}

#[derive(Parser, Debug)]
#[command(about = "Steady-rate Kafka publisher for scripts/bench")]
struct Args {
    /// bootstrap.servers
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
    /// Recipients of each message.
    #[arg(long, value_enum, default_value = "all")]
    to: To,
    /// Messages per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Length of the run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Send in bursts: every this many ms, the records due in that time at once (0: each
    /// record at its own time, evenly spaced).
    #[arg(long, default_value_t = 0)]
    burst_every_ms: u64,
    /// `--to users`: users `<prefix>0 … <prefix>(users-1)`.
    #[arg(long, default_value_t = 1000)]
    users: u64,
    #[arg(long, default_value = "u")]
    user_prefix: String,
    /// Message type.
    #[arg(long = "type", default_value = "robot.reply")]
    msg_type: String,
    /// Approximate size of `data` in bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// librdkafka linger.ms (0: each record is sent at once).
    #[arg(long, default_value_t = 0)]
    linger_ms: u32,
    /// Warm up instead: a round of records to every partition until this file exists.
    #[arg(long)]
    warmup: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 90.0)]
    warmup_timeout: f64,
}

/// Counts acknowledgements and failures.
struct Acks {
    failed: AtomicU64,
    acked: AtomicU64,
}

struct Ctx(Arc<Acks>);

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Hands one record to the producer, waiting while its queue is full.
fn produce(
    producer: &ThreadedProducer<Ctx>,
    topic: &str,
    key: Option<&str>,
    partition: Option<i32>,
    payload: &[u8],
) -> anyhow::Result<()> {
    loop {
        let mut record = BaseRecord::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                _,
            )) => std::thread::sleep(Duration::from_millis(1)),
            Err((e, _)) => anyhow::bail!("produce: {e}"),
        }
    }
}

fn warm_up(args: &Args, producer: &ThreadedProducer<Ctx>, file: &Path) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut sent = 0;
    for round in 0u64.. {
        if file.exists() {
            return Ok(sent);
        }
        anyhow::ensure!(
            start.elapsed().as_secs_f64() < args.warmup_timeout,
            "warm-up: {} did not appear within {} s (are the servers consuming topic {}?)",
            file.display(),
            args.warmup_timeout,
            args.topic
        );
        for p in 0..args.partitions {
            let body = format!(
                r#"{{"type":"warm","to":{{"all":true}},"data":{{"warm":{round},"p":{p},"of":{}}}}}"#,
                args.partitions
            );
            produce(producer, &args.topic, None, Some(p), body.as_bytes())?;
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    unreachable!()
}

fn run(args: &Args, producer: &ThreadedProducer<Ctx>) -> anyhow::Result<u64> {
    let total = (args.rate * args.seconds).round() as u64;
    let per_user = |user: u64| match args.to {
        To::All => total,
        To::Users => total / args.users + u64::from(user < total % args.users),
    };
    let pad = "x".repeat(args.payload.saturating_sub(60));
    let start = Instant::now();
    let mut body = String::with_capacity(256 + pad.len());
    let tick = args.burst_every_ms as f64 / 1000.0;
    for k in 0..total {
        let mut at = k as f64 / args.rate;
        if tick > 0.0 {
            at = (at / tick).floor() * tick;
        }
        let due = start + Duration::from_secs_f64(at);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        body.clear();
        let (key, seq, n, target) = match args.to {
            To::All => (None, k, total, r#"{"all":true}"#.to_owned()),
            To::Users => {
                let user = k % args.users;
                let name = format!("{}{user}", args.user_prefix);
                let target = format!(r#"{{"user":"{name}"}}"#);
                (Some(name), k / args.users, per_user(user), target)
            }
        };
        let u = key
            .as_deref()
            .map(|name| format!(r#""u":"{name}","#))
            .unwrap_or_default();
        use std::fmt::Write as _;
        write!(
            body,
            r#"{{"type":"{}","to":{target},"data":{{{u}"seq":{seq},"n":{n},"t_us":{},"pad":"{pad}"}}}}"#,
            args.msg_type,
            now_us()
        )?;
        produce(producer, &args.topic, key.as_deref(), None, body.as_bytes())?;
    }
    Ok(total)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(args.users > 0, "--users must be positive");
    let acks = Arc::new(Acks {
        failed: AtomicU64::new(0),
        acked: AtomicU64::new(0),
    });
    let producer: ThreadedProducer<Ctx> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", args.linger_ms.to_string())
        .set("acks", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Ctx(acks.clone()))?;
    let start = Instant::now();
    let sent = match &args.warmup {
        Some(file) => warm_up(&args, &producer, file)?,
        None => run(&args, &producer)?,
    };
    let seconds = start.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(30))?;
    let failed = acks.failed.load(Ordering::Relaxed);
    let unacked = sent - acks.acked.load(Ordering::Relaxed) - failed;
    println!(
        "{}",
        serde_json::json!({
            "sent": sent, "failed": failed + unacked, "seconds": seconds,
            "rate": sent as f64 / seconds.max(1e-9),
        })
    );
    anyhow::ensure!(
        failed + unacked == 0,
        "{} records not acknowledged",
        failed + unacked
    );
    Ok(())
}
