"""The Lua scripts of the Redis store: every state change of a queue message, and every append to the topic log, is
one script, so it is atomic on the server. They are loaded once (``SCRIPT LOAD``) and called by hash (``EVALSHA``;
redis-py's ``register_script`` loads them again after a ``NOSCRIPT``, e.g. after a server restart).

The delivery rules are ``app.datasources.rules``' Python forms, in Lua:

* claimable: in ``ready``, or in ``leased`` with ``lease_until <= now``; and not expired (``expires_at <= now``
  messages are deleted by ``sweep`` before any claim, stats or peek looks, unless held under a live lease).
* claim order: the ``ready`` sorted set's score, ``(9 - priority) * 2^44 + seq``: priority descending, then FIFO
  by ``seq``, one counter for the namespace (exact in a double while seq < 2^44). A requeue or a dead-letter keeps
  the score: one counter, so that a dead letter never shares its score with a message put on the .DLQ itself (a
  scan resuming after a score would pass the second of two equal ones).
* a claim: ``st = 1``, owner, ``lease_until = now + lease_ms``, ``deliveries + 1``, ``lease + 1`` (the fencing
  token: per message, grows with every claim, never reused).
* requeue: back to ``ready`` at its old score, deliveries kept, lease token kept.
* dead-letter: to ``<destination>.DLQ`` (rules.DLQ_SUFFIX), ready, deliveries 0, ``original_destination`` kept from
  the first time.

Keys. Every key of a namespace ``ns`` shares the hash tag ``{ns}``, so a namespace lives in one slot: on Redis
Cluster too, each script (a COMMIT across destinations, a dead-letter, the message-id index) is atomic and touches
one node. A destination ``D`` is written with its length, ``{ns}:q:<len(D)>:D``, so that no destination's keys can
be another's with a message id appended (``a:m:x`` + ``:ready`` against ``a`` + ``:m:`` + ``x:ready``).

* ``{ns}:q:<n>:D:ready`` (zset id -> claim order), ``...:leased`` (zset id -> lease_until), ``...:exp`` (zset id ->
  expires_at, messages with an expiry only), ``...:m:<id>`` (hash: the message, fields below).
* ``{ns}:seq`` (the put counter), ``{ns}:ids`` (hash message id -> destination: ids are unique per store, and ACKs
  name only ids), ``{ns}:dests`` (set of destinations holding messages), ``{ns}:own:<owner>`` (set of ids claimed
  by owner, for renew), ``{ns}:w:<token>`` (a write's mark, kept an hour: a replay of a write that took effect does
  nothing), ``{ns}:layout`` (the key layout's version, ``store.LAYOUT``).
* ``{ns}:t:log`` (the topic stream, entry ids ``0-<position>``), ``{ns}:t:head`` (the newest position),
  ``{ns}:cursors`` (hash name -> position).
* channel ``ns:wake``: ``p<priority>:<destination>`` after a put, ``r:<destination>`` after a requeue (or lapsed
  leases made ready again), ``t<position>`` after a publish.

Scripts build key names from their arguments; each call declares one key of the namespace (``KEYS[1]``,
``{ns}:seq``), which routes it to the node that serves the namespace's slot on Cluster. Redis allows a script
undeclared keys of the slot its declared key is in.
"""

from __future__ import annotations

__all__ = ["FIELDS", "NAMES", "APPLY", "CLAIM", "CLAIM_IDS", "SCAN", "PEEK", "STATS", "RENEW", "PURGE", "MARK_KEEP_MS"]

# The message fields every script returns, in this order (see ``store.message_from``).
FIELDS = ("i", "d", "h", "b", "p", "x", "t", "s", "n", "od", "l")
MARK_KEEP_MS = 3_600_000
# the scripts the store loads at start-up
NAMES = ("APPLY", "CLAIM", "CLAIM_IDS", "SCAN", "PEEK", "STATS", "RENEW", "PURGE")

_PRELUDE = r"""
local ns = ARGV[1]
local IDS = '{' .. ns .. '}:ids'
local DESTS = '{' .. ns .. '}:dests'
local OWN = '{' .. ns .. '}:own:'
local SEQ = '{' .. ns .. '}:seq'
local CHANNEL = ns .. ':wake'
local TWO44 = 17592186044416
local FIELDS = {'i', 'd', 'h', 'b', 'p', 'x', 't', 's', 'n', 'od', 'l'}

-- the prefix of a destination's keys: store.queue_prefix in Python
local function qp(dest) return '{' .. ns .. '}:q:' .. #dest .. ':' .. dest end
local function num(n) return string.format('%.0f', n) end

-- the message leaves its owner's lease set (which RENEW walks): kept to what the owner holds now
local function disown(k, id)
  local o = redis.call('HGET', k, 'o')
  if o and o ~= '' then redis.call('SREM', OWN .. o, id) end
end

local function forget(p, id)
  disown(p .. ':m:' .. id, id)
  redis.call('DEL', p .. ':m:' .. id)
  redis.call('ZREM', p .. ':ready', id)
  redis.call('ZREM', p .. ':leased', id)
  redis.call('ZREM', p .. ':exp', id)
  redis.call('HDEL', IDS, id)
end

local function gc(dest, p)
  if redis.call('ZCARD', p .. ':ready') == 0 and redis.call('ZCARD', p .. ':leased') == 0 then
    redis.call('SREM', DESTS, dest)
  end
end

-- expired and not under a live lease: never to be delivered, so deleted
local function sweep(dest, p, now)
  local gone = redis.call('ZRANGEBYSCORE', p .. ':exp', '-inf', now)
  local n = 0
  for _, id in ipairs(gone) do
    local u = redis.call('ZSCORE', p .. ':leased', id)
    if not u or tonumber(u) <= now then
      forget(p, id)
      n = n + 1
    end
  end
  if n > 0 then gc(dest, p) end
end

-- leases that lapsed: ready again at their old places (lease token kept, so a slow holder's ACK still deletes)
local function requeue_lapsed(dest, p, now)
  local lapsed = redis.call('ZRANGEBYSCORE', p .. ':leased', '-inf', now)
  for _, id in ipairs(lapsed) do
    local k = p .. ':m:' .. id
    redis.call('ZREM', p .. ':leased', id)
    redis.call('ZADD', p .. ':ready', redis.call('HGET', k, 'r'), id)
    disown(k, id)
    redis.call('HSET', k, 'st', 0, 'o', '', 'u', 0)
  end
  if #lapsed > 0 then redis.call('PUBLISH', CHANNEL, 'r:' .. dest) end
  return #lapsed
end

local function take(p, id, owner, lease_until)
  local k = p .. ':m:' .. id
  redis.call('ZREM', p .. ':ready', id)
  redis.call('ZADD', p .. ':leased', lease_until, id)
  redis.call('HINCRBY', k, 'n', 1)
  redis.call('HINCRBY', k, 'l', 1)
  redis.call('HSET', k, 'st', 1, 'o', owner, 'u', lease_until)
  redis.call('SADD', OWN .. owner, id)
  return redis.call('HMGET', k, unpack(FIELDS))
end
"""

# ARGV: ns, token ('' for no mark: ACKs and releases alone), retention, nq, nt, na, nr, nd, then 7 per queue message (id, destination, priority, expires_at or
# '', published_at, headers, body), 7 per topic message, then 2 per ack, requeue and dead-letter (id, lease or '').
# Returns {replayed (0/1), newest topic position (0: none), {destinations woken by releases}}.
APPLY = _PRELUDE + r"""
local token, retention = ARGV[2], ARGV[3]
local nq, nt, na, nr, nd = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local mark = nil
if token ~= '' then
  mark = '{' .. ns .. '}:w:' .. token
  local prior = redis.call('GET', mark)
  if prior then return {1, tonumber(prior), {}} end
end
local base = 8
-- first every check, then every change: a refused write changes nothing
local seen = {}
for i = 0, nq - 1 do
  local id = ARGV[base + 7 * i + 1]
  if seen[id] or redis.call('HEXISTS', IDS, id) == 1 then
    return redis.error_reply('stompgate: message id already stored: ' .. id)
  end
  seen[id] = true
end
-- a lost topic head (evicted, deleted) would make XADD fail after the queue part was written, and a script does not
-- roll back: before any change it is restored from the stream's last id. Only when it is missing: XINFO STREAM also
-- copies the first and last entries, bodies and all, which every publish would pay for.
if nt > 0 then
  local log, head = '{' .. ns .. '}:t:log', '{' .. ns .. '}:t:head'
  if redis.call('EXISTS', head) == 0 and redis.call('EXISTS', log) == 1 then
    local info = redis.call('XINFO', 'STREAM', log)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        redis.call('SET', head, string.match(info[i + 1], '%-(%d+)$'))
      end
    end
  end
end
local top = {}
for i = 0, nq - 1 do
  local o = base + 7 * i
  local id, dest, prio, exp = ARGV[o + 1], ARGV[o + 2], tonumber(ARGV[o + 3]), ARGV[o + 4]
  local p = qp(dest)
  local seq = redis.call('INCR', SEQ)
  local score = num((9 - prio) * TWO44 + seq)
  redis.call('HSET', p .. ':m:' .. id, 'i', id, 'd', dest, 'h', ARGV[o + 6], 'b', ARGV[o + 7], 'p', prio, 'x', exp,
    't', ARGV[o + 5], 's', seq, 'r', score, 'n', 0, 'l', 0, 'st', 0, 'o', '', 'u', 0)
  redis.call('ZADD', p .. ':ready', score, id)
  if exp ~= '' then redis.call('ZADD', p .. ':exp', exp, id) end
  redis.call('HSET', IDS, id, dest)
  redis.call('SADD', DESTS, dest)
  if top[dest] == nil or top[dest] < prio then top[dest] = prio end
end
base = base + 7 * nq
local tbase = base
base = base + 7 * nt
for i = 0, na - 1 do
  local id, lease = ARGV[base + 2 * i + 1], ARGV[base + 2 * i + 2]
  local dest = redis.call('HGET', IDS, id)
  if dest then
    local p = qp(dest)
    if lease == '' or redis.call('HGET', p .. ':m:' .. id, 'l') == lease then
      forget(p, id)
      gc(dest, p)
    end
  end
end
base = base + 2 * na
local woken, wset = {}, {}
local function wake(dest)
  if not wset[dest] then
    wset[dest] = true
    woken[#woken + 1] = dest
  end
end
for i = 0, nr + nd - 1 do
  local id, lease = ARGV[base + 2 * i + 1], ARGV[base + 2 * i + 2]
  local dest = redis.call('HGET', IDS, id)
  if dest then
    local p = qp(dest)
    local k = p .. ':m:' .. id
    local st, l = unpack(redis.call('HMGET', k, 'st', 'l'))
    if st == '1' and (lease == '' or l == lease) then
      redis.call('ZREM', p .. ':leased', id)
      if i < nr then
        redis.call('ZADD', p .. ':ready', redis.call('HGET', k, 'r'), id)
        disown(k, id)
        redis.call('HSET', k, 'st', 0, 'o', '', 'u', 0)
        wake(dest)
      else
        local to = dest .. '.DLQ'
        local np = qp(to)
        local nk = np .. ':m:' .. id
        local exp, od, r = unpack(redis.call('HMGET', k, 'x', 'od', 'r'))
        disown(k, id)
        redis.call('RENAME', k, nk)
        if exp ~= '' then
          redis.call('ZREM', p .. ':exp', id)
          redis.call('ZADD', np .. ':exp', exp, id)
        end
        if not od or od == '' then od = dest end
        redis.call('HSET', nk, 'd', to, 'od', od, 'n', 0, 'st', 0, 'o', '', 'u', 0)
        redis.call('ZADD', np .. ':ready', r, id)
        redis.call('HSET', IDS, id, to)
        redis.call('SADD', DESTS, to)
        gc(dest, p)
        wake(to)
      end
    end
  end
end
for dest, prio in pairs(top) do redis.call('PUBLISH', CHANNEL, 'p' .. prio .. ':' .. dest) end
for _, dest in ipairs(woken) do redis.call('PUBLISH', CHANNEL, 'r:' .. dest) end
local newest = 0
if nt > 0 then
  local log, head = '{' .. ns .. '}:t:log', '{' .. ns .. '}:t:head'
  newest = redis.call('INCRBY', head, nt)
  local first = newest - nt
  for i = 0, nt - 1 do
    local o = tbase + 7 * i
    redis.call('XADD', log, 'MAXLEN', '~', retention, '0-' .. num(first + i + 1), 'i', ARGV[o + 1], 'd', ARGV[o + 2],
      'p', ARGV[o + 3], 'x', ARGV[o + 4], 't', ARGV[o + 5], 'h', ARGV[o + 6], 'b', ARGV[o + 7])
  end
  redis.call('PUBLISH', CHANNEL, 't' .. num(newest))
end
if mark then redis.call('SET', mark, newest, 'PX', """ + str(MARK_KEEP_MS) + r""") end
return {0, newest, woken}
"""

# ARGV: ns, destination, now, owner, lease_until, limit. Returns {lapsed leases requeued, {messages}}.
CLAIM = _PRELUDE + r"""
local dest, now, owner, lease_until, limit = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
local p = qp(dest)
sweep(dest, p, now)
local requeued = requeue_lapsed(dest, p, now)
local out = {}
for _, id in ipairs(redis.call('ZRANGE', p .. ':ready', 0, limit - 1)) do
  out[#out + 1] = take(p, id, owner, lease_until)
end
return {requeued, out}
"""

# ARGV: ns, destination, now, owner, lease_until, ids... Claims each id still claimable (another claim may have taken
# it since the scan read it). Returns {messages}.
CLAIM_IDS = _PRELUDE + r"""
local dest, now, owner, lease_until = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local p = qp(dest)
local out = {}
for i = 6, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', p .. ':ready', id) then
    local exp = redis.call('HGET', p .. ':m:' .. id, 'x')
    if exp == '' or tonumber(exp) > now then out[#out + 1] = take(p, id, owner, lease_until) end
  end
end
return out
"""

# ARGV: ns, destination, now, after (a claim-order score, exclusive; '' from the start), count. Sweeps, makes lapsed
# leases ready again (then reads from the start), and returns {requeued, {id, score, headers, ...}} in claim order.
SCAN = _PRELUDE + r"""
local dest, now, after, count = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local p = qp(dest)
sweep(dest, p, now)
local requeued = requeue_lapsed(dest, p, now)
local from = '-inf'
if after ~= '' and requeued == 0 then from = '(' .. after end
local rows = redis.call('ZRANGEBYSCORE', p .. ':ready', from, '+inf', 'WITHSCORES', 'LIMIT', 0, count)
local out = {}
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = rows[i + 1]
  out[#out + 1] = redis.call('HGET', p .. ':m:' .. rows[i], 'h')
end
return {requeued, out}
"""

# ARGV: ns, destination, now, after ('' from the start), count. The claimable messages after ``after`` in claim order
# (ready ones and lapsed leases), without claiming: {{score, fields...}, ...}.
PEEK = _PRELUDE + r"""
local dest, now, after, count = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local p = qp(dest)
sweep(dest, p, now)
local from, low = '-inf', nil
if after ~= '' then
  from = '(' .. after
  low = tonumber(after)
end
local rows = {}
local ready = redis.call('ZRANGEBYSCORE', p .. ':ready', from, '+inf', 'WITHSCORES', 'LIMIT', 0, count)
for i = 1, #ready, 2 do rows[#rows + 1] = {tonumber(ready[i + 1]), ready[i]} end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':leased', '-inf', now)) do
  local r = tonumber(redis.call('HGET', p .. ':m:' .. id, 'r'))
  if low == nil or r > low then rows[#rows + 1] = {r, id} end
end
table.sort(rows, function(a, b) return a[1] < b[1] end)
local out = {}
for i = 1, math.min(count, #rows) do
  local m = redis.call('HMGET', p .. ':m:' .. rows[i][2], unpack(FIELDS))
  table.insert(m, 1, num(rows[i][1]))
  out[#out + 1] = m
end
return out
"""

# ARGV: ns, destination, now. Returns {ready, unacked}.
STATS = _PRELUDE + r"""
local dest, now = ARGV[2], tonumber(ARGV[3])
local p = qp(dest)
sweep(dest, p, now)
local ready = redis.call('ZCARD', p .. ':ready') + redis.call('ZCOUNT', p .. ':leased', '-inf', now)
return {ready, redis.call('ZCOUNT', p .. ':leased', '(' .. ARGV[3], '+inf')}
"""

# ARGV: ns, owner, lease_until. Extends every lease ``owner`` holds; forgets ids it no longer holds.
RENEW = _PRELUDE + r"""
local owner, lease_until = ARGV[2], ARGV[3]
local key = OWN .. owner
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', key)) do
  local dest = redis.call('HGET', IDS, id)
  local held = false
  if dest then
    local p = qp(dest)
    local k = p .. ':m:' .. id
    local o, st = unpack(redis.call('HMGET', k, 'o', 'st'))
    if o == owner and st == '1' then
      redis.call('HSET', k, 'u', lease_until)
      redis.call('ZADD', p .. ':leased', lease_until, id)
      held = true
      n = n + 1
    end
  end
  if not held then redis.call('SREM', key, id) end
end
return n
"""

# ARGV: ns, destination. Deletes every message of the destination; returns how many.
PURGE = _PRELUDE + r"""
local dest = ARGV[2]
local p = qp(dest)
local n = 0
for _, set in ipairs({':ready', ':leased'}) do
  for _, id in ipairs(redis.call('ZRANGE', p .. set, 0, -1)) do
    disown(p .. ':m:' .. id, id)
    redis.call('DEL', p .. ':m:' .. id)
    redis.call('HDEL', IDS, id)
    n = n + 1
  end
end
redis.call('DEL', p .. ':ready', p .. ':leased', p .. ':exp')
redis.call('SREM', DESTS, dest)
return n
"""
