// SPDX-License-Identifier: MPL-2.0
//! Benchmark: per-frame cost of `aipipeline` against the bare tch forward of the same model on
//! the same frames, in the same run, at 512×512; plus the conversion cost alone.
//!
//! ```text
//! cargo bench -p gst-plugin-aipipeline --bench aipipeline [-- --device cpu|cuda|cuda:N] [--frames N]
//! RIVULET_BENCH_DEVICE=cuda cargo bench -p gst-plugin-aipipeline --bench aipipeline
//! ```
//!
//! Frames come from videotestsrc, rendered once and then pushed into the element's sink pad
//! from the bench thread (`common::Rig`: no source element, so neither the source's cost nor a
//! source thread's hand-over is counted); each frame is pushed and its output awaited before
//! the next one (no mailbox drops, so the time is the element's full per-frame cost: its
//! conversions, the hand-over to its inference thread and the forward). Figures are medians
//! over the frames after 10 untimed warm-up frames; element and bare forward are measured in 3
//! alternating rounds and the best median of each is shown. A last row runs the
//! plain `videotestsrc ! aipipeline ! fakesink` pipeline for throughput.

mod common;

use std::time::{Duration, Instant};

use common::{arg, caps, median, ms, render_frames, render_frames_as, testdata};
use gst::prelude::*;
use gst_video::prelude::*;
use gstaipipeline::{device, frame, model, par};
use tch::{Device, Kind, Tensor};

const SIZE: u32 = 512;
/// Untimed runs first (the TorchScript profiling executor optimises on early runs).
const WARMUP: usize = 10;
/// Alternating measurement rounds per pipeline (best median kept).
const ROUNDS: usize = 3;

struct ElementRun {
    per_frame: Duration,
    p50_ms: f64,
}

/// aipipeline ! appsink fed from this thread, one frame in flight at a time.
fn run_element(
    pipeline_name: &str,
    device: &str,
    frames: &[gst::Buffer],
    w: u32,
    h: u32,
) -> anyhow::Result<ElementRun> {
    let ai = gst::ElementFactory::make("aipipeline")
        .property("pipeline", pipeline_name)
        .property("pipelines-dir", testdata().to_string_lossy().as_ref())
        .property("device", device)
        .property("params", format!(r#"{{"width":{SIZE},"height":{SIZE}}}"#))
        .property("max-latency-ms", 0u32)
        .build()?;
    let rig = common::Rig::start(ai, &caps(w, h))?;
    let times = rig.timed_frames(frames, WARMUP)?;
    let p50_ms = rig
        .stats()
        .get::<f64>("inference-latency-p50-ms")
        .unwrap_or(f64::NAN);
    rig.stop()?;
    Ok(ElementRun {
        per_frame: median(times),
        p50_ms,
    })
}

/// The bare forward of the model on the same frames, put on the device as BHWC [0, 1] first.
fn bare_forward(model: &str, frames: &[gst::Buffer], dev: Device) -> anyhow::Result<Duration> {
    let frames = to_tensors(frames, dev)?;
    let frames = frames.as_slice();
    let m = tch::CModule::load_on_device(testdata().join(model), dev)?;
    let _g = tch::no_grad_guard();
    let sync = || {
        if let Device::Cuda(n) = dev {
            tch::Cuda::synchronize(n as i64);
        }
    };
    for f in frames.iter().take(WARMUP) {
        let _ = m.forward_ts(&[f])?;
    }
    sync();
    let mut times = Vec::with_capacity(frames.len());
    for f in frames {
        let t0 = Instant::now();
        let _ = m.forward_ts(&[f])?;
        sync();
        times.push(t0.elapsed());
    }
    Ok(median(times))
}

/// Upload + cover/crop (+ float conversion) + download, as the element does it
/// (`FrameIn::to_frame` into the reused staging tensor, then `frame::write_frame`; the u8 path
/// is `model::run_frame` with `noop`).
fn conversion(
    frames: &[gst::Buffer],
    w: u32,
    h: u32,
    dev: Device,
    float: bool,
) -> anyhow::Result<Duration> {
    let layout = frame::pixel_layout(gst_video::VideoFormat::Rgb)
        .ok_or_else(|| anyhow::anyhow!("layout"))?;
    let format = frame::InFormat::Packed(layout);
    convert_frames(frames, dev, float, |b, f| {
        let map = b.map_readable()?;
        f(&frame::FrameIn {
            planes: &[map.as_slice()],
            strides: &[(w * 3) as usize],
            width: w,
            height: h,
            format,
        })
    })
}

/// The element's conversion of each frame (see [`conversion`]), the frame as `with_input`
/// maps it: median time per frame.
fn convert_frames(
    frames: &[gst::Buffer],
    dev: Device,
    float: bool,
    with_input: impl Fn(
        &gst::Buffer,
        &mut dyn FnMut(&frame::FrameIn<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let mut out = vec![0u8; (SIZE * SIZE * 3) as usize];
    let mut staging = frame::Staging::default();
    let _g = tch::no_grad_guard();
    let once = |b: &gst::Buffer| -> anyhow::Result<()> {
        with_input(b, &mut |input| {
            if float {
                let f = input.to_frame(&mut staging, SIZE, SIZE, dev)?;
                frame::write_frame(&f, &mut out, (SIZE * 3) as usize, SIZE, SIZE, 3)?;
            } else {
                let o = model::FrameOut {
                    data: &mut out,
                    stride: (SIZE * 3) as usize,
                    width: SIZE,
                    height: SIZE,
                    bpp: 3,
                };
                model::run_frame(&model::Runner::Noop, &mut staging, input, dev, o)?;
            }
            Ok(())
        })
    };
    Ok(median(common::timed(frames, WARMUP, once)?))
}

/// I420 upload + conversion to RGB + cover/crop + download, as the element does it.
fn conversion_i420(
    frames: &[gst::Buffer],
    w: u32,
    h: u32,
    dev: Device,
) -> anyhow::Result<Duration> {
    let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, w, h).build()?;
    let matrix = frame::YuvMatrix::from_info(&info);
    convert_frames(frames, dev, true, |b, f| {
        let vf = gst_video::VideoFrameRef::from_buffer_ref_readable(b.as_ref(), &info)?;
        let planes = [vf.plane_data(0)?, vf.plane_data(1)?, vf.plane_data(2)?];
        let strides: Vec<usize> = vf.plane_stride().iter().map(|s| *s as usize).collect();
        f(&frame::FrameIn {
            planes: &planes,
            strides: &strides,
            width: w,
            height: h,
            format: frame::InFormat::Yuv420 {
                nv12: false,
                matrix,
            },
        })
    })
}

/// Frame rate of the live source in the throughput rows.
const LIVE_FPS: u32 = 200;

/// Plain `videotestsrc is-live=true ! aipipeline ! fakesink` at LIVE_FPS: frames out per second
/// between the first and the last output frame (start-up excluded). When the element cannot
/// keep up, the mailbox drops frames and the output rate shows its capacity.
fn throughput(pipeline_name: &str, device: &str, n: usize) -> anyhow::Result<(f64, u64, u64)> {
    let pipeline = common::launch(&format!(
        "videotestsrc is-live=true num-buffers={} ! \
         video/x-raw,format=RGB,width={SIZE},height={SIZE},framerate={LIVE_FPS}/1 ! \
         aipipeline name=ai pipeline={pipeline_name} device={device} pipelines-dir=\"{}\" max-latency-ms=0 ! \
         fakesink name=sink sync=false",
        n * 2,
        testdata().display()
    ))?;
    let ai = common::by_name(&pipeline, "ai")?;
    ai.set_property("params", format!(r#"{{"width":{SIZE},"height":{SIZE}}}"#));
    let times = common::play_to_eos(&pipeline, gst::ClockTime::from_seconds(300))?;
    let stats = ai.property::<gst::Structure>("stats");
    let out = stats.get::<u64>("frames-out").unwrap_or(0);
    let drops = stats.get::<u64>("queue-drops").unwrap_or(0);
    pipeline.set_state(gst::State::Null)?;
    let times = times.lock().unwrap();
    let fps = match (times.first(), times.last()) {
        (Some(a), Some(b)) if times.len() > 1 => (times.len() - 1) as f64 / (*b - *a).as_secs_f64(),
        _ => 0.0,
    };
    Ok((fps, out, drops))
}

fn to_tensors(frames: &[gst::Buffer], dev: Device) -> anyhow::Result<Vec<Tensor>> {
    frames
        .iter()
        .map(|b| -> anyhow::Result<Tensor> {
            let map = b.map_readable()?;
            Ok(Tensor::f_from_slice(map.as_slice())?
                .f_view([1, SIZE as i64, SIZE as i64, 3])?
                .f_to_device(dev)?
                .f_to_kind(Kind::Float)?
                .f_div_scalar(255.0)?)
        })
        .collect()
}

/// Runs `f` ROUNDS times, each on a fresh thread (torch work off the main thread, as in the
/// element), and keeps the best result.
fn best_of(f: impl Fn() -> anyhow::Result<Duration> + Sync) -> anyhow::Result<Duration> {
    let mut best: Option<Duration> = None;
    for _ in 0..ROUNDS {
        let d = std::thread::scope(|sc| sc.spawn(&f).join())
            .map_err(|_| anyhow::anyhow!("measurement thread panicked"))??;
        best = Some(best.map_or(d, |b| b.min(d)));
    }
    best.ok_or_else(|| anyhow::anyhow!("no measurement"))
}

fn main() -> anyhow::Result<()> {
    gst::init()?;
    gstaipipeline::plugin_register_static()?;
    let device_arg = arg("--device")
        .or_else(|| std::env::var("RIVULET_BENCH_DEVICE").ok())
        .unwrap_or_else(|| "auto".into());
    let n: usize = arg("--frames").and_then(|v| v.parse().ok()).unwrap_or(60);
    let spec = device_arg
        .parse::<device::DeviceSpec>()
        .map_err(|e| anyhow::anyhow!(e))?;
    let dev = device::resolve(spec).map_err(|e| anyhow::anyhow!(e))?;
    let device_name = device::describe(dev);
    let dev_prop = match dev {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };

    let frames = render_frames(n, SIZE, SIZE)?;
    let wide = render_frames(n.min(30), 640, 480)?;
    println!(
        "aipipeline benchmark: {n} frames of {SIZE}x{SIZE} RGB, device {device_name}, medians in ms"
    );
    println!();
    println!("conversion alone (upload + cover/crop + download, per frame):");
    println!("{:<44} {:>10}", "case", "ms/frame");
    let yuv = render_frames_as(n.min(30), SIZE, SIZE, "I420")?;
    let c_u8 = best_of(|| conversion(&frames, SIZE, SIZE, dev, false))?;
    let c_f = best_of(|| conversion(&frames, SIZE, SIZE, dev, true))?;
    par::set_enabled(false);
    let c_f1 = best_of(|| conversion(&frames, SIZE, SIZE, dev, true))?;
    par::set_enabled(true);
    let c_wide = best_of(|| conversion(&wide, 640, 480, dev, true))?;
    let c_i420 = best_of(|| conversion_i420(&yuv, SIZE, SIZE, dev))?;
    println!(
        "{:<44} {:>10.3}",
        "512x512 -> 512x512, u8 path (noop)",
        ms(c_u8)
    );
    println!(
        "{:<44} {:>10.3}",
        "512x512 -> 512x512, float [0,1] path",
        ms(c_f)
    );
    println!(
        "{:<44} {:>10.3}",
        "  the same on the calling thread only",
        ms(c_f1)
    );
    println!(
        "{:<44} {:>10.3}",
        "640x480 -> 512x512 (scale+crop), float",
        ms(c_wide)
    );
    println!(
        "{:<44} {:>10.3}",
        "512x512 I420 -> 512x512 RGB, float",
        ms(c_i420)
    );
    println!();
    println!("element vs bare forward (same frames, same run):");
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>14} {:>8}",
        "pipeline",
        "element ms",
        "1-thread conv",
        "worker p50 ms",
        "forward ms",
        "overhead ms",
        "ratio"
    );
    for (name, model) in [
        ("noop", None),
        ("invert", Some("invert.pt")),
        ("convnet", Some("convnet.pt")),
    ] {
        // ROUNDS alternating rounds of (element, bare forward); the best median of each, so
        // that load from other processes on the machine disturbs the ratio less.
        let mut run: Option<ElementRun> = None;
        let mut serial: Option<ElementRun> = None;
        let mut fwd: Option<Duration> = None;
        for _ in 0..ROUNDS {
            for (on, best) in [(true, &mut run), (false, &mut serial)] {
                par::set_enabled(on);
                let r = run_element(name, &dev_prop, &frames, SIZE, SIZE)?;
                if best.as_ref().is_none_or(|b| r.per_frame < b.per_frame) {
                    *best = Some(r);
                }
            }
            par::set_enabled(true);
            if let Some(m) = model {
                // On its own thread, as the element's inference thread is (torch ops on the
                // process's main thread were measured slower here).
                let f = best_of(|| bare_forward(m, &frames, dev))?;
                fwd = Some(fwd.map_or(f, |b| b.min(f)));
            }
        }
        let run = run.ok_or_else(|| anyhow::anyhow!("no element run"))?;
        let serial = serial.ok_or_else(|| anyhow::anyhow!("no element run"))?;
        let el = ms(run.per_frame);
        let (f, ratio) = match fwd {
            Some(f) => (
                format!("{:.3}", ms(f)),
                format!("{:.2}", el / ms(f).max(1e-9)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<10} {:>14.3} {:>14.3} {:>14.3} {:>14} {:>14.3} {:>8}",
            name,
            el,
            ms(serial.per_frame),
            run.p50_ms,
            f,
            el - fwd.map_or(0.0, ms),
            ratio
        );
    }
    println!();
    println!(
        "videotestsrc is-live=true ({LIVE_FPS} fps) ! aipipeline ! fakesink (output rate; the mailbox drops what cannot be processed):"
    );
    for name in ["noop", "invert", "convnet"] {
        let (fps, out, drops) = throughput(name, &dev_prop, n)?;
        println!("{name:<10} {fps:>8.1} frames/s out ({out} out, {drops} dropped)");
    }
    Ok(())
}
