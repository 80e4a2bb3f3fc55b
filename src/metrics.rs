//! Every Prometheus metric of a node, registered once in its own [`Registry`] (so several
//! nodes can run in one test process). Fields are typed handles: a call site is one line.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::envelope::Reject;

mod labels;
pub use labels::*;

/// Buckets of the stage histograms: fine enough to read sub-millisecond quantiles.
const STAGE_BUCKETS: [f64; 31] = [
    0.000_05, 0.000_1, 0.000_2, 0.000_3, 0.000_5, 0.000_75, 0.001, 0.001_5, 0.002, 0.003, 0.004,
    0.005, 0.007_5, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.35, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0,
];

/// The `reason` of `fanout_ingest_rejected_total` for an offset skipped because the consumer
/// cannot decode its batch (the other reasons are [`Reject::ALL`]).
pub const REJECTED_UNDECODABLE: &str = "undecodable";

/// The `channel` label of `fanout_bus_published_total` / `fanout_bus_received_total`: the
/// bus's channel names (`bus::Channel::as_str`; this module cannot name `bus`, which
/// depends on it).
const BUS_CHANNELS: [&str; 3] = ["bus", "control", "node"];

/// The metrics of one node.
pub struct Metrics {
    pub registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Distinct users with at least one open connection.
    pub users: IntGauge,
    /// WebSocket connections accepted since start.
    pub connections_opened: IntCounter,
    /// Connections closed, by close code.
    pub connections_closed: IntCounterVec,
    /// Upgrades refused before the handshake, by HTTP status.
    pub upgrades_refused: IntCounterVec,
    /// Kafka records consumed.
    pub ingest_records: IntCounter,
    /// Kafka records rejected, by reason.
    pub ingest_rejected: IntCounterVec,
    /// Rejected records copied to the dead-letter topic.
    pub ingest_dead_lettered: IntCounter,
    /// Errors the Kafka consumer reported instead of a record, by kind (`undecodable`:
    /// a batch it could not decompress or parse; `broker`: links to the brokers; `other`).
    pub kafka_consumer_errors: IntCounterVec,
    /// Partitions this node currently owns.
    pub kafka_partitions: IntGauge,
    /// Payloads published on the bus, by channel.
    pub bus_published: IntCounterVec,
    /// Failed publish attempts (ingest retries them).
    pub bus_publish_errors: IntCounter,
    /// Payloads received from the bus, by channel.
    pub bus_received: IntCounterVec,
    /// Interruptions of the bus subscription, by reason (`reconnected`, `lagged`).
    pub bus_gaps: IntCounterVec,
    /// Bus payloads that could not be decoded.
    pub bus_bad_payloads: IntCounter,
    /// Frames queued to client connections, by message type.
    pub delivered: IntCounterVec,
    /// Frames queued to connections, all types together.
    pub deliveries: IntCounter,
    /// Deliveries skipped because the user switched the type off, by message type.
    pub filtered: IntCounterVec,
    /// Users whose preferences this node holds (one entry per connected user).
    pub prefs_cache_users: IntGauge,
    /// Time from a preference change's commit to its application on this node.
    pub prefs_change_latency: Histogram,
    /// Deliveries not made, by reason (`queue_full`, `expired`, `duplicate`, `closed`).
    pub dropped: IntCounterVec,
    /// Time from the Kafka record timestamp to the frame written to the socket.
    pub delivery_latency: Histogram,
    /// `fanout_stage_latency_seconds{stage="kafka"}`: Kafka record timestamp → ingest.
    pub stage_kafka: Histogram,
    /// `{stage="bus"}`: ingest → the router of a node (the publish script, Redis pub/sub).
    pub stage_bus: Histogram,
    /// `{stage="send"}`: routed into a connection's queue → written to its socket.
    pub stage_send: Histogram,
    /// Message ids acknowledged by clients.
    pub acked: IntCounter,
    /// Client `ask` frames, by result (`ok`, `error`, `disabled`).
    pub asks: IntCounterVec,
    /// Receipt records produced to `kafka.receipts_topic`, by outcome.
    pub receipts: IntCounterVec,
    /// Receipts not produced, by reason.
    pub receipts_dropped: IntCounterVec,
    /// Client frames answered with `error`, by code.
    pub client_errors: IntCounterVec,
    /// Records the bus already had (Kafka redeliveries), not published again.
    pub ingest_duplicates: IntCounter,
    /// Connections that asked to resume with `since`, by result.
    pub resumes: IntCounterVec,
    /// Messages replayed to resuming connections.
    pub replayed: IntCounter,
    /// Bus gaps this node recovered from, by result (`recovered`, `lost`: some users told).
    pub gap_recoveries: IntCounterVec,
    /// Missed messages routed from the history after a gap.
    pub recovered_messages: IntCounter,
    /// Connections open on a port that are not WebSocket sessions (HTTP requests, kept-alive
    /// connections, upgrades under way), by listener (`public`, `admin`).
    pub http_pending: IntGaugeVec,
    /// Such connections closed to make room for a new one, by listener.
    pub http_evicted: IntCounterVec,
    /// `POST /v1/users/{user}/disconnect` requests this node carried out, by `revoke`.
    pub kicks: IntCounterVec,
    /// Connections this node asked to close for a kick (4004) or a revocation (4003).
    pub kicked_connections: IntCounterVec,
    /// Users whose tokens issued before some time this node refuses.
    pub revocations: IntGauge,
    /// Tokens refused because their user's tokens were revoked (`/ws` and the HTTP API).
    pub revoked_refused: IntCounter,
    /// Re-reads of `fanout_revocations` (periodic and after a bus gap), by result.
    pub revocation_reloads: IntCounterVec,
    /// Connections this node lists in the cluster's presence (its live connections).
    pub presence_connections: IntGauge,
    /// Presence topic events, by result (`produced`, `dropped`).
    pub presence_events: IntCounterVec,
    /// Connections of dead nodes (or of this node's previous run) this node removed from
    /// presence and reported disconnected.
    pub presence_swept: IntCounter,
    /// Times this node wrote all its presence entries again (after a Redis reconnect, a
    /// failed write, or being taken for dead).
    pub presence_resyncs: IntCounter,
    /// Failed presence writes, heartbeats and sweeps (retried).
    pub presence_write_errors: IntCounter,
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    /// Registers every metric family; labelled families known in advance start at zero.
    pub fn new() -> Self {
        let r = Registry::new();
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "fanout_delivery_latency_seconds",
                "Kafka record timestamp to frame written on the socket",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(latency.clone()))
            .expect("metric registered once");
        let stages = HistogramVec::new(
            HistogramOpts::new(
                "fanout_stage_latency_seconds",
                "Time in each stage on the way to a client: kafka (record timestamp to ingest, \
                 ms resolution), bus (ingest to a node's router), send (queued to written)",
            )
            .buckets(STAGE_BUCKETS.to_vec()),
            &["stage"],
        )
        .expect("valid metric");
        r.register(Box::new(stages.clone()))
            .expect("metric registered once");
        let prefs_latency = Histogram::with_opts(
            HistogramOpts::new(
                "fanout_prefs_change_latency_seconds",
                "Preference change commit to applied on this node",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(prefs_latency.clone()))
            .expect("metric registered once");
        let m = Self {
            connections: gauge(&r, "fanout_connections", "Open WebSocket connections"),
            users: gauge(
                &r,
                "fanout_users",
                "Users with at least one open connection",
            ),
            connections_opened: counter(
                &r,
                "fanout_connections_opened_total",
                "WebSocket connections accepted",
            ),
            connections_closed: counter_vec(
                &r,
                "fanout_connections_closed_total",
                "Connections closed, by close code",
                "code",
            ),
            upgrades_refused: counter_vec(
                &r,
                "fanout_upgrades_refused_total",
                "Upgrades refused before the handshake, by HTTP status",
                "status",
            ),
            ingest_records: counter(&r, "fanout_ingest_records_total", "Kafka records consumed"),
            ingest_rejected: counter_vec(
                &r,
                "fanout_ingest_rejected_total",
                "Kafka records rejected, by reason",
                "reason",
            ),
            ingest_dead_lettered: counter(
                &r,
                "fanout_ingest_dead_lettered_total",
                "Rejected records copied to the dead-letter topic",
            ),
            kafka_consumer_errors: counter_vec(
                &r,
                "fanout_kafka_consumer_errors_total",
                "Errors the Kafka consumer reported instead of a record, by kind",
                "kind",
            ),
            kafka_partitions: gauge(
                &r,
                "fanout_kafka_assigned_partitions",
                "Partitions owned by this node",
            ),
            bus_published: counter_vec(
                &r,
                "fanout_bus_published_total",
                "Payloads published on the bus",
                "channel",
            ),
            bus_publish_errors: counter(
                &r,
                "fanout_bus_publish_errors_total",
                "Failed bus publish attempts",
            ),
            bus_received: counter_vec(
                &r,
                "fanout_bus_received_total",
                "Payloads received from the bus",
                "channel",
            ),
            bus_gaps: counter_vec(
                &r,
                "fanout_bus_gaps_total",
                "Bus subscription interruptions",
                "reason",
            ),
            bus_bad_payloads: counter(
                &r,
                "fanout_bus_bad_payloads_total",
                "Bus payloads that could not be decoded",
            ),
            delivered: counter_vec(
                &r,
                "fanout_delivered_total",
                "Frames queued to connections, by message type",
                "type",
            ),
            deliveries: counter(
                &r,
                "fanout_deliveries_total",
                "Frames queued to connections",
            ),
            filtered: counter_vec(
                &r,
                "fanout_filtered_total",
                "Deliveries skipped by user preference, by type",
                "type",
            ),
            prefs_cache_users: gauge(
                &r,
                "fanout_prefs_cache_users",
                "Users whose preferences this node caches",
            ),
            prefs_change_latency: prefs_latency,
            dropped: counter_vec(
                &r,
                "fanout_dropped_total",
                "Deliveries not made, by reason",
                "reason",
            ),
            delivery_latency: latency,
            acked: counter(
                &r,
                "fanout_acked_total",
                "Message ids acknowledged by clients",
            ),
            asks: counter_vec(
                &r,
                "fanout_asks_total",
                "Client ask frames, by result",
                "result",
            ),
            receipts: counter_vec(
                &r,
                "fanout_receipts_total",
                "Receipt records produced to kafka.receipts_topic, by outcome",
                "outcome",
            ),
            receipts_dropped: counter_vec(
                &r,
                "fanout_receipts_dropped_total",
                "Receipts not produced, by reason",
                "reason",
            ),
            client_errors: counter_vec(
                &r,
                "fanout_client_errors_total",
                "Client frames answered with error, by code",
                "code",
            ),
            stage_kafka: stages.with_label_values(&["kafka"]),
            stage_bus: stages.with_label_values(&["bus"]),
            stage_send: stages.with_label_values(&["send"]),
            ingest_duplicates: counter(
                &r,
                "fanout_ingest_duplicates_total",
                "Records already on the bus (Kafka redeliveries), not published again",
            ),
            resumes: counter_vec(
                &r,
                "fanout_resumes_total",
                "Connections resuming with since, by result",
                "result",
            ),
            replayed: counter(
                &r,
                "fanout_replayed_total",
                "Messages replayed to resuming connections",
            ),
            gap_recoveries: counter_vec(
                &r,
                "fanout_gap_recoveries_total",
                "Bus gaps recovered from the history, by result",
                "result",
            ),
            recovered_messages: counter(
                &r,
                "fanout_recovered_messages_total",
                "Missed messages routed from the history after a bus gap",
            ),
            http_pending: gauge_vec(
                &r,
                "fanout_http_pending_connections",
                "Open connections that are not WebSocket sessions, by listener",
                "listener",
            ),
            http_evicted: counter_vec(
                &r,
                "fanout_http_connections_evicted_total",
                "Connections that were not sessions, closed to make room for a new one",
                "listener",
            ),
            kicks: counter_vec(
                &r,
                "fanout_kicks_total",
                "Disconnect requests carried out by this node, by revoke",
                "revoke",
            ),
            kicked_connections: counter_vec(
                &r,
                "fanout_kicked_connections_total",
                "Connections asked to close for a kick (4004) or a revocation (4003)",
                "code",
            ),
            revocations: gauge(
                &r,
                "fanout_revocations",
                "Users whose tokens issued before some time this node refuses",
            ),
            revoked_refused: counter(
                &r,
                "fanout_revoked_tokens_refused_total",
                "Tokens refused because their user's tokens were revoked",
            ),
            revocation_reloads: counter_vec(
                &r,
                "fanout_revocation_reloads_total",
                "Re-reads of the revocation list from the database, by result",
                "result",
            ),
            presence_connections: gauge(
                &r,
                "fanout_presence_connections",
                "Connections this node lists in the cluster's presence",
            ),
            presence_events: counter_vec(
                &r,
                "fanout_presence_events_total",
                "Presence topic events, by result",
                "result",
            ),
            presence_swept: counter(
                &r,
                "fanout_presence_swept_total",
                "Connections of dead nodes removed from presence and reported disconnected",
            ),
            presence_resyncs: counter(
                &r,
                "fanout_presence_resyncs_total",
                "Times this node wrote all its presence entries again",
            ),
            presence_write_errors: counter(
                &r,
                "fanout_presence_write_errors_total",
                "Failed presence writes, heartbeats and sweeps (retried)",
            ),
            registry: r,
        };
        for listener in Listener::ALL {
            m.http_pending.with_label_values(&[listener.label()]);
            m.http_evicted.with_label_values(&[listener.label()]);
        }
        for reason in Reject::ALL.into_iter().chain([REJECTED_UNDECODABLE]) {
            m.ingest_rejected.with_label_values(&[reason]);
        }
        for kind in ConsumerError::ALL {
            m.kafka_consumer_errors.with_label_values(&[kind.label()]);
        }
        for reason in Dropped::ALL {
            m.dropped.with_label_values(&[reason.label()]);
        }
        for channel in BUS_CHANNELS {
            m.bus_published.with_label_values(&[channel]);
            m.bus_received.with_label_values(&[channel]);
        }
        for reason in Gap::ALL {
            m.bus_gaps.with_label_values(&[reason.label()]);
        }
        for result in Resume::ALL {
            m.resumes.with_label_values(&[result.label()]);
        }
        for outcome in Receipt::ALL {
            m.receipts.with_label_values(&[outcome.label()]);
        }
        for reason in ReceiptDropped::ALL {
            m.receipts_dropped.with_label_values(&[reason.label()]);
        }
        for result in GapRecovery::ALL {
            m.gap_recoveries.with_label_values(&[result.label()]);
        }
        for kind in KickKind::ALL {
            m.kicks.with_label_values(&[kind.label()]);
        }
        for close in KickClose::ALL {
            m.kicked_connections.with_label_values(&[close.label()]);
        }
        for result in Reload::ALL {
            m.revocation_reloads.with_label_values(&[result.label()]);
        }
        for result in PresenceEvent::ALL {
            m.presence_events.with_label_values(&[result.label()]);
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
