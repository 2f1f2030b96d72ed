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
//! videotestsrc (rendered once, pushed into the element from the bench thread); each is pushed and its output awaited
//! before the next (no mailbox drops), so the time is the element's full per-frame cost. Medians
//! after 10 untimed warm-up frames; the two modes alternate over 3 rounds and the best median of
//! each is kept.
//!
//! Two measurements per case:
//! - direct: the same conversion + pipeline code called in this process (`model::run_frame`,
//!   as the element and the child call it) against a `ChildProc::frame` round
//!   trip to a child; the child reports its own processing time, so
//!   transport = round trip − child processing (shared-memory copies, socket round trip,
//!   wake-ups) even when the machine's load makes the processing itself noisy. Goal: < 0.5 ms
//!   per 512² frame.
//!   The same child also runs each frame from an input slot (`slot rt`: the frame written
//!   into the slot untimed, as upstream would decode into it; no copy), interleaved frame by
//!   frame with the copying round trip, so the difference is the copy itself.
//! - element: aipipeline isolation=none|process ! appsink, fed from the bench thread.
//!
//! Then, at 512×512, the input copy: aipipeline isolation=process fed with frames the bench
//! writes, as a decoder would, either into buffers of its own pool (a plain video pool: the
//! element copies each frame into the child's shared memory) or into buffers of the pool the
//! element proposes in the ALLOCATION query (input slots the child reads: no input copy).
//! Both times include the bench's write; 7 alternating rounds, best median of each.

mod common;

use std::time::{Duration, Instant};

use common::{caps, median, ms, render_frames, testdata};
use gstaipipeline::child::{ChildCommand, ChildProc, InputArea, InputLayout, LoadSpec, Spawner};
use gstaipipeline::pipeline::Registry;
use gstaipipeline::{device, frame, model};

const WARMUP: usize = 10;
const ROUNDS: usize = 3;
/// Rounds of the own-pool / proposed-pool comparison: its difference (one 512² frame copy)
/// is small against the machine's noise, so it gets more rounds.
const POOL_ROUNDS: usize = 7;

/// How the bench hands frames to the element.
#[derive(Clone, Copy, PartialEq)]
enum Feed {
    /// A (shallow) copy of the rendered buffer.
    Rendered,
    /// Written into a buffer of a pool of the bench's own.
    OwnPool,
    /// Written into a buffer of the pool the element proposed.
    ProposedPool,
}

/// aipipeline ! appsink fed from this thread, one frame in flight; returns the median per-frame time and
/// the device the model ran on.
fn run_element(
    isolation: &str,
    frames: &[gst::Buffer],
    input: (u32, u32),
    output: (u32, u32),
) -> anyhow::Result<(Duration, String)> {
    run_element_fed(isolation, Feed::Rendered, frames, input, output).map(|(t, d, _)| (t, d))
}

/// [`run_element`] with frames handed over as `feed` says; also returns the element's
/// `input-zero-copy` count.
fn run_element_fed(
    isolation: &str,
    feed: Feed,
    frames: &[gst::Buffer],
    (w, h): (u32, u32),
    (ow, oh): (u32, u32),
) -> anyhow::Result<(Duration, String, u64)> {
    let ai = gst::ElementFactory::make("aipipeline")
        .property("pipeline", "identity")
        .property("pipelines-dir", testdata().to_string_lossy().as_ref())
        .property("device", "cpu")
        .property("params", format!(r#"{{"width":{ow},"height":{oh}}}"#))
        .property("max-latency-ms", 0u32)
        .property_from_str("isolation", isolation)
        .property("child-path", env!("CARGO_BIN_EXE_rivulet-inference"))
        .build()?;
    let caps = caps(w, h);
    let rig = common::Rig::start(ai, &caps)?;
    let times = match feed {
        Feed::Rendered => rig.timed_frames(frames, WARMUP)?,
        Feed::OwnPool => rig.timed_frames_via(&common::own_pool(&caps)?, frames, WARMUP)?,
        Feed::ProposedPool => {
            let pool = rig
                .proposed_pool(&caps)?
                .ok_or_else(|| anyhow::anyhow!("the element proposed no pool"))?;
            rig.timed_frames_via(&pool, frames, WARMUP)?
        }
    };
    let stats = rig.stats();
    let device = stats.get::<String>("device").unwrap_or_default();
    let zero_copy = stats.get::<u64>("input-zero-copy").unwrap_or_default();
    rig.stop()?;
    Ok((median(times), device, zero_copy))
}

struct Direct {
    local: Duration,
    round_trip: Duration,
    transport: Duration,
    /// A round trip whose frame is already in an input slot (no copy), interleaved frame by
    /// frame with the copying one above.
    round_trip_slot: Duration,
}

/// In-process conversion + identity vs a child round trip, alternating, best medians.
fn direct(
    frames: &[gst::Buffer],
    (w, h): (u32, u32),
    (ow, oh): (u32, u32),
) -> anyhow::Result<Direct> {
    let json = format!(r#"{{"width":{ow},"height":{oh}}}"#);
    let dev = device::resolve(device::DeviceSpec::Cpu).map_err(anyhow::Error::msg)?;
    let dir = testdata();
    let registry = Registry::scan_dir(dir.as_path());
    let def = registry
        .resolve("identity", None)
        .ok_or_else(|| anyhow::anyhow!("no identity pipeline"))?;
    let params = def.parse_params(&json)?;
    let runner = model::Runner::load(&def, &params, dev, false)?;
    let layout = frame::pixel_layout(gst_video::VideoFormat::Rgb)
        .ok_or_else(|| anyhow::anyhow!("layout"))?;
    let stride = (w * 3) as usize;
    let mut out = vec![0u8; (ow * oh * 3) as usize];
    let spawner = Spawner::new().map_err(anyhow::Error::msg)?;
    let area = InputArea::create()?;
    let mut child: ChildProc = spawner
        .spawn(&ChildCommand::new(env!("CARGO_BIN_EXE_rivulet-inference")).with_input(area.clone()))
        .map_err(anyhow::Error::msg)?;
    // Two input slots used in turn, as a pool's buffers are.
    let frame_len = frames.first().map_or(0, |b| b.size());
    let mut slots = [area.alloc(frame_len)?, area.alloc(frame_len)?];
    let mut turn = 0usize;
    child.load(
        &LoadSpec {
            pipeline: "identity".into(),
            model: None,
            pipelines_dir: Some(dir.to_string_lossy().into_owned()),
            device: "cpu".into(),
            fp16: false,
            params: json.clone(),
            resolved: None,
        },
        Duration::from_secs(180),
        &|| false,
    )?;
    let _g = tch::no_grad_guard();
    let mut staging = frame::Staging::default();
    let mut local_once = |b: &gst::Buffer| -> anyhow::Result<Duration> {
        let map = b.map_readable()?;
        let t0 = Instant::now();
        let input = frame::FrameIn {
            planes: &[map.as_slice()],
            strides: &[stride],
            width: w,
            height: h,
            format: frame::InFormat::Packed(layout),
        };
        let o = model::FrameOut {
            data: &mut out,
            stride: (ow * 3) as usize,
            width: ow,
            height: oh,
            bpp: 3,
        };
        model::run_frame(&runner, &mut staging, &input, dev, o)?;
        Ok(t0.elapsed())
    };
    // One round trip of the RGB frame `plane`: its time, and whether the input went uncopied.
    let round_trip = |child: &mut ChildProc, plane: &[u8]| -> anyhow::Result<(Duration, bool)> {
        let t0 = Instant::now();
        child.frame(
            &[plane],
            &[stride],
            w,
            h,
            InputLayout::Packed {
                bpp: 3,
                first: 0,
                bgr: false,
            },
            ow,
            oh,
            Duration::from_secs(10),
        )?;
        Ok((t0.elapsed(), child.last_input_zero_copy()))
    };
    let child_once =
        |child: &mut ChildProc, b: &gst::Buffer| -> anyhow::Result<(Duration, Duration)> {
            let (rt, zero_copy) = round_trip(child, &b.map_readable()?)?;
            anyhow::ensure!(!zero_copy, "a heap frame was not copied");
            Ok((rt, rt.saturating_sub(child.last_compute())))
        };
    // The frame written into the next slot (untimed: upstream's decode), then the round trip.
    let mut slot_once = |child: &mut ChildProc, b: &gst::Buffer| -> anyhow::Result<Duration> {
        turn = (turn + 1) % slots.len();
        let slot = &mut slots[turn];
        slot.as_mut().copy_from_slice(&b.map_readable()?);
        let (rt, zero_copy) = round_trip(child, slot.as_ref())?;
        anyhow::ensure!(zero_copy, "a slot frame was copied");
        Ok(rt)
    };
    for b in frames.iter().take(WARMUP) {
        local_once(b)?;
        child_once(&mut child, b)?;
        slot_once(&mut child, b)?;
    }
    let mut best = Direct {
        local: Duration::MAX,
        round_trip: Duration::MAX,
        transport: Duration::MAX,
        round_trip_slot: Duration::MAX,
    };
    for _ in 0..ROUNDS {
        let (mut l, mut rt, mut tr, mut rs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for b in frames {
            l.push(local_once(b)?);
            let (r, t) = child_once(&mut child, b)?;
            rt.push(r);
            tr.push(t);
            rs.push(slot_once(&mut child, b)?);
        }
        best.local = best.local.min(median(l));
        best.round_trip = best.round_trip.min(median(rt));
        best.transport = best.transport.min(median(tr));
        best.round_trip_slot = best.round_trip_slot.min(median(rs));
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    gst::init()?;
    gstaipipeline::plugin_register_static()?;
    let n = common::arg("--frames")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100usize);
    println!(
        "aipipeline isolation=process vs none, model testdata/identity, device cpu, {n} frames, median per frame (ms)"
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} | {:>10} {:>10} {:>6}",
        "case",
        "direct in",
        "child rt",
        "transport",
        "slot rt",
        "element in",
        "element ch",
        "ratio"
    );
    let cases = [
        ("512x512 -> 512x512", (512, 512), (512, 512)),
        ("1920x1080 -> 1024x576", (1920, 1080), (1024, 576)),
    ];
    let mut device = String::new();
    for (name, input, output) in cases {
        let frames = render_frames(n, input.0, input.1)?;
        // Torch ops on the main thread were erratically slower on the dev machine: own thread.
        let d = {
            let frames = frames.clone();
            std::thread::spawn(move || direct(&frames, input, output))
                .join()
                .map_err(|_| anyhow::anyhow!("direct measurement panicked"))??
        };
        let (mut local, mut child) = (Duration::MAX, Duration::MAX);
        for _ in 0..ROUNDS {
            let (l, dv) = run_element("none", &frames, input, output)?;
            local = local.min(l);
            device = dv;
            let (c, _) = run_element("process", &frames, input, output)?;
            child = child.min(c);
        }
        println!(
            "{:<22} {:>9.3} {:>9.3} {:>9.3} {:>9.3} | {:>10.3} {:>10.3} {:>6.2}",
            name,
            ms(d.local),
            ms(d.round_trip),
            ms(d.transport),
            ms(d.round_trip_slot),
            ms(local),
            ms(child),
            child.as_secs_f64() / local.as_secs_f64().max(1e-9)
        );
    }
    // The input copy at 512x512: the bench writes each frame into its own pool's buffers
    // (copied into shared memory by the element) or into the proposed pool's (not copied).
    let frames = render_frames(n, 512, 512)?;
    let (mut own, mut proposed, mut zc_own, mut zc_proposed) = (Duration::MAX, Duration::MAX, 0, 0);
    for _ in 0..POOL_ROUNDS {
        let (t, _, z) = run_element_fed("process", Feed::OwnPool, &frames, (512, 512), (512, 512))?;
        own = own.min(t);
        zc_own = z;
        let (t, _, z) = run_element_fed(
            "process",
            Feed::ProposedPool,
            &frames,
            (512, 512),
            (512, 512),
        )?;
        proposed = proposed.min(t);
        zc_proposed = z;
    }
    println!();
    println!(
        "512x512 -> 512x512, isolation=process, frames written into (median per frame, ms; input-zero-copy of the last run):"
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>6}",
        "", "own pool", "proposed", "saved", "ratio"
    );
    println!(
        "{:<22} {:>10.3} {:>10.3} {:>10.3} {:>6.2}",
        "element ch",
        ms(own),
        ms(proposed),
        ms(own) - ms(proposed),
        proposed.as_secs_f64() / own.as_secs_f64().max(1e-9)
    );
    println!(
        "input-zero-copy: own pool {zc_own}, proposed pool {zc_proposed} (of {} frames)",
        n + WARMUP
    );
    println!("device: {device}");
    println!(
        "direct in: conversion + pipeline in this process; child rt: the same in the child as a \
         round trip; transport: round trip minus the child's own time (median per frame); \
         slot rt: the child round trip with the frame already in an input slot (no copy), \
         interleaved with child rt frame by frame; \
         element in / ch: the element with isolation none / process; ratio: element ch / in; \
         own pool / proposed: the bench writes each frame into a buffer of its own pool / of the \
         pool the element proposed (no input copy), the write included; saved: own - proposed"
    );
    Ok(())
}
