//! Soak: a real server process on loopback under valid build-client load
//! mixed with the hostile requests of issue 9, for a bounded time; then
//! checks that it survived, kept every blob it acknowledged, gave back its
//! memory and file descriptors, and left no action process behind. Run it
//! through `scripts/soak.sh`.
//!
//! Each check is reported on its own line (PASS/FAIL), so a run shows which
//! protection holds and which does not; the exit status is 1 if any failed.
//!
//! Usage: soak SERVER_BINARY [SECONDS=180] [SETTLE_SECONDS=60]
//! Environment: SOAK_MARKER (tag of every action process; default: one per
//! run), SOAK_SKIP (comma-separated attacks to leave out), SOAK_SET
//! (`section.key=value;...` added to the server's config).

mod attacks;
mod load;
mod server;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use remote_apis::{Digest, DigestFunction};
use tonic::transport::Channel;

const USAGE: &str = "usage: soak SERVER_BINARY [SECONDS=180] [SETTLE_SECONDS=60]";

/// How far above the baseline (taken after warm-up) the server's RSS and
/// open descriptors may stay once the load has stopped.
const RSS_MARGIN: u64 = 64 << 20;
const FD_MARGIN: usize = 32;

/// Pause between rounds of hostile requests.
const ATTACK_PAUSE: Duration = Duration::from_secs(5);

/// What every task shares.
pub struct Ctx {
    pub binary: String,
    pub url: String,
    pub port: u16,
    pub pid: u32,
    pub marker: String,
    deadline: Instant,
    stopped: AtomicBool,
    pub acknowledged: Mutex<Vec<Digest>>,
    pub action_results: Mutex<Vec<(Digest, Digest)>>,
    pub bomb: (Digest, Bytes),
    pub deep_root: OnceLock<Digest>,
}

impl Ctx {
    pub fn running(&self) -> bool {
        !self.stopped.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub async fn connect(&self) -> Result<Channel, String> {
        let endpoint = remote_apis::client::endpoint(&self.url).map_err(|s| s.message().to_string())?;
        endpoint.connect().await.map_err(|e| format!("connecting to {}: {e}", self.url))
    }

    /// `cargo-distbuild exec [extra] -- sh -c SCRIPT`: exit code and stdout.
    pub async fn exec(&self, extra: &[&str], script: &str) -> Result<(Option<i32>, String), String> {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args(["--server", &self.url, "exec"])
            .args(extra)
            .args(["--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(90), command.output())
            .await
            .map_err(|_| "exec did not return within 90 s".to_string())?
            .map_err(|e| format!("running exec: {e}"))?;
        Ok((out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

pub fn sha256(data: &[u8]) -> Digest {
    DigestFunction::Sha256.digest_of(data)
}

/// xorshift64: reproducible blob contents without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Bytes {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out.into()
    }
}

/// Outcomes of one kind of request.
pub struct Tally {
    pub name: String,
    ok: AtomicU64,
    failed: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    details: Mutex<Vec<String>>,
}

impl Tally {
    fn new(name: &str) -> Arc<Tally> {
        Arc::new(Tally {
            name: name.to_string(),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_errors: Mutex::new(Vec::new()),
            details: Mutex::new(Vec::new()),
        })
    }

    pub fn record<T: ToString>(&self, outcome: Result<T, String>) {
        match outcome {
            Ok(detail) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let detail = detail.to_string();
                let mut d = self.details.lock();
                if !detail.is_empty() && !d.contains(&detail) && d.len() < 3 {
                    d.push(detail);
                }
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.first_errors.lock();
                if errors.len() < 3 {
                    errors.push(e);
                }
            }
        }
    }

    fn check(&self, report: &mut Report) {
        let (ok, failed) = (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed));
        let mut detail = format!("{ok} ok, {failed} failed");
        for e in self.first_errors.lock().iter().chain(self.details.lock().iter()) {
            detail.push_str(&format!("\n      {}", e.chars().take(300).collect::<String>()));
        }
        report.check(&self.name, failed == 0 && ok > 0, detail);
    }
}

/// The checks, in the order they were made.
#[derive(Default)]
struct Report {
    lines: Vec<(bool, String, String)>,
}

impl Report {
    fn check(&mut self, name: &str, pass: bool, detail: impl Into<String>) {
        self.lines.push((pass, name.to_string(), detail.into()));
    }

    fn print(&self) -> bool {
        println!("\nsoak summary");
        for (pass, name, detail) in &self.lines {
            println!("  {} {name:<28} {detail}", if *pass { "PASS" } else { "FAIL" });
        }
        let failed = self.lines.iter().filter(|(p, _, _)| !p).count();
        println!("{} passed, {failed} failed", self.lines.len() - failed);
        failed == 0
    }
}

type AttackFn = fn(Arc<Ctx>, Channel) -> std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Hostile requests in the order each round sends them: the ones that
/// brought the server down before issue 9 come last, so a round shows the
/// others first.
fn attacks() -> Vec<(&'static str, AttackFn)> {
    vec![
        ("long_resource_name", |c, ch| Box::pin(attacks::long_resource_name(c, ch))),
        ("interrupted_uploads", |c, ch| Box::pin(attacks::interrupted_uploads(c, ch))),
        ("setsid_daemon", |c, ch| Box::pin(attacks::setsid_daemon(c, ch))),
        ("timeout_action", |c, ch| Box::pin(attacks::timeout_action(c, ch))),
        ("zstd_bomb_batch", |c, ch| Box::pin(attacks::zstd_bomb_batch(c, ch))),
        ("deep_dag", |c, ch| Box::pin(attacks::deep_dag(c, ch))),
        ("zstd_huge_claim", |c, ch| Box::pin(attacks::zstd_huge_claim(c, ch))),
    ]
}

/// Rounds of hostile requests until the deadline; stops everything when
/// one leaves the server dead, naming it.
async fn attack_rounds(ctx: Arc<Ctx>, tallies: Vec<(&'static str, AttackFn, Arc<Tally>)>, death: Arc<Mutex<String>>) {
    let Ok(channel) = ctx.connect().await else { return };
    while ctx.running() {
        for (name, attack, tally) in &tallies {
            if !ctx.running() {
                return;
            }
            let before = server::sample(ctx.pid).rss;
            let outcome = attack(ctx.clone(), channel.clone()).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let grew = server::sample(ctx.pid).rss.saturating_sub(before);
            tally.record(outcome.map(|d| if grew >= 16 << 20 { format!("{d} (RSS +{} MiB)", grew >> 20) } else { d }));
            if !server::alive(ctx.pid) {
                *death.lock() = format!("the server died after {name}");
                tally.record::<String>(Err("the server died".into()));
                ctx.stop();
                return;
            }
        }
        tokio::time::sleep(ATTACK_PAUSE).await;
    }
}

/// One of each valid request, so the baseline includes warmed-up pools.
async fn warm_up(ctx: &Arc<Ctx>) -> Result<(), String> {
    let channel = ctx.connect().await?;
    for i in 0..3 {
        load::batch_upload(ctx.clone(), channel.clone(), 1_000_000 + i).await?;
        load::stream_upload(ctx.clone(), channel.clone(), 1_000_000 + i).await?;
        load::read_back(ctx.clone(), channel.clone(), i).await?;
        load::find_missing(ctx.clone(), channel.clone(), i).await?;
        load::action_cache(ctx.clone(), channel.clone(), i).await?;
        load::execute(ctx.clone(), channel.clone(), 1_000_000 + i).await?;
    }
    Ok(())
}

fn skipped() -> Vec<String> {
    std::env::var("SOAK_SKIP").unwrap_or_default().split(',').map(|s| s.trim().to_string()).collect()
}

fn parse_arg(args: &[String], i: usize, default: u64) -> u64 {
    args.get(i).map_or(default, |s| s.parse().unwrap_or_else(|_| panic!("{USAGE}")))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let binary = args.get(1).unwrap_or_else(|| panic!("{USAGE}")).clone();
    let seconds = parse_arg(&args, 2, 180);
    let settle = Duration::from_secs(parse_arg(&args, 3, 60));
    let marker = std::env::var("SOAK_MARKER").unwrap_or_else(|_| format!("distbuild-soak-{}", std::process::id()));
    let ok = run(binary, seconds, settle, marker).await;
    std::process::exit(if ok { 0 } else { 1 });
}

async fn run(binary: String, seconds: u64, settle: Duration, marker: String) -> bool {
    let mut report = Report::default();
    let mut srv = match server::start(&binary) {
        Ok(s) => s,
        Err(e) => {
            report.check("server starts", false, e);
            return report.print();
        }
    };
    if !srv.dropped.is_empty() {
        println!("this server does not know these soak settings (left out): {}", srv.dropped.join(", "));
    }
    println!("server pid {} at {}, soaking for {seconds} s; marker {marker}", srv.pid, srv.url);
    let ctx = Arc::new(Ctx {
        binary,
        url: srv.url.clone(),
        port: srv.port,
        pid: srv.pid,
        marker,
        deadline: Instant::now() + Duration::from_secs(seconds),
        stopped: AtomicBool::new(false),
        acknowledged: Mutex::new(Vec::new()),
        action_results: Mutex::new(Vec::new()),
        bomb: tokio::task::spawn_blocking(attacks::zstd_bomb).await.expect("building the zstd bomb"),
        deep_root: OnceLock::new(),
    });
    if let Err(e) = warm_up(&ctx).await {
        report.check("warm-up", false, e);
        return report.print();
    }
    let baseline = server::sample(srv.pid);
    println!("baseline: RSS {} MiB, {} fds", baseline.rss >> 20, baseline.fds);

    let death = Arc::new(Mutex::new(String::new()));
    let skip = skipped();
    let mut idle = Vec::new();
    if !skip.iter().any(|s| s == "idle_connections") {
        for i in 0..attacks::IDLE_CONNECTIONS {
            match attacks::idle_connection(srv.port, i % 2 == 1).await {
                Ok(c) => idle.push(c),
                Err(e) => report.check("idle_connections", false, format!("connecting: {e}")),
            }
        }
    }
    if !skip.iter().any(|s| s == "deep_dag") {
        let uploaded = match ctx.connect().await {
            Ok(channel) => attacks::upload_deep_tree(&channel).await,
            Err(e) => Err(e),
        };
        match uploaded {
            Ok(root) => drop(ctx.deep_root.set(root)),
            Err(e) => report.check("deep_dag upload", false, e),
        }
    }
    let valid: Vec<Arc<Tally>> = ["valid batch_upload", "valid stream_upload", "valid read_back", "valid find_missing"]
        .into_iter()
        .chain(["valid action_cache", "valid execute"])
        .map(Tally::new)
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    let ms = Duration::from_millis;
    tasks.spawn(load::repeat(ctx.clone(), valid[0].clone(), ms(20), load::batch_upload));
    tasks.spawn(load::repeat(ctx.clone(), valid[1].clone(), ms(200), load::stream_upload));
    tasks.spawn(load::repeat(ctx.clone(), valid[2].clone(), ms(20), load::read_back));
    tasks.spawn(load::repeat(ctx.clone(), valid[3].clone(), ms(20), load::find_missing));
    tasks.spawn(load::repeat(ctx.clone(), valid[4].clone(), ms(20), load::action_cache));
    tasks.spawn(load::repeat(ctx.clone(), valid[5].clone(), ms(100), load::execute));
    let hostile: Vec<(&'static str, AttackFn, Arc<Tally>)> = attacks()
        .into_iter()
        .filter(|(name, _)| !skip.iter().any(|s| s == name))
        .map(|(name, f)| (name, f, Tally::new(&format!("attack {name}"))))
        .collect();
    tasks.spawn(attack_rounds(ctx.clone(), hostile.clone(), death.clone()));
    while ctx.running() {
        tokio::time::sleep(ms(500)).await;
        if !server::alive(srv.pid) {
            ctx.stop();
        }
    }
    while tasks.join_next().await.is_some() {}

    let alive = server::alive(srv.pid);
    let died = death.lock().clone();
    report.check("server alive", alive, if alive { "yes".to_string() } else { format!("no: {died}") });
    for t in valid.iter().chain(hostile.iter().map(|(_, _, t)| t)) {
        t.check(&mut report);
    }
    if alive {
        final_checks(&ctx, &mut srv, &mut report, baseline, idle, settle).await;
    }
    let log = std::fs::read_to_string(&srv.log).unwrap_or_default();
    let crash = ["panicked", "overflowed its stack", "memory allocation of"].iter().find(|p| log.contains(*p));
    report.check(
        "server log has no panic",
        crash.is_none(),
        crash.map_or("clean".to_string(), |_| format!("\n{}", server::tail(&log, 15))),
    );
    report.print()
}

/// After the load: blobs and ActionCache entries read back; idle
/// connections closed by the server; RSS, fds and action processes back
/// to where they were, within `settle`.
async fn final_checks(
    ctx: &Arc<Ctx>,
    srv: &mut server::Server,
    report: &mut Report,
    baseline: server::Sample,
    idle: Vec<tokio::net::TcpStream>,
    settle: Duration,
) {
    match ctx.connect().await {
        Ok(channel) => {
            let (count, problems) = load::verify_all(ctx, &channel).await;
            let mut detail = format!("{count} blobs, {} action results", ctx.action_results.lock().len());
            for p in problems.iter().take(3) {
                detail.push_str(&format!("\n      {p}"));
            }
            report.check("acknowledged data reads back", problems.is_empty() && count > 0, detail);
        }
        Err(e) => report.check("acknowledged data reads back", false, e),
    }
    if !idle.is_empty() {
        // Even indices said nothing; odd ones sent the HTTP/2 preface.
        let silent = attacks::closed_by_server(idle.iter().step_by(2));
        let preface = attacks::closed_by_server(idle.iter().skip(1).step_by(2));
        let (n_silent, n_preface) = (idle.len().div_ceil(2), idle.len() / 2);
        report.check(
            "idle connections closed",
            silent + preface == idle.len(),
            format!("silent: {silent} of {n_silent} closed, after the HTTP/2 preface: {preface} of {n_preface}"),
        );
    }
    drop(idle);
    let until = Instant::now() + settle;
    let (mut now, mut leftovers);
    loop {
        now = server::sample(srv.pid);
        leftovers = server::processes_with(&ctx.marker);
        let settled =
            now.rss <= baseline.rss + RSS_MARGIN && now.fds <= baseline.fds + FD_MARGIN && leftovers.is_empty();
        if settled || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mib = |b: u64| b >> 20;
    report.check(
        "RSS back near baseline",
        now.rss <= baseline.rss + RSS_MARGIN,
        format!("{} MiB, baseline {} MiB, margin {} MiB", mib(now.rss), mib(baseline.rss), mib(RSS_MARGIN)),
    );
    report.check(
        "fds back near baseline",
        now.fds <= baseline.fds + FD_MARGIN,
        format!("{}, baseline {}, margin {FD_MARGIN}; now {}", now.fds, baseline.fds, server::fd_kinds(srv.pid)),
    );
    let detail = leftovers.iter().map(|(pid, cmd)| format!("\n      {pid}: {cmd}")).collect::<String>();
    report.check("no action process left", leftovers.is_empty(), format!("{} left{detail}", leftovers.len()));
    report.check("server alive at the end", server::alive(srv.pid), "");
    let _ = srv.child.try_wait();
}
