"""The Lua scripts of the ``redis`` backend (:mod:`backends.redis`): its atomic operations.

Each script is one atomic step on one master; the backend counts the masters' answers
(Redlock). Acquire takes the lease key only if it is free (``SET NX``). Every other script
that changes the lease or the leader info compares the owner value first, so a holder
never renews, releases or publishes over a lease that is not its own. A member's entry is
deleted only by its own incarnation (its session) or by its TTL; the listing drops from
the index only the ids whose entry has expired. The keys are listed in the backend's
docstring. Nothing here imports the Redis driver.

:data:`SCRIPTS` maps the names the backend runs them by to their source.
"""

from __future__ import annotations

# KEYS: lease, token. ARGV: owner, ttl_ms, min_token. The token, or 0 if the lease is held.
_ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local t = redis.call('INCR', KEYS[2])
if t <= tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[3])
  t = redis.call('INCR', KEYS[2])
end
return t
"""
# KEYS: lease, token. ARGV: owner, token. Raise the counter where we hold the lease.
_RAISE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
"""
# KEYS: lease, info. ARGV: owner, ttl_ms.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('HGET', KEYS[2], 'owner') == ARGV[1] then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
# KEYS: lease, info. ARGV: owner.
_RELEASE = """
if redis.call('HGET', KEYS[2], 'owner') == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""
# KEYS: lease, info. ARGV: owner, data. The info lives no longer than the lease.
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'data', ARGV[2])
redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1]))
return 1
"""
# KEYS: lease, info. Returns {lease owner or false, info owner or false, info data or false}.
_READ_LEADER = """
local i = redis.call('HMGET', KEYS[2], 'owner', 'data')
return {redis.call('GET', KEYS[1]), i[1], i[2]}
"""
# KEYS: member, index. ARGV: data, session, ttl_ms, node_id. 'seen' is the server's time.
_HEARTBEAT = """
local t = redis.call('TIME')
local seen = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'session', ARGV[2], 'seen', seen)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""
# KEYS: member, index. ARGV: session, node_id. Only this incarnation's entry.
_REMOVE_MEMBER = """
if redis.call('HGET', KEYS[1], 'session') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""
# KEYS: index. ARGV: member key prefix. Lists live members and drops expired ids, in one
# atomic step (a separate SREM could remove an id that a heartbeat has just re-added).
_LIST_MEMBERS = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('HMGET', ARGV[1] .. id, 'data', 'seen')
  if v[1] then
    table.insert(out, v[1]); table.insert(out, v[2])
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"""


#: Every script, by the name the backend runs it by (``RedisBackend._run_all``).
SCRIPTS: dict[str, str] = {
    "acquire": _ACQUIRE,
    "raise": _RAISE,
    "renew": _RENEW,
    "release": _RELEASE,
    "publish": _PUBLISH,
    "read_leader": _READ_LEADER,
    "heartbeat": _HEARTBEAT,
    "remove_member": _REMOVE_MEMBER,
    "list_members": _LIST_MEMBERS,
}
