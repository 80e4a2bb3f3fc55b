//! Presence: which connections each user has open, on every node of the cluster (DESIGN §5
//! `GET /v1/users/{user}/connections`, §6 `kafka.presence_topic`).
//!
//! The gateway calls [`Presence::connected`] once a connection's handshake succeeded and
//! [`Presence::disconnected`] when its session ended: two calls per connection, neither
//! waits for anything. Each updates this node's own table (its live connections, the only
//! memory presence holds: bounded by the node's connections) and hands the event to the
//! presence topic without waiting (librdkafka's bounded queue; dropped and counted when it
//! is full).
//!
//! On the Redis bus the table is mirrored into Redis by one writer task ([`Presence::run`]):
//! changes mark the connection dirty and wake it; it writes them in pipelined batches.
//! Readers ([`Presence::connections`], [`Presence::online`]) ask Redis and see every node's
//! connections, except those of nodes that stopped heartbeating (see `redis.rs` for the
//! keys, the heartbeat, the dead bound and the sweep of a dead node's entries). On the
//! in-process bus of the embedded default the node is the whole cluster: readers answer
//! from the table.
//!
//! Every change is numbered ([`Presence::connected`] returns the number of its write); the
//! writer publishes the highest number it knows to be in Redis, so a caller can wait for
//! one write ([`Presence::written`]): routed mode (`bus.routing = "routed"`) reads presence
//! to decide which nodes get a message, so a connection there waits for its entry before
//! it reads its history and says `hello`.
//!
//! Invariants:
//! * Nothing here runs per message, and nothing the gateway calls awaits (except, in routed
//!   mode, [`Presence::written`], bounded by a timeout): a Redis outage costs presence
//!   accuracy, never a session's progress.
//! * After a write failed, a Redis reconnect, or when the node finds it was taken for dead,
//!   it writes all its live connections again (and removes what Redis holds for it that is
//!   no longer live): Redis converges to the table.

mod events;
mod redis;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::envelope::Platform;
use crate::kafka::Sink;
use crate::metrics::Metrics;

pub use self::redis::{dead_bound, HEARTBEAT_PERIOD};

/// One live connection as presence reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnInfo {
    pub user: String,
    /// The id the server gave it (`hello.conn`).
    pub conn: String,
    /// `node.id` of the node holding it.
    pub node: String,
    pub platform: Option<Platform>,
    pub tab: Option<String>,
    /// When its handshake completed, ms since the epoch.
    pub connected_at: i64,
}

impl ConnInfo {
    /// True if it is on `platform` (when given) and announced `tab` (when given): the rule
    /// of the envelope's `to` (DESIGN §2).
    pub fn matches(&self, platform: Option<Platform>, tab: Option<&str>) -> bool {
        platform.is_none_or(|p| self.platform == Some(p))
            && tab.is_none_or(|t| self.tab.as_deref() == Some(t))
    }
}

/// "Does `user` have a connection (on `platform`, with `tab`, when given) anywhere?"
#[derive(Debug, Clone, Copy)]
pub struct OnlineQuery<'a> {
    pub user: &'a str,
    pub platform: Option<Platform>,
    pub tab: Option<&'a str>,
}

/// Why a presence read failed (the Redis bus only).
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
}

/// Where the cluster's presence lives.
pub enum Backend {
    /// The embedded default's in-process bus: this node is the cluster.
    Local,
    /// Redis (the client of the Redis bus, [`crate::bus::redis::RedisBus::client`]), keys
    /// under `<prefix>:presence:`, where `prefix` is the bus's
    /// [`key_base`](crate::bus::redis::RedisBus::key_base) (`{<prefix>}` on a Redis Cluster).
    Redis {
        client: fred::clients::Client,
        prefix: String,
    },
}

/// What presence is built from.
pub struct Options {
    /// `node.id`.
    pub node: String,
    pub backend: Backend,
    /// `kafka.session_timeout`: the dead bound of a node is derived from it
    /// ([`dead_bound`]).
    pub session_timeout: Duration,
    /// The producer and `kafka.presence_topic`, when that is set.
    pub events: Option<(Sink, String)>,
    pub metrics: Arc<Metrics>,
}

/// A connection in presence; reports it disconnected when dropped.
pub struct Presented {
    presence: Presence,
    pub user: Arc<str>,
    pub conn: Arc<str>,
    /// The close code reported.
    pub code: u16,
    /// The number of its write ([`Presence::written`]).
    pub mark: u64,
}

impl Drop for Presented {
    fn drop(&mut self) {
        self.presence
            .disconnected(&self.user, &self.conn, self.code);
    }
}

/// A cheap-to-clone handle on the cluster's presence.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    table: Mutex<Table>,
    /// Wakes the writer task when something became dirty.
    wake: Notify,
    /// Every change numbered up to this one is in Redis (see [`Table::marked`]).
    written: watch::Sender<u64>,
    /// How many times the writer found this node had been taken for dead (its entries
    /// may have been swept meanwhile).
    lost: watch::Sender<u64>,
    store: Option<redis::Store>,
    events: Option<events::Events>,
    metrics: Arc<Metrics>,
}

/// Most connections marked dirty before the writer gives up on the list and rewrites
/// everything instead (Redis slow or away for long under churn): keeps the list bounded.
const DIRTY_MAX: usize = 100_000;

/// This node's live connections, and what Redis has not been told yet.
#[derive(Default)]
struct Table {
    /// user → their live connections on this node.
    users: HashMap<String, Vec<ConnInfo>>,
    /// Connections to write (their user, and whether they are to be put or removed).
    dirty: HashMap<String, Change>,
    /// Redis must be brought in line with the whole table (after a failed write, a
    /// reconnect, an overflowing `dirty`).
    resync: bool,
    /// Live connections, for the gauge.
    count: usize,
    /// Changes marked so far: the number of the last one. Once the writer finds `dirty`
    /// empty (and no resync due) after writing, every change up to it is in Redis.
    marked: u64,
}

/// What to write for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Put { user: String },
    Remove { user: String },
}

impl Table {
    /// Marks `conn` to be written; the change's number.
    fn mark(&mut self, conn: &str, change: Change) -> u64 {
        self.marked += 1;
        if self.dirty.len() >= DIRTY_MAX && !self.dirty.contains_key(conn) {
            self.dirty.clear();
            self.resync = true;
        }
        if !self.resync {
            self.dirty.insert(conn.to_owned(), change);
        }
        self.marked
    }

    fn find(&self, user: &str, conn: &str) -> Option<&ConnInfo> {
        self.users.get(user)?.iter().find(|c| c.conn == conn)
    }

    fn remove(&mut self, user: &str, conn: &str) -> Option<ConnInfo> {
        let conns = self.users.get_mut(user)?;
        let i = conns.iter().position(|c| c.conn == conn)?;
        let info = conns.swap_remove(i);
        if conns.is_empty() {
            self.users.remove(user);
        }
        self.count -= 1;
        Some(info)
    }

    fn all(&self) -> Vec<ConnInfo> {
        self.users.values().flatten().cloned().collect()
    }
}

impl Presence {
    pub fn new(options: Options) -> Self {
        let Options {
            node,
            backend,
            session_timeout,
            events,
            metrics,
        } = options;
        let store = match backend {
            Backend::Local => None,
            Backend::Redis { client, prefix } => Some(redis::Store::new(
                client,
                &prefix,
                &node,
                dead_bound(session_timeout),
            )),
        };
        let events = events.map(|(producer, topic)| events::Events::new(producer, topic));
        Self {
            inner: Arc::new(Inner {
                node,
                table: Mutex::new(Table::default()),
                wake: Notify::new(),
                written: watch::Sender::new(0),
                lost: watch::Sender::new(0),
                store,
                events,
                metrics,
            }),
        }
    }

    /// This node's id (`node.id`), for the [`ConnInfo`]s it reports.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// A connection completed its handshake. Does not wait. Returns the number of its
    /// write, for [`written`](Self::written) (0 without Redis: nothing to wait for).
    pub fn connected(&self, info: ConnInfo) -> u64 {
        let inner = &self.inner;
        if let Some(events) = &inner.events {
            events.connect(&info, info.connected_at, &inner.metrics);
        }
        let mut table = inner.table.lock();
        let mut mark = 0;
        if inner.store.is_some() {
            mark = table.mark(
                &info.conn,
                Change::Put {
                    user: info.user.clone(),
                },
            );
        }
        // Most users have one connection per node: no room for four (`Vec`'s first growth).
        table
            .users
            .entry(info.user.clone())
            .or_insert_with(|| Vec::with_capacity(1))
            .push(info);
        table.count += 1;
        inner.metrics.presence_connections.set(table.count as i64);
        drop(table);
        inner.wake.notify_one();
        mark
    }

    /// Waits until the write numbered `mark` ([`connected`](Self::connected)) is in Redis,
    /// at most `within`; false if it is not by then. True at once without Redis.
    pub async fn written(&self, mark: u64, within: Duration) -> bool {
        let mut written = self.inner.written.subscribe();
        let wait = async move { written.wait_for(|w| *w >= mark).await.is_ok() };
        tokio::time::timeout(within, wait).await.unwrap_or(false)
    }

    /// Changes each time the writer finds that this node had been taken for dead by the
    /// cluster (cut off from Redis, or stalled, for longer than the dead bound): its entries
    /// may have been swept, and until it wrote them again nobody could find its
    /// connections (in routed mode, messages for its users reached no node).
    pub fn entries_lost(&self) -> watch::Receiver<u64> {
        self.inner.lost.subscribe()
    }

    /// [`connected`](Self::connected), and a guard that reports the connection
    /// [`disconnected`](Self::disconnected) when dropped, with the code set in
    /// [`Presented::code`] (1006 unless set: a session that panicked was lost abnormally).
    pub fn present(&self, info: ConnInfo, user: Arc<str>, conn: Arc<str>) -> Presented {
        let mark = self.connected(info);
        Presented {
            presence: self.clone(),
            user,
            conn,
            code: redis::CODE_GONE,
            mark,
        }
    }

    /// A connection's session ended with close `code` (1006 when the connection was lost
    /// without a close frame). Does not wait; an unknown connection is ignored.
    pub fn disconnected(&self, user: &str, conn: &str, code: u16) {
        let inner = &self.inner;
        let mut table = inner.table.lock();
        let Some(info) = table.remove(user, conn) else {
            return;
        };
        if inner.store.is_some() {
            table.mark(
                conn,
                Change::Remove {
                    user: user.to_owned(),
                },
            );
        }
        inner.metrics.presence_connections.set(table.count as i64);
        drop(table);
        inner.wake.notify_one();
        if let Some(events) = &inner.events {
            events.disconnect(&info, code, crate::clock::now_ms(), &inner.metrics);
        }
    }

    /// `user`'s live connections on every live node, oldest first.
    pub async fn connections(&self, user: &str) -> Result<Vec<ConnInfo>, PresenceError> {
        let mut conns = match &self.inner.store {
            None => self
                .inner
                .table
                .lock()
                .users
                .get(user)
                .cloned()
                .unwrap_or_default(),
            Some(store) => store.connections(user).await?,
        };
        conns.sort_by(|a, b| (a.connected_at, &a.conn).cmp(&(b.connected_at, &b.conn)));
        Ok(conns)
    }

    /// For each query, whether a matching connection exists on any live node. Answered
    /// from this node's table where it can, the rest with one Redis call.
    pub async fn online(&self, targets: &[OnlineQuery<'_>]) -> Result<Vec<bool>, PresenceError> {
        let mut online: Vec<bool> = {
            let table = self.inner.table.lock();
            targets
                .iter()
                .map(|q| {
                    table
                        .users
                        .get(q.user)
                        .is_some_and(|conns| conns.iter().any(|c| c.matches(q.platform, q.tab)))
                })
                .collect()
        };
        let Some(store) = &self.inner.store else {
            return Ok(online);
        };
        let rest: Vec<(usize, OnlineQuery<'_>)> = targets
            .iter()
            .enumerate()
            .filter(|(i, _)| !online[*i])
            .map(|(i, q)| (i, *q))
            .collect();
        if rest.is_empty() {
            return Ok(online);
        }
        let queries: Vec<OnlineQuery<'_>> = rest.iter().map(|(_, q)| *q).collect();
        let answers = store.online(&queries).await?;
        for ((i, _), answer) in rest.iter().zip(answers) {
            online[*i] = answer;
        }
        Ok(online)
    }

    /// The writer task of the Redis backend (on the in-process one it waits for `shutdown`): first
    /// removes what a previous run of this node left in Redis (reporting those connections
    /// disconnected), then until `shutdown` writes what became dirty, heartbeats, rewrites
    /// everything when needed, and sweeps dead nodes. At `shutdown` it removes this node's
    /// entries: the node leaves presence.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PresenceError> {
        let Some(store) = &self.inner.store else {
            shutdown.cancelled().await;
            return Ok(());
        };
        redis::Writer::new(&self.inner, store).run(shutdown).await
    }
}
