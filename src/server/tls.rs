//! TLS for the server's listeners: rustls with the ring provider (no
//! OpenSSL), a certificate and key from PEM files, and optionally client
//! certificates verified against a CA file (mTLS).
//!
//! The files are reloaded without dropping connections: on SIGHUP, and when
//! their modification time, size or inode change (checked every
//! [`POLL_PERIOD`]). Each accepted connection takes the configuration in
//! effect at its accept, so new connections get the new certificate while
//! established ones keep the session they negotiated. A reload that fails
//! (a missing file, a key that does not match its certificate, a
//! half-written PEM) keeps the previous configuration and logs a warning;
//! the next change to the files is tried again.
//!
//! What is swapped is the whole rustls `ServerConfig`, not a certificate
//! resolver and a client verifier separately: one swap replaces the
//! certificate, its key and the client CA together, so no connection can
//! see a new certificate with an old CA, and rustls' own checks (the key
//! matches the certificate) run on every reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use parking_lot::{Mutex, RwLock};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_util::sync::CancellationToken;

/// How often the files' metadata is checked for a change.
pub const POLL_PERIOD: Duration = Duration::from_secs(2);

/// `[tls]`, resolved: the files the server's TLS is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse connections without a client certificate.
    /// When false, a client may connect without one (it then has no
    /// certificate identity), but a certificate it does present must verify.
    pub require_client_cert: bool,
}

/// The server's TLS configuration, reloadable while connections are open.
/// Shared by every listener of a server (the public one and a separate
/// worker listener use the same certificate).
pub struct ServerTls {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' metadata when they were last read (successfully or not).
    seen: Mutex<Vec<Option<FileStamp>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// What tells a replaced file from the one read before.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl ServerTls {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn new(settings: TlsSettings) -> anyhow::Result<Arc<ServerTls>> {
        let seen = stamps(&settings);
        let config = build(&settings)?;
        Ok(Arc::new(ServerTls { settings, current: RwLock::new(config), seen: Mutex::new(seen) }))
    }

    /// Whether client certificates are verified.
    pub fn mtls(&self) -> bool {
        self.settings.client_ca.is_some()
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The acceptor for one new connection: the configuration in effect now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }

    /// Re-reads the files. On failure the configuration in effect stays and
    /// the error is returned (and logged).
    pub fn reload(&self) -> anyhow::Result<()> {
        *self.seen.lock() = stamps(&self.settings);
        match build(&self.settings) {
            Ok(config) => {
                *self.current.write() = config;
                tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "TLS files not reloaded; keeping the previous ones");
                Err(e)
            }
        }
    }

    /// Reloads when a file changed since it was last read.
    pub fn reload_if_changed(&self) {
        if stamps(&self.settings) != *self.seen.lock() {
            let _ = self.reload();
        }
    }

    /// Reloads on SIGHUP and on file changes until `stop`.
    pub fn watch(self: &Arc<Self>, stop: CancellationToken) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup())?;
        let on_signal = self.clone();
        let stop_signal = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    received = hangup.recv() => {
                        if received.is_none() {
                            return;
                        }
                        tracing::info!("SIGHUP: reloading the TLS files");
                        let _ = on_signal.reload();
                    }
                    () = stop_signal.cancelled() => return,
                }
            }
        });
        let polled = self.clone();
        crate::upkeep::every(POLL_PERIOD, stop, move || polled.reload_if_changed());
        Ok(())
    }
}

/// The metadata of each file (`None`: unreadable now).
fn stamps(settings: &TlsSettings) -> Vec<Option<FileStamp>> {
    use std::os::unix::fs::MetadataExt;
    let files = [Some(&settings.cert), Some(&settings.key), settings.client_ca.as_ref()];
    files
        .into_iter()
        .flatten()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some(FileStamp { modified: meta.modified().ok(), len: meta.len(), ino: meta.ino() })
        })
        .collect()
}

/// The rustls configuration the files describe, with ALPN `h2` (gRPC
/// clients such as Bazel's Netty refuse a TLS server that does not offer it).
fn build(settings: &TlsSettings) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&settings.cert, "[tls] cert")?;
    let key = PrivateKeyDer::from_pem_file(&settings.key)
        .map_err(|e| anyhow::anyhow!("[tls] key {}: no usable private key: {e}", settings.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &settings.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "[tls] client_ca")? {
                roots.add(cert).with_context(|| format!("[tls] client_ca {}", ca.display()))?;
            }
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !settings.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().with_context(|| format!("[tls] client_ca {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .with_context(|| format!("[tls] cert {} with key {}", settings.cert.display(), settings.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path, key: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{key} {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{key} {}: no PEM certificate in the file", path.display());
    }
    Ok(certs)
}
