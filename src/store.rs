//! Postgres: the pool, migrations, and the one-round-trip batch insert that makes every event exactly-once.
//!
//! Knows nothing about HTTP. Errors are split into `Unavailable` (retry later: the database is down,
//! restarting or overloaded) and `Rejected` (the batch itself is refused; retrying cannot help).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

use crate::config::StoreConfig;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store.url")]
    Url(#[source] sqlx::Error),
    #[error("the database is unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("the database refused the batch")]
    Rejected(#[source] sqlx::Error),
    #[error("migrations failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            StoreError::Unavailable(e)
        } else {
            StoreError::Rejected(e)
        }
    }
}

/// Connection loss, timeouts, and the SQLSTATE classes that mean "try again": 08 connection exception,
/// 40 transaction rollback (serialization, deadlock), 53 insufficient resources, 57P admin shutdown / starting up.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("40") || c.starts_with("53") || c.starts_with("57P")),
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
}

/// One statement per batch: insert what is new, and (with `$9`) queue it in the outbox in the same commit.
const INSERT_BATCH: &str = "
WITH inserted AS (
    INSERT INTO events (source, event_id, event_type, created, livemode, api_version, account, body)
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[], $6::text[], $7::text[], $8::bytea[])
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING source, event_id, seq, received_at
), queued AS (
    INSERT INTO events_outbox (seq, source, event_id) SELECT seq, source, event_id FROM inserted WHERE $9
)
SELECT source, event_id, seq, (extract(epoch FROM received_at) * 1000)::int8 FROM inserted";

/// The columns a notification carries, in the order `StoredEvent::from_row` reads them (`e`: events).
const NOTIFY_COLUMNS: &str = "e.seq, e.source, e.event_id, e.event_type, e.created, e.livemode, \
    (extract(epoch FROM e.received_at) * 1000)::int8, e.body";

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

/// Rows claimed for publishing: locked (`FOR UPDATE SKIP LOCKED`) in an open transaction, so another
/// replica's catch-up skips them. Marking commits; dropping rolls back and releases them.
pub struct Claimed {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub events: Vec<StoredEvent>,
}

impl Claimed {
    /// The highest seq claimed (events come oldest first), or `None` for an empty claim.
    pub fn last_seq(&self) -> Option<i64> {
        self.events.last().map(|e| e.seq)
    }

    pub async fn mark_published(mut self) -> Result<(), StoreError> {
        let seqs: Vec<i64> = self.events.iter().map(|e| e.seq).collect();
        sqlx::query("DELETE FROM events_outbox WHERE seq = ANY($1)").bind(&seqs).execute(&mut *self.tx).await?;
        self.tx.commit().await?;
        Ok(())
    }
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

impl Store {
    /// Builds the pool; connects lazily, so a gateway can start while the database restarts.
    pub fn new(config: &StoreConfig, outbox: bool) -> Result<Self, StoreError> {
        let options: PgConnectOptions = config.url.parse().map_err(StoreError::Url)?;
        let options = options.application_name("hookgate");
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_max)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(config.connect_timeout_ms))
            // A connection that failed mid-query must not be handed out again.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(Self { pool, outbox })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Opens `n` connections and prepares the batch insert on each (an empty batch), so the first
    /// requests after a start do not wait for connection set-up and statement planning.
    pub async fn warm_up(&self, n: usize) {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            match self.pool.acquire().await {
                Ok(connection) => held.push(connection),
                Err(_) => break, // the database is not there yet: the pool connects on demand later
            }
        }
        for connection in &mut held {
            // Harmless when it fails (for example before migrations): the first batch prepares it then.
            let _ = self.insert_with(&mut **connection, &[]).await;
        }
    }

    /// Is the database reachable? One `SELECT 1`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Writes a batch in one statement (autocommit: it is durable when this returns) and tells, for each
    /// event in order, where it was inserted, or `None` when it was already stored. The batch must not
    /// hold the same (source, id) twice.
    pub async fn insert_batch(&self, events: &[&NewEvent]) -> Result<Vec<Option<Inserted>>, StoreError> {
        self.insert_with(&self.pool, events).await
    }

    async fn insert_with<'e, E>(&self, executor: E, events: &[&NewEvent]) -> Result<Vec<Option<Inserted>>, StoreError>
    where
        E: sqlx::Executor<'e, Database = sqlx::Postgres>,
    {
        let sources: Vec<&str> = events.iter().map(|e| &*e.source).collect();
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let created: Vec<Option<i64>> = events.iter().map(|e| e.created).collect();
        let livemode: Vec<Option<bool>> = events.iter().map(|e| e.livemode).collect();
        let api_versions: Vec<Option<&str>> = events.iter().map(|e| e.api_version.as_deref()).collect();
        let accounts: Vec<Option<&str>> = events.iter().map(|e| e.account.as_deref()).collect();
        let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_ref()).collect();
        let rows = sqlx::query(INSERT_BATCH)
            .bind(&sources)
            .bind(&ids)
            .bind(&types)
            .bind(&created)
            .bind(&livemode)
            .bind(&api_versions)
            .bind(&accounts)
            .bind(&bodies)
            .bind(self.outbox)
            .fetch_all(executor)
            .await?;
        let mut inserted: HashMap<(String, String), Inserted> = HashMap::with_capacity(rows.len());
        for row in rows {
            inserted.insert(
                (row.try_get(0)?, row.try_get(1)?),
                Inserted { seq: row.try_get(2)?, received_ms: row.try_get(3)? },
            );
        }
        Ok(events.iter().map(|e| inserted.remove(&(e.source.to_string(), e.id.clone()))).collect())
    }

    /// Marks events published by the normal path (one statement, however many batches).
    pub async fn mark_published(&self, seqs: &[i64]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM events_outbox WHERE seq = ANY($1)").bind(seqs).execute(&self.pool).await?;
        Ok(())
    }

    /// Claims up to `limit` unpublished events received more than `grace` ago with a seq above `after`,
    /// oldest first, skipping rows another replica holds. The grace leaves fresh rows to the normal path,
    /// which publishes them itself. `after` lets a drain resume behind its last page instead of walking, on
    /// every page, the index entries of the rows it has just deleted (until a vacuum removes them).
    pub async fn claim_unpublished(&self, grace: Duration, after: i64, limit: i64) -> Result<Claimed, StoreError> {
        let mut tx = self.pool.begin().await?;
        let query = format!(
            "SELECT {NOTIFY_COLUMNS} FROM events_outbox o JOIN events e ON (e.source, e.event_id) = (o.source, o.event_id) \
             WHERE o.seq > $3 AND o.queued_at < now() - make_interval(secs => $1) \
             ORDER BY o.seq LIMIT $2 FOR UPDATE OF o SKIP LOCKED"
        );
        let rows = sqlx::query(&query).bind(grace.as_secs_f64()).bind(limit).bind(after).fetch_all(&mut *tx).await?;
        let events = rows.iter().map(StoredEvent::from_row).collect::<Result<Vec<_>, _>>()?;
        Ok(Claimed { tx, events })
    }

    /// Events that have waited longer than `grace` to be published (all sources): the catch-up's backlog.
    /// Rows younger than the grace are the normal path's, in flight between commit and delete.
    pub async fn count_unpublished(&self, grace: Duration) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM events_outbox WHERE queued_at < now() - make_interval(secs => $1)")
            .bind(grace.as_secs_f64())
            .fetch_one(&self.pool)
            .await?)
    }

    /// One page of stored events matching `filter`, in order of receipt (`received_at`, then `seq`), after
    /// the position `after` (a previous page's last `ReplayPosition`). Walks the (source, received_at) index.
    pub async fn replay_page(
        &self,
        filter: &ReplayFilter,
        after: ReplayPosition,
        limit: i64,
    ) -> Result<(Vec<StoredEvent>, ReplayPosition), StoreError> {
        let query = format!(
            "SELECT {NOTIFY_COLUMNS}, (extract(epoch FROM e.received_at) * 1000000)::int8 FROM events e \
             WHERE source = $1 AND (received_at, seq) > (timestamptz 'epoch' + $2 * interval '1 microsecond', $7) \
             AND ($3::int8 IS NULL OR received_at >= to_timestamp($3)) \
             AND ($4::int8 IS NULL OR received_at < to_timestamp($4)) \
             AND ($5::text IS NULL OR event_type LIKE $5) ORDER BY received_at, seq LIMIT $6"
        );
        let rows = sqlx::query(&query)
            .bind(&filter.source)
            .bind(after.received_us)
            .bind(filter.since)
            .bind(filter.until)
            .bind(filter.type_like())
            .bind(limit)
            .bind(after.seq)
            .fetch_all(&self.pool)
            .await?;
        let mut next = after;
        if let Some(last) = rows.last() {
            next = ReplayPosition { received_us: last.try_get(8)?, seq: last.try_get(0)? };
        }
        Ok((rows.iter().map(StoredEvent::from_row).collect::<Result<Vec<_>, _>>()?, next))
    }

    /// How many stored events match `filter`.
    pub async fn replay_count(&self, filter: &ReplayFilter) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE source = $1 \
             AND ($2::int8 IS NULL OR received_at >= to_timestamp($2)) \
             AND ($3::int8 IS NULL OR received_at < to_timestamp($3)) \
             AND ($4::text IS NULL OR event_type LIKE $4)",
        )
        .bind(&filter.source)
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.type_like())
        .fetch_one(&self.pool)
        .await?)
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
