//! The HTTP listener beside gRPC: `/healthz`, `/readyz`, `/metrics` and the
//! status pages, on `[server] http_listen`.
//!
//! It reuses the gRPC listener's connection handling ([`incoming`]: limits,
//! timeouts, TLS with the same certificate) and the same authentication: a
//! bearer token, a browser's Basic credentials (the password is the token),
//! or a verified client certificate. With authentication configured, every
//! path but the health probes needs the `status` grant (or `admin`, which
//! implies it) on every instance, since the pages show the whole farm;
//! actions that change something (drain buttons) need `admin` and come from
//! a form on this listener's own pages (cross-site requests are refused).
//!
//! Invariant: no page, header or log line shows a token.

pub mod pages;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use futures::{Stream, StreamExt};
use remote_apis::InstanceName;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ac::AcStore;
use crate::auth::{Auth, Grant};
use crate::error::Error;
use crate::execution::Scheduler;
use crate::server::peer::ConnInfo;
use crate::server::tls::ServerTls;
use crate::server::{ConnectionLimits, incoming};
use crate::store::Store;

/// What the handlers read: the server's parts, shared with gRPC.
pub struct HttpState {
    pub scheduler: Arc<Scheduler>,
    pub cas: Store,
    pub ac: Arc<dyn AcStore>,
    pub auth: Arc<Auth>,
    /// Where people reach this listener, for links (no trailing `/`).
    pub base_url: String,
    pub started: Instant,
    /// Cancelled when the server begins shutting down: `/readyz` then says
    /// so, and load balancers stop sending new work.
    pub closing: CancellationToken,
    /// `None` with `[server] metrics = false`: `/metrics` is then 404.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// What the authentication layer learned about the caller, in each
/// request's extensions: pages show admin controls only to admins.
#[derive(Debug, Clone, Copy)]
pub struct Viewer {
    pub admin: bool,
}

/// The router of the HTTP listener.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(pages::routes())
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Serves `router` on `listener` until `stop` is cancelled (the returned
/// future). Connections go through the same limits and TLS as the gRPC
/// listener.
pub fn serve(
    listener: TcpListener,
    limits: &ConnectionLimits,
    tls: Option<Arc<ServerTls>>,
    router: Router,
    stop: CancellationToken,
) -> io::Result<impl Future<Output = io::Result<()>> + Send + 'static> {
    let local = listener.local_addr()?;
    let conns = Incoming { local, conns: Box::pin(incoming(listener, limits, tls)) };
    Ok(axum::serve(conns, router.into_make_service_with_connect_info::<ConnInfo>())
        .with_graceful_shutdown(stop.cancelled_owned())
        .into_future())
}

/// Binds the HTTP listener of `config`: `None` when it is off, or when the
/// built-in default address is taken (a second server on one machine),
/// which is a warning, not an error; an address the operator chose must
/// bind.
pub async fn bind(config: &crate::config::HttpConfig) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = config.listen else { return Ok(None) };
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if !config.explicit && e.kind() == io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, "the status pages and /metrics are off: the default address is in use; set [server] http_listen");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("[server] http_listen: binding {addr}")),
    }
}

/// The base of the links the server hands out: `[server] http_url`, or the
/// listener's own address (the host's name in place of 0.0.0.0).
pub fn base_url(configured: Option<&str>, bound: SocketAddr, tls: bool) -> String {
    if let Some(url) = configured {
        return url.to_string();
    }
    let scheme = if tls { "https" } else { "http" };
    let host = if bound.ip().is_unspecified() {
        crate::worker::remote::default_name()
    } else if bound.is_ipv6() {
        format!("[{}]", bound.ip())
    } else {
        bound.ip().to_string()
    };
    format!("{scheme}://{host}:{}", bound.port())
}

/// The accepted connections, as axum's listener.
struct Incoming {
    local: SocketAddr,
    conns: Pin<Box<dyn Stream<Item = io::Result<crate::server::Conn>> + Send>>,
}

impl axum::serve::Listener for Incoming {
    type Io = crate::server::Conn;
    type Addr = ConnInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // `incoming` never ends and logs its own errors.
            match self.conns.next().await {
                Some(Ok(conn)) => {
                    let info = tonic::transport::server::Connected::connect_info(&conn);
                    return (conn, info);
                }
                Some(Err(_)) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<ConnInfo> {
        Ok(ConnInfo { remote: Some(self.local), peer: None })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>> for ConnInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Live: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Prometheus metrics (the `status` grant, like the pages).
async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    crate::metrics::http::respond(state.metrics.as_deref(), &headers).await
}

/// How long `/readyz` waits for the storage to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Ready: not shutting down, the storage answers a lookup, and the
/// scheduler's state answers (it is in memory today: a lock that is not
/// stuck).
async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    if state.closing.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let probe = remote_apis::DigestFunction::Sha256.digest_of(b"distbuild readiness probe");
    match tokio::time::timeout(READY_TIMEOUT, state.cas.find_missing(&[probe])).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return (StatusCode::SERVICE_UNAVAILABLE, format!("storage: {e}\n")).into_response(),
        Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "storage: no answer within 5s\n").into_response(),
    }
    let status = match state.scheduler.status().await {
        Ok(status) => status,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("scheduler: {e}\n")).into_response(),
    };
    format!("ok: {} workers, {} operations\n", status.workers.len(), status.operations).into_response()
}

/// The authentication layer of every path (unknown ones too, so a 404
/// tells an anonymous caller nothing) but the health probes.
async fn authenticate(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    mut request: Request,
    next: Next,
) -> Response {
    // Probes carry no credentials.
    if matches!(request.uri().path(), "/healthz" | "/readyz") {
        return next.run(request).await;
    }
    let viewer = match viewer(&state.auth, request.headers(), &conn) {
        Ok(v) => v,
        Err(e) => return refusal(&e),
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if !viewer.admin {
            let e = Error::new(tonic::Code::PermissionDenied, "changing the farm needs the admin grant");
            return refusal(&e);
        }
        if cross_site(request.headers()) {
            return (StatusCode::FORBIDDEN, "cross-site requests are refused\n").into_response();
        }
    }
    request.extensions_mut().insert(viewer);
    next.run(request).await
}

/// Who may look: the `status` grant on every instance.
fn viewer(auth: &Auth, headers: &HeaderMap, conn: &ConnInfo) -> Result<Viewer, Error> {
    // An open server ignores credentials, malformed ones too (as gRPC does).
    let headers = if auth.is_open() { HeaderMap::new() } else { bearer_headers(headers)? };
    let metadata = tonic::metadata::MetadataMap::from_headers(headers);
    let caller = auth.caller_from(&metadata, conn.peer.as_deref())?;
    let everywhere = InstanceName::default();
    let admin = caller.allows(&everywhere, Grant::Admin);
    caller.authorize(&everywhere, None, Grant::Status)?;
    Ok(Viewer { admin })
}

/// The request's credentials as gRPC would carry them: a browser's Basic
/// credentials become a bearer token (the user name is ignored).
fn bearer_headers(headers: &HeaderMap) -> Result<HeaderMap, Error> {
    let mut out = HeaderMap::new();
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(out) };
    let bad = || Error::new(tonic::Code::Unauthenticated, "malformed Basic credentials");
    let text = value.to_str().map_err(|_| bad())?;
    let value = match text.split_once(' ') {
        Some((scheme, encoded)) if scheme.eq_ignore_ascii_case("basic") => {
            let raw = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
            let pair = String::from_utf8(raw).map_err(|_| bad())?;
            let (_, token) = pair.split_once(':').ok_or_else(bad)?;
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| bad())?
        }
        _ => value.clone(),
    };
    out.insert(header::AUTHORIZATION, value);
    Ok(out)
}

/// A state-changing request that a browser marked as coming from another
/// site, or whose Origin is not this host: the form was not ours.
fn cross_site(headers: &HeaderMap) -> bool {
    if headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).is_some_and(|v| v == "cross-site") {
        return true;
    }
    let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST)) else { return false };
    let origin = origin.to_str().unwrap_or_default();
    let host = host.to_str().unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    origin_host != host
}

/// 401 (asking a browser for credentials) or 403, with the reason.
fn refusal(e: &Error) -> Response {
    match e.code {
        tonic::Code::Unauthenticated => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"cargo-distbuild\", charset=\"UTF-8\"")],
            format!("{}\n", e.message),
        )
            .into_response(),
        _ => (StatusCode::FORBIDDEN, format!("{}\n", e.message)).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_become_a_bearer_token() {
        let mut h = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("anyone:dbt_secret");
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Basic {encoded}")).unwrap());
        let out = bearer_headers(&h).unwrap();
        assert_eq!(out.get(header::AUTHORIZATION).unwrap(), "Bearer dbt_secret");
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(bearer_headers(&h).unwrap_err().code, tonic::Code::Unauthenticated);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer dbt_x"));
        assert_eq!(bearer_headers(&h).unwrap().get(header::AUTHORIZATION).unwrap(), "Bearer dbt_x");
    }

    #[test]
    fn cross_site_forms_are_recognized() {
        let mut h = HeaderMap::new();
        assert!(!cross_site(&h));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8981"));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8981"));
        assert!(!cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(cross_site(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
    }

    #[test]
    fn links_use_the_configured_url_or_the_bound_address() {
        let a: SocketAddr = "127.0.0.1:8981".parse().unwrap();
        assert_eq!(base_url(None, a, false), "http://127.0.0.1:8981");
        assert_eq!(base_url(None, a, true), "https://127.0.0.1:8981");
        assert_eq!(base_url(Some("https://d.example"), a, false), "https://d.example");
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(base_url(None, v6, false), "http://[::1]:80");
    }
}
