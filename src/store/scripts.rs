//! The Lua scripts that change the shared store. Each runs atomically in Redis, so an entry,
//! its exact key, its place in the eviction order and its line in the change log always agree.
//!
//! Every line of the log carries `n`, one more than the line before (the counter `seq`): a node
//! that reads a line whose `n` is not the next it expects has missed lines (the log was trimmed
//! past it) and loads everything again.
//!
//! Keys are built from the namespace prefix inside the scripts for entries other than the one
//! named (victims, replaced entries): semcache uses a standalone Redis or Valkey, not Redis
//! Cluster, where every key a script touches must be declared.

/// Appends a change to the log, numbered.
const LOG: &str = r"
local function log_change(log, seq, maxlen, ...)
  local n = redis.call('INCR', seq)
  redis.call('XADD', log, 'MAXLEN', '~', maxlen, '*', 'n', n, ...)
end
";

/// Removes one entry, its exact key (when it still names it) and its eviction rank; logs the
/// removal when the entry was there (an entry Redis already expired is removed silently: every
/// node drops it on its own when its lifetime ends).
const DROP: &str = r"
local prefix, ids, log, now, maxlen = ARGV[1], KEYS[1], KEYS[2], ARGV[2], ARGV[3]
local seq = prefix .. 'seq'
local function drop(id)
  local e = prefix .. 'e:' .. id
  local x = redis.call('HGET', e, 'x')
  local n = redis.call('DEL', e)
  redis.call('ZREM', ids, id)
  if x then
    local xk = prefix .. 'x:' .. x
    if redis.call('GET', xk) == id then redis.call('DEL', xk) end
  end
  if n == 1 then
    log_change(log, seq, maxlen, 'op', 'del', 'id', id, 'ms', now)
  end
  return n
end
";

/// KEYS: ids, log, entry, exact, lease. ARGV: prefix, now, maxlen, id, record, exact hex,
/// tenant hex, expires ms (0: never), eviction score, max entries (0: no bound). Ends any lease
/// on the exact key: waiters on other nodes find the entry. Returns the number of entries
/// evicted.
pub fn put() -> String {
    format!(
        "{LOG}{DROP}{}",
        r"
local id = ARGV[4]
local old = redis.call('GET', KEYS[4])
if old and old ~= id then drop(old) end
redis.call('HSET', KEYS[3], 'r', ARGV[5], 'x', ARGV[6], 't', ARGV[7], 'h', '0', 'l', now, 'th', '0', 'w', '0')
local expires = tonumber(ARGV[8])
if expires > 0 then
  redis.call('PEXPIREAT', KEYS[3], expires)
  redis.call('SET', KEYS[4], id, 'PXAT', expires)
else
  redis.call('SET', KEYS[4], id)
end
redis.call('ZADD', ids, ARGV[9], id)
log_change(log, seq, maxlen, 'op', 'put', 'id', id, 'ms', now)
redis.call('DEL', KEYS[5])
local max, evicted = tonumber(ARGV[10]), 0
if max > 0 then
  while redis.call('ZCARD', ids) > max do
    local lowest = redis.call('ZRANGE', ids, 0, 1)
    local victim = lowest[1]
    if victim == id then victim = lowest[2] end
    if not victim then break end
    evicted = evicted + drop(victim)
    redis.call('ZREM', ids, victim)
  end
end
return evicted
"
    )
}

/// KEYS: ids, log. ARGV: prefix, now, maxlen, tenant hex ('': every tenant), ids...
/// Removes those of the ids that belong to the tenant. Returns how many were removed.
pub fn remove() -> String {
    format!(
        "{LOG}{DROP}{}",
        r"
local tenant, removed = ARGV[4], 0
for i = 5, #ARGV do
  local id = ARGV[i]
  if tenant == '' or redis.call('HGET', prefix .. 'e:' .. id, 't') == tenant then
    removed = removed + drop(id)
  end
  if redis.call('EXISTS', prefix .. 'e:' .. id) == 0 then redis.call('ZREM', ids, id) end
end
return removed
"
    )
}

/// KEYS: entry, ids. ARGV: id, now, policy ('lru' | 'lfu'), LFU increment. Counts a hit on an
/// entry that is still there; returns 0 when it is gone (expired, evicted, removed).
pub const CONFIRM: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HINCRBY', KEYS[1], 'h', 1)
redis.call('HSET', KEYS[1], 'l', ARGV[2])
if ARGV[3] == 'lru' then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1])
else
  redis.call('ZINCRBY', KEYS[2], ARGV[4], ARGV[1])
end
return 1
";

/// KEYS: exact. ARGV: prefix. The entry an exact key names, if it is still there: its id and
/// fields (see `FIELDS`).
pub const EXACT: &str = r"
local id = redis.call('GET', KEYS[1])
if not id then return false end
local fields = redis.call('HMGET', ARGV[1] .. 'e:' .. id, 'r', 'h', 'l', 'th', 'w')
if not fields[1] then return false end
return {id, fields[1], fields[2], fields[3], fields[4], fields[5]}
";

/// The fields read back for an entry, in this order.
pub const FIELDS: [&str; 5] = ["r", "h", "l", "th", "w"];

/// KEYS: entry, log, seq. ARGV: id, own threshold, wrong reports, now, maxlen. Saves feedback
/// on an entry that is still there and logs it when it changed; returns whether the entry is
/// there.
pub fn feedback() -> String {
    format!(
        "{LOG}{}",
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = redis.call('HMGET', KEYS[1], 'th', 'w')
if old[1] ~= ARGV[2] or old[2] ~= ARGV[3] then
  redis.call('HSET', KEYS[1], 'th', ARGV[2], 'w', ARGV[3])
  log_change(KEYS[2], KEYS[3], ARGV[5], 'op', 'fb', 'id', ARGV[1], 'th', ARGV[2], 'w', ARGV[3], 'ms', ARGV[4])
end
return 1
"
    )
}

/// KEYS: settings, log, seq. ARGV: settings JSON, now, maxlen.
pub fn settings() -> String {
    format!(
        "{LOG}{}",
        r"
redis.call('SET', KEYS[1], ARGV[1])
log_change(KEYS[2], KEYS[3], ARGV[3], 'op', 'set', 'settings', ARGV[1], 'ms', ARGV[2])
return 1
"
    )
}

/// KEYS: log, seq. Where a node starts following the log: the id of its last line ('0-0' when
/// it is empty: every later line is new) and that line's number.
pub const POSITION: &str = r"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local seq = redis.call('GET', KEYS[2]) or '0'
if #last == 0 then return {'0-0', seq} end
return {last[1][1], seq}
";

/// KEYS: lease. ARGV: token. Ends a lease that is still ours.
pub const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";
