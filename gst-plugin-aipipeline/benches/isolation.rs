// SPDX-License-Identifier: MPL-2.0
//! Benchmark: per-frame cost of `aipipeline isolation=process` (inference in the
//! `rivulet-inference` child, frames through shared memory) against the in-process element,
//! same model (testdata `identity`), same frames, same run.
//!
//! ```text
//! cargo bench -p gst-plugin-aipipeline --bench isolation [-- --frames N]
//! ```
//!
//! Cases: 512×512 RGB in → 512×512 out, and 1920×1080 RGB in → 1024×576 out. Frames come from
//! videotestsrc (rendered once, replayed through appsrc); each is pushed and its output awaited
//! before the next (no mailbox drops), so the time is the element's full per-frame cost. Medians
//! after 10 untimed warm-up frames; the two modes alternate over 3 rounds and the best median of
//! each is kept. "transport" = child − in-process: the shared-memory copies and the control
//! socket round trip; goal < 0.5 ms per 512² frame.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gst::prelude::*;

const WARMUP: usize = 10;
const ROUNDS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines")
}

fn caps(w: u32, h: u32) -> gst::Caps {
    gst::Caps::builder("video/x-raw")
        .field("format", "RGB")
        .field("width", w as i32)
        .field("height", h as i32)
        .field("framerate", gst::Fraction::new(24, 1))
        .build()
}

fn render_frames(n: usize, w: u32, h: u32) -> anyhow::Result<Vec<gst::Buffer>> {
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers={n} pattern=smpte horizontal-speed=5 ! \
         video/x-raw,format=RGB,width={w},height={h},framerate=24/1 ! appsink name=sink sync=false"
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let sink = pipeline
        .by_name("sink")
        .ok_or_else(|| anyhow::anyhow!("no sink"))?
        .downcast::<gst_app::AppSink>()
        .map_err(|_| anyhow::anyhow!("not an appsink"))?;
    pipeline.set_state(gst::State::Playing)?;
    let mut frames = Vec::with_capacity(n);
    while let Ok(sample) = sink.pull_sample() {
        if let Some(b) = sample.buffer_owned() {
            frames.push(b);
        }
    }
    pipeline.set_state(gst::State::Null)?;
    Ok(frames)
}

/// appsrc ! aipipeline ! appsink, one frame in flight; returns the median per-frame time and
/// the device the model ran on.
fn run_element(
    isolation: &str,
    frames: &[gst::Buffer],
    (w, h): (u32, u32),
    (ow, oh): (u32, u32),
) -> anyhow::Result<(Duration, String)> {
    let pipeline = gst::Pipeline::new();
    let src = gst_app::AppSrc::builder()
        .caps(&caps(w, h))
        .format(gst::Format::Time)
        .build();
    let ai = gst::ElementFactory::make("aipipeline")
        .property("pipeline", "identity")
        .property("pipelines-dir", testdata().to_string_lossy().as_ref())
        .property("device", "cpu")
        .property("params", format!(r#"{{"width":{ow},"height":{oh}}}"#))
        .property("max-latency-ms", 0u32)
        .property_from_str("isolation", isolation)
        .property("child-path", env!("CARGO_BIN_EXE_rivulet-inference"))
        .build()?;
    let sink = gst_app::AppSink::builder().sync(false).build();
    pipeline.add_many([src.upcast_ref(), &ai, sink.upcast_ref()])?;
    gst::Element::link_many([src.upcast_ref(), &ai, sink.upcast_ref()])?;
    pipeline.set_state(gst::State::Playing)?;
    let timeout = gst::ClockTime::from_seconds(60);
    let push_pull = |i: usize, b: &gst::Buffer| -> anyhow::Result<()> {
        let mut b = b.copy();
        b.get_mut()
            .ok_or_else(|| anyhow::anyhow!("buffer not writable"))?
            .set_pts(gst::ClockTime::from_mseconds(i as u64 * 41));
        src.push_buffer(b)?;
        sink.try_pull_sample(timeout)
            .ok_or_else(|| anyhow::anyhow!("no output frame"))?;
        Ok(())
    };
    for (i, b) in frames.iter().take(WARMUP).enumerate() {
        push_pull(i, b)?;
    }
    let mut times = Vec::with_capacity(frames.len());
    for (i, b) in frames.iter().enumerate() {
        let t0 = Instant::now();
        push_pull(i + WARMUP, b)?;
        times.push(t0.elapsed());
    }
    let device = ai
        .property::<gst::Structure>("stats")
        .get::<String>("device")
        .unwrap_or_default();
    pipeline.set_state(gst::State::Null)?;
    Ok((median(times), device))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    gst::init()?;
    gstaipipeline::plugin_register_static()?;
    let args: Vec<String> = std::env::args().collect();
    let n = args
        .iter()
        .position(|a| a == "--frames")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(100usize);
    println!("aipipeline isolation=process vs none, model testdata/identity, device cpu, {n} frames, median per frame");
    println!(
        "{:<24} {:>14} {:>14} {:>14} {:>8}",
        "case", "in-process ms", "child ms", "transport ms", "ratio"
    );
    let cases = [
        ("512x512 -> 512x512", (512, 512), (512, 512)),
        ("1920x1080 -> 1024x576", (1920, 1080), (1024, 576)),
    ];
    let mut device = String::new();
    for (name, input, output) in cases {
        let frames = render_frames(n, input.0, input.1)?;
        let (mut local, mut child) = (Duration::MAX, Duration::MAX);
        for _ in 0..ROUNDS {
            let (l, d) = run_element("none", &frames, input, output)?;
            local = local.min(l);
            device = d;
            let (c, _) = run_element("process", &frames, input, output)?;
            child = child.min(c);
        }
        println!(
            "{:<24} {:>14.3} {:>14.3} {:>14.3} {:>8.2}",
            name,
            ms(local),
            ms(child),
            ms(child) - ms(local),
            child.as_secs_f64() / local.as_secs_f64().max(1e-9)
        );
    }
    println!("device: {device}");
    Ok(())
}
