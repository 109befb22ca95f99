//! One HTTP/1.1 GET to an address, with the `Host` (and, over TLS, the SNI
//! name) of the site asked for: how the real lane asks an ingress
//! controller on a loopback port for an app's host without any DNS. Over
//! TLS the served certificate is verified against the given roots only
//! (e.g. Pebble's root, whose certificates cert-manager obtained).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::control_plane::{Error, Result};

/// The roots a TLS GET trusts; nothing else (no system roots).
#[derive(Clone)]
pub struct TlsRoots {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsRoots").finish_non_exhaustive()
    }
}

impl TlsRoots {
    /// The certificates of a PEM file.
    pub fn from_pem_file(path: &Path) -> Result<Self> {
        Self::from_pem(&std::fs::read(path)?)
    }

    /// The certificates of PEM text.
    pub fn from_pem(pem: &[u8]) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Manifest(format!("PEM certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Manifest(format!("root certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Manifest("no certificate in the PEM text".into()));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Manifest(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// A response: its status code and body (as text).
pub type Response = (u16, String);

/// `GET <path>` for `host` through `address` (`ip:port`), over TLS when
/// `tls` is given (SNI and verification for `host`). `Err` says what went
/// wrong (connect, handshake, verification, a malformed answer).
pub async fn get(
    address: &str,
    host: &str,
    path: &str,
    tls: Option<&TlsRoots>,
) -> std::result::Result<Response, String> {
    let stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| format!("connecting to {address} timed out"))?
    .map_err(|e| format!("connecting to {address}: {e}"))?;
    match tls {
        None => exchange(stream, host, path).await,
        Some(roots) => {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| format!("server name {host:?}: {e}"))?;
            let stream = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_rustls::TlsConnector::from(roots.config.clone()).connect(name, stream),
            )
            .await
            .map_err(|_| format!("TLS handshake with {address} timed out"))?
            .map_err(|e| format!("TLS handshake with {address} for {host}: {e}"))?;
            exchange(stream, host, path).await
        }
    }
}

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    host: &str,
    path: &str,
) -> std::result::Result<Response, String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut response = Vec::new();
    // A peer that closes TLS without close_notify still sent a whole answer.
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| "the answer timed out".to_string())?;
    if let Err(e) = read
        && response.is_empty()
    {
        return Err(format!("reading the answer: {e}"));
    }
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}
