//! Config parsing: defaults, sizes and durations, refusals naming the key,
//! and every example under deploy/config/.

use super::*;

#[test]
fn empty_file_is_all_defaults() {
    let c = FileConfig::parse("").unwrap().resolve().unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_ADDR);
    assert_eq!(c.max_size, 10 << 30);
    assert_eq!(c.max_batch_size, DEFAULT_MAX_BATCH);
    assert_eq!(c.backend, Backend::Filesystem);
    assert!(c.worker_capacity >= 1);
}

#[test]
fn sizes_durations_and_seed_keys() {
    let c = FileConfig::parse(
        r#"
        [scheduler]
        addr = "0.0.0.0:9000"
        [cas]
        root = "/srv/distbuild"
        max_size = "512MiB"
        max_batch_size = "8MiB"
        upload_resume_window = "2m"
        backend = "memory"
        [worker]
        capacity = 3
        heartbeat_interval_secs = 5
        [server]
        shutdown_grace = "5s"
        "#,
    )
    .unwrap()
    .resolve()
    .unwrap();
    assert_eq!(c.listen.port(), 9000);
    assert_eq!(c.data_dir, PathBuf::from("/srv/distbuild"));
    assert_eq!(c.max_size, 512 << 20);
    assert_eq!(c.max_batch_size, 8 << 20);
    assert_eq!(c.upload_resume_window, Duration::from_secs(120));
    assert_eq!(c.backend, Backend::Memory);
    assert_eq!(c.worker_capacity, 3);
    assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
}

#[test]
fn bad_input_is_refused_with_the_key() {
    let cases = [
        ("[cas]\nmax_sise = \"1GiB\"", "unknown field"),
        ("[nope]\n", "unknown field"),
        ("[cas]\nmax_size = \"lots\"", "max_size"),
        ("[cas]\nbackend = \"tape\"", "backend"),
        ("[scheduler]\naddr = \"localhost\"", "addr"),
        ("[cas]\nmax_batch_size = \"1KiB\"", "max_batch_size"),
        ("[cas]\nmax_parked_uploads = 4\nmax_parked_uploads_per_client = 8", "max_parked_uploads_per_client"),
        ("[cas]\nverify_reads_below = \"lots\"", "verify_reads_below"),
        ("[execution]\nmax_attempts = 0", "max_attempts"),
        ("[worker]\nproperties = { chroot = \"input-root\" }", "input_root_as_root"),
        ("[execution]\nmax_tree_directories = 0", "max_tree_directories"),
        ("[execution]\nmax_tree_depth = -1", "max_tree_depth"),
        ("[execution]\ndefault_timeout = \"2h\"\nmax_timeout = \"1h\"", "default_timeout"),
        ("[server]\nshutdown_grace = \"soon\"", "shutdown_grace"),
        ("[server]\nmax_connections = 0", "max_connections"),
        ("[server]\nhandshake_timeout = \"0s\"", "handshake_timeout"),
        ("[server]\nidle_timeout = \"40s\"", "idle_timeout"),
        ("[server]\nhttp_listen = \"localhost\"", "http_listen"),
        ("[server]\nhttp_url = \"example.com\"", "http_url"),
        ("[server]\nmetrics_listen = \"9090\"", "metrics_listen"),
    ];
    for (text, needle) in cases {
        let err = FileConfig::parse(text).and_then(|f| f.resolve()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(needle), "{text:?}: {msg}");
    }
}

#[test]
fn deploy_examples_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = FileConfig::load(&path).and_then(|f| f.resolve()).unwrap_or_else(|e| panic!("{e:#}"));
            // A server example on a public address must say who may call
            // it (in the client examples, [scheduler] addr is the server's).
            if path.ends_with("container-worker.toml") {
                let containers = c.sandbox.container.as_ref().expect("container-worker.toml turns docker on");
                assert_eq!(containers.keep_images, 8);
            }
            if path.ends_with("multi-client.toml") {
                let name = |s: &str| remote_apis::InstanceName::new(s).unwrap();
                let blake3 = remote_apis::DigestFunction::Blake3;
                assert_eq!(c.instances.get(&name("buck2/ci")).digest_function, blake3);
                let dev = c.instances.get(&name("buck2/dev"));
                assert!(!dev.ac_write && dev.digest_function == blake3);
                assert_eq!(c.instances.get(&name("buildstream")).platform.len(), 1);
                assert_eq!(c.instances.get(&name("")).asset_fetch, Some(false));
                assert_eq!(c.min_retention, Duration::from_secs(3 * 3600));
            }
            if path.ends_with("s3-cache.toml") {
                use crate::config::StoreSpec;
                let g = &c.stores;
                assert_eq!((g.cas.as_str(), g.ac.as_str()), ("cache", "bucket"));
                assert!(matches!(&g.stores["cache"], StoreSpec::Tiered(t) if t.slow == "bucket_known"));
                assert!(matches!(&g.stores["bucket"], StoreSpec::S3(s) if s.path_style && s.prefix == "distbuild/"));
                assert_eq!(g.max_blob(), 200 << 30, "the disk tier's budget bounds a blob");
            }
            if path.ends_with("ha-pair.toml") {
                assert!(matches!(&c.scheduler_state, SchedulerState::Redis(r) if r.redis.starts_with("redis://")));
                assert_eq!((c.stores.cas.as_str(), c.stores.ac.as_str()), ("cache", "bucket"));
                assert_eq!(c.worker_capacity, 0, "the replicas' actions run on remote workers");
            }
            if path.ends_with("tls-farm.toml") {
                let tls = c.tls.as_ref().expect("tls-farm.toml turns TLS on");
                assert!(tls.client_ca.is_some() && c.worker_listen.is_some(), "{}", path.display());
            }
            if !["worker.toml", "tls-worker.toml", "ci-runner.toml", "container-worker.toml"]
                .iter()
                .any(|n| path.ends_with(n))
            {
                let listen = c.auth.check_listener(c.listen, "[scheduler] addr");
                listen.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            seen += 1;
        }
    }
    // The token file the server examples and the image use.
    let tokens = dir.join("../tokens.toml");
    crate::auth::tokens::Policy::load(&tokens, crate::auth::GrantSet::NONE).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(seen >= 2, "expected example configs in {}", dir.display());
}

#[test]
fn scheduler_state_is_memory_by_default_or_redis() {
    let state = |text: &str| FileConfig::parse(text).and_then(|f| f.resolve()).map(|c| c.scheduler_state);
    assert_eq!(state("").unwrap(), SchedulerState::Memory);
    assert_eq!(state("[scheduler]\nstate = \"memory\"").unwrap(), SchedulerState::Memory);
    let redis = state("[scheduler]\nstate = { redis = \"redis://r:6379\", prefix = \"ci\" }").unwrap();
    let want = crate::execution::state::RedisStateConfig { redis: "redis://r:6379".into(), prefix: Some("ci".into()) };
    assert_eq!(redis, SchedulerState::Redis(want));
    assert!(state("[scheduler]\nstate = \"postgres\"").is_err());
    assert!(state("[scheduler]\nstate = { redis = \"redis://r\", ttl = 3 }").is_err(), "unknown keys refused");
    assert!(state("[scheduler]\nstate = { redis = \"\" }").is_err());
}

/// The configs the Kubernetes manifests embed (`config.toml: |` in each
/// ConfigMap) parse and resolve like the files under deploy/config.
#[test]
fn kubernetes_configmaps_hold_valid_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut seen = 0;
    for dir in [root.clone(), root.join("ha")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let Some(at) = text.find("config.toml: |\n") else { continue };
            let body: String = text[at..]
                .lines()
                .skip(1)
                .take_while(|l| l.is_empty() || l.starts_with("    "))
                .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
                .collect();
            FileConfig::parse(&body).and_then(|f| f.resolve()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected the server, worker and HA ConfigMaps, found {seen}");
}
