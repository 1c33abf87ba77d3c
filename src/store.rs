//! Postgres: the pool, migrations, and the one-round-trip batch insert that makes every event exactly-once.
//!
//! Knows nothing about HTTP. Errors are split into `Unavailable` (retry later: the database is down,
//! restarting or overloaded) and `Rejected` (the batch itself is refused; retrying cannot help).

use std::collections::HashSet;
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
}

const INSERT_BATCH: &str = "
INSERT INTO events (source, event_id, event_type, created, livemode, api_version, account, body)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[], $6::text[], $7::text[], $8::bytea[])
ON CONFLICT (source, event_id) DO NOTHING
RETURNING source, event_id";

impl Store {
    /// Builds the pool; connects lazily, so a gateway can start while the database restarts.
    pub fn new(config: &StoreConfig) -> Result<Self, StoreError> {
        let options: PgConnectOptions = config.url.parse().map_err(StoreError::Url)?;
        let options = options.application_name("hookgate");
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_max)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(config.connect_timeout_ms))
            // A connection that failed mid-query must not be handed out again.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Is the database reachable? One `SELECT 1`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Writes a batch in one statement (autocommit: it is durable when this returns) and tells, for each
    /// event in order, whether it was new. The batch must not hold the same (source, id) twice.
    pub async fn insert_batch(&self, events: &[&NewEvent]) -> Result<Vec<bool>, StoreError> {
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
            .fetch_all(&self.pool)
            .await?;
        // Common cases first: all new, or all already stored.
        if rows.len() == events.len() || rows.is_empty() {
            return Ok(vec![!rows.is_empty(); events.len()]);
        }
        let mut returned: HashSet<(String, String)> = HashSet::with_capacity(rows.len());
        for row in rows {
            returned.insert((row.try_get(0)?, row.try_get(1)?));
        }
        Ok(events.iter().map(|e| returned.contains(&(e.source.to_string(), e.id.clone()))).collect())
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
