//! The link to Redis, standalone or cluster, behind one type; and the
//! translation of Redis failures into the server's error codes.
//!
//! Both kinds of connection reconnect on their own (the standalone one is a
//! `ConnectionManager`, the cluster one re-reads the slot map), so a store
//! opened once survives the engine going away and coming back. What this
//! layer adds: every request is bounded by the configured timeout as a
//! whole, a request that failed because the connection dropped is tried
//! once more on the fresh connection (every request this store sends is
//! idempotent), and every error names the store and the address, never a
//! password.

use std::future::Future;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    Client, Cmd, ConnectionInfo, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Value,
};
use tonic::Code;

use crate::error::{Error, Result};

/// Reconnection attempts within one request before it fails: the request's
/// own timeout bounds the wait anyway, and a client retries later.
const RECONNECT_RETRIES: usize = 2;

/// Longest pause between two reconnection attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// Either kind of connection, usable wherever the crate wants a connection.
#[derive(Clone)]
enum Kind {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Kind {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Kind::Single(c) => c.req_packed_command(cmd),
            Kind::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Kind::Single(c) => c.req_packed_commands(cmd, offset, count),
            Kind::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Kind::Single(c) => c.get_db(),
            Kind::Cluster(c) => c.get_db(),
        }
    }
}

/// An open, self-healing connection to the engine, and what error messages
/// say about it.
#[derive(Clone)]
pub(super) struct Link {
    kind: Kind,
    /// `host:port` (or the cluster's seed nodes), without credentials.
    addr: String,
    timeout: Duration,
}

impl Link {
    /// Connects to a standalone server and checks that it answers PING.
    pub(super) async fn single(info: ConnectionInfo, timeout: Duration) -> Result<Link> {
        let addr = info.addr().to_string();
        let failed = |e: RedisError| connect_error(&addr, e);
        let client = Client::open(info).map_err(failed)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let manager = tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| {
                Error::new(Code::Unavailable, format!("redis store at {addr}: no connection within {timeout:?}"))
            })?
            .map_err(failed)?;
        Link { kind: Kind::Single(manager), addr, timeout }.ping().await
    }

    /// Connects to a cluster through its seed nodes and checks that it
    /// answers PING.
    pub(super) async fn cluster(nodes: Vec<ConnectionInfo>, timeout: Duration) -> Result<Link> {
        let addr = nodes.iter().map(|n| n.addr().to_string()).collect::<Vec<_>>().join(",");
        let failed = |e: RedisError| connect_error(&addr, e);
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(RECONNECT_RETRIES as u32)
            .max_retry_wait(RECONNECT_MAX_DELAY.as_millis() as u64)
            .build()
            .map_err(failed)?;
        let conn = tokio::time::timeout(timeout, client.get_async_connection())
            .await
            .map_err(|_| {
                Error::new(
                    Code::Unavailable,
                    format!("redis cluster store at {addr}: no connection within {timeout:?}"),
                )
            })?
            .map_err(failed)?;
        Link { kind: Kind::Cluster(conn), addr, timeout }.ping().await
    }

    async fn ping(self) -> Result<Link> {
        let pong: String = self.cmd("answering PING", &::redis::cmd("PING")).await?;
        if pong != "PONG" {
            return Err(Error::new(Code::Unavailable, format!("{}: PING answered {pong:?}", self.name())));
        }
        Ok(self)
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// How messages name this store: kind and address.
    pub(super) fn name(&self) -> String {
        match self.kind {
            Kind::Single(_) => format!("redis store at {}", self.addr),
            Kind::Cluster(_) => format!("redis cluster store at {}", self.addr),
        }
    }

    /// Runs one command; `what` says what it was for, in error messages.
    pub(super) async fn cmd<T: FromRedisValue>(&self, what: &str, cmd: &Cmd) -> Result<T> {
        self.attempt(what, |mut conn| async move { cmd.query_async(&mut conn).await }).await
    }

    /// Runs a pipeline (a transaction when built `atomic()`).
    pub(super) async fn pipe<T: FromRedisValue>(&self, what: &str, pipe: &Pipeline) -> Result<T> {
        self.attempt(what, |mut conn| async move { pipe.query_async(&mut conn).await }).await
    }

    /// Runs `request`, once more if the connection had dropped (the first
    /// failure makes the connection reconnect; the second try waits for
    /// that), all within the timeout.
    async fn attempt<T, F, Fut>(&self, what: &str, request: F) -> Result<T>
    where
        F: Fn(Kind) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let tries = async {
            match request(self.kind.clone()).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => request(self.kind.clone()).await,
                other => other,
            }
        };
        match tokio::time::timeout(self.timeout, tries).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.error(what, &e)),
            Err(_) => Err(Error::new(
                Code::Unavailable,
                format!("{}: {what}: no answer within {:?}", self.name(), self.timeout),
            )),
        }
    }

    /// The server's error for a failed request.
    fn error(&self, what: &str, e: &RedisError) -> Error {
        classify(&format!("{}: {what}", self.name()), e)
    }
}

fn connect_error(addr: &str, e: RedisError) -> Error {
    classify(&format!("redis store at {addr}: connecting"), &e)
}

/// Out of memory is the operator's to fix (and says how); an engine that is
/// down, loading, failing over or refusing our credentials is UNAVAILABLE;
/// anything else is a bug on one side or the other.
fn classify(context: &str, e: &RedisError) -> Error {
    if e.code() == Some("OOM") {
        return Error::resource_exhausted(format!(
            "{context}: Redis is out of memory ({e}); set `maxmemory-policy allkeys-lru` on the Redis server so \
             it evicts old entries instead of refusing writes"
        ));
    }
    if is_auth(e) {
        return Error::new(
            Code::Unavailable,
            format!("{context}: Redis refused our credentials ({e}); check the password"),
        );
    }
    if is_unavailable(e) {
        return Error::new(Code::Unavailable, format!("{context}: {e}"));
    }
    Error::internal(format!("{context}: {e}"))
}

fn is_auth(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
}

fn is_unavailable(e: &RedisError) -> bool {
    use ::redis::ServerErrorKind as S;
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(S::BusyLoading | S::MasterDown | S::TryAgain | S::ClusterDown)
        )
}
