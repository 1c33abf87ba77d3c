//! The `hookgate-load` binary as bench.sh calls it: `sync-probe` writes its figures, and bad input (to it, or
//! an attack's target and CA) is a clear error with exit status 2.

use std::path::PathBuf;
use std::process::Command;

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hookgate-load-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn sync_probe_reports_every_tick_as_json() {
    let dir = scratch_dir("probe");
    let report = dir.join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_hookgate-load"))
        .args(["sync-probe", "--interval", "10ms", "--duration", "100ms", "--dir"])
        .arg(&dir)
        .arg("--report-json")
        .arg(&report)
        .output()
        .expect("run hookgate-load");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("write + fdatasync of 8192 bytes"), "{stdout}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    let samples = json["samples"].as_u64().expect("samples");
    let skipped = json["skipped"].as_u64().expect("skipped");
    assert_eq!(samples + skipped, 10, "{json}");
    assert!(json["max_us"].as_u64().expect("max") >= json["p50_us"].as_u64().expect("p50"));
    // Only the report is left behind: the probe file is removed.
    let left: Vec<_> = std::fs::read_dir(&dir).expect("read dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("report.json")]);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn sync_probe_on_a_missing_directory_fails_clearly() {
    let output = Command::new(env!("CARGO_BIN_EXE_hookgate-load"))
        .args(["sync-probe", "--duration", "10ms", "--dir", "/nonexistent/hookgate-load"])
        .output()
        .expect("run hookgate-load");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/hookgate-load is not a directory"), "{stderr}");
}

#[test]
fn attack_targets_must_be_http_or_https_and_an_unreadable_cacert_or_proxy_client_is_named() {
    let attack = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_hookgate-load"))
            .args(["attack", "--secret", "s", "--rate", "10", "--duration", "1s", "--no-progress"])
            .args(extra)
            .output()
            .expect("run hookgate-load");
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (status, stderr) = attack(&["--target", "ftp://127.0.0.1:1/webhooks/stripe"]);
    assert_eq!(status, Some(2));
    assert!(stderr.contains("only http:// or https://host[:port]/path targets"), "{stderr}");
    // No connection is tried: the CA file is read before the run starts.
    let (status, stderr) =
        attack(&["--target", "https://127.0.0.1:1/webhooks/stripe", "--cacert", "/nonexistent/ca.pem"]);
    assert_eq!(status, Some(2));
    assert!(stderr.contains("reading --cacert /nonexistent/ca.pem"), "{stderr}");
    // A client address for a PROXY header that is not sent, and one that is not an address: refused by the
    // parser (its usage error, status 2), naming the flag.
    let (status, stderr) = attack(&["--target", "http://127.0.0.1:1/webhooks/stripe", "--proxy-client", "192.0.2.1"]);
    assert_eq!(status, Some(2));
    assert!(stderr.contains("--proxy-protocol"), "{stderr}");
    let bad_address = ["--target", "http://127.0.0.1:1/x", "--proxy-protocol", "v2", "--proxy-client", "stripe.com"];
    let (status, stderr) = attack(&bad_address);
    assert_eq!(status, Some(2));
    assert!(stderr.contains("--proxy-client"), "{stderr}");
    let mixed = ["--target", "http://127.0.0.1:1/x", "--proxy-protocol", "v1", "--proxy-client", "2001:db8::1"];
    let (status, stderr) = attack(&mixed);
    assert_eq!(status, Some(2));
    assert!(stderr.contains("are of different IP families"), "{stderr}");
}
