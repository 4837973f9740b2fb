//! Accepting connections within limits: the server's defence against
//! clients that hold sockets without using them, and against running out
//! of file descriptors.
//!
//! - The accept loop backs off (up to a second, logging at most once a
//!   second) on errors such as EMFILE instead of retrying at once: tonic's
//!   own loop retries immediately, and a server out of descriptors then
//!   spins on a pending connection it can never take.
//! - At most `max_connections` connections are open. Over the cap the
//!   server stops accepting, so new connections wait in the kernel's listen
//!   backlog and are served, in order, as soon as a slot frees. Clients see
//!   a slow connect, not an error they would have to retry, and a waiting
//!   connection costs the server no descriptor; when the backlog is full
//!   the kernel drops further SYNs and clients retry with TCP's backoff.
//!   The permit lives in the connection's IO object, so it is returned
//!   exactly when hyper drops the connection.
//! - A connection must send the HTTP/2 preface within `handshake_timeout`,
//!   and is closed when nothing was read for `idle_timeout`. A live peer
//!   answers the server's HTTP/2 keepalive pings, so a long Execute stream
//!   with nothing to say still reads bytes and stays open.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 client connection preface (RFC 9113, section 3.4): what a
/// client must send before anything else.
const PREFACE_LEN: usize = 24;

/// Longest pause of the accept loop after an error.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// First pause after an error that is not about one connection.
const MIN_BACKOFF: Duration = Duration::from_millis(10);

/// Below this many descriptors the server warns at start: each connection,
/// each open blob and each parked upload holds one.
const LOW_FD_LIMIT: u64 = 4096;

/// Connection-level limits, resolved from `[server]`.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// `None`: no keepalive pings.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
}

/// The connections of `listener`, at most `limits.max_connections` open at
/// once, each closed by the handshake and idle timeouts. Never yields an
/// error: accept errors are logged and retried with a backoff.
pub fn incoming(listener: TcpListener, limits: &ConnectionLimits) -> impl Stream<Item = io::Result<Conn>> + use<> {
    let acceptor = Acceptor {
        listener,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        handshake_timeout: limits.handshake_timeout,
        idle_timeout: limits.idle_timeout,
        backoff: None,
        last_log: None,
        unlogged: 0,
    };
    futures::stream::unfold(acceptor, |mut a| async move {
        let conn = a.next().await;
        Some((Ok(conn), a))
    })
}

struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    /// The current pause after errors; `None` after a success.
    backoff: Option<Duration>,
    last_log: Option<Instant>,
    /// Errors not logged since the last line (rate limit).
    unlogged: u64,
}

impl Acceptor {
    /// Waits for a free slot, then for a connection.
    async fn next(&mut self) -> Conn {
        // The semaphore is never closed.
        let permit = self.slots.clone().acquire_owned().await.expect("connection semaphore closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    self.backoff = None;
                    // Without it, small responses wait for delayed ACKs (~40 ms).
                    let _ = stream.set_nodelay(true);
                    return Conn::new(stream, permit, self.handshake_timeout, self.idle_timeout);
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    let pause = self.backoff.map_or(MIN_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
                    self.backoff = Some(pause);
                    self.log(&e, pause);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// At most one line a second, with the count of errors since the last.
    fn log(&mut self, e: &io::Error, pause: Duration) {
        let now = Instant::now();
        if self.last_log.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(error = %e, ?pause, repeated = self.unlogged, "cannot accept connections; backing off");
        self.last_log = Some(now);
        self.unlogged = 0;
    }
}

/// Errors about one connection (it went away before it was accepted): the
/// next accept can proceed at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
        || e.raw_os_error() == Some(libc::EPROTO)
}

/// An accepted connection: holds its slot, and fails its reads (so hyper
/// closes it) when the preface does not arrive within the handshake
/// timeout or nothing was read for the idle timeout.
pub struct Conn {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Preface bytes still expected; the handshake deadline applies until 0.
    preface_left: usize,
    idle_timeout: Duration,
    last_read: Instant,
    /// The handshake deadline, then `last_read + idle_timeout` (moved
    /// lazily: only when it fires, not on every read).
    deadline: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, handshake: Duration, idle: Duration) -> Self {
        let now = Instant::now();
        Conn {
            stream,
            _slot: slot,
            preface_left: PREFACE_LEN,
            idle_timeout: idle,
            last_read: now,
            deadline: Box::pin(tokio::time::sleep_until(now + handshake)),
        }
    }

    fn saw(&mut self, n: usize) {
        self.preface_left = self.preface_left.saturating_sub(n);
        self.last_read = Instant::now();
    }

    /// Called when I/O would block: an error once the connection is out of
    /// time (and the waker registered otherwise).
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            if self.preface_left > 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface within the handshake timeout"));
            }
            let idle_until = self.last_read + self.idle_timeout;
            if idle_until <= Instant::now() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle"));
            }
            self.deadline.as_mut().reset(idle_until);
        }
    }

    /// Turns a blocked operation into the timeout error when it is due.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.check_deadline(cx) {
            Ok(()) => Poll::Pending,
            Err(e) => {
                tracing::debug!(peer = ?self.stream.peer_addr().ok(), error = %e, "closing connection");
                Poll::Ready(Err(e))
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.saw(n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.pending(cx),
        }
    }
}

/// Writes check the deadline too: HTTP/2 stops reading while its peer does
/// not read what it was sent, and such a peer must not hold the slot.
impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    /// The TCP addresses, so `Request::remote_addr` keeps working.
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// Raises the soft limit on open files to the hard limit (a process may do
/// so without privileges) and returns the limit in effect. Warns when it is
/// low: every connection, open blob and parked upload holds a descriptor.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot read the open-file limit");
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        } else {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot raise the open-file limit");
        }
    }
    let limit = lim.rlim_cur;
    if limit < LOW_FD_LIMIT {
        tracing::warn!(
            limit,
            "the open-file limit is low: connections and uploads may run out of descriptors; raise it (ulimit -n, \
             LimitNOFILE=)"
        );
    }
    Some(limit)
}

/// The connection cap in effect: the configured one, but at most half the
/// descriptors, so connections alone cannot starve the store of files.
pub fn effective_max_connections(configured: usize, fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else { return configured };
    let half = usize::try_from(limit / 2).unwrap_or(usize::MAX).max(1);
    if configured > half {
        tracing::warn!(configured, limit, used = half, "max_connections lowered to half the open-file limit");
        return half;
    }
    configured
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cap_leaves_half_the_descriptors() {
        assert_eq!(effective_max_connections(4096, None), 4096);
        assert_eq!(effective_max_connections(4096, Some(1 << 20)), 4096);
        assert_eq!(effective_max_connections(4096, Some(1024)), 512);
        assert_eq!(effective_max_connections(10, Some(1)), 1);
    }

    #[test]
    fn per_connection_errors_do_not_back_off() {
        assert!(is_connection_error(&io::Error::from(io::ErrorKind::ConnectionAborted)));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(libc::ENFILE)));
    }
}
