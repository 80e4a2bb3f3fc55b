//! A producer that never waits: for output topics (receipts, presence events) whose
//! records are facts reported on the side, never worth holding up the node for.
//!
//! [`Sink::produce`] hands a record to librdkafka's queue and returns at once; a full queue
//! (`queue.buffering.max.messages`, bounded) is an error the caller counts and drops. A
//! record that fails later (broker down past `message.timeout.ms`) is counted through the
//! counter given for its topic at creation. Its own librdkafka instance (queue and thread),
//! so a flood of receipts or a connect storm's presence events cannot fill the queue that
//! `ask` and dead-lettering wait on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::ClientContext;

use super::client_config;
use crate::config::KafkaConfig;

/// Records waiting in librdkafka's queue at most; beyond, `produce` fails at once.
const QUEUE_MAX: usize = 100_000;

/// Counts the records the brokers did not take, per topic.
struct Reports {
    failed: Vec<(String, IntCounter)>,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        use rdkafka::Message as _;
        if let Err((_, record)) = result {
            let topic = record.topic();
            if let Some((_, failed)) = self.failed.iter().find(|(t, _)| t == topic) {
                failed.inc();
            }
        }
    }
}

/// A cheap-to-clone handle; its polling thread stops when the last clone is dropped.
#[derive(Clone)]
pub struct Sink {
    inner: Arc<Shared>,
}

struct Shared {
    producer: Arc<BaseProducer<Reports>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Sink {
    /// A producer for `cfg`'s brokers; `failed` counts, per topic, records the brokers
    /// never took.
    pub fn new(cfg: &KafkaConfig, failed: Vec<(String, IntCounter)>) -> Result<Self, KafkaError> {
        let producer: BaseProducer<Reports> = client_config(cfg)
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", QUEUE_MAX.to_string())
            // Only failures are reported back (all the sink counts): no delivery report,
            // and no wake-up of the polling thread, per record taken.
            .set("delivery.report.only.error", "true")
            .create_with_context(Reports { failed })
            .map_err(super::without_secrets)?;
        let producer = Arc::new(producer);
        let stop = super::spawn_poller(producer.clone(), "fanout-sink")?;
        Ok(Self {
            inner: Arc::new(Shared { producer, stop }),
        })
    }

    /// Queues one record without waiting; an error (the queue is full) means it was dropped.
    pub fn produce(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), KafkaError> {
        let record = BaseRecord::to(topic).key(key).payload(payload);
        self.inner.producer.send(record).map_err(|(e, _)| e)
    }

    /// Waits for records still in flight (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.producer.flush(timeout);
    }
}
