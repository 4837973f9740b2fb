//! Storage benchmark: a real server process on loopback, measured from a
//! client in this process. Run it through `scripts/bench-storage.sh`.
//!
//! Prints ByteStream upload and download throughput of one large blob,
//! BatchUpdateBlobs of many small blobs, FindMissingBlobs latency, and the
//! server's peak RSS while streaming, each beside a baseline measured in the
//! same run on the same machine (plain file I/O on the same disk); then the
//! same uploads with metrics recorded and not, and their ratio.
//!
//! Usage: storage_bench SERVER_BINARY [BLOB_MIB] [SMALL_BLOBS]

#[path = "support/server.rs"]
#[allow(dead_code)] // the execution benchmark's helpers
mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use remote_apis::bytestream::ReadRequest;
use remote_apis::bytestream::byte_stream_client::ByteStreamClient;
use remote_apis::client::CasClient;
use remote_apis::reapi::BatchReadBlobsRequest;
use remote_apis::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use remote_apis::{Compressor, Digest, DigestFunction, InstanceName, ReadResource};

use support::{Server, start_server};

/// Peak resident set of `pid` since the last reset, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn random_bytes(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

/// Rounds of each measurement; the median is reported.
const ROUNDS: usize = 5;

/// Bytes per WriteRequest, as the project's own client sends them.
const UPLOAD_CHUNK: usize = remote_apis::client::CHUNK_SIZE;

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

async fn connect(url: &str) -> CasClient {
    for _ in 0..200 {
        if let Ok(c) = CasClient::connect(url, InstanceName::default()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server did not come up at {url}");
}

/// Plain file write and read of the same bytes, on the disk the server uses.
fn disk_baseline(data: &[u8]) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baseline");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for c in data.chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    drop(f);
    let write = t.elapsed();
    let t = Instant::now();
    let mut f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
    (write, t.elapsed())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let binary = args.get(1).expect("usage: storage_bench SERVER_BINARY [BLOB_MIB] [SMALL_BLOBS]");
    let blob_mib: usize = args.get(2).map_or(256, |s| s.parse().unwrap());
    let small_count: usize = args.get(3).map_or(10_000, |s| s.parse().unwrap());

    let mut big = random_bytes(blob_mib << 20, 42).to_vec();
    let (disk_write, disk_read) = disk_baseline(&big);

    // The same transfers against a memory store: the server's own cost,
    // without the disk.
    let mem = {
        let server = start_server(binary, &["--max-size", "8GiB", "--backend", "memory"]);
        let client = connect(&server.url).await;
        stream_rounds(&server, &client, &mut big).await
    };

    let server = start_server(binary, &["--max-size", "8GiB", "--backend", "filesystem"]);
    let pid = server.child.id();
    let client = connect(&server.url).await;
    let idle_rss = peak_rss(pid);
    let can_reset = reset_peak_rss(pid);
    let fs = stream_rounds(&server, &client, &mut big).await;
    drop(big);

    // Many small blobs through BatchUpdateBlobs, several rounds.
    let mut batches = Vec::new();
    let mut digests = Vec::new();
    for round in 0..ROUNDS {
        let small: Vec<(Digest, Bytes)> = (0..small_count)
            .map(|i| {
                let b = random_bytes(100 + (i * 37) % 900, (round * small_count + i) as u64 + 7);
                (DigestFunction::Sha256.digest_of(&b), b)
            })
            .collect();
        digests = small.iter().map(|(d, _)| *d).collect();
        let t = Instant::now();
        client.upload_blobs(small).await.unwrap();
        batches.push(t.elapsed());
    }
    let batch = median(&mut batches);

    // FindMissingBlobs over all of them (all present), repeated.
    let mut latencies = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let missing = client.find_missing(&digests).await.unwrap();
        latencies.push(t.elapsed());
        assert!(missing.is_empty());
    }
    latencies.sort();

    // Reads of small blobs, which the filesystem store hashes on every read
    // below [cas] verify_reads_below: the same blobs through BatchReadBlobs,
    // and 60 KiB blobs (just under the default threshold).
    let small_reads = batch_read_rate(&server.url, &digests).await;
    let mid: Vec<(Digest, Bytes)> = (0..600)
        .map(|i| {
            let b = random_bytes(60 << 10, i as u64 + 99);
            (DigestFunction::Sha256.digest_of(&b), b)
        })
        .collect();
    let mid_digests: Vec<Digest> = mid.iter().map(|(d, _)| *d).collect();
    client.upload_blobs(mid).await.unwrap();
    let mid_reads = batch_read_rate(&server.url, &mid_digests).await;

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "cargo-distbuild storage benchmark ({} cores; medians of {ROUNDS} rounds)",
        std::thread::available_parallelism().unwrap()
    );
    println!();
    println!("{:<52} {:>12} {:>14} {:>8}", "measure", "result", "baseline", "target");
    let row = |what: String, mbs: f64, base: f64, target: &str| {
        println!("{what:<52} {mbs:>9.0} MB/s {base:>9.0} MB/s {target:>8}");
    };
    let (size, up, down) = (mem.size, mem.upload, mem.download);
    row(
        format!("ByteStream upload, {blob_mib} MiB, memory store"),
        mb_per_s(size, up),
        mb_per_s(size, disk_write),
        ">= 500",
    );
    row(
        format!("ByteStream upload, {blob_mib} MiB, filesystem store"),
        mb_per_s(size, fs.upload),
        mb_per_s(size, disk_write),
        ">= 500",
    );
    row(
        format!("ByteStream download, {blob_mib} MiB, memory store"),
        mb_per_s(size, down),
        mb_per_s(size, disk_read),
        ">= 1000",
    );
    row(
        format!("ByteStream download, {blob_mib} MiB, filesystem store"),
        mb_per_s(size, fs.download),
        mb_per_s(size, disk_read),
        ">= 1000",
    );
    for (what, st) in [("memory", &mem), ("filesystem", &fs)] {
        println!(
            "{:<52} {:>7.2} s/GB up {:>7.2} s/GB down",
            format!("server CPU per GB moved, {what} store"),
            st.upload_cpu_per_gb,
            st.download_cpu_per_gb
        );
    }
    println!(
        "{:<52} {:>9.0} /s {:>14} {:>8}",
        format!("BatchUpdateBlobs, {small_count} blobs of 100-1000 B"),
        small_count as f64 / batch.as_secs_f64(),
        "",
        ""
    );
    println!(
        "{:<52} {:>9.2} ms {:>14} {:>8}",
        format!("FindMissingBlobs, {small_count} digests (p50 of 21)"),
        latencies[10].as_secs_f64() * 1e3,
        "",
        ""
    );
    for (what, rate) in [
        (format!("BatchReadBlobs, {small_count} blobs of 100-1000 B"), small_reads),
        ("BatchReadBlobs, 600 blobs of 60 KiB".into(), mid_reads),
    ] {
        println!("{what:<52} {rate:>9.0} /s {:>14} {:>8}", "", "");
    }
    println!(
        "{:<52} {:>9.1} MiB {:>13} {:>8}",
        "server peak RSS while streaming (filesystem store)",
        mib(fs.peak_rss),
        format!("idle {:.1} MiB", mib(idle_rss)),
        "< 100"
    );
    if !can_reset {
        println!("(could not reset the peak RSS counter; the figure is the process's lifetime peak)");
    }
    drop(server);
    metrics_comparison(binary, blob_mib, small_count).await;
}

/// Alternating passes of the metrics comparison.
const PASSES: usize = 4;

/// The same uploads against a server recording metrics and one that does
/// not: the target is within 3% on upload throughput. The memory
/// store, so that what differs is the server's own work (on this VM the
/// disk's writeback moves filesystem figures by tens of percent between
/// identical servers). A second server with metrics off is the control: the
/// off/off ratio is the noise floor of two identical servers on this
/// machine. The order of the three rotates every pass, so none always
/// follows another's disk writeback.
async fn metrics_comparison(binary: &str, blob_mib: usize, small_count: usize) {
    const SERVERS: usize = 3; // on, off, control (off)
    let (_on_dir, on_config) = support::metrics_config(true);
    let (_off_dir, off_config) = support::metrics_config(false);
    let args = |config: &str| {
        vec!["--max-size", "2GiB", "--backend", "memory", "--config"]
            .into_iter()
            .chain([config])
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let configs = [&on_config, &off_config, &off_config];
    let servers: Vec<Server> =
        configs.iter().map(|c| start_server(binary, &args(c).iter().map(String::as_str).collect::<Vec<_>>())).collect();
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(connect(&server.url).await);
    }
    let mut big = random_bytes(blob_mib << 20, 4242).to_vec();
    let (mut up, mut batch) = (vec![Vec::new(); SERVERS], vec![Vec::new(); SERVERS]);
    // Server CPU seconds: steadier than wall-clock time on a shared machine.
    let (mut up_cpu, mut batch_cpu) = (vec![Vec::new(); SERVERS], vec![Vec::new(); SERVERS]);
    let order = |pass: usize| (0..SERVERS).map(move |k| (pass + k) % SERVERS);
    for pass in 0..PASSES {
        // Fresh blobs each pass: a blob the server holds is not uploaded again.
        big[8..16].copy_from_slice(&(pass as u64 + 1).to_le_bytes());
        for i in order(pass) {
            let streamed = stream_rounds(&servers[i], &clients[i], &mut big).await;
            up[i].push(mb_per_s(streamed.size, streamed.upload));
            up_cpu[i].push(streamed.upload_cpu_per_gb);
        }
    }
    let _ = Command::new("sync").status();
    for pass in 0..PASSES {
        for i in order(pass) {
            let small: Vec<(Digest, Bytes)> = (0..small_count)
                .map(|k| {
                    let seed = ((pass * SERVERS + i) * small_count + k) as u64 + 1_000_000;
                    let b = random_bytes(100 + (k * 37) % 900, seed);
                    (DigestFunction::Sha256.digest_of(&b), b)
                })
                .collect();
            let pid = servers[i].child.id();
            let (cpu, t) = (cpu_seconds(pid), Instant::now());
            clients[i].upload_blobs(small).await.unwrap();
            batch[i].push(small_count as f64 / t.elapsed().as_secs_f64());
            batch_cpu[i].push(cpu_seconds(pid) - cpu);
        }
    }
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mids = |v: &mut Vec<Vec<f64>>| [mid(&mut v[0]), mid(&mut v[1]), mid(&mut v[2])];
    let (up, batch, up_cpu, batch_cpu) = (mids(&mut up), mids(&mut batch), mids(&mut up_cpu), mids(&mut batch_cpu));
    println!();
    println!(
        "{:<52} {:>12} {:>12} {:>8} {:>8}  target",
        format!("metrics on against off (median of {PASSES} rotating passes)"),
        "on",
        "off",
        "on/off",
        "control"
    );
    let row = |what: String, unit: &str, [on, off, control]: [f64; 3]| {
        println!(
            "{what:<52} {on:>7.0} {unit:<4} {off:>7.0} {unit:<4} {:>8.3} {:>8.3}  >= 0.97",
            on / off,
            control / off
        );
    };
    row(format!("ByteStream upload, {blob_mib} MiB, memory store"), "MB/s", up);
    row(format!("BatchUpdateBlobs, {small_count} blobs of 100-1000 B"), "/s", batch);
    let cpu_row = |what: &str, [on, off, control]: [f64; 3]| {
        println!("{what:<52} {on:>7.2} s    {off:>7.2} s    {:>8.3} {:>8.3}", off / on, off / control);
    };
    cpu_row("server CPU per GB uploaded (off/on)", up_cpu);
    cpu_row("server CPU per BatchUpdateBlobs round (off/on)", batch_cpu);
    println!("(control: a second server with metrics off, against the first: the noise floor)");
}

/// Blobs per second read through BatchReadBlobs (batches of at most 3 MiB
/// and 10,000 blobs), median of the rounds.
async fn batch_read_rate(url: &str, digests: &[Digest]) -> f64 {
    let channel = remote_apis::client::endpoint(url).unwrap().connect().await.unwrap();
    let cas = ContentAddressableStorageClient::new(channel).max_decoding_message_size(64 << 20);
    let mut batches: Vec<Vec<Digest>> = vec![Vec::new()];
    let mut bytes = 0;
    for d in digests {
        let last = batches.last_mut().unwrap();
        if bytes + d.size > 3 << 20 || last.len() == 10_000 {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += d.size;
        batches.last_mut().unwrap().push(*d);
    }
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for batch in &batches {
            let req =
                BatchReadBlobsRequest { digests: batch.iter().map(Digest::to_proto).collect(), ..Default::default() };
            let resp = cas.clone().batch_read_blobs(req).await.unwrap().into_inner();
            assert!(resp.responses.iter().all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)));
        }
        times.push(t.elapsed());
    }
    digests.len() as f64 / median(&mut times).as_secs_f64()
}

/// Reads a blob through ByteStream, counting bytes without keeping them.
async fn download(url: &str, digest: Digest) -> u64 {
    let channel = remote_apis::client::endpoint(url).unwrap().connect().await.unwrap();
    let mut bs = ByteStreamClient::new(channel).max_decoding_message_size(64 << 20);
    let name = ReadResource { instance: InstanceName::default(), compressor: Compressor::Identity, digest }.to_name();
    let mut stream =
        bs.read(ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 }).await.unwrap().into_inner();
    let mut n = 0u64;
    while let Some(msg) = stream.message().await.unwrap() {
        n += msg.data.len() as u64;
    }
    n
}

struct Streamed {
    size: u64,
    upload: Duration,
    download: Duration,
    peak_rss: u64,
    /// Server CPU time (user + system) per GB moved, median.
    upload_cpu_per_gb: f64,
    download_cpu_per_gb: f64,
}

/// CPU seconds (user + system) `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Uploads and downloads a distinct blob per round. Dirty pages are flushed
/// between rounds (outside the timing), so each round starts from the same
/// state instead of paying for the previous round's writeback.
async fn stream_rounds(server: &Server, client: &CasClient, big: &mut [u8]) -> Streamed {
    let pid = server.child.id();
    let (mut uploads, mut downloads, mut peak) = (Vec::new(), Vec::new(), 0);
    let (mut up_cpu, mut down_cpu) = (Vec::new(), Vec::new());
    let mut size = 0;
    for round in 0..ROUNDS {
        big[..8].copy_from_slice(&(round as u64 + 1000 * pid as u64).to_le_bytes());
        let blob = Bytes::copy_from_slice(big);
        let digest = DigestFunction::Sha256.digest_of(&blob);
        size = digest.size;
        let chunks: Vec<std::io::Result<Bytes>> = (0..blob.len())
            .step_by(UPLOAD_CHUNK)
            .map(|at| Ok(blob.slice(at..(at + UPLOAD_CHUNK).min(blob.len()))))
            .collect();
        drop(blob);
        let _ = Command::new("sync").status();
        reset_peak_rss(pid);
        let cpu = cpu_seconds(pid);
        let t = Instant::now();
        client.write_stream(digest, Compressor::Identity, futures::stream::iter(chunks)).await.unwrap();
        uploads.push(t.elapsed());
        up_cpu.push((cpu_seconds(pid) - cpu) / (size as f64 / 1e9));
        peak = peak.max(peak_rss(pid));

        reset_peak_rss(pid);
        let cpu = cpu_seconds(pid);
        let t = Instant::now();
        let received = download(&server.url, digest).await;
        downloads.push(t.elapsed());
        down_cpu.push((cpu_seconds(pid) - cpu) / (size as f64 / 1e9));
        assert_eq!(received, digest.size, "downloaded size");
        peak = peak.max(peak_rss(pid));
    }
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Streamed {
        size,
        upload: median(&mut uploads),
        download: median(&mut downloads),
        peak_rss: peak,
        upload_cpu_per_gb: mid(&mut up_cpu),
        download_cpu_per_gb: mid(&mut down_cpu),
    }
}
