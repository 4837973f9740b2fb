//! The scheduler's logic across replicas: two schedulers on one Redis
//! state, each with its own workers, as two server replicas would be.
//! Skipped without `redis-server`.

use super::*;
use crate::ac::MemoryAcStore;
use crate::execution::state::{RedisState, RedisStateConfig, Retention};
use crate::store::memory::MemoryStore;
use crate::testing::redis::RedisServer;
use remote_apis::DigestFunction;

const KEEPALIVE: Duration = Duration::from_secs(30);

fn config() -> SchedulerConfig {
    SchedulerConfig {
        max_attempts: 3,
        keepalive_timeout: KEEPALIVE,
        numeric_properties: Vec::new(),
        retention: Duration::from_secs(60),
        max_finished: 100,
        unmatched_timeout: Duration::from_secs(60),
        status_url: None,
        failed_retention: Duration::from_secs(60),
        log_window: 1 << 20,
        log_grace: Duration::from_secs(60),
    }
}

/// Two replicas, "a" and "b", following the shared change feed.
async fn replicas(redis: &RedisServer) -> (Arc<Scheduler>, Arc<Scheduler>) {
    let cas = crate::store::cas(Arc::new(MemoryStore::new(1 << 20)));
    let results: Arc<dyn ActionResults> =
        Arc::new(crate::ac::CompleteResults::new(Arc::new(MemoryAcStore::new(100)), cas.clone()));
    let retention = Retention { retention: Duration::from_secs(60), max_finished: 100 };
    let redis = RedisStateConfig { redis: redis.url(), prefix: None };
    let mut out = Vec::new();
    for name in ["a", "b"] {
        let state = Arc::new(RedisState::open(&redis, retention).await.unwrap());
        let s = Arc::new(Scheduler::with_state(state, name.into(), results.clone(), cas.clone(), config()));
        s.follow(tokio_util::sync::CancellationToken::new());
        out.push(s);
    }
    let b = out.pop().unwrap();
    (out.pop().unwrap(), b)
}

async fn worker(s: &Scheduler, name: &str) -> (u64, mpsc::UnboundedReceiver<WorkerCommand>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let info = WorkerInfo {
        name: name.into(),
        properties: Platform::default(),
        slots: 1,
        builtin: false,
        sandbox: "none".into(),
    };
    (s.register_worker(info, name, tx).await.unwrap(), rx)
}

fn submission(seed: &[u8]) -> Submission {
    let digest = DigestFunction::Sha256.digest_of(seed);
    let checked = Checked {
        action: Default::default(),
        command: remote_apis::reapi::Command { arguments: vec!["true".into()], ..Default::default() },
        platform: Platform::default(),
        timeout: Duration::from_secs(10),
    };
    Submission {
        instance: InstanceName::default(),
        action_digest: digest,
        checked,
        cache_key: Some(AcKey::new(&InstanceName::default(), &digest)),
        owner: Principal::Anonymous,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<WorkerCommand>) -> WorkerCommand {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a command in time").expect("open")
}

async fn done(watch: &mut OpWatch) -> Arc<OpView> {
    tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|v| v.done())).await.expect("in time").unwrap().clone()
}

#[tokio::test]
async fn a_worker_on_b_runs_what_a_queued_and_a_hears_every_stage() {
    let Some(redis) = RedisServer::start() else { return };
    let (a, b) = replicas(&redis).await;
    let mut watch = a.submit(submission(b"x")).await.unwrap();
    let (w, mut rx) = worker(&b, "on-b").await;
    let WorkerCommand::Assign(task) = next(&mut rx).await else { panic!("an assignment") };
    assert_eq!(task.command.arguments, vec!["true".to_string()], "the action travels through the state");
    b.started(w, &task.id);
    b.finished(w, &task.id, ExecuteResponse { result: Some(ActionResult::default()), ..Default::default() }).await;
    let view = done(&mut watch).await;
    assert_eq!(view.stages, [Stage::Queued, Stage::Executing, Stage::Completed]);
    assert_eq!(view.worker.as_deref(), Some("on-b"));
    let status = a.status().await.unwrap();
    assert_eq!(status.workers[0].replica, "b", "A lists B's worker, naming its replica");
    assert_eq!(status.counters.executed, 1);
}

#[tokio::test]
async fn cancelling_on_a_reaches_the_worker_on_b_and_draining_on_a_too() {
    let Some(redis) = RedisServer::start() else { return };
    let (a, b) = replicas(&redis).await;
    let (_w, mut rx) = worker(&b, "on-b").await;
    let watch = a.submit(submission(b"long")).await.unwrap();
    let WorkerCommand::Assign(task) = next(&mut rx).await else { panic!("an assignment") };
    let name = watch.borrow().name.clone();
    a.cancel(&name, None).await.unwrap();
    assert!(matches!(next(&mut rx).await, WorkerCommand::Cancel(id) if id == task.id), "B's worker is told");
    a.set_draining("on-b", true).await.unwrap();
    assert!(b.status().await.unwrap().workers[0].draining);
}

#[tokio::test]
async fn a_worker_lost_on_b_has_its_action_run_by_a_worker_on_a() {
    let Some(redis) = RedisServer::start() else { return };
    let (a, b) = replicas(&redis).await;
    let (lost, mut rx_b) = worker(&b, "on-b").await;
    let mut watch = a.submit(submission(b"retried")).await.unwrap();
    assert!(matches!(next(&mut rx_b).await, WorkerCommand::Assign(_)));
    let (w, mut rx_a) = worker(&a, "on-a").await;
    b.worker_lost(lost, "its stream ended").await;
    let WorkerCommand::Assign(task) = next(&mut rx_a).await else { panic!("re-queued to A's worker") };
    a.finished(w, &task.id, ExecuteResponse { result: Some(ActionResult::default()), ..Default::default() }).await;
    let view = done(&mut watch).await;
    assert_eq!(view.stages, [Stage::Queued, Stage::Queued, Stage::Completed]);
    assert_eq!(a.status().await.unwrap().counters.requeued, 1);
}

#[tokio::test]
async fn a_replica_whose_lease_ends_has_its_workers_actions_requeued_by_another() {
    let Some(redis) = RedisServer::start() else { return };
    let (a, b) = replicas(&redis).await;
    // A never sweeps (as if it died): its lease is never renewed.
    let (_w, mut rx_a) = worker(&a, "on-a").await;
    let watch = b.submit(submission(b"orphaned")).await.unwrap();
    assert!(matches!(next(&mut rx_a).await, WorkerCommand::Assign(_)));
    let (_wb, mut rx_b) = worker(&b, "on-b").await;
    b.sweep().await;
    assert!(matches!(next(&mut rx_b).await, WorkerCommand::Assign(_)), "B re-queued and ran it");
    assert_eq!(watch.borrow().stages, [Stage::Queued, Stage::Queued]);
    let names: Vec<String> = b.status().await.unwrap().workers.into_iter().map(|w| w.info.name).collect();
    assert_eq!(names, vec!["on-b".to_string()], "A's worker is gone");
}

/// Scheduling overhead per action (submit, claim, started, finished), one
/// replica on each state. A measurement, not a check: run with
/// `cargo test --release --lib scheduling_overhead -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn scheduling_overhead() {
    let Some(redis) = RedisServer::start() else { return };
    let (on_redis, _) = replicas(&redis).await;
    let cas = crate::store::cas(Arc::new(MemoryStore::new(1 << 20)));
    let results = Arc::new(crate::ac::CompleteResults::new(Arc::new(MemoryAcStore::new(100)), cas.clone()));
    let in_memory = Arc::new(Scheduler::new(results, cas, config()));
    for (name, s) in [("memory", in_memory), ("redis", on_redis)] {
        let (w, mut rx) = worker(&s, "w").await;
        let n = 500;
        let start = Instant::now();
        for i in 0..n {
            let mut watch = s.submit(submission(format!("{name}{i}").as_bytes())).await.unwrap();
            let WorkerCommand::Assign(task) = next(&mut rx).await else { panic!("an assignment") };
            s.started(w, &task.id);
            s.finished(w, &task.id, ExecuteResponse { result: Some(ActionResult::default()), ..Default::default() })
                .await;
            done(&mut watch).await;
        }
        let per = start.elapsed() / n;
        println!("{name}: {per:?} per action (submit, dispatch, started, finished), sequential");
    }
}
