// SPDX-License-Identifier: MPL-2.0
//! Benchmark: batch groups. Four streams of the shipped `styletransfer` model at 256², all at
//! once, each `aipipeline isolation=process ! appsink` fed by its own thread (one
//! frame in flight per stream: push, wait for its output), in two modes in the same run:
//!
//! - **alone**: each element has its own inference child (no `batch-group`);
//! - **batched**: the four elements share one child (`batch-group=bench`, `max-batch=4`,
//!   `batch-timeout-ms` 2 by default), which runs their frames as batches.
//!
//! ```text
//! cargo bench -p gst-plugin-aipipeline --bench batching [-- --device cpu|cuda|cuda:N] [--frames N] [--rounds N] [--styles same|different]
//! ```
//!
//! Throughput: frames out of all streams per second of wall time; latency: per frame, push to
//! output, p50/p95 over all streams. The modes alternate `--rounds` times (default 2); the
//! figures are over all rounds. With `--styles different` every stream has its own style;
//! styletransfer takes `mix` and `strength` per sample (`per_sample` in its manifest), so the
//! child still runs a batch of four styles as one forward. For the batched mode the bench also
//! reports the mean batch size and forwards per batch, from the element's `stats`
//! (`batch-size`, `batch-forwards`) after each timed frame (one sample per frame).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{arg, ms};
use gst::prelude::*;
use gstaipipeline::device;

const STREAMS: usize = 4;
const SIZE: u32 = 256;
const WARMUP: usize = 5;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/styletransfer")
}

struct Run {
    frames: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    /// Per timed frame: (batch size, forwards) of the batch that carried it (0, 0 alone).
    batches: Vec<(u32, u32)>,
}

/// One round: four streams at once, `n` timed frames each, in batch group `group` (or none).
fn round(
    dev: &str,
    frames: &[gst::Buffer],
    n: usize,
    group: Option<&str>,
    styles: &[usize],
) -> anyhow::Result<Run> {
    let mut rigs = Vec::new();
    for (i, style) in styles.iter().enumerate().take(STREAMS) {
        let ai = gst::ElementFactory::make("aipipeline")
            .name(format!("ai{i}"))
            .property("pipeline", "styletransfer")
            .property("pipelines-dir", models_dir().to_string_lossy().as_ref())
            .property("device", dev)
            .property(
                "params",
                format!(r#"{{"width":{SIZE},"height":{SIZE},"style":{style}}}"#),
            )
            .property("max-latency-ms", 0u32)
            .property_from_str("isolation", "process")
            .property("child-path", env!("CARGO_BIN_EXE_rivulet-inference"))
            .build()?;
        if let Some(g) = group {
            ai.set_property("batch-group", g);
            ai.set_property("max-batch", STREAMS as u32);
        }
        rigs.push(common::Rig::start(ai, &common::caps(SIZE, SIZE))?);
    }
    type Timed = Vec<(Duration, (u32, u32))>;
    let drive = |rig: &common::Rig, timed: bool| -> anyhow::Result<Timed> {
        let count = if timed { n } else { WARMUP };
        let base = if timed { WARMUP } else { 0 };
        let mut t = Vec::with_capacity(count);
        for k in 0..count {
            let d = rig.push_pull((base + k) as u64, &frames[k % frames.len()])?;
            // One frame in flight: the stats are this frame's batch.
            let s = rig.stats();
            let shape = (
                s.get::<u32>("batch-size").unwrap_or(0),
                s.get::<u32>("batch-forwards").unwrap_or(0),
            );
            t.push((d, shape));
        }
        Ok(t)
    };
    let all = |timed: bool| -> anyhow::Result<Vec<Timed>> {
        std::thread::scope(|sc| {
            let handles: Vec<_> = rigs
                .iter()
                .map(|r| sc.spawn(move || drive(r, timed)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("stream thread panicked"))?
                })
                .collect()
        })
    };
    all(false)?;
    let t0 = Instant::now();
    let per_stream = all(true)?;
    let wall = t0.elapsed();
    if let Some(g) = group {
        let pids: Vec<u32> = rigs
            .iter()
            .map(|r| r.stats().get::<u32>("child-pid").unwrap_or(0))
            .collect();
        anyhow::ensure!(
            pids.windows(2).all(|w| w[0] == w[1]),
            "batch group {g}: the elements do not share one child: {pids:?}"
        );
    }
    for r in rigs {
        r.stop()?;
    }
    let (latencies, batches): (Vec<Duration>, Vec<(u32, u32)>) =
        per_stream.into_iter().flatten().unzip();
    Ok(Run {
        frames: latencies.len(),
        wall,
        latencies,
        batches,
    })
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    gst::init()?;
    gstaipipeline::plugin_register_static()?;
    let n: usize = arg("--frames").and_then(|v| v.parse().ok()).unwrap_or(30);
    let rounds: usize = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(2);
    let different = arg("--styles").as_deref() == Some("different");
    let styles: Vec<usize> = if different {
        vec![1, 7, 12, 20]
    } else {
        vec![7; STREAMS]
    };
    let spec = arg("--device")
        .or_else(|| std::env::var("RIVULET_BENCH_DEVICE").ok())
        .unwrap_or_else(|| "cpu".into())
        .parse::<device::DeviceSpec>()
        .map_err(anyhow::Error::msg)?;
    // The children load the model on this device; resolved here only to name it.
    let dev = device::resolve(spec).map_err(anyhow::Error::msg)?;
    let dev_prop = match dev {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    let frames = common::render_frames(n.max(WARMUP), SIZE, SIZE)?;
    println!(
        "batching benchmark: {STREAMS} streams of styletransfer {SIZE}x{SIZE} at once, isolation=process, device {}, {n} frames per stream x {rounds} rounds, styles {styles:?}",
        device::describe(dev)
    );
    let (mut alone, mut batched) = (Vec::new(), Vec::new());
    let (mut alone_fps, mut batched_fps) = (Vec::new(), Vec::new());
    let mut shapes: Vec<(u32, u32)> = Vec::new();
    for r in 0..rounds {
        let a = round(&dev_prop, &frames, n, None, &styles)?;
        alone_fps.push(a.frames as f64 / a.wall.as_secs_f64());
        alone.extend(a.latencies);
        let b = round(&dev_prop, &frames, n, Some(&format!("bench-{r}")), &styles)?;
        batched_fps.push(b.frames as f64 / b.wall.as_secs_f64());
        batched.extend(b.latencies);
        shapes.extend(b.batches);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (fa, fb) = (mean(&alone_fps), mean(&batched_fps));
    let (a50, a95) = (pct(&mut alone, 0.5), pct(&mut alone, 0.95));
    let (b50, b95) = (pct(&mut batched, 0.5), pct(&mut batched, 0.95));
    println!(
        "{:<9} {:>12} {:>10} {:>10}",
        "mode", "frames/s", "p50 ms", "p95 ms"
    );
    println!(
        "{:<9} {:>12.2} {:>10.1} {:>10.1}",
        "alone",
        fa,
        ms(a50),
        ms(a95)
    );
    println!(
        "{:<9} {:>12.2} {:>10.1} {:>10.1}",
        "batched",
        fb,
        ms(b50),
        ms(b95)
    );
    println!(
        "batched / alone: throughput {:.2}, p95 latency {:.2}",
        fb / fa.max(1e-9),
        ms(b95) / ms(a95).max(1e-9)
    );
    let per_frame = |f: fn(&(u32, u32)) -> u32| {
        shapes.iter().map(|x| f(x) as f64).sum::<f64>() / shapes.len().max(1) as f64
    };
    let full = shapes
        .iter()
        .filter(|(size, _)| *size as usize == STREAMS)
        .count();
    println!(
        "batched: mean batch size {:.2}, mean forwards per batch {:.2} (per frame, {} frames; {:.0}% in batches of {STREAMS})",
        per_frame(|x| x.0),
        per_frame(|x| x.1),
        shapes.len(),
        100.0 * full as f64 / shapes.len().max(1) as f64
    );
    Ok(())
}
