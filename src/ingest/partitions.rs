//! The driver and the partition readers: who takes which record, and the skip past a
//! batch librdkafka cannot decode.
//!
//! Invariants:
//! * The main queue is always served (rebalances arrive there). After each rebalance the
//!   driver stops the old readers (each finishes the record in hand), splits every
//!   assigned partition into its own queue, then takes what the main queue already held
//!   (fetched before the split, so older than anything the new queues yield), and only
//!   then starts one reader per partition: per-partition order holds across the split.
//! * An old reader's queue is dropped before the new split: dropping a queue disables its
//!   wake-up callback, which would silence the new one for the same partition.
//! * A consumer error is attributed to a partition only when it arrives on that
//!   partition's queue. There, an undecodable one means the data at the partition's next
//!   offset cannot be read and librdkafka will fetch it again forever (it does not move
//!   its fetch position past a batch it fails to decode), so the reader seeks to the next
//!   offset + 1, counts it (`fanout_ingest_rejected_total{reason="undecodable"}`) and has
//!   the batcher store it: one step per offset, as the error carries no end offset.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ErrorKind, IngestContext, Taken, Worker};
use crate::config::OffsetReset;
use crate::metrics::REJECTED_UNDECODABLE;

/// How long the reader of a stalled partition waits for the broker to say where the
/// partition stands (committed offset, low watermark).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

type Queue = StreamPartitionQueue<IngestContext>;

impl Worker {
    /// Serves the main queue until `shutdown`; on every rebalance, restarts the readers.
    pub(super) async fn drive(
        self: Arc<Self>,
        tx: mpsc::Sender<Taken>,
        shutdown: CancellationToken,
    ) {
        let consumer = self.ingest.consumer.clone();
        let rebalanced = consumer.context().rebalanced.clone();
        let mut readers: Vec<JoinHandle<()>> = Vec::new();
        let mut stop = CancellationToken::new();
        // Each partition's next offset after what the main queue yielded since the last
        // split: the new reader's starting point.
        let mut seen = HashMap::new();
        loop {
            let record = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = rebalanced.notified() => {
                    stop.cancel();
                    for reader in readers.drain(..) {
                        if let Err(e) = reader.await {
                            tracing::error!(error = %e, "partition reader failed");
                        }
                    }
                    stop = CancellationToken::new();
                    if !self.split(&tx, &stop, &mut readers, &mut seen).await {
                        break;
                    }
                    continue;
                }
                record = consumer.recv() => record,
            };
            // Only records fetched just before a split land here (see `split`).
            if !self.main_queue(record, &tx, &mut seen).await {
                break;
            }
        }
        stop.cancel();
        for reader in readers {
            let _ = reader.await;
        }
    }

    /// Splits every assigned partition, takes what the main queue still holds, then starts
    /// one reader per partition. False if the batcher is gone.
    async fn split(
        self: &Arc<Self>,
        tx: &mpsc::Sender<Taken>,
        stop: &CancellationToken,
        readers: &mut Vec<JoinHandle<()>>,
        seen: &mut HashMap<(Arc<str>, i32), i64>,
    ) -> bool {
        let consumer = &self.ingest.consumer;
        let assignment = consumer.assignment().unwrap_or_default();
        let mut queues = Vec::with_capacity(assignment.count());
        for e in assignment.elements() {
            match consumer.split_partition_queue(e.topic(), e.partition()) {
                Some(queue) => queues.push((Arc::<str>::from(e.topic()), e.partition(), queue)),
                None => tracing::error!(
                    topic = e.topic(),
                    partition = e.partition(),
                    "could not split a partition queue; its records stay on the main queue"
                ),
            }
        }
        while let Some(record) = consumer.recv().now_or_never() {
            if !self.main_queue(record, tx, seen).await {
                return false;
            }
        }
        for (topic, partition, queue) in queues {
            let next = seen.get(&(topic.clone(), partition)).copied();
            let reader = self
                .clone()
                .read(queue, topic, partition, next, tx.clone(), stop.clone());
            readers.push(tokio::spawn(reader));
        }
        seen.clear();
        tracing::debug!(partitions = readers.len(), "partition readers started");
        true
    }

    /// Takes one record from the main queue (an error there names no partition: counted
    /// only; librdkafka fetches the data again into the partition's own queue). Notes in
    /// `seen` each partition's next offset. False if the batcher is gone.
    async fn main_queue(
        &self,
        record: Result<BorrowedMessage<'_>, KafkaError>,
        tx: &mpsc::Sender<Taken>,
        seen: &mut HashMap<(Arc<str>, i32), i64>,
    ) -> bool {
        match record {
            Ok(record) => {
                let taken = self.take(&record, Arc::from(record.topic())).await;
                seen.insert((taken.topic.clone(), taken.partition), taken.next);
                tx.send(taken).await.is_ok()
            }
            Err(e) => {
                self.consumer_error(&e);
                true
            }
        }
    }

    /// Takes one partition's records, in order, until `stop` (between records) or until
    /// the batcher is gone. `next` is the partition's next offset, if known.
    async fn read(
        self: Arc<Self>,
        queue: Queue,
        topic: Arc<str>,
        partition: i32,
        mut next: Option<i64>,
        tx: mpsc::Sender<Taken>,
        stop: CancellationToken,
    ) {
        loop {
            let record = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                record = queue.recv() => record,
            };
            let taken = match record {
                Ok(record) => self.take(&record, topic.clone()).await,
                Err(e) => {
                    if self.consumer_error(&e) != ErrorKind::Undecodable {
                        continue;
                    }
                    match self.skip(&topic, partition, next).await {
                        Some(taken) => taken,
                        None => continue,
                    }
                }
            };
            next = Some(taken.next);
            if tx.send(taken).await.is_err() {
                return;
            }
        }
    }

    /// Seeks the partition past the offset it cannot decode (its next offset) and returns
    /// the skip for the batcher to store; `None` if that offset cannot be found.
    async fn skip(&self, topic: &Arc<str>, partition: i32, next: Option<i64>) -> Option<Taken> {
        let offset = match next {
            Some(offset) => offset,
            None => self.stuck_offset(topic, partition).await?,
        };
        let consumer = &self.ingest.consumer;
        // Timeout zero: librdkafka queues the seek and returns; it drops what was fetched
        // from the old position before this reader sees it.
        if let Err(e) = consumer.seek(topic, partition, Offset::Offset(offset + 1), Duration::ZERO)
        {
            tracing::error!(%topic, partition, offset, error = %e, "could not seek past an undecodable record; the partition stalls until it moves");
            return None;
        }
        self.ingest
            .metrics
            .ingest_rejected
            .with_label_values(&[REJECTED_UNDECODABLE])
            .inc();
        let allowed = self.skip_log.lock().allow();
        if let Some(suppressed) = allowed {
            tracing::warn!(%topic, partition, offset, suppressed, "record the consumer cannot decode skipped");
        }
        Some(Taken {
            msg: None,
            topic: topic.clone(),
            partition,
            next: offset + 1,
        })
    }

    /// Where a partition stands when its reader saw no record: the consumer's position,
    /// else the committed offset, else (`auto_offset_reset = "earliest"`) the low
    /// watermark.
    async fn stuck_offset(&self, topic: &Arc<str>, partition: i32) -> Option<i64> {
        let consumer = self.ingest.consumer.clone();
        let earliest = self.ingest.kafka.auto_offset_reset == OffsetReset::Earliest;
        let (t, p) = (topic.clone(), partition);
        let found = tokio::task::spawn_blocking(move || {
            let of = |tpl: &TopicPartitionList| match tpl.find_partition(&t, p)?.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            };
            if let Some(o) = consumer.position().ok().as_ref().and_then(of) {
                return Some(o);
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&t, p);
            if let Some(o) = consumer
                .committed_offsets(tpl, LOOKUP_TIMEOUT)
                .ok()
                .as_ref()
                .and_then(of)
            {
                return Some(o);
            }
            if earliest {
                return consumer
                    .fetch_watermarks(&t, p, LOOKUP_TIMEOUT)
                    .ok()
                    .map(|(low, _)| low);
            }
            None
        })
        .await
        .ok()
        .flatten();
        if found.is_none() {
            // librdkafka fetches the batch again every `fetch.error.backoff.ms`.
            let allowed = self.skip_log.lock().allow();
            if let Some(suppressed) = allowed {
                tracing::error!(%topic, partition, suppressed, "a batch the consumer cannot decode and no known offset: the partition stalls; move the group past it with kafka-consumer-groups --reset-offsets --to-offset <offset + 1>");
            }
        }
        found
    }
}
