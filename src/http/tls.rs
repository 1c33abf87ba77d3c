//! HTTPS on the webhook port: rustls (ring provider, TLS 1.2 and 1.3, ALPN h2 and http/1.1) with a
//! certificate that is reloaded, without dropping a connection, when its files change or on SIGHUP.
//!
//! Payment providers deliver only to `https://` endpoints. Where no load balancer terminates TLS in
//! front of hookgate (a VM with systemd, a bare container), it terminates it itself. Certificates are
//! renewed every few weeks (ACME, cert-manager), so [`crate::reload`] has the files read again every
//! `reload.interval_s` and on SIGHUP; a pair that fails to load is logged and the certificate in use stays.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("{what} file {path} holds no PEM {expected}: {reason}")]
    Pem { what: &'static str, path: PathBuf, expected: &'static str, reason: String },
    #[error("the key in {key} does not fit the certificate in {cert}: {reason}")]
    Pair { cert: PathBuf, key: PathBuf, reason: String },
    #[error("the certificate in {path} cannot be parsed: {reason}")]
    Certificate { path: PathBuf, reason: String },
}

/// A certificate chain and its key, loaded and checked against each other.
#[derive(Debug)]
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    /// The leaf certificate's `notAfter`, in unix seconds.
    pub not_after_unix: i64,
    /// SHA-256 of the two files as read, to tell a change on the next look (without keeping a second
    /// copy of the private key in memory).
    files_digest: [u8; 32],
}

/// Reads `config`'s certificate chain and private key and checks that they belong together.
pub fn load(config: &TlsConfig) -> Result<LoadedCertificate, TlsError> {
    let cert_pem = read("certificate", &config.cert_file)?;
    let key_pem = read("key", &config.key_file)?;
    parse(config, &cert_pem, &key_pem)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|cause| TlsError::Read { what, path: path.to_path_buf(), cause })
}

fn parse(config: &TlsConfig, cert_pem: &[u8], key_pem: &[u8]) -> Result<LoadedCertificate, TlsError> {
    let pem_error = |what, path: &Path, expected, reason: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        expected,
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("certificate", &config.cert_file, "CERTIFICATE", e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(pem_error("certificate", &config.cert_file, "CERTIFICATE", "none found".to_owned()));
    };
    let not_after_unix =
        not_after(leaf).map_err(|reason| TlsError::Certificate { path: config.cert_file.clone(), reason })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| pem_error("key", &config.key_file, "PRIVATE KEY (PKCS#8, RSA or EC)", e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| TlsError::Pair {
        cert: config.cert_file.clone(),
        key: config.key_file.clone(),
        reason: e.to_string(),
    })?;
    Ok(LoadedCertificate {
        key: Arc::new(certified),
        not_after_unix,
        files_digest: crate::digest_of([cert_pem, key_pem]),
    })
}

/// The leaf's `notAfter` (for the expiry metric and the warning as it nears).
fn not_after(leaf: &CertificateDer<'_>) -> Result<i64, String> {
    use x509_cert::der::Decode as _;
    let certificate = x509_cert::Certificate::from_der(leaf.as_ref()).map_err(|e| e.to_string())?;
    let not_after = certificate.tbs_certificate.validity.not_after.to_unix_duration();
    Ok(i64::try_from(not_after.as_secs()).unwrap_or(i64::MAX))
}

/// Hands the current certificate to every handshake; [`CertificateStore::reload`] swaps it.
struct CertificateStore {
    config: TlsConfig,
    current: ArcSwap<LoadedCertificate>,
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore").field("cert_file", &self.config.cert_file).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertificateStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

impl CertificateStore {
    fn current(&self) -> Arc<LoadedCertificate> {
        self.current.load_full()
    }

    /// Reads the files again; swaps in the pair when it changed and loads.
    fn reload(&self) {
        let files = read("certificate", &self.config.cert_file)
            .and_then(|cert| Ok((cert, read("key", &self.config.key_file)?)));
        let result = files.and_then(|(cert, key)| {
            if self.current().files_digest == crate::digest_of([&cert[..], &key[..]]) {
                return Ok(None);
            }
            parse(&self.config, &cert, &key).map(Some)
        });
        match result {
            Ok(None) => {}
            Ok(Some(loaded)) => {
                let not_after_unix = loaded.not_after_unix;
                info!(cert_file = %self.config.cert_file.display(), not_after_unix, "TLS certificate reloaded");
                // Swapped before it is counted: whoever sees the count gets the new certificate.
                self.current.store(Arc::new(loaded));
                crate::metrics::record_tls_reload("replaced");
                crate::metrics::record_tls_not_after(not_after_unix);
                warn_if_expiring(&self.config.cert_file, not_after_unix);
            }
            Err(e) => {
                // Renewal tools often write the certificate and the key one after the other: the next look
                // usually finds the pair whole again.
                error!(error = %crate::error_chain(&e), "TLS certificate not reloaded; the one in use stays");
                crate::metrics::record_tls_reload("failed");
            }
        }
    }
}

/// The webhook port's TLS: the acceptor for new connections and the certificate behind it.
#[derive(Clone)]
pub struct TlsTermination {
    acceptor: TlsAcceptor,
    store: Arc<CertificateStore>,
}

impl fmt::Debug for TlsTermination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTermination").field("store", &self.store).finish_non_exhaustive()
    }
}

impl TlsTermination {
    /// Loads the certificate (failing start-up when it cannot) and builds the server configuration.
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        let loaded = load(config)?;
        warn_if_expiring(&config.cert_file, loaded.not_after_unix);
        let store = Arc::new(CertificateStore { config: config.clone(), current: ArcSwap::from_pointee(loaded) });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair {
                cert: config.cert_file.clone(),
                key: config.key_file.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(server)), store })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The leaf certificate in use's `notAfter`, in unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        self.store.current().not_after_unix
    }

    /// Reads the files again now; replaces the certificate when they changed and load.
    pub fn reload(&self) {
        self.store.reload();
    }
}

/// Warns (at start and after each reload) when the certificate has expired or will within 14 days.
fn warn_if_expiring(path: &Path, not_after_unix: i64) {
    let left_s = not_after_unix.saturating_sub(crate::unix_now());
    if left_s <= 0 {
        error!(cert_file = %path.display(), not_after_unix, "the TLS certificate has expired: senders will refuse it");
    } else if left_s < 14 * 86_400 {
        warn!(cert_file = %path.display(), days_left = left_s / 86_400, "the TLS certificate expires soon");
    }
}
