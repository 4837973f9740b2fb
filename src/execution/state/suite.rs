//! The state suite: every [`SchedulerState`] implementation passes these
//! (memory always; Redis when `redis-server` is installed).

use std::sync::Arc;
use std::time::Duration;

use remote_apis::reapi::execution_stage::Value as Stage;
use tokio::sync::broadcast::Receiver;

use super::*;
use crate::testing::redis::RedisServer;

const RETENTION: Retention = Retention { retention: Duration::from_secs(60), max_finished: 2 };

/// The implementations under test; the Redis server lives as long as the
/// returned guard.
async fn states() -> Vec<(&'static str, Arc<dyn SchedulerState>, Option<RedisServer>)> {
    let mut out: Vec<(&'static str, Arc<dyn SchedulerState>, Option<RedisServer>)> =
        vec![("memory", Arc::new(MemoryState::new(RETENTION)), None)];
    if let Some(server) = RedisServer::start() {
        let config = RedisStateConfig { redis: server.url(), prefix: None };
        let state = RedisState::open(&config, RETENTION).await.expect("redis state opens");
        out.push(("redis", Arc::new(state), Some(server)));
    }
    out
}

fn op(queue: &str, merge: Option<&str>, owner: &str) -> NewOp {
    NewOp {
        instance: "main".into(),
        action_digest: "ab/1".into(),
        queue: queue.into(),
        spec: Bytes::from_static(b"spec \x00\xff bytes"),
        merge_key: merge.map(str::to_string),
        owner: owner.into(),
        now: now_millis(),
    }
}

fn worker(name: &str, slots: usize) -> NewWorker {
    NewWorker {
        name: name.into(),
        replica: "r1".into(),
        properties: vec![("os".into(), "linux".into())],
        slots,
        builtin: false,
        sandbox: "none".into(),
        incarnation: format!("inc-{name}"),
        now: now_millis(),
    }
}

async fn add(s: &dyn SchedulerState, name: &str, slots: usize) -> u64 {
    match s.register_worker(worker(name, slots)).await.unwrap() {
        Registered::Added(id) => id,
        other => panic!("registering {name}: {other:?}"),
    }
}

fn q(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// The next change matching `want`, within a few seconds.
async fn heard(rx: &mut Receiver<Change>, want: impl Fn(&Change) -> bool) -> Change {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(c) if want(&c) => return c,
                Ok(_) => {}
                Err(e) => panic!("feed: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait).await.expect("the change arrives")
}

#[tokio::test]
async fn stage_values_match_the_lua_constants() {
    assert_eq!((Stage::Queued as i32, Stage::Executing as i32, Stage::Completed as i32), (2, 3, 4));
}

#[tokio::test]
async fn identical_in_flight_actions_merge_and_a_finished_one_does_not() {
    for (name, s, _guard) in states().await {
        let a = s.submit(op("q", Some("key"), "alice")).await.unwrap();
        assert!(matches!(a, Submitted::Created(_)), "{name}");
        let b = s.submit(op("q", Some("key"), "bob")).await.unwrap();
        assert_eq!(b, Submitted::Joined(a.name().to_string()), "{name}");
        let again = s.submit(op("q", Some("key"), "bob")).await.unwrap();
        assert_eq!(again.name(), a.name(), "{name}");
        let record = s.get(a.name()).await.unwrap().unwrap();
        assert_eq!(record.owners, vec!["alice".to_string(), "bob".to_string()], "{name}");
        assert_eq!(record.spec, Bytes::from_static(b"spec \x00\xff bytes"), "{name}: binary-safe");
        assert_eq!(record.stages, vec![Stage::Queued as i32], "{name}");
        let never = s.submit(op("q", None, "alice")).await.unwrap();
        assert_ne!(never.name(), a.name(), "{name}: no merge key, no merge");

        assert!(s.complete(a.name(), Bytes::from_static(b"r"), Outcome::default()).await.unwrap());
        let fresh = s.submit(op("q", Some("key"), "alice")).await.unwrap();
        assert!(matches!(fresh, Submitted::Created(n) if n != a.name()), "{name}: done ops don't merge");
        let c = s.counters().await.unwrap();
        assert_eq!((c.cache_misses, c.merged), (3, 2), "{name}");
    }
}

#[tokio::test]
async fn claim_takes_the_oldest_of_the_given_queues_within_the_slots() {
    for (name, s, _guard) in states().await {
        let w = add(&*s, "w", 2).await;
        let first = s.submit(op("linux", None, "o")).await.unwrap();
        let second = s.submit(op("mac", None, "o")).await.unwrap();
        let third = s.submit(op("linux", None, "o")).await.unwrap();
        let mut fronts = s.fronts().await.unwrap();
        fronts.sort();
        let first_seq = s.get(first.name()).await.unwrap().unwrap().seq;
        let second_seq = s.get(second.name()).await.unwrap().unwrap().seq;
        assert_eq!(fronts, vec![("linux".to_string(), first_seq), ("mac".to_string(), second_seq)], "{name}");
        assert!(s.claim(w, "t0", &q(&["windows"])).await.unwrap().is_none(), "{name}");
        let got = s.claim(w, "t1", &q(&["mac", "linux"])).await.unwrap().unwrap();
        assert_eq!(got.name, first.name(), "{name}: oldest across queues");
        assert_eq!((got.attempts, got.running.clone()), (1, Some((w, "t1".to_string()))), "{name}");
        assert_eq!(got.worker.as_deref(), Some("w"), "{name}");
        let got = s.claim(w, "t2", &q(&["linux", "mac"])).await.unwrap().unwrap();
        assert_eq!(got.name, second.name(), "{name}");
        assert!(s.claim(w, "t3", &q(&["linux"])).await.unwrap().is_none(), "{name}: slots full");
        let queues = s.queues().await.unwrap();
        assert_eq!(queues.len(), 1, "{name}: empty queues are not listed");
        assert_eq!(queues[0].queue, "linux", "{name}");
        assert_eq!(queues[0].entries[0].1, third.name(), "{name}");
        let workers = s.workers().await.unwrap();
        assert_eq!(workers.len(), 1, "{name}");
        assert_eq!(workers[0].tasks.len(), 2, "{name}");
        assert_eq!(workers[0].properties, vec![("os".to_string(), "linux".to_string())], "{name}");
    }
}

#[tokio::test]
async fn only_the_current_task_finishes_an_operation() {
    for (name, s, _guard) in states().await {
        let w = add(&*s, "w", 1).await;
        let a = s.submit(op("q", Some("k"), "o")).await.unwrap();
        s.claim(w, "t1", &q(&["q"])).await.unwrap().unwrap();
        s.started(w, "t1").await.unwrap();
        s.started(w, "nope").await.unwrap();
        let stages = s.get(a.name()).await.unwrap().unwrap().stages;
        assert_eq!(stages, vec![Stage::Queued as i32, Stage::Executing as i32], "{name}");
        assert!(s.take_task(w, "nope", true).await.unwrap().is_none(), "{name}");
        let taken = s.take_task(w, "t1", false).await.unwrap().expect("current");
        assert_eq!(taken.running, None, "{name}");
        assert!(s.take_task(w, "t1", true).await.unwrap().is_none(), "{name}: only once");
        let outcome = Outcome { executed: true, failed: true };
        assert!(s.complete(a.name(), Bytes::from_static(b"resp"), outcome).await.unwrap(), "{name}");
        assert!(!s.complete(a.name(), Bytes::from_static(b"again"), outcome).await.unwrap(), "{name}");
        let done = s.get(a.name()).await.unwrap().unwrap();
        assert_eq!(done.response, Some(Bytes::from_static(b"resp")), "{name}");
        assert!(done.done() && done.spec.is_empty(), "{name}: a finished op drops its spec");
        let w = &s.workers().await.unwrap()[0];
        assert_eq!((w.done, w.failed, w.tasks.len()), (1, 1, 0), "{name}");
        let c = s.counters().await.unwrap();
        assert_eq!((c.executed, c.failed), (1, 1), "{name}");
    }
}

#[tokio::test]
async fn a_removed_workers_actions_are_requeued_until_attempts_run_out() {
    for (name, s, _guard) in states().await {
        let w1 = add(&*s, "w1", 2).await;
        let a = s.submit(op("q", None, "o")).await.unwrap();
        let b = s.submit(op("q", None, "o")).await.unwrap();
        s.claim(w1, "t1", &q(&["q"])).await.unwrap().unwrap();
        s.claim(w1, "t2", &q(&["q"])).await.unwrap().unwrap();
        let removed = s.remove_worker(w1, 1, now_millis()).await.unwrap().unwrap();
        assert_eq!(removed.worker.name, "w1", "{name}");
        assert!(removed.requeued.is_empty(), "{name}: one attempt allowed");
        let mut exhausted: Vec<_> = removed.exhausted.iter().map(|o| o.name.clone()).collect();
        exhausted.sort();
        let mut want = vec![a.name().to_string(), b.name().to_string()];
        want.sort();
        assert_eq!(exhausted, want, "{name}");
        assert!(s.remove_worker(w1, 1, now_millis()).await.unwrap().is_none(), "{name}");

        let c = s.submit(op("q", None, "o")).await.unwrap();
        let d = s.submit(op("q", None, "o")).await.unwrap();
        let w2 = add(&*s, "w2", 1).await;
        s.claim(w2, "t3", &q(&["q"])).await.unwrap().unwrap();
        let removed = s.remove_worker(w2, 3, now_millis()).await.unwrap().unwrap();
        assert_eq!(removed.requeued, vec![c.name().to_string()], "{name}");
        let record = s.get(c.name()).await.unwrap().unwrap();
        assert_eq!(record.stages, vec![Stage::Queued as i32, Stage::Queued as i32], "{name}");
        assert_eq!((record.running, record.worker), (None, None), "{name}");
        let queue = &s.queues().await.unwrap()[0];
        let order: Vec<&str> = queue.entries.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(order, vec![c.name(), d.name()], "{name}: a re-queued action keeps its place");
        assert!(s.take_task(w2, "t3", true).await.unwrap().is_none(), "{name}: the old task is void");
        assert_eq!(s.counters().await.unwrap().requeued, 1, "{name}");
    }
}

#[tokio::test]
async fn cancel_and_delete_respect_owners() {
    for (name, s, _guard) in states().await {
        let cancelled = Bytes::from_static(b"cancelled");
        let queued = s.submit(op("q", Some("k"), "alice")).await.unwrap();
        s.submit(op("q", Some("k"), "bob")).await.unwrap();
        let n = queued.name();
        assert_eq!(s.cancel(n, Some("eve"), cancelled.clone()).await.unwrap(), Cancelled::Unknown, "{name}");
        assert_eq!(s.cancel(n, Some("bob"), cancelled.clone()).await.unwrap(), Cancelled::Detached, "{name}");
        assert_eq!(s.get(n).await.unwrap().unwrap().owners, vec!["alice".to_string()], "{name}");
        assert_eq!(s.delete(n, Some("alice")).await.unwrap(), Deleted::StillRunning, "{name}");
        let out = s.cancel(n, Some("alice"), cancelled.clone()).await.unwrap();
        assert_eq!(out, Cancelled::Cancelled { running: None }, "{name}");
        assert!(s.queues().await.unwrap().is_empty(), "{name}: no longer queued");
        assert_eq!(s.cancel(n, None, cancelled.clone()).await.unwrap(), Cancelled::AlreadyDone, "{name}");
        assert_eq!(s.delete(n, Some("eve")).await.unwrap(), Deleted::Unknown, "{name}");
        assert_eq!(s.delete(n, None).await.unwrap(), Deleted::Deleted, "{name}");
        assert!(s.get(n).await.unwrap().is_none(), "{name}");

        let mut feed = s.subscribe_changes();
        let w = add(&*s, "w", 1).await;
        let running = s.submit(op("q", None, "alice")).await.unwrap();
        s.claim(w, "t", &q(&["q"])).await.unwrap().unwrap();
        let out = s.cancel(running.name(), None, cancelled.clone()).await.unwrap();
        assert_eq!(out, Cancelled::Cancelled { running: Some((w, "t".into())) }, "{name}");
        let heard = heard(&mut feed, |c| matches!(c, Change::Cancel { .. })).await;
        assert_eq!(heard, Change::Cancel { worker: w, task: "t".into() }, "{name}");
        assert_eq!(s.workers().await.unwrap()[0].tasks.len(), 1, "{name}: the slot stays taken until it ends");
        assert_eq!(s.counters().await.unwrap().cancelled, 2, "{name}");
    }
}

#[tokio::test]
async fn finished_operations_expire_by_the_cap_and_queued_ones_can_be_failed() {
    for (name, s, _guard) in states().await {
        let hit = |i: u8| {
            let s = s.clone();
            async move {
                // Finished in the same millisecond is the same age.
                tokio::time::sleep(Duration::from_millis(3)).await;
                s.insert_finished(op("q", None, "o"), Bytes::from(vec![i])).await.unwrap()
            }
        };
        let first = hit(1).await;
        hit(2).await;
        hit(3).await;
        s.expire(now_millis()).await.unwrap();
        let left: Vec<String> = s.list().await.unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(left.len(), 2, "{name}: at most max_finished");
        assert!(!left.contains(&first), "{name}: the oldest went first");
        assert_eq!(s.counters().await.unwrap().cache_hits, 3, "{name}");
        let far = now_millis() + 3_600_000;
        s.expire(far).await.ok();
        if name == "memory" {
            assert!(s.list().await.unwrap().is_empty(), "{name}: past retention");
        }

        let stranded = s.submit(op("gpu", None, "o")).await.unwrap();
        assert!(s.fail_queued(stranded.name(), Bytes::from_static(b"no")).await.unwrap(), "{name}");
        assert!(!s.fail_queued(stranded.name(), Bytes::from_static(b"no")).await.unwrap(), "{name}");
        assert!(s.get(stranded.name()).await.unwrap().unwrap().done(), "{name}");
    }
}

#[tokio::test]
async fn worker_names_are_unique_except_for_the_same_process_reconnecting() {
    for (name, s, _guard) in states().await {
        let id = add(&*s, "w", 1).await;
        let mut other = worker("w", 1);
        other.incarnation = "someone else".into();
        assert_eq!(s.register_worker(other).await.unwrap(), Registered::NameTaken, "{name}");
        assert_eq!(s.register_worker(worker("w", 1)).await.unwrap(), Registered::Reconnected { old: id }, "{name}");
        s.remove_worker(id, 3, now_millis()).await.unwrap();
        assert!(matches!(s.register_worker(worker("w", 1)).await.unwrap(), Registered::Added(n) if n != id));

        let mut feed = s.subscribe_changes();
        let drained = s.set_draining("w", true).await.unwrap().expect("connected");
        assert_eq!(
            heard(&mut feed, |c| matches!(c, Change::Drain { .. })).await,
            Change::Drain { worker: drained, draining: true }
        );
        s.submit(op("q", None, "o")).await.unwrap();
        assert!(s.claim(drained, "t", &q(&["q"])).await.unwrap().is_none(), "{name}: draining takes nothing");
        assert_eq!(s.set_draining("nobody", true).await.unwrap(), None, "{name}");
    }
}

#[tokio::test]
async fn leases_say_which_replicas_are_alive() {
    let Some(server) = RedisServer::start() else { return };
    let config = RedisStateConfig { redis: server.url(), prefix: Some("lease-test".into()) };
    let s = RedisState::open(&config, RETENTION).await.unwrap();
    s.refresh_lease("a", Duration::from_secs(30)).await.unwrap();
    s.refresh_lease("b", Duration::from_millis(50)).await.unwrap();
    s.refresh_lease("c", Duration::from_secs(30)).await.unwrap();
    s.drop_lease("c").await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(s.live_replicas().await.unwrap(), HashSet::from(["a".to_string()]));
}

#[tokio::test]
async fn two_redis_states_share_operations_and_hear_each_others_changes() {
    let Some(server) = RedisServer::start() else { return };
    let config = RedisStateConfig { redis: server.url(), prefix: None };
    let a = RedisState::open(&config, RETENTION).await.unwrap();
    let b = RedisState::open(&config, RETENTION).await.unwrap();
    let mut feed_b = b.subscribe_changes();
    let submitted = a.submit(op("q", Some("k"), "alice")).await.unwrap();
    assert_eq!(heard(&mut feed_b, |c| *c == Change::Queue).await, Change::Queue);
    assert_eq!(b.submit(op("q", Some("k"), "bob")).await.unwrap(), Submitted::Joined(submitted.name().into()));
    let w = add(&b, "on-b", 1).await;
    let claimed = b.claim(w, "t", &q(&["q"])).await.unwrap().unwrap();
    assert_eq!(claimed.name, submitted.name());
    let mut feed_a = a.subscribe_changes();
    b.started(w, "t").await.unwrap();
    let want = Change::Op(submitted.name().to_string());
    assert_eq!(heard(&mut feed_a, |c| *c == want).await, want);
    assert_eq!(a.get(submitted.name()).await.unwrap().unwrap().stages.last(), Some(&(Stage::Executing as i32)));
}

#[tokio::test]
async fn redis_down_is_unavailable_naming_the_engine() {
    let Some(mut server) = RedisServer::start() else { return };
    let config = RedisStateConfig { redis: server.url(), prefix: None };
    let s = RedisState::open(&config, RETENTION).await.unwrap();
    server.kill();
    let e = s.get("operations/x").await.unwrap_err();
    assert_eq!(e.code, tonic::Code::Unavailable);
    assert!(e.message.contains("scheduler state (redis at"), "{}", e.message);
    server.restart();
    let mut ok = false;
    for _ in 0..50 {
        if s.get("operations/x").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the state recovers when Redis is back");
}
