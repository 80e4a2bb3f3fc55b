//! The bus: how every node sees every message (DESIGN §1).
//!
//! Ingest publishes each accepted record once on `<prefix>:bus`; preference changes go on
//! `<prefix>:control`. Every node subscribes to both and hands what arrives to a
//! [`BusHandler`] (the router) on one task, in order.
//!
//! Two implementations share the [`Bus`] trait: [`redis::RedisBus`] (a cluster) and
//! [`local::LocalBus`] (the embedded default: one process). Tests of the router run against
//! both.

pub mod local;
pub mod redis;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::envelope::Target;

/// The two channels of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Messages for clients: [`BusMessage`]s.
    Bus,
    /// Cluster coordination: preference changes.
    Control,
}

impl Channel {
    /// The metric label / channel suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Bus => "bus",
            Channel::Control => "control",
        }
    }
}

/// What a subscriber hands to its handler.
#[derive(Debug)]
pub enum BusEvent {
    /// A payload published on a channel.
    Message { channel: Channel, payload: Bytes },
    /// The subscription was interrupted (connection lost, or the receiver lagged): messages
    /// published meanwhile may never arrive.
    Gap { reason: &'static str },
}

/// Receives bus events, in publish order, on the subscriber's task. Must not block.
pub trait BusHandler: Send {
    fn on_event(&mut self, event: BusEvent);
}

/// Why a publish did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("the bus is closed")]
    Closed,
}

/// A pub/sub bus shared by every node of a cluster.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes one payload; `Ok` means the bus accepted it for every subscriber.
    async fn publish(&self, channel: Channel, payload: Bytes) -> Result<(), BusError>;

    /// Receives from both channels until `shutdown`, handing every event to `handler`.
    /// Reconnects by itself; an interruption is reported as [`BusEvent::Gap`].
    async fn subscribe(
        &self,
        handler: Box<dyn BusHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError>;

    /// True while publishing can succeed (for `/readyz`).
    fn is_connected(&self) -> bool;
}

/// Routing facts of a message, written before its frame on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The `msg.id` (unique, stable across Kafka redeliveries).
    pub id: String,
    #[serde(rename = "type")]
    pub msg_type: String,
    pub to: Target,
    /// Kafka record timestamp, ms since the epoch.
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// One message on `<prefix>:bus`: a JSON header line, `\n`, then the client frame
/// exactly as it is sent to sockets. The router reads the header and shares the frame
/// bytes with every recipient without copying them.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub header: Header,
    pub frame: Utf8Bytes,
}

/// A bus payload that is not a [`BusMessage`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("no header line")]
    NoHeader,
    #[error("bad header: {0}")]
    Header(#[from] serde_json::Error),
    #[error("frame is not UTF-8")]
    NotUtf8,
}

impl BusMessage {
    /// Serializes for publishing.
    pub fn encode(&self) -> Bytes {
        let header = serde_json::to_vec(&self.header).expect("header serializes");
        let mut out = BytesMut::with_capacity(header.len() + 1 + self.frame.len());
        out.put_slice(&header);
        out.put_u8(b'\n');
        out.put_slice(self.frame.as_bytes());
        out.freeze()
    }

    /// Parses a payload; the frame shares `payload`'s memory.
    pub fn decode(payload: Bytes) -> Result<Self, DecodeError> {
        let split = payload
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(DecodeError::NoHeader)?;
        let header: Header = serde_json::from_slice(&payload[..split])?;
        let frame =
            Utf8Bytes::try_from(payload.slice(split + 1..)).map_err(|_| DecodeError::NotUtf8)?;
        Ok(Self { header, frame })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_message_round_trips_and_shares_the_frame() {
        let msg = BusMessage {
            header: Header {
                id: "m-1".into(),
                msg_type: "robot.reply".into(),
                to: Target::Users(vec!["a".into(), "b\nc".into()]),
                ts: 42,
                ttl_ms: Some(1000),
            },
            frame: Utf8Bytes::from(r#"{"t":"msg","data":"line\nbreak"}"#),
        };
        let wire = msg.encode();
        let back = BusMessage::decode(wire.clone()).unwrap();
        assert_eq!(back.header, msg.header);
        assert_eq!(back.frame, msg.frame);
        assert_eq!(
            back.frame.as_bytes().as_ptr(),
            wire[wire.len() - msg.frame.len()..].as_ptr()
        );
    }

    #[test]
    fn garbage_payloads_are_errors() {
        assert!(matches!(
            BusMessage::decode(Bytes::from_static(b"no newline")),
            Err(DecodeError::NoHeader)
        ));
        assert!(matches!(
            BusMessage::decode(Bytes::from_static(b"{}\n{}")),
            Err(DecodeError::Header(_))
        ));
        let bad = Bytes::from_static(
            b"{\"id\":\"1\",\"type\":\"x\",\"to\":{\"all\":true},\"ts\":1}\n\xff",
        );
        assert!(matches!(BusMessage::decode(bad), Err(DecodeError::NotUtf8)));
    }
}
