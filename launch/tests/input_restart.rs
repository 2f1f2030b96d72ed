// SPDX-License-Identifier: MPL-2.0
//! Issue 11, robustness: the publisher of a stream's input restarts on the same channel (a
//! new process: new encoder, timestamps from zero again, PAT/PMT counters from zero), so the
//! daemon's demuxer re-creates its streams in the middle of the channel. The runner's output
//! must come back with the new publisher's frames, not stall for good. Also here: the
//! dashboard previews are made only on demand.

use gst::prelude::*;
use serde_json::json;
use std::time::{Duration, Instant};

mod common;
use common::{create_channel, read_stamp, spawn_daemon, stamped_frame, wait_health};

const S: usize = common::STAMP_SIZE;

/// A live publisher (x264 through tricklesink) on `url` that leaves the channel open when it
/// stops, as a crashed or restarted publisher process does.
fn publisher(url: &str) -> (gst::Pipeline, gst_app::AppSrc) {
    let p = gst::parse::launch(&format!(
        "appsrc name=in format=time is-live=true \
         caps=video/x-raw,format=I420,width={S},height={S},framerate=30/1 \
         ! tricklesink url={url} delete-on-close=false min-segment-duration=500000000 \
         idr-interval=500000000"
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = p
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    p.set_state(gst::State::Playing).unwrap();
    (p, src)
}

/// Pushes frames `first..first + count` paced at 30 fps, PTS from zero (a fresh process).
fn publish(src: &gst_app::AppSrc, first: u32, count: u32) {
    let t0 = Instant::now();
    for i in 0..count {
        let mut buf = gst::Buffer::from_mut_slice(stamped_frame(first + i, false));
        {
            let b = buf.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_nseconds(
                u64::from(i) * 1_000_000_000 / 30,
            ));
            b.set_duration(gst::ClockTime::from_nseconds(1_000_000_000 / 30));
        }
        src.push_buffer(buf).unwrap();
        let due = t0 + Duration::from_millis(u64::from(i + 1) * 1000 / 30);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
}

/// Pulls stamped output frames for `within`, returning the indices seen.
fn drain(out: &gst_app::AppSink, within: Duration) -> Vec<u32> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return seen;
        }
        if let Some(s) = out.try_pull_sample(gst::ClockTime::from_nseconds(left.as_nanos() as u64))
            && let Some(n) = read_stamp(&s)
        {
            seen.push(n);
        }
    }
}

/// Waits for the daemon to be IDLE, creates the channels and starts a `noop` stream on `mid`.
fn start_stream(rt: &tokio::runtime::Runtime, http: &reqwest::Client, base: &str, mid: &str) {
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    rt.block_on(async {
        wait_health(http, base, "IDLE", Duration::from_secs(60)).await;
        create_channel(http, base, mid, "video/MP2T").await;
        create_channel(http, base, &format!("{mid}-out"), "video/MP2T").await;
        let start = json!({
            "subscribe_url": url(""), "publish_url": url("-out"),
            "model_id": "noop", "params": {"width": S, "height": S},
            "gateway_request_id": "rst-1", "manifest_id": mid, "stream_id": "rst",
        });
        common::start_stream(http, base, &start).await;
    });
}

fn restarted_publisher_brings_the_output_back(envs: &[(&str, &str)]) {
    common::init_trickle();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = spawn_daemon("input-restart", envs);
    let base = d.base.clone();
    let http = reqwest::Client::new();
    let mid = "rst00001";
    let url = |s: &str| format!("{base}/trickle/{mid}{s}");
    start_stream(&rt, &http, &base, mid);
    let reader = gst::parse::launch(&format!(
        "tricklesrc url={} start-seq=-2 do-timestamp=false ! videoconvert ! video/x-raw,format=I420 \
         ! appsink name=out sync=false max-buffers=1000",
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

    // First publisher: frames 0..90 (3 s), then it goes away without closing the channel.
    let (p1, src1) = publisher(&url(""));
    publish(&src1, 0, 90);
    p1.set_state(gst::State::Null).unwrap();
    let first = drain(&out, Duration::from_secs(2));
    assert!(
        first.len() >= 20,
        "the first publisher's frames did not come through: {first:?}"
    );
    // Second publisher on the same channel, PTS from zero again: frames 128..218 (3 s).
    let (p2, src2) = publisher(&url(""));
    publish(&src2, 128, 90);
    let second = drain(&out, Duration::from_secs(4));
    p2.set_state(gst::State::Null).unwrap();
    reader.set_state(gst::State::Null).unwrap();
    let restarted: Vec<u32> = second.iter().copied().filter(|n| *n >= 128).collect();
    eprintln!(
        "first publisher: {} frames out, second: {} frames out ({:?})",
        first.len(),
        restarted.len(),
        second
    );
    assert!(
        restarted.len() >= 20,
        "after the publisher restarted, {} of its 90 frames came out: the runner's video did \
         not come back ({second:?})",
        restarted.len()
    );
    assert!(
        restarted.windows(2).all(|w| w[0] < w[1]),
        "reordered: {restarted:?}"
    );
    drop(d);
}

#[test]
fn restarted_publisher_brings_the_output_back_with_the_fps_cap() {
    restarted_publisher_brings_the_output_back(&[]);
}

#[test]
fn restarted_publisher_brings_the_output_back_without_the_fps_cap() {
    restarted_publisher_brings_the_output_back(&[("RIVULET_FPS_CAP", "0")]);
}

/// The dashboard's preview branches cost CPU on every frame: they run only while someone
/// fetched a preview in the last 10 s. A stream that nobody watches makes no preview; the
/// first fetch (404) opens them and a JPEG follows.
#[test]
fn previews_are_made_only_while_someone_fetches_them() {
    common::init_trickle();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = spawn_daemon("previews", &[]);
    let base = d.base.clone();
    let http = reqwest::Client::new();
    let mid = "prv00001";
    start_stream(&rt, &http, &base, mid);
    let (p, src) = publisher(&format!("{base}/trickle/{mid}"));
    let feeder = std::thread::spawn(move || {
        publish(&src, 0, 300);
        src
    });
    let get = |path: &str| {
        rt.block_on(async {
            let r = http.get(format!("{base}{path}")).send().await.unwrap();
            let status = r.status().as_u16();
            let kind = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("").to_string())
                .unwrap_or_default();
            let body = r.bytes().await.unwrap();
            (status, kind, body)
        })
    };
    // Frames go through the runner while nobody looks.
    let t = Instant::now();
    loop {
        let (_, _, body) = get("/api/dashboard");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if v["frames_out"].as_u64().unwrap_or(0) > 30 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no frames out: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for which in ["input", "output"] {
        let (status, _, body) = get(&format!("/api/preview/{which}.jpg"));
        assert_eq!(
            status,
            404,
            "a {which} preview was made while nobody fetched one ({} bytes)",
            body.len()
        );
    }
    // Those fetches opened the branches: JPEGs follow while the stream goes on.
    for which in ["input", "output"] {
        let t = Instant::now();
        loop {
            let (status, kind, body) = get(&format!("/api/preview/{which}.jpg"));
            if status == 200 {
                assert_eq!(kind, "image/jpeg");
                assert_eq!(&body[..2], &[0xff, 0xd8], "{which}: not a JPEG");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(8),
                "no {which} preview within 8 s of asking"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let _src = feeder.join().unwrap();
    p.set_state(gst::State::Null).unwrap();
    drop(d);
}
