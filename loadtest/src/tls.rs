//! HTTPS targets: a rustls client (ring provider) that trusts `--cacert` or else the system's CA store, and
//! offers the ALPN of the HTTP version chosen (`h2` with `--http2`, else `http/1.1`).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A TLS client configuration, shared by every connection of a run.
#[derive(Clone)]
pub struct ClientTls(TlsConnector);

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the certificates in the PEM file `ca_file`, or the system's CA store when none is given.
    pub fn new(ca_file: Option<&Path>, http2: bool) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .with_context(|| format!("reading --cacert {}", path.display()))?;
            anyhow::ensure!(!certs.is_empty(), "--cacert {} holds no PEM certificate", path.display());
            for cert in certs {
                roots.add(cert).with_context(|| format!("a certificate in {}", path.display()))?;
            }
        } else {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            anyhow::ensure!(!roots.is_empty(), "no system CA certificates found: give the target's CA with --cacert");
        }
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![if http2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        Ok(Self(TlsConnector::from(Arc::new(config))))
    }

    /// The TLS handshake over `tcp`, checking the certificate against `host` (a name or an IP address).
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.0.connect(name, tcp).await
    }
}
