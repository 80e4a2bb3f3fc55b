//! The receiving side of the Redis bus: the dedicated subscriber client on the bus, control
//! and (routed mode) node channels; each message is handed on as a [`BusEvent`] and counted
//! per channel.
//!
//! fred hands pub/sub messages to a broadcast channel; a receiver that falls behind loses
//! messages, so the channel is large, drained by one dedicated task, and lag is counted and
//! reported as a [`BusEvent::Gap`]. After a lost connection fred reconnects with backoff and
//! `manage_subscriptions` resubscribes; that, too, is reported as a gap.
//!
//! On a Redis Cluster a server may also end a shard subscription on a live connection: a
//! manual failover or a slot migration moves the slot, and the old owner pushes
//! `sunsubscribe`, which fred drops without a word (no reconnect, no event). So the
//! subscriber repeats its `SSUBSCRIBE` every [`RESUBSCRIBE_EVERY`]: a no-op where the
//! subscription holds; after a move, fred follows the redirection to the slot's owner.
//! What was published meanwhile shows as a jump in the sequence numbers and is recovered
//! from the history like any gap.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use prometheus::IntCounter;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{payload_bytes, RedisBus};
use crate::bus::{BusError, BusEvent, BusHandler, Channel};
use crate::metrics::Gap;

/// On a Redis Cluster, how often the subscriber repeats its `SSUBSCRIBE` (see the module
/// comment).
const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(1);

/// The channels the subscriber tells apart, each with its `fanout_bus_received_total`
/// counter.
struct Received<'a> {
    bus: (&'a str, IntCounter),
    control: (&'a str, IntCounter),
    /// Routed mode: this node's channel (empty in broadcast mode).
    node: (&'a str, IntCounter),
}

impl<'a> Received<'a> {
    fn new(redis: &'a RedisBus) -> Self {
        let counter = |channel: Channel| {
            redis
                .metrics
                .bus_received
                .with_label_values(&[channel.as_str()])
        };
        Self {
            bus: (&redis.bus_channel, counter(Channel::Bus)),
            control: (&redis.control_channel, counter(Channel::Control)),
            node: (
                redis.node_channel.as_deref().unwrap_or_default(),
                counter(Channel::Node),
            ),
        }
    }

    /// Which channel `name` is, counting the message; `None` for a channel not the bus's.
    fn channel(&self, name: &str) -> Option<Channel> {
        if name == self.bus.0 {
            self.bus.1.inc();
            Some(Channel::Bus)
        } else if name == self.control.0 {
            self.control.1.inc();
            Some(Channel::Control)
        } else if !self.node.0.is_empty() && name == self.node.0 {
            self.node.1.inc();
            Some(Channel::Node)
        } else {
            None
        }
    }
}

impl RedisBus {
    /// [`Bus::subscribe`](super::Bus::subscribe): subscribes, then hands every message,
    /// lag and reconnection to `handler` until `shutdown`.
    pub(super) async fn receive(
        &self,
        mut handler: Box<dyn BusHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        let mut messages = self.subscriber.message_rx();
        let mut reconnects = self.subscriber.reconnect_rx();
        let resubscriber = self.subscriber.manage_subscriptions();
        let keeper = self.subscribe_channels().await?;
        let channels = Received::new(self);
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                received = messages.recv() => match received {
                    Ok(message) => {
                        let Some(channel) = channels.channel(&message.channel) else {
                            continue;
                        };
                        if let Some(payload) = payload_bytes(message.value) {
                            handler.on_event(BusEvent::Message { channel, payload });
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::error!(missed, "bus receiver lagged: messages lost");
                        self.metrics.bus_gaps.with_label_values(&[Gap::Lagged.label()]).inc();
                        handler.on_event(BusEvent::Gap { reason: "lagged" });
                    }
                    Err(RecvError::Closed) => break Err(BusError::Closed),
                },
                reconnected = reconnects.recv() => match reconnected {
                    Ok(server) => {
                        tracing::warn!(%server, "redis subscriber reconnected; resubscribing");
                        self.metrics.bus_gaps.with_label_values(&[Gap::Reconnected.label()]).inc();
                        handler.on_event(BusEvent::Gap { reason: "reconnected" });
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break Err(BusError::Closed),
                },
            }
        };
        resubscriber.abort();
        if let Some(keeper) = keeper {
            keeper.abort();
        }
        let _ = self.subscriber.unsubscribe_all().await;
        result
    }

    /// Subscribes to the bus, control and node channels; on a Redis Cluster with
    /// `SSUBSCRIBE`, repeated by the task returned.
    async fn subscribe_channels(&self) -> Result<Option<JoinHandle<()>>, BusError> {
        let mut channels = vec![self.bus_channel.clone(), self.control_channel.clone()];
        channels.extend(self.node_channel.clone());
        if self.cluster {
            // Channels of one slot: one command, one connection, one order.
            self.subscriber.ssubscribe(channels.clone()).await?;
            Ok(Some(tokio::spawn(keep_subscribed(
                self.subscriber.clone(),
                channels,
            ))))
        } else {
            self.subscriber.subscribe(channels).await?;
            Ok(None)
        }
    }
}

/// Repeats `SSUBSCRIBE channels` every [`RESUBSCRIBE_EVERY`], for a subscription a server
/// ended without fred noticing (see the module comment). Runs beside the receive loop: a
/// slow or failing command never delays the messages.
async fn keep_subscribed(subscriber: SubscriberClient, channels: Vec<String>) {
    let mut tick = tokio::time::interval(RESUBSCRIBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = subscriber.ssubscribe(channels.clone()).await {
            tracing::debug!(error = %e, "repeated SSUBSCRIBE failed; trying again");
        }
    }
}
