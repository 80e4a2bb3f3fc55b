//! Ingest: Kafka consumer group → validated, rendered message → bus.
//!
//! Three parts: the driver ([`partitions`]) serves the consumer's main queue (rebalances)
//! and, after every assignment, splits off one queue per partition with a reader task;
//! each reader decides its records (decode, render, reject) and sends them, in order, to
//! the one batcher ([`batcher`]), which publishes them on the bus across partitions and
//! then stores their offsets.
//!
//! Invariants (DESIGN §1, §2):
//! * An offset is stored for commit only after its record was published on the bus (or,
//!   for a bad record, rejected and dead-lettered; for a batch the consumer cannot decode,
//!   skipped and counted): at-least-once, nothing decodable skipped. Records already
//!   waiting are published together, in order, with one bus call, and their offsets
//!   stored with one call.
//! * Per partition, records reach the bus in offset order: one reader per partition, one
//!   channel, one batcher; what the main queue held before a split goes first.
//! * While the bus is down the batcher retries the same records, so consumption pauses
//!   rather than committing what was never published.
//! * A bad record never stops a partition and never crashes the node; neither does a
//!   batch librdkafka cannot decode (it would fetch it again forever): the reader of that
//!   partition seeks past it one offset at a time.
//! * The client frame is rendered here, once per message.

mod batcher;
mod partitions;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Header, Outgoing};
use crate::clock::{now_ms, now_us};
use crate::config::{KafkaConfig, OffsetReset};
use crate::envelope::{self, Reject};
use crate::kafka::{client_config, Producer};
use crate::metrics::{ConsumerError, Metrics};
use crate::types::TypeRegistry;

/// Logs rebalances, keeps the partition gauge current and wakes the driver, which splits
/// the new assignment into partition queues.
pub struct IngestContext {
    metrics: Arc<Metrics>,
    rebalanced: Arc<Notify>,
}

impl ClientContext for IngestContext {}

impl ConsumerContext for IngestContext {
    fn post_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?partitions(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = ?partitions(tpl), "partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        let owned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics.kafka_partitions.set(owned as i64);
        if !matches!(rebalance, Rebalance::Error(_)) {
            // Called inside the driver's poll of the main queue: the permit is stored and
            // the driver takes it as soon as that poll returns.
            self.rebalanced.notify_one();
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect()
}

/// The consumer type ingest uses.
pub type IngestConsumer = StreamConsumer<IngestContext>;

/// Creates the group consumer and subscribes it to `kafka.topics`.
pub fn consumer(cfg: &KafkaConfig, metrics: Arc<Metrics>) -> Result<IngestConsumer, KafkaError> {
    let reset = match cfg.auto_offset_reset {
        OffsetReset::Earliest => "earliest",
        OffsetReset::Latest => "latest",
    };
    let consumer: IngestConsumer = client_config(cfg)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", reset)
        .set(
            "session.timeout.ms",
            cfg.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (cfg.session_timeout.as_millis() / 4).max(100).to_string(),
        )
        .create_with_context(IngestContext {
            metrics,
            rebalanced: Arc::new(Notify::new()),
        })
        .map_err(crate::kafka::without_secrets)?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Logs at most once per second, counting what it held back.
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    /// Returns how many were suppressed since the last log, or `None` to stay quiet.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Everything ingest needs.
pub struct Ingest {
    pub consumer: Arc<IngestConsumer>,
    pub bus: Arc<dyn Bus>,
    pub producer: Producer,
    pub kafka: KafkaConfig,
    /// The node's type registry: the unknown-type rule.
    pub types: Arc<TypeRegistry>,
    pub metrics: Arc<Metrics>,
    /// Published user-targeted messages are reported here (`offline`, `expired`).
    pub receipts: crate::receipts::Receipts,
}

/// One record (or one skipped offset) on its way from a partition reader to the batcher.
struct Taken {
    /// The message to publish; `None` for a rejected record or a skipped offset.
    msg: Option<Outgoing>,
    topic: Arc<str>,
    partition: i32,
    /// The partition's offset after this record: where consumption resumes.
    next: i64,
}

/// Records between the readers and the batcher: enough for several full batches, few
/// enough that a paused bus soon pauses the readers (librdkafka then stops fetching).
const CHANNEL: usize = 4 * batcher::BATCH_MAX;

/// What the readers and the driver share.
struct Worker {
    ingest: Ingest,
    reject_log: Mutex<RateLimitedLog>,
    error_log: Mutex<RateLimitedLog>,
    skip_log: Mutex<RateLimitedLog>,
}

/// What to do with one consumed record.
enum Outcome {
    Publish(Outgoing),
    Reject(Reject),
}

/// How ingest treats an error the consumer reported instead of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    /// Data librdkafka cannot decompress or parse. Only these three codes say that of the
    /// data at the partition's fetch position (src/rdkafka_msgset_reader.c): a codec that
    /// fails (`__BAD_COMPRESSION`), an unknown codec or message format
    /// (`__NOT_IMPLEMENTED`), a failed CRC check (`__BAD_MSG`).
    Undecodable,
    /// Also data the broker calls undecodable, but reported for a whole fetch: counted,
    /// never skipped.
    UndecodableFetch,
    Broker,
    Other,
}

impl ErrorKind {
    fn of(e: &KafkaError) -> Self {
        use RDKafkaErrorCode as Code;
        match e.rdkafka_error_code() {
            Some(Code::BadCompression | Code::BadMessage | Code::NotImplemented) => {
                ErrorKind::Undecodable
            }
            Some(Code::InvalidMessage | Code::InvalidRecord | Code::UnsupportedCompressionType) => {
                ErrorKind::UndecodableFetch
            }
            Some(
                Code::BrokerTransportFailure
                | Code::AllBrokersDown
                | Code::Resolve
                | Code::SSL
                | Code::Authentication
                | Code::MessageTimedOut
                | Code::RequestTimedOut,
            ) => ErrorKind::Broker,
            _ => ErrorKind::Other,
        }
    }

    /// The `kind` label of `fanout_kafka_consumer_errors_total`.
    fn label(self) -> &'static str {
        match self {
            ErrorKind::Undecodable | ErrorKind::UndecodableFetch => ConsumerError::Undecodable,
            ErrorKind::Broker => ConsumerError::Broker,
            ErrorKind::Other => ConsumerError::Other,
        }
        .label()
    }
}

/// A stable, unique message id from the record's coordinates and timestamp: a redelivery
/// of the same record carries the same id, and a topic that starts its offsets again (the
/// embedded broker after a restart, a recreated topic) cannot repeat an old id.
fn message_id(topic: &str, partition: i32, offset: i64, ts_ms: i64) -> String {
    let tag = topic.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    format!("{tag:08x}-{partition}-{offset}-{ts_ms:x}")
}

impl Ingest {
    /// Consumes until `shutdown`, then commits what was published and leaves the group.
    /// The driver and one reader per partition run as tasks; the batcher runs here.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let worker = Arc::new(Worker {
            ingest: self,
            reject_log: Mutex::new(RateLimitedLog::new()),
            error_log: Mutex::new(RateLimitedLog::new()),
            skip_log: Mutex::new(RateLimitedLog::new()),
        });
        let (tx, rx) = mpsc::channel(CHANNEL);
        let driver = tokio::spawn(worker.clone().drive(tx, shutdown.clone()));
        // Returns at shutdown (or if the driver is gone); dropping `rx` then releases any
        // reader waiting to send.
        worker.ingest.batch(rx, &shutdown).await;
        shutdown.cancel();
        if let Err(e) = driver.await {
            tracing::error!(error = %e, "ingest driver failed");
        }
        worker.ingest.leave();
        Ok(())
    }
}

impl Worker {
    fn decide(&self, record: &BorrowedMessage<'_>) -> Outcome {
        let at_us = now_us();
        let metrics = &self.ingest.metrics;
        if let Some(ts) = record.timestamp().to_millis() {
            let waited_ms = (at_us / 1000) as i64 - ts;
            metrics
                .stage_kafka
                .observe(waited_ms.max(0) as f64 / 1000.0);
        }
        let env = match envelope::decode(record.payload(), self.ingest.kafka.max_record_bytes) {
            Ok(env) => env,
            Err(reject) => return Outcome::Reject(reject),
        };
        if !self.ingest.types.admits(&env.msg_type) {
            return Outcome::Reject(Reject::UnknownType(env.msg_type));
        }
        let ts = record.timestamp().to_millis().unwrap_or_else(now_ms);
        let id = message_id(record.topic(), record.partition(), record.offset(), ts);
        let frame = envelope::render_msg_frame_with(
            &id,
            &env.msg_type,
            ts,
            &env.data,
            env.collapse.as_deref(),
        );
        let header = Header {
            id,
            msg_type: env.msg_type,
            to: env.to,
            ts,
            ttl_ms: env.ttl_ms,
            at_us,
            collapse: env.collapse,
        };
        Outcome::Publish(Outgoing::new(header, &frame))
    }

    /// Takes one record: a message to publish, or a reject (counted, logged,
    /// dead-lettered now); either way the batcher stores its offset after the batch.
    async fn take(&self, record: &BorrowedMessage<'_>, topic: Arc<str>) -> Taken {
        self.ingest.metrics.ingest_records.inc();
        let next = record.offset() + 1;
        let partition = record.partition();
        let msg = match self.decide(record) {
            Outcome::Publish(msg) => Some(msg),
            Outcome::Reject(reject) => {
                self.ingest
                    .metrics
                    .ingest_rejected
                    .with_label_values(&[reject.as_str()])
                    .inc();
                let allowed = self.reject_log.lock().allow();
                if let Some(suppressed) = allowed {
                    let offset = record.offset();
                    tracing::warn!(%topic, partition, offset, reason = reject.as_str(), error = %reject, suppressed, "record rejected");
                }
                self.ingest.dead_letter(record, &reject).await;
                None
            }
        };
        Taken {
            msg,
            topic,
            partition,
            next,
        }
    }

    /// Counts an error the consumer reported instead of a record, and logs it at most once
    /// a second. librdkafka retries what failed itself; every codec is compiled in, so an
    /// `undecodable` batch means data no Kafka broker should have accepted.
    fn consumer_error(&self, e: &KafkaError) -> ErrorKind {
        let kind = ErrorKind::of(e);
        self.ingest
            .metrics
            .kafka_consumer_errors
            .with_label_values(&[kind.label()])
            .inc();
        let allowed = self.error_log.lock().allow();
        if let Some(suppressed) = allowed {
            tracing::warn!(error = %e, kind = kind.label(), suppressed, "kafka consumer error");
        }
        kind
    }
}

impl Ingest {
    /// Copies a rejected record to `kafka.dead_letter_topic`, when set. Gives up after a
    /// few attempts: a broken dead-letter topic must not stop the partition.
    async fn dead_letter(&self, record: &BorrowedMessage<'_>, reject: &Reject) {
        let topic = &self.kafka.dead_letter_topic;
        if topic.is_empty() {
            return;
        }
        let partition = record.partition().to_string();
        let offset = record.offset().to_string();
        let error = reject.to_string();
        let headers = [
            ("fanout-reject-reason", reject.as_str()),
            ("fanout-reject-error", error.as_str()),
            ("fanout-source-topic", record.topic()),
            ("fanout-source-partition", partition.as_str()),
            ("fanout-source-offset", offset.as_str()),
        ];
        let key = record.key().and_then(|k| std::str::from_utf8(k).ok());
        let payload = record.payload().unwrap_or_default();
        for attempt in 1..=3 {
            match self.producer.send(topic, key, payload, &headers).await {
                Ok(()) => {
                    self.metrics.ingest_dead_lettered.inc();
                    return;
                }
                Err(e) if attempt == 3 => {
                    tracing::error!(%topic, error = %e, "dead-letter produce failed; record dropped")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempt)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_and_distinct() {
        assert_eq!(message_id("a", 1, 5, 9), message_id("a", 1, 5, 9));
        assert_ne!(message_id("a", 1, 5, 9), message_id("b", 1, 5, 9));
        assert_ne!(message_id("a", 1, 5, 9), message_id("a", 2, 5, 9));
        assert_ne!(message_id("a", 1, 5, 9), message_id("a", 1, 6, 9));
        assert_ne!(
            message_id("a", 1, 5, 9),
            message_id("a", 1, 5, 10),
            "offsets reused later"
        );
    }

    #[test]
    fn rate_limited_log_counts_what_it_holds_back() {
        let mut log = RateLimitedLog::new();
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        log.last = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(log.allow(), Some(2));
    }
}
