//! The generator's acceptance tests, on loopback against `sink`: its figures are exact where they can be
//! checked (a known delay, a known stall, a known rate), its requests are signed and unique, and its
//! reports merge. They run one at a time: two schedules sharing two cores would measure each other.

use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::Mutex;

use hookgate::signature::{Scheme, Verifier};
use hookgate_load::attack::{self, AttackConfig, Outcome};
use hookgate_load::findmax::{self, FindMaxConfig};
use hookgate_load::payload::PayloadFactory;
use hookgate_load::report::{self, Summary};
use hookgate_load::sink::{self, SinkConfig, SinkStats};

const SECRET: &str = "whsec_calibration";
static SERIAL: Mutex<()> = Mutex::const_new(());

async fn start_sink(config: SinkConfig) -> String {
    let listener = sink::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sink::serve(listener, config));
    format!("http://{addr}/webhooks/stripe")
}

fn attack_config(target: &str, rate: f64, seconds: u64, connections: usize, output: Option<PathBuf>) -> AttackConfig {
    AttackConfig {
        targets: vec![target.parse().unwrap()],
        rate,
        concurrency: 0,
        duration: Some(Duration::from_secs(seconds)),
        requests: None,
        connections,
        http2: false,
        tls: None,
        timeout: Duration::from_secs(5),
        warmup: Duration::ZERO,
        pace_quantum: Duration::ZERO,
        duplicate_ratio: 0.0,
        bad_signature_ratio: 0.0,
        output,
        progress: false,
        scheme: "stripe".into(),
        proxy_header: None,
    }
}

/// A find-max search against `target` with a 50 ms SLO, 1 s steps from 200/s up to 1000/s, 5% precision, no
/// retry and no settle command; each test changes what it is about.
fn search_config(target: &str, connections: usize) -> FindMaxConfig {
    FindMaxConfig {
        attack: attack_config(target, 0.0, 1, connections, None),
        slo_p99: Duration::from_millis(50),
        start_rate: 200.0,
        max_rate: 1000.0,
        step: Duration::from_secs(1),
        precision: 0.05,
        pause: Duration::from_millis(10),
        retries: 0,
        settle: None,
    }
}

fn factory(run: &str) -> PayloadFactory {
    PayloadFactory::new(Scheme::Stripe, SECRET, run.into(), vec!["a.b".into()], 1024, None, 1_700_000_000).unwrap()
}

async fn attack(config: AttackConfig, run: &str) -> Outcome {
    attack::run(config, factory(run)).await.unwrap()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hookgate-load-{}-{name}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_delay_is_measured_within_a_millisecond() {
    let _serial = SERIAL.lock().await;
    // The same schedule without the delay first: the round trip's own P50 on this machine, now.
    let baseline = start_sink(SinkConfig::default()).await;
    let round_trip = attack(attack_config(&baseline, 500.0, 2, 32, None), "delay-baseline").await.summary;
    let target = start_sink(SinkConfig { delay: Duration::from_millis(10), ..SinkConfig::default() }).await;
    let s = attack(attack_config(&target, 500.0, 5, 32, None), "delay").await.summary;
    eprintln!("{:?}\n{:?}\n{:?}", s.latency_corrected, s.latency_uncorrected, s.send_lateness);
    eprintln!("baseline {:?}", round_trip.latency_corrected);
    assert_eq!(s.successful(), s.requests);
    // No answer comes before its 10 ms; the sink's sleep ends on tokio's next millisecond tick (10 to 11 ms),
    // and the round trip adds what the baseline measured. A generator timing from the wrong start, or not
    // waiting for the answer, falls outside by far more.
    let (p50, upper) = (ms(s.latency_corrected.p50_us), 11.0 + ms(round_trip.latency_corrected.p50_us));
    // (The histogram keeps three significant digits: 10 ms may read a few µs under.)
    assert!(ms(s.latency_corrected.min_us) >= 9.98, "an answer before the delay: {:?}", s.latency_corrected);
    assert!(p50 <= upper, "corrected P50 {p50} ms above {upper} ms: {:?}", s.latency_corrected);
    // Nothing stalls, so correction adds only the sender's own lateness (corrected = uncorrected +
    // lateness, request by request). That lateness is the schedule thread waking late, which a busy
    // machine stretches in the tail: P50 must agree within 1 ms, the tail within 1 ms plus the lateness
    // this run measured. A correction from the wrong start (or none) breaks either bound by far more.
    let tail_bound = 1.0 + ms(s.send_lateness.p999_us);
    for (c, u, bound) in [
        (s.latency_corrected.p50_us, s.latency_uncorrected.p50_us, 1.0),
        (s.latency_corrected.p90_us, s.latency_uncorrected.p90_us, tail_bound),
        (s.latency_corrected.p99_us, s.latency_uncorrected.p99_us, tail_bound),
    ] {
        assert!(ms(c.abs_diff(u)) <= bound, "corrected {c}µs vs uncorrected {u}µs, bound {bound} ms");
    }
    assert!(ms(s.send_lateness.p50_us) <= 1.0, "the schedule runs late: {:?}", s.send_lateness);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shows_in_the_corrected_p99_and_the_plot_but_not_the_uncorrected() {
    let _serial = SERIAL.lock().await;
    let target = start_sink(SinkConfig {
        stall: Duration::from_millis(500),
        stall_after: Duration::from_secs(2),
        ..SinkConfig::default()
    })
    .await;
    let output = temp("stall.csv");
    // Few connections, as a closed-loop tool would have: only they see the stall from their send time.
    let s = attack(attack_config(&target, 1000.0, 5, 8, Some(output.clone())), "stall").await.summary;
    eprintln!("{:?}\n{:?}", s.latency_corrected, s.latency_uncorrected);
    assert!(s.latency_corrected.p99_us >= 200_000, "corrected P99 {:?}", s.latency_corrected);
    assert!(
        s.latency_uncorrected.p99_us * 10 <= s.latency_corrected.p99_us,
        "uncorrected P99 {} should be far below corrected {}",
        s.latency_uncorrected.p99_us,
        s.latency_corrected.p99_us
    );
    assert!(s.verdicts.iter().any(|v| v.contains("FELL BEHIND")), "{:?}", s.verdicts);
    // The plot's per-second corrected P99: one second towers over the others.
    let by_second = hookgate_load::plot::p99_by_second(std::slice::from_ref(&output)).unwrap();
    let mut sorted = by_second.clone();
    sorted.sort_unstable();
    assert!(*sorted.last().unwrap() >= 200_000 && sorted[sorted.len() / 2] < 20_000, "{by_second:?}");
    let html = hookgate_load::plot::render(std::slice::from_ref(&output), "stall").unwrap();
    assert!(html.contains("<svg") && html.contains("P99 corrected") && html.matches("<polyline").count() >= 6);
    let _ = std::fs::remove_file(output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_achieved_rate_is_within_one_percent_at_1000_and_5000_per_second() {
    let _serial = SERIAL.lock().await;
    let target = start_sink(SinkConfig::default()).await;
    for rate in [1000.0, 5000.0] {
        let s = attack(attack_config(&target, rate, 5, 32, None), &format!("rate{rate}")).await.summary;
        eprintln!("{rate}/s: achieved {:.1}/s, dropped {}, lateness {:?}", s.achieved_rate, s.dropped, s.send_lateness);
        assert!(s.rate_met(0.01), "{rate}/s: achieved {} dropped {}", s.achieved_rate, s.dropped);
        assert_eq!(s.requests, (rate * 5.0) as u64);
        assert_eq!(s.successful(), s.requests);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pace_quantum_releases_requests_together_keeps_the_rate_and_counts_the_wait() {
    let _serial = SERIAL.lock().await;
    let target = start_sink(SinkConfig::default()).await;
    // 1,000/s with a 20 ms quantum: about 20 requests leave at each wake-up, up to 20 ms after their due time.
    let mut config = attack_config(&target, 1000.0, 3, 64, None);
    config.pace_quantum = Duration::from_millis(20);
    let s = attack(config, "quantum").await.summary;
    eprintln!("lateness {:?}\ncorrected {:?}", s.send_lateness, s.latency_corrected);
    assert!(s.rate_met(0.01), "achieved {} dropped {}", s.achieved_rate, s.dropped);
    assert_eq!(s.successful(), s.requests);
    // Evenly spread over the quantum, the median request waits about half of it; the corrected latency
    // includes the wait, the uncorrected one does not.
    assert!((5.0..=20.0).contains(&ms(s.send_lateness.p50_us)), "lateness {:?}", s.send_lateness);
    assert!(ms(s.latency_corrected.p50_us) >= ms(s.latency_uncorrected.p50_us) + 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_signed_and_unique_except_the_requested_duplicates_and_bad_ones() {
    let _serial = SERIAL.lock().await;
    let verifier = Verifier::new(Scheme::Stripe, &[SECRET], 300).unwrap();
    let target = start_sink(SinkConfig { verifier: Some(verifier), ..SinkConfig::default() }).await;
    let output = temp("mix.csv");
    let mut config = attack_config(&target, 2000.0, 2, 16, Some(output.clone()));
    config.duplicate_ratio = 0.1;
    config.bad_signature_ratio = 0.05;
    let s = attack(config, "mix").await.summary;
    let stats_url = target.replace("/webhooks/stripe", "/stats");
    let stats: SinkStats = fetch_json(&stats_url).await;

    let (mut fresh, mut dup, mut bad) = (0u64, 0u64, 0u64);
    hookgate_load::results::read(&output, |_, row| match row.kind {
        hookgate_load::payload::Kind::Fresh => fresh += 1,
        hookgate_load::payload::Kind::Duplicate => dup += 1,
        hookgate_load::payload::Kind::BadSignature => bad += 1,
    })
    .unwrap();
    assert_eq!(fresh + dup + bad, s.requests);
    assert!(dup > 200 && bad > 100, "dup {dup} bad {bad}");
    assert_eq!(stats.requests, s.requests);
    assert_eq!(stats.invalid_signatures, bad, "exactly the bad ones fail verification");
    assert_eq!(stats.valid_signatures, fresh + dup);
    assert_eq!(stats.unique_ids, fresh, "every fresh event has an id of its own");
    assert_eq!(stats.repeated_ids, dup);
    // The sink answers 401 to the bad ones, which is what the generator expects of them.
    assert_eq!(s.successful(), s.requests, "{:?}", s.status_codes);
    let _ = std::fs::remove_file(output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_merges_files_and_json_round_trips() {
    let _serial = SERIAL.lock().await;
    let target = start_sink(SinkConfig::default()).await;
    let (a, b) = (temp("a.csv"), temp("b.csv"));
    let sa = attack(attack_config(&target, 500.0, 1, 8, Some(a.clone())), "ma").await.summary;
    let sb = attack(attack_config(&target, 300.0, 1, 8, Some(b.clone())), "mb").await.summary;
    let (recorder, planned, rate) = report::merge_files(&[a.clone(), b.clone()]).unwrap();
    let merged = Summary::new(&recorder, planned, rate);
    assert_eq!(merged.requests, sa.requests + sb.requests);
    assert_eq!(merged.planned, 800);
    assert!((merged.requested_rate - 800.0).abs() < 1e-9);
    assert_eq!(merged.status_codes["202"], 800);
    // One file alone reproduces the attack's own summary.
    let (alone, planned, rate) = report::merge_files(std::slice::from_ref(&a)).unwrap();
    assert_eq!(Summary::new(&alone, planned, rate), sa);
    let json = serde_json::to_string(&merged).unwrap();
    assert_eq!(serde_json::from_str::<Summary>(&json).unwrap(), merged);
    let _ = (std::fs::remove_file(a), std::fs::remove_file(b));
}

async fn fetch_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warmup_is_sent_at_the_rate_but_not_recorded() {
    let _serial = SERIAL.lock().await;
    let verifier = Verifier::new(Scheme::Stripe, &[SECRET], 300).unwrap();
    let target = start_sink(SinkConfig { verifier: Some(verifier), ..SinkConfig::default() }).await;
    let mut config = attack_config(&target, 500.0, 2, 8, None);
    config.warmup = Duration::from_secs(1);
    let s = attack(config, "warm").await.summary;
    let stats: SinkStats = fetch_json(&target.replace("/webhooks/stripe", "/stats")).await;
    assert_eq!((s.planned, s.requests), (1000, 1000), "only the measured 2 s are reported");
    assert_eq!(stats.requests, 1500, "the warm-up's 500 requests were sent too");
    assert_eq!(stats.unique_ids, 1500, "warm-up events have ids of their own");
    assert!(s.rate_met(0.01), "{}", s.achieved_rate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_max_with_a_retry_sees_past_a_one_off_stall_and_without_one_searches_below_it_and_settles_between_steps() {
    let _serial = SERIAL.lock().await;
    for retries in [0, 1] {
        let settles = temp(&format!("settles-{retries}"));
        let _ = std::fs::remove_file(&settles);
        // A fresh sink for each search: its one stall (400 ms, 200 ms after its first request) falls in
        // the first step, whose P99 it pushes far over the 50 ms SLO; the sink answers at once otherwise.
        let target = start_sink(SinkConfig {
            stall: Duration::from_millis(400),
            stall_after: Duration::from_millis(200),
            ..SinkConfig::default()
        })
        .await;
        let config = FindMaxConfig {
            start_rate: 500.0,
            step: Duration::from_secs(2),
            pause: Duration::from_millis(100),
            retries,
            settle: Some(format!("echo step >> {}", settles.display())),
            ..search_config(&target, 32)
        };
        let result = findmax::run(&config, |i| Ok(factory(&format!("findmax-{retries}-{i}")))).await.unwrap();
        let steps: Vec<(f64, u32, bool)> = result.steps.iter().map(|s| (s.rate, s.attempt, s.ok)).collect();
        eprintln!("retries {retries}: {steps:?}");
        assert!(result.steps[0].p99_us > 50_000, "the stall fails the first step: {:?}", result.steps[0]);
        // The settle command ran once before every step after the first.
        let settled = std::fs::read_to_string(&settles).unwrap_or_default().lines().count();
        assert_eq!(settled, result.steps.len() - 1);
        let _ = std::fs::remove_file(&settles);
        if retries == 0 {
            // The failed start rate counts as failed: the search halves to 250/s, which passes, and bisects
            // up from there until the bracket is within 5% of the start rate (25/s).
            assert_eq!(steps[..2], [(500.0, 0, false), (250.0, 0, true)]);
            assert!(steps[2..].iter().all(|&(rate, _, _)| rate > 250.0 && rate < 500.0), "{steps:?}");
            assert!((475.0..500.0).contains(&result.max_sustainable_rate), "{}", result.max_sustainable_rate);
        } else {
            // The retry at the same rate passes, and the search goes on to the maximum.
            assert_eq!(steps, vec![(500.0, 0, false), (500.0, 1, true), (1000.0, 0, true)]);
            assert!((result.max_sustainable_rate - 1000.0).abs() < 0.5, "{}", result.max_sustainable_rate);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_max_halves_a_failing_start_rate_down_to_its_floor_and_then_reports_nothing_sustainable() {
    let _serial = SERIAL.lock().await;
    // Every answer takes 60 ms against a 50 ms SLO: no rate passes.
    let target = start_sink(SinkConfig { delay: Duration::from_millis(60), ..SinkConfig::default() }).await;
    let config = FindMaxConfig { start_rate: 400.0, precision: 0.25, ..search_config(&target, 64) };
    let result = findmax::run(&config, |i| Ok(factory(&format!("floor-{i}")))).await.unwrap();
    let steps: Vec<(f64, bool)> = result.steps.iter().map(|s| (s.rate, s.ok)).collect();
    // Halved until the rate is within the precision (25% of 400/s) of zero.
    assert_eq!(steps, vec![(400.0, false), (200.0, false), (100.0, false)]);
    assert!(result.max_sustainable_rate.abs() < 0.5 && result.best.is_none(), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_max_stops_with_a_clear_error_when_the_settle_command_fails() {
    let _serial = SERIAL.lock().await;
    let target = start_sink(SinkConfig::default()).await;
    let config = FindMaxConfig { settle: Some("exit 3".into()), ..search_config(&target, 8) };
    let err = findmax::run(&config, |i| Ok(factory(&format!("settle-fails-{i}")))).await.expect_err("settle fails");
    assert!(err.to_string().contains("the settle command \"exit 3\" failed"), "{err}");
}
