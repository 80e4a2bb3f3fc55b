//! The embedded default's parts (DESIGN §7): librdkafka's mock cluster as the in-process
//! broker, its consumer's shorter fetch wait, and the banner that tells a new user where
//! to look.

use std::borrow::Cow;
use std::io::Write as _;

use anyhow::Context as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::Listeners;
use crate::config::{KafkaConfig, Settings};

/// Partitions of each topic in the embedded in-process broker.
const EMBEDDED_PARTITIONS: i32 = 4;

/// `fetch.wait.max.ms` of the consumer of the in-process broker (librdkafka's default: 500).
/// librdkafka's mock broker answers a fetch that finds no records only after the fetch's
/// whole `MaxWaitTime`, and a record produced meanwhile does not cut that short
/// (`rdkafka_mock_handlers.c`, Fetch: "This isn't strictly correct since we should cut the
/// wait short"): the record waits for the end of the fetch in flight, up to 500 ms. 20 ms
/// keeps a single message's publish → receive under 50 ms for ~50 empty fetches a second
/// while idle (`scripts/bench embedded`, docs/benchmarks.md "Embedded default").
const EMBEDDED_FETCH_WAIT_MS: &str = "20";

/// The in-process broker of the embedded default; lives as long as the app.
pub(super) struct EmbeddedKafka {
    _cluster: MockCluster<'static, DefaultProducerContext>,
}

pub(super) fn start_embedded_kafka(settings: &mut Settings) -> anyhow::Result<EmbeddedKafka> {
    let cluster = MockCluster::new(1).context("starting the in-process Kafka broker")?;
    let mut topics = settings.kafka.topics.clone();
    topics.extend([
        settings.kafka.upstream_topic.clone(),
        settings.kafka.dead_letter_topic.clone(),
        settings.kafka.receipts_topic.clone(),
        settings.kafka.presence_topic.clone(),
    ]);
    for topic in topics.iter().filter(|t| !t.is_empty()) {
        cluster
            .create_topic(topic, EMBEDDED_PARTITIONS, 1)
            .context("creating an embedded topic")?;
    }
    settings.kafka.brokers = cluster.bootstrap_servers();
    Ok(EmbeddedKafka { _cluster: cluster })
}

/// The consumer's `[kafka]`: on the in-process broker with `fetch.wait.max.ms`
/// [`EMBEDDED_FETCH_WAIT_MS`] unless `kafka.options` sets it. The consumer's only: in
/// `kafka.options` (which the producers get too) librdkafka would warn at every start that a
/// producer ignores this consumer property.
pub(super) fn consumer_settings(
    kafka: &KafkaConfig,
    in_process_broker: bool,
) -> Cow<'_, KafkaConfig> {
    if !in_process_broker || kafka.options.contains_key("fetch.wait.max.ms") {
        return Cow::Borrowed(kafka);
    }
    let mut kafka = kafka.clone();
    kafka.options.insert(
        "fetch.wait.max.ms".to_owned(),
        EMBEDDED_FETCH_WAIT_MS.to_owned(),
    );
    Cow::Owned(kafka)
}

/// Tells a new user how to use the embedded default.
pub(super) fn print_embedded_banner(settings: &Settings, listeners: &Listeners) {
    let public = listeners
        .public
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let admin = listeners
        .admin
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Best effort: a closed stderr must not stop the node.
    let _ = writeln!(
        std::io::stderr(),
        "\nfanout embedded default: one process, in-process Kafka broker and bus, insecure auth\n\
         \x20 Demo page   http://{public}/\n\
         \x20 WebSocket   ws://{public}/ws?user=alice\n\
         \x20 Kafka       bootstrap {} topic {}\n\
         \x20 Metrics     http://{admin}/metrics\n\
         \x20 Publish     curl -XPOST http://{public}/v1/publish -d '{{\"type\":\"robot.reply\",\"to\":{{\"user\":\"alice\"}},\"data\":{{\"text\":\"hi\"}}}}'\n",
        settings.kafka.brokers, settings.kafka.topics[0]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_in_process_brokers_consumer_waits_less() {
        let kafka = KafkaConfig::default();
        assert!(consumer_settings(&kafka, false).options.is_empty());
        assert_eq!(
            consumer_settings(&kafka, true).options["fetch.wait.max.ms"],
            EMBEDDED_FETCH_WAIT_MS
        );
        let mut own = KafkaConfig::default();
        own.options
            .insert("fetch.wait.max.ms".to_owned(), "100".to_owned());
        assert_eq!(
            consumer_settings(&own, true).options["fetch.wait.max.ms"],
            "100"
        );
    }
}
