// SPDX-License-Identifier: MPL-2.0
//! A running stream end to end, through a `rivulet serve` process and its embedded trickle
//! server: bad requests leave it producing output, and each way a stream is stopped from
//! outside (control channel gone, input channel gone, input idle) stops it cleanly
//! (docs/runner.md, "Stream start and stop", "Health state machine" rule 5).

use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::{
    DaemonProc, control_publisher, get_json, set_state, wait_frames, wait_health, wait_status,
};

/// A daemon running a `noop` stream (in-process inference, live input, an output counter).
struct Live {
    _d: DaemonProc,
    http: reqwest::Client,
    base: String,
    mid: &'static str,
    input: gst::Pipeline,
    reader: gst::Pipeline,
    out_frames: Arc<AtomicU64>,
    params: Value,
    /// `/api/status` once real frames came out.
    status: Value,
}

impl Live {
    fn url(&self, suffix: &str) -> String {
        format!("{}/trickle/{}{suffix}", self.base, self.mid)
    }

    fn frames(&self) -> u64 {
        self.out_frames.load(Ordering::SeqCst)
    }

    /// The output channel was closed by the daemon (DELETE): it is gone from the server.
    async fn output_channel_gone(&self) -> bool {
        let r = self
            .http
            .get(format!("{}/next", self.url("-out")))
            .send()
            .await
            .unwrap();
        r.status() == 404
    }

    async fn stop(self) {
        set_state(&self.input, gst::State::Null).await;
        set_state(&self.reader, gst::State::Null).await;
    }
}

async fn start_live(tag: &str, mid: &'static str, envs: &[(&str, &str)]) -> Live {
    let (d, http, base) = common::idle_daemon_with_channels(tag, "none", envs, mid).await;
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    let params = json!({"width": 384, "height": 384});
    let start = json!({
        "subscribe_url": url(""), "publish_url": url("-out"),
        "control_url": url("-control"), "events_url": url("-events"),
        "model_id": "noop", "params": params,
        "gateway_request_id": format!("req-{mid}"), "manifest_id": mid, "stream_id": "s-stops"
    });
    // The publisher runs before the start, as a gateway's does: input is there as soon as the
    // daemon subscribes (a short idle time then counts from the first frames, not from a
    // publisher still starting on a loaded machine).
    let input = common::live_input(&url(""));
    set_state(&input, gst::State::Playing).await;
    common::start_stream(&http, &base, &start).await;
    let (reader, out_frames) = common::output_counter(&url("-out"));
    set_state(&reader, gst::State::Playing).await;
    wait_frames(&out_frames, 30).await;
    let status = wait_status(
        &http,
        &base,
        Duration::from_secs(30),
        "no real output",
        |s| s["inference_status"]["last_output_time"].as_i64() > s["start_time"].as_i64(),
    )
    .await;
    Live {
        _d: d,
        http,
        base,
        mid,
        input,
        reader,
        out_frames,
        params,
        status,
    }
}

/// Waits until the stream is stopped: `/health` IDLE (bounded by `within`) and the output
/// channel deleted. Returns how long it took.
async fn wait_stopped(live: &Live, within: Duration, why: &str) -> Duration {
    let t = Instant::now();
    wait_health(&live.http, &live.base, "IDLE", within).await;
    let took = t.elapsed();
    let t = Instant::now();
    while !live.output_channel_gone().await {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{why}: the output channel was not closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = get_json(&live.http, &format!("{}/api/status", live.base)).await;
    assert_eq!(s["state"], "OFFLINE", "{why}: {s}");
    took
}

/// Bad requests of every kind while a stream runs: each gets its error, and the stream goes on
/// producing output with the same start and params.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_leave_the_running_stream_producing_output() {
    let live = start_live("stops-bad", "stops001", &[]).await;
    let (http, base) = (&live.http, live.base.as_str());
    let post = |path: &str| http.post(format!("{base}{path}"));
    let huge = vec![b' '; 9 * 1024 * 1024];
    let mut answered = Vec::new();

    // Bad start bodies (the schema, the model, the params, the size): refused before the
    // running stream is touched.
    for (body, want) in [
        ("not json".to_string(), 422),
        (
            json!({"subscribe_url": 5, "publish_url": "http://127.0.0.1:1/x"}).to_string(),
            422,
        ),
        (
            json!({"subscribe_url": "http://127.0.0.1:1/a", "publish_url": "http://127.0.0.1:1/b", "params": [1]}).to_string(),
            422,
        ),
        (
            json!({"subscribe_url": "http://127.0.0.1:1/a", "publish_url": "http://127.0.0.1:1/b", "model_id": "other"}).to_string(),
            400,
        ),
        (
            json!({"subscribe_url": "http://127.0.0.1:1/a", "publish_url": "http://127.0.0.1:1/b", "params": {"width": 500}}).to_string(),
            400,
        ),
    ] {
        let r = post("/live-video-to-video")
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["detail"].is_object() || v["detail"].is_array(), "{v}");
        answered.push(want);
    }
    let r = post("/live-video-to-video")
        .body(huge.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().await.unwrap()["detail"]["msg"].is_string());
    let r = post("/api/live-video-to-video")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        400,
        "internal start without a JSON content type"
    );

    // Invalid params through the internal API (bad JSON, not an object, out of range, too
    // large): 400, the old params stay.
    for body in [
        b"nope".to_vec(),
        b"[1,2]".to_vec(),
        br#"{"height": 2000}"#.to_vec(),
        huge.clone(),
    ] {
        let r = post("/api/params").body(body).send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(
            r.text()
                .await
                .unwrap()
                .starts_with("Error updating params: ")
        );
    }
    // And through the control channel: skipped or rejected with an error event.
    let mut control = control_publisher(&live.url("-control"));
    for msg in ["not json {", "[1, 2]", r#"{"width": 500}"#] {
        control
            .send_message(msg.as_bytes().to_vec().into())
            .await
            .unwrap();
    }
    // Bad template and job bodies: client errors with a JSON body.
    for (path, body) in [
        ("/v1/pipelines", "{"),
        ("/v1/pipelines", r#"{"id": "x", "pipeline": {"stages": 5}}"#),
        ("/v1/jobs", r#"{"input": 5}"#),
    ] {
        let r = post(path)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_client_error(),
            "{path} {body}: {}",
            r.status()
        );
        let v: Value = r.json().await.unwrap();
        assert!(v["detail"].is_object() || v["detail"].is_array(), "{v}");
    }

    // The control channel's invalid params were seen (an error), the valid ones kept.
    let s = wait_status(
        http,
        base,
        Duration::from_secs(20),
        "no params error",
        |s| {
            s["inference_status"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("width"))
        },
    )
    .await;
    // The same stream goes on: the output keeps coming, same start and params.
    let after = live.frames();
    wait_frames(&live.out_frames, after + 60).await;
    let s2 = wait_status(http, base, Duration::from_secs(20), "real output", |s| {
        s["inference_status"]["last_output_time"].as_i64()
            > s["inference_status"]["last_error_time"].as_i64()
    })
    .await;
    for st in [&s, &s2] {
        assert_eq!(st["start_time"], live.status["start_time"], "{st}");
        assert_eq!(st["inference_status"]["last_params"], live.params, "{st}");
    }
    wait_health(http, base, "OK", Duration::from_secs(10)).await;
    assert!(!live.output_channel_gone().await);
    let _ = control.close().await;
    live.stop().await;
}

/// The control channel deleted by the orchestrator: the control loop ends and the stream is
/// stopped (a critical task), well before any idle rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_gone_stops_the_stream() {
    let live = start_live("stops-control", "stops002", &[]).await;
    let r = live.http.delete(live.url("-control")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let took = wait_stopped(&live, Duration::from_secs(20), "control channel gone").await;
    eprintln!("stopped {took:?} after the control channel was deleted");
    live.stop().await;
}

/// The input channel deleted (the subscriber sees 404): ingress ends, the stream stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_input_channel_gone_stops_the_stream() {
    let live = start_live("stops-input", "stops003", &[]).await;
    let r = live.http.delete(live.url("")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let took = wait_stopped(&live, Duration::from_secs(20), "input channel gone").await;
    eprintln!("stopped {took:?} after the input channel was deleted");
    live.stop().await;
}

/// The input goes silent (the publisher pauses: no EOS, the channel stays): DEGRADED_INPUT,
/// then the idle rule stops the stream once the idle time (here 8 s instead of the runner's
/// 60 s, `RIVULET_INPUT_IDLE_STOP_MS`) has passed, and the state is IDLE, never ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_input_stops_the_stream_after_the_idle_time() {
    const IDLE: Duration = Duration::from_secs(8);
    let live = start_live(
        "stops-idle",
        "stops004",
        &[("RIVULET_INPUT_IDLE_STOP_MS", "8000")],
    )
    .await;
    set_state(&live.input, gst::State::Paused).await;
    let paused = Instant::now();
    // The frames stop: the count settles.
    let mut last = live.frames();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = live.frames();
        if now == last {
            break;
        }
        last = now;
        assert!(
            paused.elapsed() < IDLE,
            "frames still coming after the pause"
        );
    }
    wait_status(
        &live.http,
        &live.base,
        Duration::from_secs(10),
        "no DEGRADED_INPUT",
        |s| s["state"] == "DEGRADED_INPUT",
    )
    .await;
    wait_stopped(&live, Duration::from_secs(30), "input idle").await;
    let since_pause = paused.elapsed();
    eprintln!("stopped {since_pause:?} after the input paused");
    assert!(
        since_pause >= IDLE,
        "stopped after {since_pause:?}, before the idle time {IDLE:?}"
    );
    live.stop().await;
}

/// A start whose input channel does not exist: the subscriber's first GET is a 404, which is
/// fatal for the input, so the stream stops at once (its output and events channels are
/// closed) and an `error` event says why; the daemon is IDLE again, ready for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_404_stops_the_stream() {
    let mid = "stops005";
    let (_d, http, base) = common::idle_daemon_with_channels("stops-404", "none", &[], mid).await;
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    let start = json!({
        "subscribe_url": url("-missing"), "publish_url": url("-out"),
        "control_url": url("-control"), "events_url": url("-events"),
        "model_id": "noop", "params": {"width": 384, "height": 384},
        "gateway_request_id": "req-404", "manifest_id": mid, "stream_id": "s-404"
    });
    let mut events = common::subscribe_events(&url("-events"));
    common::start_stream(&http, &base, &start).await;
    let t = Instant::now();
    wait_health(&http, &base, "IDLE", Duration::from_secs(20)).await;
    eprintln!("IDLE {:?} after the start", t.elapsed());
    let r = http
        .get(format!("{}/next", url("-out")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the output channel was closed");
    // The events channel carried the error, then was closed.
    let mut error = None;
    while let Some(v) = tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .expect("the events channel was not closed")
    {
        if v["event"]["type"] == "error" {
            error = Some(v);
        }
    }
    let error = error.expect("an error event");
    assert!(
        error["event"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("404")),
        "{error}"
    );
}
