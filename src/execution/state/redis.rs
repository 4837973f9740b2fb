//! Scheduler state on Redis: several server replicas share one queue.
//!
//! Every transition is one Lua script (atomic on the server); every key is
//! under one hash tag (`{prefix}:...`), so the scripts also run on Redis
//! Cluster. Layout:
//! - `op:NAME` hash: one operation (see [`op_record`] for the fields);
//! - `ops` zset: names by seq (listing); `finished` zset: names by done_at
//!   (retention and the cap);
//! - `q:QUEUE` zset: queued names by seq; `queues` set: non-empty queues;
//! - `inflight` hash: merge key -> name; `seq`, `next_worker` counters;
//! - `worker:ID` hash, `wtasks:ID` hash (task -> name), `workers` hash
//!   (name -> id); `counters` hash;
//! - `replica:ID` string with a TTL (the lease), `replicas` set;
//! - `changes`: the pub/sub channel of the change feed.
//!
//! The change feed is read on a connection of its own
//! (`get_async_pubsub`); when it breaks, it reconnects and sends
//! [`Change::Resync`], since changes published meanwhile are lost.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{Script, Value};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::broadcast;

use super::*;
use crate::error::Error;

/// `[scheduler] state = { redis = "redis://...", prefix = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStateConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`).
    pub redis: String,
    /// Keys are `{prefix}:...`; two clusters of replicas sharing one Redis
    /// use two prefixes. Default `distbuild`.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// A call to Redis that takes longer than this is UNAVAILABLE.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the change feed waits before reconnecting.
const FEED_RETRY: Duration = Duration::from_millis(500);

const LIB: &str = include_str!("redis.lua");

macro_rules! script {
    ($name:ident, $body:expr) => {
        static $name: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{LIB}\n{}", $body)));
    };
}

script!(
    SUBMIT,
    r#"
local instance, digest, queue, spec, merge, owner, name = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
if merge ~= '' then
  local existing = redis.call('HGET', k('inflight'), merge)
  if existing and redis.call('EXISTS', k('op', existing)) == 1 then
    redis.call('HINCRBY', k('counters'), 'merged', 1)
    local owners = redis.call('HGET', k('op', existing), 'owners')
    if not has_owner(owners, owner) then
      redis.call('HSET', k('op', existing), 'owners', owners .. SEP .. owner)
      tell('op ' .. existing)
    end
    return {'joined', existing}
  end
end
local seq = redis.call('INCR', k('seq'))
local key = k('op', name)
redis.call('HSET', key, 'seq', seq, 'instance', instance, 'digest', digest, 'queue', queue, 'spec', spec,
  'owners', owner, 'stages', QUEUED, 'attempts', 0, 'queued_at', NOW, 'queued_since', NOW)
if merge ~= '' then
  redis.call('HSET', key, 'merge', merge)
  redis.call('HSET', k('inflight'), merge, name)
end
redis.call('ZADD', k('ops'), seq, name)
enqueue(queue, seq, name)
redis.call('HINCRBY', k('counters'), 'cache_misses', 1)
tell('queue')
return {'created', name}
"#
);

script!(
    INSERT_FINISHED,
    r#"
local instance, digest, queue, response, owner, name = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local seq = redis.call('INCR', k('seq'))
redis.call('HSET', k('op', name), 'seq', seq, 'instance', instance, 'digest', digest, 'queue', queue,
  'owners', owner, 'stages', COMPLETED, 'attempts', 0, 'queued_at', NOW, 'queued_since', NOW,
  'response', response, 'done_at', NOW)
redis.call('ZADD', k('ops'), seq, name)
redis.call('HINCRBY', k('counters'), 'cache_hits', 1)
remember_finished(name)
return name
"#
);

script!(
    GET,
    r#"
return redis.call('HGETALL', k('op', ARGV[5]))
"#
);

script!(
    LIST,
    r#"
local out = {}
for _, name in ipairs(redis.call('ZRANGE', k('ops'), 0, -1)) do
  local h = redis.call('HGETALL', k('op', name))
  if #h == 0 then
    redis.call('ZREM', k('ops'), name)  -- its key's TTL ran out
  else
    table.insert(out, {name, h})
  end
end
return out
"#
);

script!(
    CLAIM,
    r#"
local worker, task = ARGV[5], ARGV[6]
local wkey = k('worker', worker)
if redis.call('EXISTS', wkey) == 0 then return false end
local w = redis.call('HMGET', wkey, 'draining', 'slots', 'name')
if w[1] == '1' or redis.call('HLEN', k('wtasks', worker)) >= tonumber(w[2]) then return false end
local best, best_seq, best_queue = nil, nil, nil
for i = 7, #ARGV do
  local front = redis.call('ZRANGE', k('q', ARGV[i]), 0, 0, 'WITHSCORES')
  if front[1] and (best_seq == nil or tonumber(front[2]) < best_seq) then
    best, best_seq, best_queue = front[1], tonumber(front[2]), ARGV[i]
  end
end
if best == nil then return false end
unqueue(best_queue, best)
local key = k('op', best)
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'rw', worker, 'rt', task, 'worker', w[3])
redis.call('HSET', k('wtasks', worker), task, best)
tell('op ' .. best)
return {best, redis.call('HGETALL', key)}
"#
);

script!(
    STARTED,
    r#"
local worker, task = ARGV[5], ARGV[6]
local name = redis.call('HGET', k('wtasks', worker), task)
if not name or not is_current(k('op', name), worker, task) then return 0 end
push_stage(k('op', name), EXECUTING)
tell('op ' .. name)
return 1
"#
);

script!(
    TAKE_TASK,
    r#"
local worker, task, succeeded = ARGV[5], ARGV[6], ARGV[7]
local name = redis.call('HGET', k('wtasks', worker), task)
if not name then return false end
redis.call('HDEL', k('wtasks', worker), task)
if redis.call('EXISTS', k('worker', worker)) == 1 then
  redis.call('HINCRBY', k('worker', worker), 'done', 1)
  if succeeded ~= '1' then redis.call('HINCRBY', k('worker', worker), 'failed', 1) end
end
tell('queue')
local key = k('op', name)
if not is_current(key, worker, task) then return false end
redis.call('HDEL', key, 'rw', 'rt')
return {name, redis.call('HGETALL', key)}
"#
);

script!(
    COMPLETE,
    r#"
local name, response, executed, failed = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if not finish(name, response) then return 0 end
if executed == '1' then redis.call('HINCRBY', k('counters'), 'executed', 1) end
if failed == '1' then redis.call('HINCRBY', k('counters'), 'failed', 1) end
tell('op ' .. name)
return 1
"#
);

script!(
    FAIL_QUEUED,
    r#"
local name, response = ARGV[5], ARGV[6]
local queue = redis.call('HGET', k('op', name), 'queue')
if not queue or not unqueue(queue, name) then return 0 end
finish(name, response)
redis.call('HINCRBY', k('counters'), 'failed', 1)
tell('op ' .. name)
return 1
"#
);

script!(
    CANCEL,
    r#"
local name, by, admin, response = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local key = k('op', name)
if redis.call('EXISTS', key) == 0 then return {'unknown'} end
local a = access(key, by, admin)
if a == 'denied' then return {'unknown'} end
if a == 'detach' then
  redis.call('HSET', key, 'owners', without_owner(redis.call('HGET', key, 'owners'), by))
  tell('op ' .. name)
  return {'detached'}
end
if redis.call('HEXISTS', key, 'done_at') == 1 then return {'done'} end
local rw, rt = redis.call('HGET', key, 'rw'), redis.call('HGET', key, 'rt')
if not rw then unqueue(redis.call('HGET', key, 'queue'), name) end
finish(name, response)
redis.call('HINCRBY', k('counters'), 'cancelled', 1)
if rw then tell('cancel ' .. rw .. ' ' .. rt) end
tell('op ' .. name)
if rw then return {'cancelled', rw, rt} end
return {'cancelled'}
"#
);

script!(
    DELETE,
    r#"
local name, by, admin = ARGV[5], ARGV[6], ARGV[7]
local key = k('op', name)
if redis.call('EXISTS', key) == 0 then return 'unknown' end
local a = access(key, by, admin)
if a == 'denied' then return 'unknown' end
if a == 'detach' then
  redis.call('HSET', key, 'owners', without_owner(redis.call('HGET', key, 'owners'), by))
  tell('op ' .. name)
  return 'detached'
end
if redis.call('HEXISTS', key, 'done_at') == 0 then return 'running' end
forget(name)
return 'deleted'
"#
);

script!(
    EXPIRE,
    r#"
local gone = 0
for _, name in ipairs(redis.call('ZRANGEBYSCORE', k('finished'), '-inf', '(' .. (NOW - RETENTION))) do
  forget(name)
  gone = gone + 1
end
local over = redis.call('ZCARD', k('finished')) - MAX_FINISHED
if over > 0 then
  for _, name in ipairs(redis.call('ZRANGE', k('finished'), 0, over - 1)) do
    forget(name)
    gone = gone + 1
  end
end
return gone
"#
);

script!(
    REGISTER,
    r#"
local name, replica, properties, slots, builtin, sandbox, incarnation =
  ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local old = redis.call('HGET', k('workers'), name)
if old and redis.call('EXISTS', k('worker', old)) == 1 then
  if incarnation == '' or redis.call('HGET', k('worker', old), 'incarnation') ~= incarnation then
    return {'taken'}
  end
  return {'reconnected', old}
end
local id = redis.call('INCR', k('next_worker'))
redis.call('HSET', k('worker', id), 'name', name, 'replica', replica, 'properties', properties, 'slots', slots,
  'builtin', builtin, 'sandbox', sandbox, 'incarnation', incarnation, 'draining', '0', 'last_seen', NOW,
  'connected_at', NOW, 'done', 0, 'failed', 0)
redis.call('HSET', k('workers'), name, id)
tell('queue')
return {'added', id}
"#
);

script!(
    TOUCH,
    r#"
if redis.call('EXISTS', k('worker', ARGV[5])) == 1 then
  redis.call('HSET', k('worker', ARGV[5]), 'last_seen', NOW)
end
return 1
"#
);

script!(
    SET_DRAINING,
    r#"
local name, draining = ARGV[5], ARGV[6]
local id = redis.call('HGET', k('workers'), name)
if not id or redis.call('EXISTS', k('worker', id)) == 0 then return false end
redis.call('HSET', k('worker', id), 'draining', draining)
tell('drain ' .. id .. ' ' .. draining)
if draining == '0' then tell('queue') end
return tonumber(id)
"#
);

script!(
    REMOVE_WORKER,
    r#"
local id, max_attempts = ARGV[5], tonumber(ARGV[6])
local wkey = k('worker', id)
if redis.call('EXISTS', wkey) == 0 then return false end
local w = redis.call('HGETALL', wkey)
local tasks = redis.call('HGETALL', k('wtasks', id))
local requeued, exhausted = {}, {}
for i = 1, #tasks, 2 do
  local task, name = tasks[i], tasks[i + 1]
  local key = k('op', name)
  if is_current(key, id, task) then
    redis.call('HDEL', key, 'rw', 'rt', 'worker')
    if tonumber(redis.call('HGET', key, 'attempts')) >= max_attempts then
      table.insert(exhausted, name)
    else
      push_stage(key, QUEUED)
      redis.call('HSET', key, 'queued_since', NOW)
      enqueue(redis.call('HGET', key, 'queue'), tonumber(redis.call('HGET', key, 'seq')), name)
      redis.call('HINCRBY', k('counters'), 'requeued', 1)
      table.insert(requeued, name)
    end
    tell('op ' .. name)
  end
end
local name = redis.call('HGET', wkey, 'name')
if redis.call('HGET', k('workers'), name) == id then redis.call('HDEL', k('workers'), name) end
redis.call('DEL', wkey, k('wtasks', id))
tell('queue')
return {w, tasks, requeued, exhausted}
"#
);

script!(
    WORKERS,
    r#"
local out = {}
for _, id in ipairs(redis.call('HVALS', k('workers'))) do
  local w = redis.call('HGETALL', k('worker', id))
  if #w > 0 then table.insert(out, {id, w, redis.call('HGETALL', k('wtasks', id))}) end
end
return out
"#
);

script!(
    QUEUES,
    r#"
local out = {}
for _, queue in ipairs(redis.call('SMEMBERS', k('queues'))) do
  local entries = {}
  local q = redis.call('ZRANGE', k('q', queue), 0, -1, 'WITHSCORES')
  for i = 1, #q, 2 do
    local since = redis.call('HGET', k('op', q[i]), 'queued_since') or '0'
    table.insert(entries, {q[i], q[i + 1], since})
  end
  if #entries > 0 then table.insert(out, {queue, entries}) end
end
return out
"#
);

script!(
    FRONTS,
    r#"
local out = {}
for _, queue in ipairs(redis.call('SMEMBERS', k('queues'))) do
  local front = redis.call('ZRANGE', k('q', queue), 0, 0, 'WITHSCORES')
  if front[1] then table.insert(out, {queue, front[2]}) end
end
return out
"#
);

script!(
    COUNTERS,
    r#"
return redis.call('HGETALL', k('counters'))
"#
);

script!(
    LEASE,
    r#"
local replica, ttl = ARGV[5], ARGV[6]
if ttl == '0' then
  redis.call('DEL', k('replica', replica))
  redis.call('SREM', k('replicas'), replica)
else
  redis.call('SET', k('replica', replica), NOW, 'PX', ttl)
  redis.call('SADD', k('replicas'), replica)
end
return 1
"#
);

script!(
    LIVE,
    r#"
local out = {}
for _, replica in ipairs(redis.call('SMEMBERS', k('replicas'))) do
  if redis.call('EXISTS', k('replica', replica)) == 1 then
    table.insert(out, replica)
  else
    redis.call('SREM', k('replicas'), replica)
  end
end
return out
"#
);

/// [`SchedulerState`] on Redis (standalone; keys ready for Cluster).
pub struct RedisState {
    conn: ConnectionManager,
    /// `{prefix}`: the hash tag every key starts with.
    prefix: String,
    retention: Retention,
    /// Where errors say the state is: host and port, never a password.
    engine: String,
    feed: broadcast::Sender<Change>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for RedisState {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl RedisState {
    pub async fn open(config: &RedisStateConfig, retention: Retention) -> Result<Self> {
        let client = ::redis::Client::open(config.redis.as_str())
            .map_err(|e| Error::invalid(format!("[scheduler] state: redis URL: {e}")))?;
        let engine = format!("redis at {}", client.get_connection_info().addr());
        let unavailable = |e: ::redis::RedisError| unavailable(&engine, e);
        let manager = ::redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2);
        let conn = client.get_connection_manager_with_config(manager).await.map_err(unavailable)?;
        let prefix = format!("{{{}}}", config.prefix.as_deref().unwrap_or("distbuild"));
        let feed = broadcast::channel(FEED_CAPACITY).0;
        let (subscribed, ready) = tokio::sync::oneshot::channel();
        let channel = format!("{prefix}:changes");
        let listener = tokio::spawn(listen(client, channel, feed.clone(), engine.clone(), subscribed));
        let state = RedisState { conn, prefix, retention, engine, feed, listener };
        // Nothing published after open returns is missed.
        match tokio::time::timeout(RESPONSE_TIMEOUT, ready).await {
            Ok(Ok(())) => Ok(state),
            _ => Err(Error::new(
                tonic::Code::Unavailable,
                format!("scheduler state ({}): the change feed did not subscribe", state.engine),
            )),
        }
    }

    /// Runs `script` with the common arguments, then `args`.
    async fn run(&self, script: &Script, args: &[&[u8]]) -> Result<Value> {
        let mut call = script.prepare_invoke();
        call.key(format!("{}:seq", self.prefix)) // routes to the slot of the tag
            .arg(&self.prefix)
            .arg(self.retention.retention.as_millis() as u64)
            .arg(self.retention.max_finished as u64)
            .arg(now_millis());
        for a in args {
            call.arg(*a);
        }
        call.invoke_async(&mut self.conn.clone()).await.map_err(|e| unavailable(&self.engine, e))
    }
}

fn unavailable(engine: &str, e: ::redis::RedisError) -> Error {
    Error::new(tonic::Code::Unavailable, format!("scheduler state ({engine}): {e}"))
}

/// Forwards the pub/sub channel to the local feed; reconnects when the
/// connection breaks, then sends [`Change::Resync`].
async fn listen(
    client: ::redis::Client,
    channel: String,
    feed: broadcast::Sender<Change>,
    engine: String,
    subscribed: tokio::sync::oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    match subscribed.take() {
                        Some(tx) => drop(tx.send(())),
                        // Changes published while it was away are lost.
                        None => drop(feed.send(Change::Resync)),
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        if let Some(change) = parse_change(msg.get_payload_bytes()) {
                            let _ = feed.send(change);
                        }
                    }
                    tracing::warn!(engine, "scheduler change feed lost; reconnecting");
                }
                Err(e) => tracing::warn!(engine, error = %e, "subscribing to the scheduler change feed"),
            },
            Err(e) => tracing::warn!(engine, error = %e, "connecting the scheduler change feed"),
        }
        tokio::time::sleep(FEED_RETRY).await;
    }
}

fn parse_change(payload: &[u8]) -> Option<Change> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(3, ' ');
    match (parts.next()?, parts.next(), parts.next()) {
        ("op", Some(name), None) => Some(Change::Op(name.to_string())),
        ("queue", None, None) => Some(Change::Queue),
        ("cancel", Some(w), Some(task)) => Some(Change::Cancel { worker: w.parse().ok()?, task: task.to_string() }),
        ("drain", Some(w), Some(d)) => Some(Change::Drain { worker: w.parse().ok()?, draining: d == "1" }),
        _ => None,
    }
}

// ---- decoding script answers -------------------------------------------

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

fn raw(v: &Value) -> Bytes {
    match v {
        Value::BulkString(b) => Bytes::copy_from_slice(b),
        other => Bytes::from(text(other)),
    }
}

/// A flat HGETALL answer as a map.
fn fields(v: &Value) -> HashMap<String, Value> {
    items(v).chunks(2).filter_map(|kv| Some((text(kv.first()?), kv.get(1)?.clone()))).collect()
}

fn num(f: &HashMap<String, Value>, key: &str) -> u64 {
    f.get(key).map(text).and_then(|t| t.parse().ok()).unwrap_or(0)
}

fn opt_text(f: &HashMap<String, Value>, key: &str) -> Option<String> {
    f.get(key).map(text)
}

const SEP: char = '\u{1f}';

fn op_record(name: &str, hash: &Value) -> Option<OpRecord> {
    let f = fields(hash);
    if f.is_empty() {
        return None;
    }
    let running = match (opt_text(&f, "rw"), opt_text(&f, "rt")) {
        (Some(w), Some(t)) => Some((w.parse().ok()?, t)),
        _ => None,
    };
    Some(OpRecord {
        name: name.to_string(),
        seq: num(&f, "seq"),
        instance: opt_text(&f, "instance").unwrap_or_default(),
        action_digest: opt_text(&f, "digest").unwrap_or_default(),
        queue: opt_text(&f, "queue").unwrap_or_default(),
        spec: f.get("spec").map(raw).unwrap_or_default(),
        merge_key: opt_text(&f, "merge"),
        owners: opt_text(&f, "owners").unwrap_or_default().split(SEP).map(str::to_string).collect(),
        stages: opt_text(&f, "stages").unwrap_or_default().split(',').filter_map(|s| s.parse().ok()).collect(),
        response: f.get("response").map(raw),
        worker: opt_text(&f, "worker"),
        attempts: num(&f, "attempts") as u32,
        running,
        queued_at: num(&f, "queued_at"),
        queued_since: num(&f, "queued_since"),
        done_at: f.contains_key("done_at").then(|| num(&f, "done_at")),
    })
}

/// A `{name, hash}` pair answer.
fn named_op(v: &Value) -> Option<OpRecord> {
    let pair = items(v);
    op_record(&text(pair.first()?), pair.get(1)?)
}

fn worker_record(id: u64, hash: &Value, tasks: &Value) -> WorkerRecord {
    let f = fields(hash);
    let tasks = items(tasks).chunks(2).filter(|kv| kv.len() == 2).map(|kv| (text(&kv[0]), text(&kv[1]))).collect();
    WorkerRecord {
        id,
        name: opt_text(&f, "name").unwrap_or_default(),
        replica: opt_text(&f, "replica").unwrap_or_default(),
        properties: serde_json::from_str(&opt_text(&f, "properties").unwrap_or_default()).unwrap_or_default(),
        slots: num(&f, "slots") as usize,
        builtin: opt_text(&f, "builtin").as_deref() == Some("1"),
        sandbox: opt_text(&f, "sandbox").unwrap_or_default(),
        incarnation: opt_text(&f, "incarnation").unwrap_or_default(),
        draining: opt_text(&f, "draining").as_deref() == Some("1"),
        last_seen: num(&f, "last_seen"),
        connected_at: num(&f, "connected_at"),
        done: num(&f, "done"),
        failed: num(&f, "failed"),
        tasks,
    }
}

fn flag(b: bool) -> &'static [u8] {
    if b { b"1" } else { b"0" }
}

/// Admin flag and owner for cancel/delete.
fn who(by: Option<&str>) -> (&[u8], &[u8]) {
    match by {
        Some(o) => (o.as_bytes(), b"0"),
        None => (b"", b"1"),
    }
}

#[async_trait]
impl SchedulerState for RedisState {
    async fn submit(&self, op: NewOp) -> Result<Submitted> {
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let merge = op.merge_key.clone().unwrap_or_default();
        let args: [&[u8]; 7] = [
            op.instance.as_bytes(),
            op.action_digest.as_bytes(),
            op.queue.as_bytes(),
            &op.spec,
            merge.as_bytes(),
            op.owner.as_bytes(),
            name.as_bytes(),
        ];
        let answer = self.run(&SUBMIT, &args).await?;
        let parts = items(&answer);
        let name = parts.get(1).map(text).unwrap_or_default();
        match parts.first().map(text).as_deref() {
            Some("joined") => Ok(Submitted::Joined(name)),
            _ => Ok(Submitted::Created(name)),
        }
    }

    async fn insert_finished(&self, op: NewOp, response: Bytes) -> Result<String> {
        let name = format!("operations/{}", uuid::Uuid::new_v4());
        let args: [&[u8]; 6] = [
            op.instance.as_bytes(),
            op.action_digest.as_bytes(),
            op.queue.as_bytes(),
            &response,
            op.owner.as_bytes(),
            name.as_bytes(),
        ];
        self.run(&INSERT_FINISHED, &args).await?;
        Ok(name)
    }

    async fn get(&self, name: &str) -> Result<Option<OpRecord>> {
        let answer = self.run(&GET, &[name.as_bytes()]).await?;
        Ok(op_record(name, &answer))
    }

    async fn list(&self) -> Result<Vec<OpRecord>> {
        let answer = self.run(&LIST, &[]).await?;
        Ok(items(&answer).iter().filter_map(named_op).collect())
    }

    async fn claim(&self, worker: u64, task: &str, queues: &[String]) -> Result<Option<OpRecord>> {
        if queues.is_empty() {
            return Ok(None);
        }
        let id = worker.to_string();
        let mut args: Vec<&[u8]> = vec![id.as_bytes(), task.as_bytes()];
        args.extend(queues.iter().map(|q| q.as_bytes()));
        let answer = self.run(&CLAIM, &args).await?;
        Ok(named_op(&answer))
    }

    async fn started(&self, worker: u64, task: &str) -> Result<()> {
        self.run(&STARTED, &[worker.to_string().as_bytes(), task.as_bytes()]).await?;
        Ok(())
    }

    async fn take_task(&self, worker: u64, task: &str, succeeded: bool) -> Result<Option<OpRecord>> {
        let answer = self.run(&TAKE_TASK, &[worker.to_string().as_bytes(), task.as_bytes(), flag(succeeded)]).await?;
        Ok(named_op(&answer))
    }

    async fn complete(&self, name: &str, response: Bytes, outcome: Outcome) -> Result<bool> {
        let args: [&[u8]; 4] = [name.as_bytes(), &response, flag(outcome.executed), flag(outcome.failed)];
        Ok(matches!(self.run(&COMPLETE, &args).await?, Value::Int(1)))
    }

    async fn fail_queued(&self, name: &str, response: Bytes) -> Result<bool> {
        Ok(matches!(self.run(&FAIL_QUEUED, &[name.as_bytes(), &response]).await?, Value::Int(1)))
    }

    async fn cancel(&self, name: &str, by: Option<&str>, response: Bytes) -> Result<Cancelled> {
        let (owner, admin) = who(by);
        let answer = self.run(&CANCEL, &[name.as_bytes(), owner, admin, &response]).await?;
        let parts = items(&answer);
        Ok(match parts.first().map(text).as_deref() {
            Some("detached") => Cancelled::Detached,
            Some("done") => Cancelled::AlreadyDone,
            Some("cancelled") => {
                let running = match (parts.get(1).map(text), parts.get(2).map(text)) {
                    (Some(w), Some(t)) => w.parse().ok().map(|w| (w, t)),
                    _ => None,
                };
                Cancelled::Cancelled { running }
            }
            _ => Cancelled::Unknown,
        })
    }

    async fn delete(&self, name: &str, by: Option<&str>) -> Result<Deleted> {
        let (owner, admin) = who(by);
        let answer = self.run(&DELETE, &[name.as_bytes(), owner, admin]).await?;
        Ok(match text(&answer).as_str() {
            "detached" => Deleted::Detached,
            "running" => Deleted::StillRunning,
            "deleted" => Deleted::Deleted,
            _ => Deleted::Unknown,
        })
    }

    async fn expire(&self, _now: Millis) -> Result<usize> {
        // The script reads "now" from the common arguments.
        match self.run(&EXPIRE, &[]).await? {
            Value::Int(n) => Ok(n as usize),
            _ => Ok(0),
        }
    }

    async fn register_worker(&self, worker: NewWorker) -> Result<Registered> {
        let properties = serde_json::to_string(&worker.properties).expect("strings serialize");
        let slots = worker.slots.to_string();
        let args: [&[u8]; 7] = [
            worker.name.as_bytes(),
            worker.replica.as_bytes(),
            properties.as_bytes(),
            slots.as_bytes(),
            flag(worker.builtin),
            worker.sandbox.as_bytes(),
            worker.incarnation.as_bytes(),
        ];
        let answer = self.run(&REGISTER, &args).await?;
        let parts = items(&answer);
        let id = parts.get(1).map(text).and_then(|t| t.parse().ok()).unwrap_or(0);
        Ok(match parts.first().map(text).as_deref() {
            Some("added") => Registered::Added(id),
            Some("reconnected") => Registered::Reconnected { old: id },
            _ => Registered::NameTaken,
        })
    }

    async fn touch_worker(&self, id: u64, _now: Millis) -> Result<()> {
        self.run(&TOUCH, &[id.to_string().as_bytes()]).await?;
        Ok(())
    }

    async fn set_draining(&self, name: &str, draining: bool) -> Result<Option<u64>> {
        match self.run(&SET_DRAINING, &[name.as_bytes(), flag(draining)]).await? {
            Value::Int(id) => Ok(Some(id as u64)),
            _ => Ok(None),
        }
    }

    async fn remove_worker(&self, id: u64, max_attempts: u32, _now: Millis) -> Result<Option<Removed>> {
        let answer =
            self.run(&REMOVE_WORKER, &[id.to_string().as_bytes(), max_attempts.to_string().as_bytes()]).await?;
        let parts = items(&answer);
        let (Some(hash), Some(tasks)) = (parts.first(), parts.get(1)) else { return Ok(None) };
        let names =
            |i: usize| -> Vec<String> { parts.get(i).map(|v| items(v).iter().map(text).collect()).unwrap_or_default() };
        let requeued = names(2);
        let mut exhausted = Vec::new();
        for name in names(3) {
            exhausted.extend(self.get(&name).await?);
        }
        Ok(Some(Removed { worker: worker_record(id, hash, tasks), requeued, exhausted }))
    }

    async fn workers(&self) -> Result<Vec<WorkerRecord>> {
        let answer = self.run(&WORKERS, &[]).await?;
        Ok(items(&answer)
            .iter()
            .filter_map(|w| {
                let parts = items(w);
                let id = text(parts.first()?).parse().ok()?;
                Some(worker_record(id, parts.get(1)?, parts.get(2)?))
            })
            .collect())
    }

    async fn queues(&self) -> Result<Vec<QueueRecord>> {
        let answer = self.run(&QUEUES, &[]).await?;
        Ok(items(&answer)
            .iter()
            .filter_map(|q| {
                let parts = items(q);
                let entries = items(parts.get(1)?)
                    .iter()
                    .filter_map(|e| {
                        let e = items(e);
                        Some((text(e.get(1)?).parse().ok()?, text(e.first()?), text(e.get(2)?).parse().ok()?))
                    })
                    .collect();
                Some(QueueRecord { queue: text(parts.first()?), entries })
            })
            .collect())
    }

    async fn fronts(&self) -> Result<Vec<(String, u64)>> {
        let answer = self.run(&FRONTS, &[]).await?;
        Ok(items(&answer)
            .iter()
            .filter_map(|f| {
                let f = items(f);
                Some((text(f.first()?), text(f.get(1)?).parse().ok()?))
            })
            .collect())
    }

    async fn counters(&self) -> Result<Counters> {
        let f = fields(&self.run(&COUNTERS, &[]).await?);
        Ok(Counters {
            cache_hits: num(&f, "cache_hits"),
            cache_misses: num(&f, "cache_misses"),
            merged: num(&f, "merged"),
            executed: num(&f, "executed"),
            failed: num(&f, "failed"),
            requeued: num(&f, "requeued"),
            cancelled: num(&f, "cancelled"),
        })
    }

    async fn refresh_lease(&self, replica: &str, ttl: Duration) -> Result<()> {
        let ttl = (ttl.as_millis() as u64).max(1).to_string();
        self.run(&LEASE, &[replica.as_bytes(), ttl.as_bytes()]).await?;
        Ok(())
    }

    async fn drop_lease(&self, replica: &str) -> Result<()> {
        self.run(&LEASE, &[replica.as_bytes(), b"0"]).await?;
        Ok(())
    }

    async fn live_replicas(&self) -> Result<HashSet<String>> {
        Ok(items(&self.run(&LIVE, &[]).await?).iter().map(text).collect())
    }

    fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }
}
