//! Behind a real PgBouncer: session pooling serves every event; transaction pooling, which hookgate's prepared
//! statements cannot share, is named in the store's error instead of surfacing as a stranger's statement name.

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

#[tokio::test]
async fn behind_pgbouncer_in_transaction_mode_the_store_names_the_pooler() {
    let db = TestDb::create().await;
    let store_config =
        |url: String| StoreConfig { url, pool_max: 8, connect_timeout_ms: 10_000, migrate_on_start: true };
    // Migrated directly: the migrations hold a session-level advisory lock.
    let direct = Store::new(&store_config(db.url.clone()), true).expect("store");
    direct.migrate().await.expect("migrate");
    direct.close().await;

    let bouncer = PgBouncer::start("transaction", 2);
    let store = Store::new(&store_config(bouncer.url(&db.url)), true).expect("store through pgbouncer");
    // Eight clients on two server connections: at least two of them prepare the same statement name on one.
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let store = store.clone();
        writers.spawn(async move {
            let mut errors = Vec::new();
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
                if let Err(e) = store.insert_batch(&[&event]).await {
                    errors.push(e);
                }
            }
            errors
        });
    }
    let mut errors = Vec::new();
    while let Some(result) = writers.join_next().await {
        errors.extend(result.expect("writer"));
    }
    assert!(!errors.is_empty(), "80 batches through a transaction pooler all succeeded: {}", bouncer.log());
    for error in &errors {
        assert!(matches!(error, StoreError::PoolerInTransactionMode(_)), "{}", hookgate::error_chain(error));
        assert!(!error.is_transient(), "retrying on the same pooler does not help");
        assert!(error.to_string().contains("pool_mode = transaction"), "{error}");
    }
    store.close().await;
}
