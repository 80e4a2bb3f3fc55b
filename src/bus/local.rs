//! The in-process bus of the embedded default: one node, no Redis.
//!
//! A tokio broadcast channel stands in for Redis pub/sub with the same contract: every
//! subscriber sees every message in publish order, and a receiver that falls behind is told
//! with a [`BusEvent::Gap`].

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, BusEvent, BusHandler, Channel};

/// A [`Bus`] inside one process.
pub struct LocalBus {
    sender: broadcast::Sender<(Channel, Bytes)>,
}

impl LocalBus {
    /// A bus buffering up to `capacity` messages per slow subscriber.
    pub fn new(capacity: usize) -> Self {
        Self {
            sender: broadcast::channel(capacity).0,
        }
    }
}

impl Default for LocalBus {
    fn default() -> Self {
        Self::new(1 << 16)
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish(&self, channel: Channel, payload: Bytes) -> Result<(), BusError> {
        // No subscriber yet is not an error: Redis PUBLISH to nobody succeeds too.
        let _ = self.sender.send((channel, payload));
        Ok(())
    }

    async fn subscribe(
        &self,
        mut handler: Box<dyn BusHandler>,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        let mut receiver = self.sender.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                received = receiver.recv() => match received {
                    Ok((channel, payload)) => handler.on_event(BusEvent::Message { channel, payload }),
                    Err(RecvError::Lagged(_)) => handler.on_event(BusEvent::Gap { reason: "lagged" }),
                    Err(RecvError::Closed) => return Err(BusError::Closed),
                },
            }
        }
    }

    fn is_connected(&self) -> bool {
        true
    }
}
