//! `[server]`: the process's listeners (the worker port, the HTTP port and
//! `/metrics`), its connection limits and its lifecycle, with their checks.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// `[server]`: process lifecycle and connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// How long in-flight calls may run after SIGINT/SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Open connections at most (default 4096: a build farm's clients and
    /// workers use a few each; 2,000 at once were tested). Over it, new ones
    /// wait in the kernel's listen backlog until one closes. Lowered to half
    /// the open-file limit when that is smaller.
    pub max_connections: usize,
    /// A connection that has not sent the HTTP/2 preface by then is closed
    /// (default 10s: a client sends it at once; this only frees the sockets
    /// of scanners and clients that hang).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection from which nothing was read for this long is closed
    /// (default 5m). Live peers answer keepalive pings, so with keepalive on
    /// only peers that stopped responding reach it; with keepalive off, a
    /// long silent Execute stream does too. Must exceed keepalive_interval +
    /// keepalive_timeout.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams (calls) open at once on one connection (default 1000:
    /// above Bazel's and the wrapper's parallelism on one channel, including
    /// long Execute streams; bounds one connection's share of the server).
    /// Clients queue further calls themselves.
    pub max_concurrent_streams: u32,
    /// Silence after which the server pings a connection (default 30s, the
    /// common gRPC choice); "0s" turns pings off.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A ping unanswered for this long closes the connection: its peer is
    /// gone (default 20s, as hyper's).
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Serve the worker protocol only on this IP:PORT, not on the public
    /// listener, so the port that hands out commands is not the clients'.
    pub worker_listen: Option<String>,
    /// The HTTP listener (status pages, `/metrics`, `/healthz`, `/readyz`):
    /// IP:PORT, or "" for none. Unset: 127.0.0.1:8981, skipped with a
    /// warning when that port is taken (a second server on one machine).
    pub http_listen: Option<String>,
    /// The address people reach the HTTP listener at, for the links the
    /// server hands out (ExecuteResponse.message), e.g.
    /// "https://distbuild.example.com". Default: from `http_listen`.
    pub http_url: Option<String>,
    /// Also serve `/metrics` alone, without authentication, on this
    /// IP:PORT (a Prometheus scraper that holds no token).
    pub metrics_listen: Option<String>,
    /// Record metrics (default true); false turns every counter into a
    /// no-op (the benchmarks compare both).
    pub metrics: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            shutdown_grace: Duration::from_secs(30),
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_concurrent_streams: 1000,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            worker_listen: None,
            http_listen: None,
            http_url: None,
            metrics_listen: None,
            metrics: true,
        }
    }
}

impl ServerSection {
    /// The connection keys, validated.
    pub(super) fn connection_limits(&self) -> anyhow::Result<crate::server::ConnectionLimits> {
        if self.max_connections == 0 || self.max_concurrent_streams == 0 {
            bail!("[server] max_connections and max_concurrent_streams must be at least 1");
        }
        if self.handshake_timeout.is_zero() || self.keepalive_timeout.is_zero() {
            bail!("[server] handshake_timeout and keepalive_timeout must be above zero");
        }
        let keepalive = (!self.keepalive_interval.is_zero()).then_some(self.keepalive_interval);
        if self.idle_timeout <= keepalive.map_or(Duration::ZERO, |i| i + self.keepalive_timeout) {
            bail!("[server] idle_timeout must exceed keepalive_interval + keepalive_timeout");
        }
        Ok(crate::server::ConnectionLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
            max_concurrent_streams: self.max_concurrent_streams,
            keepalive_interval: keepalive,
            keepalive_timeout: self.keepalive_timeout,
        })
    }
}

/// The HTTP listener's settings, validated.
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// `None`: no HTTP listener.
    pub listen: Option<SocketAddr>,
    /// Whether the operator chose `listen` (then failing to bind it is an
    /// error); the built-in default is skipped with a warning instead.
    pub explicit: bool,
    /// The base of the links the server hands out, without a trailing `/`.
    pub url: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub metrics: bool,
}

/// The HTTP listener's address when `[server] http_listen` is unset.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8981";

impl ServerSection {
    /// `worker_listen`, parsed.
    pub(super) fn worker_listen(&self) -> anyhow::Result<Option<SocketAddr>> {
        match &self.worker_listen {
            Some(a) => {
                Ok(Some(a.parse().with_context(|| format!("[server] worker_listen {a:?} is not an IP:PORT address"))?))
            }
            None => Ok(None),
        }
    }

    /// The HTTP listener's keys, validated.
    pub(super) fn http(&self) -> anyhow::Result<HttpConfig> {
        let parse = |key: &str, a: &str| -> anyhow::Result<SocketAddr> {
            a.parse().with_context(|| format!("[server] {key} {a:?} is not an IP:PORT address"))
        };
        let (listen, explicit) = match self.http_listen.as_deref() {
            None => (Some(DEFAULT_HTTP_ADDR.parse()?), false),
            Some("") => (None, true),
            Some(a) => (Some(parse("http_listen", a)?), true),
        };
        let url = match self.http_url.as_deref() {
            None | Some("") => None,
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                Some(u.trim_end_matches('/').to_string())
            }
            Some(u) => bail!("[server] http_url {u:?} must start with http:// or https://"),
        };
        let metrics_listen = match self.metrics_listen.as_deref() {
            None | Some("") => None,
            Some(a) => Some(parse("metrics_listen", a)?),
        };
        Ok(HttpConfig { listen, explicit, url, metrics_listen, metrics: self.metrics })
    }
}
