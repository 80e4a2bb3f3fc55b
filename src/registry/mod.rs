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

mod conn;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub use conn::{ConnHandle, Empty, PushError, QueueRx, Queued, UserPrefs};

use crate::envelope::{Platform, Target};
use crate::metrics::Metrics;

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
    /// The connections of each group (from their identity), for `to.group`.
    by_group: HashMap<Arc<str>, Vec<Arc<ConnHandle>>>,
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
                .filter(|c| c.push(frame.clone()).is_ok())
                .count()
        } else {
            let now = crate::clock::now_ms();
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

    /// Takes preferences re-read from the database after a bus gap: when they differ from
    /// what is held (and are not older), every connection of the user gets `frame`.
    pub fn refresh_prefs(&self, user: &str, bits: u64, version: i64, frame: &Utf8Bytes) {
        let index = self.index.write();
        if let Some(entry) = index.by_user.get(user) {
            if entry.prefs.get() != bits && entry.prefs.update(bits, version) {
                for conn in &entry.conns {
                    let _ = conn.push(frame.clone());
                }
            }
        }
    }

    /// The users with a connection here, now.
    pub fn users(&self) -> Vec<Arc<str>> {
        self.index.read().by_user.keys().cloned().collect()
    }

    /// The groups with a connection here, now.
    pub fn groups(&self) -> Vec<Arc<str>> {
        self.index.read().by_group.keys().cloned().collect()
    }

    /// Calls `f` for each connection of `group` here; returns how many there were.
    pub fn for_each_of_group(&self, group: &str, mut f: impl FnMut(&Arc<ConnHandle>)) -> usize {
        let index = self.index.read();
        let conns = index.by_group.get(group).map_or(&[][..], |c| &c[..]);
        conns.iter().for_each(&mut f);
        conns.len()
    }

    /// Calls `f` for each connection of `user` here; returns how many there were.
    pub fn for_each_of_user(&self, user: &str, mut f: impl FnMut(&Arc<ConnHandle>)) -> usize {
        let index = self.index.read();
        let conns = index.by_user.get(user).map_or(&[][..], |e| &e.conns[..]);
        conns.iter().for_each(&mut f);
        conns.len()
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
    ) -> Result<(Registration, Arc<ConnHandle>, QueueRx), RegisterError> {
        self.register_in(user, platform, tab, &[], bits, version)
    }

    /// [`register`](Self::register) for a connection whose identity is in `groups`
    /// (validated and bounded by `auth`; a name listed twice counts once).
    pub fn register_in(
        self: &Arc<Self>,
        user: &str,
        platform: Option<Platform>,
        tab: Option<String>,
        groups: &[String],
        bits: u64,
        version: i64,
    ) -> Result<(Registration, Arc<ConnHandle>, QueueRx), RegisterError> {
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
        // Group names are shared with the index: one allocation per group on this node.
        let mut conn_groups: Vec<Arc<str>> = Vec::with_capacity(groups.len());
        for group in groups {
            if conn_groups.iter().any(|g| **g == **group) {
                continue;
            }
            let name = match index.by_group.get_key_value(group.as_str()) {
                Some((name, _)) => name.clone(),
                None => Arc::from(group.as_str()),
            };
            conn_groups.push(name);
        }
        let conn = Arc::new(ConnHandle::new(
            Arc::from(format!("{}-{n:x}", self.id_prefix)),
            user.clone(),
            prefs.clone(),
            platform,
            tab.map(String::into_boxed_str),
            conn_groups.into_boxed_slice(),
            self.limits.queue_max_messages,
            self.limits.queue_max_bytes,
        ));
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
        for group in conn.groups.iter() {
            index
                .by_group
                .entry(group.clone())
                .or_default()
                .push(conn.clone());
        }
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
        let rx = QueueRx::new(conn.clone());
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
        for group in conn.groups.iter() {
            if let Some(conns) = index.by_group.get_mut(group) {
                // Order does not matter in a group, and a group may be large.
                if let Some(at) = conns.iter().position(|c| Arc::ptr_eq(c, conn)) {
                    conns.swap_remove(at);
                }
                if conns.is_empty() {
                    index.by_group.remove(group);
                }
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
            Target::Group(group) => index
                .by_group
                .get(group.as_str())
                .into_iter()
                .flatten()
                .for_each(f),
            Target::All => index.by_conn.values().for_each(f),
        }
    }

    /// Calls `f` for every connection of this node (used when closing them all).
    pub fn for_each(&self, f: impl FnMut(&Arc<ConnHandle>)) {
        self.index.read().by_conn.values().for_each(f);
    }
}
