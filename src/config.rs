//! Typed configuration: embedded defaults -> optional file -> `HOOKGATE__` environment, validated once.
//!
//! Every struct denies unknown keys, so a typo stops start-up with the key's name instead of being
//! silently ignored. Secrets are never part of this tree: a source only names where its secrets live,
//! and [`Config::sources`] reads them into verifiers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::address::AddressRange;
use crate::signature::{Scheme, Verifier};

/// The documented defaults, built into the binary so it runs without any file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// Prefix of environment overrides; `__` separates nested keys.
pub const ENV_PREFIX: &str = "HOOKGATE__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error(transparent)]
    Load(#[from] Box<figment::Error>),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("cannot read the secret file of source `{source_name}` ({path})")]
    SecretFile {
        source_name: String,
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("cannot read the address file of source `{source_name}` ({path})")]
    AddressFile {
        source_name: String,
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub queue: QueueConfig,
    pub workers: WorkersConfig,
    pub store: StoreConfig,
    pub notify: NotifyConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub reload: ReloadConfig,
    pub retention: RetentionConfig,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// The file this was loaded from (`--config`), read again on SIGHUP (see `crate::reload`).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub http2_max_concurrent_streams: u32,
    /// Proxies whose `X-Forwarded-For` names the client (see `crate::address`).
    pub trusted_proxies: Vec<AddressRange>,
    /// Every connection starts with a PROXY protocol header naming the client (see `crate::http::proxy_protocol`).
    pub proxy_protocol: bool,
    /// The balancers whose connections may start with that header; empty: any peer. Others are closed unread.
    pub proxy_protocol_from: Vec<AddressRange>,
    /// HTTPS on the webhook port; absent: plain HTTP (TLS terminated in front, or a private network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// The webhook port's certificate and key (PEM files; the chain's leaf first), read again on each reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// When a 202 is sent: after the commit (durable) or after queueing (enqueue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    Durable,
    Enqueue,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub capacity: usize,
    /// MiB of request bodies held in memory at once (see `pipeline::memory`).
    pub body_memory_mb: usize,
    pub ack_mode: AckMode,
    pub high_water_ratio: f64,
    pub retry_after_s: u32,
}

impl QueueConfig {
    /// `body_memory_mb` in bytes.
    pub fn body_memory_bytes(&self) -> usize {
        self.body_memory_mb.saturating_mul(1024 * 1024)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    pub count: usize,
    pub batch_max: usize,
    pub batch_linger_ms: u64,
    /// Group commit; unset: on in durable mode, off in enqueue mode (see [`Config::linger_until_idle`]).
    #[serde(default)]
    pub linger_until_idle: Option<bool>,
    pub retry_backoff_max_ms: u64,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    pub pool_max: u32,
    pub connect_timeout_ms: u64,
    pub migrate_on_start: bool,
    /// `store.url` is a pooler in transaction mode (PgBouncer's `pool_mode = transaction`, a managed database's
    /// transaction pool): statements are prepared unnamed, each in a transaction of its own.
    pub transaction_pooler: bool,
    /// Where migrations run when not on `store.url` (a direct connection, past a transaction pooler).
    pub migrate_url: Option<String>,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_max", &self.pool_max)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("transaction_pooler", &self.transaction_pooler)
            .field("migrate_url", &self.migrate_url.as_deref().map(redact_url))
            .finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    pub enabled: bool,
    pub redis_url: String,
    pub stream_key: String,
    pub stream_maxlen: u64,
    pub include_body: bool,
    pub publish_channel: bool,
    pub pool_max: usize,
    pub command_timeout_ms: u64,
    pub catchup_interval_ms: u64,
    pub catchup_batch: u32,
    pub catchup_page_mb: u32,
    pub catchup_grace_ms: u64,
    pub warn_interval_s: u64,
    pub queue_batches: usize,
    pub publish_linger_ms: u64,
}

impl NotifyConfig {
    /// The stream of one source.
    pub fn stream_for(&self, source: &str) -> String {
        self.stream_key.replace("{source}", source)
    }
}

impl fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifyConfig")
            .field("enabled", &self.enabled)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("stream_key", &self.stream_key)
            .field("stream_maxlen", &self.stream_maxlen)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// What a running gateway reads again (the sources' secrets, the TLS certificate), and how often.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Seconds between reloads; SIGHUP reloads at once.
    pub interval_s: u64,
    /// Each reload also reads the configuration file when its content changed, as SIGHUP does.
    pub watch_config: bool,
}

/// How long stored events are kept, and how the old ones are deleted (`retention.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delete events received more than this many days ago; 0 keeps every event.
    pub keep_days: u32,
    /// Seconds between pruning runs.
    pub interval_s: u64,
    /// Events deleted per statement (one commit each).
    pub batch_rows: u32,
    /// Pause between two statements, which bounds the deletes' share of the disk.
    pub batch_pause_ms: u64,
}

/// The shortest retention allowed. A pruned event's id is forgotten, so a sender's late retry of it is
/// stored and published again as new: keep events well past the longest retry schedule (Stripe's live
/// mode retries for up to 3 days, Standard Webhooks senders for a few days too).
pub const MIN_KEEP_DAYS: u32 = 7;
/// The longest retention that is not "forever" (0): a cutoff further back is out of Postgres's range.
pub const MAX_KEEP_DAYS: u32 = 36_500;

impl RetentionConfig {
    pub fn enabled(&self) -> bool {
        self.keep_days > 0
    }

    /// Why `days` cannot be a retention, if it cannot (0, keeping every event, can). The configuration and
    /// `hookgate prune --keep-days` both check with it.
    pub fn keep_days_problem(days: u32) -> Option<String> {
        if days > MAX_KEEP_DAYS {
            Some(format!("at most {MAX_KEEP_DAYS} (100 years); 0 keeps every event"))
        } else if days != 0 && days < MIN_KEEP_DAYS {
            Some(format!(
                "0 (keep every event) or at least {MIN_KEEP_DAYS}: a pruned event's id is forgotten, so a sender's \
                 late retry of it would be stored and published again"
            ))
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    pub requests_grace_ms: u64,
    pub drain_grace_ms: u64,
    /// Where acknowledged events (enqueue mode) that the drain could not store are written, and imported from at
    /// the next start (`crate::spill`). None: they are lost, each named in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub scheme: Scheme,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    #[serde(default = "default_tolerance_s")]
    pub tolerance_s: u64,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Most of this source's events queued or being written at once; past it, 503 for this source alone, so a
    /// flood from one sender leaves the queue's other slots to the others. 0: only `queue.capacity` bounds it.
    #[serde(default)]
    pub max_queued: usize,
    /// The client addresses this source accepts (addresses or CIDR ranges); empty, with no file: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<AddressRange>,
    /// More of them, one a line, read again on each reload (a list kept up to date by a job of the
    /// operator's, from the sender's published addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips_file: Option<PathBuf>,
}

fn default_tolerance_s() -> u64 {
    300
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

/// A configured source, its secrets loaded: what the request path needs.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub verifier: Verifier,
    pub max_body_bytes: usize,
    /// `max_queued`: 0 for no limit of its own.
    pub max_queued: usize,
    /// The client addresses it accepts (`allowed_ips` and the file's); empty: any.
    pub allowed_ips: Vec<AddressRange>,
    /// SHA-256 of the secrets as loaded, so a reload can tell whether they changed without keeping them.
    pub secrets_digest: [u8; 32],
}

impl Config {
    /// Loads defaults, then `file` (which must exist when given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, Env::prefixed(ENV_PREFIX).split("__"))
    }

    /// As [`Config::load`] with an explicit environment provider (tests pass their own).
    pub fn load_with_env(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            figment = figment.merge(Toml::file(path));
        }
        let mut config: Config = figment.merge(env).extract().map_err(Box::new)?;
        config.validate()?;
        config.file = file.map(Path::to_path_buf);
        Ok(config)
    }

    /// Parses a TOML document layered over the defaults (no environment): for tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config =
            Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(text)).extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("server.max_connections", self.server.max_connections as u64),
            ("server.header_read_timeout_ms", self.server.header_read_timeout_ms),
            ("server.request_timeout_ms", self.server.request_timeout_ms),
            ("server.http2_max_concurrent_streams", u64::from(self.server.http2_max_concurrent_streams)),
            ("queue.capacity", self.queue.capacity as u64),
            ("queue.body_memory_mb", self.queue.body_memory_mb as u64),
            ("queue.retry_after_s", u64::from(self.queue.retry_after_s)),
            ("workers.count", self.workers.count as u64),
            ("workers.batch_max", self.workers.batch_max as u64),
            ("workers.retry_backoff_max_ms", self.workers.retry_backoff_max_ms),
            ("store.connect_timeout_ms", self.store.connect_timeout_ms),
            ("notify.stream_maxlen", self.notify.stream_maxlen),
            ("notify.pool_max", self.notify.pool_max as u64),
            ("notify.command_timeout_ms", self.notify.command_timeout_ms),
            ("notify.catchup_interval_ms", self.notify.catchup_interval_ms),
            ("notify.catchup_batch", u64::from(self.notify.catchup_batch)),
            ("notify.catchup_page_mb", u64::from(self.notify.catchup_page_mb)),
            ("notify.warn_interval_s", self.notify.warn_interval_s),
            ("notify.queue_batches", self.notify.queue_batches as u64),
            ("reload.interval_s", self.reload.interval_s),
            ("retention.interval_s", self.retention.interval_s),
            ("retention.batch_rows", u64::from(self.retention.batch_rows)),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if !(self.queue.high_water_ratio > 0.0 && self.queue.high_water_ratio <= 1.0) {
            return Err(invalid("queue.high_water_ratio", "must be in (0, 1]"));
        }
        if let Some(reason) = RetentionConfig::keep_days_problem(self.retention.keep_days) {
            return Err(invalid("retention.keep_days", reason));
        }
        if self.retention.batch_rows > 100_000 {
            return Err(invalid("retention.batch_rows", "at most 100000 events per statement"));
        }
        if self.workers.batch_max > 10_000 {
            return Err(invalid("workers.batch_max", "at most 10000 events per batch"));
        }
        if (self.store.pool_max as usize) <= self.workers.count {
            return Err(invalid(
                "store.pool_max",
                format!("must exceed workers.count ({}): each worker holds one connection", self.workers.count),
            ));
        }
        let postgres_url = |url: &str| url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !postgres_url(&self.store.url) {
            return Err(invalid("store.url", "must be a postgres:// URL"));
        }
        if self.store.migrate_url.as_deref().is_some_and(|url| !postgres_url(url)) {
            return Err(invalid("store.migrate_url", "must be a postgres:// URL"));
        }
        if self.store.transaction_pooler && self.store.migrate_on_start && self.store.migrate_url.is_none() {
            return Err(invalid(
                "store.migrate_url",
                "must name Postgres itself (a direct connection) when store.transaction_pooler and \
                 store.migrate_on_start are both on: the migrations hold a session-level lock, which a transaction \
                 pooler does not keep",
            ));
        }
        validate_redis_url(&self.notify.redis_url)?;
        if !self.notify.stream_key.contains("{source}") {
            return Err(invalid("notify.stream_key", "must contain {source}, so each source has its own stream"));
        }
        if self.server.listen == self.admin.listen {
            return Err(invalid("admin.listen", "must differ from server.listen"));
        }
        if !self.server.proxy_protocol && !self.server.proxy_protocol_from.is_empty() {
            return Err(invalid(
                "server.proxy_protocol_from",
                "lists the balancers that send a PROXY protocol header, but server.proxy_protocol is off: set it to \
                 true, or empty the list",
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        for (name, source) in &self.sources {
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
            if !valid_name {
                return Err(invalid(format!("sources.{name}"), "names use a-z, 0-9, '-' and '_' (at most 64)"));
            }
            if source.secret_env.is_none() && source.secret_file.is_none() {
                return Err(invalid(format!("sources.{name}"), "set secret_env or secret_file"));
            }
            if source.max_body_bytes == 0 {
                return Err(invalid(format!("sources.{name}.max_body_bytes"), "must be greater than 0"));
            }
            if source.max_body_bytes > self.queue.body_memory_bytes() {
                return Err(invalid(
                    format!("sources.{name}.max_body_bytes"),
                    format!(
                        "must fit in queue.body_memory_mb ({} MiB), or its largest bodies could never be accepted",
                        self.queue.body_memory_mb
                    ),
                ));
            }
            if source.max_queued > self.queue.capacity {
                return Err(invalid(
                    format!("sources.{name}.max_queued"),
                    format!(
                        "must be at most queue.capacity ({}), a share of the queue's events (0: no limit of its own)",
                        self.queue.capacity
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads every source's secrets and builds its verifier. Fails when a source has no secret.
    pub fn sources(&self) -> Result<Vec<Source>, ConfigError> {
        self.sources.iter().map(|(name, cfg)| Source::load(name, cfg)).collect()
    }

    /// The keys whose values differ between `self` and `other`, dotted (`server.max_connections`,
    /// `sources.stripe.allowed_ips`), in order; a source added or removed is named whole.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        fn walk(prefix: &str, before: &toml::Value, after: &toml::Value, changed: &mut Vec<String>) {
            match (before, after) {
                (toml::Value::Table(before), toml::Value::Table(after)) => {
                    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
                    for key in keys {
                        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                        match (before.get(key), after.get(key)) {
                            (Some(b), Some(a)) => walk(&path, b, a, changed),
                            _ => changed.push(path),
                        }
                    }
                }
                (before, after) if before != after => changed.push(prefix.to_owned()),
                _ => {}
            }
        }
        let mut changed = Vec::new();
        // Plain structs of strings, numbers and maps always serialise.
        if let (Ok(before), Ok(after)) = (toml::Value::try_from(self), toml::Value::try_from(other)) {
            walk("", &before, &after, &mut changed);
        }
        changed
    }

    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.store.url = redact_url(&self.store.url);
        shown.store.migrate_url = self.store.migrate_url.as_deref().map(redact_url);
        shown.notify.redis_url = redact_url(&self.notify.redis_url);
        // Plain structs of strings, numbers and maps always serialise.
        toml::to_string(&shown).unwrap_or_default()
    }
}

impl Source {
    /// Reads the source's secrets and its address file, and builds its verifier.
    pub fn load(name: &str, cfg: &SourceConfig) -> Result<Self, ConfigError> {
        let (verifier, secrets_digest) = Self::load_secrets(name, cfg)?;
        let allowed_ips = Self::load_addresses(name, cfg)?;
        Ok(Source {
            name: name.to_owned(),
            verifier,
            max_body_bytes: cfg.max_body_bytes,
            max_queued: cfg.max_queued,
            allowed_ips,
            secrets_digest,
        })
    }

    /// Reads the source's secrets (its environment variable and/or file) and builds its verifier; returns it
    /// with the secrets' digest.
    pub fn load_secrets(name: &str, cfg: &SourceConfig) -> Result<(Verifier, [u8; 32]), ConfigError> {
        let mut secrets: Vec<String> = Vec::new();
        if let Some(var) = &cfg.secret_env {
            let value = std::env::var(var).unwrap_or_default();
            secrets
                .extend(value.split([',', ' ', '\n', '\t']).map(str::trim).filter(|s| !s.is_empty()).map(String::from));
        }
        if let Some(path) = &cfg.secret_file {
            let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::SecretFile {
                source_name: name.to_owned(),
                path: path.clone(),
                cause,
            })?;
            secrets
                .extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        }
        if secrets.is_empty() {
            let place = match (&cfg.secret_env, &cfg.secret_file) {
                (Some(var), _) => format!("environment variable {var} is unset or empty"),
                (None, Some(path)) => format!("file {} holds no secret", path.display()),
                (None, None) => "no secret_env or secret_file".to_owned(),
            };
            return Err(invalid(format!("sources.{name}"), format!("no secret: {place}")));
        }
        let verifier = Verifier::new(cfg.scheme, &secrets, cfg.tolerance_s)
            .map_err(|e| invalid(format!("sources.{name}"), e.to_string()))?;
        Ok((verifier, crate::digest_of(secrets.iter().map(String::as_bytes))))
    }

    /// The client addresses the source accepts: `allowed_ips`, and its address file's (empty: any).
    pub fn load_addresses(name: &str, cfg: &SourceConfig) -> Result<Vec<AddressRange>, ConfigError> {
        let mut allowed_ips = cfg.allowed_ips.clone();
        if let Some(path) = &cfg.allowed_ips_file {
            allowed_ips.extend(read_address_file(name, path)?);
        }
        Ok(allowed_ips)
    }
}

/// A source's address file: one address or CIDR range a line, `#` starting a comment. A file that names no
/// address is an error, not an empty list: an empty list accepts every address, and a file caught empty
/// mid-write must not open the source (a reload keeps the list in use).
fn read_address_file(name: &str, path: &Path) -> Result<Vec<AddressRange>, ConfigError> {
    let key = || format!("sources.{name}.allowed_ips_file");
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::AddressFile {
        source_name: name.to_owned(),
        path: path.to_path_buf(),
        cause,
    })?;
    let mut ranges = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if !entry.is_empty() {
            let range =
                entry.parse().map_err(|e| invalid(key(), format!("{} line {}: {e}", path.display(), number + 1)))?;
            ranges.push(range);
        }
    }
    if ranges.is_empty() {
        return Err(invalid(
            key(),
            format!("{} names no address (an empty list would accept every address)", path.display()),
        ));
    }
    Ok(ranges)
}

/// `redis://` and `rediss://` (TLS, checked against the system's CA store or `SSL_CERT_FILE`) over TCP,
/// `unix://` or `redis+unix://` with a socket path. Parsed as the client will parse it, so a bad port or a
/// missing path is reported now rather than at the first publish.
fn validate_redis_url(url: &str) -> Result<(), ConfigError> {
    use deadpool_redis::redis::{ConnectionAddr, IntoConnectionInfo};
    const SCHEMES: [&str; 4] = ["redis://", "rediss://", "unix://", "redis+unix://"];
    if !SCHEMES.iter().any(|scheme| url.starts_with(scheme)) {
        return Err(invalid(
            "notify.redis_url",
            "must be a redis:// or rediss:// (TLS) URL, or unix:///path/to/redis.sock",
        ));
    }
    let info = url.into_connection_info().map_err(|e| invalid("notify.redis_url", e.to_string()))?;
    if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
        return Err(invalid(
            "notify.redis_url",
            "#insecure would skip the server's certificate check: give its CA in SSL_CERT_FILE instead",
        ));
    }
    Ok(())
}

/// Hides the passwords of a URL: the userinfo's (`postgres://user:****@host/db`) and a `password=` or
/// `pass=` query parameter (where Postgres and Redis over a Unix socket take one).
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let userinfo_redacted = base.split_once("://").and_then(|(scheme, rest)| {
        let (userinfo, host) = rest.rsplit_once('@')?;
        let (user, _) = userinfo.split_once(':')?;
        Some(format!("{scheme}://{user}:****@{host}"))
    });
    let mut out = userinfo_redacted.unwrap_or_else(|| base.to_owned());
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key @ ("password" | "pass"), _)) => format!("{key}=****"),
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

impl Config {
    /// Whether the workers group-commit. By default only in durable mode: there each 202 waits for its
    /// batch, and writing as soon as the database is free halves the median latency. In enqueue mode
    /// nobody waits for the write, so the full linger's bigger batches cost less CPU for the same events.
    pub fn linger_until_idle(&self) -> bool {
        self.workers.linger_until_idle.unwrap_or(self.queue.ack_mode == AckMode::Durable)
    }
}

impl ServerConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's own error type
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_each_changed_value_and_each_source_added_or_removed() {
        let source = |name: &str| format!("[sources.{name}]\nscheme = 'stripe'\nsecret_env = 'S'\n");
        let before = Config::from_toml(&(source("a") + &source("b"))).unwrap();
        assert!(before.changed_keys(&before.clone()).is_empty());
        let after = Config::from_toml(&format!(
            "[server]\nmax_connections = 10\n[log]\nlevel = 'debug'\n{}[sources.a]\nscheme = 'stripe'\n\
             secret_env = 'S'\nallowed_ips = ['192.0.2.0/24']\n",
            source("c")
        ))
        .unwrap();
        assert_eq!(
            before.changed_keys(&after),
            ["log.level", "server.max_connections", "sources.a.allowed_ips", "sources.b", "sources.c"]
        );
    }

    #[test]
    fn defaults_load_and_validate() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.queue.ack_mode, AckMode::Durable);
        assert_eq!(c.server.listen.port(), 8080);
        assert_ne!(c.admin.listen.port(), 9090, "9090 belongs to Prometheus");
        assert!(c.sources.is_empty());
    }

    #[test]
    fn group_commit_is_on_by_default_in_durable_mode_only_and_can_be_set_either_way() {
        let group_commit = |toml: &str| Config::from_toml(toml).unwrap().linger_until_idle();
        assert!(group_commit(""));
        assert!(!group_commit("[queue]\nack_mode = 'enqueue'"));
        assert!(!group_commit("[workers]\nlinger_until_idle = false"));
        assert!(group_commit("[queue]\nack_mode = 'enqueue'\n[workers]\nlinger_until_idle = true"));
    }

    #[test]
    fn every_default_key_is_documented_with_a_comment() {
        // Each `key = value` line of default.toml is preceded by a comment line.
        let lines: Vec<&str> = DEFAULT_TOML.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            if !t.starts_with('#') && !t.starts_with('[') && t.contains('=') {
                assert!(lines[i - 1].trim_start().starts_with('#'), "undocumented key: {t}");
            }
        }
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml("[queue]\ncapacityy = 5").unwrap_err().to_string();
        assert!(err.contains("capacityy"), "{err}");
        let err = Config::from_toml("[sources.s]\nscheme='stripe'\nsecret_env='X'\nfoo=1").unwrap_err().to_string();
        assert!(err.contains("foo"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = Config::from_toml("[queue]\ncapacity = 0").unwrap_err().to_string();
        assert!(err.contains("queue.capacity"), "{err}");
        let err = Config::from_toml("[queue]\nack_mode = 'sometimes'").unwrap_err().to_string();
        assert!(err.contains("ack_mode"), "{err}");
        let err = Config::from_toml("[store]\npool_max = 2").unwrap_err().to_string();
        assert!(err.contains("store.pool_max"), "{err}");
        let err = Config::from_toml("[sources.Bad]\nscheme='stripe'\nsecret_env='X'").unwrap_err().to_string();
        assert!(err.contains("sources.Bad"), "{err}");
        let err = Config::from_toml("[sources.s]\nscheme='paypal'\nsecret_env='X'").unwrap_err().to_string();
        assert!(err.contains("scheme"), "{err}");
        let err = Config::from_toml(
            "[queue]\nbody_memory_mb = 1\n[sources.s]\nscheme='stripe'\nsecret_env='X'\nmax_body_bytes = 2000000",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sources.s.max_body_bytes") && err.contains("body_memory_mb"), "{err}");
        let share = |max_queued: usize| {
            Config::from_toml(&format!(
                "[queue]\ncapacity = 100\n[sources.s]\nscheme='stripe'\nsecret_env='X'\nmax_queued = {max_queued}"
            ))
        };
        let err = share(101).unwrap_err().to_string();
        assert!(err.contains("sources.s.max_queued") && err.contains("queue.capacity (100)"), "{err}");
        assert_eq!(share(100).unwrap().sources["s"].max_queued, 100);
        assert_eq!(share(0).unwrap().sources["s"].max_queued, 0);
    }

    #[test]
    fn a_transaction_pooler_needs_migrations_on_a_direct_url_when_they_run_at_start_up() {
        let store = |text: &str| Config::from_toml(&format!("[store]\n{text}"));
        let err = store("transaction_pooler = true").unwrap_err().to_string();
        assert!(err.contains("store.migrate_url") && err.contains("session-level lock"), "{err}");
        let config = store("transaction_pooler = true\nmigrate_url = 'postgres://hookgate@db:5432/hookgate'").unwrap();
        assert_eq!(config.store.migrate_url.as_deref(), Some("postgres://hookgate@db:5432/hookgate"));
        // Migrations run elsewhere (`hookgate migrate` with a direct store.url, or a job of the deployment's own).
        assert!(store("transaction_pooler = true\nmigrate_on_start = false").unwrap().store.migrate_url.is_none());
        let err = store("migrate_url = 'mysql://db/hookgate'").unwrap_err().to_string();
        assert!(err.contains("store.migrate_url"), "{err}");
        let defaults = Config::from_toml("").unwrap().store;
        assert!(!defaults.transaction_pooler && defaults.migrate_url.is_none());
    }

    #[test]
    fn retention_is_off_by_default_and_refuses_a_keep_shorter_than_a_senders_retries() {
        let retention = Config::from_toml("").unwrap().retention;
        assert!(!retention.enabled());
        assert!(Config::from_toml("[retention]\nkeep_days = 7").unwrap().retention.enabled());
        for bad in ["keep_days = 3", "keep_days = 36501", "interval_s = 0", "batch_rows = 0", "batch_rows = 100001"] {
            let err = Config::from_toml(&format!("[retention]\n{bad}")).unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap_or_default();
            assert!(err.contains(&format!("retention.{key}")), "{bad}: {err}");
        }
    }

    #[test]
    fn https_is_off_by_default_and_its_table_and_the_reload_interval_are_checked() {
        assert!(Config::from_toml("").unwrap().server.tls.is_none());
        let tls = Config::from_toml("[server.tls]\ncert_file = '/etc/c.pem'\nkey_file = '/etc/k.pem'").unwrap();
        let tls = tls.server.tls.expect("tls set");
        assert_eq!((tls.cert_file.to_str(), tls.key_file.to_str()), (Some("/etc/c.pem"), Some("/etc/k.pem")));
        let err = Config::from_toml("[reload]\ninterval_s = 0").unwrap_err().to_string();
        assert!(err.contains("reload.interval_s"), "{err}");
        let err = Config::from_toml("[server.tls]\ncert_file = 'c'").unwrap_err().to_string();
        assert!(err.contains("key_file"), "{err}");
    }

    #[test]
    fn redis_urls_over_tcp_tls_and_unix_sockets_are_accepted_and_bad_ones_named() {
        let notify = |url: &str| Config::from_toml(&format!("[notify]\nredis_url = '{url}'")).map(|_| ());
        for good in [
            "redis://127.0.0.1:6379",
            "rediss://:p4ss@redis.internal:6380/0",
            "unix:///run/redis/redis.sock",
            "redis+unix:///run/redis/redis.sock?db=1&pass=p4ss",
        ] {
            assert!(notify(good).is_ok(), "{good}: {:?}", notify(good));
        }
        for (bad, says) in [
            ("http://127.0.0.1:6379", "rediss://"),
            ("127.0.0.1:6379", "unix:///"),
            ("redis://127.0.0.1:notaport", "notify.redis_url"),
            ("unix://", "notify.redis_url"),
            ("rediss://redis.internal:6380/#insecure", "SSL_CERT_FILE"),
        ] {
            let err = notify(bad).expect_err(bad).to_string();
            assert!(err.contains("notify.redis_url") && err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn env_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HOOKGATE__QUEUE__CAPACITY", "50000");
            jail.set_env("HOOKGATE__SOURCES__STRIPE__SCHEME", "stripe");
            jail.set_env("HOOKGATE__SOURCES__STRIPE__SECRET_ENV", "HG_TEST_SECRET_A");
            jail.set_env("HG_TEST_SECRET_A", "whsec_new, whsec_old");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.queue.capacity, 50000);
            let sources = c.sources().map_err(|e| e.to_string())?;
            assert_eq!(sources[0].name, "stripe");
            let shown = format!("{:?}", sources[0].verifier);
            assert!(shown.contains("2 redacted") && !shown.contains("whsec_new"), "{shown}");
            Ok(())
        });
    }

    #[test]
    fn trusted_proxies_and_allowed_ips_take_addresses_and_ranges_and_name_the_key_of_a_bad_one() {
        let c = Config::from_toml("").unwrap();
        assert!(c.server.trusted_proxies.is_empty());
        let c = Config::from_toml(
            "[server]\ntrusted_proxies = ['10.0.0.0/8', '::1']\n\
             [sources.s]\nscheme = 'stripe'\nsecret_env = 'X'\nallowed_ips = ['3.18.12.63', '2001:db8::/32']",
        )
        .unwrap();
        let shown = |list: &[AddressRange]| list.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(shown(&c.server.trusted_proxies), ["10.0.0.0/8", "::1"]);
        assert_eq!(shown(&c.sources["s"].allowed_ips), ["3.18.12.63", "2001:db8::/32"]);
        // Written back as it was given (`check-config` shows the redacted TOML).
        let again = Config::from_toml(&c.redacted_toml()).unwrap();
        assert_eq!(again.sources["s"].allowed_ips, c.sources["s"].allowed_ips);
        for (toml, key) in [
            ("[server]\ntrusted_proxies = ['10.0.0.0/40']", "trusted_proxies"),
            ("[server]\nproxy_protocol = true\nproxy_protocol_from = ['nlb']", "proxy_protocol_from"),
            ("[sources.s]\nscheme = 'stripe'\nsecret_env = 'X'\nallowed_ips = ['stripe.com']", "allowed_ips"),
        ] {
            let err = Config::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("not an IP address or a CIDR range"), "{err}");
        }
        let c = Config::from_toml("[server]\nproxy_protocol = true\nproxy_protocol_from = ['10.0.0.0/16']").unwrap();
        assert_eq!(shown(&c.server.proxy_protocol_from), ["10.0.0.0/16"]);
        let err = Config::from_toml("[server]\nproxy_protocol_from = ['10.0.0.0/16']").unwrap_err().to_string();
        assert!(err.contains("server.proxy_protocol_from") && err.contains("server.proxy_protocol is off"), "{err}");
        figment::Jail::expect_with(|jail| {
            jail.set_env("HOOKGATE__SERVER__TRUSTED_PROXIES", "[\"10.0.0.0/8\",\"192.168.0.0/16\"]");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(shown(&c.server.trusted_proxies), ["10.0.0.0/8", "192.168.0.0/16"]);
            Ok(())
        });
    }

    #[test]
    fn an_address_file_adds_to_allowed_ips_and_one_that_names_no_address_or_a_bad_one_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HG_TEST_SECRET_B", "whsec_b");
            let source = |file: &str| {
                let toml = format!(
                    "[sources.s]\nscheme = 'stripe'\nsecret_env = 'HG_TEST_SECRET_B'\nallowed_ips = ['203.0.113.7']\n\
                     allowed_ips_file = '{file}'"
                );
                Config::from_toml(&toml).and_then(|c| c.sources()).map(|mut s| s.remove(0))
            };
            jail.create_file("ips", "# Stripe, fetched 2026-11-29\n3.18.12.63\n\n  10.0.0.0/8  # a range\n")?;
            let loaded = source("ips").map_err(|e| e.to_string())?;
            let shown: Vec<String> = loaded.allowed_ips.iter().map(ToString::to_string).collect();
            assert_eq!(shown, ["203.0.113.7", "3.18.12.63", "10.0.0.0/8"]);
            for (text, expected) in [
                ("", "names no address"),
                ("# only a comment\n\n", "names no address"),
                ("3.18.12.63\nstripe.com\n", "line 2: `stripe.com` is not an IP address"),
            ] {
                jail.create_file("ips", text)?;
                let err = source("ips").expect_err(text).to_string();
                assert!(err.contains("sources.s.allowed_ips_file") && err.contains(expected), "{err}");
            }
            let err = source("absent").expect_err("absent").to_string();
            assert!(err.contains("address file") && err.contains("absent"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn secrets_from_a_file_and_missing_secret_is_an_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("secret", "# rotated 2026-11\nwhsec_a\n\nwhsec_b\n")?;
            jail.create_file("hg.toml", "[sources.s]\nscheme='stripe'\nsecret_file='secret'\n[sources.t]\nscheme='github'\nsecret_env='HG_UNSET_VAR'")?;
            let c = Config::load(Some(Path::new("hg.toml"))).map_err(|e| e.to_string())?;
            let err = c.sources().unwrap_err().to_string();
            assert!(err.contains("sources.t") && err.contains("HG_UNSET_VAR"), "{err}");
            jail.set_env("HG_UNSET_VAR", "ghsecret");
            let sources = c.sources().map_err(|e| e.to_string())?;
            assert_eq!(sources.len(), 2);
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/hookgate.toml"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/hookgate.toml"), "{err}");
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(redact_url("postgres://u:p4ss@h:5/db"), "postgres://u:****@h:5/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=verify-full&password=p4ss"),
            "postgres://u@h/db?sslmode=verify-full&password=****"
        );
        assert_eq!(redact_url("unix:///run/redis.sock?db=2&pass=p4ss"), "unix:///run/redis.sock?db=2&pass=****");
        assert_eq!(redact_url("rediss://:p4ss@h:6380/0"), "rediss://:****@h:6380/0");
        let mut c = Config::from_toml("").unwrap();
        c.store.url = "postgres://u:hunter2@h/db".into();
        c.store.migrate_url = Some("postgres://u:swordfish@h/db".into());
        for secret in ["hunter2", "swordfish"] {
            assert!(!c.redacted_toml().contains(secret));
            assert!(!format!("{c:?}").contains(secret));
        }
        assert!(c.redacted_toml().contains("migrate_url = \"postgres://u:****@h/db\""), "{}", c.redacted_toml());
        assert!(c.redacted_toml().contains("[queue]"));
    }

    #[test]
    fn the_shipped_configuration_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let read = |path: &str| std::fs::read_to_string(root.join(path)).expect("shipped file");
        // The ConfigMap's file is its `hookgate.toml: |` block, indented four spaces.
        let configmap = read("kubernetes/configmap.yaml");
        let embedded: Vec<&str> = configmap
            .lines()
            .skip_while(|line| line.trim() != "hookgate.toml: |")
            .skip(1)
            .map(|line| line.strip_prefix("    ").unwrap_or(line))
            .collect();
        assert!(embedded.len() > 10, "the ConfigMap holds hookgate.toml");
        let kubernetes = Config::from_toml(&embedded.join("\n")).expect("the ConfigMap's configuration loads");
        assert!(kubernetes.reload.watch_config, "the kubelet swaps the file whole: edits are followed");
        let systemd = Config::from_toml(&read("systemd/hookgate.toml")).expect("the systemd configuration loads");
        for config in [kubernetes, systemd] {
            assert_eq!(config.sources["stripe"].scheme, Scheme::Stripe);
            assert_eq!(config.log.format, LogFormat::Json);
        }

        // The enqueue kustomization's StatefulSet sets its mode and spill directory by environment over the
        // same ConfigMap, and mounts its claim at that directory.
        let statefulset = read("kubernetes/enqueue/statefulset.yaml");
        let lines: Vec<&str> = statefulset.lines().map(str::trim).collect();
        let env: Vec<(&str, &str)> = lines
            .windows(2)
            .filter_map(|pair| {
                let name = pair[0].strip_prefix("- name: HOOKGATE__")?;
                Some((name, pair[1].strip_prefix("value: ")?))
            })
            .collect();
        assert_eq!(env.len(), 2, "{env:?}");
        figment::Jail::expect_with(|jail| {
            jail.create_file("hookgate.toml", &embedded.join("\n"))?;
            for (name, value) in &env {
                jail.set_env(format!("HOOKGATE__{name}"), value);
            }
            let enqueue = Config::load(Some(Path::new("hookgate.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(enqueue.queue.ack_mode, AckMode::Enqueue);
            let spill_dir = enqueue.shutdown.spill_dir.expect("the StatefulSet sets a spill_dir");
            assert!(lines.contains(&format!("mountPath: {}", spill_dir.display()).as_str()), "{spill_dir:?}");
            Ok(())
        });
    }
}
