//! The Redis bus's Lua scripts (the layout and protocol they implement are described in
//! the parent module's comment). Each call is one atomic step on the server. The publish
//! scripts publish with the command in the Lua local `PUB` (`PUBLISH`, or `SPUBLISH` on a
//! Redis Cluster), which the bus defines before them, through `send`: [`BROADCAST_LUA`] or
//! [`ROUTED_LUA`] (`bus.routing`), which also set `STEP`, the number of arguments per
//! message of [`PUBLISH_SCRIPT`], and `positions`, the channel counters [`READ_SCRIPT`]
//! reports.

use fred::types::Value;

/// Broadcast mode: every message on the bus channel, as numbered. No positions.
pub(super) const BROADCAST_LUA: &str = r#"
local STEP = 3
local function send(num, body, payload)
  redis.call(PUB, ARGV[3], payload)
end
local function positions() return nil end
"#;

/// Routed mode, after the `R_…` names the bus defines (`R_BSEQ` the bus channel's counter,
/// `R_NSEQ` the prefix of the node channels' counters and `R_OWN` this node's, `R_NODE` the
/// node channels' prefix, `R_PRESENCE` presence's user hashes' prefix, `R_USERS_LEN` the
/// length of the user streams' prefix, `R_NSEQ_TTL` seconds): `send(num, body, payload,
/// route, from, to, per)` publishes a message with `route` `u` (its stream keys
/// `KEYS[from..to]`, every `per`th, are user streams) once on the channel of each node
/// holding a connection of one of those users, any other on the bus channel; each frame's
/// first line is `<seq> <the channel's counter>`. A presence entry is a connection's JSON
/// (`"node":"<id>"`; decoded in full only when the plain match fails).
pub(super) const ROUTED_LUA: &str = r#"
local STEP = 4
local function send(num, body, payload, route, from, to, per)
  if route ~= 'u' then
    local n = redis.call('INCR', R_BSEQ)
    redis.call(PUB, ARGV[3], num .. ' ' .. n .. '\n' .. body)
    return
  end
  local seen, nodes = {}, {}
  for i = from, to, per do
    local user = string.sub(KEYS[i], R_USERS_LEN + 1)
    for _, info in ipairs(redis.call('HVALS', R_PRESENCE .. user)) do
      local node = string.match(info, '"node":"([^"\\]*)"')
      if not node then
        local ok, c = pcall(cjson.decode, info)
        if ok and type(c) == 'table' and type(c.node) == 'string' then node = c.node end
      end
      if node and not seen[node] then
        seen[node] = true
        nodes[#nodes + 1] = node
      end
    end
  end
  for _, node in ipairs(nodes) do
    local key = R_NSEQ .. node
    local n = redis.call('INCR', key)
    redis.call('EXPIRE', key, R_NSEQ_TTL)
    redis.call(PUB, R_NODE .. node, num .. ' ' .. n .. '\n' .. body)
  end
end
local function positions()
  return {tonumber(redis.call('GET', R_BSEQ) or '0'), tonumber(redis.call('GET', R_OWN) or '0')}
end
"#;

/// Lua shared by both scripts: the first sequence number of the current epoch (see the
/// module comment), starting a new one when the server's replication id changed.
/// `KEYS[1]` is `seq`, `KEYS[2]` is `epoch`.
pub(super) const EPOCH_LUA: &str = r#"
local function epoch_start()
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
  local current = redis.call('GET', KEYS[2])
  if current then
    local id, start = string.match(current, '^(%x*) (%d+)$')
    if id == replid then return tonumber(start) end
  end
  local start = tonumber(redis.call('GET', KEYS[1]) or '0') + 1
  redis.call('SET', KEYS[2], replid .. ' ' .. start)
  return start
end
"#;

/// Lua shared by both publish scripts: `append(key, seq, max, window, ckey, collapse)` adds
/// a number to a history stream (see the module comment; a number already last in it is
/// not added again); with a `collapse` key (`ckey` is then the stream's collapse hash) the
/// stream's earlier entry with that key is removed first. `pending_check(pend, lease,
/// body_prefix, id)` looks at the message whose appends are split over several calls:
/// `nil` when there is none (or its publisher was presumed dead and it was aborted), else
/// its number and whether `id` is that message.
pub(super) const PUBLISH_LUA: &str = r#"
local function append(key, seq, max, window, ckey, collapse)
  local num = string.format('%d', seq)
  local last = redis.pcall('LINDEX', key, -1)
  local len
  if last == false then
    -- a new stream (or one that expired a window after its last write)
    if ckey then redis.call('DEL', ckey) end
    len = redis.call('RPUSH', key, '0', num)
  elseif type(last) == 'string' and tonumber(last) == seq then
    return -- a retried chunk
  elseif type(last) == 'string' and (tonumber(last) or seq) < seq then
    if ckey then
      -- the entry this one replaces, if it is still in the stream (after the marker: the
      -- marker is never removed, it is older than every entry)
      local old = tonumber(redis.call('HGET', ckey, collapse) or '')
      local first = tonumber(redis.call('LINDEX', key, 1) or '')
      if old and first and old >= first then
        redis.call('LREM', key, 1, string.format('%d', old))
      end
    end
    len = redis.call('RPUSH', key, num)
  else
    -- numbers from before the counter was lost, or not a list (an older layout): stale;
    -- start again, marked as missing what came before
    redis.call('DEL', key)
    if ckey then redis.call('DEL', ckey) end
    len = redis.call('RPUSH', key, 'x', num)
  end
  if len > max + 1 then
    -- the marker goes with the oldest; the oldest kept becomes the marker
    redis.call('LTRIM', key, -(max + 1), -1)
  end
  redis.call('EXPIRE', key, window)
  if ckey then
    redis.call('HSET', ckey, collapse, num)
    -- keys whose entry was trimmed point at nothing: forget them now and then, so the
    -- hash holds at most about twice the stream's entries
    if redis.call('HLEN', ckey) > 2 * max then
      local oldest = tonumber(redis.call('LINDEX', key, 1) or '') or seq
      local all = redis.call('HGETALL', ckey)
      for j = 1, #all, 2 do
        if tonumber(all[j + 1]) < oldest then redis.call('HDEL', ckey, all[j]) end
      end
    end
    redis.call('EXPIRE', ckey, window)
  end
end

local function pending_check(pend, lease, body_prefix, id)
  local current = redis.call('GET', pend)
  if not current then return nil end
  local n, owner = string.match(current, '^(%d+) (.*)$')
  if owner == id then return tonumber(n), true end
  if redis.call('EXISTS', lease) == 1 then return tonumber(n), false end
  -- Its publisher stopped for longer than the lease: the message was never published on
  -- the bus and will be again (its record's offset was not stored), under a new number.
  -- Streams that got this number skip it: its payload becomes empty.
  redis.call('SET', body_prefix .. n, '', 'KEEPTTL')
  redis.call('DEL', pend)
  return nil
end
"#;

/// Publishes a batch of messages in order. KEYS: seq, epoch, pending, lease, then per
/// message its seen-id key and its stream keys (each followed by its collapse hash when the
/// message has a `collapse` key); ARGV: max entries, window (s), bus channel, body key
/// prefix (`<prefix>:b:`), then per message its number of streams, its body, its
/// `collapse` key (`''`: none) and, in routed mode, its route (`u`: to users).
/// Returns `{seq, duplicate}` per message, flattened, or `{-1}` while another publisher's
/// message is half written ([`CHUNK_SCRIPT`]): nothing was done, call again.
pub const PUBLISH_SCRIPT: &str = r#"
epoch_start()
if pending_check(KEYS[3], KEYS[4], ARGV[4], '') then return {-1} end
local max = tonumber(ARGV[1])
local out = {}
local k = 5
for m = 5, #ARGV, STEP do
  local streams = tonumber(ARGV[m])
  local collapse = ARGV[m + 2]
  local per = 1
  if collapse ~= '' then per = 2 end
  local seen = redis.call('GET', KEYS[k])
  if seen then
    out[#out + 1] = tonumber(seen)
    out[#out + 1] = 1
  else
    local seq = redis.call('INCR', KEYS[1])
    local num = string.format('%d', seq)
    local payload = num .. '\n' .. ARGV[m + 1]
    if streams > 0 then
      -- the payload once; each stream gets its number only
      redis.call('SET', ARGV[4] .. string.format('%d', seq), payload, 'EX', ARGV[2])
    end
    for i = k + 1, k + per * streams, per do
      if per == 2 then
        append(KEYS[i], seq, max, ARGV[2], KEYS[i + 1], collapse)
      else
        append(KEYS[i], seq, max, ARGV[2], nil, nil)
      end
    end
    send(num, ARGV[m + 1], payload, ARGV[m + 3], k + 1, k + per * streams, per)
    redis.call('SET', KEYS[k], seq, 'EX', ARGV[2])
    out[#out + 1] = seq
    out[#out + 1] = 0
  end
  k = k + 1 + per * streams
end
return out
"#;

/// One part of a message to more streams than one call appends to. KEYS: seq, epoch,
/// pending, lease, seen id, streams of this part (each followed by its collapse hash when
/// ARGV 9 is not `''`); ARGV: max entries, window (s), bus channel, body key prefix, id,
/// `first` / `more` / `last`, body (`first`) or sequence number, lease (ms), `collapse`.
///
/// `first` numbers the message (unless its id was published: `{seq, 1}`), stores its
/// payload and records `<n> <id>` in `pending`; `last` publishes it on the bus (in routed
/// mode too: a message to this many users goes to every node), remembers its id and clears
/// `pending`. Meanwhile reads take `n - 1` as the head (the message is
/// not there yet for anyone), other publishers wait (`{-1}`), and each call renews a lease
/// of [`LEASE_MS`]: a publisher that stops for longer has its message aborted by the next
/// one (its record is published again). `{-2}`: this message was aborted, start again with
/// `first`. A `first` for the id already pending goes on with its number.
pub const CHUNK_SCRIPT: &str = r#"
epoch_start()
local max = tonumber(ARGV[1])
local n, mine = pending_check(KEYS[3], KEYS[4], ARGV[4], ARGV[5])
local seq
if ARGV[6] == 'first' then
  if n and not mine then return {-1} end
  seq = n
  if not seq then
    local seen = redis.call('GET', KEYS[5])
    if seen then return {tonumber(seen), 1} end
    seq = redis.call('INCR', KEYS[1])
    local num = string.format('%d', seq)
    redis.call('SET', ARGV[4] .. num, num .. '\n' .. ARGV[7], 'EX', ARGV[2])
    redis.call('SET', KEYS[3], num .. ' ' .. ARGV[5])
  end
else
  if not (mine and n == tonumber(ARGV[7])) then return {-2} end
  seq = n
end
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[8])
if ARGV[9] ~= '' then
  for i = 6, #KEYS, 2 do append(KEYS[i], seq, max, ARGV[2], KEYS[i + 1], ARGV[9]) end
else
  for i = 6, #KEYS do append(KEYS[i], seq, max, ARGV[2], nil, nil) end
end
if ARGV[6] == 'last' then
  local num = string.format('%d', seq)
  local payload = redis.call('GET', ARGV[4] .. num)
  send(num, string.sub(payload, #num + 2), payload, '')
  redis.call('SET', KEYS[5], seq, 'EX', ARGV[2])
  redis.call('DEL', KEYS[3], KEYS[4])
end
return {seq, 0}
"#;

/// KEYS: seq, epoch, seen id, pending, streams…; ARGV: `id` or `seq`, after (for `seq`),
/// max entries, body key prefix. Returns `{head, epoch start, after, {complete,
/// payload…}…}`, or `{head, epoch start, -1}` for an unknown id; in routed mode
/// `{bus counter, node counter}` follows `after` (or `-1`). While a message is half
/// written ([`CHUNK_SCRIPT`]) the head is the number before it.
pub const READ_SCRIPT: &str = r#"
local epoch = epoch_start()
local head = tonumber(redis.call('GET', KEYS[1]) or '0')
local pending = redis.call('GET', KEYS[4])
if pending then
  head = math.min(head, tonumber(string.match(pending, '^(%d+)')) - 1)
end
local pos = positions()
local after
if ARGV[1] == 'id' then
  local s = redis.call('GET', KEYS[3])
  if not s then return {head, epoch, -1, pos} end
  after = tonumber(s)
else
  after = tonumber(ARGV[2])
end
local max = tonumber(ARGV[3])
local out = {head, epoch, after, pos}
for i = 5, #KEYS do
  local read = {1}
  local list = redis.pcall('LRANGE', KEYS[i], 0, -1)
  if list.err then
    -- not a list (an older layout): its entries cannot be read
    read[1] = 0
  elseif #list > 0 then
    -- Trimming removes the oldest entries: nothing after `after` is gone if nothing was
    -- ever trimmed, if the marker (the newest entry trimmed) is at or before `after`, or
    -- if an entry at or before `after` is still there. An entry replaced by a later one
    -- with its `collapse` key is not missing: the later one stands for it.
    local marker = tonumber(list[1])
    if list[1] ~= '0' and not (marker and marker <= after)
        and not (list[2] and tonumber(list[2]) <= after) then
      read[1] = 0
    end
    for j = 2, #list do
      if #read > max then break end
      if tonumber(list[j]) > after then
        local body = redis.call('GET', ARGV[4] .. list[j])
        if body == '' then
          -- aborted before it was published (see CHUNK_SCRIPT): it is published again
        elseif body then
          read[#read + 1] = body
        else
          -- expired or evicted: a missing entry, never skipped silently
          read[1] = 0
        end
      end
    end
  end
  out[#out + 1] = read
end
return out
"#;

/// Decodes a script's answer of one `0` or `1` per question, `n` of them, in one string
/// (presence's online questions, receipts' claims): true for `1`.
pub fn flags(reply: &Value, n: usize) -> Result<Vec<bool>, String> {
    let text: &[u8] = match reply {
        Value::String(s) => s.as_bytes(),
        Value::Bytes(b) => b,
        Value::Null => &[],
        other => return Err(format!("expected a string of 0 and 1: {other:?}")),
    };
    if text.len() != n {
        return Err(format!("{} answers to {n} questions", text.len()));
    }
    text.iter()
        .map(|c| match c {
            b'1' => Ok(true),
            b'0' => Ok(false),
            other => Err(format!("unexpected answer {:?}", char::from(*other))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{flags, Value};

    #[test]
    fn flags_are_one_character_per_question() {
        assert_eq!(flags(&Value::from("101"), 3), Ok(vec![true, false, true]));
        assert_eq!(flags(&Value::Null, 0), Ok(vec![]));
        assert!(flags(&Value::from("10"), 3)
            .unwrap_err()
            .contains("2 answers to 3"));
        assert!(flags(&Value::from("1x"), 2).unwrap_err().contains("'x'"));
        assert!(flags(&Value::Integer(1), 1).is_err());
    }
}
