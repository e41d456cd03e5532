//! TLS for the `listen` address (`listen-tls-cert`, `listen-tls-key`): rustls with the
//! aws-lc-rs provider reqwest already brings, HTTP/1.1 over it. The certificate and key are read
//! at start (a bad pair stops the daemon) and again on SIGHUP, when a bad pair is logged and the
//! old one kept: a renewal that went wrong does not take the cache and registry down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// The current certificate, swapped on reload.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    config: RwLock<Arc<ServerConfig>>,
}

fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read '{}' (listen-tls-cert)", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("'{}' (listen-tls-cert) is not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "'{}' (listen-tls-cert) holds no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("'{}' (listen-tls-key) is not a PEM private key", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the listen-tls-key does not fit the listen-tls-cert")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Tls {
    pub fn new(cert: &Path, key: &Path) -> anyhow::Result<Tls> {
        let config = load(cert, key)?;
        Ok(Tls { cert: cert.to_owned(), key: key.to_owned(), config: RwLock::new(config) })
    }

    /// Reads the files again; keeps the old pair if the new one is bad.
    pub fn reload(&self) {
        match load(&self.cert, &self.key) {
            Ok(c) => {
                *self.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = c;
                tracing::info!(cert = %self.cert.display(), "listen: TLS certificate reloaded");
            }
            Err(e) => tracing::warn!("listen: TLS certificate not reloaded, the old one stays: {e:#}"),
        }
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// Reloads `tls` on every SIGHUP, for the daemon's lifetime.
pub fn reload_on_sighup(tls: Arc<Tls>) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let t = tls.clone();
            let _ = tokio::task::spawn_blocking(move || t.reload()).await;
        }
    });
    Ok(())
}
