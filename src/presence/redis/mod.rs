//! Presence in Redis: every node's live connections, readable from any node.
//!
//! Keys (all under `<prefix>:presence:`):
//! * `u:<user>`: a hash, connection id → its [`ConnInfo`] as JSON (with its node);
//! * `n:<node>`: a hash, connection id → user: what a node has written, so that its entries
//!   can be found and removed without scanning every user;
//! * `nodes`: a sorted set, node id → its last heartbeat, ms on the Redis server's clock
//!   (one clock for the whole cluster, so skew between nodes does not matter);
//! * `sweep:<node>`: the lock of the one node sweeping a dead node's entries.
//!
//! Liveness (DESIGN §6: a node that dies stops being reported within
//! `kafka.session_timeout` + 10 s): each node heartbeats every [`HEARTBEAT_PERIOD`]
//! (1 s). A node whose heartbeat is older than the dead bound, [`dead_bound`] =
//! `kafka.session_timeout` + 5 s, is dead: readers ignore its entries at once, and the
//! first live node whose heartbeat sees it takes its `sweep:` lock and removes its entries
//! in chunks, reporting each of its connections `disconnect` (code 1006) on the presence
//! topic. A killed node's last heartbeat is at most a period before its death, so readers
//! stop listing its connections within `session_timeout` + 4 s and the sweep starts
//! within `session_timeout` + 5 s, well inside the contract's 10 s.
//!
//! Every chunk of a sweep first checks that the node is still dead, in the same script: a
//! node that was only cut off from Redis (or stalled) and heartbeats again is no longer
//! swept. Its heartbeat script tells it that it had been taken for dead, and it then
//! writes all its live connections again (reporting `connect` again for those the sweep
//! removed). A node also rewrites everything after a Redis reconnect or a failed write, and
//! at start removes what a previous run under its id left behind (reported `disconnect`,
//! 1006: that run's connections are gone).
//!
//! The scripts name user keys they build from the prefix, which a single server or a
//! Sentinel-managed primary allows, and so does a Redis Cluster: there the prefix is the
//! bus's key base `{<prefix>}`, one hash tag, so every presence key is in one slot.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{Expiration, SetOptions};

use super::{ConnInfo, OnlineQuery, PresenceError};
use scripts::{ALIVE_LUA, HEARTBEAT_LUA, NOW_LUA, ONLINE_LUA, READ_LUA, SWEEP_LUA};

mod scripts;
mod writer;

pub(super) use writer::Writer;

/// How often a node heartbeats (and looks for dead nodes to sweep).
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// Margin of the dead bound over `kafka.session_timeout`.
const DEAD_MARGIN: Duration = Duration::from_secs(5);

/// A node silent for longer than this is dead: `kafka.session_timeout` + 5 s. As long as
/// Kafka waits before moving a silent node's partitions, and a little longer: a node is not
/// taken for dead by presence while the consumer group still holds it alive.
pub fn dead_bound(session_timeout: Duration) -> Duration {
    session_timeout + DEAD_MARGIN
}

/// Most commands in one pipelined write; most entries one sweep script call removes.
const BATCH: usize = 1000;

/// How long a sweeper holds a dead node's `sweep:` lock (it deletes it when done).
const SWEEP_LOCK: Duration = Duration::from_secs(30);

/// How long leaving presence at shutdown may take.
const LEAVE_WITHIN: Duration = Duration::from_secs(5);

/// One write to Redis.
#[derive(Debug)]
enum Op {
    Put {
        user: String,
        conn: String,
        json: String,
    },
    Remove {
        user: String,
        conn: String,
    },
}

/// The outcome of a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beat {
    /// The node was alive.
    Alive,
    /// The node had no heartbeat (first start, or swept completely).
    Absent,
    /// The node's heartbeat was older than the dead bound: it may have been swept.
    WasDead,
}

/// The Redis side of presence: keys, scripts, reads and writes.
pub(super) struct Store {
    client: Client,
    node: String,
    nodes_key: String,
    node_key: String,
    node_prefix: String,
    user_prefix: String,
    lock_prefix: String,
    dead_ms: String,
    heartbeat: Script,
    read: Script,
    online: Script,
    sweep: Script,
}

impl Store {
    pub fn new(client: Client, prefix: &str, node: &str, dead: Duration) -> Self {
        let base = format!("{prefix}:presence:");
        Self {
            client,
            node: node.to_owned(),
            nodes_key: format!("{base}nodes"),
            node_key: format!("{base}n:{node}"),
            node_prefix: format!("{base}n:"),
            user_prefix: format!("{base}u:"),
            lock_prefix: format!("{base}sweep:"),
            dead_ms: dead.as_millis().to_string(),
            heartbeat: Script::from_lua(format!("{NOW_LUA}{HEARTBEAT_LUA}")),
            read: Script::from_lua(format!(
                "{NOW_LUA}local dead = tonumber(ARGV[1])\n{ALIVE_LUA}{READ_LUA}"
            )),
            online: Script::from_lua(format!(
                "{NOW_LUA}local dead = tonumber(ARGV[1])\n{ALIVE_LUA}{ONLINE_LUA}"
            )),
            sweep: Script::from_lua(format!("{NOW_LUA}{SWEEP_LUA}")),
        }
    }

    fn user_key(&self, user: &str) -> String {
        format!("{}{user}", self.user_prefix)
    }

    pub async fn connections(&self, user: &str) -> Result<Vec<ConnInfo>, PresenceError> {
        let keys = vec![self.nodes_key.clone(), self.user_key(user)];
        let reply: Value = self
            .read
            .evalsha_with_reload(&self.client, keys, vec![self.dead_ms.clone()])
            .await?;
        Ok(array(reply)?
            .iter()
            .filter_map(|v| serde_json::from_str(&v.as_string()?).ok())
            .collect())
    }

    pub async fn online(&self, queries: &[OnlineQuery<'_>]) -> Result<Vec<bool>, PresenceError> {
        let mut users =
            String::with_capacity(queries.iter().map(|q| q.user.len() + 1).sum::<usize>());
        let mut filters = Vec::new();
        for (n, q) in queries.iter().enumerate() {
            users.push_str(q.user);
            users.push('\n');
            if q.platform.is_some() || q.tab.is_some() {
                filters.push((n + 1).to_string());
                filters.push(q.platform.map_or("", |p| p.as_str()).to_owned());
                filters.push(q.tab.unwrap_or("").to_owned());
            }
        }
        let mut args = Vec::with_capacity(3 + filters.len());
        args.extend([self.dead_ms.clone(), self.user_prefix.clone(), users]);
        args.extend(filters);
        let reply: Value = self
            .online
            .evalsha_with_reload(&self.client, vec![self.nodes_key.clone()], args)
            .await?;
        crate::bus::redis::flags(&reply, queries.len()).map_err(PresenceError::Reply)
    }

    /// Records this node's heartbeat; its previous state and the dead nodes.
    async fn heartbeat(&self) -> Result<(Beat, Vec<String>), PresenceError> {
        let reply: Value = self
            .heartbeat
            .evalsha_with_reload(
                &self.client,
                vec![self.nodes_key.clone()],
                vec![self.node.clone(), self.dead_ms.clone()],
            )
            .await?;
        let items = array(reply)?;
        let beat = match items.first().and_then(Value::as_i64) {
            Some(0) => Beat::Alive,
            Some(1) => Beat::Absent,
            Some(2) => Beat::WasDead,
            other => return Err(PresenceError::Reply(format!("heartbeat: {other:?}"))),
        };
        let dead = items[1..]
            .iter()
            .filter_map(Value::as_string)
            .filter(|n| *n != self.node)
            .collect();
        Ok((beat, dead))
    }

    /// Pipelined writes, [`BATCH`] commands at a time.
    async fn write(&self, ops: &[Op]) -> Result<(), PresenceError> {
        for chunk in ops.chunks(BATCH / 2) {
            let pipeline = self.client.pipeline();
            for op in chunk {
                match op {
                    Op::Put { user, conn, json } => {
                        let _: () = pipeline
                            .hset(self.user_key(user), (conn.as_str(), json.as_str()))
                            .await?;
                        let _: () = pipeline
                            .hset(&self.node_key, (conn.as_str(), user.as_str()))
                            .await?;
                    }
                    Op::Remove { user, conn } => {
                        let _: () = pipeline.hdel(self.user_key(user), conn.as_str()).await?;
                        let _: () = pipeline.hdel(&self.node_key, conn.as_str()).await?;
                    }
                }
            }
            let _: Vec<Value> = pipeline.all().await?;
        }
        Ok(())
    }

    /// What Redis holds for this node: conn → user.
    async fn held(&self) -> Result<HashMap<String, String>, PresenceError> {
        Ok(self.client.hgetall(&self.node_key).await?)
    }

    /// Removes `node`'s entries chunk by chunk (`force`: even though it is alive, keeping
    /// its heartbeat: this node's own leftovers), handing each removed connection to
    /// `removed`. Stops early, returning false, when the node turns out to be alive.
    async fn sweep(
        &self,
        node: &str,
        force: bool,
        mut removed: impl FnMut(ConnInfo),
    ) -> Result<bool, PresenceError> {
        let keys = vec![
            self.nodes_key.clone(),
            format!("{}{node}", self.node_prefix),
        ];
        let mut cursor = "0".to_owned();
        loop {
            let args = vec![
                node.to_owned(),
                self.dead_ms.clone(),
                BATCH.to_string(),
                if force { "1" } else { "0" }.to_owned(),
                self.user_prefix.clone(),
                cursor.clone(),
            ];
            let reply: Value = self
                .sweep
                .evalsha_with_reload(&self.client, keys.clone(), args)
                .await?;
            let items = array(reply)?;
            let status = items.first().and_then(Value::as_i64);
            cursor = items
                .get(1)
                .and_then(Value::as_string)
                .unwrap_or_else(|| "0".to_owned());
            for entry in items.get(2..).unwrap_or_default().chunks_exact(3) {
                let (Some(conn), Some(user)) = (entry[0].as_string(), entry[1].as_string()) else {
                    continue;
                };
                let info = entry[2]
                    .as_string()
                    .and_then(|json| serde_json::from_str::<ConnInfo>(&json).ok())
                    .unwrap_or(ConnInfo {
                        user,
                        conn,
                        node: node.to_owned(),
                        platform: None,
                        tab: None,
                        connected_at: 0,
                    });
                removed(info);
            }
            match status {
                Some(-1) => return Ok(false),
                Some(1) => return Ok(true),
                Some(0) => continue,
                other => return Err(PresenceError::Reply(format!("sweep: {other:?}"))),
            }
        }
    }

    /// Takes the sweep lock of `node`; false if another node holds it.
    async fn lock(&self, node: &str) -> Result<bool, PresenceError> {
        let taken: Value = self
            .client
            .set(
                format!("{}{node}", self.lock_prefix),
                self.node.as_str(),
                Some(Expiration::PX(SWEEP_LOCK.as_millis() as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(!taken.is_null())
    }

    async fn unlock(&self, node: &str) -> Result<(), PresenceError> {
        let _: i64 = self
            .client
            .del(format!("{}{node}", self.lock_prefix))
            .await?;
        Ok(())
    }

    /// Removes this node's heartbeat.
    async fn forget(&self) -> Result<(), PresenceError> {
        let _: i64 = self
            .client
            .zrem(&self.nodes_key, self.node.as_str())
            .await?;
        Ok(())
    }
}

fn array(reply: Value) -> Result<Vec<Value>, PresenceError> {
    match reply {
        Value::Array(items) => Ok(items),
        Value::Null => Ok(Vec::new()),
        other => Err(PresenceError::Reply(format!(
            "expected an array: {other:?}"
        ))),
    }
}

/// The close code reported for connections of a dead node (and of this node's previous
/// run): 1006, closed abnormally, without a close frame.
pub const CODE_GONE: u16 = 1006;
