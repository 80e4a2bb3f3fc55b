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
//! Sentinel-managed primary allows (the Redis bus runs on those).

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{Expiration, SetOptions};
use tokio_util::sync::CancellationToken;

use super::{Change, ConnInfo, Inner, OnlineQuery, PresenceError};

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

/// `now`: the Redis server's clock in ms.
const NOW_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Is a node alive (`alive(node)`, cached per call)? KEYS[1] is `nodes`, `dead` the bound.
const ALIVE_LUA: &str = r#"
local seen = {}
local function alive(node)
  if seen[node] == nil then
    local s = redis.call('ZSCORE', KEYS[1], node)
    seen[node] = (s and tonumber(s) >= now - dead) and true or false
  end
  return seen[node]
end
local function decode(info)
  local ok, c = pcall(cjson.decode, info)
  if ok and type(c) == 'table' and type(c.node) == 'string' then return c end
  return nil
end
"#;

/// KEYS: `nodes`; ARGV: node, dead bound (ms). Records the heartbeat; returns the status
/// (0: was alive, 1: was absent, 2: was dead) followed by the dead nodes.
const HEARTBEAT_LUA: &str = r#"
local dead = tonumber(ARGV[2])
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
local out = {0}
if not before then out[1] = 1 elseif tonumber(before) < now - dead then out[1] = 2 end
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - dead))) do
  out[#out + 1] = node
end
return out
"#;

/// KEYS: `nodes`, `u:<user>`; ARGV: dead bound. The user's entries on live nodes.
const READ_LUA: &str = r#"
local out = {}
for _, info in ipairs(redis.call('HVALS', KEYS[2])) do
  local c = decode(info)
  if c and alive(c.node) then out[#out + 1] = info end
end
return out
"#;

/// KEYS: `nodes`, then one `u:<user>` per query; ARGV: dead bound, then platform and tab
/// per query (`""`: any). 1 per query with a matching entry on a live node, else 0.
const ONLINE_LUA: &str = r#"
local out = {}
for k = 2, #KEYS do
  local platform, tab = ARGV[2 * (k - 1)], ARGV[2 * (k - 1) + 1]
  local found = 0
  for _, info in ipairs(redis.call('HVALS', KEYS[k])) do
    local c = decode(info)
    if c and (platform == '' or c.platform == platform) and (tab == '' or c.tab == tab)
        and alive(c.node) then
      found = 1
      break
    end
  end
  out[#out + 1] = found
end
return out
"#;

/// KEYS: `nodes`, `n:<node>`; ARGV: node, dead bound, chunk size, force (`1`: even if
/// alive, and keep its heartbeat), user key prefix, HSCAN cursor. Removes one chunk of the
/// node's entries. Returns status (-1: the node is alive, stop; 0: more to do; 1: done),
/// the next cursor, then conn, user, info (or "") of each entry removed.
const SWEEP_LUA: &str = r#"
if ARGV[4] ~= '1' then
  local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if s and tonumber(s) >= now - tonumber(ARGV[2]) then return {-1, '0'} end
end
local scan = redis.call('HSCAN', KEYS[2], ARGV[6], 'COUNT', ARGV[3])
local out = {0, scan[1]}
local fields = scan[2]
for i = 1, #fields, 2 do
  local conn, user = fields[i], fields[i + 1]
  local ukey = ARGV[5] .. user
  local info = redis.call('HGET', ukey, conn)
  if redis.call('HDEL', KEYS[2], conn) == 1 then
    redis.call('HDEL', ukey, conn)
    out[#out + 1] = conn
    out[#out + 1] = user
    out[#out + 1] = info or ''
  end
end
if scan[1] == '0' then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    if ARGV[4] ~= '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
    out[1] = 1
  end
end
return out
"#;

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
        let mut keys = Vec::with_capacity(queries.len() + 1);
        keys.push(self.nodes_key.clone());
        let mut args = Vec::with_capacity(2 * queries.len() + 1);
        args.push(self.dead_ms.clone());
        for q in queries {
            keys.push(self.user_key(q.user));
            args.push(q.platform.map_or("", |p| p.as_str()).to_owned());
            args.push(q.tab.unwrap_or("").to_owned());
        }
        let reply: Value = self
            .online
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        let answers = array(reply)?
            .iter()
            .map(|v| v.as_i64() == Some(1))
            .collect::<Vec<_>>();
        if answers.len() != queries.len() {
            return Err(PresenceError::Reply(format!(
                "{} answers to {} queries",
                answers.len(),
                queries.len()
            )));
        }
        Ok(answers)
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

/// The writer task's state.
pub(super) struct Writer<'a> {
    inner: &'a Inner,
    store: &'a Store,
    /// A heartbeat has succeeded: writes may start (never before this run's leftovers are
    /// gone and its heartbeat is fresh).
    beating: bool,
    /// The last write or heartbeat failed (logged once per streak).
    failing: bool,
}

impl<'a> Writer<'a> {
    pub fn new(inner: &'a Inner, store: &'a Store) -> Self {
        Self {
            inner,
            store,
            beating: false,
            failing: false,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), PresenceError> {
        // What a previous run of this node left (a crash, a SIGKILL) is gone with it.
        loop {
            let own = self.inner.node.clone();
            match self.sweep(&own, true).await {
                Ok(_) => break,
                Err(e) => self.failed("removing a previous run's entries", &e),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(HEARTBEAT_PERIOD) => {}
            }
        }
        let mut reconnects = self.store.client.reconnect_rx();
        let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.beat().await,
                reconnected = reconnects.recv() => {
                    if reconnected.is_ok() {
                        tracing::info!("redis reconnected; writing presence again");
                        self.inner.table.lock().resync = true;
                    }
                }
                _ = self.inner.wake.notified() => {}
            }
            if self.beating {
                self.flush().await;
            }
        }
        self.leave().await;
        Ok(())
    }

    /// Logs the first failure of a streak.
    fn failed(&mut self, what: &str, e: &PresenceError) {
        self.inner.metrics.presence_write_errors.inc();
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(error = %e, "presence: {what} failed; retrying");
        }
    }

    fn recovered(&mut self) {
        if std::mem::replace(&mut self.failing, false) {
            tracing::info!("presence: redis writes work again");
        }
    }

    /// Heartbeats; when the node had been taken for dead, writes everything again; sweeps
    /// dead nodes.
    async fn beat(&mut self) {
        let (beat, dead) = match self.store.heartbeat().await {
            Ok(reply) => reply,
            Err(e) => return self.failed("heartbeat", &e),
        };
        if self.beating && beat != Beat::Alive {
            tracing::warn!(
                ?beat,
                "this node was taken for dead by presence; writing its connections again"
            );
            self.inner.table.lock().resync = true;
            if let Err(e) = self.resync(true).await {
                self.failed("rewriting presence", &e);
            }
        }
        self.beating = true;
        for node in dead {
            if let Err(e) = self.sweep_dead(&node).await {
                self.failed("sweeping a dead node", &e);
            }
        }
    }

    async fn sweep_dead(&mut self, node: &str) -> Result<(), PresenceError> {
        if !self.store.lock(node).await? {
            return Ok(());
        }
        let swept = self.sweep(node, false).await;
        self.store.unlock(node).await?;
        let (count, done) = swept?;
        if count > 0 || done {
            tracing::info!(node, count, "swept a dead node's connections from presence");
        }
        Ok(())
    }

    /// Removes `node`'s entries and reports each `disconnect` with 1006; how many, and
    /// whether it finished.
    async fn sweep(&self, node: &str, force: bool) -> Result<(usize, bool), PresenceError> {
        let inner = self.inner;
        let mut count = 0;
        let now = crate::clock::now_ms();
        let done = self
            .store
            .sweep(node, force, |info| {
                count += 1;
                if let Some(events) = &inner.events {
                    events.disconnect(&info, CODE_GONE, now, &inner.metrics);
                }
            })
            .await?;
        inner.metrics.presence_swept.inc_by(count as u64);
        Ok((count, done))
    }

    /// Writes what is dirty (everything, when a resync is due).
    async fn flush(&mut self) {
        loop {
            if self.inner.table.lock().resync {
                match self.resync(false).await {
                    Ok(()) => self.recovered(),
                    Err(e) => return self.failed("rewriting presence", &e),
                }
            }
            let ops = self.take_dirty();
            if ops.is_empty() {
                return;
            }
            match self.store.write(&ops).await {
                Ok(()) => self.recovered(),
                Err(e) => {
                    // Some of them may be written, some not: write everything next time.
                    self.inner.table.lock().resync = true;
                    return self.failed("writing presence", &e);
                }
            }
        }
    }

    /// Up to [`BATCH`] dirty connections, as writes.
    fn take_dirty(&self) -> Vec<Op> {
        let mut table = self.inner.table.lock();
        let conns: Vec<String> = table.dirty.keys().take(BATCH).cloned().collect();
        let mut ops = Vec::with_capacity(conns.len());
        for conn in conns {
            let change = table.dirty.remove(&conn).expect("listed above");
            match change {
                Change::Put { user } => {
                    if let Some(info) = table.find(&user, &conn) {
                        let json = serde_json::to_string(info).expect("ConnInfo serializes");
                        ops.push(Op::Put { user, conn, json });
                    }
                }
                Change::Remove { user } => ops.push(Op::Remove { user, conn }),
            }
        }
        ops
    }

    /// Brings Redis in line with the table: removes what it holds for this node that is not
    /// live, writes every live connection. With `announce`, reports `connect` again for live
    /// connections Redis had lost (swept while this node was taken for dead).
    async fn resync(&self, announce: bool) -> Result<(), PresenceError> {
        let inner = self.inner;
        let live = {
            let mut table = inner.table.lock();
            table.dirty.clear();
            table.resync = false;
            table.all()
        };
        let result = async {
            let held = self.store.held().await?;
            let mut ops = Vec::with_capacity(held.len() + live.len());
            let live_ids: std::collections::HashSet<&str> =
                live.iter().map(|c| c.conn.as_str()).collect();
            for (conn, user) in &held {
                if !live_ids.contains(conn.as_str()) {
                    ops.push(Op::Remove {
                        user: user.clone(),
                        conn: conn.clone(),
                    });
                }
            }
            for info in &live {
                ops.push(Op::Put {
                    user: info.user.clone(),
                    conn: info.conn.clone(),
                    json: serde_json::to_string(info).expect("ConnInfo serializes"),
                });
            }
            self.store.write(&ops).await?;
            Ok::<_, PresenceError>(held)
        }
        .await;
        let held = match result {
            Ok(held) => held,
            Err(e) => {
                inner.table.lock().resync = true;
                return Err(e);
            }
        };
        inner.metrics.presence_resyncs.inc();
        if announce {
            if let Some(events) = &inner.events {
                let now = crate::clock::now_ms();
                for info in live.iter().filter(|c| !held.contains_key(&c.conn)) {
                    events.connect(info, now, &inner.metrics);
                }
            }
        }
        Ok(())
    }

    /// At shutdown: this node's entries and heartbeat are removed (its sessions reported
    /// their own disconnects).
    async fn leave(&self) {
        let store = self.store;
        let leaving = async {
            store.sweep(&self.inner.node, true, |_| {}).await?;
            store.forget().await
        };
        match tokio::time::timeout(LEAVE_WITHIN, leaving).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "presence: leaving failed"),
            Err(_) => tracing::warn!(
                "presence: leaving took too long; the entries expire with the node's heartbeat"
            ),
        }
    }
}

/// The close code reported for connections of a dead node (and of this node's previous
/// run): 1006, closed abnormally, without a close frame.
pub const CODE_GONE: u16 = 1006;
