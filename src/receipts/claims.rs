//! Which node reports a negative outcome: the first to claim (id, user) in the cluster.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::MsgRef;
use crate::metrics::Receipt;

/// Claims remembered at most by the in-memory claims of the in-process bus.
const LOCAL_CLAIMS_MAX: usize = 1 << 20;

/// A negative outcome waiting for its claim.
pub(super) struct Pending {
    pub msg: MsgRef,
    pub user: Arc<str>,
    pub outcome: Receipt,
    pub at_ms: i64,
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

/// KEYS: the claims; ARGV: the window in seconds. A string of one character per claim: `1`
/// if this call won it, else `0` (one bulk string: the client decodes one reply, not one per
/// claim).
const CLAIM_LUA: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, '1', 'NX', 'EX', ARGV[1]) then out[i] = '1' else out[i] = '0' end
end
return table.concat(out)
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
            .map(|p| self.key(p.msg.id(), &p.user))
            .collect();
        let reply: Value = self
            .script
            .evalsha_with_reload(&self.client, keys, vec![self.window_secs.clone()])
            .await
            .map_err(|e| e.to_string())?;
        crate::bus::redis::flags(&reply, pending.len()).map_err(|e| format!("claims: {e}"))
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

    pub(super) fn claim(&mut self, id: &str, user: &str) -> bool {
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
    pub(super) async fn claim(&mut self, pending: &[Pending]) -> Result<Vec<bool>, String> {
        match self {
            Claims::Local(local) => Ok(pending
                .iter()
                .map(|p| local.claim(p.msg.id(), &p.user))
                .collect()),
            Claims::Redis(redis) => redis.claim(pending).await,
        }
    }
}
