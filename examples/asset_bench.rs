//! Remote Asset benchmark: FetchBlob of a large archive from a loopback HTTP
//! server, beside `curl` of the same URL in the same run, and the latency
//! of a cached FetchBlob. Run it through `scripts/bench-asset.sh`.
//!
//! - The origin is an HTTP server in this process (axum, the body served
//!   from memory), so origin and network cost the same for both clients.
//! - `curl`: `curl -sf -o FILE URL` into a file on the same disk as the
//!   server's data directory (it stores the bytes as the server does).
//! - FetchBlob downloads: each run on a fresh server (a real process, its
//!   own data directory), so every run downloads, hashes and stores the
//!   whole archive; timed from the call to its answer. Once with the
//!   archive's `checksum.sri` (as Bazel sends it: streamed straight into
//!   the CAS) and once without (spooled, hashed, then stored).
//! - CPU time: the server's (from /proc, around each fetch) and curl's (the
//!   children's rusage), per run: steadier than wall-clock time on a
//!   shared machine, where other work takes turns on the same cores.
//! - Cached FetchBlob: ITERATIONS sequential calls for the recorded URL
//!   with its SRI, on one channel; p50 and p99.
//!
//! Usage: asset_bench SERVER_BINARY [SIZE_MIB=100] [RUNS=3] [ITERATIONS=2000]

#[path = "support/server.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use remote_apis::asset::fetch_client::FetchClient;
use remote_apis::asset::{FetchBlobRequest, Qualifier};
use tonic::transport::Channel;

use support::start_server;

const USAGE: &str = "usage: asset_bench SERVER_BINARY [SIZE_MIB=100] [RUNS=3] [ITERATIONS=2000]";

fn arg(n: usize, default: u64) -> u64 {
    std::env::args().nth(n).map(|a| a.parse().expect(USAGE)).unwrap_or(default)
}

/// Poorly compressible bytes (xorshift), so nothing on the way can shrink them.
fn archive(len: usize) -> Bytes {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// user + system CPU time of process `pid` (Linux /proc, clock ticks of 10 ms).
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// user + system CPU time of this process's waited-for children.
fn children_cpu() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn channel(url: &str) -> Channel {
    let endpoint = url.replace("grpc://", "http://");
    for _ in 0..200 {
        if let Ok(c) = Channel::from_shared(endpoint.clone()).unwrap().connect().await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server at {url} did not come up")
}

fn request(url: &str, sri: Option<&str>) -> FetchBlobRequest {
    FetchBlobRequest {
        uris: vec![url.to_string()],
        qualifiers: sri.map(|s| Qualifier { name: "checksum.sri".into(), value: s.into() }).into_iter().collect(),
        ..Default::default()
    }
}

async fn fetch_once(client: &mut FetchClient<Channel>, url: &str, sri: Option<&str>, size: usize) -> Duration {
    let start = Instant::now();
    let r = client.fetch_blob(request(url, sri)).await.expect("FetchBlob").into_inner();
    let took = start.elapsed();
    let code = r.status.as_ref().map_or(0, |s| s.code);
    assert_eq!(code, 0, "FetchBlob failed: {:?}", r.status);
    assert_eq!(r.blob_digest.map(|d| d.size_bytes), Some(size as i64));
    took
}

#[tokio::main]
async fn main() {
    let binary = std::env::args().nth(1).expect(USAGE);
    let size = arg(2, 100) as usize * (1 << 20);
    let runs = arg(3, 3).max(1) as usize;
    let iterations = arg(4, 2000).max(1) as usize;

    let body = archive(size);
    let sri = format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(<sha2::Sha256 as sha2::Digest>::digest(&body))
    );
    let served = body.clone();
    let app = axum::Router::new().route("/archive.tar.gz", axum::routing::get(move || async move { served.clone() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/archive.tar.gz", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[asset]\nallow_private = true\nmax_size = \"4GiB\"\n[server]\nhttp_listen = \"\"\n[worker]\ncapacity = 0\n",
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    let extra = ["--config", config.as_str()];
    println!("archive: {} MiB from {url}; {runs} runs each", size >> 20);

    // curl, into a file beside the server's data (the same disk).
    let out_dir = tempfile::tempdir().unwrap();
    let mut curl = Vec::new();
    let cpu_before = children_cpu();
    for i in 0..runs {
        let out = out_dir.path().join(format!("curl-{i}"));
        let start = Instant::now();
        let status = tokio::process::Command::new("curl")
            .args(["-sf", "-o"])
            .arg(&out)
            .arg(&url)
            .status()
            .await
            .expect("running curl");
        curl.push(start.elapsed());
        assert!(status.success(), "curl failed");
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size as u64);
        std::fs::remove_file(&out).unwrap();
    }
    let curl_cpu = (children_cpu() - cpu_before) / runs as u32;
    let curl = median(curl);
    println!(
        "curl -o FILE:                 {:8.1} ms  ({:.0} MiB/s; curl CPU {:.0} ms)",
        ms(curl),
        (size >> 20) as f64 / curl.as_secs_f64(),
        ms(curl_cpu)
    );

    for (label, sri) in [("FetchBlob with checksum.sri:", Some(sri.as_str())), ("FetchBlob without SRI:", None)] {
        let (mut times, mut cpus) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let server = start_server(&binary, &extra);
            let mut client = FetchClient::new(channel(&server.url).await);
            let before = cpu_of(server.child.id());
            times.push(fetch_once(&mut client, &url, sri, size).await);
            cpus.push(cpu_of(server.child.id()) - before);
        }
        let t = median(times);
        println!(
            "{label:29} {:8.1} ms  ({:.0} MiB/s, {:.2}x curl; target <= 1.5x; server CPU {:.0} ms)",
            ms(t),
            (size >> 20) as f64 / t.as_secs_f64(),
            t.as_secs_f64() / curl.as_secs_f64(),
            ms(median(cpus))
        );
    }

    // Cached: the record (and the SRI index) answer.
    let server = start_server(&binary, &extra);
    let mut client = FetchClient::new(channel(&server.url).await);
    fetch_once(&mut client, &url, Some(&sri), size).await;
    for _ in 0..100 {
        fetch_once(&mut client, &url, Some(&sri), size).await;
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        lat.push(fetch_once(&mut client, &url, Some(&sri), size).await);
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    println!(
        "cached FetchBlob ({iterations} calls):  p50 {:.3} ms  p99 {:.3} ms  (target p50 < 1 ms)",
        ms(p(0.5)),
        ms(p(0.99))
    );
}
