//! The README's quickstart as a user runs it: `deploy/run-local.sh`, then the "Try it with curl" commands.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{wait_until_ready, without_overrides};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_hookgate");

/// The shell block under the README's `heading`.
fn readme_block(heading: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README");
    let block = readme
        .split(heading)
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|block| block.split("```").next())
        .unwrap_or_else(|| panic!("no ```sh block under {heading:?} in the README"));
    block.to_owned()
}

/// `text` with `from` replaced, which must be there: a README that stops saying it should fail here, not pass
/// with the substitution silently skipped.
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the README's example no longer has {from:?}:\n{text}");
    text.replace(from, to)
}

/// `deploy/run-local.sh` starts the services and a gateway with `config/local.toml` and its generated
/// secrets; the README's curl example, run as written (only the binary's path, the ports, the scratch folder
/// and the event id swapped for the test's), gets 202 `accepted`, then `duplicate`, and the metric; the event
/// is in the database the script names; Ctrl-C drains and exits 0.
#[tokio::test]
async fn the_quickstart_gateway_answers_the_readmes_curl_example_and_stops_on_ctrl_c() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (port, admin) = (free_port(), free_port());
    let folder = scratch("quickstart");
    std::fs::create_dir_all(&folder).expect("scratch folder");
    let id = unique("evt_quickstart");
    let mut commands = readme_block("### Try it with curl");
    // `/tmp/` first: the paths put in after it may hold one (a clone under /tmp).
    for (from, to) in [
        ("/tmp/", format!("{}/", folder.display())),
        ("target/release/hookgate", BIN.to_owned()),
        ("127.0.0.1:8080", format!("127.0.0.1:{port}")),
        ("127.0.0.1:9464", format!("127.0.0.1:{admin}")),
        ("evt_1", id.clone()),
    ] {
        commands = replaced(&commands, from, &to);
    }

    let log = folder.join("run-local.log");
    let mut child = without_overrides(Command::new("bash"))
        .arg(root.join("deploy/run-local.sh"))
        .env("HOOKGATE_BIN", BIN)
        .env("HOOKGATE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("HOOKGATE__ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run deploy/run-local.sh");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    if let Err(why) = wait_until_ready(&mut child, admin, Duration::from_secs(120)).await {
        let _ = child.kill();
        panic!("the quickstart's gateway is not ready: {why}\n{}", read_log());
    }

    let run = |script: &str| {
        let out = Command::new("bash").args(["-euo", "pipefail", "-c", script]).current_dir(root).output();
        let out = out.expect("bash");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{script}\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let first = run(&commands);
    assert!(first.contains("HTTP/1.1 202"), "{first}");
    assert!(first.contains(&format!("{{\"id\":\"{id}\",\"status\":\"accepted\"}}")), "{first}");
    assert!(first.contains("hookgate_events_total{"), "the metrics line: {first}");
    let send = commands.lines().find(|line| line.starts_with("curl -i")).expect("the curl line");
    let again = run(send);
    assert!(again.contains(&format!("{{\"id\":\"{id}\",\"status\":\"duplicate\"}}")), "{again}");

    let url = std::env::var("HOOKGATE_DATABASE_URL").expect("HOOKGATE_DATABASE_URL (deploy/services.sh env)");
    let pool = sqlx::PgPool::connect(&url).await.expect("the quickstart's database");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE source = 'stripe' AND event_id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored, 1, "stored once in {url}");
    pool.close().await;

    // Ctrl-C: the script exec'd the gateway, so its pid is the gateway's.
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill").success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running 30 s after Ctrl-C\n{}", read_log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = read_log();
    assert!(status.success(), "Ctrl-C drains and exits 0: {status}\n{text}");
    assert!(text.contains("hookgate is starting. Try it from another shell"), "{text}");
    let _ = std::fs::remove_dir_all(&folder);
}
