//! The batcher: the one task that publishes on the bus and stores offsets.
//!
//! Invariants:
//! * Records are published in the order they arrive from the channel (each partition's
//!   reader sends in offset order), across partitions in one bus call of at most
//!   [`BATCH_MAX`] records or [`BATCH_MAX_BYTES`].
//! * Offsets are stored only after the whole batch was published; a rejected record or a
//!   skipped offset carries no message but its offset is stored with the batch.
//! * While the bus is down the same batch is retried; the channel fills and the readers
//!   wait, so nothing is stored that was not published.

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Ingest, Taken};
use crate::bus::Outgoing;

/// Most records published in one bus call...
pub(super) const BATCH_MAX: usize = 256;
/// ... and most bytes of messages: a batch reaches every node's router at once, so it must
/// not by itself fill a connection's queue (`server.queue_max_bytes`).
const BATCH_MAX_BYTES: usize = 64 * 1024;

/// The records taken since the last publish.
#[derive(Default)]
struct Batch {
    outgoing: Vec<Outgoing>,
    /// Per partition, the offset after the last record taken.
    next: Vec<(std::sync::Arc<str>, i32, i64)>,
    records: usize,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, taken: Taken) {
        self.records += 1;
        match self
            .next
            .iter_mut()
            .find(|(t, p, _)| *p == taken.partition && *t == taken.topic)
        {
            Some(entry) => entry.2 = taken.next,
            None => self.next.push((taken.topic, taken.partition, taken.next)),
        }
        if let Some(msg) = taken.msg {
            self.bytes += msg.body().len();
            self.outgoing.push(msg);
        }
    }

    fn clear(&mut self) {
        self.outgoing.clear();
        self.next.clear();
        self.records = 0;
        self.bytes = 0;
    }

    fn is_full(&self) -> bool {
        self.records >= BATCH_MAX || self.bytes >= BATCH_MAX_BYTES
    }
}

impl Ingest {
    /// Publishes what the readers send until `shutdown` (or until every sender is gone):
    /// the first record waited for, then whatever else the channel already holds (up to
    /// [`BATCH_MAX`] records or [`BATCH_MAX_BYTES`]), in one bus call; then stores the
    /// offsets.
    pub(super) async fn batch(&self, mut rx: mpsc::Receiver<Taken>, shutdown: &CancellationToken) {
        let mut batch = Batch::default();
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                taken = rx.recv() => match taken {
                    Some(taken) => taken,
                    None => break,
                },
            };
            batch.push(first);
            while !batch.is_full() {
                match rx.try_recv() {
                    Ok(taken) => batch.push(taken),
                    Err(_) => break,
                }
            }
            if !batch.outgoing.is_empty() && !self.publish(&mut batch.outgoing, shutdown).await {
                break;
            }
            self.store(&batch.next);
            batch.clear();
        }
    }

    /// Publishes until the bus takes them all; false if shutdown came first (nothing is
    /// stored, so the records are consumed again by whoever owns the partitions next). A
    /// message the bus already has (a Kafka redelivery, or a retry of a batch that was
    /// partly published) counts as published and is not published again. With receipts on,
    /// the headers of what was published leave `msgs` for the receipts task.
    async fn publish(&self, msgs: &mut Vec<Outgoing>, shutdown: &CancellationToken) -> bool {
        let mut backoff = Duration::from_millis(50);
        let mut failures = 0u32;
        loop {
            match self.bus.publish_messages(msgs).await {
                Ok(published) => {
                    for (msg, p) in msgs.iter().zip(&published).filter(|(_, p)| p.duplicate) {
                        self.metrics.ingest_duplicates.inc();
                        tracing::debug!(id = %msg.header.id, seq = p.seq, "redelivered record already on the bus");
                    }
                    if self.receipts.is_on() {
                        // Each message published now (not a redelivery) is checked against
                        // presence by the receipts task: `offline` or `expired` candidates.
                        // The batch is cleared next: its headers are moved, not copied.
                        let headers = msgs
                            .drain(..)
                            .zip(&published)
                            .filter(|(_, p)| !p.duplicate)
                            .map(|(msg, _)| msg.header)
                            .collect();
                        self.receipts.published(headers, crate::clock::now_ms());
                    }
                    if failures > 0 {
                        tracing::info!(failures, "bus publish recovered; consumption resumes");
                    }
                    return true;
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::error!(error = %e, "bus publish failed; consumption paused until it recovers");
                    }
                    failures += 1;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Stores each partition's next offset (where consumption resumes) for the next
    /// commit, in one call. Not the legacy `store_offset`: librdkafka's
    /// `rd_kafka_offset_store` adds one itself, which once made every clean restart or
    /// rebalance skip a record.
    fn store(&self, next: &[(std::sync::Arc<str>, i32, i64)]) {
        if next.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(next.len());
        let stored = next
            .iter()
            .try_for_each(|(topic, partition, offset)| {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            })
            .and_then(|()| self.consumer.store_offsets(&tpl));
        if let Err(e) = stored {
            tracing::warn!(offsets = ?next, error = %e, "could not store offsets (partition revoked?)");
        }
    }

    /// Commits stored offsets and leaves the group, so partitions move at once.
    pub(super) fn leave(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("kafka offsets committed"),
            Err(e) => tracing::debug!(error = %e, "nothing to commit at shutdown"),
        }
        self.consumer.unsubscribe();
        self.metrics.kafka_partitions.set(0);
    }
}
