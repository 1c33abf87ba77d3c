//! Postgres: the pool, migrations, and the one-round-trip batch insert that makes every event exactly-once.
//!
//! Knows nothing about HTTP. Errors are split into `Unavailable` (retry later: the database is down,
//! restarting or overloaded) and `Rejected` (the batch itself is refused; retrying cannot help).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions};
use sqlx::{Connection, Executor as _, PgConnection, PgPool, Postgres, Row, Transaction};

use crate::config::StoreConfig;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store.url")]
    Url(#[source] sqlx::Error),
    #[error("invalid store.migrate_url")]
    MigrateUrl(#[source] sqlx::Error),
    #[error("the database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// SQLSTATE 25006: the server takes no writes. A connection opened during a failover can reach the old
    /// primary, back as a standby, and an operator fencing a primary sets `default_transaction_read_only`, which
    /// applies to open sessions too. Transient: the connection is closed, and the retry opens a new one.
    #[error(
        "the database is read-only (a standby reached during a failover, or default_transaction_read_only): \
         retrying on a new connection"
    )]
    ReadOnly(#[source] sqlx::Error),
    #[error("the database refused the batch")]
    Rejected(#[source] sqlx::Error),
    /// One server connection saw another client's prepared statements, or lost its own: a pooler in transaction
    /// mode hands each statement to whichever server connection is free.
    #[error(
        "a connection pooler in transaction mode sits between hookgate and Postgres (PgBouncer's pool_mode = \
         transaction, a managed database's transaction pool): set store.transaction_pooler = true (and \
         store.migrate_url to Postgres itself), or use session pooling or a direct connection"
    )]
    PoolerInTransactionMode(#[source] sqlx::Error),
    #[error("migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The shutdown's drain ran out of time before the statement could be written.
    #[error("not written: the shutdown's drain ran out of time")]
    Aborted,
    /// Migrations hold a session-level advisory lock and prepare named statements: not through a transaction
    /// pooler.
    #[error(
        "migrations need a direct connection to Postgres, and store.url goes through a transaction pooler \
         (store.transaction_pooler): set store.migrate_url to Postgres itself"
    )]
    MigrateNeedsDirectConnection,
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::ReadOnly(_))
    }

    /// Refused for what one of the rows holds (SQLSTATE class 22 data exception, 23 integrity constraint
    /// violation: a `CHECK` of the operator's own, a value a column refuses; P0, PL/pgSQL: a trigger of theirs
    /// that raises an exception, `P0001` unless it names another code; a code in no class of Postgres's own,
    /// which only the operator's code raises: `RAISE ... USING ERRCODE = 'HG001'` in a trigger; a row-level
    /// security policy's `WITH CHECK`), not for the statement or the database: written apart, the other rows
    /// pass. (Should such an error not be about one row after all, the halves fail too, down to each event:
    /// the same outcome, for a few more statements.)
    pub fn blames_a_row(&self) -> bool {
        let StoreError::Rejected(sqlx::Error::Database(db)) = self else { return false };
        let Some(code) = db.code() else { return false };
        ["22", "23", "P0"].iter().any(|class| code.starts_with(class))
            || !POSTGRES_CLASSES.iter().any(|class| code.starts_with(class))
            // A policy's refusal shares 42501 with a revoked privilege, which refuses every row: only the
            // message tells them apart (in English, as the server answers unless its `lc_messages` names a
            // translation; translated, the whole batch fails).
            || (code == "42501" && db.message().starts_with("new row violates row-level security policy"))
    }

    /// Which of `ids` (a refused statement's events) the refusal names, when it names exactly one: a `CHECK`'s
    /// detail lists the failing row's values ("Failing row contains (stripe, evt_1, ...)", each value cut to
    /// 64 bytes), and a trigger's message may name its event. An id found inside another id found is not
    /// counted (`evt_1` in `evt_10`). Only a guess to split around: a wrong one costs statements, not events.
    pub fn named_event<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Option<usize> {
        let StoreError::Rejected(sqlx::Error::Database(db)) = self else { return None };
        let detail = db.try_downcast_ref::<PgDatabaseError>().and_then(PgDatabaseError::detail).unwrap_or("");
        let message = db.message();
        let found: Vec<(usize, &str)> = ids
            .into_iter()
            .enumerate()
            .filter(|(_, id)| !id.is_empty() && (detail.contains(id) || message.contains(id)))
            .collect();
        let mut named =
            found.iter().filter(|(_, id)| !found.iter().any(|(_, other)| other.len() > id.len() && other.contains(id)));
        match (named.next(), named.next()) {
            (Some(&(index, _)), None) => Some(index),
            _ => None,
        }
    }
}

/// The SQLSTATE classes Postgres itself raises (the sections of Postgres 15's `errcodes.txt`).
const POSTGRES_CLASSES: [&str; 43] = [
    "00", "01", "02", "03", "08", "09", "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21", "22", "23", "24", "25", "26",
    "27", "28", "2B", "2D", "2F", "34", "38", "39", "3B", "3D", "3F", "40", "42", "44", "53", "54", "55", "57", "58",
    "72", "F0", "HV", "P0", "XX",
];

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // First: one of the pooler's answers is a protocol violation (class 08), which would read as transient.
        if let sqlx::Error::Database(db) = &e {
            if pooler_in_transaction_mode(db.code().as_deref(), db.message()) {
                return StoreError::PoolerInTransactionMode(e);
            }
        }
        if is_read_only(&e) {
            StoreError::ReadOnly(e)
        } else if is_transient(&e) {
            StoreError::Unavailable(e)
        } else {
            StoreError::Rejected(e)
        }
    }
}

/// SQLSTATE 25006 read_only_sql_transaction: a write reached a server that takes none.
fn is_read_only(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("25006"))
}

/// What Postgres answers when sqlx's named prepared statements (`sqlx_s_<n>`, one set per client connection)
/// meet server connections shared between clients: 42P05 "prepared statement ... already exists" (another
/// client prepared the same name there), 26000 "... does not exist" (its own went to another server), or
/// 08P01 "bind message supplies 1 parameters, but prepared statement ... requires 9" (the name there is another
/// client's statement).
fn pooler_in_transaction_mode(code: Option<&str>, message: &str) -> bool {
    matches!(code, Some("42P05" | "26000" | "08P01")) && message.contains("prepared statement \"sqlx_s_")
}

/// Connection loss, timeouts, and the SQLSTATE classes that mean "try again": 08 connection exception,
/// 40 transaction rollback (serialization, deadlock), 53 insufficient resources, 57P admin shutdown / starting up,
/// 57014 query canceled (a `statement_timeout`, as managed databases set per role, or `pg_cancel_backend`)
/// and 55P03 lock not available (a `lock_timeout`): a batch that waited out a stall is tried again, not given
/// up, which in enqueue mode would drop events already acknowledged.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            ["08", "40", "53", "57P"].iter().any(|class| c.starts_with(class)) || c == "57014" || c == "55P03"
        }),
        _ => false,
    }
}

/// An event ready to be written: the extracted columns and the raw body.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: Arc<str>,
    pub id: String,
    pub event_type: String,
    pub created: Option<i64>,
    pub livemode: Option<bool>,
    pub api_version: Option<String>,
    pub account: Option<String>,
    pub body: Bytes,
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Queue new events in the outbox (only when notifications are on; otherwise it would only grow).
    outbox: bool,
    /// `store.transaction_pooler`: a pooler in transaction mode hands each transaction to whichever server
    /// connection is free, so statements are prepared unnamed, each time, inside a transaction (see `Session`).
    transaction_pooler: bool,
    /// `store.migrate_url`: where migrations run, when not through the pool.
    migrate_options: Option<PgConnectOptions>,
}

/// The connection a statement runs on. Directly (or through a session pooler), a pooled connection whose
/// prepared statements stay on it. Behind a transaction pooler, a transaction of its own: sqlx prepares an
/// unnamed statement in one round trip and runs it in the next, and only inside a transaction does the
/// pooler keep the two on one server connection.
enum Session {
    Pooled(PoolConnection<Postgres>),
    Transaction(Transaction<'static, Postgres>),
}

impl Session {
    fn connection(&mut self) -> &mut PgConnection {
        match self {
            Session::Pooled(connection) => connection,
            Session::Transaction(tx) => tx,
        }
    }

    /// Ends the statement: on success, commits its own transaction if it has one (for a write, it is durable
    /// only then). A pooled connection that found the server read-only is closed instead of going back to
    /// the pool, where it would stay read-only (its server a standby, or its session made so), so that the
    /// retry connects anew, to the primary once the failover is done.
    async fn finish<T>(mut self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        match result {
            Ok(value) => {
                if let Session::Transaction(tx) = self {
                    tx.commit().await?;
                }
                Ok(value)
            }
            Err(e) => {
                if let (Session::Pooled(connection), true) = (&mut self, is_read_only(&e)) {
                    connection.close_on_drop();
                }
                Err(e.into())
            }
        }
    }
}

/// One statement per batch: insert what is new, and (with `$9`) queue it in the outbox in the same commit,
/// as one outbox row holding the keys of the batch's new events (none when every event was a duplicate)
/// and the bytes of their bodies (which bound the catch-up's pages).
/// The two `array_agg`s read the same rows in the same order, so `sources[i]` and `event_ids[i]` stay one
/// key; an `ORDER BY seq` in them would add two sorts per batch for an order only the catch-up uses.
const INSERT_BATCH: &str = "
WITH inserted AS (
    INSERT INTO events (source, event_id, event_type, created, livemode, api_version, account, body)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[], $6::text[], $7::text[], $8::bytea[])
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING source, event_id, seq, received_at, octet_length(body) AS body_bytes
), queued AS (
    INSERT INTO events_outbox (sources, event_ids, body_bytes)
    SELECT array_agg(source), array_agg(event_id), sum(body_bytes) FROM inserted WHERE $9 HAVING count(*) > 0
    RETURNING id
)
SELECT source, event_id, seq, (extract(epoch FROM received_at) * 1000)::int8, (SELECT id FROM queued) FROM inserted";

/// The columns a notification carries, in the order `StoredEvent::from_row` reads them (`e`: events).
const NOTIFY_COLUMNS: &str = "e.seq, e.source, e.event_id, e.event_type, e.created, e.livemode, \
    (extract(epoch FROM e.received_at) * 1000)::int8, e.body";

/// What a batch insert did: for each event in order, where it was inserted (`None`: already stored), and
/// the outbox row that queues the new ones for publishing (`None` when nothing was new, or without outbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub rows: Vec<Option<Inserted>>,
    pub outbox_id: Option<i64>,
}

/// Where a new row landed: its order of receipt and receive time, for its notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub seq: i64,
    pub received_ms: i64,
}

/// A stored event as a notification needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: i64,
    pub source: Arc<str>,
    pub id: String,
    pub event_type: String,
    pub created: Option<i64>,
    pub livemode: Option<bool>,
    pub received_ms: i64,
    pub body: Bytes,
}

impl StoredEvent {
    /// Builds a notification for a row just inserted, without reading it back.
    pub fn from_new(event: &NewEvent, at: Inserted) -> Self {
        Self {
            seq: at.seq,
            source: event.source.clone(),
            id: event.id.clone(),
            event_type: event.event_type.clone(),
            created: event.created,
            livemode: event.livemode,
            received_ms: at.received_ms,
            body: event.body.clone(),
        }
    }

    fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        let source: String = row.try_get(1)?;
        let body: Vec<u8> = row.try_get(7)?;
        Ok(Self {
            seq: row.try_get(0)?,
            source: Arc::from(source),
            id: row.try_get(2)?,
            event_type: row.try_get(3)?,
            created: row.try_get(4)?,
            livemode: row.try_get(5)?,
            received_ms: row.try_get(6)?,
            body: Bytes::from(body),
        })
    }
}

/// The new events of one stored batch and the outbox row that queues them: published together, and the
/// row is deleted only once all of them are on their streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxBatch {
    pub id: i64,
    pub events: Vec<StoredEvent>,
}

/// Outbox rows claimed for publishing: locked (`FOR UPDATE SKIP LOCKED`) in an open transaction, so
/// another replica's catch-up skips them. Marking commits; dropping rolls back and releases them.
pub struct Claimed {
    tx: Transaction<'static, Postgres>,
    /// Named prepared statements (not behind a transaction pooler).
    named: bool,
    /// The claimed rows' events, oldest first.
    pub events: Vec<StoredEvent>,
    /// The claimed rows, oldest first; a row whose events are no longer stored is here too, to be deleted.
    outbox_ids: Vec<i64>,
    /// The page stopped at a limit, not for want of rows: more may be waiting behind it.
    pub full: bool,
}

impl Claimed {
    /// The highest outbox id claimed, or `None` for an empty claim.
    pub fn last_id(&self) -> Option<i64> {
        self.outbox_ids.last().copied()
    }

    pub async fn mark_published(mut self) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM events_outbox WHERE id = ANY($1)")
            .persistent(self.named)
            .bind(&self.outbox_ids)
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// Locks the outbox rows of ids `$1` queued more than `$2` seconds ago (`SKIP LOCKED`) and reads their events,
/// row by row in order. A LEFT JOIN keeps, as one row of NULLs, an event that is no longer stored: its outbox
/// row is claimed (and deleted) all the same.
fn lock_and_read_rows() -> String {
    format!(
        "WITH claimed AS ( \
             SELECT id, sources, event_ids FROM events_outbox \
             WHERE id = ANY($1) AND queued_at < now() - make_interval(secs => $2) \
             FOR UPDATE SKIP LOCKED \
         ) \
         SELECT {NOTIFY_COLUMNS}, c.id FROM claimed c \
         CROSS JOIN LATERAL unnest(c.sources, c.event_ids) WITH ORDINALITY AS k(source, event_id, n) \
         LEFT JOIN events e ON (e.source, e.event_id) = (k.source, k.event_id) \
         ORDER BY c.id, k.n"
    )
}

/// Adds the rows of `lock_and_read_rows` to a claim's events and outbox ids; returns the bytes of bodies read.
fn read_claimed_rows(
    rows: &[sqlx::postgres::PgRow],
    events: &mut Vec<StoredEvent>,
    outbox_ids: &mut Vec<i64>,
) -> Result<i64, StoreError> {
    let mut bytes = 0;
    for row in rows {
        let id: i64 = row.try_get(8)?;
        if outbox_ids.last() != Some(&id) {
            outbox_ids.push(id);
        }
        if row.try_get::<Option<i64>, _>(0)?.is_some() {
            let event = StoredEvent::from_row(row)?;
            bytes += i64::try_from(event.body.len()).unwrap_or(i64::MAX);
            events.push(event);
        }
    }
    Ok(bytes)
}

/// How much one catch-up or replay page may hold: events, and bytes of their bodies (what the page keeps in
/// memory, twice over while the next page is claimed during a publish). A page takes at least one outbox
/// row, or in a replay one event, so it passes a limit by at most that one: a row holds one batch, whose
/// bodies the gateway once held together within `queue.body_memory_mb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit {
    pub events: i64,
    pub body_bytes: i64,
}

/// Where a replay has got to: the last event's receive time (µs since the epoch) and seq.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayPosition {
    pub received_us: i64,
    pub seq: i64,
}

/// Which stored events `hookgate replay` republishes.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub source: String,
    /// Received at or after (unix seconds).
    pub since: Option<i64>,
    /// Received before (unix seconds).
    pub until: Option<i64>,
    /// Event type pattern; `*` matches any run of characters.
    pub event_type: Option<String>,
}

impl ReplayFilter {
    fn type_like(&self) -> Option<String> {
        self.event_type
            .as_ref()
            .map(|p| p.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_").replace('*', "%"))
    }
}

/// Whether the connection to Postgres would use TLS without checking the certificate, or fall back to plain
/// text, without the operator having said so: no `sslmode` (in the URL or `PGSSLMODE`) and a host that is
/// neither loopback nor a Unix socket. sqlx, like libpq, then "prefers" TLS: unverified, and optional.
fn tls_left_unchecked(url: &str, options: &PgConnectOptions, pgsslmode_set: bool) -> bool {
    let mode_named = url.contains("sslmode=") || pgsslmode_set;
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !mode_named && !local
}

fn warn_if_tls_unchecked(url: &str, options: &PgConnectOptions) {
    if tls_left_unchecked(url, options, std::env::var_os("PGSSLMODE").is_some()) {
        tracing::warn!(
            host = options.get_host(),
            "store.url names no sslmode: TLS to Postgres is tried without checking its certificate, and \
             plain text is used if the server refuses; add ?sslmode=verify-full (or sslmode=disable on a \
             private network)"
        );
    }
}

/// Where a pruning run stops: it deletes events received before `before_us` (unix microseconds, the
/// database's clock). That is `retention.keep_days` ago, unless the outbox still holds a batch queued
/// before then (Redis was down that long): an event is received in the commit that queues it, so every
/// event received before the oldest queued batch is on its stream, and the run stops there instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneCutoff {
    pub before_us: i64,
    /// When the outbox holds the cutoff back: the queue time of its oldest batch.
    pub held_back_by_us: Option<i64>,
}

/// What one pruning statement deleted, and the newest receive time among those events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunedBatch {
    pub deleted: u64,
    pub newest_us: Option<i64>,
}

/// The Postgres advisory lock a pruning statement takes for its transaction, so that replicas sharing a
/// database do not delete the same rows at once ("hookprun").
pub const PRUNE_LOCK_KEY: i64 = 0x686f_6f6b_7072_756e;

impl Store {
    /// Builds the pool; connects lazily, so a gateway can start while the database restarts.
    pub fn new(config: &StoreConfig, outbox: bool) -> Result<Self, StoreError> {
        crate::use_ring_for_tls();
        let options: PgConnectOptions = config.url.parse().map_err(StoreError::Url)?;
        warn_if_tls_unchecked(&config.url, &options);
        let options = options.application_name("hookgate");
        let migrate_options = match &config.migrate_url {
            Some(url) => {
                let options: PgConnectOptions = url.parse().map_err(StoreError::MigrateUrl)?;
                warn_if_tls_unchecked(url, &options);
                Some(options.application_name("hookgate migrate"))
            }
            None => None,
        };
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_max)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(config.connect_timeout_ms))
            // A connection that failed mid-query must not be handed out again.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(Self { pool, outbox, transaction_pooler: config.transaction_pooler, migrate_options })
    }

    /// Applies the migrations not yet applied, on `store.migrate_url` when set (one connection of its own),
    /// else on the pool.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.migrate_options {
            Some(options) => {
                let mut connection = PgConnection::connect_with(options).await?;
                MIGRATOR.run_direct(&mut connection).await?;
                // The migrations are committed; a failed goodbye changes nothing.
                let _ = connection.close().await;
            }
            None if self.transaction_pooler => return Err(StoreError::MigrateNeedsDirectConnection),
            None => MIGRATOR.run(&self.pool).await?,
        }
        Ok(())
    }

    /// Whether statements are prepared once per connection under a name and kept (not behind a transaction
    /// pooler, where another client's statements may be on the server connection, or its own may not).
    fn named(&self) -> bool {
        !self.transaction_pooler
    }

    /// A connection for one statement (see `Session`); `finish` it after the statement.
    async fn session(&self) -> Result<Session, sqlx::Error> {
        Ok(if self.transaction_pooler {
            Session::Transaction(self.pool.begin().await?)
        } else {
            Session::Pooled(self.pool.acquire().await?)
        })
    }

    /// Opens `n` connections and prepares the batch insert on each (an empty batch; behind a transaction
    /// pooler, which keeps no statement, only opens them), so the first requests after a start do not wait
    /// for connection set-up and statement planning.
    pub async fn warm_up(&self, n: usize) {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            match self.pool.acquire().await {
                Ok(connection) => held.push(connection),
                Err(_) => break, // the database is not there yet: the pool connects on demand later
            }
        }
        if self.named() {
            for connection in &mut held {
                // Harmless when it fails (for example before migrations): the first batch prepares it then.
                let _ = self.insert_on(connection, &[]).await;
            }
        }
    }

    /// Is the database reachable, and does it take writes? A standby (the old primary after a failover, or a
    /// reader endpoint behind the configured address) or `default_transaction_read_only` answers but refuses
    /// every batch, so events would wait there until their deadline. One `SHOW`, as a simple query (nothing
    /// prepared, through any pooler).
    pub async fn takes_writes(&self) -> Result<bool, StoreError> {
        let mut connection = self.pool.acquire().await?;
        // Called as `Executor` on a plain `&mut PgConnection`: `raw_sql(..).fetch_one(&mut *connection)` left
        // the admin server's future short of `Send` (a higher-ranked lifetime rustc cannot prove).
        let session: &mut PgConnection = &mut connection;
        let row = session.fetch_one(sqlx::raw_sql("SHOW transaction_read_only")).await?;
        let read_only: String = row.try_get(0)?;
        if read_only == "on" {
            // A session stays read-only: the next check should reach the server on a new one, as a batch does.
            connection.close_on_drop();
            return Ok(false);
        }
        Ok(true)
    }

    /// Writes a batch in one statement (autocommit: it is durable when this returns) and tells, for each
    /// event in order, where it was inserted, or `None` when it was already stored, and which outbox row
    /// queues the new ones. The batch must not hold the same (source, id) twice.
    pub async fn insert_batch(&self, events: &[&NewEvent]) -> Result<Written, StoreError> {
        let mut session = self.session().await?;
        let result = self.insert_on(session.connection(), events).await;
        session.finish(result).await
    }

    async fn insert_on(&self, connection: &mut PgConnection, events: &[&NewEvent]) -> Result<Written, sqlx::Error> {
        let sources: Vec<&str> = events.iter().map(|e| &*e.source).collect();
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let created: Vec<Option<i64>> = events.iter().map(|e| e.created).collect();
        let livemode: Vec<Option<bool>> = events.iter().map(|e| e.livemode).collect();
        let api_versions: Vec<Option<&str>> = events.iter().map(|e| e.api_version.as_deref()).collect();
        let accounts: Vec<Option<&str>> = events.iter().map(|e| e.account.as_deref()).collect();
        let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_ref()).collect();
        let rows = sqlx::query(INSERT_BATCH)
            .persistent(self.named())
            .bind(&sources)
            .bind(&ids)
            .bind(&types)
            .bind(&created)
            .bind(&livemode)
            .bind(&api_versions)
            .bind(&accounts)
            .bind(&bodies)
            .bind(self.outbox)
            .fetch_all(connection)
            .await?;
        let mut outbox_id = None;
        let mut inserted: HashMap<(String, String), Inserted> = HashMap::with_capacity(rows.len());
        for row in rows {
            outbox_id = row.try_get(4)?;
            inserted.insert(
                (row.try_get(0)?, row.try_get(1)?),
                Inserted { seq: row.try_get(2)?, received_ms: row.try_get(3)? },
            );
        }
        let rows = events.iter().map(|e| inserted.remove(&(e.source.to_string(), e.id.clone()))).collect();
        Ok(Written { rows, outbox_id })
    }

    /// Deletes the outbox rows of batches the normal path has published (one statement for many batches).
    pub async fn mark_published(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        let mut session = self.session().await?;
        let result = sqlx::query("DELETE FROM events_outbox WHERE id = ANY($1)")
            .persistent(self.named())
            .bind(outbox_ids)
            .execute(session.connection())
            .await;
        session.finish(result).await?;
        Ok(())
    }

    /// Claims the oldest outbox rows queued more than `grace` ago with an id above `after`, as many as hold
    /// `limit`'s events and bytes of bodies (at least one row, however much it holds), skipping rows another
    /// replica holds, and reads their events back. The grace leaves fresh rows to the normal path, which
    /// publishes them itself. `after` lets a drain resume behind its last page instead of walking, on every
    /// page, the index entries of the rows it has just deleted (until a vacuum removes them).
    ///
    /// A row holds a batch, so the page is counted in whole rows not yet locked: the rows that would make
    /// the page are read first (window functions, which `FOR UPDATE` cannot share a query with; a row's
    /// bytes are those the gateway recorded with it, or, for a row queued before migration `0006`, the sum
    /// of its events' `octet_length`s, which reads no TOASTed body), then locked with `SKIP LOCKED`, and the
    /// events of those locked are read back. Every row locked is in the page (a lock left on a row outside
    /// it would keep this drain's next, concurrent, claim off the row). When another replica holds some, the
    /// next rows are tried, until the page is full or nothing is left.
    pub async fn claim_unpublished(
        &self,
        grace: Duration,
        after: i64,
        limit: PageLimit,
    ) -> Result<Claimed, StoreError> {
        const CANDIDATES: &str = "SELECT id FROM ( \
                SELECT id, sum(cardinality(event_ids)) OVER w - cardinality(event_ids) AS before, \
                       sum(bytes) OVER w - bytes AS bytes_before \
                FROM (SELECT id, event_ids, coalesce(body_bytes, (SELECT coalesce(sum(octet_length(e.body)), 0) \
                          FROM unnest(sources, event_ids) AS k(source, event_id) \
                          JOIN events e ON (e.source, e.event_id) = (k.source, k.event_id)))::int8 AS bytes \
                      FROM events_outbox \
                      WHERE id > $1 AND queued_at < now() - make_interval(secs => $2) ORDER BY id LIMIT $3) AS oldest \
                WINDOW w AS (ORDER BY id ROWS UNBOUNDED PRECEDING) \
            ) AS counted WHERE before < $3 AND bytes_before < $4 ORDER BY id";
        let lock_and_read = lock_and_read_rows();
        let grace = grace.as_secs_f64();
        let mut tx = self.pool.begin().await?;
        let mut events = Vec::new();
        let mut outbox_ids: Vec<i64> = Vec::new();
        let (mut cursor, mut counted, mut bytes) = (after, 0, 0);
        let full = loop {
            if counted >= limit.events || bytes >= limit.body_bytes {
                break true;
            }
            let candidates: Vec<i64> = sqlx::query_scalar(CANDIDATES)
                .persistent(self.named())
                .bind(cursor)
                .bind(grace)
                .bind(limit.events - counted)
                .bind(limit.body_bytes - bytes)
                .fetch_all(&mut *tx)
                .await?;
            let Some(&last) = candidates.last() else { break false };
            cursor = last;
            let rows = sqlx::query(&lock_and_read)
                .persistent(self.named())
                .bind(&candidates)
                .bind(grace)
                .fetch_all(&mut *tx)
                .await?;
            bytes += read_claimed_rows(&rows, &mut events, &mut outbox_ids)?;
            counted += i64::try_from(rows.len()).unwrap_or(i64::MAX);
        };
        Ok(Claimed { tx, named: self.named(), events, outbox_ids, full })
    }

    /// Claims the outbox rows `ids`, whatever their age, except those gone (published) or held by another
    /// replica's catch-up, and reads their events back: the batches this gateway left to the catch-up,
    /// published when it shuts down (`Notifier::run_catchup`).
    pub async fn claim_rows(&self, ids: &[i64]) -> Result<Claimed, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&lock_and_read_rows())
            .persistent(self.named())
            .bind(ids)
            .bind(0.0_f64)
            .fetch_all(&mut *tx)
            .await?;
        let (mut events, mut outbox_ids) = (Vec::new(), Vec::new());
        read_claimed_rows(&rows, &mut events, &mut outbox_ids)?;
        Ok(Claimed { tx, named: self.named(), events, outbox_ids, full: false })
    }

    /// Events that have waited longer than `grace` to be published (all sources): the catch-up's backlog.
    /// Rows younger than the grace are the normal path's, in flight between commit and delete.
    pub async fn count_unpublished(&self, grace: Duration) -> Result<i64, StoreError> {
        let mut session = self.session().await?;
        let result = sqlx::query_scalar(
            "SELECT coalesce(sum(cardinality(event_ids)), 0)::int8 FROM events_outbox \
             WHERE queued_at < now() - make_interval(secs => $1)",
        )
        .persistent(self.named())
        .bind(grace.as_secs_f64())
        .fetch_one(session.connection())
        .await;
        session.finish(result).await
    }

    /// One page of stored events matching `filter`, in order of receipt (`received_at`, then `seq`), after
    /// the position `after` (a previous page's last `ReplayPosition`), within `limit` (at least one event).
    /// Walks the (source, received_at) index. The page ends on the running sum of the bodies' lengths
    /// (`octet_length` reads a TOASTed body's length from its pointer); the bodies past it are not sent.
    pub async fn replay_page(
        &self,
        filter: &ReplayFilter,
        after: ReplayPosition,
        limit: PageLimit,
    ) -> Result<(Vec<StoredEvent>, ReplayPosition), StoreError> {
        let query = format!(
            "SELECT * FROM ( \
                 SELECT {NOTIFY_COLUMNS}, (extract(epoch FROM e.received_at) * 1000000)::int8, \
                        sum(octet_length(e.body)) OVER (ORDER BY e.received_at, e.seq ROWS UNBOUNDED PRECEDING) \
                            - octet_length(e.body) AS bytes_before \
                 FROM events e \
                 WHERE source = $1 AND (received_at, seq) > (timestamptz 'epoch' + $2 * interval '1 microsecond', $7) \
                 AND ($3::int8 IS NULL OR received_at >= to_timestamp($3)) \
                 AND ($4::int8 IS NULL OR received_at < to_timestamp($4)) \
                 AND ($5::text IS NULL OR event_type LIKE $5) ORDER BY received_at, seq LIMIT $6 \
             ) AS page WHERE bytes_before < $8 ORDER BY 9, 1"
        );
        let mut session = self.session().await?;
        let result = sqlx::query(&query)
            .persistent(self.named())
            .bind(&filter.source)
            .bind(after.received_us)
            .bind(filter.since)
            .bind(filter.until)
            .bind(filter.type_like())
            .bind(limit.events)
            .bind(after.seq)
            .bind(limit.body_bytes)
            .fetch_all(session.connection())
            .await;
        let rows = session.finish(result).await?;
        let mut next = after;
        if let Some(last) = rows.last() {
            next = ReplayPosition { received_us: last.try_get(8)?, seq: last.try_get(0)? };
        }
        Ok((rows.iter().map(StoredEvent::from_row).collect::<Result<Vec<_>, _>>()?, next))
    }

    /// How many stored events match `filter`.
    pub async fn replay_count(&self, filter: &ReplayFilter) -> Result<i64, StoreError> {
        let mut session = self.session().await?;
        let result = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE source = $1 \
             AND ($2::int8 IS NULL OR received_at >= to_timestamp($2)) \
             AND ($3::int8 IS NULL OR received_at < to_timestamp($3)) \
             AND ($4::text IS NULL OR event_type LIKE $4)",
        )
        .persistent(self.named())
        .bind(&filter.source)
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.type_like())
        .fetch_one(session.connection())
        .await;
        session.finish(result).await
    }

    /// Where a pruning run that keeps `keep_days` days stops (see `PruneCutoff`), by the database's clock.
    pub async fn prune_cutoff(&self, keep_days: u32) -> Result<PruneCutoff, StoreError> {
        let mut session = self.session().await?;
        let result = sqlx::query_as(
            "SELECT (extract(epoch FROM now() - make_interval(days => $1)) * 1000000)::int8, \
                    (SELECT (extract(epoch FROM min(queued_at)) * 1000000)::int8 FROM events_outbox)",
        )
        .persistent(self.named())
        .bind(i32::try_from(keep_days).unwrap_or(i32::MAX))
        .fetch_one(session.connection())
        .await;
        let (keep_us, oldest_queued_us): (i64, Option<i64>) = session.finish(result).await?;
        Ok(match oldest_queued_us {
            Some(queued_us) if queued_us < keep_us => {
                PruneCutoff { before_us: queued_us, held_back_by_us: Some(queued_us) }
            }
            _ => PruneCutoff { before_us: keep_us, held_back_by_us: None },
        })
    }

    /// The sources that have stored events, including any no longer configured: a skip scan of the
    /// primary key (one index probe per source), not a read of the table.
    pub async fn stored_sources(&self) -> Result<Vec<String>, StoreError> {
        let mut session = self.session().await?;
        let result = sqlx::query_scalar(
            "WITH RECURSIVE s(source) AS ( \
                 SELECT min(source) FROM events \
                 UNION ALL \
                 SELECT (SELECT min(source) FROM events WHERE source > s.source) FROM s WHERE s.source IS NOT NULL \
             ) SELECT source FROM s WHERE source IS NOT NULL",
        )
        .persistent(self.named())
        .fetch_all(session.connection())
        .await;
        session.finish(result).await
    }

    /// Deletes up to `limit` of `source`'s oldest events received before `cutoff_us`, and at or after
    /// `from_us` (the last batch's newest: a batch's events share one receive time, so a limit can split
    /// them, and starting there skips the index entries of the events already deleted). Returns `None`
    /// without deleting when another session holds the pruning lock (another replica is pruning).
    ///
    /// The rows are found on the (source, received_at) index and deleted by their `ctid`, in one
    /// statement: no probe of the primary key per row (half the buffers of a join on the key, measured).
    /// Events are never updated, so a row cannot move between the two.
    ///
    /// The commit does not wait for its WAL flush (`synchronous_commit` off for this transaction only):
    /// a delete lost in a crash is done again by the next run, and the ingest's commits do not queue
    /// behind the pruner's flushes.
    pub async fn prune_batch(
        &self,
        source: &str,
        from_us: Option<i64>,
        cutoff_us: i64,
        limit: u32,
    ) -> Result<Option<PrunedBatch>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (_, locked): (String, bool) =
            sqlx::query_as("SELECT set_config('synchronous_commit', 'off', true), pg_try_advisory_xact_lock($1)")
                .persistent(self.named())
                .bind(PRUNE_LOCK_KEY)
                .fetch_one(&mut *tx)
                .await?;
        if !locked {
            return Ok(None); // the transaction rolls back as it is dropped
        }
        let (deleted, newest_us): (i64, Option<i64>) = sqlx::query_as(
            "WITH deleted AS ( \
                 DELETE FROM events WHERE ctid = ANY(ARRAY( \
                     SELECT ctid FROM events \
                     WHERE source = $1 \
                     AND ($2::int8 IS NULL OR received_at >= timestamptz 'epoch' + $2 * interval '1 microsecond') \
                     AND received_at < timestamptz 'epoch' + $3 * interval '1 microsecond' \
                     ORDER BY received_at LIMIT $4)) \
                 RETURNING received_at \
             ) SELECT count(*), (extract(epoch FROM max(received_at)) * 1000000)::int8 FROM deleted",
        )
        .persistent(self.named())
        .bind(source)
        .bind(from_us)
        .bind(cutoff_us)
        .bind(i64::from(limit))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(PrunedBatch { deleted: deleted.unsigned_abs(), newest_us }))
    }

    /// How many of `source`'s events a run with `cutoff_us` would delete.
    pub async fn count_prunable(&self, source: &str, cutoff_us: i64) -> Result<i64, StoreError> {
        let mut session = self.session().await?;
        let result = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE source = $1 \
             AND received_at < timestamptz 'epoch' + $2 * interval '1 microsecond'",
        )
        .persistent(self.named())
        .bind(source)
        .bind(cutoff_us)
        .fetch_one(session.connection())
        .await;
        session.finish(result).await
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_statements_lost_or_shared_between_clients_name_a_pooler_in_transaction_mode() {
        assert!(pooler_in_transaction_mode(Some("42P05"), r#"prepared statement "sqlx_s_3" already exists"#));
        assert!(pooler_in_transaction_mode(Some("26000"), r#"prepared statement "sqlx_s_8" does not exist"#));
        assert!(pooler_in_transaction_mode(
            Some("08P01"),
            r#"bind message supplies 1 parameters, but prepared statement "sqlx_s_4" requires 9"#
        ));
        // A protocol violation that names no statement of sqlx's is the connection's, and stays transient.
        assert!(!pooler_in_transaction_mode(Some("08P01"), "invalid frontend message type 0"));
        // The same codes for statements that are not sqlx's, and other refusals, are not the pooler's.
        assert!(!pooler_in_transaction_mode(Some("26000"), r#"prepared statement "mine" does not exist"#));
        assert!(!pooler_in_transaction_mode(Some("23505"), r#"duplicate key value "sqlx_s_1""#));
        assert!(!pooler_in_transaction_mode(None, r#"prepared statement "sqlx_s_1" already exists"#));
    }

    #[tokio::test]
    async fn an_unparsable_url_is_named_by_its_key() {
        let config = |url: &str, migrate_url: Option<&str>| StoreConfig {
            url: url.into(),
            pool_max: 4,
            connect_timeout_ms: 1000,
            migrate_on_start: false,
            transaction_pooler: false,
            migrate_url: migrate_url.map(Into::into),
        };
        let good = "postgres://hookgate@db.internal:5432/hookgate?sslmode=disable";
        let bad = "postgres://hookgate@db.internal:port/hookgate";
        assert!(Store::new(&config(good, Some(good)), true).is_ok());
        let err = Store::new(&config(bad, None), true).expect_err("a bad store.url");
        assert_eq!(err.to_string(), "invalid store.url");
        let err = Store::new(&config(good, Some(bad)), true).expect_err("a bad store.migrate_url");
        assert_eq!(err.to_string(), "invalid store.migrate_url");
    }

    #[test]
    fn a_remote_postgres_without_sslmode_is_flagged_and_local_or_named_modes_are_not() {
        let flagged = |url: &str, pgsslmode_set: bool| {
            let options: PgConnectOptions = url.parse().expect("a valid URL");
            tls_left_unchecked(url, &options, pgsslmode_set)
        };
        assert!(flagged("postgres://u:p@db.example.internal:5432/hookgate", false));
        assert!(flagged("postgres://u@10.0.0.5/hookgate?application_name=x", false));
        assert!(!flagged("postgres://u@db.example.internal/hookgate?sslmode=verify-full", false));
        assert!(!flagged("postgres://u@db.example.internal/hookgate?sslmode=disable", false));
        assert!(!flagged("postgres://u@db.example.internal/hookgate", true), "PGSSLMODE names it");
        for local in [
            "postgres://postgres@127.0.0.1:54329/hookgate",
            "postgres://postgres@localhost/hookgate",
            "postgres://postgres@[::1]:5432/hookgate",
            "postgres://postgres@%2Frun%2Fpostgresql/hookgate",
        ] {
            assert!(!flagged(local, false), "{local}");
        }
    }
}
