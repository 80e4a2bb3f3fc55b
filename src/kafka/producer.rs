//! A producer whose `send` resolves once the broker acknowledged the record.
//!
//! Built on librdkafka's delivery reports, served by one polling thread per producer. Not
//! rdkafka's `FutureProducer`: its polling thread waits in 100 ms rounds whose remaining
//! time is rounded down to whole milliseconds, so the last fraction of every round is spent
//! polling with a zero timeout, in a loop — ~9 CPU-ms a second on an idle node (seen with
//! `strace`; `scripts/bench embedded` measures idle CPU). This thread waits in 1 s rounds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

use super::client_config;
use crate::config::KafkaConfig;

/// librdkafka's `message.timeout.ms`: a record not acknowledged by then fails...
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// ...and `send` gives up a little later, should no report come at all.
const SEND_TIMEOUT: Duration = Duration::from_secs(12);

/// A cheap-to-clone handle; the polling thread stops when the last clone is dropped.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Shared>,
}

struct Shared {
    producer: Arc<BaseProducer<Deliveries>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Completes each record's channel from its delivery report.
struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, done: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(e.clone()),
        };
        let _ = done.send(outcome);
    }
}

impl Producer {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, KafkaError> {
        let producer: BaseProducer<Deliveries> = client_config(cfg)
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set(
                "message.timeout.ms",
                MESSAGE_TIMEOUT.as_millis().to_string(),
            )
            .set("linger.ms", "1")
            .create_with_context(Deliveries)
            .map_err(super::without_secrets)?;
        let producer = Arc::new(producer);
        let stop = super::spawn_poller(producer.clone(), "fanout-producer")?;
        Ok(Self {
            inner: Arc::new(Shared { producer, stop }),
        })
    }

    /// Produces one record and waits for its acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), KafkaError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(Header {
                key: name,
                value: Some(*value),
            });
        }
        let (done, acked) = oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(done))
            .payload(payload)
            .headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.inner.producer.send(record).map_err(|(e, _)| e)?;
        match tokio::time::timeout(SEND_TIMEOUT, acked).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(KafkaError::Canceled),
            Err(_) => Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            )),
        }
    }

    /// True if the cluster answers a metadata request for `topic` within `timeout`.
    /// Blocks: call it from `spawn_blocking`.
    pub fn probe(&self, topic: &str, timeout: Duration) -> bool {
        self.inner
            .producer
            .client()
            .fetch_metadata(Some(topic), timeout)
            .is_ok()
    }

    /// Waits for records still in flight (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.producer.flush(timeout);
    }
}
