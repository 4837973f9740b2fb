//! Container benchmark: a real server process on loopback whose built-in
//! worker runs containers (`[worker] docker = true`), measured from a client
//! in this process. Run it through `scripts/bench-container.sh`.
//!
//! Modes:
//! - `latency IMAGE [ITERATIONS=100]`: uncached Execute round trips of
//!   `true` in an empty input root, alternating an action in the host
//!   sandbox and one naming `container-image=IMAGE`, so both see the same
//!   machine at the same time; prints p50/p90/p99 of each and the
//!   container's overhead.
//! - `first IMAGE`: a fresh server (its worker has seen no image yet): the
//!   first container action's round trip, then the second's. With an IMAGE
//!   the engine does not have, the first one includes the pull.
//!
//! Every answer is checked (OK status, exit code 0, not cached).
//!
//! Usage: container_bench SERVER_BINARY latency IMAGE [ITERATIONS]
//!        container_bench SERVER_BINARY first IMAGE

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use remote_apis::client::CasClient;
use remote_apis::longrunning::operation;
use remote_apis::reapi;
use remote_apis::reapi::execution_client::ExecutionClient;
use remote_apis::{Digest, DigestFunction, InstanceName};
use tonic::transport::Channel;

const USAGE: &str = "usage: container_bench SERVER_BINARY (latency IMAGE [ITERATIONS] | first IMAGE)";

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server binary with one built-in worker slot that runs containers.
fn start_server(binary: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[worker]\ndocker = true\ncapacity = 1\n").unwrap();
    let child = Command::new(binary)
        .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path().join("data"))
        .env("DISTBUILD_CONFIG", &config)
        .env("DISTBUILD_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the server binary");
    Server { child, _dir: dir, url: format!("grpc://127.0.0.1:{port}") }
}

async fn connect(server: &mut Server) -> Channel {
    let endpoint = remote_apis::client::endpoint(&server.url).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(channel) = endpoint.connect().await {
            return channel;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("the server exited while starting: {status}");
        }
        assert!(Instant::now() < deadline, "the server did not start");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn blob(message: &impl Message) -> (Digest, Bytes) {
    let bytes = Bytes::from(message.encode_to_vec());
    (DigestFunction::Sha256.digest_of(&bytes), bytes)
}

struct Client {
    cas: CasClient,
    exec: ExecutionClient<Channel>,
    command: Digest,
    input_root: Digest,
    salt: u64,
}

impl Client {
    async fn new(channel: Channel) -> Client {
        let cas = CasClient::new(channel.clone(), InstanceName::default());
        let command = reapi::Command {
            arguments: vec!["true".into()],
            environment_variables: vec![reapi::command::EnvironmentVariable {
                name: "PATH".into(),
                value: "/usr/bin:/bin".into(),
            }],
            ..Default::default()
        };
        let (command, command_blob) = blob(&command);
        let (input_root, root_blob) = blob(&reapi::Directory::default());
        cas.upload_blobs(vec![(command, command_blob), (input_root, root_blob)]).await.unwrap();
        let salt = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        Client { cas, exec: ExecutionClient::new(channel), command, input_root, salt }
    }

    /// Uploads a fresh (uncached) action, naming `image` if given.
    async fn action(&mut self, image: Option<&str>) -> Digest {
        self.salt += 1;
        let platform = image.map(|i| reapi::Platform {
            properties: vec![reapi::platform::Property { name: "container-image".into(), value: i.into() }],
        });
        let (digest, bytes) = blob(&reapi::Action {
            command_digest: Some(self.command.to_proto()),
            input_root_digest: Some(self.input_root.to_proto()),
            salt: self.salt.to_le_bytes().to_vec(),
            do_not_cache: true,
            platform,
            ..Default::default()
        });
        self.cas.upload_blobs(vec![(digest, bytes)]).await.unwrap();
        digest
    }

    /// One Execute round trip of `action`, checked.
    async fn execute(&self, action: Digest) -> Duration {
        let request = reapi::ExecuteRequest {
            action_digest: Some(action.to_proto()),
            digest_function: DigestFunction::Sha256.to_proto() as i32,
            ..Default::default()
        };
        let started = Instant::now();
        let mut stream = self.exec.clone().execute(request).await.unwrap().into_inner();
        let mut done = None;
        while let Some(op) = stream.message().await.unwrap() {
            if op.done {
                done = Some(op);
            }
        }
        let elapsed = started.elapsed();
        let response = match done.and_then(|op| op.result) {
            Some(operation::Result::Response(any)) => reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap(),
            other => panic!("Execute of {action} did not finish with a response: {other:?}"),
        };
        if let Some(s) = &response.status {
            assert_eq!(s.code, 0, "Execute of {action} failed: {}", s.message);
        }
        assert!(!response.cached_result);
        assert_eq!(response.result.map(|r| r.exit_code), Some(0), "`true` failed");
        elapsed
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(what: &str, samples: &mut [Duration]) -> Duration {
    samples.sort();
    let p50 = percentile(samples, 0.5);
    println!(
        "| {what:<46} | {:>8.1} | {:>8.1} | {:>8.1} | {:>8.1} |",
        ms(p50),
        ms(percentile(samples, 0.9)),
        ms(percentile(samples, 0.99)),
        ms(samples[samples.len() - 1])
    );
    p50
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (binary, mode, image) = match args.as_slice() {
        [_, b, m, i, ..] => (b.as_str(), m.as_str(), i.as_str()),
        _ => panic!("{USAGE}"),
    };
    let mut server = start_server(binary);
    let channel = connect(&mut server).await;
    let mut client = Client::new(channel).await;
    match mode {
        "latency" => {
            let n: usize = args.get(4).map(|s| s.parse().expect(USAGE)).unwrap_or(100);
            // Warm-up: the worker inspects the image once.
            for _ in 0..3 {
                let a = client.action(Some(image)).await;
                client.execute(a).await;
                let a = client.action(None).await;
                client.execute(a).await;
            }
            let (mut host, mut container) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for _ in 0..n {
                let a = client.action(None).await;
                host.push(client.execute(a).await);
                let a = client.action(Some(image)).await;
                container.push(client.execute(a).await);
            }
            println!("Uncached Execute of `true`, {n} of each, alternating (ms):\n");
            println!("| {:<46} | {:>8} | {:>8} | {:>8} | {:>8} |", "runner", "p50", "p90", "p99", "max");
            println!("|{:-<48}|{:->10}|{:->10}|{:->10}|{:->10}|", "", "", "", "", "");
            let h = row("host sandbox (namespaces)", &mut host);
            let c = row(&format!("container ({image})"), &mut container);
            println!("\ncontainer overhead at p50: {:.1} ms", ms(c.saturating_sub(h)));
        }
        "first" => {
            let a = client.action(Some(image)).await;
            let first = client.execute(a).await;
            let a = client.action(Some(image)).await;
            let second = client.execute(a).await;
            println!("first container action on a fresh worker ({image}): {:.1} ms", ms(first));
            println!("the second one:                                   {:.1} ms", ms(second));
        }
        _ => panic!("{USAGE}"),
    }
}
