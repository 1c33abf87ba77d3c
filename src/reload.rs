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

    /// Reads each source's secrets and address file again and swaps in the sources that changed and load.
    fn reload_sources(&self) {
        for (name, config) in &self.configs {
            let Some(route) = self.routes.get(name) else { continue };
            let current = route.source.load();
            match Source::load(name, config) {
                Ok(source) if source.reloads_nothing_new(&current) => {}
                Ok(source) => {
                    if source.secrets_digest != current.secrets_digest {
                        let (before, now) = (current.verifier.secret_count(), source.verifier.secret_count());
                        info!(source = %name, secrets_before = before, secrets_now = now, "source secrets reloaded");
                    }
                    if source.allowed_ips != current.allowed_ips {
                        let (before, now) = (current.allowed_ips.len(), source.allowed_ips.len());
                        info!(source = %name, addresses_before = before, addresses_now = now, "source addresses reloaded");
                    }
                    // Swapped before it is counted: whoever sees the count gets the new secrets.
                    route.source.store(Arc::new(source));
                    crate::metrics::record_secret_reload(name, "replaced");
                }
                Err(e) => {
                    let error = crate::error_chain(&e);
                    error!(source = %name, error, "source not reloaded; the secrets and addresses in use stay");
                    crate::metrics::record_secret_reload(name, "failed");
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
