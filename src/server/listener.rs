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
//! - With TLS, the TLS handshake happens here too, within the same
//!   `handshake_timeout` (counted from the accept, so TLS and the HTTP/2
//!   preface share it) and while holding the connection's slot.
//!   Handshakes run concurrently, so a slow client delays no other. The
//!   preface and idle clocks then run on the decrypted stream.
//! - Every connection carries a [`ConnInfo`]: the client's address and,
//!   when its certificate verified, the names in it. tonic puts it in the
//!   extensions of each request (read them with [`peer`](super::peer)).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;

/// What TLS runs over: the socket behind a read buffer. rustls reads at
/// most 4 KiB per call into its record buffer (and shrinks that buffer
/// whenever it empties), which on a bulk upload is a system call and a
/// reallocation per 4 KiB; the buffer turns those into one read per
/// [`TLS_READ_BUFFER`] and a memcpy.
type TlsIo = tokio::io::BufReader<TcpStream>;

/// Bytes read from a TLS connection's socket at once.
const TLS_READ_BUFFER: usize = 256 << 10;
use tonic::transport::server::Connected;

use super::peer::{ConnInfo, PeerIdentity, names_of_certificate};
use super::tls::ServerTls;

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
/// once (including those still in their TLS handshake), each closed by the
/// handshake and idle timeouts; with `tls`, the ones whose TLS handshake
/// succeeded. Never yields an error: accept errors are logged and retried
/// with a backoff, failed handshakes logged at debug level and dropped.
/// Several listeners may share one `tls`.
pub fn incoming(
    listener: TcpListener,
    limits: &ConnectionLimits,
    tls: Option<Arc<ServerTls>>,
) -> impl Stream<Item = io::Result<Conn>> + use<> {
    let acceptor = Acceptor {
        listener,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        handshake_timeout: limits.handshake_timeout,
        backoff: None,
        last_log: None,
        unlogged: 0,
    };
    let idle = limits.idle_timeout;
    let accepted = futures::stream::unfold(acceptor, |mut a| async move {
        let accepted = a.next().await;
        Some((accepted, a))
    });
    // Each handshake is its own future, polled beside the accept loop; the
    // slots bound how many there are.
    accepted
        .map(move |accepted| handshake(accepted, tls.clone(), idle))
        .buffer_unordered(limits.max_connections.max(1))
        .filter_map(|conn| std::future::ready(conn.map(Ok)))
}

/// A TCP connection before its TLS handshake.
struct Accepted {
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    /// When the handshake (TLS and the HTTP/2 preface) must be done.
    deadline: Instant,
}

/// The TLS handshake (if any) within the handshake deadline, and the
/// connection's [`ConnInfo`].
async fn handshake(accepted: Accepted, tls: Option<Arc<ServerTls>>, idle: Duration) -> Option<Conn> {
    let Accepted { stream, slot, deadline } = accepted;
    let remote = stream.peer_addr().ok();
    let Some(tls) = tls else {
        let info = ConnInfo { remote, peer: None };
        return Some(Conn::new(Io::Plain(stream), info, slot, deadline, idle));
    };
    let accepting = tls.acceptor().accept(TlsIo::with_capacity(TLS_READ_BUFFER, stream));
    let stream = match tokio::time::timeout_at(deadline, accepting).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(peer = ?remote, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = ?remote, "no TLS handshake within the handshake timeout");
            return None;
        }
    };
    let peer = peer_identity(&stream, remote)?;
    let info = ConnInfo { remote, peer: peer.map(Arc::new) };
    Some(Conn::new(Io::Tls(Box::new(stream)), info, slot, deadline, idle))
}

/// The names of a client certificate that verified (rustls has checked it
/// against the CA before the handshake completes). `None` drops the
/// connection: a certificate that verified but cannot be parsed for names
/// must not pass as anonymous.
fn peer_identity(stream: &TlsStream<TlsIo>, remote: Option<std::net::SocketAddr>) -> Option<Option<PeerIdentity>> {
    let Some(leaf) = stream.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return Some(None);
    };
    match names_of_certificate(leaf) {
        Ok(identity) => Some(Some(identity)),
        Err(e) => {
            tracing::warn!(peer = ?remote, error = %e, "dropping a connection whose client certificate has no readable names");
            None
        }
    }
}

struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    handshake_timeout: Duration,
    /// The current pause after errors; `None` after a success.
    backoff: Option<Duration>,
    last_log: Option<Instant>,
    /// Errors not logged since the last line (rate limit).
    unlogged: u64,
}

impl Acceptor {
    /// Waits for a free slot, then for a connection.
    async fn next(&mut self) -> Accepted {
        // The semaphore is never closed.
        let permit = self.slots.clone().acquire_owned().await.expect("connection semaphore closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    self.backoff = None;
                    // Without it, small responses wait for delayed ACKs (~40 ms).
                    let _ = stream.set_nodelay(true);
                    let deadline = Instant::now() + self.handshake_timeout;
                    return Accepted { stream, slot: permit, deadline };
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

/// The byte stream of a connection: plain TCP or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TlsIo>>),
}

/// An accepted connection: holds its slot, and fails its reads (so hyper
/// closes it) when the preface does not arrive within the handshake
/// timeout or nothing was read for the idle timeout.
pub struct Conn {
    stream: Io,
    info: ConnInfo,
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
    fn new(stream: Io, info: ConnInfo, slot: OwnedSemaphorePermit, handshake_until: Instant, idle: Duration) -> Self {
        Conn {
            stream,
            info,
            _slot: slot,
            preface_left: PREFACE_LEN,
            idle_timeout: idle,
            last_read: Instant::now(),
            deadline: Box::pin(tokio::time::sleep_until(handshake_until)),
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
                tracing::debug!(peer = ?self.info.remote, error = %e, "closing connection");
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
        match &self.stream {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    /// What tonic puts in each request's extensions.
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Dispatches to the plain or TLS stream.
macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
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
