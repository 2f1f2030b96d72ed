// SPDX-License-Identifier: MPL-2.0
//! Issue 11, functional (not timed): through the daemon's `noop` runner, every frame is released
//! as soon as it is complete, even when the next one is late. The publisher sends one large
//! frame (noise, well over 64 KiB encoded) and sends nothing more until the reader has decoded
//! that frame from the output channel; one frame is followed by a real 2 s pause. Every frame
//! must come out in order, undamaged, with its input PTS, within a generous bound (1.5 s) while
//! the publisher waits. Speed is measured by `benches/e2e_latency.rs`, not here.

use gst::prelude::*;
use serde_json::json;
use std::time::{Duration, Instant};

mod common;
use common::{create_channel, read_stamp, spawn_daemon, stamped_frame, start_stream, wait_health};

const S: usize = common::STAMP_SIZE;
/// Far above any processing time of one frame, far below the 2 s pause.
const BOUND: Duration = Duration::from_millis(1500);

#[test]
fn every_frame_leaves_the_runner_when_complete_even_when_the_next_is_late() {
    common::init_trickle();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = spawn_daemon("latency", &[("RIVULET_FPS_CAP", "0")]);
    let base = d.base.clone();
    let http = reqwest::Client::new();
    let mid = "lat00001";
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    rt.block_on(async {
        // The pipeline loads before the daemon reports IDLE.
        wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
        create_channel(&http, &base, mid, "video/MP2T").await;
        create_channel(&http, &base, &format!("{mid}-out"), "video/MP2T").await;
        let start = json!({
            "subscribe_url": url(""), "publish_url": url("-out"),
            "model_id": "noop", "params": {"width": S, "height": S},
            "gateway_request_id": "lat-1", "manifest_id": mid, "stream_id": "lat",
        });
        start_stream(&http, &base, &start).await;
    });

    let reader = gst::parse::launch(&format!(
        "tricklesrc url={} start-seq=0 do-timestamp=false ! videoconvert ! video/x-raw,format=I420 \
         ! appsink name=out sync=false",
        url("-out")
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let out = reader
        .by_name("out")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    reader.set_state(gst::State::Playing).unwrap();
    let publisher = gst::parse::launch(&format!(
        "appsrc name=in format=time caps=video/x-raw,format=I420,width={S},height={S},framerate=30/1 \
         ! tricklesink url={} min-segment-duration=300000000 idr-interval=300000000 bitrate=40000",
        url("")
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = publisher
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    publisher.set_state(gst::State::Playing).unwrap();

    let frames = 24u32;
    let mut pts = Vec::new();
    for n in 0..frames {
        let mut buf = gst::Buffer::from_mut_slice(stamped_frame(n, true));
        {
            let b = buf.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_nseconds(
                u64::from(n) * 1_000_000_000 / 30,
            ));
            b.set_duration(gst::ClockTime::from_nseconds(1_000_000_000 / 30));
        }
        src.push_buffer(buf).unwrap();
        // Frame 0 waits for the stream to start (graph, encoders, first segments).
        let bound = if n == 0 {
            Duration::from_secs(60)
        } else {
            BOUND
        };
        let deadline = Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let sample = out
                .try_pull_sample(gst::ClockTime::from_nseconds(left.as_nanos() as u64))
                .unwrap_or_else(|| {
                    panic!("frame {n} did not come out within {bound:?} while the publisher waited")
                });
            match read_stamp(&sample) {
                Some(got) if got == n => {
                    pts.push(sample.buffer().unwrap().pts().unwrap());
                    break;
                }
                // Before the first frame, the runner may show its loading picture.
                None if n == 0 => continue,
                other => panic!("expected frame {n}, got {other:?}: dropped, reordered or damaged"),
            }
        }
        if n == 12 {
            std::thread::sleep(Duration::from_secs(2));
            assert!(
                out.try_pull_sample(gst::ClockTime::ZERO).is_none(),
                "a frame came out that was never published"
            );
        }
    }
    // The input PTS, kept by the runner: 1/30 s steps from the first frame.
    for (n, p) in pts.iter().enumerate() {
        let want = pts[0].nseconds() + n as u64 * 1_000_000_000 / 30;
        assert!(
            (p.nseconds() as i64 - want as i64).abs() <= 1_000_000,
            "frame {n}: PTS {p}, expected {}",
            gst::ClockTime::from_nseconds(want)
        );
    }
    publisher.set_state(gst::State::Null).unwrap();
    reader.set_state(gst::State::Null).unwrap();
    drop(d);
}

/// The daemon runs libgomp (loaded with libtorch) with idle threads that sleep: it re-executes
/// itself with `OMP_WAIT_POLICY=PASSIVE` unless the variable is set (an explicit value is kept).
/// Spinning OpenMP workers were most of the noop runner's CPU (see `src/openmp.rs`).
#[test]
fn the_daemon_runs_with_a_passive_openmp_wait_policy() {
    for (given, want) in [(None, "PASSIVE"), (Some("ACTIVE"), "ACTIVE")] {
        let dir = common::TempDir::new(&format!("omp-{want}"));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rivulet"));
        cmd.args(["serve", "--port", "0"])
            .env_remove("OMP_WAIT_POLICY")
            .env_remove("AUTH_TOKEN")
            .env("MODEL_ID", "noop")
            .env("RIVULET_STATE_FILE", dir.0.join("last.json"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        if let Some(v) = given {
            cmd.env("OMP_WAIT_POLICY", v);
        }
        let mut child = cmd.spawn().unwrap();
        let rx = common::watch_for(child.stdout.take().unwrap(), "rivulet", "listening on ");
        let listening = rx.recv_timeout(Duration::from_secs(60));
        // The same process (exec keeps the pid) now has the policy in its environment.
        let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        assert!(listening.is_ok(), "rivulet did not start");
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        assert!(
            vars.contains(&format!("OMP_WAIT_POLICY={want}").as_bytes()),
            "OMP_WAIT_POLICY={want} not in the daemon's environment"
        );
    }
}

/// Issue 11 bug: `rivulet demo` hosts the input publisher, the daemon and the output reader in
/// one process; with a picture whose segment-start keyframes come without PAT/PMT (scrolling
/// bars), the publisher's re-inserted PAT/PMT repeated their continuity counters, tsdemux in
/// the daemon re-created its streams at a segment start and the input stopped for good (about
/// 105 of 192 capped frames). Every capped frame must now reach the runner.
#[test]
fn demo_in_one_process_keeps_its_input_flowing_across_segments() {
    let dir = common::TempDir::new("demo-bars");
    let out = dir.0.join("demo.ts");
    let seconds = 8u32;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rivulet"))
        .args(["demo", "--pipeline", "noop", "--port", "0", "--seconds"])
        .arg(seconds.to_string())
        .arg("--output")
        .arg(&out)
        .env_remove("MODEL_ID")
        .env_remove("RIVULET_FPS_CAP")
        .env("RIVULET_DEMO_VIDEO", "pattern=bar horizontal-speed=4")
        .env("RIVULET_STATE_FILE", dir.0.join("last.json"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = common::watch_for(child.stdout.take().unwrap(), "demo", "Done: ");
    let done = rx.recv_timeout(Duration::from_secs(120));
    let _ = child.kill();
    let _ = child.wait();
    let done = done.expect("the demo did not finish");
    let frames_in: u32 = done
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the frame count in {done:?}"));
    // 24 fps cap over `seconds` of 30 fps input; a few may be lost while the stream starts.
    let expected = seconds * 24;
    assert!(
        frames_in >= expected * 9 / 10,
        "the runner got {frames_in} of {expected} frames: its input stalled ({done})"
    );
}
