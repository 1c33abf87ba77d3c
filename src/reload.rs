//! What a running gateway reads again without a restart: each source's secrets (a rotation adds the new
//! secret beside the old, then removes the old) and address file, and the webhook port's TLS certificate,
//! every `reload.interval_s` and at once on SIGHUP. What changed and loads is swapped in under running
//! requests; what fails to load is logged and counted, and what was in use stays.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Source, SourceConfig};
use crate::http::tls::TlsTermination;
use crate::http::webhook::SourceRoute;

/// Everything that reloads: the routes' secrets and addresses, read from `configs`, and the certificate.
#[derive(Debug)]
pub struct Reloader {
    pub routes: Arc<HashMap<String, SourceRoute>>,
    pub configs: BTreeMap<String, SourceConfig>,
    pub tls: Option<TlsTermination>,
}

impl Reloader {
    /// One reload of everything, now. The files are small (a few secrets, a certificate chain): read on the
    /// runtime's thread, they take microseconds, once an interval.
    pub fn reload(&self) {
        self.reload_sources();
        if let Some(tls) = &self.tls {
            tls.reload();
        }
    }

    /// Reloads every `interval` and on each SIGHUP until `stop`. SIGHUP is caught from this call on, not
    /// from the future's first poll, so a caller that spawns the future before reporting ready never lets
    /// a SIGHUP take its default action: ending the process.
    pub fn watch(self, interval: Duration, stop: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        let mut hangup = hangup_signal();
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = next_hangup(&mut hangup) => info!("SIGHUP: reloading secrets, address files and the TLS certificate"),
                    () = stop.cancelled() => return,
                }
                self.reload();
            }
        }
    }

    /// Reads each source's secrets and address file again and swaps in what changed and loads. The two are
    /// judged apart: a broken address file (a refresh job's half-written download) must not hold back a
    /// secret rotation, whose new secret the sender may already sign with, nor the other way round.
    fn reload_sources(&self) {
        for (name, config) in &self.configs {
            let Some(route) = self.routes.get(name) else { continue };
            let current = route.source.load();
            let mut next: Option<Source> = None;
            let mut secrets_replaced = false;
            match Source::load_secrets(name, config) {
                Ok((_, digest)) if digest == current.secrets_digest => {}
                Ok((verifier, digest)) => {
                    let (before, now) = (current.verifier.secret_count(), verifier.secret_count());
                    info!(source = %name, secrets_before = before, secrets_now = now, "source secrets reloaded");
                    let source = next.get_or_insert_with(|| Source::clone(&current));
                    (source.verifier, source.secrets_digest) = (verifier, digest);
                    secrets_replaced = true;
                }
                Err(e) => {
                    let error = crate::error_chain(&e);
                    error!(source = %name, error, "source secrets not reloaded; the secrets in use stay");
                    crate::metrics::record_secret_reload(name, "failed");
                }
            }
            let mut addresses_replaced = false;
            match Source::load_addresses(name, config) {
                Ok(list) if list == current.allowed_ips => {}
                Ok(list) => {
                    let (before, now) = (current.allowed_ips.len(), list.len());
                    info!(source = %name, addresses_before = before, addresses_now = now, "source addresses reloaded");
                    next.get_or_insert_with(|| Source::clone(&current)).allowed_ips = list;
                    addresses_replaced = true;
                }
                Err(e) => {
                    let error = crate::error_chain(&e);
                    error!(source = %name, error, "source addresses not reloaded; the list in use stays");
                    crate::metrics::record_address_reload(name, "failed");
                }
            }
            if let Some(source) = next {
                // Swapped before it is counted: whoever sees the count gets the new secrets and addresses.
                route.source.store(Arc::new(source));
                if secrets_replaced {
                    crate::metrics::record_secret_reload(name, "replaced");
                }
                if addresses_replaced {
                    crate::metrics::record_address_reload(name, "replaced");
                }
            }
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        signal(SignalKind::hangup())
            .map_err(|e| warn!(error = %e, "cannot listen for SIGHUP; reloads still run on their interval"))
            .ok()
    }
    #[cfg(not(unix))]
    None
}

async fn next_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup {
        if signal.recv().await.is_some() {
            return;
        }
    }
    let _ = hangup;
    std::future::pending::<()>().await;
}
