// SPDX-License-Identifier: MPL-2.0
//! File jobs: `rivulet process` and `POST /v1/jobs` put every frame of a file through the
//! graph (frames counted in the input and in the decoded output), progress reaches 100 % (on
//! stderr and on the `/v1/events` feed), and a job whose stage fails names the stage and keeps
//! a playable partial output with what was done.

use futures::StreamExt;
use gst::prelude::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod common;
use common::{DaemonProc, TempDir, get_json, next_feed_event, run_to_eos, spawn_daemon};

const FRAMES: u64 = 48;

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| gst::init().unwrap());
}

/// A `FRAMES`-frame H.264 MP4 (320×240, 30 fps, moving ball).
fn make_input(path: &Path) {
    init();
    common::make_input(path, FRAMES);
}

/// Decoded video frames in a file.
fn count_frames(path: &Path) -> u64 {
    init();
    let p = gst::parse::launch(&format!(
        "filesrc location={} ! decodebin ! video/x-raw ! fakesink name=out",
        path.display()
    ))
    .unwrap();
    let n = std::sync::Arc::new(AtomicU64::new(0));
    let sink = p
        .downcast_ref::<gst::Bin>()
        .unwrap()
        .by_name("out")
        .unwrap();
    let c = n.clone();
    sink.static_pad("sink")
        .unwrap()
        .add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            c.fetch_add(1, Ordering::Relaxed);
            gst::PadProbeReturn::Ok
        });
    run_to_eos(&p);
    n.load(Ordering::Relaxed)
}

#[test]
fn process_command_keeps_every_frame_and_reaches_100_percent() {
    let dir = TempDir::new("jobs-cli-files");
    let input = dir.0.join("in.mp4");
    let output = dir.0.join("out.mp4");
    make_input(&input);
    assert_eq!(count_frames(&input), FRAMES);
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .arg("process")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args(["--pipeline", "noop"])
        .env("RIVULET_DATA_DIR", dir.0.join("data"))
        .env("RIVULET_DEVICE", "cpu")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success());
    assert!(
        stdout.contains(&format!("{FRAMES} frames in, {FRAMES} frames out")),
        "{stdout}"
    );
    assert!(stdout.contains("stage noop: done"), "{stdout}");
    // The progress bar ends full.
    let last = stderr.rsplit('\r').find(|l| l.contains('%')).unwrap_or("");
    assert!(last.contains("100.0%"), "last progress line: {last:?}");
    assert_eq!(count_frames(&output), FRAMES, "every frame in the output");

    // Bad invocations are clear errors.
    let bad = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["process", "/nonexistent.mp4", "-o"])
        .arg(dir.0.join("x.mp4"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot read input /nonexistent.mp4"));
    let bad = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .arg("process")
        .arg(&input)
        .arg("-o")
        .arg(dir.0.join("x.avi"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use .ts, .mkv or .mp4"));
}

/// `--pipeline FILE.yaml` / `FILE.json`: a definition file runs as the graph; a bad file is a
/// clear error naming it.
#[test]
fn process_command_takes_a_definition_file() {
    let dir = TempDir::new("jobs-cli-file-def");
    let input = dir.0.join("in.mp4");
    make_input(&input);
    let yaml = dir.0.join("two.yaml");
    std::fs::write(
        &yaml,
        "stages:\n  - id: first\n    pipeline: noop\n  - id: flip\n    element: videoflip\n    params:\n      method: vertical-flip\n",
    )
    .unwrap();
    let json_file = dir.0.join("one.JSON");
    std::fs::write(&json_file, r#"[{"id": "only", "pipeline": "noop"}]"#).unwrap();
    let process = |def: &Path, output: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
            .arg("process")
            .arg(&input)
            .arg("-o")
            .arg(output)
            .arg("--pipeline")
            .arg(def)
            .env("RIVULET_DATA_DIR", dir.0.join("data"))
            .env("RIVULET_DEVICE", "cpu")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{text}");
        (out.status.success(), text)
    };
    let output = dir.0.join("out.mp4");
    let (ok, text) = process(&yaml, &output);
    assert!(ok, "{text}");
    assert!(text.contains("stage first: done"), "{text}");
    assert!(text.contains("stage flip: done"), "{text}");
    assert!(
        text.contains(&format!("{FRAMES} frames in, {FRAMES} frames out")),
        "{text}"
    );
    assert_eq!(count_frames(&output), FRAMES);
    let output = dir.0.join("out2.ts");
    let (ok, text) = process(&json_file, &output);
    assert!(ok && text.contains("stage only: done"), "{text}");
    assert_eq!(count_frames(&output), FRAMES);

    // A missing file, a file that does not parse, a graph that does not validate.
    let bad_yaml = dir.0.join("bad.yaml");
    std::fs::write(&bad_yaml, "stages: [ {id: a, pipeline: noop\n").unwrap();
    let unknown = dir.0.join("unknown.yml");
    std::fs::write(&unknown, "- id: a\n  pipeline: no-such-pipeline\n").unwrap();
    for (def, want) in [
        (dir.0.join("missing.yaml"), "cannot read"),
        (bad_yaml, "bad.yaml"),
        (unknown, "no-such-pipeline"),
    ] {
        let (ok, text) = process(&def, &dir.0.join("x.ts"));
        assert!(!ok, "{def:?} should fail");
        assert!(
            text.contains(want),
            "{def:?}: {text:?} should contain {want:?}"
        );
    }
}

/// Reads `/v1/events` until a `progress` event of `job` in a final state; returns every
/// progress event of that job (its `job` object) and its other events as
/// `{"event": kind, "data": …}`, in order.
async fn follow_job(events: &mut Feed, job: &str) -> Vec<Value> {
    let mut buf = String::new();
    let mut seen = Vec::new();
    loop {
        let (kind, data) = next_feed_event(
            events,
            &mut buf,
            Duration::from_secs(120),
            "no feed event within 120 s",
        )
        .await;
        let v: Value = serde_json::from_str(&data).unwrap();
        if kind != "progress" {
            // The graph's own events, tagged with the job.
            if v["job"] == job {
                seen.push(json!({"event": kind, "data": v}));
            }
            continue;
        }
        if v["job"]["id"] != job {
            continue;
        }
        let state = v["job"]["state"].as_str().unwrap_or_default().to_owned();
        seen.push(v["job"].clone());
        if state == "done" || state == "failed" || state == "cancelled" {
            return seen;
        }
    }
}

type Feed = futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>;

/// What the API tests start from: a `FRAMES`-frame input file `in.mp4` in `dir`, a daemon on
/// CPU with its data directory in `dir`, and its `/v1/events` feed, subscribed before
/// anything runs.
struct Api {
    dir: TempDir,
    input: PathBuf,
    d: DaemonProc,
    http: reqwest::Client,
    events: Feed,
}

async fn start_api(tag: &str) -> Api {
    let dir = TempDir::new(&format!("{tag}-files"));
    let input = dir.0.join("in.mp4");
    let input2 = input.clone();
    tokio::task::spawn_blocking(move || make_input(&input2))
        .await
        .unwrap();
    let data_dir = dir.0.join("data").to_string_lossy().to_string();
    let d = spawn_daemon(
        tag,
        &[
            ("RIVULET_DATA_DIR", data_dir.as_str()),
            ("RIVULET_DEVICE", "cpu"),
        ],
    );
    let http = reqwest::Client::new();
    let events = common::feed(&http, &d.base).await;
    Api {
        dir,
        input,
        d,
        http,
        events,
    }
}

/// Saves a template (`201`).
async fn save_template(http: &reqwest::Client, base: &str, template: Value) {
    let r = http
        .post(format!("{base}/v1/pipelines"))
        .json(&template)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

/// Submits a job (`201`); returns its id.
async fn submit_job(http: &reqwest::Client, base: &str, job: Value) -> String {
    let r = http
        .post(format!("{base}/v1/jobs"))
        .json(&job)
        .send()
        .await
        .unwrap();
    let code = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(code, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_jobs_report_progress_and_the_failing_stage() {
    let Api {
        dir,
        input,
        d,
        http,
        mut events,
    } = start_api("jobs-api").await;
    let base = &d.base;

    // A two-stage chain saved as a template, run as a job.
    save_template(
        &http,
        base,
        json!({"id": "two", "pipeline": ["noop", {"id": "b", "pipeline": "noop"}]}),
    )
    .await;
    let output = dir.0.join("out.ts");
    let id = submit_job(
        &http,
        base,
        json!({"input": input, "output": output, "pipeline": "two"}),
    )
    .await;
    let seen = follow_job(&mut events, &id).await;
    // Both stages reported their start on the feed.
    let started: Vec<&Value> = seen
        .iter()
        .filter(|e| e["event"] == "stage_start")
        .map(|e| &e["data"]["stage"])
        .collect();
    assert!(
        started.contains(&&json!("noop")) && started.contains(&&json!("b")),
        "stage_start events: {started:?}"
    );
    let progress: Vec<&Value> = seen.iter().filter(|e| e.get("event").is_none()).collect();
    let last = progress.last().unwrap();
    assert_eq!(last["state"], "done", "{last}");
    assert_eq!(last["percent"], 100.0);
    assert!(
        progress
            .windows(2)
            .all(|w| w[0]["percent"].as_f64() <= w[1]["percent"].as_f64()),
        "progress never goes back"
    );
    let status = get_json(&http, &format!("{base}/v1/jobs/{id}")).await;
    assert_eq!(status["state"], "done");
    assert_eq!(status["frames_in"], FRAMES);
    assert_eq!(status["frames_out"], FRAMES);
    assert_eq!(status["stages_done"], 2);
    assert_eq!(status["stages"][1]["id"], "b");
    assert_eq!(status["stages"][1]["state"], "done");
    let out2 = output.clone();
    let n = tokio::task::spawn_blocking(move || count_frames(&out2))
        .await
        .unwrap();
    assert_eq!(n, FRAMES, "every frame in the output");

    // The second stage fails at its 20th frame: the job names it and keeps what was done.
    save_template(
        &http,
        base,
        json!({"id": "failing", "pipeline": [
            "noop", {"id": "breaks", "element": "identity", "params": {"error-after": 20}}]}),
    )
    .await;
    let partial = dir.0.join("partial.ts");
    let id = submit_job(
        &http,
        base,
        json!({"input": input, "output": partial, "pipeline": "failing"}),
    )
    .await;
    let seen = follow_job(&mut events, &id).await;
    let last = seen.last().unwrap();
    assert_eq!(last["state"], "failed", "{last}");
    let status = get_json(&http, &format!("{base}/v1/jobs/{id}")).await;
    assert_eq!(status["failed_stage"], "breaks", "{status}");
    assert_eq!(status["stages"][1]["state"], "failed");
    assert!(
        status["error"].as_str().unwrap().contains("stage-breaks"),
        "{status}"
    );
    assert_eq!(status["output_kept"], true);
    assert!(status["percent"].as_f64().unwrap() < 100.0);
    let done = status["frames_out"].as_u64().unwrap();
    assert!(done > 0 && done < FRAMES, "{status}");
    let p2 = partial.clone();
    let n = tokio::task::spawn_blocking(move || count_frames(&p2))
        .await
        .unwrap();
    assert_eq!(
        n, done,
        "the partial output holds every frame done before the failure"
    );

    // Bad requests: 400 in the daemon's error shape.
    for (req, want) in [
        (
            json!({"input": "/nonexistent.mp4", "output": partial, "pipeline": "noop"}),
            "cannot read input",
        ),
        (
            json!({"input": input, "output": "/nonexistent-dir/x.ts", "pipeline": "noop"}),
            "does not exist",
        ),
        (
            json!({"input": input, "output": partial, "pipeline": "no-such"}),
            "unknown pipeline 'no-such'",
        ),
        (
            json!({"output": partial, "pipeline": "noop"}),
            "missing string field 'input'",
        ),
    ] {
        let r = http
            .post(format!("{base}/v1/jobs"))
            .json(&req)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{req}");
        let body: Value = r.json().await.unwrap();
        let msg = body["detail"]["msg"].as_str().unwrap();
        assert!(msg.contains(want), "{msg:?} should contain {want:?}");
    }
    let r = http
        .get(format!("{base}/v1/jobs/job-999"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// The API takes a definition file where it takes a pipeline name: a job runs it, and a
/// stream start with a file that cannot be read is a 400 naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_takes_a_definition_file() {
    let Api {
        dir,
        input,
        d,
        http,
        mut events,
    } = start_api("jobs-api-file").await;
    let base = &d.base;
    let def = dir.0.join("graph.yml");
    std::fs::write(&def, "- noop\n- id: second\n  pipeline: noop\n").unwrap();
    let output = dir.0.join("out.ts");
    let id = submit_job(
        &http,
        base,
        json!({"input": input, "output": output, "pipeline": def}),
    )
    .await;
    let seen = follow_job(&mut events, &id).await;
    let last = seen.last().unwrap();
    assert_eq!(last["state"], "done", "{last}");
    let ids: Vec<&Value> = last["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["id"])
        .collect();
    assert_eq!(ids, [&json!("noop"), &json!("second")], "{last}");
    assert_eq!(last["frames_out"], FRAMES);

    let missing = dir.0.join("missing.json");
    let r = http
        .post(format!("{base}/live-video-to-video"))
        .json(&json!({
            "subscribe_url": format!("{base}/trickle/x"), "publish_url": format!("{base}/trickle/x-out"),
            "model_id": "noop", "params": {}, "pipeline": missing,
            "gateway_request_id": "r", "manifest_id": "x", "stream_id": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("cannot read") && body.contains("missing.json"),
        "{body}"
    );
}

/// `DELETE /v1/jobs/{id}`: a queued job is cancelled at once and never runs; a running one
/// stops, ends `cancelled` with its partial output kept and playable (every frame it passed);
/// an ended job is a 409, an unknown one a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_jobs_can_be_cancelled() {
    let Api {
        dir,
        input,
        d,
        http,
        mut events,
    } = start_api("jobs-api-cancel").await;
    let base = &d.base;
    // 100 ms a frame: 48 frames take about 5 s, time enough to cancel.
    save_template(
        &http,
        base,
        json!({"id": "slow", "pipeline": [
            "noop", {"id": "wait", "element": "identity", "params": {"sleep-time": 100000}}]}),
    )
    .await;
    let submit = |output: PathBuf| {
        submit_job(
            &http,
            base,
            json!({"input": input, "output": output, "pipeline": "slow"}),
        )
    };
    let running_out = dir.0.join("running.mp4");
    let queued_out = dir.0.join("queued.mp4");
    let running = submit(running_out.clone()).await;
    let queued = submit(queued_out.clone()).await;
    let delete = |id: String| {
        let http = http.clone();
        async move {
            let r = http
                .delete(format!("{base}/v1/jobs/{id}"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    // The second job waits behind the first: cancelled at once, it never runs.
    let (code, s) = delete(queued.clone()).await;
    assert_eq!(code, 200, "{s}");
    assert_eq!(s["state"], "cancelled", "{s}");

    // The first, once frames flow through it: told to stop (202), it ends cancelled.
    let mut buf = String::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("no progress within 60 s")
            .expect("feed ended")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if buf.contains(&format!("\"id\":\"{running}\"")) && buf.contains("\"frames_out\":") {
            let last = buf.rsplit("\"frames_out\":").next().unwrap();
            let n: u64 = last
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap_or(0);
            if n >= 5 {
                break;
            }
        }
    }
    let (code, s) = delete(running.clone()).await;
    assert_eq!(code, 202, "{s}");
    assert_eq!(s["state"], "running");
    let seen = follow_job(&mut events, &running).await;
    let last = seen.last().unwrap();
    assert_eq!(last["state"], "cancelled", "{last}");
    let status = get_json(&http, &format!("{base}/v1/jobs/{running}")).await;
    assert_eq!(status["state"], "cancelled", "{status}");
    assert_eq!(status["error"], "cancelled");
    assert_eq!(status["failed_stage"], Value::Null);
    assert_eq!(status["output_kept"], true);
    let done = status["frames_out"].as_u64().unwrap();
    assert!((5..FRAMES).contains(&done), "{status}");
    assert!(status["percent"].as_f64().unwrap() < 100.0);
    let out = running_out.clone();
    let n = tokio::task::spawn_blocking(move || count_frames(&out))
        .await
        .unwrap();
    assert_eq!(
        n, done,
        "the partial output holds every frame done before the cancel"
    );

    // The queued job never ran: no output, still cancelled.
    let status = get_json(&http, &format!("{base}/v1/jobs/{queued}")).await;
    assert_eq!(status["state"], "cancelled", "{status}");
    assert_eq!(status["frames_in"], 0);
    assert!(!queued_out.exists());

    // Ended or unknown jobs.
    let (code, body) = delete(running.clone()).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["detail"]["msg"]
            .as_str()
            .unwrap()
            .contains("already ended (cancelled)"),
        "{body}"
    );
    let (code, _) = delete("job-999".into()).await;
    assert_eq!(code, 404);
}
