//! A TCP delay line for `scripts/bench-cargo.sh`: forwards every connection
//! accepted on LISTEN to UPSTREAM and holds each chunk it reads for a fixed
//! time before writing it on, in each direction, and counts the bytes. It
//! stands in for `tc netem delay` on kernels built without netem: with a
//! 1 ms hold each way, a worker behind it sees a 2 ms round trip to the
//! server, while the rate limit stays with `tc tbf` on the veth pair.
//!
//! Each direction is a timestamped queue, not stop-and-wait: a reader
//! thread stamps each chunk with the time it may leave and goes on reading;
//! a writer thread sleeps until the head's time and writes it. Throughput is
//! therefore not limited by the delay (a chunk waits 1 ms, not every chunk
//! 1 ms after the last). What the delay reaches is every round trip the
//! application makes (gRPC calls, HTTP/2 window updates); TCP's own
//! acknowledgements run between the worker and this process and do not
//! carry it, which matters only for windows smaller than the link's
//! bandwidth-delay product (250 KB at 1 Gbit/s and 2 ms).
//!
//! Usage: delay_proxy LISTEN UPSTREAM [DELAY_US=1000] [STATS_FILE]
//! prints `listening on ADDR` once bound; STATS_FILE is rewritten (atomic
//! rename) while the counts change: `{"connections": N, "to_upstream":
//! BYTES, "from_upstream": BYTES}`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

/// Bytes read at once; a chunk is what the queue stamps.
const CHUNK: usize = 64 * 1024;
/// Chunks a direction holds at most (16 MiB): far more than 1 Gbit/s puts
/// in flight in 1 ms (125 KB), so it never limits the rate, yet a stalled
/// reader on the far side stops this side reading (backpressure) instead of
/// growing memory without bound.
const QUEUE: usize = 256;

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    to_upstream: AtomicU64,
    from_upstream: AtomicU64,
}

impl Counts {
    fn json(&self) -> String {
        format!(
            "{{\"connections\": {}, \"to_upstream\": {}, \"from_upstream\": {}}}\n",
            self.connections.load(Ordering::Relaxed),
            self.to_upstream.load(Ordering::Relaxed),
            self.from_upstream.load(Ordering::Relaxed)
        )
    }
}

/// A chunk and the time it may be written; `None` is the end of the stream.
type Stamped = Option<(Instant, Vec<u8>)>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 4 {
        eprintln!("usage: delay_proxy LISTEN UPSTREAM [DELAY_US=1000] [STATS_FILE]");
        std::process::exit(2);
    }
    let upstream = args[1].clone();
    let delay = Duration::from_micros(args.get(2).map_or(1000, |d| d.parse().expect("DELAY_US: microseconds")));
    let stats = args.get(3).map(PathBuf::from);
    let listener = TcpListener::bind(&args[0]).unwrap_or_else(|e| panic!("bind {}: {e}", args[0]));
    println!("listening on {}", listener.local_addr().unwrap());
    let counts = Arc::new(Counts::default());
    if let Some(path) = stats {
        let counts = counts.clone();
        std::thread::spawn(move || write_stats(&path, &counts));
    }
    serve(&listener, &upstream, delay, &counts);
}

/// Accepts connections for ever, each joined to a new one to `upstream`.
fn serve(listener: &TcpListener, upstream: &str, delay: Duration, counts: &Arc<Counts>) {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let (upstream, counts) = (upstream.to_string(), counts.clone());
        std::thread::spawn(move || {
            if let Err(e) = connect(client, &upstream, delay, &counts) {
                eprintln!("delay_proxy: {upstream}: {e}");
            }
        });
    }
}

/// Joins one accepted connection to a new one to `upstream`.
fn connect(client: TcpStream, upstream: &str, delay: Duration, counts: &Arc<Counts>) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    counts.connections.fetch_add(1, Ordering::Relaxed);
    let (c2, s2) = (client.try_clone()?, server.try_clone()?);
    let up = counts.clone();
    let t = std::thread::spawn(move || direction(c2, s2, delay, &up.to_upstream));
    direction(server, client, delay, &counts.from_upstream);
    let _ = t.join();
    Ok(())
}

/// Moves bytes from `from` to `to`, each chunk `delay` after it was read.
fn direction(from: TcpStream, to: TcpStream, delay: Duration, count: &AtomicU64) {
    let (tx, rx) = sync_channel::<Stamped>(QUEUE);
    let Ok(from2) = from.try_clone() else { return };
    let reader = std::thread::spawn(move || read_stamped(from2, delay, tx));
    write_when_due(&to, &rx, count);
    // The writer is done (end of stream or a failed write): make sure the
    // reader, perhaps blocked on a read or a full queue, ends too.
    drop(rx);
    let _ = from.shutdown(Shutdown::Read);
    let _ = reader.join();
}

fn read_stamped(mut from: TcpStream, delay: Duration, tx: SyncSender<Stamped>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(Some((Instant::now() + delay, buf[..n].to_vec()))).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(None);
}

fn write_when_due(mut to: &TcpStream, rx: &Receiver<Stamped>, count: &AtomicU64) {
    precise_sleeps();
    while let Ok(Some((due, chunk))) = rx.recv() {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&chunk).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    // End of stream (or the reader failed): pass the half-close on.
    let _ = to.shutdown(Shutdown::Write);
}

/// Asks the kernel to wake this thread on time: the default timer slack
/// (50 us) on each of the two sleeps of a round trip added about 10% to a
/// 2 ms RTT.
fn precise_sleeps() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes a plain integer and only
    // changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Rewrites `path` whenever the counts changed, at most every 50 ms.
fn write_stats(path: &PathBuf, counts: &Counts) {
    let tmp = path.with_extension("tmp");
    let mut last = String::new();
    loop {
        let now = counts.json();
        if now != last && std::fs::write(&tmp, &now).is_ok() && std::fs::rename(&tmp, path).is_ok() {
            last = now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes pass unchanged and in order both ways, are counted, and a
    /// half-close reaches the other side (`cargo test --example delay_proxy`).
    #[test]
    fn forwards_every_byte_both_ways_and_the_half_close() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = echo.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut c, _) = echo.accept().unwrap();
            let mut back = c.try_clone().unwrap();
            std::io::copy(&mut c, &mut back).unwrap();
            back.shutdown(Shutdown::Write).unwrap();
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let c2 = counts.clone();
        std::thread::spawn(move || serve(&listener, &upstream, Duration::from_micros(200), &c2));

        let sent: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut client = TcpStream::connect(addr).unwrap();
        let mut writer = client.try_clone().unwrap();
        let to_send = sent.clone();
        let w = std::thread::spawn(move || {
            writer.write_all(&to_send).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        // Ends only if the half-close went through the proxy, to the echo
        // and back.
        client.read_to_end(&mut got).unwrap();
        w.join().unwrap();
        assert!(got == sent, "{} bytes back of {}", got.len(), sent.len());
        assert_eq!(counts.to_upstream.load(Ordering::Relaxed), sent.len() as u64);
        assert_eq!(counts.from_upstream.load(Ordering::Relaxed), sent.len() as u64);
        assert_eq!(counts.connections.load(Ordering::Relaxed), 1);
    }
}
