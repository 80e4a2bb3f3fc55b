//! Delivery receipts (DESIGN §6 "What the backend learns"): what became of each message for
//! each user it targeted, produced to `kafka.receipts_topic` for the backend (e.g. to send a
//! mobile push to a user who was offline). docs/delivery.md says exactly what each outcome
//! means and what races can produce.
//!
//! Four places report, none of them waiting: sessions (a message written to a user's
//! connections here, through a [`Ticket`]; and client `ack`s), the router (a user's
//! connections on this node that all had the type switched off, or the message had expired
//! when it got here), ingest (each user-targeted message it published, to be checked
//! against presence). Each hands a small event to a
//! [`Receipts`] handle: `try_send` into one bounded channel; full, the event is dropped and
//! counted (`fanout_receipts_dropped_total{reason="channel_full"}`). With
//! `kafka.receipts_topic` empty the handle is off and every report is one branch.
//!
//! One task per node ([`Task`]) takes the events in batches, and per batch:
//! * asks presence, in one call, which users of the published messages have a matching
//!   connection anywhere ([`Directory`]); those without one are `offline` candidates;
//! * claims every negative candidate (`offline`, `filtered`, `expired`) in one round trip
//!   ([`Claims`]: Redis `SET <key base>:receipt:<id>:<user> 1 NX EX <recovery.window>`,
//!   one script call; in memory on the in-process bus): only the first claim of an (id, user) in
//!   the cluster is produced, so the backend gets at most one negative outcome per message
//!   and user, whichever node or ingest saw it first;
//! * renders each record and hands it to a [`Sink`] (librdkafka's queue; full → dropped and
//!   counted), never waiting for the broker.
//!
//! `delivered` is not claimed: one record per node that wrote the message to the user's
//! sockets. The router gives the queue entries of a user's connections one shared
//! [`Ticket`]; each session marks it once the frame is written (flushed to the socket);
//! when the last entry is gone (written, or dropped with a closing connection) the ticket
//! reports `delivered` with the number of sockets written, or nothing if none was.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::Header;
use crate::clock::now_ms;
use crate::envelope::{Platform, Target};
use crate::kafka::Sink;
use crate::metrics::{Metrics, Receipt, ReceiptDropped};

/// Events waiting for the receipts task at most; beyond, they are dropped and counted.
pub const CHANNEL: usize = 8192;
/// Records the events waiting in the channel may become, at most (a message to many users
/// is one event of many entries); beyond, reports are dropped and counted.
pub const PENDING_MAX: usize = 1 << 18;
/// Events the task takes in one batch (one presence call, one claim round trip).
const BATCH: usize = 512;
/// How long the task lets a batch gather after its first event: without it, a steady
/// stream of messages makes batches of one or two events, each paying a presence call and
/// a claim round trip (S3 with receipts on cost 28-66% more CPU per delivery than off;
/// with 10 ms still 28% at 1,000 records/s, 8% with 50 ms). A receipt is a fact reported
/// on the side: 50 ms later is no loss to a backend deciding on a mobile push.
const LINGER: Duration = Duration::from_millis(50);
/// Ids of one `ack` frame carried by one event: a frame with more is split, so an event
/// holds at most this many ids of at most [`ACK_ID_MAX`] bytes (the channel holds at most
/// [`CHANNEL`] events: a bounded amount of memory, whatever clients send).
pub const ACK_IDS_PER_EVENT: usize = 64;
/// Longest id an `ack` may carry (message ids are ~30 bytes); longer ones are ignored.
pub const ACK_ID_MAX: usize = 128;
/// Claims remembered at most by the in-memory claims of the in-process bus.
const LOCAL_CLAIMS_MAX: usize = 1 << 20;

/// What a message's events share: its id and type, allocated once per message (and only
/// when there is something to report).
#[derive(Debug)]
pub struct MsgRef {
    pub id: Box<str>,
    pub msg_type: Box<str>,
}

impl MsgRef {
    pub fn of(header: &Header) -> Arc<Self> {
        Arc::new(Self {
            id: header.id.as_str().into(),
            msg_type: header.msg_type.as_str().into(),
        })
    }
}

/// A negative outcome the router saw for one user of a message on this node (what it
/// queued is reported by its [`Ticket`] once written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// The user's matching connections here have the type switched off (a candidate).
    Filtered,
    /// The message had expired when it got here (a candidate).
    Expired,
}

/// One report, on its way to the receipts task.
#[derive(Debug)]
enum Event {
    /// A message was written to `conns` of `user`'s sockets here (a [`Ticket`]'s report).
    Delivered {
        msg: Arc<MsgRef>,
        user: Arc<str>,
        conns: u32,
        at_ms: i64,
    },
    /// The router's negative reports for one message: one entry per user with matching
    /// connections here that it queued to none of (one event per message, not per user).
    Routed {
        msg: Arc<MsgRef>,
        users: Vec<(Arc<str>, Routed)>,
        at_ms: i64,
    },
    /// Ingest published a user-targeted message: its users without a matching connection
    /// anywhere are `offline` (all of them `expired` if it had expired already).
    Published {
        header: Box<Header>,
        expired: bool,
        at_ms: i64,
    },
    /// A client acknowledged `ids`.
    Acked {
        user: Arc<str>,
        conn: Arc<str>,
        ids: Vec<String>,
        at_ms: i64,
    },
}

impl Event {
    /// How many records it may become: what the bound on pending reports counts.
    fn weight(&self) -> usize {
        match self {
            Event::Delivered { .. } => 1,
            Event::Routed { users, .. } => users.len(),
            Event::Published { header, .. } => users_of(&header.to).count(),
            Event::Acked { ids, .. } => ids.len(),
        }
        .max(1)
    }
}

/// The reporting end: cheap to clone, never waits. Off (every call one branch) when
/// `kafka.receipts_topic` is empty.
#[derive(Clone, Default)]
pub struct Receipts {
    /// Shared: a [`Ticket`] holds a clone, one reference count.
    on: Option<Arc<On>>,
}

struct On {
    tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    /// Records the events in the channel may become ([`Event::weight`]), at most
    /// [`PENDING_MAX`]: what bounds the memory of events of many users each.
    pending: Arc<AtomicUsize>,
}

/// True for the targets receipts are about (`to.user`, `to.users`).
pub fn is_user_target(to: &Target) -> bool {
    matches!(to, Target::User { .. } | Target::Users(_))
}

impl Receipts {
    /// A handle that reports nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// A handle and the receiving end for [`Task`].
    pub fn channel(metrics: Arc<Metrics>) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let pending = Arc::new(AtomicUsize::new(0));
        (
            Self {
                on: Some(Arc::new(On {
                    tx,
                    metrics,
                    pending: pending.clone(),
                })),
            },
            Inbox { rx, pending },
        )
    }

    /// True when receipts are produced.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    fn send(&self, event: Event) {
        let Some(on) = &self.on else { return };
        let weight = event.weight();
        let queued = on.pending.fetch_add(weight, Ordering::Relaxed) + weight <= PENDING_MAX
            && on.tx.try_send(event).is_ok();
        if !queued {
            on.pending.fetch_sub(weight, Ordering::Relaxed);
            on.metrics
                .receipts_dropped
                .with_label_values(&[ReceiptDropped::ChannelFull.label()])
                .inc_by(weight as u64);
        }
    }

    /// A ticket for `msg` to `user`'s connections here, to queue with each of its
    /// frames; `None` when off.
    #[inline]
    pub fn ticket(&self, msg: &Arc<MsgRef>, user: &Arc<str>) -> Option<Arc<Ticket>> {
        self.on.as_ref().map(|_| {
            Arc::new(Ticket {
                receipts: self.clone(),
                msg: msg.clone(),
                user: user.clone(),
                written: AtomicU32::new(0),
            })
        })
    }

    /// The router's negative reports for `msg` on this node (see [`Routed`]); nothing if
    /// empty.
    pub fn routed(&self, msg: Arc<MsgRef>, users: Vec<(Arc<str>, Routed)>) {
        if !users.is_empty() {
            self.send(Event::Routed {
                msg,
                users,
                at_ms: now_ms(),
            });
        }
    }

    /// Ingest published `header`'s message (not a duplicate). Ignores other targets.
    pub fn published(&self, header: &Header, now_ms: i64) {
        if self.is_on() && is_user_target(&header.to) {
            self.send(Event::Published {
                header: Box::new(header.clone()),
                expired: header.expired(now_ms),
                at_ms: now_ms,
            });
        }
    }

    /// A client of `user` on connection `conn` acknowledged `ids`.
    pub fn acked(&self, user: &Arc<str>, conn: &Arc<str>, ids: Vec<String>) {
        let Some(on) = &self.on else { return };
        let before = ids.len();
        let mut ids: Vec<String> = ids
            .into_iter()
            .filter(|id| id.len() <= ACK_ID_MAX)
            .collect();
        let bad = before - ids.len();
        if bad > 0 {
            on.metrics
                .receipts_dropped
                .with_label_values(&[ReceiptDropped::BadAck.label()])
                .inc_by(bad as u64);
        }
        let at_ms = now_ms();
        while !ids.is_empty() {
            let rest = ids.split_off(ids.len().min(ACK_IDS_PER_EVENT));
            self.send(Event::Acked {
                user: user.clone(),
                conn: conn.clone(),
                ids: std::mem::replace(&mut ids, rest),
                at_ms,
            });
        }
    }
}

/// One message on its way to one user's connections on this node, shared by their queue
/// entries: each session [marks](Self::written) it when it has written the frame; when the
/// last entry lets go (written, skipped, or dropped with a closing connection), it reports
/// `delivered` with the number of sockets written — nothing if none was (every connection
/// closed first: the outcome is then unknown here, as when every queue was full).
#[derive(Debug)]
pub struct Ticket {
    receipts: Receipts,
    msg: Arc<MsgRef>,
    user: Arc<str>,
    written: AtomicU32,
}

impl Ticket {
    /// One more socket had the frame written (flushed).
    #[inline]
    pub fn written(&self) {
        self.written.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let conns = *self.written.get_mut();
        if conns > 0 {
            self.receipts.send(Event::Delivered {
                msg: self.msg.clone(),
                user: self.user.clone(),
                conns,
                at_ms: now_ms(),
            });
        }
    }
}

impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipts")
            .field("on", &self.is_on())
            .finish()
    }
}

/// The receiving end of a [`Receipts`] handle.
pub struct Inbox {
    rx: mpsc::Receiver<Event>,
    pending: Arc<AtomicUsize>,
}

impl Inbox {
    /// Takes up to `max` events into `batch`; 0 when every handle is gone (or closed).
    /// Appends to `batch`: only what it takes leaves the pending count.
    async fn recv_many(&mut self, batch: &mut Vec<Event>, max: usize) -> usize {
        let before = batch.len();
        let n = self.rx.recv_many(batch, max).await;
        let weight: usize = batch[before..].iter().map(Event::weight).sum();
        self.pending.fetch_sub(weight, Ordering::Relaxed);
        n
    }
}

#[cfg(test)]
impl Inbox {
    /// What was reported so far, one line per event: `<kind> <id> <user> [conns]`.
    pub fn summaries(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(event) = self.rx.try_recv() {
            self.pending.fetch_sub(event.weight(), Ordering::Relaxed);
            match event {
                Event::Delivered {
                    msg, user, conns, ..
                } => out.push(format!("delivered {} {user} {conns}", msg.id)),
                Event::Routed { msg, users, .. } => {
                    out.extend(users.iter().map(|(user, routed)| match routed {
                        Routed::Filtered => format!("filtered {} {user}", msg.id),
                        Routed::Expired => format!("expired {} {user}", msg.id),
                    }))
                }
                Event::Published {
                    header, expired, ..
                } => out.push(format!("published {} expired={expired}", header.id)),
                Event::Acked {
                    user, conn, ids, ..
                } => out.push(format!("acked {} {user} {conn}", ids.join(","))),
            }
        }
        out
    }
}

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

/// Decides which node reports a negative outcome: the first to claim (id, user).
pub enum Claims {
    /// A cluster: [`RedisClaims`].
    Redis(RedisClaims),
    /// One process (the in-process bus): remembered here for `window`.
    Local(LocalClaims),
}

/// Claims in Redis: `SET <key base>:receipt:<id>:<user> 1 NX EX <window>` for every key of
/// a batch, in one script call (one command for the client to encode and route, however many
/// claims: a pipeline of one `SET` each cost the receipts task more than all its other
/// work). The key base is the bus's: `<prefix>` on one Redis, `{<prefix>}` on a Redis
/// Cluster, where a script's keys must all be in one slot.
pub struct RedisClaims {
    client: fred::clients::Client,
    /// `<key base>:receipt:`
    base: String,
    window_secs: String,
    script: fred::types::scripts::Script,
}

/// KEYS: the claims; ARGV: the window in seconds. 1 for each claim this call won, else 0.
const CLAIM_LUA: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, '1', 'NX', 'EX', ARGV[1]) then out[i] = 1 else out[i] = 0 end
end
return out
"#;

impl RedisClaims {
    /// Claims under `key_base` (the bus's [`crate::bus::redis::RedisBus::key_base`]).
    pub fn new(client: fred::clients::Client, key_base: &str, window: Duration) -> Self {
        Self {
            client,
            base: format!("{key_base}:receipt:"),
            window_secs: window.as_secs().max(1).to_string(),
            script: fred::types::scripts::Script::from_lua(CLAIM_LUA),
        }
    }

    /// The key of the claim on (`id`, `user`).
    fn key(&self, id: &str, user: &str) -> String {
        let mut key = String::with_capacity(self.base.len() + id.len() + 1 + user.len());
        key.push_str(&self.base);
        key.push_str(id);
        key.push(':');
        key.push_str(user);
        key
    }

    async fn claim(&self, pending: &[Pending]) -> Result<Vec<bool>, String> {
        use fred::prelude::*;
        let keys: Vec<String> = pending
            .iter()
            .map(|p| self.key(&p.msg.id, &p.user))
            .collect();
        let reply: Value = self
            .script
            .evalsha_with_reload(&self.client, keys, vec![self.window_secs.clone()])
            .await
            .map_err(|e| e.to_string())?;
        let Value::Array(won) = reply else {
            return Err(format!("claims answered {reply:?}"));
        };
        if won.len() != pending.len() {
            return Err(format!("{} replies to {} claims", won.len(), pending.len()));
        }
        Ok(won.iter().map(|v| v.as_i64() == Some(1)).collect())
    }
}

/// Claims kept in memory for `window` (at most [`LOCAL_CLAIMS_MAX`]).
pub struct LocalClaims {
    set: HashSet<String>,
    order: VecDeque<(Instant, String)>,
    window: Duration,
}

impl LocalClaims {
    pub fn new(window: Duration) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            window,
        }
    }

    fn claim(&mut self, id: &str, user: &str) -> bool {
        let key = format!("{id}:{user}");
        let now = Instant::now();
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window && self.order.len() < LOCAL_CLAIMS_MAX {
                break;
            }
            let (_, old) = self.order.pop_front().expect("front exists");
            self.set.remove(&old);
        }
        if self.set.contains(&key) {
            return false;
        }
        self.set.insert(key.clone());
        self.order.push_back((now, key));
        true
    }
}

impl Claims {
    /// One answer per pending outcome: true if its claim was the first.
    async fn claim(&mut self, pending: &[Pending]) -> Result<Vec<bool>, String> {
        match self {
            Claims::Local(local) => Ok(pending
                .iter()
                .map(|p| local.claim(&p.msg.id, &p.user))
                .collect()),
            Claims::Redis(redis) => redis.claim(pending).await,
        }
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

/// A negative outcome waiting for its claim.
struct Pending {
    msg: Arc<MsgRef>,
    user: Arc<str>,
    outcome: Receipt,
    at_ms: i64,
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
struct Worker {
    node: String,
    claims: Claims,
    directory: Option<Arc<dyn Directory>>,
    metrics: Arc<Metrics>,
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
    async fn process(&mut self, events: Vec<Event>) -> Vec<(Receipt, Out)> {
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

/// The users a `to.user` / `to.users` target names, in order.
fn users_of(to: &Target) -> impl Iterator<Item = &str> {
    let (one, many): (Option<&str>, &[String]) = match to {
        Target::User { user, .. } => (Some(user), &[]),
        Target::Users(users) => (None, users),
        Target::Conn(_) | Target::Group(_) | Target::All => (None, &[]),
    };
    one.into_iter().chain(many.iter().map(String::as_str))
}

#[cfg(test)]
mod tests;
