//! The bus: how every node sees every message (DESIGN §1), and the short history that
//! makes resume and gap recovery possible (DESIGN §6).
//!
//! Ingest publishes each accepted record once with [`Bus::publish_messages`] (all the records
//! it has at hand in one call, in order). In one atomic step per message the bus gives it
//! the next **sequence number** of the cluster, appends it to the
//! history stream of each user it targets (the group's stream for `to.group`, the broadcast
//! stream for `to.all`; a `collapse` key replaces that key's earlier entry in each), and
//! publishes it on `<prefix>:bus`. So the history and the live bus have one order, and a
//! record Kafka delivers twice (same id) is published once. The history keeps a message's
//! payload once, however many streams it is in: a stream entry costs a few bytes, so a
//! message to many users costs its payload plus a small entry per user. Preference changes go on
//! `<prefix>:control` with plain [`Bus::publish`]. Every node subscribes to both.
//!
//! Routed mode (`bus.routing = "routed"`, the Redis bus only): a message for users goes,
//! instead of `<prefix>:bus`, to `<prefix>:node:<node id>` of each node that presence says
//! holds a connection of one of them; every node also subscribes to its own node channel.
//! The message keeps its cluster-wide sequence number (history and resume are unchanged),
//! and each published frame also carries the number of its channel's own counter
//! ([`payload_channel_seq`]): a node receives only some of the cluster's numbers, so it
//! detects a gap per channel instead ([`Positions`]).
//!
//! Invariants:
//! * Sequence numbers increase by one per published message: a subscriber that sees a jump
//!   missed messages, and reads them back with [`Bus::read_history`].
//! * A history stream keeps its newest `recovery.max_messages` entries for
//!   `recovery.window` after its last write; a read says whether anything after the asked
//!   position was trimmed, so a replay is either exact or known to be incomplete.
//!
//! Two implementations share the [`Bus`] trait: [`redis::RedisBus`] (a cluster) and
//! [`local::LocalBus`] (the embedded default: one process). The same contract tests run
//! against both.

pub mod history;
pub mod local;
pub mod redis;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
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
    /// Routed mode: messages for the users connected to this node ([`BusMessage`]s).
    Node,
}

impl Channel {
    /// The metric label / channel suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Bus => "bus",
            Channel::Control => "control",
            Channel::Node => "node",
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

/// Hands events to another task through a bounded channel. When the channel is full the
/// event is dropped and a [`BusEvent::Gap`] is sent as soon as there is room again: the
/// receiver then recovers what it missed from the history.
pub struct EventSender {
    tx: mpsc::Sender<BusEvent>,
    lagged: bool,
}

impl EventSender {
    pub fn new(tx: mpsc::Sender<BusEvent>) -> Self {
        Self { tx, lagged: false }
    }
}

impl BusHandler for EventSender {
    fn on_event(&mut self, event: BusEvent) {
        if self.lagged {
            if self
                .tx
                .try_send(BusEvent::Gap { reason: "lagged" })
                .is_err()
            {
                return;
            }
            self.lagged = false;
        }
        if self.tx.try_send(event).is_err() {
            self.lagged = true;
        }
    }
}

/// Why a bus operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// `redis.url` or a `redis.tls_*` file cannot be used.
    #[error("{0}")]
    Config(String),
    #[error("the bus is closed")]
    Closed,
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
}

/// A history stream: one user's, one group's (`to.group`), or the broadcast stream of
/// `to.all` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKey<'a> {
    All,
    User(&'a str),
    Group(&'a str),
}

/// Where a history read starts (exclusive).
#[derive(Debug, Clone, Copy)]
pub enum After<'a> {
    /// After the message with this id (a client's `since`).
    Id(&'a str),
    /// After this sequence number.
    Seq(u64),
}

/// The outcome of publishing one message ([`Bus::publish_messages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message's sequence number.
    pub seq: u64,
    /// The id was published before (within `recovery.window`): nothing was published now.
    pub duplicate: bool,
}

/// One stream's part of a history read.
#[derive(Debug, Clone, Default)]
pub struct StreamRead {
    /// False when entries after the asked position were trimmed (or expired).
    pub complete: bool,
    /// Payloads (as on the bus) with a sequence number after the asked position, in order.
    pub entries: Vec<Bytes>,
}

/// Routed mode: how many frames each channel a node reads messages from had carried when a
/// history read ran (each channel's own counter, [`payload_channel_seq`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Positions {
    /// `<prefix>:bus`: broadcasts, groups, `to.conn`.
    pub bus: u64,
    /// This node's `<prefix>:node:<node id>`.
    pub node: u64,
}

/// The result of [`Bus::read_history`].
#[derive(Debug, Clone, Default)]
pub struct HistoryRead {
    /// The sequence number the read started after; `None` when [`After::Id`] named an id
    /// the bus does not know (never published, or older than `recovery.window`).
    pub after: Option<u64>,
    /// The last sequence number given out when the read ran: every message up to it that
    /// belongs to the streams read is in `streams` (or reported trimmed).
    pub head: u64,
    /// The first sequence number of the bus's current epoch (1 on a bus that never lost
    /// its line; 0 when the bus has no epochs). Numbers before it were given out by a
    /// server this one may not have every message of (an old primary, a crashed Redis):
    /// a position before it cannot be continued exactly.
    pub epoch_start: u64,
    /// One per requested stream, in the order asked.
    pub streams: Vec<StreamRead>,
    /// Routed mode: the channel counters, read in the same step as `head` (every message up
    /// to `head` for this node is within them); `None` in broadcast mode.
    pub positions: Option<Positions>,
}

/// A pub/sub bus shared by every node of a cluster, with its message history.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes one control payload; `Ok` means the bus accepted it for every subscriber.
    async fn publish(&self, channel: Channel, payload: Bytes) -> Result<(), BusError>;

    /// Numbers, records and publishes each message on `<prefix>:bus`, in order, each
    /// atomically; one outcome per message. On an error any prefix of them may have been
    /// published: publishing them all again publishes only the rest (ids are remembered).
    async fn publish_messages(&self, msgs: &[Outgoing]) -> Result<Vec<Published>, BusError>;

    /// [`publish_messages`](Self::publish_messages) for one message.
    async fn publish_message(&self, msg: &Outgoing) -> Result<Published, BusError> {
        let published = self.publish_messages(std::slice::from_ref(msg)).await?;
        published
            .first()
            .copied()
            .ok_or_else(|| BusError::Reply("no outcome for the message".into()))
    }

    /// Reads `streams` after a position (at most `recovery.max_messages` entries each).
    async fn read_history(
        &self,
        after: After<'_>,
        streams: &[StreamKey<'_>],
    ) -> Result<HistoryRead, BusError>;

    /// Receives from both channels until `shutdown`, handing every event to `handler`.
    /// Reconnects by itself; an interruption is reported as [`BusEvent::Gap`].
    async fn subscribe(
        &self,
        handler: Box<dyn BusHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError>;

    /// True while publishing can succeed (for `/readyz`).
    fn is_connected(&self) -> bool;

    /// True in routed mode (`bus.routing = "routed"`): messages for users arrive on
    /// [`Channel::Node`], each frame carries its channel's own number, and history reads
    /// report [`Positions`].
    fn is_routed(&self) -> bool {
        false
    }
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
    /// When ingest took the record, µs since the epoch (for the `bus` stage latency); 0 if
    /// unknown (older nodes, history written by tests).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub at_us: u64,
    /// The envelope's `collapse` key: in each history stream this message replaces the
    /// earlier one with the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Header {
    /// True if `ttl_ms` has run out at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.ttl_ms.is_some_and(|ttl| {
            now_ms
                > self
                    .ts
                    .saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))
        })
    }
}

/// A message as ingest hands it to the bus, before it has a sequence number. Its body is
/// encoded once, here: publish retries and every history stream reuse it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub header: Header,
    body: Bytes,
}

/// `<header JSON>\n<frame>`: a bus payload without its `<seq>\n` line.
fn encode_body(header: &Header, frame: &str) -> Bytes {
    let header = serde_json::to_vec(header).expect("header serializes");
    let mut out = BytesMut::with_capacity(header.len() + 1 + frame.len());
    out.put_slice(&header);
    out.put_u8(b'\n');
    out.put_slice(frame.as_bytes());
    out.freeze()
}

impl Outgoing {
    pub fn new(header: Header, frame: &str) -> Self {
        let body = encode_body(&header, frame);
        Self { header, body }
    }

    /// `<header JSON>\n<frame>`: the bus prefixes it with `<seq>\n`.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// How many history streams this message belongs to (`streams().len()`).
    pub fn stream_count(&self) -> usize {
        match &self.header.to {
            Target::User { .. } | Target::Group(_) | Target::All => 1,
            Target::Users(users) => users.len(),
            Target::Conn(_) => 0,
        }
    }

    /// The history streams this message belongs to. A `to.conn` message has none: the
    /// connection it names cannot come back.
    pub fn streams(&self) -> Vec<StreamKey<'_>> {
        match &self.header.to {
            Target::User { user, .. } => vec![StreamKey::User(user)],
            Target::Users(users) => users.iter().map(|u| StreamKey::User(u)).collect(),
            Target::Conn(_) => Vec::new(),
            Target::Group(group) => vec![StreamKey::Group(group)],
            Target::All => vec![StreamKey::All],
        }
    }
}

/// One message on `<prefix>:bus`: its sequence number, a JSON header line, then the client
/// frame exactly as it is sent to sockets, separated by `\n`. The router reads the header
/// and shares the frame bytes with every recipient without copying them.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub seq: u64,
    pub header: Header,
    pub frame: Utf8Bytes,
}

/// A bus payload that is not a [`BusMessage`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("no sequence number line")]
    NoSeq,
    #[error("no header line")]
    NoHeader,
    #[error("bad header: {0}")]
    Header(#[from] serde_json::Error),
    #[error("frame is not UTF-8")]
    NotUtf8,
}

/// `<seq>\n` followed by `body`: what the bus publishes and keeps in history.
pub fn sequenced(seq: u64, body: &[u8]) -> Bytes {
    let seq = seq.to_string();
    let mut out = BytesMut::with_capacity(seq.len() + 1 + body.len());
    out.put_slice(seq.as_bytes());
    out.put_u8(b'\n');
    out.put_slice(body);
    out.freeze()
}

/// The sequence number at the start of a payload, without decoding the rest. The first
/// line is `<seq>`, or in routed mode `<seq> <channel seq>` on the channels (the history
/// keeps `<seq>` alone).
pub fn payload_seq(payload: &[u8]) -> Option<u64> {
    let end = payload.iter().position(|b| *b == b'\n')?;
    let line = &payload[..end];
    let seq = match line.iter().position(|b| *b == b' ') {
        Some(space) => &line[..space],
        None => line,
    };
    std::str::from_utf8(seq).ok()?.parse().ok()
}

/// Routed mode: the number a frame has on its channel (the second number of its first
/// line), `None` when it has none (broadcast mode, history entries).
pub fn payload_channel_seq(payload: &[u8]) -> Option<u64> {
    let end = payload.iter().position(|b| *b == b'\n')?;
    let line = &payload[..end];
    let space = line.iter().position(|b| *b == b' ')?;
    std::str::from_utf8(&line[space + 1..]).ok()?.parse().ok()
}

impl BusMessage {
    /// Serializes as the bus publishes it.
    pub fn encode(&self) -> Bytes {
        sequenced(self.seq, &encode_body(&self.header, &self.frame))
    }

    /// Parses a payload; the frame shares `payload`'s memory.
    pub fn decode(payload: Bytes) -> Result<Self, DecodeError> {
        let seq = payload_seq(&payload).ok_or(DecodeError::NoSeq)?;
        let start = payload.iter().position(|b| *b == b'\n').expect("seq line") + 1;
        let split = payload[start..]
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(DecodeError::NoHeader)?
            + start;
        let header: Header = serde_json::from_slice(&payload[start..split])?;
        let frame =
            Utf8Bytes::try_from(payload.slice(split + 1..)).map_err(|_| DecodeError::NotUtf8)?;
        Ok(Self { seq, header, frame })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_message_round_trips_and_shares_the_frame() {
        let msg = BusMessage {
            seq: 17,
            header: Header {
                id: "m-1".into(),
                msg_type: "robot.reply".into(),
                to: Target::Users(vec!["a".into(), "b\nc".into()]),
                ts: 42,
                ttl_ms: Some(1000),
                at_us: 7,
                collapse: Some("job-1".into()),
            },
            frame: Utf8Bytes::from(r#"{"t":"msg","data":"line\nbreak"}"#),
        };
        let wire = msg.encode();
        let back = BusMessage::decode(wire.clone()).unwrap();
        assert_eq!(back.seq, 17);
        assert_eq!(back.header, msg.header);
        assert_eq!(back.frame, msg.frame);
        assert_eq!(
            back.frame.as_bytes().as_ptr(),
            wire[wire.len() - msg.frame.len()..].as_ptr()
        );
    }

    #[test]
    fn routed_frames_carry_their_channel_number_after_the_sequence_number() {
        let plain = BusMessage::decode(Bytes::from_static(
            b"41\n{\"id\":\"1\",\"type\":\"x\",\"to\":{\"all\":true},\"ts\":1}\n{}",
        ))
        .unwrap();
        assert_eq!(plain.seq, 41);
        let routed = Bytes::from_static(
            b"41 7\n{\"id\":\"1\",\"type\":\"x\",\"to\":{\"all\":true},\"ts\":1}\n{}",
        );
        assert_eq!(payload_seq(&routed), Some(41));
        assert_eq!(payload_channel_seq(&routed), Some(7));
        let msg = BusMessage::decode(routed).unwrap();
        assert_eq!((msg.seq, msg.frame.as_str()), (41, "{}"));
        assert_eq!(payload_channel_seq(b"41\n{}\n{}"), None);
        assert_eq!(payload_channel_seq(b"41 x\n{}\n{}"), None);
    }

    #[test]
    fn garbage_payloads_are_errors() {
        assert!(matches!(
            BusMessage::decode(Bytes::from_static(b"no newline")),
            Err(DecodeError::NoSeq)
        ));
        assert!(matches!(
            BusMessage::decode(Bytes::from_static(b"x\n{}\n{}")),
            Err(DecodeError::NoSeq)
        ));
        assert!(matches!(
            BusMessage::decode(Bytes::from_static(b"1\n{}")),
            Err(DecodeError::NoHeader)
        ));
        assert!(matches!(
            BusMessage::decode(Bytes::from_static(b"1\n{}\n{}")),
            Err(DecodeError::Header(_))
        ));
        let bad = Bytes::from_static(
            b"3\n{\"id\":\"1\",\"type\":\"x\",\"to\":{\"all\":true},\"ts\":1}\n\xff",
        );
        assert!(matches!(BusMessage::decode(bad), Err(DecodeError::NotUtf8)));
    }
}
