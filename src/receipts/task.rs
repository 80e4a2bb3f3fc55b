//! The receipts task of a node: batches of events in, records out to the topic.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::claims::{Claims, Pending};
use super::{users_of, Event, Inbox, MsgRef, Routed};
use crate::bus::Header;
use crate::envelope::{Platform, Target};
use crate::kafka::Sink;
use crate::metrics::{Metrics, Receipt, ReceiptDropped};

const BATCH: usize = 512;
/// How long the task lets a batch gather after its first event: without it, a steady
/// stream of messages makes batches of one or two events, each paying a presence call and
/// a claim round trip (S3 with receipts on cost 28-66% more CPU per delivery than off;
/// with 10 ms still 28% at 1,000 records/s, 8% with 50 ms). A receipt is a fact reported
/// on the side: 50 ms later is no loss to a backend deciding on a mobile push.
const LINGER: Duration = Duration::from_millis(50);

/// One online question: is there a connection of `user` (on `platform`, with `tab`)
/// anywhere in the cluster?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub user: &'a str,
    pub platform: Option<Platform>,
    pub tab: Option<&'a str>,
}

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
        let queries: Vec<crate::presence::OnlineQuery<'_>> = queries
            .iter()
            .map(|q| crate::presence::OnlineQuery {
                user: q.user,
                platform: q.platform,
                tab: q.tab,
            })
            .collect();
        crate::presence::Presence::online(self, &queries)
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

/// A record ready for the topic: key (user id) and JSON value.
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
        let output = Output {
            sink,
            topic,
            metrics: metrics.clone(),
        };
        let mut worker = Worker {
            node,
            claims,
            directory,
            metrics,
        };
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
            output.produce(worker.process(std::mem::take(&mut batch)).await);
        }
        // What was reported before the shutdown, once (no waiting for more).
        inbox.rx.close();
        while inbox.recv_many(&mut batch, BATCH).await > 0 {
            output.produce(worker.process(std::mem::take(&mut batch)).await);
        }
        Ok(())
    }
}

/// Where rendered records go.
struct Output {
    sink: Sink,
    topic: String,
    metrics: Arc<Metrics>,
}

impl Output {
    fn produce(&self, out: Vec<(Receipt, Out)>) {
        for (outcome, record) in out {
            match self
                .sink
                .produce(&self.topic, &record.key, record.value.as_bytes())
            {
                Ok(()) => self
                    .metrics
                    .receipts
                    .with_label_values(&[outcome.label()])
                    .inc(),
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
}

/// What turns a batch of events into records (separate from the sink, for tests).
pub(super) struct Worker {
    pub node: String,
    pub claims: Claims,
    pub directory: Option<Arc<dyn Directory>>,
    pub metrics: Arc<Metrics>,
}

impl Worker {
    fn dropped(&self, reason: ReceiptDropped, n: usize) {
        if n > 0 {
            self.metrics
                .receipts_dropped
                .with_label_values(&[reason.label()])
                .inc_by(n as u64);
        }
    }

    fn render(&self, record: &Record<'_>) -> String {
        serde_json::to_string(record).expect("a receipt serializes")
    }

    /// The records of one batch of events, in order of kind: `delivered` and `acked` as
    /// they came, then the negative outcomes that won their claims.
    pub(super) async fn process(&mut self, events: Vec<Event>) -> Vec<(Receipt, Out)> {
        let mut out = Vec::with_capacity(events.len());
        let mut pending = Vec::with_capacity(events.len());
        let mut published = Vec::with_capacity(events.len());
        for event in events {
            match event {
                Event::Delivered {
                    msg,
                    user,
                    conns,
                    at_ms,
                } => {
                    let value = self.render(&Record {
                        id: &msg.id,
                        msg_type: Some(&msg.msg_type),
                        user: &user,
                        outcome: Receipt::Delivered.label(),
                        conns: Some(conns),
                        conn: None,
                        node: &self.node,
                        ts: at_ms,
                    });
                    let key = user.to_string();
                    out.push((Receipt::Delivered, Out { key, value }));
                }
                Event::Routed { msg, users, at_ms } => {
                    for (user, routed) in users {
                        let outcome = match routed {
                            Routed::Filtered => Receipt::Filtered,
                            Routed::Expired => Receipt::Expired,
                        };
                        pending.push(Pending {
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
                        let value = self.render(&Record {
                            id,
                            msg_type: None,
                            user: &user,
                            outcome: Receipt::Acked.label(),
                            conns: None,
                            conn: Some(&conn),
                            node: &self.node,
                            ts: at_ms,
                        });
                        let key = user.to_string();
                        out.push((Receipt::Acked, Out { key, value }));
                    }
                }
                Event::Published {
                    header,
                    expired: true,
                    at_ms,
                } => {
                    let msg = MsgRef::of(&header);
                    for user in users_of(&header.to) {
                        pending.push(Pending {
                            msg: msg.clone(),
                            user: Arc::from(user),
                            outcome: Receipt::Expired,
                            at_ms,
                        });
                    }
                }
                Event::Published { header, at_ms, .. } => published.push((header, at_ms)),
            }
        }
        self.offline(&published, &mut pending).await;
        self.claim(pending, &mut out).await;
        out
    }

    /// Adds an `offline` candidate for each user of `published` without a matching
    /// connection anywhere (one presence call for the whole batch).
    async fn offline(&self, published: &[(Box<Header>, i64)], pending: &mut Vec<Pending>) {
        let Some(directory) = &self.directory else {
            return;
        };
        let mut queries = Vec::new();
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
            let msg = MsgRef::of(header);
            for user in users_of(&header.to) {
                if answers.next() == Some(false) {
                    pending.push(Pending {
                        msg: msg.clone(),
                        user: Arc::from(user),
                        outcome: Receipt::Offline,
                        at_ms: *at_ms,
                    });
                }
            }
        }
    }

    /// Claims every pending negative outcome in one round trip; renders the winners.
    async fn claim(&mut self, pending: Vec<Pending>, out: &mut Vec<(Receipt, Out)>) {
        if pending.is_empty() {
            return;
        }
        let won = match self.claims.claim(&pending).await {
            Ok(won) => won,
            Err(e) => {
                tracing::warn!(error = %e, "receipt claims failed: negative outcomes not reported");
                self.dropped(ReceiptDropped::ClaimFailed, pending.len());
                return;
            }
        };
        for (p, _) in pending.iter().zip(won).filter(|(_, won)| *won) {
            let value = self.render(&Record {
                id: &p.msg.id,
                msg_type: Some(&p.msg.msg_type),
                user: &p.user,
                outcome: p.outcome.label(),
                conns: Some(0),
                conn: None,
                node: &self.node,
                ts: p.at_ms,
            });
            out.push((
                p.outcome,
                Out {
                    key: p.user.to_string(),
                    value,
                },
            ));
        }
    }
}
