//! The presence topic (`kafka.presence_topic`, DESIGN §6): one JSON record per connect and
//! disconnect, keyed by user id, handed to librdkafka without waiting (the never-waiting
//! [`Sink`] shared with receipts). When its queue is full the event is dropped and counted
//! (`fanout_presence_events_total{result="dropped"}`), as is one the brokers never took
//! (`result="failed"`): a session never waits for Kafka.

use serde::Serialize;

use super::ConnInfo;
use crate::envelope::Platform;
use crate::kafka::Sink;
use crate::metrics::{Metrics, PresenceEvent};

/// A record of the presence topic.
#[derive(Debug, Serialize)]
pub(super) struct Event<'a> {
    pub event: &'static str,
    pub user: &'a str,
    pub conn: &'a str,
    pub node: &'a str,
    pub platform: Option<Platform>,
    pub tab: Option<&'a str>,
    /// When it happened, ms since the epoch.
    pub ts: i64,
    /// The close code, on disconnects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
}

impl<'a> Event<'a> {
    pub fn connect(info: &'a ConnInfo, ts: i64) -> Self {
        Self {
            event: "connect",
            user: &info.user,
            conn: &info.conn,
            node: &info.node,
            platform: info.platform,
            tab: info.tab.as_deref(),
            ts,
            code: None,
        }
    }

    pub fn disconnect(info: &'a ConnInfo, code: u16, ts: i64) -> Self {
        Self {
            event: "disconnect",
            code: Some(code),
            ..Self::connect(info, ts)
        }
    }
}

/// Produces presence events to one topic.
pub(super) struct Events {
    sink: Sink,
    topic: String,
}

impl Events {
    pub fn new(sink: Sink, topic: String) -> Self {
        Self { sink, topic }
    }

    pub fn connect(&self, info: &ConnInfo, ts: i64, metrics: &Metrics) {
        self.produce(&Event::connect(info, ts), metrics);
    }

    pub fn disconnect(&self, info: &ConnInfo, code: u16, ts: i64, metrics: &Metrics) {
        self.produce(&Event::disconnect(info, code, ts), metrics);
    }

    fn produce(&self, event: &Event<'_>, metrics: &Metrics) {
        let payload = serde_json::to_vec(event).expect("an event serializes");
        let result = match self.sink.produce(&self.topic, event.user, &payload) {
            Ok(()) => PresenceEvent::Produced,
            Err(e) => {
                tracing::debug!(error = %e, user = event.user, "presence event dropped");
                PresenceEvent::Dropped
            }
        };
        metrics
            .presence_events
            .with_label_values(&[result.label()])
            .inc();
    }
}
