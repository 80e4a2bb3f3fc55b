//! The in-process bus of the embedded default: one node, no Redis.
//!
//! A tokio broadcast channel stands in for Redis pub/sub with the same contract: every
//! subscriber sees every message in publish order, and a receiver that falls behind is told
//! with a [`BusEvent::Gap`]. The history is a [`MemoryHistory`]; a message is numbered,
//! recorded and sent under one lock, so history order is bus order.

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::history::MemoryHistory;
use super::{
    After, Bus, BusError, BusEvent, BusHandler, Channel, HistoryRead, Outgoing, Published,
    StreamKey,
};
use crate::config::RecoveryConfig;

/// A [`Bus`] inside one process.
pub struct LocalBus {
    sender: broadcast::Sender<(Channel, Bytes)>,
    history: Mutex<MemoryHistory>,
}

impl LocalBus {
    /// A bus buffering up to `capacity` messages per slow subscriber.
    pub fn new(capacity: usize, recovery: &RecoveryConfig) -> Self {
        Self {
            sender: broadcast::channel(capacity).0,
            history: Mutex::new(MemoryHistory::new(recovery.max_messages, recovery.window)),
        }
    }
}

impl Default for LocalBus {
    fn default() -> Self {
        Self::new(1 << 16, &RecoveryConfig::default())
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn publish(&self, channel: Channel, payload: Bytes) -> Result<(), BusError> {
        // No subscriber yet is not an error: Redis PUBLISH to nobody succeeds too.
        let _ = self.sender.send((channel, payload));
        Ok(())
    }

    async fn publish_messages(&self, msgs: &[Outgoing]) -> Result<Vec<Published>, BusError> {
        let mut history = self.history.lock();
        let published = msgs
            .iter()
            .map(|msg| {
                let (published, payload) = history.append(msg);
                if let Some(payload) = payload {
                    let _ = self.sender.send((Channel::Bus, payload));
                }
                published
            })
            .collect();
        Ok(published)
    }

    async fn read_history(
        &self,
        after: After<'_>,
        streams: &[StreamKey<'_>],
    ) -> Result<HistoryRead, BusError> {
        Ok(self.history.lock().read(after, streams))
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
