// SPDX-License-Identifier: MPL-2.0
//! Glass-to-glass latency through tricklesink -> trickle server (loopback) -> tricklesrc,
//! beside the same encode -> mux -> demux -> decode graph linked directly in one pipeline
//! (the baseline), measured in the same run.
//!
//! Each frame carries its index as black/white blocks (they survive x264); the wall-clock time
//! of its push into the live appsrc is recorded, and the latency is taken when the decoded
//! frame reaches an appsink (`sync=false`: no display, no clock wait).
//!
//! `cargo bench -p gst-plugin-trickle --bench trickle_latency`

#[path = "../tests/trickle_util/mod.rs"]
mod trickle_util;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;
use trickle_util::*;

const W: usize = 512;
const H: usize = 512;
const FPS: u32 = 30;
const FRAMES: u32 = 330;
const WARMUP: u32 = 30;

const ENCODE: &str = "videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset=superfast \
                      tune=zerolatency bframes=0 bitrate=2000 ! mpegtsmux";

fn appsrc_desc() -> String {
    format!(
        "appsrc name=in is-live=true format=time do-timestamp=true \
         caps=video/x-raw,format=I420,width={W},height={H},framerate={FPS}/1"
    )
}

/// Low-latency decoder settings, as tricklesrc applies them inside its decodebin.
fn tune_decodebin(pipeline: &gst::Pipeline) {
    if let Some(db) = pipeline.by_name("dec") {
        let bin = db.clone().downcast::<gst::Bin>().unwrap();
        bin.connect_deep_element_added(|_, _, element| {
            match element.factory().map(|f| f.name().to_string()).as_deref() {
                Some("avdec_h264") => element.set_property("max-threads", 1i32),
                Some("tsdemux") => {
                    element.set_property("latency", 50i32);
                    element.connect_pad_added(|_, pad| mark_au_aligned(pad));
                }
                _ => {}
            }
        });
        let weak = pipeline.downgrade();
        db.connect_pad_added(move |_, pad| {
            if let Some(p) = weak.upgrade() {
                let sink = p.by_name("out").unwrap();
                let _ = pad.link(&sink.static_pad("sink").unwrap());
            }
        });
    }
}

/// As tricklesrc does (au-per-pes=true): tell h264parse that each PES is one access unit.
fn mark_au_aligned(pad: &gst::Pad) {
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, |_, info| {
        if let Some(gst::PadProbeData::Event(event)) = &info.data
            && let gst::EventView::Caps(c) = event.view()
            && let Some(s) = c.caps().structure(0)
            && s.name() == "video/x-h264"
            && !s.has_field("alignment")
        {
            let mut caps = c.caps().to_owned();
            caps.make_mut()
                .structure_mut(0)
                .unwrap()
                .set("alignment", "au");
            info.data = Some(gst::PadProbeData::Event(gst::event::Caps::new(&caps)));
        }
        gst::PadProbeReturn::Ok
    });
}

/// Push `FRAMES` stamped frames at `FPS` into `src` and measure when each decoded frame
/// reaches `out`. Returns the latencies after the warm-up.
fn measure(src: gst_app::AppSrc, out: gst_app::AppSink) -> Vec<Duration> {
    let pushed: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; FRAMES as usize]));
    let frames: Vec<Vec<u8>> = (0..FRAMES).map(|n| stamped_i420(n, W, H)).collect();
    let feeder = {
        let pushed = pushed.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            for (n, frame) in frames.into_iter().enumerate() {
                // The live source's own frame clock.
                let due = start + Duration::from_secs(1) * n as u32 / FPS;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let buf = gst::Buffer::from_mut_slice(frame);
                pushed.lock().unwrap()[n] = Some(Instant::now());
                if src.push_buffer(buf).is_err() {
                    break;
                }
            }
            let _ = src.end_of_stream();
        })
    };
    let mut latencies = Vec::new();
    while let Some(sample) = out.try_pull_sample(gst::ClockTime::from_seconds(10)) {
        let now = Instant::now();
        let n = sample_stamp(&sample);
        if n >= FRAMES {
            continue; // damaged stamp
        }
        if let Some(t) = pushed.lock().unwrap()[n as usize]
            && n >= WARMUP
        {
            latencies.push(now - t);
        }
        if n == FRAMES - 2 {
            break; // the last frame may wait for EOS in the demuxer
        }
    }
    let _ = feeder.join();
    latencies
}

fn direct() -> Vec<Duration> {
    let p = pipeline(&format!(
        "{} ! {ENCODE} ! decodebin name=dec appsink name=out sync=false",
        appsrc_desc()
    ));
    tune_decodebin(&p);
    let src = p
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    let out = appsink(&p, "out");
    p.set_state(gst::State::Playing).unwrap();
    let l = measure(src, out);
    p.set_state(gst::State::Null).unwrap();
    l
}

/// Encode -> decode without MPEG-TS: shows what the container adds (tsdemux can only emit a
/// video PES of unknown length when the next one begins).
fn codec_only() -> Vec<Duration> {
    let p = pipeline(&format!(
        "{} ! videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset=superfast \
         tune=zerolatency bframes=0 bitrate=2000 ! h264parse ! avdec_h264 max-threads=1 \
         ! appsink name=out sync=false",
        appsrc_desc()
    ));
    let src = p
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    let out = appsink(&p, "out");
    p.set_state(gst::State::Playing).unwrap();
    let l = measure(src, out);
    p.set_state(gst::State::Null).unwrap();
    l
}

fn trickle(server: &TestServer) -> Vec<Duration> {
    let url = server.channel("bench");
    let sub = pipeline(&format!(
        "tricklesrc url={url} ! appsink name=out sync=false"
    ));
    let out = appsink(&sub, "out");
    sub.set_state(gst::State::Playing).unwrap();
    let publ = pipeline(&format!("{} ! tricklesink url={url}", appsrc_desc()));
    let src = publ
        .by_name("in")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    publ.set_state(gst::State::Playing).unwrap();
    let l = measure(src, out);
    publ.set_state(gst::State::Null).unwrap();
    sub.set_state(gst::State::Null).unwrap();
    l
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn stats(mut l: Vec<Duration>) -> (f64, f64, f64, usize) {
    l.sort();
    let mean = l.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / l.len().max(1) as f64;
    (pct(&l, 0.5), pct(&l, 0.95), mean, l.len())
}

fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn main() {
    init();
    let server = TestServer::start();
    // Alternate the two paths so that machine noise hits both alike.
    let mut direct_l = Vec::new();
    let mut trickle_l = Vec::new();
    let mut codec_l = Vec::new();
    for _ in 0..2 {
        codec_l.extend(codec_only());
        direct_l.extend(direct());
        trickle_l.extend(trickle(&server));
        server.server.close_channel("bench");
    }
    let (c50, c95, cmean, cn) = stats(codec_l);
    let (d50, d95, dmean, dn) = stats(direct_l);
    let (t50, t95, tmean, tn) = stats(trickle_l);
    println!();
    println!(
        "trickle_latency: {W}x{H} @ {FPS} fps live, x264 superfast/zerolatency 2 Mbit/s, \
         loopback HTTP, {} cores of {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu()
    );
    println!(
        "| path                                        | frames | p50 ms | p95 ms | mean ms |"
    );
    println!(
        "|---------------------------------------------|--------|--------|--------|---------|"
    );
    println!(
        "| codec only: encode -> decode (no MPEG-TS)    | {cn:>6} | {c50:>6.2} | {c95:>6.2} | {cmean:>7.2} |"
    );
    println!(
        "| direct: encode -> mux -> demux -> decode     | {dn:>6} | {d50:>6.2} | {d95:>6.2} | {dmean:>7.2} |"
    );
    println!(
        "| trickle: tricklesink -> server -> tricklesrc | {tn:>6} | {t50:>6.2} | {t95:>6.2} | {tmean:>7.2} |"
    );
    println!(
        "trickle adds {:+.2} ms at p50 ({:.2}x), {:+.2} ms at p95 ({:.2}x) over the direct graph",
        t50 - d50,
        t50 / d50,
        t95 - d95,
        t95 / d95
    );
}
