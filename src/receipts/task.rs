//! The receipts task of a node: batches of events in, records out to the topic.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::claims::{Claims, Pending};
use super::{users_of, Event, Inbox, MsgRef, Routed};
use crate::bus::Header;
use crate::envelope::Target;
use crate::kafka::Sink;
use crate::metrics::{Metrics, Receipt, ReceiptDropped};

/// Events the task takes in one batch (one presence call, one claim round trip).
const BATCH: usize = 512;
/// How long the task lets a batch gather after its first event: without it, a steady
/// stream of messages makes batches of one or two events, each paying a presence call and
/// a claim round trip (S3 with receipts on cost 28-66% more CPU per delivery than off;
/// with 10 ms still 28% at 1,000 records/s, 8% with 50 ms). A receipt is a fact reported
/// on the side: 50 ms later is no loss to a backend deciding on a mobile push.
const LINGER: Duration = Duration::from_millis(50);

/// One online question: is there a connection of `user` (on `platform`, with `tab`)
/// anywhere in the cluster? Presence's own query type.
pub type Query<'a> = crate::presence::OnlineQuery<'a>;

/// Answers online questions cluster-wide (presence).
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// One answer per query, in order.
    async fn online(&self, queries: &[Query<'_>]) -> Result<Vec<bool>, String>;
}

/// Presence is the cluster's directory: "a matching connection on any live node".
#[async_trait]
impl Directory for crate::presence::Presence {
    async fn online(&self, queries: &[Query<'_>]) -> Result<Vec<bool>, String> {
        crate::presence::Presence::online(self, queries)
            .await
            .map_err(|e| e.to_string())
    }
}

/// One receipt record as produced (DESIGN §6).
#[derive(Debug, Serialize)]
struct Record<'a> {
    id: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    msg_type: Option<&'a str>,
    user: &'a str,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    conns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conn: Option<&'a str>,
    node: &'a str,
    ts: i64,
}

/// A record as a test sees it: key (user id) and JSON value.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub key: String,
    pub value: String,
}

/// The receipts task of a node.
pub struct Task {
    pub inbox: Inbox,
    pub sink: Sink,
    pub topic: String,
    pub node: String,
    pub claims: Claims,
    /// Presence; `None`: no `offline` receipts.
    pub directory: Option<Arc<dyn Directory>>,
    pub metrics: Arc<Metrics>,
}

impl Task {
    /// Reports until `shutdown`, then reports what is still queued and returns (the
    /// caller flushes the sink).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Task {
            mut inbox,
            sink,
            topic,
            node,
            claims,
            directory,
            metrics,
        } = self;
        let output = Output::new(sink, topic, &metrics);
        let mut worker = Worker::new(node, claims, directory, metrics);
        let mut emit = |outcome, key: &str, value: &[u8]| output.produce(outcome, key, value);
        // One batch buffer for the task's life: no allocation per batch.
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = inbox.recv_many(&mut batch, BATCH) => n,
            };
            if received == 0 {
                return Ok(()); // every handle is gone
            }
            if batch.len() < BATCH {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(LINGER) => {}
                }
                let room = BATCH - batch.len();
                if !inbox.rx.is_empty() {
                    inbox.recv_many(&mut batch, room).await;
                }
            }
            worker.process(&mut batch, &mut emit).await;
        }
        // What was reported before the shutdown, once (no waiting for more).
        inbox.rx.close();
        while inbox.recv_many(&mut batch, BATCH).await > 0 {
            worker.process(&mut batch, &mut emit).await;
        }
        Ok(())
    }
}

/// Where rendered records go.
struct Output {
    sink: Sink,
    topic: String,
    /// `fanout_receipts_total` per outcome, in [`Receipt::ALL`]'s order (looked up once,
    /// not per record).
    produced: Vec<prometheus::IntCounter>,
    metrics: Arc<Metrics>,
}

impl Output {
    fn new(sink: Sink, topic: String, metrics: &Arc<Metrics>) -> Self {
        let produced = Receipt::ALL
            .iter()
            .map(|outcome| metrics.receipts.with_label_values(&[outcome.label()]))
            .collect();
        Self {
            sink,
            topic,
            produced,
            metrics: metrics.clone(),
        }
    }

    fn produce(&self, outcome: Receipt, key: &str, value: &[u8]) {
        match self.sink.produce(&self.topic, key, value) {
            Ok(()) => {
                let at = Receipt::ALL.iter().position(|o| *o == outcome);
                if let Some(counter) = at.and_then(|at| self.produced.get(at)) {
                    counter.inc();
                }
            }
            Err(e) => {
                let full =
                    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull);
                let reason = if full {
                    ReceiptDropped::QueueFull
                } else {
                    ReceiptDropped::ProduceFailed
                };
                tracing::debug!(error = %e, "receipt dropped");
                self.metrics
                    .receipts_dropped
                    .with_label_values(&[reason.label()])
                    .inc();
            }
        }
    }
}

/// What turns a batch of events into records (separate from the sink, for tests). Its
/// buffers live as long as it does: a batch allocates for the claims' and presence's calls,
/// not per record.
pub(super) struct Worker {
    node: String,
    claims: Claims,
    directory: Option<Arc<dyn Directory>>,
    pub(super) metrics: Arc<Metrics>,
    /// Negative outcomes waiting for their claims.
    pending: Vec<Pending>,
    /// The batch's published messages that had not expired, to ask presence about (kept
    /// for its capacity: a batch's few hundred headers would otherwise grow a fresh
    /// buffer, and touch fresh pages, every batch).
    published: Vec<(Header, i64)>,
    /// Where each record is rendered.
    buf: Vec<u8>,
}

impl Worker {
    pub(super) fn new(
        node: String,
        claims: Claims,
        directory: Option<Arc<dyn Directory>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node,
            claims,
            directory,
            metrics,
            pending: Vec::new(),
            published: Vec::new(),
            buf: Vec::with_capacity(256),
        }
    }

    fn dropped(&self, reason: ReceiptDropped, n: usize) {
        if n > 0 {
            self.metrics
                .receipts_dropped
                .with_label_values(&[reason.label()])
                .inc_by(n as u64);
        }
    }

    /// Renders `record` into the buffer and hands it to `emit` (key: the user id).
    fn emit(
        buf: &mut Vec<u8>,
        outcome: Receipt,
        record: &Record<'_>,
        emit: &mut impl FnMut(Receipt, &str, &[u8]),
    ) {
        buf.clear();
        serde_json::to_writer(&mut *buf, record).expect("a receipt serializes");
        emit(outcome, record.user, buf);
    }

    /// Turns `events` (emptied) into records for `emit`, in order of kind: `delivered` and
    /// `acked` as they came, then the negative outcomes that won their claims.
    pub(super) async fn process(
        &mut self,
        events: &mut Vec<Event>,
        emit: &mut impl FnMut(Receipt, &str, &[u8]),
    ) {
        let mut published = std::mem::take(&mut self.published);
        for event in events.drain(..) {
            match event {
                Event::Delivered {
                    msg,
                    user,
                    conns,
                    at_ms,
                } => {
                    let record = Record {
                        id: msg.id(),
                        msg_type: Some(msg.msg_type()),
                        user: &user,
                        outcome: Receipt::Delivered.label(),
                        conns: Some(conns),
                        conn: None,
                        node: &self.node,
                        ts: at_ms,
                    };
                    Self::emit(&mut self.buf, Receipt::Delivered, &record, emit);
                }
                Event::Routed { msg, users, at_ms } => {
                    for (user, routed) in users {
                        let outcome = match routed {
                            Routed::Filtered => Receipt::Filtered,
                            Routed::Expired => Receipt::Expired,
                        };
                        self.pending.push(Pending {
                            msg: msg.clone(),
                            user,
                            outcome,
                            at_ms,
                        });
                    }
                }
                Event::Acked {
                    user,
                    conn,
                    ids,
                    at_ms,
                } => {
                    for id in &ids {
                        let record = Record {
                            id,
                            msg_type: None,
                            user: &user,
                            outcome: Receipt::Acked.label(),
                            conns: None,
                            conn: Some(&conn),
                            node: &self.node,
                            ts: at_ms,
                        };
                        Self::emit(&mut self.buf, Receipt::Acked, &record, emit);
                    }
                }
                Event::Published { headers, at_ms } => {
                    for header in headers {
                        if header.expired(at_ms) {
                            let msg = MsgRef::of(&header);
                            for user in users_of(&header.to) {
                                self.pending.push(Pending {
                                    msg: msg.clone(),
                                    user: Arc::from(user),
                                    outcome: Receipt::Expired,
                                    at_ms,
                                });
                            }
                        } else {
                            published.push((header, at_ms));
                        }
                    }
                }
            }
        }
        self.offline(&published).await;
        published.clear();
        self.published = published;
        self.claim(emit).await;
    }

    /// Adds an `offline` candidate for each user of `published` without a matching
    /// connection anywhere (one presence call for the whole batch).
    async fn offline(&mut self, published: &[(Header, i64)]) {
        let Some(directory) = &self.directory else {
            return;
        };
        let mut queries = Vec::with_capacity(published.len());
        for (header, _) in published {
            match &header.to {
                Target::User {
                    user,
                    platform,
                    tab,
                } => queries.push(Query {
                    user,
                    platform: *platform,
                    tab: tab.as_deref(),
                }),
                Target::Users(users) => queries.extend(users.iter().map(|user| Query {
                    user,
                    platform: None,
                    tab: None,
                })),
                Target::Conn(_) | Target::Group(_) | Target::All => {}
            }
        }
        if queries.is_empty() {
            return;
        }
        let online = match directory.online(&queries).await {
            Ok(online) if online.len() == queries.len() => online,
            Ok(online) => {
                tracing::warn!(
                    asked = queries.len(),
                    answered = online.len(),
                    "presence answered the wrong number of questions: no offline receipts"
                );
                self.dropped(ReceiptDropped::PresenceFailed, queries.len());
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "presence unavailable: no offline receipts");
                self.dropped(ReceiptDropped::PresenceFailed, queries.len());
                return;
            }
        };
        let mut answers = online.into_iter();
        for (header, at_ms) in published {
            // Made at the message's first offline user: most users are online.
            let mut msg = None;
            for user in users_of(&header.to) {
                if answers.next() == Some(false) {
                    let msg = msg.get_or_insert_with(|| MsgRef::of(header));
                    self.pending.push(Pending {
                        msg: msg.clone(),
                        user: Arc::from(user),
                        outcome: Receipt::Offline,
                        at_ms: *at_ms,
                    });
                }
            }
        }
    }

    /// Claims every pending negative outcome in one round trip; emits the winners.
    async fn claim(&mut self, emit: &mut impl FnMut(Receipt, &str, &[u8])) {
        if self.pending.is_empty() {
            return;
        }
        let won = match self.claims.claim(&self.pending).await {
            Ok(won) => won,
            Err(e) => {
                tracing::warn!(error = %e, "receipt claims failed: negative outcomes not reported");
                self.dropped(ReceiptDropped::ClaimFailed, self.pending.len());
                self.pending.clear();
                return;
            }
        };
        for (p, _) in self.pending.iter().zip(won).filter(|(_, won)| *won) {
            let record = Record {
                id: p.msg.id(),
                msg_type: Some(p.msg.msg_type()),
                user: &p.user,
                outcome: p.outcome.label(),
                conns: Some(0),
                conn: None,
                node: &self.node,
                ts: p.at_ms,
            };
            Self::emit(&mut self.buf, p.outcome, &record, emit);
        }
        self.pending.clear();
    }

    /// What `events` become, as a test sees them.
    #[cfg(test)]
    pub(super) async fn records(&mut self, mut events: Vec<Event>) -> Vec<(Receipt, Out)> {
        let mut out = Vec::new();
        let mut collect = |outcome, key: &str, value: &[u8]| {
            out.push((
                outcome,
                Out {
                    key: key.to_owned(),
                    value: String::from_utf8(value.to_vec()).expect("JSON is UTF-8"),
                },
            ))
        };
        self.process(&mut events, &mut collect).await;
        out
    }
}
