//! Ingest: Kafka consumer group → validated, rendered message → bus.
//!
//! Invariants (DESIGN §1, §2):
//! * An offset is stored for commit only after its record was published on the bus (or,
//!   for a bad record, rejected and dead-lettered): at-least-once, nothing skipped.
//!   Records already waiting in the consumer are published together, in order, with one
//!   bus call, and their offsets stored with one call.
//! * While the bus is down the loop retries the same record, so consumption pauses rather
//!   than committing what was never published.
//! * A bad record never stops a partition and never crashes the node.
//! * The client frame is rendered here, once per message.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Header, Outgoing};
use crate::clock::{now_ms, now_us};
use crate::config::{KafkaConfig, OffsetReset};
use crate::envelope::{self, Reject};
use crate::kafka::{client_config, Producer};
use crate::metrics::Metrics;
use crate::types::{TypesConfig, UnknownTypes};

/// Logs rebalances and keeps the partition gauge current.
pub struct IngestContext {
    metrics: Arc<Metrics>,
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
        .create_with_context(IngestContext { metrics })
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
    pub types: TypesConfig,
    pub metrics: Arc<Metrics>,
}

/// Most records published in one bus call...
const BATCH_MAX: usize = 256;
/// ... and most bytes of messages: a batch reaches every node's router at once, so it must
/// not by itself fill a connection's queue (`server.queue_max_bytes`).
const BATCH_MAX_BYTES: usize = 64 * 1024;

/// The records taken since the last publish.
#[derive(Default)]
struct Batch {
    outgoing: Vec<Outgoing>,
    /// Per partition, the offset after the last record taken.
    next: Vec<(String, i32, i64)>,
    records: usize,
    bytes: usize,
}

impl Batch {
    fn advance(&mut self, topic: &str, partition: i32, next: i64) {
        match self
            .next
            .iter_mut()
            .find(|(t, p, _)| *p == partition && t == topic)
        {
            Some(entry) => entry.2 = next,
            None => self.next.push((topic.to_owned(), partition, next)),
        }
    }

    fn clear(&mut self) {
        self.outgoing.clear();
        self.next.clear();
        self.records = 0;
        self.bytes = 0;
    }

    fn is_full(&self) -> bool {
        self.records >= BATCH_MAX || self.bytes >= BATCH_MAX_BYTES
    }
}

/// What to do with one consumed record.
enum Outcome {
    Publish(Outgoing),
    Reject(Reject),
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
    fn decide(&self, record: &BorrowedMessage<'_>, known: &HashSet<&str>) -> Outcome {
        let at_us = now_us();
        if let Some(ts) = record.timestamp().to_millis() {
            let waited_ms = (at_us / 1000) as i64 - ts;
            self.metrics
                .stage_kafka
                .observe(waited_ms.max(0) as f64 / 1000.0);
        }
        let env = match envelope::decode(record.payload(), self.kafka.max_record_bytes) {
            Ok(env) => env,
            Err(reject) => return Outcome::Reject(reject),
        };
        if self.types.unknown == UnknownTypes::Reject && !known.contains(env.msg_type.as_str()) {
            return Outcome::Reject(Reject::UnknownType(env.msg_type));
        }
        let ts = record.timestamp().to_millis().unwrap_or_else(now_ms);
        let id = message_id(record.topic(), record.partition(), record.offset(), ts);
        let frame = envelope::render_msg_frame(&id, &env.msg_type, ts, &env.data);
        let header = Header {
            id,
            msg_type: env.msg_type,
            to: env.to,
            ts,
            ttl_ms: env.ttl_ms,
            at_us,
        };
        Outcome::Publish(Outgoing::new(header, &frame))
    }

    /// Consumes until `shutdown`, then commits what was published and leaves the group.
    /// Records are taken in batches: the first one waited for, then whatever else the
    /// consumer already holds (up to [`BATCH_MAX`] records or [`BATCH_MAX_BYTES`]),
    /// published in one bus call.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let known: HashSet<&str> = self
            .types
            .registry
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        let mut reject_log = RateLimitedLog::new();
        let mut error_log = RateLimitedLog::new();
        let mut batch = Batch::default();
        loop {
            let record = tokio::select! {
                _ = shutdown.cancelled() => break,
                record = self.consumer.recv() => record,
            };
            let mut next = Some(record);
            while let Some(record) = next.take() {
                match record {
                    Ok(record) => self.take(record, &known, &mut batch, &mut reject_log).await,
                    Err(e) => self.consumer_error(&e, &mut error_log),
                }
                if !batch.is_full() {
                    next = self.consumer.recv().now_or_never();
                }
            }
            if !batch.outgoing.is_empty() && !self.publish(&batch.outgoing, &shutdown).await {
                break;
            }
            self.store(&batch.next);
            batch.clear();
        }
        self.leave();
        Ok(())
    }

    /// Adds one record to `batch`: a message to publish, or a reject (counted, logged,
    /// dead-lettered now); either way its offset is stored after the batch.
    async fn take(
        &self,
        record: BorrowedMessage<'_>,
        known: &HashSet<&str>,
        batch: &mut Batch,
        reject_log: &mut RateLimitedLog,
    ) {
        self.metrics.ingest_records.inc();
        batch.records += 1;
        batch.advance(record.topic(), record.partition(), record.offset() + 1);
        match self.decide(&record, known) {
            Outcome::Publish(msg) => {
                batch.bytes += msg.body().len();
                batch.outgoing.push(msg);
            }
            Outcome::Reject(reject) => {
                self.metrics
                    .ingest_rejected
                    .with_label_values(&[reject.as_str()])
                    .inc();
                if let Some(suppressed) = reject_log.allow() {
                    let (topic, partition, offset) =
                        (record.topic(), record.partition(), record.offset());
                    tracing::warn!(%topic, partition, offset, reason = reject.as_str(), error = %reject, suppressed, "record rejected");
                }
                self.dead_letter(&record, &reject).await;
            }
        }
    }

    /// Counts an error the consumer reported instead of a record, and logs it at most once
    /// a second. librdkafka retries what failed itself; every codec is compiled in, so an
    /// `undecodable` batch means data no Kafka broker should have accepted.
    fn consumer_error(&self, e: &KafkaError, log: &mut RateLimitedLog) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let kind = match e.rdkafka_error_code() {
            Some(
                Code::BadCompression
                | Code::BadMessage
                | Code::InvalidMessage
                | Code::InvalidRecord
                | Code::NotImplemented
                | Code::UnsupportedCompressionType,
            ) => "undecodable",
            Some(
                Code::BrokerTransportFailure
                | Code::AllBrokersDown
                | Code::Resolve
                | Code::SSL
                | Code::Authentication
                | Code::MessageTimedOut
                | Code::RequestTimedOut,
            ) => "broker",
            _ => "other",
        };
        self.metrics
            .kafka_consumer_errors
            .with_label_values(&[kind])
            .inc();
        if let Some(suppressed) = log.allow() {
            tracing::warn!(error = %e, kind, suppressed, "kafka consumer error");
        }
    }

    /// Publishes until the bus takes them all; false if shutdown came first (nothing is
    /// stored, so the records are consumed again by whoever owns the partitions next). A
    /// message the bus already has (a Kafka redelivery, or a retry of a batch that was
    /// partly published) counts as published and is not published again.
    async fn publish(&self, msgs: &[Outgoing], shutdown: &CancellationToken) -> bool {
        let mut backoff = Duration::from_millis(50);
        let mut failures = 0u32;
        loop {
            match self.bus.publish_messages(msgs).await {
                Ok(published) => {
                    for (msg, p) in msgs.iter().zip(&published).filter(|(_, p)| p.duplicate) {
                        self.metrics.ingest_duplicates.inc();
                        tracing::debug!(id = %msg.header.id, seq = p.seq, "redelivered record already on the bus");
                    }
                    if failures > 0 {
                        tracing::info!(failures, "bus publish recovered; consumption resumes");
                    }
                    return true;
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::error!(error = %e, "bus publish failed; consumption paused until it recovers");
                    }
                    failures += 1;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

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

    /// Stores each partition's next offset (where consumption resumes) for the next
    /// commit, in one call. Not the legacy `store_offset`: librdkafka's
    /// `rd_kafka_offset_store` adds one itself, which once made every clean restart or
    /// rebalance skip a record.
    fn store(&self, next: &[(String, i32, i64)]) {
        if next.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(next.len());
        let stored = next
            .iter()
            .try_for_each(|(topic, partition, offset)| {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            })
            .and_then(|()| self.consumer.store_offsets(&tpl));
        if let Err(e) = stored {
            tracing::warn!(offsets = ?next, error = %e, "could not store offsets (partition revoked?)");
        }
    }

    /// Commits stored offsets and leaves the group, so partitions move at once.
    fn leave(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("kafka offsets committed"),
            Err(e) => tracing::debug!(error = %e, "nothing to commit at shutdown"),
        }
        self.consumer.unsubscribe();
        self.metrics.kafka_partitions.set(0);
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
