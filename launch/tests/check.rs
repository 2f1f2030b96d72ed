// SPDX-License-Identifier: MPL-2.0
//! `rivulet check-pipeline`: the element contract checks, run as the command a pipeline author
//! runs, against `aipipeline` (noop, a testdata model), the example external plugin
//! (`examples/gst-plugin-example-tint`, built here on its own) and elements that break the
//! contract.

use gst::prelude::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{TempDir, feed, get_json, next_feed_event, run_to_eos, spawn_daemon};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Run {
    ok: bool,
    stdout: String,
}

impl Run {
    /// The result column of `check`'s row.
    fn result(&self, check: &str) -> &str {
        self.stdout
            .lines()
            .find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next() == Some(check)).then(|| cols.next()).flatten()
            })
            .unwrap_or_else(|| panic!("no row for {check} in:\n{}", self.stdout))
    }
}

fn check_pipeline(args: &[&str], envs: &[(&str, &Path)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rivulet"));
    cmd.arg("check-pipeline")
        .args(args)
        .env_remove("RIVULET_PIPELINES")
        .env_remove("MODEL_DIR")
        .env("RIVULET_DEVICE", "cpu")
        .env("RUST_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("cannot run rivulet");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "rivulet check-pipeline {args:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Run {
        ok: out.status.success(),
        stdout,
    }
}

const ALL_PASS: [&str; 11] = [
    "element",
    "pads",
    "params-property",
    "caps-in",
    "start",
    "caps-out",
    "pts",
    "params-applied",
    "full-replacement",
    "bad-params",
    "eos",
];

#[test]
fn noop_follows_the_contract() {
    let r = check_pipeline(&["noop"], &[]);
    assert!(r.ok, "noop must pass");
    assert!(
        r.stdout
            .contains("rivulet check-pipeline: aipipeline pipeline=noop")
    );
    for c in ALL_PASS {
        assert_eq!(r.result(c), "PASS", "{c}");
    }
    // noop applies a new size at once, without a reload (docs/runner.md, "Media").
    assert_eq!(r.result("loading-events"), "SKIP");
    assert_eq!(r.result("status-stats"), "PASS");
}

#[test]
fn testdata_model_follows_the_contract_with_loading_events() {
    let dir = workspace().join("gst-plugin-aipipeline/testdata/pipelines");
    let r = check_pipeline(&["gain"], &[("RIVULET_PIPELINES", &dir)]);
    assert!(r.ok, "gain must pass");
    for c in ALL_PASS {
        assert_eq!(r.result(c), "PASS", "{c}");
    }
    // A model reloads for a new size: loading, then online.
    assert_eq!(r.result("loading-events"), "PASS");

    // `torchscript` needs its model file: without it the start fails, named.
    let r = check_pipeline(&["torchscript"], &[]);
    assert!(!r.ok);
    assert_eq!(r.result("start"), "FAIL");
    assert_eq!(r.result("eos"), "SKIP");
    let model = dir.join("invert.pt");
    let r = check_pipeline(&["torchscript", "--model", model.to_str().unwrap()], &[]);
    assert!(r.ok, "torchscript with a model must pass");
    assert_eq!(r.result("loading-events"), "PASS");
}

#[test]
fn elements_without_the_contract_fail_named_checks() {
    let r = check_pipeline(&["videoflip"], &[]);
    assert!(!r.ok, "videoflip must fail");
    assert_eq!(r.result("element"), "PASS");
    assert_eq!(r.result("params-property"), "FAIL");
    // 640x480 in, 640x480 out: not the params' default 512x512.
    assert_eq!(r.result("caps-out"), "FAIL");
    assert_eq!(r.result("params-applied"), "SKIP");
    assert!(r.stdout.contains("does NOT follow the element contract"));

    // `identity` is also a testdata pipeline name: --element picks the element.
    let dir = workspace().join("gst-plugin-aipipeline/testdata/pipelines");
    let r = check_pipeline(&["identity", "--element"], &[("RIVULET_PIPELINES", &dir)]);
    assert!(!r.ok);
    assert!(r.stdout.contains("element identity"));
    assert_eq!(r.result("params-property"), "FAIL");
}

#[test]
fn unknown_name_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["check-pipeline", "no-such-thing"])
        .env_remove("RIVULET_PIPELINES")
        .env_remove("MODEL_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'no-such-thing' is neither an aipipeline pipeline"),
        "{err}"
    );
}

/// Builds `examples/gst-plugin-example-tint` on its own (not a workspace member) into
/// `target/examples`, and returns a fresh directory holding only its plugin, for
/// `GST_PLUGIN_PATH`.
pub fn build_example_plugin(dir: &Path) -> PathBuf {
    let built = common::build_example_tint();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(built, plugins.join("libgstrivulettint.so")).unwrap();
    plugins
}

#[test]
fn external_example_plugin_follows_the_contract() {
    let dir = TempDir::new("check-example");
    let plugins = build_example_plugin(&dir.0);
    let registry = dir.0.join("registry.bin");
    let r = check_pipeline(
        &["rivulettint"],
        &[("GST_PLUGIN_PATH", &plugins), ("GST_REGISTRY", &registry)],
    );
    assert!(r.ok, "rivulettint must pass");
    assert!(r.stdout.contains("element rivulettint"));
    for c in ALL_PASS {
        assert_eq!(r.result(c), "PASS", "{c}");
    }
    assert_eq!(r.result("loading-events"), "PASS");
    // The optional properties are not there: skipped, not failed.
    assert_eq!(r.result("status-stats"), "SKIP");
}

/// Frames of `path` decoded to RGB: (count, width, height, mean R, G, B of the last frame).
fn decode_rgb(path: &Path) -> (u64, i32, i32, [f64; 3]) {
    let p = gst::parse::launch(&format!(
        "filesrc location={} ! decodebin ! videoconvert ! video/x-raw,format=RGB ! fakesink name=out",
        path.display()
    ))
    .unwrap();
    let seen = Arc::new(Mutex::new((0u64, 0, 0, [0.0; 3])));
    let s = seen.clone();
    let sink = p
        .downcast_ref::<gst::Bin>()
        .unwrap()
        .by_name("out")
        .unwrap();
    sink.static_pad("sink")
        .unwrap()
        .add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            let Some(gst::PadProbeData::Buffer(b)) = &info.data else {
                return gst::PadProbeReturn::Ok;
            };
            let info = gst_video::VideoInfo::from_caps(&pad.current_caps().unwrap()).unwrap();
            let (w, h) = (info.width() as usize, info.height() as usize);
            let stride = info.stride()[0] as usize;
            let map = b.map_readable().unwrap();
            let mut sum = [0f64; 3];
            for y in 0..h {
                for px in map[y * stride..y * stride + w * 3].chunks_exact(3) {
                    for c in 0..3 {
                        sum[c] += px[c] as f64;
                    }
                }
            }
            let mut g = s.lock().unwrap();
            g.0 += 1;
            g.1 = w as i32;
            g.2 = h as i32;
            g.3 = sum.map(|v| v / (w * h) as f64);
            gst::PadProbeReturn::Ok
        });
    run_to_eos(&p);
    *seen.lock().unwrap()
}

/// Reads the `/v1/events` feed until a `progress` event says `job` ended.
async fn wait_job_end(
    events: &mut futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    job: &str,
) {
    let mut buf = String::new();
    loop {
        let (_, data) = next_feed_event(
            events,
            &mut buf,
            Duration::from_secs(120),
            "job did not end within 120 s",
        )
        .await;
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            continue;
        };
        if v["type"] == "progress"
            && v["job"]["id"] == job
            && (v["job"]["state"] == "done" || v["job"]["state"] == "failed")
        {
            return;
        }
    }
}

/// The daemon finds the external element through GST_PLUGIN_PATH and runs it by name in a
/// graph stage (a template, then a file job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_runs_the_external_element_by_name_in_a_stage() {
    gst::init().unwrap();
    let dir = TempDir::new("check-example-daemon");
    let d0 = dir.0.clone();
    let plugins = tokio::task::spawn_blocking(move || build_example_plugin(&d0))
        .await
        .unwrap();
    const FRAMES: u64 = 24;
    let input = dir.0.join("in.mp4");
    let output = dir.0.join("out.ts");
    let launch = gst::parse::launch(&format!(
        "videotestsrc num-buffers={FRAMES} pattern=smpte ! \
         video/x-raw,width=640,height=480,framerate=30/1 ! x264enc ! mp4mux ! filesink location={}",
        input.display()
    ))
    .unwrap();
    tokio::task::spawn_blocking(move || run_to_eos(&launch))
        .await
        .unwrap();

    let plugin_path = plugins.to_string_lossy().to_string();
    let registry = dir.0.join("registry.bin").to_string_lossy().to_string();
    let data_dir = dir.0.join("data").to_string_lossy().to_string();
    let d = spawn_daemon(
        "check-example-serve",
        &[
            ("GST_PLUGIN_PATH", plugin_path.as_str()),
            ("GST_REGISTRY", registry.as_str()),
            ("RIVULET_DATA_DIR", data_dir.as_str()),
            ("RIVULET_DEVICE", "cpu"),
        ],
    );
    let http = reqwest::Client::new();
    let mut events = feed(&http, &d.base).await;
    // Red only: green and blue gains 0.
    let r = http
        .post(format!("{}/v1/pipelines", d.base))
        .json(&json!({"id": "tinted", "pipeline": [
            "noop",
            {"id": "tint", "element": "rivulettint",
             "params": {"params": {"color": [1.0, 0.0, 0.0], "strength": 1.0}}}
        ]}))
        .send()
        .await
        .unwrap();
    let code = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(code, 201, "{body}");
    let r = http
        .post(format!("{}/v1/jobs", d.base))
        .json(&json!({"input": input, "output": output, "pipeline": "tinted"}))
        .send()
        .await
        .unwrap();
    let code = r.status();
    let job: Value = r.json().await.unwrap();
    assert_eq!(code, 201, "{job}");
    let id = job["id"].as_str().unwrap();
    wait_job_end(&mut events, id).await;
    let status = get_json(&http, &format!("{}/v1/jobs/{id}", d.base)).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["frames_out"], FRAMES);
    assert_eq!(status["stages"][1]["provider"], "element rivulettint");
    let (frames, w, h, mean) = tokio::task::spawn_blocking(move || decode_rgb(&output))
        .await
        .unwrap();
    assert_eq!(frames, FRAMES);
    // rivulettint's default size, and its tint: red kept, green and blue gone.
    assert_eq!((w, h), (512, 512));
    assert!(
        mean[0] > 60.0 && mean[1] < 12.0 && mean[2] < 12.0,
        "mean RGB {mean:?}"
    );
}
