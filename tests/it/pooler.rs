//! Behind a real PgBouncer: session pooling serves every event; transaction pooling serves every event with
//! `store.transaction_pooler` on, and without it is named in the store's error instead of surfacing as a
//! stranger's prepared statement.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hookgate::config::StoreConfig;
use hookgate::store::{NewEvent, Store, StoreError};

use crate::support::*;

/// A pgbouncer of the test's own in front of the test Postgres, stopped when dropped.
struct PgBouncer {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts pgbouncer with `pool_mode` and `pool_size` server connections per database. It refuses to run
    /// as root, so as root it runs as `postgres`, the user deploy/services.sh runs Postgres as.
    fn start(pool_mode: &str, pool_size: u32) -> Self {
        let admin = admin_database_url();
        let (host, port) = host_and_port(&admin);
        let dir = std::env::temp_dir().join(unique("hookgate-it-pgbouncer"));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").expect("auth file");
        let listen = free_port();
        let ini = format!(
            "[databases]\n* = host={host} port={port}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {auth}\npool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\n\
             max_client_conn = 100\nignore_startup_parameters = extra_float_digits\n",
            auth = dir.join("users.txt").display(),
        );
        let config = dir.join("pgbouncer.ini");
        std::fs::write(&config, ini).expect("pgbouncer.ini");
        let log = std::fs::File::create(dir.join("pgbouncer.log")).expect("log file");
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let mut command = if root {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--", "pgbouncer"]);
            command
        } else {
            Command::new("pgbouncer")
        };
        let child = command
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("pgbouncer is not installed: run the tests with deploy/test.sh, which installs it");
        let bouncer = Self { port: listen, child, dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            assert!(std::time::Instant::now() < deadline, "pgbouncer did not listen: {}", bouncer.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        bouncer
    }

    /// `database_url` with pgbouncer's address instead of Postgres's.
    fn url(&self, database_url: &str) -> String {
        let (host, port) = host_and_port(database_url);
        database_url.replacen(&format!("{host}:{port}"), &format!("127.0.0.1:{}", self.port), 1)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser passes the signal on to pgbouncer.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The host and port of a `postgres://user@host:port/db` URL.
fn host_and_port(url: &str) -> (String, String) {
    let authority = url.split('@').nth(1).and_then(|rest| rest.split('/').next()).expect("host in the URL");
    let (host, port) = authority.rsplit_once(':').expect("port in the URL");
    (host.to_owned(), port.to_owned())
}

#[tokio::test]
async fn behind_pgbouncer_in_session_mode_every_event_is_stored() {
    let db = TestDb::create().await;
    // A client holds its server connection for as long as it is open: room for every one of the gateway's.
    let bouncer = PgBouncer::start("session", 20);
    let config = test_config(&bouncer.url(&db.url));
    let gateway = Gateway::start(config).await;
    let client = client();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let id = unique("evt_pgb");
        let answer = post_stripe(&client, &gateway, &id).await;
        assert_eq!(answer.status, 202, "{answer:?}\n{}", bouncer.log());
        ids.push(id);
    }
    let stored = db.stored_ids().await;
    assert!(ids.iter().all(|id| stored.contains(id)), "an acknowledged event is not stored");
    gateway.stop().await;
}

fn store_config(url: String, transaction_pooler: bool, migrate_url: Option<String>) -> StoreConfig {
    StoreConfig {
        url,
        pool_max: 8,
        connect_timeout_ms: 10_000,
        migrate_on_start: true,
        transaction_pooler,
        migrate_url,
    }
}

/// Eight writers, ten one-event batches each, at once, each batch followed by a read of the outbox's backlog
/// (two statements, so that one client's statement can meet another's on a server connection); the ids of the
/// batches stored, and every error.
async fn write_concurrently(store: &Store) -> (Vec<String>, Vec<StoreError>) {
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let store = store.clone();
        writers.spawn(async move {
            let (mut stored, mut errors) = (Vec::new(), Vec::new());
            for n in 0..10 {
                let event = NewEvent {
                    source: std::sync::Arc::from("stripe"),
                    id: format!("{}_{writer}_{n}", unique("evt_pgb")),
                    event_type: "charge.succeeded".into(),
                    created: None,
                    livemode: None,
                    api_version: None,
                    account: None,
                    body: bytes::Bytes::from_static(b"{}"),
                };
                match store.insert_batch(&[&event]).await {
                    Ok(_) => stored.push(event.id),
                    Err(e) => errors.push(e),
                }
                if let Err(e) = store.count_unpublished(Duration::from_secs(3600)).await {
                    errors.push(e);
                }
            }
            (stored, errors)
        });
    }
    let (mut stored, mut errors) = (Vec::new(), Vec::new());
    while let Some(result) = writers.join_next().await {
        let (ids, failures) = result.expect("writer");
        stored.extend(ids);
        errors.extend(failures);
    }
    (stored, errors)
}

#[tokio::test]
async fn behind_pgbouncer_in_transaction_mode_named_statements_fail_and_the_error_names_the_setting() {
    let db = TestDb::create().await;
    // Migrated directly: the migrations hold a session-level advisory lock.
    let direct = Store::new(&store_config(db.url.clone(), false, None), true).expect("store");
    direct.migrate().await.expect("migrate");
    direct.close().await;

    let bouncer = PgBouncer::start("transaction", 2);
    let store = Store::new(&store_config(bouncer.url(&db.url), false, None), true).expect("store through pgbouncer");
    // Eight clients on two server connections: at least two of them prepare the same statement name on one.
    let (_, errors) = write_concurrently(&store).await;
    assert!(!errors.is_empty(), "80 batches through a transaction pooler all succeeded: {}", bouncer.log());
    for error in &errors {
        assert!(matches!(error, StoreError::PoolerInTransactionMode(_)), "{}", hookgate::error_chain(error));
        assert!(!error.is_transient(), "retrying on the same pooler does not help");
        assert!(error.to_string().contains("pool_mode = transaction"), "{error}");
        assert!(error.to_string().contains("store.transaction_pooler = true"), "{error}");
    }
    store.close().await;
}

#[tokio::test]
async fn with_store_transaction_pooler_every_store_operation_works_through_pgbouncer_in_transaction_mode() {
    let db = TestDb::create().await;
    let bouncer = PgBouncer::start("transaction", 2);
    let pooled_url = bouncer.url(&db.url);

    // Migrations need Postgres itself: refused without store.migrate_url, applied through it.
    let without = Store::new(&store_config(pooled_url.clone(), true, None), true).expect("store");
    let refused = without.migrate().await.expect_err("migrations through a transaction pooler");
    assert!(matches!(refused, StoreError::MigrateNeedsDirectConnection), "{}", hookgate::error_chain(&refused));
    let store = Store::new(&store_config(pooled_url, true, Some(db.url.clone())), true).expect("store");
    store.migrate().await.expect("migrate through store.migrate_url");
    store.migrate().await.expect("migrating again is a no-op");

    // The same eight clients on two server connections as above: every batch stored.
    let (stored, errors) = write_concurrently(&store).await;
    let chains: Vec<String> = errors.iter().map(|e| hookgate::error_chain(e)).collect();
    assert!(errors.is_empty(), "{chains:?}\n{}", bouncer.log());
    assert_eq!(stored.len(), 80);
    let in_db = db.stored_ids().await;
    assert!(stored.iter().all(|id| in_db.contains(id)), "a batch reported written is not stored");

    // The rest of what the gateway and its commands ask of the store, each through the pooler.
    assert!(store.takes_writes().await.expect("readiness check"), "the database takes writes");
    assert_eq!(store.count_unpublished(Duration::ZERO).await.expect("count unpublished"), 80);
    let limit = hookgate::store::PageLimit { events: 1_000, body_bytes: 1 << 20 };
    let claimed = store.claim_unpublished(Duration::ZERO, 0, limit).await.expect("claim");
    assert_eq!(claimed.events.len(), 80, "the catch-up reads every queued event back");
    claimed.mark_published().await.expect("mark published");
    assert_eq!(store.count_unpublished(Duration::ZERO).await.expect("count unpublished"), 0);
    let filter = hookgate::store::ReplayFilter {
        source: "stripe".into(),
        since: None,
        until: None,
        event_type: Some("charge.*".into()),
    };
    assert_eq!(store.replay_count(&filter).await.expect("replay count"), 80);
    let (page, _) = store.replay_page(&filter, hookgate::store::ReplayPosition::default(), limit).await.expect("page");
    assert_eq!(page.len(), 80);
    assert_eq!(store.stored_sources().await.expect("stored sources"), ["stripe"]);
    let cutoff = store.prune_cutoff(7).await.expect("prune cutoff");
    assert_eq!(store.count_prunable("stripe", cutoff.before_us).await.expect("count prunable"), 0);
    let now_us = i64::try_from(std::time::SystemTime::UNIX_EPOCH.elapsed().expect("clock").as_micros()).expect("µs");
    let pruned = store.prune_batch("stripe", None, now_us + 60_000_000, 100).await.expect("prune").expect("lock");
    assert_eq!(pruned.deleted, 80, "everything received before a minute from now");
    assert_eq!(db.count().await, 0);
    store.close().await;
}

#[tokio::test]
async fn a_gateway_with_store_transaction_pooler_stores_and_publishes_every_event_through_pgbouncer() {
    let db = TestDb::create().await;
    let bouncer = PgBouncer::start("transaction", 2);
    let mut config = test_config(&bouncer.url(&db.url));
    config.store.transaction_pooler = true;
    config.store.migrate_url = Some(db.url.clone());
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let client = client();
    let mut posts = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (client, url) = (client.clone(), gateway.url("stripe"));
        posts.spawn(async move {
            let id = unique("evt_pgb_tx");
            (post_stripe_with(&client, &url, &id).await, id)
        });
    }
    let mut ids = Vec::new();
    while let Some(result) = posts.join_next().await {
        let (answer, id) = result.expect("post");
        assert_eq!(answer.status, 202, "{answer:?}\n{}", bouncer.log());
        ids.push(id);
    }
    let stored = db.stored_ids().await;
    assert!(ids.iter().all(|id| stored.contains(id)), "an acknowledged event is not stored");
    assert_published_once(&db, &key, &ids, "acknowledged events").await;
    gateway.stop().await;
}
