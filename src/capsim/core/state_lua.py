"""The session store's server-side scripts: compare-and-set with TTL, and a read capped by absolute expiry.

Each runs atomically on the server; ``RedisSessionStore`` falls back to WATCH/MULTI/EXEC transactions
with the same outcomes where scripting is unavailable.
"""

from __future__ import annotations

# The Lua head pattern mirrors state_model.HEAD_RE.
_HEAD = '^{"session_id":"[^"]*","version":(%d+),"created_at_s":([-%d.eE+]+),'

# KEYS[1]: session key. ARGV: expected version (0 = must be absent), new value, TTL in ms.
# Returns 1 (written), -1 (conflict), -2 (stored value is not ours). A stored value byte-identical to the
# new one means this very write already landed (redis-py retried after a lost reply): report success.
# Every write carries a fresh random write_id, so two different writers never produce identical bytes,
# however coarse or equal their clocks.
CAS_LUA = f"""
local cur = redis.call('GET', KEYS[1])
local want = tonumber(ARGV[1])
if cur then
  if cur == ARGV[2] then return 1 end
  local v = string.match(cur, '{_HEAD}')
  if not v then return -2 end
  if tonumber(v) ~= want then return -1 end
elseif want ~= 0 then
  return -1
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS[1]: session key. ARGV: sliding TTL ms, absolute TTL ms, client now in ms.
# Reads and refreshes the TTL, capped by created_at + absolute TTL; deletes a session past its cap.
READ_CAPPED_LUA = f"""
local cur = redis.call('GET', KEYS[1])
if not cur then return false end
local ttl = tonumber(ARGV[1])
local _, created = string.match(cur, '{_HEAD}')
if created then
  local left = math.floor(tonumber(created) * 1000 + tonumber(ARGV[2]) - tonumber(ARGV[3]))
  if left <= 0 then
    redis.call('DEL', KEYS[1])
    return false
  end
  if left < ttl then ttl = left end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return cur
"""

# KEYS[1]: session key. ARGV: the exact value the writer last saw, new value, TTL in ms.
# Returns 1 (written) or -1 (the stored value is not the one expected, or there is none). Used by an
# update that starts from the state this store holds (state_cache.py): one round trip instead of a read
# and a compare-and-set. Byte equality is stricter than the version check: a session that expired and was
# created again up to the same version by another writer has other bytes (its own write_id).
CAS_EXACT_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[2] then return 1 end
if cur ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
