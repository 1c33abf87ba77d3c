//! What a running gateway reads again without a restart: each source's secrets (a rotation adds the new
//! secret beside the old, then removes the old) and address file, and the webhook port's TLS certificate,
//! every `reload.interval_s` and at once on SIGHUP. What changed and loads is swapped in under running
//! requests; what fails to load is logged and counted, and what was in use stays.
//!
//! SIGHUP also reads the configuration file again: a new `log.level` is applied at once (debug logs for a
//! few minutes, without the restart that would end the behaviour being looked at), and so are the sources:
//! one added is received from then on, one removed refused, and one whose settings changed (`allowed_ips`,
//! `tolerance_s`, `max_body_bytes`, `max_queued`, where its secrets are read from) is swapped under running requests;
//! so are the proxies and balancers that may name the client (`server.trusted_proxies`,
//! `server.proxy_protocol_from`), for the next request and the next connection. Any other changed key is
//! named in a warning as taking effect on restart, so an edit is never silently ignored. With
//! `reload.watch_config`, each interval does the same when the file's content changed (a Kubernetes
//! ConfigMap, which the kubelet swaps in whole).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::address::TrustedProxies;
use crate::config::{Config, ConfigError, Source, SourceConfig};
use crate::http::tls::TlsTermination;
use crate::http::webhook::{ProxyLists, Routes, SourceRoute};

/// Changes the running process's log filter to a `log.level` directive, or says why it cannot.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_LEVEL_SETTER: OnceLock<LogLevelSetter> = OnceLock::new();

/// Lets a reload change the log level: installed once by the binary, which owns the process's logging (a
/// gateway embedded in another program, as in the tests, leaves its host's logging alone).
pub fn install_log_level_setter(setter: LogLevelSetter) {
    let _ = LOG_LEVEL_SETTER.set(setter);
}

/// Everything that reloads: the routes' secrets and addresses (read from the files `config.sources`
/// names), the certificate, and the configuration file `config` was loaded from.
#[derive(Debug)]
pub struct Reloader {
    routes: Arc<Routes>,
    proxies: Arc<ProxyLists>,
    tls: Option<TlsTermination>,
    /// The configuration in use (with the log level and the sources last applied).
    config: Config,
    /// SHA-256 of the configuration file as last read, so that `reload.watch_config` reads it only when it
    /// changed (and a broken file is reported once, not every interval).
    config_file_digest: Option<[u8; 32]>,
}

impl Reloader {
    pub fn new(routes: Arc<Routes>, proxies: Arc<ProxyLists>, tls: Option<TlsTermination>, config: Config) -> Self {
        let config_file_digest = config.file.as_deref().and_then(file_digest);
        Self { routes, proxies, tls, config, config_file_digest }
    }

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
    pub fn watch(mut self, interval: Duration, stop: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        let mut hangup = hangup_signal();
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if self.config.reload.watch_config {
                            self.reload_config_if_changed();
                        }
                    }
                    () = next_hangup(&mut hangup) => {
                        info!("SIGHUP: reloading the configuration file, secrets, address files and the TLS certificate");
                        self.reload_config();
                    }
                    () = stop.cancelled() => return,
                }
                self.reload();
            }
        }
    }

    /// Reads the configuration file again when its content is not what was last read (`reload.watch_config`).
    fn reload_config_if_changed(&mut self) {
        let Some(path) = &self.config.file else { return };
        if file_digest(path) != self.config_file_digest {
            info!(file = %path.display(), "the configuration file changed: reading it again");
            self.reload_config();
        }
    }

    /// Reads the configuration file again (on SIGHUP): applies a new `log.level`, the sources added, removed
    /// or changed, and names every other changed key as waiting for a restart
    /// (`hookgate_config_restart_pending`). A file that does not load changes nothing.
    fn reload_config(&mut self) {
        let Some(path) = self.config.file.clone() else { return };
        let file = path.display().to_string();
        // Before the load: a file that does not load is then read again only once it changes.
        self.config_file_digest = file_digest(&path);
        let new = match Config::load(Some(&path)) {
            Ok(new) => new,
            Err(e) => {
                let error = crate::error_chain(&e);
                error!(
                    file,
                    error, "configuration file not reloaded: it does not load; the configuration in use stays"
                );
                return;
            }
        };
        if new.sources.is_empty() {
            // As at start-up: a file that lost its sources (a template rendered without them) would otherwise
            // turn every sender away.
            error!(file, "configuration file not reloaded: it configures no source; the configuration in use stays");
            return;
        }
        let mut restart = Vec::new();
        let mut level_changed = false;
        let mut changed_sources: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for key in self.config.changed_keys(&new) {
            if key == "log.level" {
                level_changed = true;
            } else if key == "server.trusted_proxies" {
                let list = new.server.trusted_proxies.clone();
                self.proxies.trusted_proxies.store(Arc::new(TrustedProxies::new(list.clone())));
                info!(proxies = list.len(), "server.trusted_proxies applied");
                self.config.server.trusted_proxies = list;
            } else if key == "server.proxy_protocol_from" {
                let list = new.server.proxy_protocol_from.clone();
                self.proxies.proxy_protocol_from.store(Arc::new(list.clone()));
                info!(balancers = list.len(), "server.proxy_protocol_from applied to new connections");
                self.config.server.proxy_protocol_from = list;
            } else if let Some(name) = source_of(&key) {
                changed_sources.entry(name.to_owned()).or_default().push(key);
            } else {
                restart.push(key);
            }
        }
        if level_changed {
            match LOG_LEVEL_SETTER.get().map(|set| set(&new.log.level)) {
                Some(Ok(())) => {
                    // At warn, so that the line shows both when the level rises and when it falls back.
                    warn!(level = %new.log.level, before = %self.config.log.level, "log level changed");
                    self.config.log.level.clone_from(&new.log.level);
                }
                Some(Err(reason)) => warn!(level = %new.log.level, reason, "log.level not applied"),
                None => {}
            }
        }
        let mut not_applied = false;
        for (name, keys) in changed_sources {
            let Some(settings) = new.sources.get(&name) else {
                self.remove_source(&name);
                continue;
            };
            let keys = keys.join(", ");
            match self.apply_source_settings(&name, settings) {
                Ok(()) => info!(source = %name, keys, "source settings applied"),
                Err(e) => {
                    let error = crate::error_chain(&e);
                    error!(
                        source = %name,
                        keys,
                        error,
                        "source settings not applied: they do not load; the settings in use stay"
                    );
                    not_applied = true;
                }
            }
        }
        crate::metrics::record_config_restart_pending(!restart.is_empty() || not_applied);
        if !restart.is_empty() {
            let keys = restart.join(", ");
            warn!(file, keys, "the configuration file changed keys that take effect only on restart");
        }
    }

    /// Swaps in a source's new settings (its scheme, secrets, tolerance, body limit, addresses), or adds a new
    /// source, loaded whole first: a setting that does not load (a secret file not there yet) leaves all of
    /// them as they were. The periodic reload reads the new files from then on.
    fn apply_source_settings(&mut self, name: &str, settings: &SourceConfig) -> Result<(), ConfigError> {
        let source = Source::load(name, settings)?;
        // At zero before the source is served (a source added) or gains a list: a first refusal is then seen by
        // `rate()` and the alerts. The series it has already are left as they are.
        let (listed, with_file) = (!source.allowed_ips.is_empty(), settings.allowed_ips_file.is_some());
        crate::metrics::init_source_series(name, listed, with_file, self.config.retention.enabled());
        let routes = self.routes.load();
        if let Some(route) = routes.get(name) {
            let current = route.source.load();
            let secrets_replaced = source.secrets_digest != current.secrets_digest;
            let addresses_replaced = source.allowed_ips != current.allowed_ips;
            // Swapped before it is counted, as in a reload of the files.
            route.source.store(Arc::new(source));
            if secrets_replaced {
                crate::metrics::record_secret_reload(name, "replaced");
            }
            if addresses_replaced {
                crate::metrics::record_address_reload(name, "replaced");
            }
        } else {
            let mut next = HashMap::clone(&routes);
            next.insert(name.to_owned(), Arc::new(SourceRoute::new(source)));
            self.routes.store(Arc::new(next));
            info!(source = %name, scheme = ?settings.scheme, "source added: its webhooks are received from now on");
        }
        self.config.sources.insert(name.to_owned(), settings.clone());
        Ok(())
    }

    /// Takes a source out of the route table: its webhooks are answered 404 `unknown_source` from the next
    /// request on (requests already in flight finish). Its stored events, outbox and streams stay.
    fn remove_source(&mut self, name: &str) {
        let mut next = HashMap::clone(&self.routes.load());
        if next.remove(name).is_some() {
            self.routes.store(Arc::new(next));
            warn!(source = %name, "source removed: its webhooks are refused as unknown from now on");
        }
        self.config.sources.remove(name);
    }

    /// Reads each source's secrets and address file again and swaps in what changed and loads. The two are
    /// judged apart: a broken address file (a refresh job's half-written download) must not hold back a
    /// secret rotation, whose new secret the sender may already sign with, nor the other way round.
    fn reload_sources(&self) {
        let routes = self.routes.load();
        for (name, config) in &self.config.sources {
            let Some(route) = routes.get(name) else { continue };
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

/// SHA-256 of a file's bytes; `None` when it cannot be read.
fn file_digest(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|bytes| crate::digest_of([bytes.as_slice()]))
}

/// The source a changed key belongs to: a setting of it (`sources.stripe.allowed_ips`) or, for a source added
/// or removed, the source whole (`sources.stripe`); `None` for any other key.
fn source_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("sources.")?;
    Some(rest.split_once('.').map_or(rest, |(name, _)| name))
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
