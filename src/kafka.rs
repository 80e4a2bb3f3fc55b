//! Kafka clients shared by ingest, `ask` and the HTTP publish API: the common librdkafka
//! configuration and a producer that waits for the broker's acknowledgement.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;

/// librdkafka properties common to every client: brokers, then `kafka.options`.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (key, value) in &cfg.options {
        c.set(key, value);
    }
    c
}

/// A producer whose `send` resolves once the broker acknowledged the record.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, KafkaError> {
        let inner = client_config(cfg)
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("message.timeout.ms", "10000")
            .set("linger.ms", "1")
            .create()?;
        Ok(Self { inner })
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
        let mut record = FutureRecord::to(topic).payload(payload).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.inner
            .send(record, Timeout::After(Duration::from_secs(10)))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    /// True if the cluster answers a metadata request for `topic` within `timeout`.
    /// Blocks: call it from `spawn_blocking`.
    pub fn probe(&self, topic: &str, timeout: Duration) -> bool {
        self.inner
            .client()
            .fetch_metadata(Some(topic), timeout)
            .is_ok()
    }

    /// Waits for records still in flight (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.flush(timeout);
    }
}
