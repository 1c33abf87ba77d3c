//! `plot`: a self-contained HTML page (inline SVG, no scripts, no network) with latency over time
//! (per-second P50/P99/max, corrected and uncorrected, against the requested and achieved rate) and the
//! latency distribution. A stall shows as a tower in the corrected lines that the uncorrected ones lack.
//!
//! The SVG is written by hand: plotting crates need a font backend to lay out text, which a headless
//! server often lacks, and two line charts do not need one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use hdrhistogram::Histogram;

use crate::recorder::Recorder;
use crate::report::Summary;
use crate::results;

/// Measurements of one time bucket (by due time).
#[derive(Default)]
struct Second {
    corrected: Option<Histogram<u64>>,
    uncorrected: Option<Histogram<u64>>,
    sent: u64,
    errors: u64,
}

fn small_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("constant histogram bounds are valid")
}

/// Reads the results files and renders the page.
pub fn render(paths: &[PathBuf], title: &str) -> anyhow::Result<String> {
    // First pass: the run's span, to pick a bucket width giving about 100 points (at least 10 ms).
    let mut span_ns = 0u64;
    let mut first_origin: Option<u128> = None;
    for path in paths {
        results::read(path, |meta, row| {
            let o = *first_origin.get_or_insert(meta.start_unix_ns);
            span_ns = span_ns.max(row.due_ns + meta.start_unix_ns.saturating_sub(o) as u64);
        })?;
    }
    let bucket_ns = (span_ns / 100).max(10_000_000);
    let mut seconds: BTreeMap<u64, Second> = BTreeMap::new();
    let mut total = Recorder::default();
    let mut requested_rate = 0.0;
    let mut planned = 0;
    let mut origin: Option<u128> = None;
    for path in paths {
        let mut shift = 0u64;
        let meta = results::read(path, |meta, row| {
            // Align files from separate generators on the wall clock.
            let o = *origin.get_or_insert(meta.start_unix_ns);
            shift = meta.start_unix_ns.saturating_sub(o) as u64;
            let sec = seconds.entry((row.due_ns + shift) / bucket_ns).or_default();
            let us = |ns: u64| (ns / 1000).clamp(1, 3_600_000_000);
            let _ = sec.corrected.get_or_insert_with(small_histogram).record(us(row.corrected_ns()));
            let _ = sec.uncorrected.get_or_insert_with(small_histogram).record(us(row.uncorrected_ns()));
            sec.sent += 1;
            if !row.success() {
                sec.errors += 1;
            }
            total.record_shifted(&row, shift);
        })?;
        requested_rate += meta.rate;
        planned += meta.planned;
    }
    let summary = Summary::new(&total, planned, requested_rate);
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:sans-serif;margin:24px;color:#222}} pre{{background:#f6f6f6;padding:12px}}\
         </style></head><body><h1>{t}</h1>",
        t = escape(title)
    );
    html.push_str(&time_chart(&seconds, bucket_ns, requested_rate));
    html.push_str(&distribution_chart(&total));
    let mut text = Vec::new();
    summary.write_text(&mut text)?;
    let _ = write!(html, "<h2>Summary</h2><pre>{}</pre></body></html>", escape(&String::from_utf8_lossy(&text)));
    Ok(html)
}

const W: f64 = 1000.0;
const H: f64 = 380.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 70.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// A named, coloured line of (x, y) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

fn time_chart(seconds: &BTreeMap<u64, Second>, bucket_ns: u64, requested_rate: f64) -> String {
    let bucket_s = bucket_ns as f64 / 1e9;
    let first = seconds.keys().next().copied().unwrap_or(0);
    let last = seconds.keys().last().copied().unwrap_or(0);
    let span = (last - first + 1) as f64 * bucket_s;
    let q = |h: &Option<Histogram<u64>>, quantile: f64| h.as_ref().map_or(0, |h| h.value_at_quantile(quantile));
    // Drawn in this order: the corrected P99 last, on top.
    let series: Vec<Series> = vec![
        ("max corrected", "#bbbbbb", collect(seconds, first, bucket_s, |s| q(&s.corrected, 1.0) as f64 / 1000.0)),
        ("P99 uncorrected", "#ff9896", collect(seconds, first, bucket_s, |s| q(&s.uncorrected, 0.99) as f64 / 1000.0)),
        ("P50 corrected", "#1f77b4", collect(seconds, first, bucket_s, |s| q(&s.corrected, 0.50) as f64 / 1000.0)),
        ("P99 corrected", "#d62728", collect(seconds, first, bucket_s, |s| q(&s.corrected, 0.99) as f64 / 1000.0)),
    ];
    let max_ms = series.iter().flat_map(|(_, _, pts)| pts.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.1;
    let rate_points = collect(seconds, first, bucket_s, |s| s.sent as f64 / bucket_s);
    let max_rate = rate_points.iter().map(|p| p.1).fold(requested_rate, f64::max).max(1.0) * 1.1;

    let mut svg =
        frame("Latency over time (by due time) and request rate", "seconds", "latency (ms)", Some("requests/s"));
    axis_ticks(&mut svg, span, max_ms, Some(max_rate));
    let x = |t: f64| LEFT + t / span * (W - LEFT - RIGHT);
    let y = |v: f64, max: f64| H - BOTTOM - v / max * (H - TOP - BOTTOM);
    if requested_rate > 0.0 {
        let _ = write!(
            svg,
            r##"<line x1="{}" x2="{}" y1="{y}" y2="{y}" stroke="#2ca02c" stroke-dasharray="6 4"/>"##,
            x(0.0),
            x(span),
            y = y(requested_rate, max_rate)
        );
    }
    polyline(&mut svg, &rate_points.iter().map(|&(t, v)| (x(t), y(v, max_rate))).collect::<Vec<_>>(), "#2ca02c", 1.0);
    for (_, color, points) in &series {
        polyline(&mut svg, &points.iter().map(|&(t, v)| (x(t), y(v, max_ms))).collect::<Vec<_>>(), color, 2.0);
    }
    let mut legend: Vec<(&str, &str)> = series.iter().map(|(n, c, _)| (*n, *c)).collect();
    legend.push(("achieved rate (right axis)", "#2ca02c"));
    if requested_rate > 0.0 {
        legend.push(("requested rate (dashed)", "#2ca02c"));
    }
    legend_box(&mut svg, &legend);
    svg.push_str("</svg>");
    svg
}

fn collect(buckets: &BTreeMap<u64, Second>, first: u64, bucket_s: f64, f: impl Fn(&Second) -> f64) -> Vec<(f64, f64)> {
    buckets.iter().map(|(b, v)| (((b - first) as f64 + 0.5) * bucket_s, f(v))).collect()
}

/// Latency by percentile, on a log axis of 1/(1-q) so the tail gets room (as HdrHistogram plots do).
fn distribution_chart(total: &Recorder) -> String {
    let quantiles: Vec<f64> = (0..=50).map(|i| 1.0 - 10f64.powf(-f64::from(i) / 10.0)).collect(); // 0 .. 99.999%
    let max_ms = (total.corrected.max().max(total.uncorrected.max()) as f64 / 1000.0 * 1.1).max(0.01);
    let mut svg = frame("Latency distribution", "percentile", "latency (ms)", None);
    let x = |q: f64| LEFT + (-(1.0 - q).max(1e-5).log10()) / 5.0 * (W - LEFT - RIGHT);
    let y = |v: f64| H - BOTTOM - v / max_ms * (H - TOP - BOTTOM);
    for (label, q) in
        [("0%", 0.0), ("90%", 0.9), ("99%", 0.99), ("99.9%", 0.999), ("99.99%", 0.9999), ("99.999%", 0.99999)]
    {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12" text-anchor="middle">{label}</text><line x1="{x}" x2="{x}" y1="{}" y2="{}" stroke="#eee"/>"##,
            x(q),
            H - BOTTOM + 18.0,
            TOP,
            H - BOTTOM,
            x = x(q)
        );
    }
    y_ticks(&mut svg, max_ms, LEFT, "end");
    for (hist, color) in [(&total.corrected, "#d62728"), (&total.uncorrected, "#ff9896")] {
        if hist.is_empty() {
            continue;
        }
        let points: Vec<(f64, f64)> =
            quantiles.iter().map(|&q| (x(q), y(hist.value_at_quantile(q) as f64 / 1000.0))).collect();
        polyline(&mut svg, &points, color, 2.0);
    }
    legend_box(&mut svg, &[("corrected (from due time)", "#d62728"), ("uncorrected (from send)", "#ff9896")]);
    svg.push_str("</svg>");
    svg
}

fn frame(title: &str, x_label: &str, y_label: &str, y2_label: Option<&str>) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif">
<rect width="{W}" height="{H}" fill="white"/><text x="{cx}" y="22" font-size="16" text-anchor="middle">{title}</text>
<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>
<text x="{cx}" y="{xl}" font-size="13" text-anchor="middle">{x_label}</text>
<text x="16" y="{cy}" font-size="13" text-anchor="middle" transform="rotate(-90 16 {cy})">{y_label}</text>"##,
        cx = W / 2.0,
        cy = H / 2.0,
        pw = W - LEFT - RIGHT,
        ph = H - TOP - BOTTOM,
        xl = H - 10.0,
        title = escape(title),
    );
    if let Some(label) = y2_label {
        let x2 = W - 14.0;
        let _ = write!(
            svg,
            r#"<text x="{x2}" y="{cy}" font-size="13" text-anchor="middle" transform="rotate(90 {x2} {cy})">{label}</text>"#,
            cy = H / 2.0
        );
    }
    svg
}

fn axis_ticks(svg: &mut String, span: f64, max_left: f64, max_right: Option<f64>) {
    for i in 0..=10 {
        let t = span * f64::from(i) / 10.0;
        let x = LEFT + f64::from(i) / 10.0 * (W - LEFT - RIGHT);
        let label = if span >= 20.0 { format!("{t:.0}") } else { format!("{t:.1}") };
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{}" font-size="12" text-anchor="middle">{label}</text>"#,
            H - BOTTOM + 18.0
        );
    }
    y_ticks(svg, max_left, LEFT, "end");
    if let Some(max) = max_right {
        y_ticks(svg, max, W - RIGHT, "start");
    }
}

fn y_ticks(svg: &mut String, max: f64, at_x: f64, anchor: &str) {
    for i in 0..=5 {
        let v = max * f64::from(i) / 5.0;
        let y = H - BOTTOM - f64::from(i) / 5.0 * (H - TOP - BOTTOM);
        let dx = if anchor == "end" { -6.0 } else { 6.0 };
        let label = if max >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") };
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12" text-anchor="{anchor}">{label}</text><line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#f0f0f0"/>"##,
            at_x + dx,
            y + 4.0,
            W - RIGHT
        );
    }
}

fn polyline(svg: &mut String, points: &[(f64, f64)], color: &str, width: f64) {
    let pts: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    let _ =
        write!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"#, pts.join(" "));
}

fn legend_box(svg: &mut String, entries: &[(&str, &str)]) {
    for (i, (name, color)) in entries.iter().enumerate() {
        let y = TOP + 16.0 + i as f64 * 16.0;
        let _ = write!(
            svg,
            r#"<line x1="{}" x2="{}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            LEFT + 10.0,
            LEFT + 34.0,
            LEFT + 40.0,
            y + 4.0,
            escape(name)
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The corrected P99 of each due second, in µs: what the plot draws (tests read it to find a stall).
pub fn p99_by_second(paths: &[PathBuf]) -> anyhow::Result<Vec<u64>> {
    let mut seconds: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    for path in paths {
        results::read(path, |_, row| {
            let _ = seconds
                .entry(row.due_ns / 1_000_000_000)
                .or_insert_with(small_histogram)
                .record((row.corrected_ns() / 1000).max(1));
        })?;
    }
    Ok(seconds.values().map(|h| h.value_at_quantile(0.99)).collect())
}
