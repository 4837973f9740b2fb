//! Scheduler tables: lost workers, FIFO order, matching, merging, names.
use super::*;
use crate::ac::MemoryAcStore;
use crate::store::memory::MemoryStore;
use remote_apis::DigestFunction;

fn scheduler(max_attempts: u32) -> Scheduler {
    scheduler_with(max_attempts, Duration::from_secs(60))
}

fn scheduler_with(max_attempts: u32, unmatched_timeout: Duration) -> Scheduler {
    let cas = crate::store::cas(Arc::new(MemoryStore::new(1 << 20)));
    let results = Arc::new(crate::ac::CompleteResults::new(Arc::new(MemoryAcStore::new(100)), cas.clone()));
    Scheduler::new(
        results,
        cas,
        SchedulerConfig {
            max_attempts,
            keepalive_timeout: Duration::from_secs(30),
            numeric_properties: vec!["cpu-count".into()],
            retention: Duration::from_secs(60),
            max_finished: 2,
            unmatched_timeout,
            status_url: None,
            failed_retention: Duration::from_secs(60),
            log_window: 1 << 20,
            log_grace: Duration::from_secs(60),
        },
    )
}

async fn worker(
    s: &Scheduler,
    name: &str,
    slots: usize,
    props: &[(&str, &str)],
) -> (u64, mpsc::UnboundedReceiver<WorkerCommand>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let properties = Platform::new(props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    let info = WorkerInfo { name: name.into(), properties, slots, builtin: false, sandbox: "none".into() };
    let id = s.register_worker(info, name, tx).await.unwrap();
    (id, rx)
}

fn submission(seed: &[u8], platform: &[(&str, &str)]) -> Submission {
    let digest = DigestFunction::Sha256.digest_of(seed);
    Submission {
        instance: InstanceName::default(),
        action_digest: digest,
        checked: Checked {
            action: Default::default(),
            command: Default::default(),
            platform: Platform::new(platform.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            timeout: Duration::from_secs(10),
        },
        cache_key: Some(AcKey::new(&InstanceName::default(), &digest)),
        owner: Principal::Anonymous,
    }
}

fn owned(seed: &[u8], owner: &str) -> Submission {
    Submission { owner: Principal::Token(owner.into()), ..submission(seed, &[]) }
}

fn assigned(rx: &mut mpsc::UnboundedReceiver<WorkerCommand>) -> Option<Arc<Task>> {
    match rx.try_recv() {
        Ok(WorkerCommand::Assign(t)) => Some(t),
        _ => None,
    }
}

#[tokio::test]
async fn finished_operations_are_capped_oldest_first() {
    let s = scheduler(3);
    let mut names = Vec::new();
    for i in 0..4u8 {
        // Finished in the same millisecond is the same age.
        tokio::time::sleep(Duration::from_millis(3)).await;
        let d = DigestFunction::Sha256.digest_of(&[i]);
        let hit = s.record_hit(InstanceName::default(), d, ActionResult::default(), Principal::Anonymous).await;
        names.push(hit.unwrap().borrow().name.clone());
    }
    assert_eq!(s.list().await.unwrap().len(), 4);
    s.sweep().await;
    let kept: Vec<String> = s.list().await.unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(kept, names[2..], "the two newest stay");
    assert!(s.get(&names[0]).await.unwrap().is_none());
}

#[tokio::test]
async fn a_lost_worker_requeues_until_the_attempts_run_out() {
    let s = scheduler(2);
    let (w1, mut rx1) = worker(&s, "w1", 1, &[]).await;
    let watch = s.submit(submission(b"a", &[])).await.unwrap();
    assert!(assigned(&mut rx1).is_some());
    let (w2, mut rx2) = worker(&s, "w2", 1, &[]).await;
    s.worker_lost(w1, "test").await;
    assert!(assigned(&mut rx2).is_some(), "re-queued to the other worker");
    assert_eq!(watch.borrow().stages, [Stage::Queued, Stage::Queued]);
    s.worker_lost(w2, "test").await;
    let view = watch.borrow().clone();
    let status = view.response.as_ref().unwrap().status.clone().unwrap();
    assert_eq!(status.code, tonic::Code::Unavailable as i32);
    assert!(status.message.contains("2 attempts"), "{}", status.message);
    assert_eq!(s.status().await.unwrap().counters.requeued, 1);
}

#[tokio::test]
async fn a_live_name_is_refused_unless_the_same_worker_reconnects() {
    let s = scheduler(3);
    let info = |name: &str| WorkerInfo {
        name: name.into(),
        properties: Platform::default(),
        slots: 1,
        builtin: false,
        sandbox: "none".into(),
    };
    let (tx, mut first) = mpsc::unbounded_channel();
    let id = s.register_worker(info("w"), "secret", tx).await.unwrap();
    let watch = s.submit(submission(b"a", &[])).await.unwrap();
    assert!(assigned(&mut first).is_some());
    for impostor in ["", "guess"] {
        let (tx, _rx) = mpsc::unbounded_channel();
        let err = s.register_worker(info("w"), impostor, tx).await.unwrap_err();
        assert_eq!(err.code, tonic::Code::AlreadyExists, "{err}");
    }
    assert_eq!(s.status().await.unwrap().workers.len(), 1);
    assert!(watch.borrow().response.is_none(), "the first worker keeps its action");
    // The same process reconnecting replaces its dead entry; its action
    // is handed out again.
    let (tx, mut again) = mpsc::unbounded_channel();
    let new = s.register_worker(info("w"), "secret", tx).await.unwrap();
    assert_ne!(new, id);
    assert!(assigned(&mut again).is_some());
    assert_eq!(s.status().await.unwrap().workers.len(), 1);
}

#[tokio::test]
async fn oldest_first_least_loaded_worker_and_platform_routing() {
    let s = scheduler(3);
    let (_big, mut big) = worker(&s, "big", 2, &[("cpu-count", "8")]).await;
    let (_small, mut small) = worker(&s, "small", 2, &[("cpu-count", "2")]).await;
    // Needs 4 CPUs: only "big" qualifies.
    s.submit(submission(b"heavy", &[("cpu-count", "4")])).await.unwrap();
    assert!(assigned(&mut big).is_some());
    assert!(assigned(&mut small).is_none());
    // The next one goes to the idle worker.
    s.submit(submission(b"light", &[])).await.unwrap();
    assert!(assigned(&mut small).is_some());
    // Fill everything, then check FIFO order of what waits.
    s.submit(submission(b"x1", &[])).await.unwrap();
    s.submit(submission(b"x2", &[])).await.unwrap();
    let _ = (assigned(&mut big), assigned(&mut small));
    s.submit(submission(b"q1", &[])).await.unwrap();
    s.submit(submission(b"q2", &[])).await.unwrap();
    assert_eq!(s.status().await.unwrap().queues.iter().map(|(_, n)| n).sum::<usize>(), 2);
    // A property nobody offers fails at once.
    let err = s.submit(submission(b"gpu", &[("gpu", "1")])).await.map(|_| ()).unwrap_err();
    assert_eq!(err.code, tonic::Code::FailedPrecondition);
    assert!(err.message.contains("gpu=1"), "{}", err.message);
}

#[tokio::test]
async fn duplicates_merge_and_late_answers_are_ignored() {
    let s = scheduler(3);
    let (w, mut rx) = worker(&s, "w", 1, &[]).await;
    let a = s.submit(submission(b"same", &[])).await.unwrap();
    let b = s.submit(submission(b"same", &[])).await.unwrap();
    assert_eq!(a.borrow().name, b.borrow().name);
    let task = assigned(&mut rx).unwrap();
    let name = a.borrow().name.clone(); // no watch guard held across the cancel
    s.cancel(&name, None).await.unwrap();
    assert!(b.borrow().done());
    assert!(matches!(rx.try_recv(), Ok(WorkerCommand::Cancel(id)) if id == task.id), "the worker is told");
    // The worker's answer for the cancelled task changes nothing.
    s.finished(w, &task.id, ExecuteResponse::default()).await;
    let status = b.borrow().response.as_ref().unwrap().status.clone().unwrap();
    assert_eq!(status.code, tonic::Code::Cancelled as i32);
    // The slot is free again.
    s.submit(submission(b"next", &[])).await.unwrap();
    assert!(assigned(&mut rx).is_some());
}

#[tokio::test]
async fn merged_principals_own_the_operation_and_cancel_only_detaches() {
    let s = scheduler(3);
    let (_w, mut rx) = worker(&s, "w", 1, &[]).await;
    let a = s.submit(owned(b"same", "alice")).await.unwrap();
    let b = s.submit(owned(b"same", "bob")).await.unwrap();
    let name = a.borrow().name.clone();
    assert_eq!(b.borrow().name, name, "identical actions still merge across principals");
    let (alice, bob, eve) =
        (Principal::Token("alice".into()), Principal::Token("bob".into()), Principal::Token("eve".into()));
    assert_eq!(s.get(&name).await.unwrap().unwrap().owners, vec![alice.clone(), bob.clone()]);
    let task = assigned(&mut rx).unwrap();
    // Someone else's cancel or delete: as if the operation did not exist.
    assert_eq!(s.cancel(&name, Some(&eve)).await.unwrap_err().code, tonic::Code::NotFound);
    assert_eq!(s.delete(&name, Some(&eve)).await.unwrap_err().code, tonic::Code::NotFound);
    // Bob cancels: he is detached, Alice's action keeps running.
    s.cancel(&name, Some(&bob)).await.unwrap();
    assert!(!a.borrow().done());
    assert_eq!(s.get(&name).await.unwrap().unwrap().owners, vec![alice.clone()]);
    assert!(rx.try_recv().is_err(), "the worker is not told to cancel");
    assert_eq!(s.cancel(&name, Some(&bob)).await.unwrap_err().code, tonic::Code::NotFound);
    // Alice, the last owner, really cancels.
    s.cancel(&name, Some(&alice)).await.unwrap();
    assert!(a.borrow().done());
    assert!(matches!(rx.try_recv(), Ok(WorkerCommand::Cancel(id)) if id == task.id));
}

#[tokio::test]
async fn a_draining_worker_finishes_its_action_and_takes_nothing_new() {
    let s = scheduler(3);
    let (a, mut rx_a) = worker(&s, "a", 2, &[]).await;
    let first = s.submit(submission(b"first", &[])).await.unwrap();
    let task = assigned(&mut rx_a).unwrap();
    s.set_draining("a", true).await.unwrap();
    assert!(s.status().await.unwrap().workers[0].draining);
    // Accepted (the worker offers the platform), but not given to it
    // although it has a free slot.
    let second = s.submit(submission(b"second", &[])).await.unwrap();
    assert!(assigned(&mut rx_a).is_none(), "a draining worker takes nothing new");
    let done = ExecuteResponse { result: Some(ActionResult::default()), ..Default::default() };
    s.finished(a, &task.id, done).await;
    assert!(first.borrow().done(), "what it ran finishes");
    assert!(assigned(&mut rx_a).is_none(), "idle, still draining");
    let (_b, mut rx_b) = worker(&s, "b", 1, &[]).await;
    assert!(assigned(&mut rx_b).is_some(), "the next action goes to another worker");
    assert_eq!(second.borrow().worker.as_deref(), Some("b"));
    // Undrained, it takes work again (b is busy).
    s.set_draining("a", false).await.unwrap();
    assert!(!s.status().await.unwrap().workers[0].draining);
    s.submit(submission(b"third", &[])).await.unwrap();
    assert!(assigned(&mut rx_a).is_some());
    let err = s.set_draining("nobody", true).await.unwrap_err();
    assert_eq!(err.code, tonic::Code::NotFound);
    assert!(err.message.contains("nobody"), "{}", err.message);
}

#[tokio::test]
async fn draining_the_last_worker_of_a_platform_gives_its_queue_the_unmatched_wait() {
    let timeout = Duration::from_millis(500);
    let s = scheduler_with(3, timeout);
    let (_gpu, mut rx) = worker(&s, "gpu", 1, &[("gpu", "1")]).await;
    let (_other, _rx_other) = worker(&s, "other", 1, &[]).await;
    s.submit(submission(b"running", &[("gpu", "1")])).await.unwrap();
    assert!(assigned(&mut rx).is_some());
    // Waits behind the busy worker for longer than unmatched_timeout:
    // matched all along, so it does not fail.
    let waiting = s.submit(submission(b"waiting", &[("gpu", "1")])).await.unwrap();
    std::thread::sleep(timeout + Duration::from_millis(100));
    s.sweep().await;
    assert!(!waiting.borrow().done());
    // Its only worker drains: new actions are still accepted, and the
    // queue gets a whole unmatched_timeout from now.
    s.set_draining("gpu", true).await.unwrap();
    let late = s.submit(submission(b"late", &[("gpu", "1")])).await.unwrap();
    s.sweep().await;
    assert!(!waiting.borrow().done(), "not failed at once");
    std::thread::sleep(timeout + Duration::from_millis(100));
    s.sweep().await;
    for op in [&waiting, &late] {
        let status = op.borrow().response.as_ref().expect("failed as unmatched").status.clone().unwrap();
        assert_eq!(status.code, tonic::Code::FailedPrecondition as i32, "{}", status.message);
    }
    // With no worker offering the platform at all, as before: refused.
    let err = s.submit(submission(b"tpu", &[("tpu", "1")])).await.map(|_| ()).unwrap_err();
    assert_eq!(err.code, tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_failed_run_is_kept_in_the_cas_and_its_message_links_the_action_page() {
    let mut s = scheduler(3);
    s.config.status_url = Some("http://status.test:8981".into());
    let (w, mut rx) = worker(&s, "a", 1, &[]).await;
    let failing = s.submit(submission(b"fails", &[])).await.unwrap();
    let task = assigned(&mut rx).unwrap();
    let result = ActionResult { exit_code: 3, stderr_raw: b"boom\n".to_vec(), ..Default::default() };
    let response =
        ExecuteResponse { result: Some(result.clone()), message: "from the worker".into(), ..Default::default() };
    s.finished(w, &task.id, response).await;
    let view = failing.borrow().clone();
    let action = view.action_digest;
    let url = format!("http://status.test:8981/action/sha256/{}/{}", action.hash_hex(), action.size);
    let message = &view.response.as_ref().unwrap().message;
    assert_eq!(message, &format!("from the worker\ndetails of the failed action: {url}"));

    // Kept by action digest, with the run's operation and worker; the
    // stored blob is the ActionResult, and the ActionCache never sees it.
    let run = s.failed_result(&action).expect("the failed run is kept");
    assert_eq!((run.operation.as_str(), run.worker.as_deref()), (view.name.as_str(), Some("a")));
    let stored = s.cas.get_bytes(&run.result).await.unwrap();
    assert_eq!(<ActionResult as prost::Message>::decode(stored).unwrap(), result);
    let key = AcKey::new(&InstanceName::default(), &action);
    assert!(s.results.lookup(&key, DigestFunction::Sha256).await.unwrap().is_none());

    // A success keeps nothing and says nothing.
    let ok = s.submit(submission(b"works", &[])).await.unwrap();
    let task = assigned(&mut rx).unwrap();
    s.finished(w, &task.id, ExecuteResponse { result: Some(ActionResult::default()), ..Default::default() }).await;
    let view = ok.borrow().clone();
    assert!(view.response.as_ref().unwrap().message.is_empty());
    assert!(s.failed_result(&view.action_digest).is_none());
}

#[tokio::test]
async fn without_a_status_url_a_failure_is_kept_but_carries_no_link() {
    let s = scheduler(3);
    let (w, mut rx) = worker(&s, "a", 1, &[]).await;
    let op = s.submit(submission(b"times out", &[])).await.unwrap();
    let task = assigned(&mut rx).unwrap();
    let status = remote_apis::rpc::Status { code: tonic::Code::DeadlineExceeded as i32, ..Default::default() };
    let response =
        ExecuteResponse { result: Some(ActionResult::default()), status: Some(status), ..Default::default() };
    s.finished(w, &task.id, response).await;
    let view = op.borrow().clone();
    assert!(view.response.as_ref().unwrap().message.is_empty());
    assert!(s.failed_result(&view.action_digest).is_some(), "an error with a result is a failure too");
}
