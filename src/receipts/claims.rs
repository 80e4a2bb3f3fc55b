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

/// Claims in Redis: `SET <key base>:receipt:<id length>:<id>:<user> 1 NX EX <window>` (the length
/// keeps `a:b` for `c` and `a` for `b:c` apart: ids and user ids may hold `:`) for every claim of a
/// batch, in one script call that gets all of them in one argument and answers in one string (one
/// element for the client to encode and one to decode, however many claims: a pipeline of one `SET`
/// each cost the receipts task more than all its other work, and one key per claim still cost more
/// than building the keys in the script). The key base is the bus's: `<prefix>` on one Redis,
/// `{<prefix>}` on a Redis Cluster, where the keys the script builds are all in the slot of the one
/// key it is called with.
pub struct RedisClaims {
    client: fred::clients::Client,
    /// `<key base>:receipt:`, the script's one key (its slot is the claims' slot).
    base: String,
    window_secs: String,
    script: fred::types::scripts::Script,
}

/// KEYS: `<key base>:receipt:`; ARGV: the window in seconds, then the claims, each as
/// `<id length>:<id><user>\n` (an id may hold any character, a user id no control
/// character). A string of one character per claim: `1` if this call won it (set
/// `KEYS[1] .. <id length> .. ':' .. <id> .. ':' .. <user>`), else `0`.
const CLAIM_LUA: &str = r#"
local claims, pos, out = ARGV[2], 1, {}
while pos <= #claims do
  local colon = string.find(claims, ':', pos, true)
  local digits = string.sub(claims, pos, colon - 1)
  local len = tonumber(digits)
  local id = string.sub(claims, colon + 1, colon + len)
  local nl = string.find(claims, '\n', colon + len + 1, true)
  local user = string.sub(claims, colon + len + 1, nl - 1)
  local key = KEYS[1] .. digits .. ':' .. id .. ':' .. user
  local won = redis.call('SET', key, '1', 'NX', 'EX', ARGV[1])
  out[#out + 1] = won and '1' or '0'
  pos = nl + 1
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

    /// Claims each (message id, user id) of `claims`: true for those this call was the
    /// first in the cluster to claim within the window.
    pub async fn claim<'a>(
        &self,
        claims: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Vec<bool>, String> {
        use std::fmt::Write as _;
        let n = claims.len();
        let mut arg = String::with_capacity(n * 48);
        for (id, user) in claims {
            let _ = write!(arg, "{}:", id.len());
            arg.push_str(id);
            arg.push_str(user);
            arg.push('\n');
        }
        let reply: fred::types::Value = self
            .script
            .evalsha_with_reload(
                &self.client,
                vec![self.base.clone()],
                vec![self.window_secs.clone(), arg],
            )
            .await
            .map_err(|e| e.to_string())?;
        crate::bus::redis::flags(&reply, n).map_err(|e| format!("claims: {e}"))
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
        let key = format!("{}:{id}:{user}", id.len());
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
            Claims::Redis(redis) => {
                redis
                    .claim(pending.iter().map(|p| (p.msg.id(), &*p.user)))
                    .await
            }
        }
    }
}
