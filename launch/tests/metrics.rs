// SPDX-License-Identifier: MPL-2.0
//! `/metrics` (`launch/src/metrics.rs`, `http/metrics.rs`, prometheus-client) against a real
//! `rivulet serve` (one session: its `session` label is empty)
//! running real streams: the per-frame inference latency histogram, `aipipeline`'s mailbox
//! drops apart from the frame-rate cap's, segments, and a graph's per-stage figures.

mod common;

use common::*;
use gst::prelude::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn testdata_pipelines() -> String {
    format!(
        "{}/../gst-plugin-aipipeline/testdata/pipelines",
        env!("CARGO_MANIFEST_DIR")
    )
}

async fn metrics(http: &reqwest::Client, base: &str) -> String {
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers()
    );
    r.text().await.unwrap()
}

/// The value of the sample `series` (name plus labels exactly as written, e.g.
/// `rivulet_mailbox_drops_total{stage=""}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls /metrics until `f` holds on it (60 s failure bound); returns the text.
async fn wait_metrics(
    http: &reqwest::Client,
    base: &str,
    what: &str,
    f: impl Fn(&str) -> bool,
) -> String {
    let t = Instant::now();
    loop {
        let m = metrics(http, base).await;
        if f(&m) {
            return m;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what}:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn start_body(base: &str, mid: &str, pipeline: Option<serde_json::Value>) -> serde_json::Value {
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    let mut v = json!({"subscribe_url": url(""), "publish_url": url("-out"),
                       "gateway_request_id": mid});
    if let Some(p) = pipeline {
        v["pipeline"] = p;
    }
    v
}

/// A model slower than the input (convnet on 512² frames, input decoded as fast as it comes,
/// no cap): the mailbox replaces waiting frames, the cap drops none, and every real frame out
/// has its latency in the histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_per_frame_and_mailbox_drops_apart_from_the_cap() {
    init_trickle();
    let dir = testdata_pipelines();
    let d = spawn_daemon(
        "metrics-mailbox",
        &[
            ("RIVULET_PIPELINES", &dir),
            ("MODEL_ID", "convnet"),
            ("RIVULET_DEVICE", "cpu"),
            ("RIVULET_ISOLATION", "none"),
            ("RIVULET_FPS_CAP", "0"),
        ],
    );
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(120)).await;
    let before = metrics(&http, &base).await;
    assert_eq!(
        sample(&before, "rivulet_inference_latency_ms_count{session=\"\"}"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(
            &before,
            "rivulet_mailbox_drops_total{session=\"\",stage=\"\"}"
        ),
        Some(0.0)
    );
    assert!(before.contains("# TYPE rivulet_inference_latency_ms histogram"));
    assert!(before.contains("version{app=\"ai-runner\",version=\"undefined\"} 1"));

    let mid = "metrics1";
    create_stream_channels(&http, &base, mid).await;
    start_stream(&http, &base, &start_body(&base, mid, None)).await;
    // Not live: frames are encoded, published and decoded as fast as they go.
    let input = gst::parse::launch(&format!(
        "videotestsrc num-buffers=300 ! video/x-raw,width=160,height=120,framerate=30/1 ! \
         tricklesink url={base}/trickle/{mid} min-segment-duration=500000000"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    set_state(&input, gst::State::Playing).await;
    let m = wait_metrics(&http, &base, "frames out and mailbox drops", |m| {
        sample(m, "rivulet_inference_latency_ms_count{session=\"\"}").unwrap_or(0.0) >= 1.0
            && sample(m, "rivulet_mailbox_drops_total{session=\"\",stage=\"\"}").unwrap_or(0.0)
                > 0.0
    })
    .await;
    set_state(&input, gst::State::Null).await;

    assert_eq!(
        sample(&m, "rivulet_frames_dropped_total"),
        Some(0.0),
        "no cap: {m}"
    );
    let count = sample(&m, "rivulet_inference_latency_ms_count{session=\"\"}").unwrap();
    let sum = sample(&m, "rivulet_inference_latency_ms_sum{session=\"\"}").unwrap();
    let out = sample(&m, "rivulet_frames_out_total").unwrap();
    let inf = sample(
        &m,
        "rivulet_inference_latency_ms_bucket{session=\"\",le=\"+Inf\"}",
    )
    .unwrap();
    assert_eq!(inf, count, "{m}");
    // One observation per real frame out whose arrival was seen (a few may still be
    // between the scrape's two reads).
    assert!(
        count > 0.0 && count <= out + 2.0,
        "count {count}, out {out}:\n{m}"
    );
    // convnet on a 512² frame takes well over a millisecond on any CPU.
    assert!(sum / count >= 1.0, "mean {} ms:\n{m}", sum / count);
    assert!(
        sample(&m, "rivulet_segments_in_total").unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, "rivulet_segments_out_total").unwrap() >= 1.0,
        "{m}"
    );
    assert_eq!(sample(&m, "rivulet_streams_started_total"), Some(1.0));
    // Buckets are cumulative.
    let buckets: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with("rivulet_inference_latency_ms_bucket"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(buckets.len() > 10, "{m}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
}

/// A two-stage graph at 30 fps live with the default 24 fps cap: the cap's drops, and each
/// stage's figures under its `stage` label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cap_drops_and_stage_figures_of_a_graph() {
    init_trickle();
    let dir = testdata_pipelines();
    let d = spawn_daemon(
        "metrics-stages",
        &[
            ("RIVULET_PIPELINES", &dir),
            ("RIVULET_DEVICE", "cpu"),
            ("RIVULET_ISOLATION", "none"),
        ],
    );
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(120)).await;
    let mid = "metrics2";
    create_stream_channels(&http, &base, mid).await;
    let graph = json!([
        {"id": "gain", "pipeline": "gain"},
        {"id": "inv", "pipeline": "invert"},
    ]);
    start_stream(&http, &base, &start_body(&base, mid, Some(graph))).await;
    let input = live_input(&format!("{base}/trickle/{mid}"));
    set_state(&input, gst::State::Playing).await;
    let m = wait_metrics(&http, &base, "stage figures and cap drops", |m| {
        sample(
            m,
            "rivulet_stage_frames_out_total{session=\"\",stage=\"inv\"}",
        )
        .unwrap_or(0.0)
            > 0.0
            && sample(m, "rivulet_frames_dropped_total").unwrap_or(0.0) > 0.0
            && sample(m, "rivulet_inference_latency_ms_count{session=\"\"}").unwrap_or(0.0) > 0.0
    })
    .await;
    set_state(&input, gst::State::Null).await;
    for stage in ["gain", "inv"] {
        assert!(
            m.contains(&format!(
                "rivulet_stage_state{{session=\"\",stage=\"{stage}\",state=\"running\",provider="
            )),
            "{stage}:\n{m}"
        );
        for name in [
            "rivulet_stage_fps",
            "rivulet_stage_frames_in_total",
            "rivulet_stage_deadline_misses_total",
            "rivulet_stage_errors_total",
        ] {
            assert!(
                sample(&m, &format!("{name}{{session=\"\",stage=\"{stage}\"}}")).is_some(),
                "{name} of {stage}:\n{m}"
            );
        }
    }
    assert!(
        m.contains("# TYPE rivulet_stage_frames_out_total counter"),
        "{m}"
    );
}
