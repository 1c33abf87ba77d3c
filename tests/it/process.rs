//! The `hookgate` binary as a process: SIGTERM under load, `check-config`, `sign`, `migrate`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_hookgate");

/// The binary, without any `HOOKGATE__` override the test runner's environment may carry.
pub fn hookgate() -> Command {
    without_overrides(Command::new(BIN))
}

/// `command` without the `HOOKGATE__` overrides of the test runner's environment.
pub fn without_overrides(mut command: Command) -> Command {
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with(hookgate::config::ENV_PREFIX)) {
        command.env_remove(key);
    }
    command
}

/// Writes a config file for the binary: the test's sources, database and Redis streams, the given ports.
pub fn config_file(db_url: &str, port: u16, admin_port: u16) -> std::path::PathBuf {
    config_file_with_streams(db_url, port, admin_port, &format!("{}:{{source}}", unique("hg-it")))
}

pub fn config_file_with_streams(db_url: &str, port: u16, admin_port: u16, stream_key: &str) -> std::path::PathBuf {
    let path = scratch("hookgate-it").with_extension("toml");
    let text = format!(
        "{}\n[server]\nlisten = '127.0.0.1:{port}'\n[admin]\nlisten = '127.0.0.1:{admin_port}'\n\
         [store]\nurl = '{db_url}'\n[notify]\nredis_url = '{}'\nstream_key = '{stream_key}'\n\
         command_timeout_ms = {TEST_COMMAND_TIMEOUT_MS}\n[log]\nlevel = 'warn'\n[shutdown]\nrequests_grace_ms = 10000\ndrain_grace_ms = 10000\n",
        sources_toml(),
        redis_url()
    );
    std::fs::write(&path, text).expect("config file");
    path
}

/// The JSON log at `path` (the whole text, for failure messages) and its lines whose message contains
/// `message_part`.
pub fn json_log_lines_with(path: &std::path::Path, message_part: &str) -> (String, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(path).expect("log");
    let lines = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"].as_str().is_some_and(|m| m.contains(message_part)))
        .collect();
    (text, lines)
}

/// A gateway process for a test that reads its warnings: the test's sources on `db_url`, streams of its own,
/// and JSON logs (with `env`'s overrides) in a file named after `name`, whose path comes back beside it.
pub async fn start_logging_json(
    db_url: &str,
    name: &str,
    env: &[(&str, &str)],
) -> (GatewayProcess, std::path::PathBuf) {
    let (port, admin) = (free_port(), free_port());
    let config =
        config_file_with_streams(db_url, port, admin, &format!("{}:{{source}}", unique(&format!("hg-it-{name}"))));
    let log = std::env::temp_dir().join(format!("{}.log", unique(&format!("hookgate-it-{name}"))));
    let env: Vec<(&str, &str)> = [("HOOKGATE__LOG__FORMAT", "json")].into_iter().chain(env.iter().copied()).collect();
    (GatewayProcess::start_with(&config, port, admin, &env, Some(&log)).await, log)
}

/// A gateway process of its own (its metrics are its own), stopped with SIGTERM when dropped.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub port: u16,
    pub admin_port: u16,
    /// Where its stderr goes when the test gave no log file of its own; removed on a drop that is not
    /// part of a failure, so a failed run keeps it.
    own_log: Option<std::path::PathBuf>,
}

impl GatewayProcess {
    /// Starts `hookgate serve` with `config` and waits until /readyz answers 200.
    pub async fn start(config: &std::path::Path, port: u16, admin_port: u16) -> Self {
        Self::start_with(config, port, admin_port, &[], None).await
    }

    /// As `start`, with `HOOKGATE__…` overrides in the environment and stderr (the logs) sent to `log`.
    pub async fn start_with(
        config: &std::path::Path,
        port: u16,
        admin_port: u16,
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        Self::start_command(hookgate(), config, port, admin_port, env, log).await
    }

    /// As `start_with`, the gateway run by `wrapper` (a program and its arguments, such as `prlimit
    /// --nofile=256:256`, that runs the command line after them).
    pub async fn start_wrapped(
        wrapper: &[&str],
        config: &std::path::Path,
        port: u16,
        admin_port: u16,
        log: &std::path::Path,
    ) -> Self {
        let mut command = without_overrides(Command::new(wrapper[0]));
        command.args(&wrapper[1..]).arg(BIN);
        Self::start_command(command, config, port, admin_port, &[("HOOKGATE__LOG__FORMAT", "json")], Some(log)).await
    }

    async fn start_command(
        mut command: Command,
        config: &std::path::Path,
        port: u16,
        admin_port: u16,
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        command.args(["--config", config.to_str().expect("utf-8 path"), "serve"]).stdout(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        // The logs always go to a file, so a gateway that never becomes ready can be told apart: exited (and
        // why), or up but answering 503 (and which check fails).
        let own_log = log.is_none().then(|| std::env::temp_dir().join(format!("{}.log", unique("hookgate-it"))));
        let log_path = log.map_or_else(|| own_log.clone().expect("own log path"), std::path::Path::to_path_buf);
        command.stderr(std::fs::File::create(&log_path).expect("log file"));
        let mut child = command.spawn().expect("spawn hookgate");
        if let Err(why) = wait_until_ready(&mut child, admin_port, Duration::from_secs(20)).await {
            let _ = child.kill();
            let _ = child.wait();
            let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = logs.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            panic!("gateway on port {port} did not become ready: {why}\nits last log lines:\n{}", tail.join("\n"));
        }
        Self { child, port, admin_port, own_log }
    }

    pub fn url(&self, source: &str) -> String {
        format!("http://127.0.0.1:{}/webhooks/{source}", self.port)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.admin_port)
    }

    /// Peak resident memory of the process (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
            .map_or(0, |kb| kb / 1024)
    }

    /// Sends the signal `name` (`HUP`, `TERM`, …) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} {}", self.child.id());
    }

    /// Its exit status, once it has exited within `limit`; `None` while it still runs. Polled rather than
    /// waited for on a blocking thread: the child stays here, so the drop finds it exited (and keeps its log
    /// if an assertion fails).
    pub async fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL: no drain, no flush, as a crash or an OOM kill.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let _ = self.child.wait();
        }
        if let Some(path) = self.own_log.as_ref().filter(|_| !std::thread::panicking()) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Polls /readyz until it answers 200; on failure says whether the process exited or what /readyz last said.
pub async fn wait_until_ready(child: &mut std::process::Child, admin_port: u16, limit: Duration) -> Result<(), String> {
    let ready = format!("http://127.0.0.1:{admin_port}/readyz");
    let client = client();
    let deadline = Instant::now() + limit;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited ({status})"));
        }
        let request = http::Request::get(&ready).body(http_body_util::Full::new(bytes::Bytes::new())).expect("request");
        match tokio::time::timeout(Duration::from_secs(2), client.request(request)).await {
            Ok(Ok(response)) if response.status() == 200 => return Ok(()),
            Ok(Ok(response)) => {
                let status = response.status();
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .map(http_body_util::Collected::to_bytes);
                last = format!("/readyz answered {status}: {}", String::from_utf8_lossy(&body.unwrap_or_default()));
            }
            Ok(Err(e)) => last = format!("/readyz: {e:?}"),
            Err(_) => "/readyz: no answer within 2 s".clone_into(&mut last),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("still not ready after {limit:?}; {last}"))
}

#[tokio::test]
async fn sigterm_under_load_exits_in_time_and_every_202_is_stored() {
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let mut gateway = GatewayProcess::start_with(&config, port, admin_port, &[("RUST_LOG", "warn")], None).await;

    // 64 senders, 4000 events in all; SIGTERM once a good share is in flight.
    let url = format!("http://127.0.0.1:{port}/webhooks/stripe");
    let stop_sending = Arc::new(AtomicBool::new(false));
    let mut senders = tokio::task::JoinSet::new();
    for sender in 0..64 {
        let (url, stop_sending) = (url.clone(), stop_sending.clone());
        senders.spawn(async move {
            let client = client();
            let mut acknowledged = Vec::new();
            let mut other = 0u32;
            for i in 0..63 {
                if stop_sending.load(Ordering::Relaxed) {
                    break;
                }
                let id = format!("evt_term_{sender}_{i}");
                let body = stripe_event(&id);
                let request = http::Request::post(&url);
                let request = stripe_headers(body.as_bytes())
                    .into_iter()
                    .fold(request, |r, (k, v)| r.header(k, v))
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .expect("request");
                match client.request(request).await {
                    Ok(r) if r.status() == 202 => acknowledged.push(id),
                    Ok(r) => {
                        assert_eq!(r.status(), 503, "only 202 or 503 during a drain");
                        other += 1;
                    }
                    // Connection refused or closed: the listener is gone. Unacknowledged, so the sender retries.
                    Err(_) => other += 1,
                }
                // Paced, so that the load is still running when the signal comes.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (acknowledged, other)
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = gateway.child.id().to_string();
    let signalled = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());

    let exit = gateway.exit_within(Duration::from_secs(60)).await.expect("exited");
    let took = signalled.elapsed();
    stop_sending.store(true, Ordering::Relaxed);
    assert!(exit.success(), "hookgate exited with {exit:?}");
    assert!(took < Duration::from_secs(21), "exit took {took:?}, past the 20 s grace");

    let (mut acknowledged, mut refused) = (Vec::new(), 0u32);
    while let Some(result) = senders.join_next().await {
        let (ids, other) = result.expect("sender");
        acknowledged.extend(ids);
        refused += other;
    }
    assert!(acknowledged.len() > 100, "only {} acknowledged before SIGTERM", acknowledged.len());
    let stored = db.stored_ids().await;
    let lost: Vec<&String> = acknowledged.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "{} acknowledged events lost, e.g. {:?}", lost.len(), lost.first());
    println!(
        "RELIABILITY | SIGTERM under load (64 senders) | {} | {} | 0 | exited cleanly {took:.1?} after the signal | -",
        acknowledged.len() + refused as usize,
        acknowledged.len()
    );
    let _ = std::fs::remove_file(config);
}

/// Holds an exclusive lock on `events` until dropped (rolled back): the gateway's inserts wait behind it, as
/// they do on a database that stopped answering.
async fn lock_events(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut locked = db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *locked).await.expect("lock events");
    locked
}

/// Enqueue mode, Postgres not answering, a drain grace of a minute: a second SIGTERM ends the wait, and the
/// acknowledged events still queued are spilled rather than lost (an exit at once would lose them); the
/// next start stores them, each once (their stream after an import: the `hardening` spill test).
#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once_and_spills_what_was_acknowledged() {
    let db = TestDb::create().await;
    let spill_dir = scratch("spill-hurried");
    let spill = spill_dir.to_str().expect("utf-8 path");
    let env = [
        ("HOOKGATE__QUEUE__ACK_MODE", "enqueue"),
        ("HOOKGATE__SHUTDOWN__SPILL_DIR", spill),
        ("HOOKGATE__SHUTDOWN__DRAIN_GRACE_MS", "60000"),
    ];
    let (mut gateway, log) = start_logging_json(&db.url, "hurried", &env).await;
    let locked = lock_events(&db).await;
    let ids = post_queued(&gateway, 3, "evt_hurried").await;

    gateway.signal("TERM");
    assert!(gateway.exit_within(Duration::from_secs(1)).await.is_none(), "draining: the queue waits on Postgres");
    let hurried = Instant::now();
    gateway.signal("TERM");
    let exit = gateway.exit_within(Duration::from_secs(20)).await.expect("exits well before the minute's drain grace");
    let took = hurried.elapsed();
    assert!(exit.success(), "a hurried stop is still a clean one: {exit:?}");
    let (text, hurried_steps) = json_log_lines_with(&log, "shutdown hurried by a second signal");
    assert!(
        hurried_steps.iter().any(|line| line["step"] == "drain queue"),
        "the drain's wait is what the second signal ended: {text}"
    );
    let files = spill_files(&spill_dir);
    assert_eq!(files.len(), 1, "one spill file: {files:?}");
    assert_holds_exactly(&files[0], &ids);
    drop(locked);

    let _gateway = stored_once_at_the_next_start(&db, "hurried-restart", &env, &ids).await;
    assert!(eventually(Duration::from_secs(10), || async { !files[0].exists() }).await, "the file goes once stored");
    println!(
        "RELIABILITY | enqueue, Postgres locked, drain grace 60 s: a second SIGTERM 1 s into the drain | 3 | 3 | 0 | \
         exited 0 in {took:.1?} after it, the three spilled, stored once at the next start | -"
    );
    let _ = std::fs::remove_dir_all(&spill_dir);
}

/// Posts `count` Stripe events (ids from `prefix`) that enqueue mode answers 202 `queued`; returns their ids.
async fn post_queued(gateway: &GatewayProcess, count: usize, prefix: &str) -> Vec<String> {
    let client = client();
    let ids: Vec<String> = (0..count).map(|_| unique(prefix)).collect();
    for id in &ids {
        let answer = post_stripe_with(&client, &gateway.url("stripe"), id).await;
        assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("queued")), "{answer:?}");
    }
    ids
}

/// Asserts that the spill file holds `ids`, one line each, and nothing else.
fn assert_holds_exactly(file: &std::path::Path, ids: &[String]) {
    let spilled = std::fs::read_to_string(file).expect("spill file");
    assert!(ids.iter().all(|id| spilled.contains(id.as_str())) && spilled.lines().count() == ids.len(), "{spilled}");
}

/// Starts the gateway again (`env` as before, so the same spill_dir) and asserts that it stores `ids` from
/// the spill file, each once (the test's database holds nothing else). Returns it, running.
async fn stored_once_at_the_next_start(
    db: &TestDb,
    name: &str,
    env: &[(&str, &str)],
    ids: &[String],
) -> GatewayProcess {
    let (gateway, _log) = start_logging_json(&db.url, name, env).await;
    let stored = eventually(Duration::from_secs(10), || async {
        let stored = db.stored_ids().await;
        ids.iter().all(|id| stored.contains(id))
    });
    assert!(stored.await, "the spilled events are stored at the next start");
    assert_eq!(usize::try_from(db.count().await).ok(), Some(ids.len()), "each once");
    gateway
}

/// The spill files in `dir` (finished or `.partial`).
fn spill_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .expect("spill dir")
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("spill-")))
        .collect()
}

/// Traces every thread of `pid` with strace, each `fdatasync` held `delay` before it returns: a disk that
/// syncs slowly, for this process alone. Returns once strace is attached to all of them (it ends with the
/// process; kill it sooner if the test ends first).
async fn slow_fdatasync(pid: u32, delay: Duration) -> std::process::Child {
    let inject = format!("fdatasync:delay_exit={}", delay.as_micros());
    let strace = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=fdatasync", "-e", "signal=none", "-e", &format!("inject={inject}")])
        .args(["-o", "/dev/null", "-p", &pid.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("strace (deploy/services.sh start installs it)");
    let all_traced = || {
        std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
            tasks.filter_map(Result::ok).all(|task| {
                std::fs::read_to_string(task.path().join("status")).is_ok_and(|status| {
                    status
                        .lines()
                        .any(|line| line.starts_with("TracerPid:") && line.split_whitespace().nth(1) != Some("0"))
                })
            })
        })
    };
    assert!(eventually(Duration::from_secs(10), || async { all_traced() }).await, "strace attached to {pid}");
    strace
}

/// Enqueue mode with a spill_dir, Postgres not answering, and a disk whose syncs take 0.5 s: the drain's
/// end spills twelve acknowledged events one write each, 6 s in all, and the stop waits for every one. With
/// the workers' 2 s bound it finished the file after the first eight and went on to its last steps while the
/// workers wrote the rest into a second file, left `.partial` at the exit: lost had the exit come sooner
/// (the last steps took 10 s here, waiting on the locked table), and cut at a kill. The spill's writes run off
/// the runtime's threads, so its timers (the step's warnings) keep time meanwhile.
#[tokio::test]
async fn a_spill_slower_than_the_abort_bound_is_written_to_its_end() {
    let db = TestDb::create().await;
    let spill_dir = scratch("spill-slow-disk");
    let spill = spill_dir.to_str().expect("utf-8 path");
    let env = [
        ("HOOKGATE__QUEUE__ACK_MODE", "enqueue"),
        ("HOOKGATE__SHUTDOWN__SPILL_DIR", spill),
        ("HOOKGATE__SHUTDOWN__DRAIN_GRACE_MS", "300"),
        // One event a write, one sync each.
        ("HOOKGATE__WORKERS__BATCH_MAX", "1"),
    ];
    let (mut gateway, log) = start_logging_json(&db.url, "slow-spill", &env).await;
    let locked = lock_events(&db).await;
    let ids = post_queued(&gateway, 12, "evt_slow_spill").await;
    let mut strace = slow_fdatasync(gateway.child.id(), Duration::from_millis(500)).await;

    let stopping = Instant::now();
    gateway.signal("TERM");
    let finished = || spill_files(&spill_dir).iter().any(|file| file.extension().is_some_and(|ext| ext == "jsonl"));
    assert!(eventually(Duration::from_secs(60), || async { finished() }).await, "the spill file is finished");
    let took = stopping.elapsed();
    // Unlocked, the last steps (the notifier's flush, the pool's close) need not wait out their bounds.
    drop(locked);
    let exit = gateway.exit_within(Duration::from_secs(30)).await.expect("exits once the spill is written");
    let _ = strace.kill();
    let _ = strace.wait();
    assert!(exit.success(), "{exit:?}");
    let (text, still_running) = json_log_lines_with(&log, "shutdown step still running");
    let files = spill_files(&spill_dir);
    assert_eq!(files.len(), 1, "one spill file, finished once all was in it: {files:?}\n{text}");
    assert!(files[0].extension().is_some_and(|ext| ext == "jsonl"), "finished, not left .partial: {files:?}");
    assert_holds_exactly(&files[0], &ids);
    // Every 2 s of a spill of at least 6 s (twelve syncs of 0.5 s, one at a time): at least two. Only one came
    // when the writes ran on the runtime's threads, whose timers then fired seconds late.
    let warnings = still_running.iter().filter(|line| line["step"] == "spill unwritten events").count();
    assert!(warnings >= 2, "the slow spill is named every 2 s while it runs ({warnings} times): {text}");

    let _gateway = stored_once_at_the_next_start(&db, "slow-spill-restart", &env, &ids).await;
    println!(
        "RELIABILITY | enqueue, Postgres locked, spill_dir on a disk whose syncs take 0.5 s (strace): SIGTERM, \
         drain grace 300 ms, twelve one-event spill writes | 12 | 12 | 0 | the file finished {took:.1?} after \
         the SIGTERM, past the workers' 2 s bound, with all twelve in it; stored once at the next start | -"
    );
    let _ = std::fs::remove_dir_all(&spill_dir);
}

/// A third signal is the way out when even the hurried stop waits (here on a statement Postgres holds, with
/// no spill_dir to turn to): the process exits at once with 130. After two it would wait for the workers'
/// 2 s bound and exit 0.
#[tokio::test]
async fn a_third_signal_exits_at_once() {
    let db = TestDb::create().await;
    let env = [("HOOKGATE__QUEUE__ACK_MODE", "enqueue"), ("HOOKGATE__SHUTDOWN__DRAIN_GRACE_MS", "60000")];
    let (mut gateway, _log) = start_logging_json(&db.url, "third-signal", &env).await;
    let locked = lock_events(&db).await;
    let answer = post_stripe_with(&client(), &gateway.url("stripe"), &unique("evt_third")).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    for _ in 0..3 {
        gateway.signal("TERM");
        // Apart, so that each is its own signal rather than one the kernel merges with the last.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let exit = gateway.exit_within(Duration::from_secs(10)).await.expect("exits");
    assert_eq!(exit.code(), Some(130), "the third signal's exit, not the hurried stop's: {exit:?}");
    drop(locked);
}

#[test]
fn check_config_names_the_bad_key_and_redacts() {
    let out =
        hookgate().arg("check-config").env("HOOKGATE__QUEUE__CAPACITY", "lots").output().expect("run check-config");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("queue.capacity"), "{err}");

    let out = hookgate()
        .arg("check-config")
        .env("HOOKGATE__STORE__URL", "postgres://u:hunter2@db/x")
        .env("HOOKGATE__SOURCES__S__SCHEME", "stripe")
        .env("HOOKGATE__SOURCES__S__SECRET_ENV", "HG_IT_CHECK_SECRET")
        .env("HG_IT_CHECK_SECRET", "whsec_topsecret")
        .output()
        .expect("run check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("[queue]") && text.contains("postgres://u:****@db/x"), "{text}");
    assert!(!text.contains("hunter2") && !text.contains("topsecret"), "{text}");
}

#[test]
fn check_config_tells_whether_the_spill_dir_can_be_written() {
    let check = |dir: &std::path::Path| {
        hookgate().arg("check-config").env("HOOKGATE__SHUTDOWN__SPILL_DIR", dir).output().expect("run check-config")
    };
    let dir = scratch("spill-check");
    let out = check(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("spill_dir") && text.contains("can be written") && dir.is_dir(), "{text}");
    // A file where the directory should be (as root, permissions would not stop the write).
    let file = scratch("spill-not-a-dir");
    std::fs::write(&file, b"").expect("file");
    let out = check(&file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("shutdown.spill_dir"), "{err}");
    let _ = (std::fs::remove_dir_all(&dir), std::fs::remove_file(&file));
}

/// A spill_dir is one process's: a gateway given one that a running process holds is refused at start, the
/// holder named, before it connects to anything; `check-config` beside it says so and passes.
#[test]
fn a_gateway_is_refused_a_spill_dir_another_process_holds() {
    let dir = scratch("spill-held");
    let holder = format!("pid {}", std::process::id());
    let held = hookgate::spill::Spill::open(&dir).expect("this test process holds it");
    // Nothing listens on port 1: the refusal comes first, or the start would fail on the database instead.
    let config = config_file("postgres://hookgate@127.0.0.1:1/none", free_port(), free_port());
    let serve = || {
        hookgate()
            .args(["--config", config.to_str().expect("path"), "serve"])
            .env("HOOKGATE__SHUTDOWN__SPILL_DIR", &dir)
            .output()
            .expect("run serve")
    };
    let out = serve();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("shutdown.spill_dir") && err.contains("another hookgate process uses it"), "{err}");
    assert!(err.contains(&holder), "names the holder: {err}");
    let check = || hookgate().arg("check-config").env("HOOKGATE__SHUTDOWN__SPILL_DIR", &dir).output().expect("run");
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&format!("in use by a running hookgate ({holder})")), "{text}");

    drop(held);
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("in use"), "free once its holder is gone: {text}");
    let out = serve();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("spill_dir"), "past the spill_dir, on to the database: {err}");
    let _ = (std::fs::remove_dir_all(&dir), std::fs::remove_file(&config));
}

#[tokio::test]
async fn sign_prints_headers_the_gateway_accepts() {
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let gateway = Gateway::start(
        hookgate::config::Config::load_with_env(
            Some(&config),
            figment::providers::Env::prefixed("HOOKGATE_IT_UNUSED__"),
        )
        .map(|mut c| {
            c.server.listen = "127.0.0.1:0".parse().expect("addr");
            c
        })
        .expect("config"),
    )
    .await;
    let id = unique("evt");
    let body_path = std::env::temp_dir().join(format!("{id}.json"));
    std::fs::write(&body_path, stripe_event(&id)).expect("body");
    let out = hookgate()
        .args(["--config", config.to_str().expect("path"), "sign", "--source", "stripe", "--body"])
        .arg(&body_path)
        .output()
        .expect("run sign");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let headers: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    assert_eq!(headers.len(), 1);
    let body = std::fs::read(&body_path).expect("body");
    let answer = post(&client(), &gateway.url("stripe"), &headers, &body).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    gateway.stop().await;
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_file(body_path);
}

#[tokio::test]
async fn migrate_creates_the_schema_with_its_vacuum_settings() {
    let db = TestDb::create().await;
    let config = config_file(&db.url, free_port(), free_port());
    let out = hookgate().args(["--config", config.to_str().expect("path"), "migrate"]).output().expect("run migrate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_file(config);

    let options = |table: &'static str| {
        sqlx::query_scalar::<_, Vec<String>>("SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = $1::regclass")
            .bind(table)
            .fetch_one(&db.pool)
    };
    // events: vacuumed every 50,000 inserted rows, while its new pages are still cached (0004).
    let events = options("events").await.expect("events exists");
    assert!(events.contains(&"autovacuum_vacuum_insert_threshold=50000".to_owned()), "{events:?}");
    assert!(events.contains(&"autovacuum_vacuum_insert_scale_factor=0.0".to_owned()), "{events:?}");
    // events_outbox, a row per batch (0005): a fixed dead-row threshold, with the default throttling.
    let outbox = options("events_outbox").await.expect("events_outbox exists");
    assert!(outbox.contains(&"autovacuum_vacuum_threshold=1000".to_owned()), "{outbox:?}");
    assert!(!outbox.iter().any(|o| o.starts_with("autovacuum_vacuum_cost_delay")), "{outbox:?}");
}

/// An upgrade from the outbox of a row per event (migrations 0001-0004) to a row per batch (0005) keeps
/// what was queued: a gateway on the migrated database publishes every event once and empties the outbox.
#[tokio::test]
async fn migrating_a_per_event_outbox_keeps_its_backlog() {
    let db = TestDb::create().await;
    // The schema as it was before 0005: the first four migrations, from a folder of their own.
    let old = std::env::temp_dir().join(unique("hg_migrations_0004"));
    std::fs::create_dir_all(&old).expect("folder");
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).expect("migrations") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
        if name.as_str() < "0005" {
            std::fs::copy(&path, old.join(name)).expect("copy");
        }
    }
    let before = sqlx::migrate::Migrator::new(old.as_path()).await.expect("old migrations");
    assert_eq!(before.iter().count(), 4);
    before.run(&db.pool).await.expect("migrate to 0004");
    let _ = std::fs::remove_dir_all(&old);
    let ids: Vec<String> = (0..30).map(|_| unique("evt_upgrade")).collect();
    let bodies: Vec<Vec<u8>> = ids.iter().map(|id| stripe_event(id).into_bytes()).collect();
    sqlx::query(
        "WITH e AS (INSERT INTO events (source, event_id, event_type, body) \
           SELECT 'stripe', id, 'charge.succeeded', body FROM unnest($1::text[], $2::bytea[]) AS b(id, body) \
           RETURNING seq, source, event_id) \
         INSERT INTO events_outbox (seq, source, event_id, queued_at) \
           SELECT seq, source, event_id, now() - interval '1 minute' FROM e",
    )
    .bind(&ids)
    .bind(&bodies)
    .execute(&db.pool)
    .await
    .expect("per-event outbox rows");

    let config = test_config(&db.url);
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    store.migrate().await.expect("migrate to 0005");
    assert_eq!(store.count_unpublished(Duration::from_secs(5)).await.expect("count"), 30, "every queued event kept");
    start_and_expect_backlog_published(config, &db, &ids, "migrated backlog").await.stop().await;
}

#[tokio::test]
async fn serve_raises_the_open_file_limit_to_its_hard_limit_and_warns_when_that_is_short() {
    let db = TestDb::create().await;
    let limits = |(soft, hard): (u32, u32)| format!("--nofile={soft}:{hard}");
    let limit_of = |gateway: &GatewayProcess| {
        let url = gateway.metrics_url();
        async move { scrape_metric(&url, "process_max_fds").await }
    };
    let warned = |log: &std::path::Path| {
        let (text, lines) = json_log_lines_with(log, "the open file limit is below");
        (lines.iter().filter(|line| line["level"] == "WARN").count(), text)
    };

    // A shell's soft limit under a generous hard one (systemd's 1024 against 524288): raised.
    let (port, admin) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin);
    let log = std::env::temp_dir().join(format!("{}.log", unique("hookgate-it-nofile")));
    let gateway = GatewayProcess::start_wrapped(&["prlimit", &limits((256, 8192))], &config, port, admin, &log).await;
    assert_eq!(limit_of(&gateway).await, Some(8192.0), "the soft limit is raised to the hard one");
    let (warnings, text) = warned(&log);
    assert_eq!(warnings, 0, "8192 covers 4096 connections and the pools: {text}");
    assert_eq!(post_stripe_with(&client(), &gateway.url("stripe"), &unique("evt_nofile")).await.status, 202);
    drop(gateway);

    // A hard limit short of server.max_connections: served, and said so.
    let (port, admin) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin);
    let gateway = GatewayProcess::start_wrapped(&["prlimit", &limits((256, 512))], &config, port, admin, &log).await;
    assert_eq!(limit_of(&gateway).await, Some(512.0));
    let (warnings, text) = warned(&log);
    assert_eq!(warnings, 1, "{text}");
    assert_eq!(post_stripe_with(&client(), &gateway.url("stripe"), &unique("evt_nofile")).await.status, 202);
    drop(gateway);
    let _ = std::fs::remove_file(log);
}
