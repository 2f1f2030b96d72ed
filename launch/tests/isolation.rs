// SPDX-License-Identifier: MPL-2.0
//! The daemon with inference in a child process (`RIVULET_ISOLATION=process`, the default): the
//! child is killed with SIGKILL during a real stream; the daemon counts one runner restart
//! (`restart` event, `restart_count` 1 in /api/status) and the output goes on, real frames
//! again after the reload.

use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::{
    get_json, health_stays, inference_children, now_ms, set_state, signal, subscribe_events,
    wait_frames, wait_health, wait_no_inference_child, wait_status,
};

/// A daemon (isolation=process) running a `noop` stream with live input, an output frame
/// counter and the `restart` events of the events channel.
struct Running {
    d: common::DaemonProc,
    http: reqwest::Client,
    base: String,
    input: gst::Pipeline,
    reader: gst::Pipeline,
    out_frames: Arc<AtomicU64>,
    restarts: tokio::sync::mpsc::Receiver<Value>,
}

async fn start_running(tag: &str, mid: &str) -> Running {
    start_running_with(tag, mid, &[], None).await
}

/// As `start_running`, with more daemon settings and the start request's `pipeline` (a graph).
async fn start_running_with(
    tag: &str,
    mid: &str,
    envs: &[(&str, &str)],
    pipeline: Option<Value>,
) -> Running {
    let (d, http, base) = common::idle_daemon_with_channels(tag, "process", envs, mid).await;
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    let mut events = subscribe_events(&url("-events"));
    let (restart_tx, restarts) = tokio::sync::mpsc::channel::<Value>(8);
    tokio::spawn(async move {
        while let Some(v) = events.recv().await {
            if v["event"]["type"] == "restart" {
                assert_eq!(v["queue_event_type"], "ai_stream_events");
                let _ = restart_tx.send(v["event"].clone()).await;
            }
        }
    });
    let mut start = json!({
        "subscribe_url": url(""), "publish_url": url("-out"),
        "control_url": url("-control"), "events_url": url("-events"),
        "model_id": "noop", "params": {"width": 384, "height": 384},
        "gateway_request_id": format!("req-{mid}"), "manifest_id": mid, "stream_id": "s-iso"
    });
    if let Some(p) = pipeline {
        start["pipeline"] = p;
    }
    common::start_stream(&http, &base, &start).await;
    let (reader, out_frames) = common::output_counter(&url("-out"));
    set_state(&reader, gst::State::Playing).await;
    let input = common::live_input(&url(""));
    set_state(&input, gst::State::Playing).await;
    Running {
        d,
        http,
        base,
        input,
        reader,
        out_frames,
        restarts,
    }
}

/// `rivulet_loading_frames_out_total` from /metrics: frames sent on as loading frames (the
/// loading picture after loadingoverlay).
async fn loading_frames(http: &reqwest::Client, base: &str) -> u64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("rivulet_loading_frames_out_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rivulet_loading_frames_out_total in /metrics")
}

/// Waits for real output since `since` (ms) and returns the daemon's one inference child.
async fn the_one_child(
    http: &reqwest::Client,
    base: &str,
    daemon_pid: u32,
    since: i64,
) -> (Value, u32) {
    let s = wait_status(http, base, Duration::from_secs(60), "no real output", |s| {
        s["inference_status"]["last_output_time"]
            .as_i64()
            .is_some_and(|t| t > since)
    })
    .await;
    let children = inference_children(daemon_pid);
    assert_eq!(children.len(), 1, "one inference child: {children:?}");
    (s, children[0])
}

/// The next `restart` event; `within` bounds the wait, `none` says what its absence means.
async fn next_restart(
    restarts: &mut tokio::sync::mpsc::Receiver<Value>,
    within: Duration,
    none: &str,
) -> Value {
    tokio::time::timeout(within, restarts.recv())
        .await
        .unwrap_or_else(|_| panic!("{none}"))
        .expect("events channel ended")
}

/// Waits for real output after a restart at `since` (ms), the restart counted once.
async fn real_output_after_restart(
    http: &reqwest::Client,
    base: &str,
    since: i64,
    what: &str,
) -> Value {
    wait_status(http, base, Duration::from_secs(60), what, |s| {
        s["inference_status"]["restart_count"] == 1
            && s["inference_status"]["last_output_time"]
                .as_i64()
                .is_some_and(|t| t > since)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_inference_child_restarts_it_and_the_stream_goes_on() {
    let Running {
        d,
        http,
        base,
        input,
        reader,
        out_frames,
        restarts: mut restart_rx,
    } = start_running("isolation", "iso00001").await;
    let daemon_pid = d.child.id();

    // Real output flows from the child.
    let (s, victim) = the_one_child(&http, &base, daemon_pid, i64::MIN).await;
    assert_eq!(s["inference_status"]["restart_count"], 0);
    let loading_before = loading_frames(&http, &base).await;
    signal(victim, libc::SIGKILL);
    let killed_ms = now_ms();
    let frames_at_kill = out_frames.load(Ordering::SeqCst);

    let ev = next_restart(&mut restart_rx, Duration::from_secs(30), "no restart event").await;
    assert_eq!(ev["restart_count"], 1);
    let logs = ev["restart_logs"].as_array().expect("restart_logs").clone();
    assert!(
        logs.first()
            .and_then(Value::as_str)
            .is_some_and(|l| l.contains("died") && l.contains("signal 9")),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("loaded"))),
        "the child's own log lines: {logs:?}"
    );
    // Real frames again after the restart, counted once in /api/status.
    let s = real_output_after_restart(&http, &base, killed_ms, "no real output after the restart")
        .await;
    assert!(s["inference_status"]["last_restart_time"].as_i64().unwrap() >= killed_ms - 1000);
    wait_frames(&out_frames, frames_at_kill + 30).await;
    let now = inference_children(daemon_pid);
    assert!(
        now.len() == 1 && now[0] != victim,
        "a new child replaced {victim}: {now:?}"
    );
    // Health is evaluated once a second (the runner's timer): OK at the next evaluation.
    wait_health(&http, &base, "OK", Duration::from_secs(10)).await;
    // While the child restarted, loading frames went out (the output never stopped).
    assert!(loading_frames(&http, &base).await > loading_before);

    set_state(&input, gst::State::Null).await;
    set_state(&reader, gst::State::Null).await;
}

/// Three restarts in the daemon's life, then the fourth loss is a permanent ERROR and the
/// stream stops (docs/runner.md, "Restarts and restart policy").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_child_loss_is_a_permanent_error() {
    let Running {
        d,
        http,
        base,
        input,
        reader,
        restarts: mut restart_rx,
        ..
    } = start_running("isolation-limit", "iso00002").await;
    let daemon_pid = d.child.id();
    let mut since = 0i64;
    for n in 1..=4u32 {
        // Real output from the current child, then kill it.
        let (_, child) = the_one_child(&http, &base, daemon_pid, since).await;
        since = now_ms();
        signal(child, libc::SIGKILL);
        if n <= 3 {
            let ev =
                next_restart(&mut restart_rx, Duration::from_secs(30), "no restart event").await;
            assert_eq!(ev["restart_count"], n);
        }
    }
    wait_health(&http, &base, "ERROR", Duration::from_secs(30)).await;
    let s = get_json(&http, &format!("{base}/api/status")).await;
    assert_eq!(s["state"], "ERROR");
    assert_eq!(s["inference_status"]["restart_count"], 3);
    assert!(
        s["inference_status"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("inference child crashed")),
        "{s}"
    );
    // No child is left running, and ERROR stays.
    wait_no_inference_child(daemon_pid).await;
    health_stays(&http, &base, "ERROR", Duration::from_millis(2500)).await;
    set_state(&input, gst::State::Null).await;
    set_state(&reader, gst::State::Null).await;
}

/// `RIVULET_RESTART_POLICY=stop-stream` (the runner's behaviour): a lost child still counts as
/// one restart with its `restart` event, but the stream is stopped first (its events channel
/// closes, no child is left), then the pipeline is reloaded and the daemon is IDLE again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_stream_policy_stops_the_stream_on_a_child_loss() {
    let Running {
        d,
        http,
        base,
        input,
        reader,
        restarts: mut restart_rx,
        ..
    } = start_running_with(
        "isolation-stop",
        "iso00003",
        &[("RIVULET_RESTART_POLICY", "stop-stream")],
        None,
    )
    .await;
    let daemon_pid = d.child.id();
    let (_, child) = the_one_child(&http, &base, daemon_pid, i64::MIN).await;
    signal(child, libc::SIGKILL);
    let ev = next_restart(&mut restart_rx, Duration::from_secs(30), "no restart event").await;
    assert_eq!(ev["restart_count"], 1);
    // The stream stops: its events channel is closed (the reader task ends, dropping the
    // sender), so nothing more arrives.
    let end = tokio::time::timeout(Duration::from_secs(30), restart_rx.recv())
        .await
        .expect("the events channel stayed open: the stream was not stopped");
    assert!(end.is_none(), "a second restart event: {end:?}");
    // The inference side is reloaded, no stream runs: IDLE, the restart still counted once.
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
    let s = get_json(&http, &format!("{base}/api/status")).await;
    assert_eq!(s["state"], "OFFLINE", "{s}");
    assert_eq!(s["inference_status"]["restart_count"], 1, "{s}");
    wait_no_inference_child(daemon_pid).await;
    set_state(&input, gst::State::Null).await;
    set_state(&reader, gst::State::Null).await;
}

/// The daemon's own health rule replaces a child that stops answering: the child is stopped
/// with SIGSTOP (alive, silent), the input goes on and the output stalls, so the health
/// evaluation computes ERROR and the daemon emits `restart-child` on `aipipeline`. The element's
/// own hang timeout would catch the same child after `hang-timeout-ms`, so it is set to 600 s
/// here (`RIVULET_HANG_TIMEOUT_MS`): the restart within the bound below can only be the
/// daemon's, and its reason says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_child_is_replaced_by_the_daemons_health_rule() {
    let Running {
        d,
        http,
        base,
        input,
        reader,
        out_frames,
        restarts: mut restart_rx,
    } = start_running_with(
        "isolation-hang",
        "iso00004",
        &[("RIVULET_HANG_TIMEOUT_MS", "600000")],
        None,
    )
    .await;
    let daemon_pid = d.child.id();
    let (_, victim) = the_one_child(&http, &base, daemon_pid, i64::MIN).await;
    signal(victim, libc::SIGSTOP);
    let stopped_ms = now_ms();
    let ev = next_restart(
        &mut restart_rx,
        Duration::from_secs(60),
        "no restart event: the stalled output was not acted on",
    )
    .await;
    assert_eq!(ev["restart_count"], 1);
    let first = ev["restart_logs"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        first.contains("restart-child"),
        "the restart came from the daemon's rule: {first}"
    );
    // Real output again from a new child, the stopped one gone (killed and reaped).
    real_output_after_restart(&http, &base, stopped_ms, "no real output after the restart").await;
    let frames = out_frames.load(Ordering::SeqCst);
    wait_frames(&out_frames, frames + 30).await;
    let now = inference_children(daemon_pid);
    assert!(
        now.len() == 1 && now[0] != victim,
        "a new child replaced {victim}: {now:?}"
    );
    set_state(&input, gst::State::Null).await;
    set_state(&reader, gst::State::Null).await;
}

/// A graph's pipeline stages run their inference in child processes too: killing one stage's
/// child restarts it (the output goes on), and the daemon counts it as one of its runner
/// restarts, the `restart` event naming the stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_stage_child_is_restarted_and_counted() {
    let Running {
        d,
        http,
        base,
        input,
        reader,
        out_frames,
        restarts: mut restart_rx,
    } = start_running_with(
        "isolation-graph",
        "iso00005",
        &[],
        Some(json!([
            {"id": "first", "pipeline": "noop"},
            {"id": "second", "pipeline": "noop"},
        ])),
    )
    .await;
    let daemon_pid = d.child.id();
    wait_status(
        &http,
        &base,
        Duration::from_secs(90),
        "no real output from the graph",
        |s| {
            s["inference_status"]["last_output_time"].is_i64()
                && s["stages"].as_array().is_some_and(|a| a.len() == 2)
        },
    )
    .await;
    let children = inference_children(daemon_pid);
    assert_eq!(
        children.len(),
        2,
        "one inference child per stage: {children:?}"
    );
    let victim = children[0];
    signal(victim, libc::SIGKILL);
    let killed_ms = now_ms();
    let frames_at_kill = out_frames.load(Ordering::SeqCst);
    let ev = next_restart(&mut restart_rx, Duration::from_secs(30), "no restart event").await;
    assert_eq!(ev["restart_count"], 1);
    let stage = ev["stage"]
        .as_str()
        .expect("the restart event names the stage");
    assert!(["first", "second"].contains(&stage), "{ev}");
    let first = ev["restart_logs"][0].as_str().unwrap_or_default();
    assert!(
        first.contains(&format!("stage '{stage}'")) && first.contains("signal 9"),
        "{first}"
    );
    real_output_after_restart(
        &http,
        &base,
        killed_ms,
        "no real output after the stage's restart",
    )
    .await;
    wait_frames(&out_frames, frames_at_kill + 30).await;
    let now = inference_children(daemon_pid);
    assert!(
        now.len() == 2 && !now.contains(&victim),
        "a new child replaced {victim}: {now:?}"
    );
    set_state(&input, gst::State::Null).await;
    set_state(&reader, gst::State::Null).await;
}

/// The daemon's 3 restarts are one budget for all of a graph's stage children: two losses in
/// each of two stages (each element alone would allow 3) make the fourth a permanent ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_stages_share_the_restart_budget() {
    let Running {
        d,
        http,
        base,
        input,
        reader,
        restarts: mut restart_rx,
        ..
    } = start_running_with(
        "isolation-graph-limit",
        "iso00006",
        &[],
        Some(json!([
            {"id": "first", "pipeline": "noop"},
            {"id": "second", "pipeline": "noop"},
        ])),
    )
    .await;
    let daemon_pid = d.child.id();
    // Real output from both stages' current children since `since`, and both children up.
    let settled = |since: i64| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            wait_status(
                &http,
                &base,
                Duration::from_secs(60),
                "no real output",
                |s| {
                    s["inference_status"]["last_output_time"]
                        .as_i64()
                        .is_some_and(|t| t > since)
                },
            )
            .await;
            let t = Instant::now();
            loop {
                let c = inference_children(daemon_pid);
                if c.len() == 2 {
                    return c;
                }
                assert!(t.elapsed() < Duration::from_secs(30), "children {c:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let kill = |pid: u32| signal(pid, libc::SIGKILL);
    // The first loss tells which stage the killed child served.
    let children = settled(0).await;
    let mut since = now_ms();
    kill(children[0]);
    let ev = next_restart(&mut restart_rx, Duration::from_secs(30), "no restart event").await;
    assert_eq!(ev["restart_count"], 1);
    let mut stage_of: std::collections::HashMap<String, u32> = Default::default();
    let s0 = ev["stage"].as_str().expect("stage").to_string();
    let s1 = if s0 == "first" { "second" } else { "first" }.to_string();
    stage_of.insert(s1.clone(), children[1]);
    let now = settled(since).await;
    let new0 = *now.iter().find(|p| **p != children[1]).expect("new child");
    stage_of.insert(s0.clone(), new0);
    // Then the other stage, the first again, and the other again (its second loss).
    for (n, stage) in [(2u32, &s1), (3, &s0), (4, &s1)] {
        let victim = stage_of[stage.as_str()];
        let before = inference_children(daemon_pid);
        since = now_ms();
        kill(victim);
        if n == 4 {
            break;
        }
        let ev = next_restart(&mut restart_rx, Duration::from_secs(30), "no restart event").await;
        assert_eq!(ev["restart_count"], n);
        assert_eq!(ev["stage"], stage.as_str());
        let now = settled(since).await;
        let new = *now
            .iter()
            .find(|p| !before.contains(p))
            .expect("a new child");
        stage_of.insert(stage.clone(), new);
    }
    wait_health(&http, &base, "ERROR", Duration::from_secs(30)).await;
    let s = get_json(&http, &format!("{base}/api/status")).await;
    assert_eq!(s["state"], "ERROR");
    assert_eq!(s["inference_status"]["restart_count"], 3);
    assert!(
        s["inference_status"]["last_error"]
            .as_str()
            .is_some_and(
                |e| e.contains(&format!("stage '{s1}'")) && e.contains("3 inference restarts")
            ),
        "{s}"
    );
    // The stream is stopped: no child is left.
    wait_no_inference_child(daemon_pid).await;
    set_state(&input, gst::State::Null).await;
    set_state(&reader, gst::State::Null).await;
}
