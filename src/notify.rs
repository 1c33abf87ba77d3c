//! Redis streams: each newly stored event is published once per batch with one pipelined round trip of
//! `XADD key MAXLEN ~ n * …`, and Postgres remembers what was published (the outbox), so that nothing is
//! lost when Redis is down or the gateway dies between commit and publish.
//!
//! Two tasks: the publisher takes batches from the workers after their acks are out (Redis is never on
//! the ack path); the catch-up claims unpublished rows (`FOR UPDATE SKIP LOCKED`, so replicas share a
//! backlog without publishing it twice), at start-up and whenever Redis is back. Knows nothing about HTTP.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::NotifyConfig;
use crate::store::{OutboxBatch, PageLimit, ReplayFilter, ReplayPosition, Store, StoreError, StoredEvent};
use crate::{error_chain, WarnThrottle};

/// Longest a published batch waits to be marked; well under `catchup_grace_ms`, so the catch-up does not
/// republish what the normal path has just published.
const MARK_INTERVAL: Duration = Duration::from_millis(100);
/// Most outbox rows (batches) in one delete.
const MARK_MAX: usize = 4096;
/// Most events in one publish round trip when the publisher drains several queued batches at once: the
/// default `workers.batch_max`, the largest batch a worker forms, so a coalesced round trip is never
/// bigger than one batch could be (`round_trips`). (At 4,096, ~5 MB pipelines to a Redis fsyncing every
/// write timed out under overload; each timeout marks Redis down, and the catch-up published 3.28M of
/// 3.5M events.)
const PUBLISH_MAX: usize = 512;
/// While the normal path keeps up, the outbox is only scanned this often, as a safety net (another
/// replica's crash). Scanning it every interval costs Postgres more as dead rows accumulate.
const SAFETY_SCAN_INTERVAL: Duration = Duration::from_secs(30);

/// Takes every batch already waiting, without blocking; returns how many.
fn take_waiting(batches: &mut mpsc::Receiver<OutboxBatch>, queued: &mut Vec<OutboxBatch>) -> usize {
    let before = queued.len();
    while let Ok(batch) = batches.try_recv() {
        queued.push(batch);
    }
    queued.len() - before
}

/// Fills `queued` with the batches of the publisher's next round trip. Returns false once every sender is
/// gone and nothing is left; returns with nothing after `marks_due_in`, when that is given.
///
/// Batches that queued up while the last round trip was in flight go at once: the publisher is behind,
/// and waiting would put it further behind (a linger after every round trip cut its throughput in
/// enqueue mode: 16,558 batches deferred to the catch-up in one benchmark). Otherwise the publisher waits
/// for the first batch, then `linger` for more to join it (unless it already has `PUBLISH_MAX` events),
/// so that Redis appends, and with `appendfsync always` fsyncs, once for several batches: at 16,500
/// events/s durable, 5 ms cut the round trips fourfold and Redis's CPU from 22% to 19% of a core.
async fn next_round_trip(
    batches: &mut mpsc::Receiver<OutboxBatch>,
    queued: &mut Vec<OutboxBatch>,
    linger: Duration,
    marks_due_in: Option<Duration>,
) -> bool {
    if take_waiting(batches, queued) > 0 {
        return true;
    }
    let marks_due = async {
        match marks_due_in {
            Some(due) => tokio::time::sleep(due).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        received = batches.recv_many(queued, batches.max_capacity()) => {
            if received == 0 {
                return false;
            }
        }
        () = marks_due => return true,
    }
    if !linger.is_zero() && queued.iter().map(|b| b.events.len()).sum::<usize>() < PUBLISH_MAX {
        tokio::time::sleep(linger).await;
        take_waiting(batches, queued);
    }
    true
}

/// The events of one publish round trip, and the outbox rows they come from.
#[derive(Debug, Default)]
struct RoundTrip {
    events: Vec<StoredEvent>,
    outbox_ids: Vec<i64>,
}

/// Groups queued batches, in order, into round trips of at most `PUBLISH_MAX` events. A batch is never
/// split, so that its outbox row is deleted only once all its events are published: a batch bigger than
/// `PUBLISH_MAX` makes a round trip of its own.
fn round_trips(batches: impl IntoIterator<Item = OutboxBatch>) -> Vec<RoundTrip> {
    let mut trips: Vec<RoundTrip> = Vec::new();
    for batch in batches {
        let joins_last = trips.last().is_some_and(|t| t.events.len() + batch.events.len() <= PUBLISH_MAX);
        if !joins_last {
            trips.push(RoundTrip::default());
        }
        if let Some(trip) = trips.last_mut() {
            trip.events.extend(batch.events);
            trip.outbox_ids.push(batch.id);
        }
    }
    trips
}

/// Whether Redis keeps what it acknowledges, as its `INFO` and `CONFIG GET` report it. The outbox row of an
/// event is deleted once Redis acknowledges the `XADD`, so at-least-once delivery holds only if Redis has the
/// entry on disk by then: `appendonly yes` with `appendfsync always`. With `everysec`, Redis answers
/// writes it has not yet written while a background fsync is slow, and a crash loses them. And only if
/// Redis keeps the stream: with a `maxmemory` and an `allkeys-*` eviction policy, a full Redis evicts
/// whole keys, a stream and its unread entries included (the `volatile-*` policies evict only keys with
/// a time to live, which streams do not have; `noeviction`, the default, refuses the `XADD` instead, and
/// the events wait in the outbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisPersistence {
    /// `appendonly yes` and `appendfsync always`, and no eviction of streams.
    Durable,
    /// Anything weaker, as Redis reported it (e.g. `appendonly yes, appendfsync everysec`, or
    /// `..., maxmemory 104857600, maxmemory-policy allkeys-lru`; `appendfsync unknown` where `CONFIG` is
    /// refused but `INFO` tells enough).
    Weaker(String),
    /// Redis did not answer, or refuses `CONFIG` (as managed Redis services do) while `INFO` shows nothing
    /// weaker: the fsync policy, which only `CONFIG` tells, decides.
    Unknown,
}

impl RedisPersistence {
    /// Classifies Redis's settings under their `CONFIG` names (`appendonly`, `appendfsync`, `maxmemory`,
    /// `maxmemory-policy`); a setting Redis did not tell is absent.
    fn from_config(config: &HashMap<String, String>) -> Self {
        let setting = |name: &str| config.get(name).map(String::as_str);
        let (appendonly, appendfsync) = (setting("appendonly"), setting("appendfsync"));
        let (maxmemory, policy) = (setting("maxmemory").unwrap_or("0"), setting("maxmemory-policy").unwrap_or(""));
        let evicts_streams = maxmemory != "0" && policy.starts_with("allkeys-");
        match (appendonly, appendfsync, evicts_streams) {
            (Some("yes"), Some("always"), false) => Self::Durable,
            // Nothing known to be weaker, but not all of it known.
            (None | Some("yes"), None | Some("always"), false) => Self::Unknown,
            _ => {
                let told = |value: Option<&str>| value.unwrap_or("unknown").to_owned();
                let eviction = if evicts_streams {
                    format!(", maxmemory {maxmemory}, maxmemory-policy {policy}")
                } else {
                    String::new()
                };
                Self::Weaker(format!("appendonly {}, appendfsync {}{eviction}", told(appendonly), told(appendfsync)))
            }
        }
    }

    /// The settings an `INFO` reply tells, under their `CONFIG` names: whether the append-only file is on,
    /// and the memory limit and eviction policy (its fsync policy is only in `CONFIG`).
    fn settings_from_info(info: &redis::InfoDict) -> HashMap<String, String> {
        let mut settings = HashMap::new();
        if let Some(enabled) = info.get::<String>("aof_enabled") {
            settings.insert("appendonly".to_owned(), if enabled == "1" { "yes" } else { "no" }.to_owned());
        }
        for (field, name) in [("maxmemory", "maxmemory"), ("maxmemory_policy", "maxmemory-policy")] {
            if let Some(value) = info.get::<String>(field) {
                settings.insert(name.to_owned(), value);
            }
        }
        settings
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("invalid notify.redis_url")]
    Url(#[source] redis::RedisError),
    #[error("the Redis pool could not be built")]
    Build(#[source] deadpool_redis::BuildError),
    #[error("no Redis connection")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("Redis refused the publish")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer in time")]
    Timeout,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the workers hold: hands a committed batch to the publisher without ever waiting.
#[derive(Debug, Clone)]
pub struct NotifyQueue {
    tx: mpsc::Sender<OutboxBatch>,
    backlog_suspected: Arc<AtomicBool>,
    deferred: Arc<Deferred>,
}

impl NotifyQueue {
    /// Offers a batch; when the publisher is behind, the batch stays in the outbox for the catch-up.
    pub fn offer(&self, batch: OutboxBatch) {
        if let Err(refused) = self.tx.try_send(batch) {
            crate::metrics::record_notify_deferred();
            let batch = refused.into_inner();
            self.deferred.note(&[batch.id], &batch.events);
            self.backlog_suspected.store(true, Ordering::Release);
        }
    }
}

/// The outbox rows of the batches this gateway left to the catch-up (its publisher was behind, or Redis failed
/// or was down when they came), kept while the catch-up's grace may still hold them back. On shutdown they are
/// published at once (`run_catchup`), so a graceful stop leaves none of its events waiting for another
/// replica's safety scan or the next start; the catch-up publishes them by itself once they are past the grace,
/// and they are forgotten after that.
#[derive(Debug)]
struct Deferred {
    /// How long a row is kept: the grace and one catch-up interval.
    keep: Duration,
    /// (when, outbox id, events, bytes of bodies), oldest first.
    rows: Mutex<VecDeque<(Instant, i64, i64, i64)>>,
}

impl Deferred {
    /// Keeps the outbox rows `ids`, which together queue `events`.
    fn note(&self, ids: &[i64], events: &[StoredEvent]) {
        self.note_at(ids, events, Instant::now());
    }

    /// As `note`, at `now`. A round trip's rows are kept with an even share of its events and bytes each:
    /// only the pages of the final publish are sized by them.
    fn note_at(&self, ids: &[i64], events: &[StoredEvent], now: Instant) {
        let rows_n = ids.len().max(1);
        let share = |total: usize| i64::try_from(total.div_ceil(rows_n)).unwrap_or(i64::MAX);
        let (events_each, bytes_each) = (share(events.len()), share(events.iter().map(|e| e.body.len()).sum()));
        if let Ok(mut rows) = self.rows.lock() {
            while rows.front().is_some_and(|(at, ..)| now.duration_since(*at) > self.keep) {
                rows.pop_front();
            }
            rows.extend(ids.iter().map(|id| (now, *id, events_each, bytes_each)));
        }
    }

    /// Takes the rows kept, in pages of at most `limit` (at least one row each).
    fn take_pages(&self, limit: PageLimit) -> Vec<Vec<i64>> {
        let rows = self.rows.lock().map(|mut rows| std::mem::take(&mut *rows)).unwrap_or_default();
        let mut pages: Vec<Vec<i64>> = Vec::new();
        let (mut events, mut bytes) = (0, 0);
        for (_, id, row_events, row_bytes) in rows {
            let fits = events + row_events <= limit.events && bytes + row_bytes <= limit.body_bytes;
            match pages.last_mut() {
                Some(page) if fits => page.push(id),
                _ => {
                    pages.push(vec![id]);
                    (events, bytes) = (0, 0);
                }
            }
            events += row_events;
            bytes += row_bytes;
        }
        pages
    }
}

/// Publishes stored events to their streams; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    pool: deadpool_redis::Pool,
    config: Arc<NotifyConfig>,
    store: Store,
    redis_up: Arc<AtomicBool>,
    /// Set whenever an event may have been left in the outbox (a failed publish or mark, a deferred
    /// batch): the next catch-up tick then scans it.
    backlog_suspected: Arc<AtomicBool>,
    /// The batches it left to the catch-up lately, published at shutdown.
    deferred: Arc<Deferred>,
    /// The "cannot publish" warning, at most once per `warn_interval_s`.
    failure_warning: Arc<WarnThrottle>,
    /// How Redis persists, as last read (None until Redis has answered).
    persistence: Arc<Mutex<Option<RedisPersistence>>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Notifier {
    pub fn new(config: &NotifyConfig, store: Store) -> Result<Self, NotifyError> {
        crate::use_ring_for_tls();
        let timeout = Some(Duration::from_millis(config.command_timeout_ms));
        let mut pool_config = deadpool_redis::PoolConfig::new(config.pool_max);
        pool_config.timeouts = deadpool_redis::Timeouts { wait: timeout, create: timeout, recycle: timeout };
        // redis-rs gives up on an answer after 500 ms of its own, and on a connection after 1 s: the
        // configured timeout is the one that counts (a round trip cut at 500 ms by a slow fsync was counted
        // as failed and its events published twice, once by Redis when it caught up and once by the catch-up).
        let connection =
            redis::AsyncConnectionConfig::new().set_response_timeout(timeout).set_connection_timeout(timeout);
        let manager = deadpool_redis::Manager::new_with_config(config.redis_url.as_str(), connection)
            .map_err(NotifyError::Url)?;
        let pool = deadpool_redis::Pool::builder(manager)
            .config(pool_config)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .map_err(NotifyError::Build)?;
        Ok(Self {
            pool,
            config: Arc::new(config.clone()),
            store,
            redis_up: Arc::new(AtomicBool::new(true)),
            // At start-up the outbox may hold what a crash left behind.
            backlog_suspected: Arc::new(AtomicBool::new(true)),
            deferred: Arc::new(Deferred {
                keep: Duration::from_millis(config.catchup_grace_ms + config.catchup_interval_ms),
                rows: Mutex::new(VecDeque::new()),
            }),
            failure_warning: Arc::new(WarnThrottle::new(Duration::from_secs(config.warn_interval_s))),
            persistence: Arc::new(Mutex::new(None)),
        })
    }

    /// One pipelined round trip: an `XADD` per event (and a `PUBLISH` when configured), inside
    /// `MULTI`/`EXEC`. Not for atomicity: Redis reads a pipeline 16 KiB at a time and, with
    /// `appendfsync always`, appends and fsyncs its AOF after each read that ran a command, so a plain
    /// pipeline of 500 1 KiB events cost ~40 fsyncs. Queued commands run only at `EXEC`: one fsync.
    pub async fn publish(&self, events: &[StoredEvent], path: &'static str) -> Result<(), NotifyError> {
        if events.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut keys: HashMap<&str, String> = HashMap::new();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for event in events {
            let key = keys.entry(&event.source).or_insert_with(|| self.config.stream_for(&event.source));
            pipe.cmd("XADD")
                .arg(key.as_str())
                .arg("MAXLEN")
                .arg("~")
                .arg(self.config.stream_maxlen)
                .arg("*")
                .arg("id")
                .arg(&event.id)
                .arg("source")
                .arg(&*event.source)
                .arg("type")
                .arg(&event.event_type)
                .arg("created")
                .arg(event.created.map(|c| c.to_string()).unwrap_or_default())
                .arg("livemode")
                .arg(event.livemode.map(|l| l.to_string()).unwrap_or_default())
                .arg("received_at")
                .arg(event.received_ms);
            if self.config.include_body {
                pipe.arg("body").arg(&event.body[..]);
            }
            pipe.ignore();
            if self.config.publish_channel {
                let message = serde_json::json!({ "id": event.id, "source": &*event.source, "type": event.event_type });
                pipe.cmd("PUBLISH").arg(format!("{key}:{}", event.event_type)).arg(message.to_string()).ignore();
            }
        }
        let timeout = Duration::from_millis(self.config.command_timeout_ms);
        let mut conn = tokio::time::timeout(timeout, self.pool.get()).await.map_err(|_| NotifyError::Timeout)??;
        tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await.map_err(|_| NotifyError::Timeout)??;
        crate::metrics::record_notify_publish(started.elapsed());
        let mut per_source: HashMap<&str, u64> = HashMap::new();
        for event in events {
            *per_source.entry(&event.source).or_default() += 1;
        }
        for (source, n) in per_source {
            crate::metrics::record_notify_published(source, path, n);
        }
        Ok(())
    }

    /// Runs one command on a pooled connection within `command_timeout_ms`; None when it did not answer.
    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Option<T> {
        let timeout = Duration::from_millis(self.config.command_timeout_ms);
        let attempt = async {
            let mut conn = self.pool.get().await?;
            Ok::<T, NotifyError>(command.query_async(&mut conn).await?)
        };
        tokio::time::timeout(timeout, attempt).await.ok()?.ok()
    }

    /// Asks Redis how it persists and whether it evicts: `INFO` (the append-only file on or off, the memory
    /// limit and eviction policy), which managed Redis services answer, then `CONFIG GET append*` for the fsync
    /// policy, which they may refuse.
    pub async fn redis_persistence(&self) -> RedisPersistence {
        let info = self.query::<redis::InfoDict>(&redis::cmd("INFO")).await;
        let mut settings = info.as_ref().map(RedisPersistence::settings_from_info).unwrap_or_default();
        let mut config_get = redis::cmd("CONFIG");
        config_get.arg("GET").arg("append*");
        if let Some(config) = self.query::<HashMap<String, String>>(&config_get).await {
            settings.extend(config);
        }
        RedisPersistence::from_config(&settings)
    }

    /// How Redis persisted when the catch-up last read it; None until Redis has answered.
    pub fn last_persistence(&self) -> Option<RedisPersistence> {
        self.persistence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Reads how Redis persists, warns when it can lose what it acknowledged, and records the reading (the
    /// `hookgate_notify_redis_durable` gauge). False when Redis did not answer, so that the caller asks again.
    async fn check_persistence(&self) -> bool {
        let persistence = self.redis_persistence().await;
        match &persistence {
            RedisPersistence::Durable => crate::metrics::record_notify_redis_durable(true),
            RedisPersistence::Weaker(settings) => {
                crate::metrics::record_notify_redis_durable(false);
                warn!(
                    redis = %settings,
                    "Redis can lose acknowledged stream entries, on a crash or by evicting a stream, after \
                     hookgate has deleted them from the outbox; run it with appendonly yes, appendfsync always \
                     and no allkeys-* eviction policy (`hookgate replay --since` republishes from Postgres)"
                );
            }
            RedisPersistence::Unknown if self.ping().await => {
                // Redis answers but refuses CONFIG (as some managed services do): asking again tells no more.
                debug!("Redis refuses CONFIG GET append*; cannot tell whether it fsyncs what it acknowledges");
            }
            RedisPersistence::Unknown => return false,
        }
        *self.persistence.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(persistence);
        true
    }

    async fn ping(&self) -> bool {
        self.query::<String>(&redis::cmd("PING")).await.is_some()
    }

    /// Records a failed publish: Redis is marked down (the catch-up will probe it), and a warning is logged
    /// at most once per `warn_interval_s`, not once per event.
    fn note_failure(&self, error: &NotifyError) {
        crate::metrics::record_notify_failure();
        self.redis_up.store(false, Ordering::Release);
        self.backlog_suspected.store(true, Ordering::Release);
        if self.failure_warning.due() {
            warn!(error = %error_chain(error), "cannot publish to Redis; events stay in the outbox until it is back");
        }
    }

    /// Publishes the events of whole batches from the workers; on success their outbox ids join `to_mark`, and
    /// otherwise they are kept for the publish at shutdown (`Deferred`).
    async fn publish_new(&self, events: &[StoredEvent], outbox_ids: &[i64], to_mark: &mut Vec<i64>) {
        if !self.redis_up.load(Ordering::Acquire) {
            // Redis is down: the catch-up publishes these once it is back.
            self.backlog_suspected.store(true, Ordering::Release);
            self.deferred.note(outbox_ids, events);
            return;
        }
        match self.publish(events, "normal").await {
            Ok(()) => to_mark.extend_from_slice(outbox_ids),
            Err(e) => {
                self.note_failure(&e);
                self.deferred.note(outbox_ids, events);
            }
        }
    }

    /// Deletes the outbox rows of published batches. Failing here only means a later catch-up publishes
    /// them again (at least once), so it is logged, not retried.
    async fn flush_marks(&self, to_mark: &mut Vec<i64>) {
        if to_mark.is_empty() {
            return;
        }
        if let Err(e) = self.store.mark_published(to_mark).await {
            warn!(error = %error_chain(&e), batches = to_mark.len(), "could not mark published events");
            self.backlog_suspected.store(true, Ordering::Release);
        }
        to_mark.clear();
    }

    /// Publishes the outbox's backlog, oldest first, until it is empty or Redis fails. Returns how many.
    ///
    /// Each page (outbox rows holding about `catchup_batch` events, or `catchup_page_mb` of bodies) is
    /// claimed while the previous one is on its way to Redis, so the database query and the Redis round
    /// trip overlap, and each claim resumes after the previous page's last outbox id.
    pub async fn catch_up(&self) -> Result<u64, NotifyError> {
        let grace = Duration::from_millis(self.config.catchup_grace_ms);
        let page = self.page_limit();
        let mut published = 0;
        let mut claimed = self.store.claim_unpublished(grace, 0, page).await?;
        while let Some(last_id) = claimed.last_id() {
            let n = claimed.events.len() as u64;
            // A page that ran out of rows means the backlog is drained (as far as the grace allows).
            let claim_next = async {
                if claimed.full {
                    Some(self.store.claim_unpublished(grace, last_id, page).await)
                } else {
                    None
                }
            };
            let (sent, next) = tokio::join!(self.publish(&claimed.events, "catchup"), claim_next);
            // On failure the claims are dropped: their transactions roll back and the rows stay unpublished.
            sent?;
            claimed.mark_published().await?;
            crate::metrics::record_notify_catchup_batch();
            published += n;
            match next {
                Some(next) => claimed = next?,
                None => break,
            }
        }
        Ok(published)
    }

    /// The publisher task: runs until every worker has dropped its sender. Whatever has queued up while a
    /// round trip (or an outbox delete) was in flight goes out in the next one, up to `PUBLISH_MAX` events:
    /// a publisher that fell behind catches up with bigger pipelines instead of leaving batches to the
    /// outbox; an idle publisher lingers for more (`next_round_trip`). Marks are grouped (every
    /// `MARK_INTERVAL` or `MARK_MAX` batches): one outbox commit for many batches. They are deleted inline,
    /// so a published row stays in the outbox only while its delete is due or running, well under
    /// `catchup_grace_ms`: the catch-up never republishes what this path has published. (A separate delete
    /// task was tried: when its deletes fell behind the grace, the catch-up claimed the published rows,
    /// republished them and held locks the deletes waited on.)
    pub async fn run_publisher(self, mut batches: mpsc::Receiver<OutboxBatch>) {
        let mut to_mark: Vec<i64> = Vec::new();
        let mut marked_at = Instant::now();
        let mut queued: Vec<OutboxBatch> = Vec::new();
        let linger = Duration::from_millis(self.config.publish_linger_ms);
        loop {
            let marks_due_in = (!to_mark.is_empty()).then(|| MARK_INTERVAL.saturating_sub(marked_at.elapsed()));
            if !next_round_trip(&mut batches, &mut queued, linger, marks_due_in).await {
                break;
            }
            for trip in round_trips(queued.drain(..)) {
                self.publish_new(&trip.events, &trip.outbox_ids, &mut to_mark).await;
            }
            if to_mark.len() >= MARK_MAX || (!to_mark.is_empty() && marked_at.elapsed() >= MARK_INTERVAL) {
                self.flush_marks(&mut to_mark).await;
            }
            if to_mark.is_empty() {
                marked_at = Instant::now();
            }
        }
        self.flush_marks(&mut to_mark).await;
        debug!("publisher stopped");
    }

    /// The catch-up task: at start (crash recovery), then each `catchup_interval_ms` for a grace period
    /// after a backlog became possible (Redis was down, a batch was deferred or not marked), and every 30 s
    /// regardless, until `stop`. The pending gauge is counted at each scan, and each tick while Redis is down.
    /// How Redis persists is read at start, until Redis first answers, and again after each outage (a
    /// restarted or failed-over Redis may persist differently).
    pub async fn run_catchup(self, stop: CancellationToken) {
        let mut persistence_read = self.check_persistence().await;
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.catchup_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_scan: Option<Instant> = None;
        // Once a backlog is suspected, scan every tick for a whole grace period: rows deferred just now are
        // younger than the grace and only claimable once it has passed.
        let mut scan_until: Option<Instant> = None;
        let window = Duration::from_millis(self.config.catchup_grace_ms + self.config.catchup_interval_ms);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            if !self.redis_up.load(Ordering::Acquire) {
                // While Redis is down the backlog grows: count it every tick (the pending gauge).
                self.update_pending().await;
                if !self.ping().await {
                    continue;
                }
                info!("Redis is reachable again; publishing the outbox");
                self.redis_up.store(true, Ordering::Release);
                persistence_read = false;
            }
            if !persistence_read {
                persistence_read = self.check_persistence().await;
            }
            if self.backlog_suspected.swap(false, Ordering::AcqRel) {
                scan_until = Some(Instant::now() + window);
            }
            let due = scan_until.is_some_and(|until| Instant::now() < until)
                || last_scan.is_none_or(|at| at.elapsed() >= SAFETY_SCAN_INTERVAL);
            if !due {
                continue;
            }
            last_scan = Some(Instant::now());
            let result = self.catch_up().await;
            // Counted only when a scan is due, not every tick: on a busy outbox the count walks every row
            // deleted since the last vacuum. A backlog left (rows past the grace that this scan did not
            // publish: another replica's, or aged past it during the scan) keeps the scans going, so the
            // gauge is not left showing a backlog that is gone until the next safety scan, 30 s later.
            if self.update_pending().await > 0 {
                self.backlog_suspected.store(true, Ordering::Release);
            }
            match result {
                Ok(0) => {}
                Ok(n) => {
                    info!(published = n, "outbox catch-up published events");
                    // Rows younger than the grace may still be waiting: look again next tick.
                    self.backlog_suspected.store(true, Ordering::Release);
                }
                Err(NotifyError::Store(e)) => {
                    debug!(error = %error_chain(&e), "outbox catch-up: database unavailable");
                    self.backlog_suspected.store(true, Ordering::Release);
                }
                Err(e) => self.note_failure(&e),
            }
        }
        // The workers have drained: publish what this gateway left to the catch-up, old or young.
        match self.publish_deferred().await {
            Ok(0) => {}
            Ok(n) => info!(published = n, "published the events left to the catch-up before stopping"),
            Err(e) => warn!(
                error = %error_chain(&e),
                "events left to the catch-up were not published before stopping: they stay in the outbox for \
                 another replica or the next start"
            ),
        }
    }

    /// Publishes the outbox rows this gateway deferred lately (`Deferred`) that are still there. Returns how
    /// many events. With Redis down they stay, as the rest of the backlog does.
    async fn publish_deferred(&self) -> Result<u64, NotifyError> {
        if !self.redis_up.load(Ordering::Acquire) {
            return Ok(0);
        }
        let mut published = 0;
        for page in self.deferred.take_pages(self.page_limit()) {
            let claimed = self.store.claim_rows(&page).await?;
            if claimed.last_id().is_none() {
                continue;
            }
            let n = claimed.events.len() as u64;
            self.publish(&claimed.events, "catchup").await?;
            claimed.mark_published().await?;
            crate::metrics::record_notify_catchup_batch();
            published += n;
        }
        Ok(published)
    }

    /// The workers' end of the publisher's queue (bounded to `capacity` batches), and the publisher's end.
    pub fn queue(&self, capacity: usize) -> (NotifyQueue, mpsc::Receiver<OutboxBatch>) {
        let (tx, rx) = mpsc::channel(capacity);
        (NotifyQueue { tx, backlog_suspected: self.backlog_suspected.clone(), deferred: self.deferred.clone() }, rx)
    }

    /// Counts the backlog for the pending gauge; returns it (0 when the database did not answer).
    async fn update_pending(&self) -> i64 {
        let grace = Duration::from_millis(self.config.catchup_grace_ms);
        match self.store.count_unpublished(grace).await {
            Ok(pending) => {
                crate::metrics::record_notify_pending(pending);
                pending
            }
            Err(_) => 0,
        }
    }

    /// What one catch-up or replay page may hold.
    fn page_limit(&self) -> PageLimit {
        PageLimit {
            events: i64::from(self.config.catchup_batch),
            body_bytes: i64::from(self.config.catchup_page_mb) * 1024 * 1024,
        }
    }

    /// Republishes stored events matching `filter`, in order of receipt, in pages; `progress` is called
    /// with the running count. Returns how many were published.
    pub async fn replay(&self, filter: &ReplayFilter, mut progress: impl FnMut(u64)) -> Result<u64, NotifyError> {
        let page = self.page_limit();
        let (mut after, mut published) = (ReplayPosition::default(), 0u64);
        loop {
            let (events, next) = self.store.replay_page(filter, after, page).await?;
            if events.is_empty() {
                return Ok(published);
            }
            after = next;
            self.publish(&events, "replay").await?;
            published += events.len() as u64;
            progress(published);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `n` events with seqs from `first_seq`; its outbox id is its first seq.
    fn batch(first_seq: i64, n: usize) -> OutboxBatch {
        let events = (0..n)
            .map(|i| {
                let seq = first_seq + i64::try_from(i).unwrap_or(0);
                StoredEvent {
                    seq,
                    source: Arc::from("stripe"),
                    id: format!("evt_{seq}"),
                    event_type: "charge.succeeded".into(),
                    created: None,
                    livemode: None,
                    received_ms: 0,
                    body: bytes::Bytes::from_static(b"{}"),
                }
            })
            .collect();
        OutboxBatch { id: first_seq, events }
    }

    #[test]
    fn deferred_rows_are_kept_for_the_grace_and_taken_in_pages_of_whole_rows() {
        let deferred = Deferred { keep: Duration::from_secs(6), rows: Mutex::new(VecDeque::new()) };
        let start = Instant::now();
        let note_at = |batch: OutboxBatch, at: Instant| deferred.note_at(&[batch.id], &batch.events, at);
        note_at(batch(1, 3), start);
        note_at(batch(10, 2), start + Duration::from_secs(1));
        // A row older than the keep is the catch-up's by then: by the last note the first two are forgotten.
        note_at(batch(20, 4), start + Duration::from_secs(7));
        note_at(batch(30, 1), start + Duration::from_secs(7));
        note_at(batch(40, 5), start + Duration::from_secs(8));
        // Each body is 2 bytes: pages of at most 5 events or 12 bytes, a row never split.
        let pages = deferred.take_pages(PageLimit { events: 5, body_bytes: 12 });
        assert_eq!(pages, vec![vec![20, 30], vec![40]]);
        assert!(deferred.take_pages(PageLimit { events: 5, body_bytes: 12 }).is_empty(), "taken once");
        note_at(batch(50, 9), start + Duration::from_secs(9));
        assert_eq!(deferred.take_pages(PageLimit { events: 5, body_bytes: 12 }), vec![vec![50]], "a row over the page");
        // A round trip of three rows and six events that failed: each row kept with two events.
        let trip = batch(60, 6);
        deferred.note_at(&[60, 61, 62], &trip.events, start + Duration::from_secs(10));
        assert_eq!(deferred.take_pages(PageLimit { events: 4, body_bytes: 100 }), vec![vec![60, 61], vec![62]]);
    }

    /// Sends a batch `first_after` the start and another `second_after` it, and forms one round trip as
    /// the publisher does: returns its seqs and how long it took to form (paused clock: no wall clock).
    async fn first_round_trip(linger: Duration, first_after: Duration, second_after: Duration) -> (Vec<i64>, Duration) {
        let (tx, mut rx) = mpsc::channel(8);
        let started = tokio::time::Instant::now();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(first_after).await;
            let _ = tx.send(batch(1, 2)).await;
            tokio::time::sleep(second_after.saturating_sub(first_after)).await;
            let _ = tx.send(batch(10, 3)).await;
        });
        tokio::task::yield_now().await;
        let mut queued = Vec::new();
        assert!(next_round_trip(&mut rx, &mut queued, linger, None).await);
        let took = started.elapsed();
        sender.abort();
        (queued.into_iter().flat_map(|b| b.events).map(|e| e.seq).collect(), took)
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn round_trips_take_whole_batches_up_to_the_publish_limit() {
        let half = PUBLISH_MAX / 2;
        let seqs = |trip: &RoundTrip| trip.events.iter().map(|e| e.seq).collect::<Vec<_>>();
        // 100 + half fit together; the next half would pass the limit, so it starts a round trip.
        let trips = round_trips([batch(1, 100), batch(1_000, half), batch(2_000, half), batch(3_000, 1)]);
        let ids: Vec<Vec<i64>> = trips.iter().map(|t| t.outbox_ids.clone()).collect();
        assert_eq!(ids, vec![vec![1, 1_000], vec![2_000, 3_000]]);
        assert_eq!(trips[0].events.len(), 100 + half);
        assert_eq!(seqs(&trips[1])[..2], [2_000, 2_001]);
        // A batch bigger than the limit is not split: it goes alone, between its neighbours.
        let trips = round_trips([batch(1, 2), batch(10_000, PUBLISH_MAX + 5), batch(20_000, 2)]);
        let sizes: Vec<(usize, Vec<i64>)> = trips.iter().map(|t| (t.events.len(), t.outbox_ids.clone())).collect();
        assert_eq!(sizes, vec![(2, vec![1]), (PUBLISH_MAX + 5, vec![10_000]), (2, vec![20_000])]);
        assert!(round_trips([]).is_empty());
    }

    fn redis_config(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn only_an_append_only_file_fsynced_on_every_write_counts_as_durable() {
        let durable = redis_config(&[("appendonly", "yes"), ("appendfsync", "always"), ("appendfilename", "a.aof")]);
        assert_eq!(RedisPersistence::from_config(&durable), RedisPersistence::Durable);
        let everysec = redis_config(&[("appendonly", "yes"), ("appendfsync", "everysec")]);
        assert_eq!(
            RedisPersistence::from_config(&everysec),
            RedisPersistence::Weaker("appendonly yes, appendfsync everysec".into())
        );
        let no_aof = redis_config(&[("appendonly", "no"), ("appendfsync", "always")]);
        assert!(matches!(RedisPersistence::from_config(&no_aof), RedisPersistence::Weaker(_)));
        assert_eq!(RedisPersistence::from_config(&HashMap::new()), RedisPersistence::Unknown);
    }

    /// Where `CONFIG` is refused (managed Redis services), `INFO` still tells an append-only file that is off
    /// and an eviction policy that can drop a stream; an append-only file that is on leaves it unknown.
    #[test]
    fn info_alone_tells_what_is_weaker_and_leaves_the_fsync_policy_unknown() {
        let info = |text: &str| RedisPersistence::settings_from_info(&redis::InfoDict::new(text));
        let memory = "# Memory\r\nused_memory:1000\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n";
        let on = info(&format!("{memory}# Persistence\r\naof_enabled:1\r\n"));
        assert_eq!(on["appendonly"], "yes");
        assert_eq!(RedisPersistence::from_config(&on), RedisPersistence::Unknown);
        let off = info(&format!("{memory}# Persistence\r\naof_enabled:0\r\n"));
        assert_eq!(
            RedisPersistence::from_config(&off),
            RedisPersistence::Weaker("appendonly no, appendfsync unknown".into())
        );
        let evicting = info("maxmemory:104857600\r\nmaxmemory_policy:allkeys-lru\r\naof_enabled:1\r\n");
        assert_eq!(
            RedisPersistence::from_config(&evicting),
            RedisPersistence::Weaker(
                "appendonly yes, appendfsync unknown, maxmemory 104857600, maxmemory-policy allkeys-lru".into()
            )
        );
        // CONFIG's answer, merged over INFO's, completes it.
        let mut both = on;
        both.insert("appendfsync".into(), "always".into());
        assert_eq!(RedisPersistence::from_config(&both), RedisPersistence::Durable);
    }

    #[test]
    fn only_an_allkeys_eviction_policy_under_a_memory_limit_can_evict_a_stream() {
        let with = |maxmemory: &str, policy: &str| {
            let pairs = [("appendonly", "yes"), ("appendfsync", "always"), ("maxmemory", maxmemory)];
            let mut config = redis_config(&pairs);
            config.insert("maxmemory-policy".into(), policy.into());
            RedisPersistence::from_config(&config)
        };
        assert_eq!(
            with("104857600", "allkeys-lru"),
            RedisPersistence::Weaker(
                "appendonly yes, appendfsync always, maxmemory 104857600, maxmemory-policy allkeys-lru".into()
            )
        );
        assert!(matches!(with("104857600", "allkeys-random"), RedisPersistence::Weaker(_)));
        // No limit: nothing is evicted, whatever the policy.
        assert_eq!(with("0", "allkeys-lru"), RedisPersistence::Durable);
        // Streams have no time to live, and a full Redis under noeviction refuses the write instead.
        assert_eq!(with("104857600", "volatile-lru"), RedisPersistence::Durable);
        assert_eq!(with("104857600", "noeviction"), RedisPersistence::Durable);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_arriving_within_the_linger_joins_the_round_trip() {
        let (seqs, took) = first_round_trip(5 * MS, 2 * MS, 4 * MS).await;
        assert_eq!(seqs, vec![1, 2, 10, 11, 12]);
        assert_eq!(took, 7 * MS, "the first batch at 2 ms, then the 5 ms linger");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_arriving_after_the_linger_waits_for_the_next_round_trip() {
        let (seqs, _) = first_round_trip(5 * MS, 2 * MS, 9 * MS).await;
        assert_eq!(seqs, vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_linger_the_publisher_does_not_wait() {
        let (seqs, took) = first_round_trip(Duration::ZERO, 2 * MS, 3 * MS).await;
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(took, 2 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_already_waiting_go_at_once_without_a_linger() {
        let (tx, mut rx) = mpsc::channel(8);
        tx.send(batch(1, 2)).await.expect("receiver alive");
        tx.send(batch(10, 1)).await.expect("receiver alive");
        let started = tokio::time::Instant::now();
        let mut queued = Vec::new();
        assert!(next_round_trip(&mut rx, &mut queued, 5 * MS, None).await);
        assert_eq!(started.elapsed(), Duration::ZERO, "paused clock: any sleep would have advanced it");
        assert_eq!(queued.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_round_trip_does_not_linger() {
        let (tx, mut rx) = mpsc::channel(8);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(MS).await;
            let _ = tx.send(batch(1, PUBLISH_MAX)).await;
            std::future::pending::<()>().await;
        });
        let started = tokio::time::Instant::now();
        let mut queued = Vec::new();
        assert!(next_round_trip(&mut rx, &mut queued, 5 * MS, None).await);
        assert_eq!(started.elapsed(), MS);
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn due_marks_end_the_wait_and_a_closed_queue_ends_the_publisher() {
        let (tx, mut rx) = mpsc::channel::<OutboxBatch>(8);
        let started = tokio::time::Instant::now();
        let mut queued = Vec::new();
        assert!(next_round_trip(&mut rx, &mut queued, 5 * MS, Some(100 * MS)).await);
        assert_eq!((queued.len(), started.elapsed()), (0, 100 * MS));
        drop(tx);
        assert!(!next_round_trip(&mut rx, &mut queued, 5 * MS, Some(100 * MS)).await);
    }
}
