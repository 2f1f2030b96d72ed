// SPDX-License-Identifier: MPL-2.0
//! The stream additions of the 2026 wire (docs/runner.md, "Data channel", "Stream heartbeat",
//! "Params"): a `data_url` channel with the built-in per-frame items in batches of JSON lines,
//! `stream_heartbeat` events, and `max_framerate` as the input cap, changed live.

use serde_json::{Value, json};
use std::time::{Duration, Instant};

mod common;
use common::{get_json, set_state};

/// Waits (60 s bound) until the status's output fps satisfies `want`.
async fn wait_fps(http: &reqwest::Client, base: &str, what: &str, want: impl Fn(f64) -> bool) {
    let t = Instant::now();
    loop {
        let s = get_json(http, &format!("{base}/api/status")).await;
        let fps = s["inference_status"]["fps"].as_f64().unwrap_or(0.0);
        if want(fps) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: fps {fps}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_channel_heartbeat_and_max_framerate() {
    let mid = "sd";
    let (_d, http, base) = common::idle_daemon_with_channels(
        "stream-data",
        "none",
        &[
            ("RIVULET_STATUS_PERIOD_MS", "1000"),
            ("RIVULET_FPS_WINDOW_MS", "2000"),
        ],
        mid,
    )
    .await;
    common::create_channel(&http, &base, &format!("{mid}-data"), "application/jsonl").await;
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");

    // max_framerate is validated like the other params: 1 to 60.
    for bad in [json!(0), json!(61), json!("fast")] {
        let r = http
            .post(format!("{base}/live-video-to-video"))
            .json(&json!({
                "subscribe_url": url(""), "publish_url": url("-out"),
                "params": {"max_framerate": bad}
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "max_framerate {bad}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["detail"]["msg"]
                .as_str()
                .unwrap_or_default()
                .contains("max_framerate"),
            "{body}"
        );
    }

    let input = common::live_input(&url(""));
    set_state(&input, gst::State::Playing).await;
    let mut data = common::subscribe_events(&url("-data"));
    let mut events = common::subscribe_events(&url("-events"));
    let start = json!({
        "subscribe_url": url(""), "publish_url": url("-out"),
        "control_url": url("-control"), "events_url": url("-events"), "data_url": url("-data"),
        "model_id": "noop", "params": {"width": 384, "height": 384, "max_framerate": 10},
        "gateway_request_id": "req-sd", "manifest_id": mid, "stream_id": "s-sd"
    });
    common::start_stream(&http, &base, &start).await;
    let (reader, out_frames) = common::output_counter(&url("-out"));
    set_state(&reader, gst::State::Playing).await;
    common::wait_frames(&out_frames, 10).await;

    // 10 fps out of a 30 fps input while max_framerate is 10; 30 once it is raised live.
    wait_fps(&http, &base, "capped at 10", |f| (7.0..=12.5).contains(&f)).await;
    let r = http
        .post(format!("{base}/api/params"))
        .json(&json!({"width": 384, "height": 384, "max_framerate": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_fps(&http, &base, "raised to 30", |f| f > 22.0).await;
    // Without max_framerate, the daemon's own cap (24) again.
    let r = http
        .post(format!("{base}/api/params"))
        .json(&json!({"width": 384, "height": 384}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_fps(&http, &base, "the default 24", |f| {
        (19.0..=26.0).contains(&f)
    })
    .await;

    // The data channel: each segment one line, a JSON array of items; the built-in producer
    // gives one `frame` item per real output frame, PTS increasing.
    let t = Instant::now();
    let mut frames: Vec<Value> = Vec::new();
    let mut batches = 0;
    while frames.len() < 20 {
        assert!(t.elapsed() < Duration::from_secs(30), "{frames:?}");
        let batch = tokio::time::timeout(Duration::from_secs(10), data.recv())
            .await
            .expect("a data batch within 10 s")
            .expect("the data channel ended");
        let items = batch.as_array().expect("a batch is a JSON array").clone();
        batches += 1;
        frames.extend(items.into_iter().filter(|i| i["type"] == "frame"));
    }
    assert!(
        batches < frames.len(),
        "items come batched: {batches} batches for {} frames",
        frames.len()
    );
    for w in frames.windows(2) {
        assert!(
            w[1]["pts_ms"].as_u64() > w[0]["pts_ms"].as_u64(),
            "{:?}",
            &frames
        );
    }
    for f in &frames {
        let lat = f["latency_ms"].as_f64().expect("latency_ms");
        assert!((0.0..5000.0).contains(&lat), "{f}");
        assert!(f["timestamp"].as_i64().is_some(), "{f}");
    }

    // stream_heartbeat events: URLs, output size, video and audio frame rates (the first ones,
    // from before any frame, have 0 fps: wait for one with frames of both; the input carries
    // audio, which the daemon decodes and passes through).
    let t = Instant::now();
    let heartbeat = loop {
        assert!(t.elapsed() < Duration::from_secs(30), "no stream_heartbeat");
        let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("events ended");
        let fps = &e["event"]["fps"];
        if e["queue_event_type"] == "stream_heartbeat"
            && fps["ingress_video_fps"].as_f64() > Some(0.0)
            && fps["ingress_audio_fps"].as_f64() > Some(0.0)
            && fps["egress_audio_fps"].as_f64() > Some(0.0)
        {
            break e["event"].clone();
        }
    };
    assert_eq!(heartbeat["type"], "heartbeat", "{heartbeat}");
    assert_eq!(heartbeat["urls"]["data"], url("-data"), "{heartbeat}");
    assert_eq!(heartbeat["urls"]["subscribe"], url(""), "{heartbeat}");
    assert_eq!(
        heartbeat["dimensions"],
        json!({"width": 384, "height": 384}),
        "{heartbeat}"
    );
    assert!(
        heartbeat["fps"]["egress_video_fps"].as_f64() > Some(0.0),
        "{heartbeat}"
    );
    // Audio frames per second: the decoder's frames (tens per second), all passed through.
    for key in ["ingress_audio_fps", "egress_audio_fps"] {
        let f = heartbeat["fps"][key].as_f64().unwrap_or(0.0);
        assert!((5.0..200.0).contains(&f), "{key} {f}: {heartbeat}");
    }

    // A stop closes the data channel as the other output channels.
    let r = http
        .delete(format!("{base}/v1/sessions/s-sd"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    loop {
        let r = http
            .get(format!("{}/next", url("-data")))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the data channel stays"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    set_state(&input, gst::State::Null).await;
    set_state(&reader, gst::State::Null).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_channel_sends_empty_batches_while_nothing_comes() {
    let mid = "sk";
    let (_d, http, base) = common::idle_daemon_with_channels(
        "stream-data-keepalive",
        "none",
        &[("RIVULET_DATA_KEEPALIVE_MS", "1000")],
        mid,
    )
    .await;
    common::create_channel(&http, &base, &format!("{mid}-data"), "application/jsonl").await;
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    let mut data = common::subscribe_events(&url("-data"));
    // No input is published: no frames, so nothing to send but the keepalive.
    let start = json!({
        "subscribe_url": url(""), "publish_url": url("-out"), "data_url": url("-data"),
        "model_id": "noop", "params": {"width": 384, "height": 384},
        "stream_id": "s-sk"
    });
    common::start_stream(&http, &base, &start).await;
    let mut at = Vec::new();
    while at.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(10), data.recv())
            .await
            .expect("a keepalive within 10 s")
            .expect("the data channel ended");
        assert_eq!(batch, json!([]), "only empty batches without frames");
        at.push(Instant::now());
    }
    // One a keepalive period apart (not one per 333 ms batch tick).
    for w in at.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(800) && gap <= Duration::from_secs(5),
            "keepalives {gap:?} apart"
        );
    }
}
