//! The Lua scripts of presence in Redis (see the parent module for the keys).

/// `now`: the Redis server's clock in ms.
pub(super) const NOW_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// Is a node alive (`alive(node)`, cached per call)? KEYS[1] is `nodes`, `dead` the bound.
pub(super) const ALIVE_LUA: &str = r#"
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
pub(super) const HEARTBEAT_LUA: &str = r#"
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
pub(super) const READ_LUA: &str = r#"
local out = {}
for _, info in ipairs(redis.call('HVALS', KEYS[2])) do
  local c = decode(info)
  if c and alive(c.node) then out[#out + 1] = info end
end
return out
"#;

/// KEYS: `nodes`; ARGV: dead bound, the user key prefix, the queries' users each followed by
/// `\n` (a user id holds no control character), then a (query number, platform, tab) triple
/// for each query that names either (`""`: any), none for the others. A string of one
/// character per query: `1` if it has a matching entry on a live node, else `0`. One argument
/// for all the users and one string back: the client encodes and decodes one element per
/// call, not several per query (the user keys are built here, in the prefix's slot on a
/// Redis Cluster, as the sweep does).
pub(super) const ONLINE_LUA: &str = r#"
local want = {}
for i = 4, #ARGV, 3 do
  want[tonumber(ARGV[i])] = {ARGV[i + 1], ARGV[i + 2]}
end
local out = {}
for user in string.gmatch(ARGV[3], '([^\n]*)\n') do
  local w = want[#out + 1]
  local platform, tab = '', ''
  if w then platform, tab = w[1], w[2] end
  local found = '0'
  for _, info in ipairs(redis.call('HVALS', ARGV[2] .. user)) do
    local c = decode(info)
    if c and (platform == '' or c.platform == platform) and (tab == '' or c.tab == tab)
        and alive(c.node) then
      found = '1'
      break
    end
  end
  out[#out + 1] = found
end
return table.concat(out)
"#;

/// KEYS: `nodes`, `n:<node>`; ARGV: node, dead bound, chunk size, force (`1`: even if
/// alive, and keep its heartbeat), user key prefix, HSCAN cursor. Removes one chunk of the
/// node's entries. Returns status (-1: the node is alive, stop; 0: more to do; 1: done),
/// the next cursor, then conn, user, info (or "") of each entry removed.
pub(super) const SWEEP_LUA: &str = r#"
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
