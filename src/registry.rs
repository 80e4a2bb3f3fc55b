//! The local index: which users and connections this node holds.
//!
//! Invariants:
//! * The index is read on every bus message, so it is behind a synchronous lock that is
//!   never held across an `.await`; pushing to a connection is `try_send`, never a wait.
//! * A connection is registered by [`Registry::register`] and removed when its
//!   [`Registration`] guard drops, whatever way its session ended.
//! * A user's preferences live in their entry, shared by their connections, loaded before
//!   their first connection and dropped with their last: the per-node preference cache.
//! * A connection's queue is bounded by messages and bytes; overflowing it asks that one
//!   connection to close with 4001 and never slows anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::envelope::{Platform, Target};
use crate::metrics::Metrics;

/// A frame waiting in a connection's queue.
#[derive(Debug)]
pub struct Queued {
    pub frame: Utf8Bytes,
    /// Kafka timestamp of a `msg` frame (for the latency histogram); `None` for replies.
    pub ts_ms: Option<i64>,
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue is full: the connection has been asked to close with 4001.
    Overflow,
    /// The connection is already closing.
    Closed,
}

/// One user's preference bits on this node (see [`crate::types`]).
#[derive(Debug)]
pub struct UserPrefs {
    bits: AtomicU64,
    /// Version of `bits` (see [`crate::prefs::Change::version`]); written only under the
    /// registry's write lock.
    version: AtomicI64,
}

impl UserPrefs {
    pub fn new(bits: u64, version: i64) -> Self {
        Self {
            bits: AtomicU64::new(bits),
            version: AtomicI64::new(version),
        }
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.bits.load(Ordering::Relaxed)
    }

    pub fn version(&self) -> i64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Takes `bits` unless they are older than what is held; true if taken.
    fn update(&self, bits: u64, version: i64) -> bool {
        if version < self.version() {
            return false;
        }
        self.version.store(version, Ordering::Relaxed);
        self.bits.store(bits, Ordering::Relaxed);
        true
    }
}

/// The router's and other tasks' handle on one connection.
pub struct ConnHandle {
    pub id: Arc<str>,
    pub user: Arc<str>,
    /// Shared with every connection of the same user on this node.
    pub prefs: Arc<UserPrefs>,
    pub platform: Option<Platform>,
    pub tab: Option<Box<str>>,
    queue: mpsc::Sender<Queued>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    close_code: AtomicU16,
    close_notify: Notify,
}

impl ConnHandle {
    /// Queues a frame without waiting. On overflow, asks the session to close with 4001.
    pub fn push(&self, frame: Utf8Bytes, ts_ms: Option<i64>) -> Result<(), PushError> {
        if self.close_code.load(Ordering::Relaxed) != 0 {
            return Err(PushError::Closed);
        }
        let len = frame.len();
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(4001);
            return Err(PushError::Overflow);
        }
        match self.queue.try_send(Queued { frame, ts_ms }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        self.close(4001);
                        Err(PushError::Overflow)
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(PushError::Closed),
                }
            }
        }
    }

    /// Called by the session for every frame it takes off the queue.
    pub fn dequeued(&self, frame_len: usize) {
        self.queued_bytes.fetch_sub(frame_len, Ordering::Relaxed);
    }

    /// Asks the session to close with `code`; the first request wins.
    pub fn close(&self, code: u16) {
        if self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.close_notify.notify_one();
        }
    }

    /// Resolves once [`close`](Self::close) was called, with its code.
    pub async fn closed(&self) -> u16 {
        loop {
            let code = self.close_code.load(Ordering::Acquire);
            if code != 0 {
                return code;
            }
            self.close_notify.notified().await;
        }
    }

    fn matches(&self, platform: Option<Platform>, tab: Option<&str>) -> bool {
        platform.is_none_or(|p| self.platform == Some(p))
            && tab.is_none_or(|t| self.tab.as_deref() == Some(t))
    }
}

/// Why a connection could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("this node is at server.max_connections")]
    NodeFull,
    #[error("this user is at server.max_connections_per_user")]
    UserFull,
}

/// Limits applied at registration and to each queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub queue_max_messages: usize,
    pub queue_max_bytes: usize,
}

#[cfg(test)]
impl Limits {
    /// Room for a handful of connections, for unit tests.
    pub fn small() -> Self {
        Self {
            max_connections: 10,
            max_connections_per_user: 10,
            queue_max_messages: 10,
            queue_max_bytes: 1 << 20,
        }
    }
}

struct UserEntry {
    conns: Vec<Arc<ConnHandle>>,
    prefs: Arc<UserPrefs>,
}

/// Changes seen for users not (yet) registered here are kept this long, so a connection
/// whose preferences were read from the database just before a change still gets it.
const PENDING_MS: i64 = 60_000;
const PENDING_MAX: usize = 10_000;

#[derive(Default)]
struct Index {
    by_user: HashMap<Arc<str>, UserEntry>,
    by_conn: HashMap<Arc<str>, Arc<ConnHandle>>,
    /// Recent changes for users without an entry.
    pending: HashMap<Box<str>, Pending>,
}

/// A change for a user not (yet) registered here.
struct Pending {
    received_ms: i64,
    version: i64,
    bits: u64,
}

/// The connections of this node.
pub struct Registry {
    index: RwLock<Index>,
    limits: Limits,
    id_prefix: String,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

/// Removes its connection from the registry when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    conn: Arc<ConnHandle>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.remove(&self.conn);
    }
}

impl Registry {
    /// An empty registry. Connection ids are `c-<random>-<counter>`, unique in a cluster.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::new(Index::default()),
            limits,
            id_prefix: format!("c-{:08x}", rand::random::<u32>()),
            next_id: AtomicU64::new(1),
            metrics,
        })
    }

    /// Open connections on this node.
    pub fn connection_count(&self) -> usize {
        self.index.read().by_conn.len()
    }

    /// Users with at least one open connection on this node.
    pub fn user_count(&self) -> usize {
        self.index.read().by_user.len()
    }

    /// True when a new connection would exceed `server.max_connections`.
    pub fn is_full(&self) -> bool {
        self.connection_count() >= self.limits.max_connections
    }

    /// The preferences of `user` if they have a connection here.
    pub fn user_prefs(&self, user: &str) -> Option<Arc<UserPrefs>> {
        self.index.read().by_user.get(user).map(|e| e.prefs.clone())
    }

    /// Applies a preference change to `user`'s connections here and queues `frame` (the
    /// `prefs` frame) on each; for an unknown user, remembers it briefly. Returns how many
    /// connections were told.
    pub fn apply_prefs(&self, user: &str, bits: u64, version: i64, frame: &Utf8Bytes) -> usize {
        let mut index = self.index.write();
        if let Some(entry) = index.by_user.get(user) {
            if !entry.prefs.update(bits, version) {
                return 0; // an older announcement overtaken by a newer one
            }
            entry
                .conns
                .iter()
                .filter(|c| c.push(frame.clone(), None).is_ok())
                .count()
        } else {
            let now = crate::router::now_ms();
            if index.pending.len() >= PENDING_MAX {
                index
                    .pending
                    .retain(|_, p| p.received_ms > now - PENDING_MS);
                if index.pending.len() >= PENDING_MAX {
                    index.pending.clear();
                }
            }
            let newer = index.pending.get(user).is_none_or(|p| p.version <= version);
            if newer {
                index.pending.insert(
                    user.into(),
                    Pending {
                        received_ms: now,
                        version,
                        bits,
                    },
                );
            }
            0
        }
    }

    /// Adds a connection; returns its guard, handle and the receiving end of its queue.
    /// `bits` are the user's preferences as read, at `version`; they are used only when the
    /// user has no connection here yet (and no newer change arrived meanwhile).
    pub fn register(
        self: &Arc<Self>,
        user: &str,
        platform: Option<Platform>,
        tab: Option<String>,
        bits: u64,
        version: i64,
    ) -> Result<(Registration, Arc<ConnHandle>, mpsc::Receiver<Queued>), RegisterError> {
        let (tx, rx) = mpsc::channel(self.limits.queue_max_messages);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut index = self.index.write();
        if index.by_conn.len() >= self.limits.max_connections {
            return Err(RegisterError::NodeFull);
        }
        let (user, prefs) = match index.by_user.get_key_value(user) {
            Some((existing, entry)) => {
                if entry.conns.len() >= self.limits.max_connections_per_user {
                    return Err(RegisterError::UserFull);
                }
                (existing.clone(), entry.prefs.clone())
            }
            None => {
                let prefs = match index.pending.remove(user) {
                    Some(p) if p.version >= version => UserPrefs::new(p.bits, p.version),
                    _ => UserPrefs::new(bits, version),
                };
                (Arc::from(user), Arc::new(prefs))
            }
        };
        let conn = Arc::new(ConnHandle {
            id: Arc::from(format!("{}-{n:x}", self.id_prefix)),
            user: user.clone(),
            prefs: prefs.clone(),
            platform,
            tab: tab.map(String::into_boxed_str),
            queue: tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes: self.limits.queue_max_bytes,
            close_code: AtomicU16::new(0),
            close_notify: Notify::new(),
        });
        index
            .by_user
            .entry(user)
            .or_insert_with(|| UserEntry {
                conns: Vec::new(),
                prefs,
            })
            .conns
            .push(conn.clone());
        index.by_conn.insert(conn.id.clone(), conn.clone());
        self.metrics.connections.set(index.by_conn.len() as i64);
        self.metrics.users.set(index.by_user.len() as i64);
        self.metrics
            .prefs_cache_users
            .set(index.by_user.len() as i64);
        drop(index);
        let guard = Registration {
            registry: self.clone(),
            conn: conn.clone(),
        };
        Ok((guard, conn, rx))
    }

    fn remove(&self, conn: &Arc<ConnHandle>) {
        let mut index = self.index.write();
        index.by_conn.remove(&conn.id);
        if let Some(entry) = index.by_user.get_mut(&conn.user) {
            entry.conns.retain(|c| !Arc::ptr_eq(c, conn));
            if entry.conns.is_empty() {
                index.by_user.remove(&conn.user);
            }
        }
        self.metrics.connections.set(index.by_conn.len() as i64);
        self.metrics.users.set(index.by_user.len() as i64);
        self.metrics
            .prefs_cache_users
            .set(index.by_user.len() as i64);
    }

    /// Calls `f` for every local connection `target` selects. Holds the read lock
    /// meanwhile, so `f` must not block.
    pub fn for_each_target(&self, target: &Target, mut f: impl FnMut(&Arc<ConnHandle>)) {
        let index = self.index.read();
        match target {
            Target::User {
                user,
                platform,
                tab,
            } => {
                for conn in index
                    .by_user
                    .get(user.as_str())
                    .into_iter()
                    .flat_map(|e| &e.conns)
                {
                    if conn.matches(*platform, tab.as_deref()) {
                        f(conn);
                    }
                }
            }
            Target::Users(users) => {
                for user in users {
                    index
                        .by_user
                        .get(user.as_str())
                        .into_iter()
                        .flat_map(|e| &e.conns)
                        .for_each(&mut f);
                }
            }
            Target::Conn(id) => index.by_conn.get(id.as_str()).into_iter().for_each(f),
            Target::All => index.by_conn.values().for_each(f),
        }
    }

    /// Calls `f` for every connection of this node (used when closing them all).
    pub fn for_each(&self, f: impl FnMut(&Arc<ConnHandle>)) {
        self.index.read().by_conn.values().for_each(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(per_user: usize, queue: usize, bytes: usize) -> Arc<Registry> {
        Registry::new(
            Limits {
                max_connections: per_user + 1,
                max_connections_per_user: per_user,
                queue_max_messages: queue,
                queue_max_bytes: bytes,
            },
            Arc::new(Metrics::new()),
        )
    }

    fn ids(reg: &Registry, target: &Target) -> Vec<String> {
        let mut out = Vec::new();
        reg.for_each_target(target, |c| {
            out.push(format!("{}/{}", c.user, c.tab.as_deref().unwrap_or("-")))
        });
        out.sort();
        out
    }

    #[test]
    fn targets_select_the_right_connections() {
        let reg = registry(5, 8, 1024);
        let (_a1, a1, _r1) = reg
            .register("alice", Some(Platform::Ios), Some("t1".into()), 0, 0)
            .unwrap();
        let (_a2, _, _r2) = reg
            .register("alice", Some(Platform::H5), Some("t2".into()), 0, 0)
            .unwrap();
        let (_b, _, _r3) = reg.register("bob", None, None, 0, 0).unwrap();
        let user = |u: &str, p, t: Option<&str>| Target::User {
            user: u.into(),
            platform: p,
            tab: t.map(Into::into),
        };
        assert_eq!(
            ids(&reg, &user("alice", None, None)),
            ["alice/t1", "alice/t2"]
        );
        assert_eq!(
            ids(&reg, &user("alice", Some(Platform::H5), None)),
            ["alice/t2"]
        );
        assert_eq!(ids(&reg, &user("alice", None, Some("t1"))), ["alice/t1"]);
        assert_eq!(
            ids(&reg, &user("alice", Some(Platform::Android), None)),
            Vec::<String>::new()
        );
        assert_eq!(ids(&reg, &user("carol", None, None)), Vec::<String>::new());
        assert_eq!(
            ids(&reg, &Target::Users(vec!["bob".into(), "carol".into()])),
            ["bob/-"]
        );
        assert_eq!(ids(&reg, &Target::Conn(a1.id.to_string())), ["alice/t1"]);
        assert_eq!(ids(&reg, &Target::All).len(), 3);
    }

    #[test]
    fn dropping_the_guard_unregisters() {
        let reg = registry(5, 8, 1024);
        let (guard, _, _rx) = reg.register("alice", None, None, 0, 0).unwrap();
        assert_eq!((reg.connection_count(), reg.user_count()), (1, 1));
        drop(guard);
        assert_eq!((reg.connection_count(), reg.user_count()), (0, 0));
    }

    #[test]
    fn limits_refuse_registration() {
        let reg = registry(2, 8, 1024);
        let _a = reg.register("alice", None, None, 0, 0).unwrap();
        let _b = reg.register("alice", None, None, 0, 0).unwrap();
        assert_eq!(
            reg.register("alice", None, None, 0, 0).err(),
            Some(RegisterError::UserFull)
        );
        let _c = reg.register("bob", None, None, 0, 0).unwrap();
        assert_eq!(
            reg.register("carol", None, None, 0, 0).err(),
            Some(RegisterError::NodeFull)
        );
    }

    #[test]
    fn a_change_reaches_the_user_entry_or_waits_for_their_first_connection() {
        let reg = registry(5, 8, 1024);
        let (_a, a, mut rx) = reg.register("alice", None, None, 0b01, 100).unwrap();
        let (_b, b, _rb) = reg.register("alice", None, None, 0b11, 100).unwrap();
        assert_eq!(
            (a.prefs.get(), b.prefs.get()),
            (0b01, 0b01),
            "one entry per user"
        );
        assert_eq!(reg.apply_prefs("alice", 0b10, 200, &"prefs".into()), 2);
        assert_eq!(b.prefs.get(), 0b10);
        rx.try_recv().unwrap();
        assert_eq!(
            reg.apply_prefs("alice", 0b11, 150, &"stale".into()),
            0,
            "older than held"
        );
        assert_eq!(b.prefs.get(), 0b10);
        reg.apply_prefs("alice", 0b10, 200, &"prefs".into());
        assert_eq!(rx.try_recv().unwrap().frame.as_str(), "prefs");

        // bob's change lands while his preferences are being read (version 150 < 200)...
        assert_eq!(reg.apply_prefs("bob", 0b100, 200, &"prefs".into()), 0);
        let (_c, c, _) = reg.register("bob", None, None, 0b001, 150).unwrap();
        assert_eq!(
            c.prefs.get(),
            0b100,
            "the newer change wins over the stale read"
        );
        // ...but an older change does not override a fresher read.
        reg.apply_prefs("carol", 0b100, 200, &"prefs".into());
        let (_d, d, _) = reg.register("carol", None, None, 0b001, 300).unwrap();
        assert_eq!(d.prefs.get(), 0b001);
    }

    #[tokio::test]
    async fn overflow_by_count_or_bytes_asks_for_4001() {
        let reg = registry(5, 2, 1024);
        let (_g, conn, mut rx) = reg.register("alice", None, None, 0, 0).unwrap();
        conn.push("a".into(), None).unwrap();
        conn.push("b".into(), None).unwrap();
        assert_eq!(conn.push("c".into(), None), Err(PushError::Overflow));
        assert_eq!(conn.closed().await, 4001);
        assert_eq!(conn.push("d".into(), None), Err(PushError::Closed));
        assert_eq!(rx.recv().await.unwrap().frame.as_str(), "a");

        let reg = registry(5, 100, 10);
        let (_g, conn, _rx) = reg.register("bob", None, None, 0, 0).unwrap();
        conn.push("12345".into(), None).unwrap();
        conn.push("12345".into(), None).unwrap();
        assert_eq!(conn.push("1".into(), None), Err(PushError::Overflow));
        assert_eq!(conn.closed().await, 4001);
    }
}
