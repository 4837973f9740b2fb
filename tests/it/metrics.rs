//! `/metrics` read by a real Prometheus text-format parser after a known
//! sequence of calls: every value checked is one this server alone
//! produced. Also: metrics off, and who may scrape.

use std::collections::BTreeMap;

use remote_apis::bytestream::WriteRequest;
use remote_apis::reapi::{
    ActionResult, BatchUpdateBlobsRequest, GetActionResultRequest, UpdateActionResultRequest,
    batch_update_blobs_request, compressor,
};
use remote_apis::{Compressor, Digest, DigestFunction, InstanceName, WriteResource};
use tonic::Code;

use crate::auth::{start, token_file_text, token_of};
use crate::common::{TestServer, assert_code, data, free_addr, http_get, sha};
use crate::execution::{Act, execute, request, run};

const CAS: &str = "build.bazel.remote.execution.v2.ContentAddressableStorage";
const AC: &str = "build.bazel.remote.execution.v2.ActionCache";
const EXECUTION: &str = "build.bazel.remote.execution.v2.Execution";
const BYTESTREAM: &str = "google.bytestream.ByteStream";

/// A scrape, parsed: samples by name and sorted labels, and the names of
/// the metrics described (those without samples too).
struct Scrape {
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    described: std::collections::BTreeSet<String>,
}

impl Scrape {
    async fn get(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> Scrape {
        let response = http_get(addr, "/metrics", headers).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(response.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
        Scrape::parse(&response.text())
    }

    fn parse(text: &str) -> Scrape {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("a valid exposition");
        let mut samples = BTreeMap::new();
        for s in parsed.samples {
            let labels: Vec<(String, String)> = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let mut labels = labels;
            labels.sort();
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    // The parser folds `_bucket` lines; keep the +Inf count.
                    buckets.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => continue,
            };
            samples.insert((s.metric, labels), value);
        }
        Scrape { samples, described: parsed.docs.into_keys().collect() }
    }

    /// The sample `name{labels}`; 0 when absent (a counter never touched).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut key: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        key.sort();
        self.samples.get(&(name.to_string(), key)).copied().unwrap_or(0.0)
    }

    fn has(&self, name: &str) -> bool {
        self.samples.keys().any(|(n, _)| n == name)
    }

    fn calls(&self, service: &str, method: &str, code: &str) -> f64 {
        self.value("distbuild_grpc_requests_total", &[("service", service), ("method", method), ("code", code)])
    }

    fn store_ops(&self, store: &str, op: &str, result: &str) -> f64 {
        self.value("distbuild_store_operations_total", &[("store", store), ("op", op), ("result", result)])
    }
}

fn update(d: &Digest, bytes: &[u8]) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request {
        digest: Some(d.to_proto()),
        data: bytes.to_vec(),
        compressor: compressor::Value::Identity as i32,
    }
}

async fn bytestream_write(server: &TestServer, blob: &[u8]) {
    let name = WriteResource {
        instance: InstanceName::default(),
        uuid: uuid::Uuid::new_v4().to_string(),
        compressor: Compressor::Identity,
        digest: sha(blob),
    }
    .to_name();
    let reqs: Vec<WriteRequest> = blob
        .chunks(1000)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * 1000) as i64,
            finish_write: (i + 1) * 1000 >= blob.len(),
            data: c.to_vec(),
        })
        .collect();
    server.bytestream().write(futures::stream::iter(reqs)).await.unwrap();
}

fn ac_get(action: &Digest) -> GetActionResultRequest {
    GetActionResultRequest {
        action_digest: Some(action.to_proto()),
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_known_sequence_gives_exact_values() {
    let http = free_addr();
    let server = TestServer::start_with(cargo_distbuild::config::Backend::Filesystem, |f| {
        f.server.http_listen = Some(http.to_string());
        f.worker.capacity = Some(2);
    })
    .await;

    // Storage and the ActionCache: two blobs in a batch, one by ByteStream,
    // a result stored, a hit and a miss.
    let (a, b, c) = (data(1, 100), data(2, 200), data(3, 3000));
    let batch = BatchUpdateBlobsRequest {
        requests: vec![update(&sha(&a), &a), update(&sha(&b), &b)],
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    };
    server.cas().batch_update_blobs(batch).await.unwrap();
    bytestream_write(&server, &c).await;
    let cached = sha(b"an action digest with a stored result");
    let result = ActionResult { stdout_digest: Some(sha(&a).to_proto()), ..Default::default() };
    let store = UpdateActionResultRequest {
        action_digest: Some(cached.to_proto()),
        action_result: Some(result),
        digest_function: DigestFunction::Sha256.to_proto() as i32,
        ..Default::default()
    };
    server.ac().update_action_result(store).await.unwrap();
    server.ac().get_action_result(ac_get(&cached)).await.unwrap();
    assert_code(server.ac().get_action_result(ac_get(&sha(b"never stored"))).await, Code::NotFound);

    let s = Scrape::get(http, &[]).await;
    assert_eq!(s.calls(CAS, "BatchUpdateBlobs", "OK"), 1.0);
    assert_eq!(s.calls(BYTESTREAM, "Write", "OK"), 1.0);
    assert_eq!(s.calls(AC, "UpdateActionResult", "OK"), 1.0);
    assert_eq!(s.calls(AC, "GetActionResult", "OK"), 1.0);
    assert_eq!(s.calls(AC, "GetActionResult", "NotFound"), 1.0);
    let latency = [("service", AC), ("method", "GetActionResult")];
    assert_eq!(s.value("distbuild_grpc_request_duration_seconds_count", &latency), 2.0);
    let received = s.value("distbuild_grpc_received_bytes_total", &[("service", BYTESTREAM), ("method", "Write")]);
    assert!((3000.0..3300.0).contains(&received), "ByteStream bytes received: {received}");
    assert!(s.value("distbuild_grpc_sent_bytes_total", &[("service", AC), ("method", "GetActionResult")]) > 0.0);

    assert_eq!(s.store_ops("cas", "put", "ok"), 3.0);
    assert_eq!(s.store_ops("cas", "put", "error"), 0.0);
    assert_eq!(s.value("distbuild_store_written_bytes_total", &[("store", "cas")]), 3300.0);
    assert_eq!(s.value("distbuild_store_blob_size_bytes_count", &[("store", "cas")]), 3.0);
    assert_eq!(s.value("distbuild_store_blob_size_bytes_sum", &[("store", "cas")]), 3300.0);
    assert_eq!(s.value("distbuild_store_used_bytes", &[("store", "cas")]), 3300.0);
    assert_eq!(s.value("distbuild_store_blobs", &[("store", "cas")]), 3.0);
    assert!(s.value("distbuild_store_max_bytes", &[("store", "cas")]) > 3300.0);
    assert_eq!(s.value("distbuild_store_evictions_total", &[("store", "cas")]), 0.0);
    assert_eq!(s.store_ops("ac", "put", "ok"), 1.0);
    assert_eq!(s.store_ops("ac", "get", "ok"), 1.0);
    assert_eq!(s.store_ops("ac", "get", "not_found"), 1.0);
    assert_eq!(s.value("distbuild_action_cache_requests_total", &[("result", "hit")]), 1.0);
    assert_eq!(s.value("distbuild_action_cache_requests_total", &[("result", "miss")]), 1.0);
    assert_eq!(s.value("distbuild_action_cache_incomplete_total", &[]), 0.0);

    assert_eq!(s.value("distbuild_workers_connected", &[]), 1.0);
    assert_eq!(s.value("distbuild_workers_slots", &[]), 2.0);
    assert_eq!(s.value("distbuild_workers_busy_slots", &[]), 0.0);
    assert_eq!(s.value("distbuild_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(s.value("distbuild_process_resident_memory_bytes", &[]) > 0.0);
    assert!(s.value("distbuild_process_open_fds", &[]) > 0.0);
    assert!(s.has("distbuild_uptime_seconds"));

    // Execution: one action that succeeds, one that fails, and the first
    // again from the cache.
    let good = Act::sh("echo fine");
    let bad = Act::sh("echo broken >&2; exit 3");
    assert_eq!(execute(&server, &good).await.result.unwrap().exit_code, 0);
    assert_eq!(execute(&server, &bad).await.result.unwrap().exit_code, 3);
    let again = run(&server, request(good.upload(&server).await)).await.unwrap();
    assert!(crate::execution::response(again.last().unwrap()).cached_result);

    let s = Scrape::get(http, &[]).await;
    assert_eq!(s.calls(EXECUTION, "Execute", "OK"), 3.0);
    assert_eq!(s.value("distbuild_execution_cache_misses_total", &[]), 2.0);
    assert_eq!(s.value("distbuild_execution_cache_hits_total", &[]), 1.0);
    assert_eq!(s.value("distbuild_execution_executed_total", &[]), 2.0);
    assert_eq!(s.value("distbuild_execution_merged_total", &[]), 0.0);
    assert_eq!(s.value("distbuild_execution_requeued_total", &[]), 0.0);
    assert_eq!(s.value("distbuild_execution_cancellations_total", &[]), 0.0);
    assert_eq!(s.value("distbuild_execution_failures_total", &[("reason", "exit_code")]), 1.0);
    for reason in ["timeout", "worker_lost", "unmatched", "error"] {
        assert_eq!(s.value("distbuild_execution_failures_total", &[("reason", reason)]), 0.0, "{reason}");
    }
    assert_eq!(s.value("distbuild_execution_timeouts_total", &[]), 0.0);
    assert_eq!(s.value("distbuild_execution_queue_wait_seconds_count", &[]), 2.0);
    for phase in ["input_fetch", "execution", "output_upload", "worker"] {
        assert_eq!(s.value("distbuild_execution_duration_seconds_count", &[("phase", phase)]), 2.0, "{phase}");
    }
    assert_eq!(s.value("distbuild_execution_operations", &[("stage", "completed")]), 3.0);
    assert_eq!(s.value("distbuild_execution_operations", &[("stage", "queued")]), 0.0);
    assert_eq!(s.value("distbuild_execution_operations", &[("stage", "executing")]), 0.0);
    let worker = s
        .samples
        .keys()
        .find(|(n, _)| n == "distbuild_worker_actions_total")
        .map(|(_, labels)| labels[0].1.clone())
        .expect("a per-worker sample");
    assert!(worker.starts_with("builtin@"), "{worker}");
    assert_eq!(s.value("distbuild_worker_actions_total", &[("worker", &worker)]), 2.0);
    assert_eq!(s.value("distbuild_worker_failed_actions_total", &[("worker", &worker)]), 1.0);
    assert_eq!(s.value("distbuild_worker_last_keepalive_age_seconds", &[("worker", &worker)]), 0.0);
    // Execute's own cache lookups are not GetActionResult calls.
    assert_eq!(s.value("distbuild_action_cache_requests_total", &[("result", "hit")]), 1.0);
    assert_eq!(s.value("distbuild_action_cache_requests_total", &[("result", "miss")]), 1.0);
    documents_match(&s);
    server.stop().await.unwrap();
}

/// README's metric table lists every metric served, and the sample Grafana
/// dashboard queries only metrics that exist.
fn documents_match(s: &Scrape) {
    let root = env!("CARGO_MANIFEST_DIR");
    assert!(s.described.len() > 30, "{:?}", s.described);
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let family = |name: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.to_string(), |n, suffix| n.strip_suffix(suffix).map_or(n.clone(), str::to_string))
    };
    for name in &s.described {
        let name = family(name);
        assert!(readme.contains(&format!("| `{name}` |")), "README's metric table lacks {name}");
    }
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    for (at, _) in dashboard.match_indices("distbuild_") {
        let name: String = dashboard[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let name = family(&name);
        assert!(s.described.contains(&name), "the dashboard queries {name}, which is not served");
    }
}

#[tokio::test]
async fn openmetrics_is_served_to_who_asks_for_it() {
    let http = free_addr();
    let server = TestServer::start_with(cargo_distbuild::config::Backend::Memory, |f| {
        f.server.http_listen = Some(http.to_string());
    })
    .await;
    let r = http_get(http, "/metrics", &[("Accept", "application/openmetrics-text; version=1.0.0")]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("application/openmetrics-text"));
    assert!(r.text().ends_with("# EOF\n"), "{}", r.text());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn with_metrics_off_nothing_is_recorded_or_served() {
    let (http, open) = (free_addr(), free_addr());
    let server = TestServer::start_with(cargo_distbuild::config::Backend::Memory, |f| {
        f.server.http_listen = Some(http.to_string());
        f.server.metrics_listen = Some(open.to_string());
        f.server.metrics = false;
    })
    .await;
    let blob = data(9, 100);
    let batch = BatchUpdateBlobsRequest { requests: vec![update(&sha(&blob), &blob)], ..Default::default() };
    server.cas().batch_update_blobs(batch).await.unwrap();
    for addr in [http, open] {
        let r = http_get(addr, "/metrics", &[]).await;
        assert_eq!(r.status, 404, "{}", r.text());
        assert!(r.text().contains("metrics = false"), "{}", r.text());
    }
    // The status listener works on.
    assert_eq!(http_get(http, "/healthz", &[]).await.status, 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_need_the_status_grant_except_on_their_own_listener() {
    let (http, open) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_file_text(&[("viewer", &["status"], ""), ("dev", &["cas-read", "cas-write"], "")]);
    let server = start(dir.path(), &tokens, &[], |f| {
        f.server.http_listen = Some(http.to_string());
        f.server.metrics_listen = Some(open.to_string());
    })
    .await;
    assert_eq!(http_get(http, "/metrics", &[]).await.status, 401);
    let dev = format!("Bearer {}", token_of("dev"));
    assert_eq!(http_get(http, "/metrics", &[("Authorization", &dev)]).await.status, 403);
    let viewer = format!("Bearer {}", token_of("viewer"));
    let s = Scrape::get(http, &[("Authorization", &viewer)]).await;
    assert_eq!(s.value("distbuild_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    // The open listener: /metrics without a token, and nothing else.
    let s = Scrape::get(open, &[]).await;
    assert_eq!(s.value("distbuild_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(http_get(open, "/", &[]).await.status, 404);
    assert_eq!(http_get(open, "/healthz", &[]).await.status, 404);
    server.stop().await.unwrap();
}
