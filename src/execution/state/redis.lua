-- Shared by every scheduler-state script (src/execution/state/redis.rs).
-- ARGV[1] is the key prefix (a hash tag, so every key is in one slot and the
-- scripts run on Redis Cluster too), ARGV[2] the retention in milliseconds,
-- ARGV[3] the max number of finished operations, ARGV[4] now (ms); each
-- script's own arguments start at ARGV[5].
local P = ARGV[1]
local RETENTION = tonumber(ARGV[2])
local MAX_FINISHED = tonumber(ARGV[3])
local NOW = tonumber(ARGV[4])
-- REAPI ExecutionStage values (checked by a test against the proto).
local QUEUED, EXECUTING, COMPLETED = '2', '3', '4'
-- Owners of an operation, joined by this byte (never in a principal).
local SEP = '\31'

local function k(...)
  return P .. ':' .. table.concat({...}, ':')
end

local function tell(msg)
  redis.call('PUBLISH', k('changes'), msg)
end

local function has_owner(owners, who)
  for o in string.gmatch(owners, '[^' .. SEP .. ']+') do
    if o == who then return true end
  end
  return false
end

local function without_owner(owners, who)
  local kept = {}
  for o in string.gmatch(owners, '[^' .. SEP .. ']+') do
    if o ~= who then table.insert(kept, o) end
  end
  return table.concat(kept, SEP)
end

local function owner_count(owners)
  local n = 0
  for _ in string.gmatch(owners, '[^' .. SEP .. ']+') do n = n + 1 end
  return n
end

local function push_stage(key, stage)
  redis.call('HSET', key, 'stages', redis.call('HGET', key, 'stages') .. ',' .. stage)
end

local function forget(name)
  redis.call('DEL', k('op', name))
  redis.call('ZREM', k('ops'), name)
  redis.call('ZREM', k('finished'), name)
end

-- A finished operation: remembered for retention (the sweep forgets it;
-- the key's TTL, longer, is the safety net when no replica sweeps), and the
-- oldest beyond the cap go at once.
local function remember_finished(name)
  redis.call('ZADD', k('finished'), NOW, name)
  redis.call('PEXPIRE', k('op', name), RETENTION * 2 + 60000)
  local over = redis.call('ZCARD', k('finished')) - MAX_FINISHED
  if over > 0 then
    for _, old in ipairs(redis.call('ZRANGE', k('finished'), 0, over - 1)) do forget(old) end
  end
end

-- Finishes an operation not yet done; false if unknown or done.
local function finish(name, response)
  local key = k('op', name)
  if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'done_at') == 1 then
    return false
  end
  push_stage(key, COMPLETED)
  redis.call('HSET', key, 'response', response, 'done_at', NOW)
  redis.call('HDEL', key, 'rw', 'rt', 'spec')
  local merge = redis.call('HGET', key, 'merge')
  if merge and redis.call('HGET', k('inflight'), merge) == name then
    redis.call('HDEL', k('inflight'), merge)
  end
  remember_finished(name)
  return true
end

local function unqueue(queue, name)
  local removed = redis.call('ZREM', k('q', queue), name)
  if redis.call('ZCARD', k('q', queue)) == 0 then
    redis.call('SREM', k('queues'), queue)
  end
  return removed == 1
end

local function enqueue(queue, seq, name)
  redis.call('ZADD', k('q', queue), seq, name)
  redis.call('SADD', k('queues'), queue)
end

-- 'denied', 'detach' or 'whole' for `by` (ARGV admin flag '1': whole).
local function access(key, by, admin)
  if admin == '1' then return 'whole' end
  local owners = redis.call('HGET', key, 'owners')
  if not has_owner(owners, by) then return 'denied' end
  if owner_count(owners) > 1 then return 'detach' end
  return 'whole'
end

local function is_current(key, worker, task)
  return redis.call('HGET', key, 'rw') == worker and redis.call('HGET', key, 'rt') == task
end
