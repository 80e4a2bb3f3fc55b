//! The Redis bus: `PUBLISH` on one client, `SUBSCRIBE` on a dedicated subscriber client.
//!
//! fred hands pub/sub messages to a broadcast channel; a receiver that falls behind loses
//! messages, so the channel is large, drained by one dedicated task, and lag is counted and
//! reported as a [`BusEvent::Gap`]. After a lost connection fred reconnects with backoff and
//! `manage_subscriptions` resubscribes; that, too, is reported as a gap.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, BusEvent, BusHandler, Channel};
use crate::metrics::Metrics;

/// Capacity of fred's pub/sub broadcast channel (messages buffered before lag).
const BROADCAST_CAPACITY: usize = 1 << 16;

/// A [`Bus`] over Redis pub/sub.
pub struct RedisBus {
    publisher: Client,
    subscriber: SubscriberClient,
    bus_channel: String,
    control_channel: String,
    metrics: Arc<Metrics>,
}

impl RedisBus {
    /// Connects both clients; fails if Redis cannot be reached now.
    pub async fn connect(url: &str, prefix: &str, metrics: Arc<Metrics>) -> Result<Self, BusError> {
        let config = Config::from_url(url)?;
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(3);
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| {
                p.broadcast_channel_capacity = BROADCAST_CAPACITY;
                p.default_command_timeout = Duration::from_secs(3);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        let publisher = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;
        publisher.init().await?;
        subscriber.init().await?;
        Ok(Self {
            publisher,
            subscriber,
            bus_channel: format!("{prefix}:bus"),
            control_channel: format!("{prefix}:control"),
            metrics,
        })
    }

    fn channel_name(&self, channel: Channel) -> &str {
        match channel {
            Channel::Bus => &self.bus_channel,
            Channel::Control => &self.control_channel,
        }
    }
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
        let result: Result<i64, _> = self.publisher.publish(name, payload).await;
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

    async fn subscribe(
        &self,
        mut handler: Box<dyn BusHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        let mut messages = self.subscriber.message_rx();
        let mut reconnects = self.subscriber.reconnect_rx();
        let resubscriber = self.subscriber.manage_subscriptions();
        self.subscriber
            .subscribe(vec![self.bus_channel.clone(), self.control_channel.clone()])
            .await?;
        let received_bus = self.metrics.bus_received.with_label_values(&["bus"]);
        let received_control = self.metrics.bus_received.with_label_values(&["control"]);
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                received = messages.recv() => match received {
                    Ok(message) => {
                        let channel = if *message.channel == *self.bus_channel {
                            received_bus.inc();
                            Channel::Bus
                        } else if *message.channel == *self.control_channel {
                            received_control.inc();
                            Channel::Control
                        } else {
                            continue;
                        };
                        if let Some(payload) = payload_bytes(message.value) {
                            handler.on_event(BusEvent::Message { channel, payload });
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::error!(missed, "bus receiver lagged: messages lost");
                        self.metrics.bus_gaps.with_label_values(&["lagged"]).inc();
                        handler.on_event(BusEvent::Gap { reason: "lagged" });
                    }
                    Err(RecvError::Closed) => break Err(BusError::Closed),
                },
                reconnected = reconnects.recv() => match reconnected {
                    Ok(server) => {
                        tracing::warn!(%server, "redis subscriber reconnected; resubscribing");
                        self.metrics.bus_gaps.with_label_values(&["reconnected"]).inc();
                        handler.on_event(BusEvent::Gap { reason: "reconnected" });
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break Err(BusError::Closed),
                },
            }
        };
        resubscriber.abort();
        let _ = self.subscriber.unsubscribe_all().await;
        result
    }

    fn is_connected(&self) -> bool {
        self.publisher.is_connected() && self.subscriber.is_connected()
    }
}
