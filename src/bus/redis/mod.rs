//! The Redis bus: scripts on one client, `SUBSCRIBE` on a dedicated subscriber client.
//!
//! Keys (all under the key base: `<prefix>:`, or `{<prefix>}:` on a Redis Cluster): `seq`
//! the cluster's message counter; `m:<id>` the sequence number of a published id;
//! `b:<seq>` a message's payload exactly as published, once however many streams it
//! belongs to; `u:<user>`, `g:<group>` and `all` the history
//! streams: lists of sequence numbers, oldest first, each pointing at a `b:<seq>`;
//! `c:<stream>` (`c:u:<user>`, `c:g:<group>`, `c:all`) a stream's `collapse` keys, a hash
//! key → the number of its entry: a message with a `collapse` key removes that entry
//! (`LREM`) before it is appended, so a key holds one slot (the hash is pruned of keys
//! whose entry was trimmed when it outgrows twice the stream, and expires with it); `epoch`,
//! `<replication id> <first seq>` of the server's history line. `m:` and `b:` keys expire
//! `recovery.window` after the publish, streams that long after their last write.
//! [`PUBLISH_SCRIPT`] numbers, records and publishes in one atomic step, so history order
//! is bus order; [`READ_SCRIPT`] reads the streams after a position and says whether any of
//! it may be missing.
//!
//! A stream is a list whose first element is a marker: `0` while nothing was trimmed from
//! it, otherwise the number of an entry trimmed away (or `x`: the list was started again
//! over stale or unreadable contents, see below). Then come at most `recovery.max_messages`
//! sequence numbers. Trimming removes the oldest, so nothing after a position is gone if
//! the marker is `0`, the marker (the newest number trimmed) is at or before it, or the
//! first number left is at or before it; a `b:` key that has
//! expired (or was evicted) is a missing entry too. A message to many users therefore costs
//! Redis its payload once plus a few bytes per user (a list entry, or a small list for a
//! user with no history yet), not the payload per user.
//!
//! One script call appends to at most [`STREAMS_PER_CALL`] streams, so that it stays short:
//! a batch is split at message boundaries, and a message to more users is written over
//! several calls ([`CHUNK_SCRIPT`]). Until its last call publishes it, `pending` names it:
//! reads take the number before it as the head (so nobody reads it half written; it comes
//! live), other publishers of the cluster wait, and a publisher that stops for longer than
//! its `lease` has the message aborted by the next one (its Kafka record was not committed
//! and is published again under a new number).
//!
//! Epochs: Redis replicates asynchronously, so a replica promoted by Sentinel (or a server
//! restarted from its append-only file) may lack the last messages the old primary
//! numbered, and then gives the same numbers to other messages. Both change the server's
//! replication id. Each script first compares it with `epoch`; on a change it starts a new
//! epoch at the next number. A position before the epoch's first number cannot be
//! continued exactly: resumes across it are not recovered, and nodes tell their
//! connections they may have lost messages ([`HistoryRead::epoch_start`]).
//!
//! Redis Cluster: every key and channel of the bus (and of presence, which takes the same key
//! base from [`RedisBus::key_base`]) carries the hash tag `{<prefix>}`, so one script call
//! can touch every stream of a batch, `b:<seq>` keys it builds itself, and the channels it
//! publishes to: the whole bus lives on the shard that serves that slot. Pub/sub is sharded
//! (`SPUBLISH` / `SSUBSCRIBE`): a message goes to that shard's nodes only, not over the
//! cluster bus to every node, and bus and control messages, two channels of one slot, reach
//! a subscriber in the order they were published, on one connection. The epoch rule covers a
//! failover of that shard like one under Sentinel. One server or Sentinel keeps the untagged
//! `<prefix>:` and classic `PUBLISH` / `SUBSCRIBE`, so an existing deployment keeps its keys.
//!
//! Routed mode (`bus.routing = "routed"`, [`BusRouting::Routed`]): the publish script reads,
//! for a message to users, each user's presence hash (`<prefix>:presence:u:<user>`, written
//! by [`crate::presence`] under the same key base) and publishes the message once on
//! `node:<node id>` of each node found there, after `INCR nseq:<node id>` (which expires a
//! day after its last message); other messages go on `bus` after `INCR bseq`. Each frame's
//! first line is `<seq> <channel counter>`; the history keeps `<seq>` alone. A message
//! written over several calls goes on `bus` (to this many users, most nodes hold one).
//! History reads also return both counters of the reading node, read with the head
//! ([`super::Positions`]). Every key is still under the key base: one slot on a cluster.
//!
//! The receiving side, one dedicated client on the bus, control and node channels, is
//! [`subscriber`].
//! Key and channel names are built in `keys.rs`, publishing is in `publish.rs`, history
//! reads in `read.rs`, the Lua in `scripts.rs`, connecting in `connect.rs`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::scripts::Script;
use tokio_util::sync::CancellationToken;

use super::{
    After, Bus, BusError, BusHandler, Channel, HistoryRead, Outgoing, Published, StreamKey,
};
use crate::config::{RecoveryConfig, RedisConfig};
use crate::envelope::Target;
use crate::metrics::Metrics;

mod connect;
mod keys;
mod publish;
mod read;
mod scripts;
mod subscriber;

pub use keys::key_base;
use keys::routed_names;
pub use scripts::flags;

use scripts::{
    BROADCAST_LUA, CHUNK_SCRIPT, EPOCH_LUA, PUBLISH_LUA, PUBLISH_SCRIPT, READ_SCRIPT, ROUTED_LUA,
};

/// Most history streams one publish script call appends to, so that one call stays short
/// (~8 ms at 1,024 users new to the history, on the 2-core test machine): a batch is split
/// into calls at message boundaries, and a message to more users is written over several
/// [`CHUNK_SCRIPT`] calls.
const STREAMS_PER_CALL: usize = 1024;

/// How long a publisher may stop between the calls of one message before the next
/// publisher aborts it (ms).
const LEASE_MS: u64 = 5_000;

/// How long a publish waits for another publisher's split message before it fails.
const BUSY_WAIT: Duration = Duration::from_millis(2 * LEASE_MS);

/// Capacity of fred's pub/sub broadcast channel (messages buffered before lag).
const BROADCAST_CAPACITY: usize = 1 << 16;

/// How long a node channel's counter outlives its last message: a node id that stopped
/// being used leaves a small key behind only this long. (A live node whose counter expired
/// sees its next frame numbered 1: a step back, recovered like any gap.)
const NODE_COUNTER_TTL_SECS: u64 = 86_400;

/// Where a Redis bus sends messages for users (`bus.routing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusRouting {
    /// Every message on `<prefix>:bus`, to every node.
    Broadcast,
    /// Messages for users only to the nodes holding their connections; `node` is this
    /// node's `node.id`, whose channel it subscribes to.
    Routed { node: String },
}

/// A [`Bus`] over Redis pub/sub.
pub struct RedisBus {
    publisher: Client,
    subscriber: SubscriberClient,
    /// `{<prefix>}` on a Redis Cluster, else `<prefix>`: what every key starts with.
    base: String,
    /// On a Redis Cluster: sharded pub/sub.
    cluster: bool,
    /// `<prefix>:seq`, `<prefix>:epoch` and `<prefix>:all`, named once.
    seq_key: String,
    epoch_key: String,
    all_key: String,
    /// `<prefix>:b:`, followed by a sequence number: the key of a message's payload.
    body_prefix: String,
    /// `<prefix>:pending` (`<n> <id>` of a message written over several calls) and
    /// `<prefix>:lease` (its publisher's, renewed by each call).
    pending_key: String,
    lease_key: String,
    bus_channel: String,
    control_channel: String,
    /// Routed mode: this node's channel, `<prefix>:node:<node.id>`.
    node_channel: Option<String>,
    publish_script: Script,
    chunk_script: Script,
    read_script: Script,
    max_messages: String,
    window_secs: String,
    metrics: Arc<Metrics>,
}

impl RedisBus {
    /// Connects both clients to the Redis `cfg` names (one server, the primary its
    /// sentinels report, or a Redis Cluster; over TLS for `rediss`); fails if Redis cannot be
    /// reached now.
    pub async fn connect(
        cfg: &RedisConfig,
        recovery: &RecoveryConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BusError> {
        Self::connect_with(cfg, recovery, BusRouting::Broadcast, metrics).await
    }

    /// [`connect`](Self::connect), routing as `routing` says.
    pub async fn connect_with(
        cfg: &RedisConfig,
        recovery: &RecoveryConfig,
        routing: BusRouting,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BusError> {
        let config = connect::client_config(cfg)?;
        let cluster = config.server.is_clustered();
        let base = key_base(&cfg.prefix, cluster);
        let prefix = base.as_str();
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(3);
                // A failed publish is retried by ingest, not by fred. But fred counts
                // following a redirection as a second write: on a cluster, where a failover or
                // a slot move answers the next command with MOVED, one attempt would fail it.
                c.max_command_attempts = if cluster { 2 } else { 1 };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_secs(3);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        // fred gives each client nine broadcast channels of this capacity, allocated up
        // front (~30 MB at 1 << 16): only the subscriber's pub/sub messages need it.
        let publisher = builder.build()?;
        builder.with_performance_config(|p| p.broadcast_channel_capacity = BROADCAST_CAPACITY);
        let subscriber = builder.build_subscriber_client()?;
        publisher.init().await?;
        subscriber.init().await?;
        // The scripts publish with `PUB`: a shard channel of their own slot on a cluster.
        let send = match &routing {
            BusRouting::Broadcast => BROADCAST_LUA.to_owned(),
            BusRouting::Routed { node } => format!("{}{ROUTED_LUA}", routed_names(prefix, node)),
        };
        let publish = format!(
            "local PUB = '{}'\n{send}{EPOCH_LUA}{PUBLISH_LUA}",
            if cluster { "SPUBLISH" } else { "PUBLISH" }
        );
        let publish_script = Script::from_lua(format!("{publish}{PUBLISH_SCRIPT}"));
        let chunk_script = Script::from_lua(format!("{publish}{CHUNK_SCRIPT}"));
        let read_script = Script::from_lua(format!("{send}{EPOCH_LUA}{READ_SCRIPT}"));
        publish_script.load(&publisher).await?;
        chunk_script.load(&publisher).await?;
        read_script.load(&publisher).await?;
        Ok(Self {
            publisher,
            subscriber,
            cluster,
            seq_key: format!("{prefix}:seq"),
            epoch_key: format!("{prefix}:epoch"),
            all_key: format!("{prefix}:all"),
            body_prefix: format!("{prefix}:b:"),
            pending_key: format!("{prefix}:pending"),
            lease_key: format!("{prefix}:lease"),
            bus_channel: format!("{prefix}:bus"),
            control_channel: format!("{prefix}:control"),
            node_channel: match &routing {
                BusRouting::Broadcast => None,
                BusRouting::Routed { node } => Some(format!("{prefix}:node:{node}")),
            },
            publish_script,
            chunk_script,
            read_script,
            max_messages: recovery.max_messages.to_string(),
            window_secs: recovery.window.as_secs().max(1).to_string(),
            metrics,
            base,
        })
    }

    /// What every key of the bus starts with (before its `:`): `{<prefix>}` on a Redis
    /// Cluster (one hash tag, one slot), else `<prefix>`. Presence keeps its keys under it
    /// too, so that they share the bus's shard.
    pub fn key_base(&self) -> &str {
        &self.base
    }

    /// The command client (not the subscriber), for other parts of the node that keep
    /// state in the same Redis (presence): same server, Sentinel and TLS settings.
    pub fn client(&self) -> Client {
        self.publisher.clone()
    }
}

fn int(value: &Value) -> Result<i64, BusError> {
    value
        .as_i64()
        .ok_or_else(|| BusError::Reply(format!("expected an integer, got {value:?}")))
}

/// A pub/sub payload as bytes, without copying.
fn payload_bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish(&self, channel: Channel, payload: Bytes) -> Result<(), BusError> {
        let name = self.channel_name(channel).to_owned();
        let result: Result<i64, _> = if self.cluster {
            self.publisher.spublish(name, payload).await
        } else {
            self.publisher.publish(name, payload).await
        };
        match result {
            Ok(_) => {
                self.metrics
                    .bus_published
                    .with_label_values(&[channel.as_str()])
                    .inc();
                Ok(())
            }
            Err(e) => {
                self.metrics.bus_publish_errors.inc();
                Err(e.into())
            }
        }
    }

    async fn publish_messages(&self, msgs: &[Outgoing]) -> Result<Vec<Published>, BusError> {
        let mut published = Vec::with_capacity(msgs.len());
        let mut rest = msgs;
        while !rest.is_empty() {
            if rest[0].stream_count() > STREAMS_PER_CALL {
                published.push(self.publish_split(&rest[0]).await?);
                rest = &rest[1..];
                continue;
            }
            // Messages while their streams fit in one call.
            let mut streams = rest[0].stream_count();
            let mut n = 1;
            while n < rest.len() {
                streams += rest[n].stream_count();
                if streams > STREAMS_PER_CALL {
                    break;
                }
                n += 1;
            }
            let (call, after) = rest.split_at(n);
            published.extend(self.publish_call(call).await?);
            rest = after;
        }
        Ok(published)
    }

    async fn read_history(
        &self,
        after: After<'_>,
        streams: &[StreamKey<'_>],
    ) -> Result<HistoryRead, BusError> {
        self.read(after, streams).await
    }

    async fn subscribe(
        &self,
        handler: Box<dyn BusHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        self.receive(handler, shutdown).await
    }

    fn is_connected(&self) -> bool {
        self.publisher.is_connected() && self.subscriber.is_connected()
    }

    fn is_routed(&self) -> bool {
        self.node_channel.is_some()
    }
}
