// SPDX-License-Identifier: MPL-2.0
//! Benchmark: the shipped `styletransfer` model (models/styletransfer) through `aipipeline`
//! against the bare tch forward of the same TorchScript file on the same frames, in the same
//! run, at 256², 384² and 512².
//!
//! ```text
//! cargo bench -p gst-plugin-aipipeline --bench styletransfer [-- --device cpu|cuda|cuda:N] [--frames N] [--rounds N]
//! ```
//!
//! Frames come from videotestsrc (`smpte` with a moving ball), rendered once at each size and
//! replayed. Per size:
//!
//! - **element**: `aipipeline pipeline=styletransfer ! appsink` fed from the bench thread with params
//!   `{"width": S, "height": S, "style": 7}`, one frame in flight (push, wait for its output):
//!   per-frame latency p50/p95 from push to output, fps = frames / their summed latency;
//! - **bare forward**: `forward(frame, mix, strength)` of the same file through `tch::CModule`
//!   on the same frames, already on the device as (1, S, S, 3) float [0, 1] (so it excludes the
//!   element's upload, conversions and download); same statistics;
//! - **element path**: the element's own per-frame work called as library functions, outside
//!   GStreamer (`model::run_frame`, as the element calls it, on a
//!   `model::Runner` loaded from the manifest as the element loads it): what the element
//!   computes for a frame, without its thread hand-off, buffer pool and caps;
//! - **live**: `videotestsrc is-live=true framerate=100/1 ! aipipeline ! fakesink` for about
//!   5 s: output frames per second when the element runs free (its mailbox drops the frames it
//!   cannot take, and conversion overlaps inference).
//!
//! Element and bare forward run interleaved frame by frame on one thread after 5 untimed
//! warm-up frames each, `--rounds` passes over the frames, statistics over all passes; so load
//! from other processes hits all alike. The element runs below the runner's 384..=1024 (its own
//! params minimum is `pipeline::MIN_SIZE`); a size below that minimum would have no element
//! run (`n/a`), only the element path.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{arg, ms};
use gst::prelude::*;
use gstaipipeline::{device, frame, model, pipeline};
use tch::{Device, Kind, Tensor};

const SIZES: [u32; 3] = [256, 384, 512];
const STYLE: usize = 7;
const NUM_STYLES: usize = 26;
const WARMUP: usize = 5;
const LIVE_FPS: u32 = 100;
const LIVE_SECONDS: u32 = 5;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/styletransfer")
}

fn params(s: u32) -> String {
    format!(r#"{{"width":{s},"height":{s},"style":{STYLE}}}"#)
}

/// Latency statistics over all measured frames.
#[derive(Clone, Copy)]
struct Stats {
    p50: Duration,
    p95: Duration,
    fps: f64,
}

impl Stats {
    fn of(mut times: Vec<Duration>) -> Stats {
        times.sort();
        let at = |q: f64| {
            let i = ((times.len() as f64 - 1.0) * q).round() as usize;
            times.get(i).copied().unwrap_or_default()
        };
        let total: Duration = times.iter().sum();
        Stats {
            p50: at(0.5),
            p95: at(0.95),
            fps: times.len() as f64 / total.as_secs_f64().max(1e-9),
        }
    }
}

fn render_frames(n: usize, s: u32) -> anyhow::Result<Vec<gst::Buffer>> {
    let frames = common::render_frames(n, s, s)?;
    anyhow::ensure!(frames.len() == n, "rendered {} of {n} frames", frames.len());
    Ok(frames)
}

/// aipipeline ! appsink fed from this thread, one frame in flight at a time.
struct ElementRun {
    rig: common::Rig,
    pushed: u64,
}

impl ElementRun {
    fn start(dev: &str, s: u32) -> anyhow::Result<ElementRun> {
        let ai = gst::ElementFactory::make("aipipeline")
            .property("pipeline", "styletransfer")
            .property("pipelines-dir", models_dir().to_string_lossy().as_ref())
            .property("device", dev)
            .property("params", params(s))
            .property("max-latency-ms", 0u32)
            .build()?;
        Ok(ElementRun {
            rig: common::Rig::start(ai, &common::caps(s, s))?,
            pushed: 0,
        })
    }

    /// Pushes one frame and waits for its output: the time from push to output.
    fn frame(&mut self, b: &gst::Buffer) -> anyhow::Result<Duration> {
        let i = self.pushed;
        self.pushed += 1;
        self.rig.push_pull(i, b)
    }

    /// The element's own `inference-latency-p50-ms`.
    fn worker_p50_ms(&self) -> f64 {
        self.rig
            .stats()
            .get::<f64>("inference-latency-p50-ms")
            .unwrap_or(f64::NAN)
    }
}

/// The element's per-frame work as library calls: upload + conversion, model, download.
struct ElementPath {
    runner: model::Runner,
    layout: frame::PixelLayout,
    s: u32,
    out: Vec<u8>,
    staging: frame::Staging,
    dev: Device,
}

impl ElementPath {
    fn new(s: u32, dev: Device) -> anyhow::Result<ElementPath> {
        let def = pipeline::load_manifest(&models_dir().join("styletransfer.toml"))?;
        let mut params = def.parse_params(&format!(r#"{{"style":{STYLE}}}"#))?;
        // Set directly, so that the path also runs at sizes the element's params refuse.
        params.width = s;
        params.height = s;
        let runner = model::Runner::load(&def, &params, dev, false)?;
        let layout = frame::pixel_layout(gst_video::VideoFormat::Rgb)
            .ok_or_else(|| anyhow::anyhow!("no pixel layout for RGB"))?;
        Ok(ElementPath {
            runner,
            layout,
            s,
            out: vec![0u8; (s * s * 3) as usize],
            staging: frame::Staging::default(),
            dev,
        })
    }

    /// One frame from its packed RGB bytes to the output bytes: its time.
    fn frame(&mut self, b: &gst::Buffer) -> anyhow::Result<Duration> {
        let _g = tch::no_grad_guard();
        let map = b.map_readable()?;
        let s = self.s;
        let stride = s as usize * 3;
        let t0 = Instant::now();
        let input = frame::FrameIn {
            planes: &[map.as_slice()],
            strides: &[stride],
            width: s,
            height: s,
            format: frame::InFormat::Packed(self.layout),
        };
        let out = model::FrameOut {
            data: &mut self.out,
            stride,
            width: s,
            height: s,
            bpp: 3,
        };
        model::run_frame(&self.runner, &mut self.staging, &input, self.dev, out)?;
        Ok(t0.elapsed())
    }
}

/// The bare forward of styletransfer.pt on frames already on the device (BHWC [0, 1]).
struct Bare {
    module: tch::CModule,
    mix: Tensor,
    strength: Tensor,
    inputs: Vec<Tensor>,
    dev: Device,
}

impl Bare {
    fn new(frames: &[gst::Buffer], s: u32, dev: Device) -> anyhow::Result<Bare> {
        let inputs = frames
            .iter()
            .map(|b| -> anyhow::Result<Tensor> {
                let map = b.map_readable()?;
                Ok(Tensor::f_from_slice(map.as_slice())?
                    .f_view([1, s as i64, s as i64, 3])?
                    .f_to_device(dev)?
                    .f_to_kind(Kind::Float)?
                    .f_div_scalar(255.0)?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut module = tch::CModule::load_on_device(models_dir().join("styletransfer.pt"), dev)?;
        module.f_set_eval()?;
        let mut mix = [0f32; NUM_STYLES];
        mix[STYLE] = 1.0;
        Ok(Bare {
            module,
            mix: Tensor::f_from_slice(&mix)?.f_to_device(dev)?,
            strength: Tensor::from(1f32).f_to_device(dev)?,
            inputs,
            dev,
        })
    }

    /// One forward of input `i` (synchronised on CUDA): its time.
    fn frame(&self, i: usize) -> anyhow::Result<Duration> {
        let _g = tch::no_grad_guard();
        let f = self
            .inputs
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("no input {i}"))?;
        let t0 = Instant::now();
        let _ = self.module.forward_ts(&[
            f.shallow_clone(),
            self.mix.shallow_clone(),
            self.strength.shallow_clone(),
        ])?;
        if let Device::Cuda(n) = self.dev {
            tch::Cuda::synchronize(n as i64);
        }
        Ok(t0.elapsed())
    }
}

/// What one size gives: the element (with its worker p50 ms) where it can run, the element
/// path and the bare forward.
struct Measured {
    element: Option<(Stats, f64)>,
    path: Stats,
    fwd: Stats,
}

/// Element, element path and bare forward interleaved frame by frame on one thread (so that
/// load from other processes hits all alike), `rounds` passes over the frames after WARMUP
/// untimed frames of each. No element below MIN_SIZE.
fn measure(
    dev_prop: &str,
    dev: Device,
    frames: &[gst::Buffer],
    s: u32,
    rounds: usize,
) -> anyhow::Result<Measured> {
    let bare = Bare::new(frames, s, dev)?;
    let mut path = ElementPath::new(s, dev)?;
    let mut el = if s >= pipeline::MIN_SIZE {
        Some(ElementRun::start(dev_prop, s)?)
    } else {
        None
    };
    let n = frames.len();
    for i in 0..WARMUP {
        if let Some(e) = el.as_mut() {
            e.frame(&frames[i % n])?;
        }
        path.frame(&frames[i % n])?;
        bare.frame(i % n)?;
    }
    let (mut t_el, mut t_path, mut t_fwd) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (i, b) in frames.iter().enumerate() {
            if let Some(e) = el.as_mut() {
                t_el.push(e.frame(b)?);
            }
            t_path.push(path.frame(b)?);
            t_fwd.push(bare.frame(i)?);
        }
    }
    Ok(Measured {
        element: el.map(|e| (Stats::of(t_el), e.worker_p50_ms())),
        path: Stats::of(t_path),
        fwd: Stats::of(t_fwd),
    })
}

/// Free-running live pipeline: output frames per second between the first and last output.
fn live(dev: &str, s: u32) -> anyhow::Result<(f64, String)> {
    let pipeline = common::launch(&format!(
        "videotestsrc is-live=true num-buffers={} pattern=smpte horizontal-speed=5 ! \
         video/x-raw,format=RGB,width={s},height={s},framerate={LIVE_FPS}/1 ! \
         aipipeline name=ai pipeline=styletransfer device={dev} max-latency-ms=0 ! \
         fakesink name=sink sync=false",
        LIVE_FPS * LIVE_SECONDS
    ))?;
    let ai = common::by_name(&pipeline, "ai")?;
    ai.set_property("pipelines-dir", models_dir().to_string_lossy().as_ref());
    ai.set_property("params", params(s));
    let times = common::play_to_eos(&pipeline, gst::ClockTime::from_seconds(120))?;
    let stats = ai.property::<gst::Structure>("stats");
    let out = stats.get::<u64>("frames-out").unwrap_or(0);
    let drops = stats.get::<u64>("queue-drops").unwrap_or(0);
    let passthrough = stats.get::<u64>("frames-passthrough").unwrap_or(0);
    pipeline.set_state(gst::State::Null)?;
    let times = times.lock().unwrap();
    let span = match (times.first(), times.last()) {
        (Some(a), Some(b)) => *b - *a,
        _ => Duration::ZERO,
    };
    let fps = if times.len() > 1 {
        (times.len() - 1) as f64 / span.as_secs_f64().max(1e-9)
    } else {
        0.0
    };
    Ok(format!(
        "{s}x{s}: {fps:.2} fps ({} frames out over {:.2} s; element: {out} out, {passthrough} passed through, {drops} dropped of {} in)",
        times.len(),
        span.as_secs_f64(),
        LIVE_FPS * LIVE_SECONDS
    ))
    .map(|line| (fps, line))
}

/// Runs `f` on a fresh thread (torch work off the main thread, as in the element).
fn on_thread<T: Send>(f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|sc| sc.spawn(f).join())
        .map_err(|_| anyhow::anyhow!("measurement thread panicked"))?
}

fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{model}, {cores} cores available")
}

fn main() -> anyhow::Result<()> {
    gst::init()?;
    gstaipipeline::plugin_register_static()?;
    let device_arg = arg("--device")
        .or_else(|| std::env::var("RIVULET_BENCH_DEVICE").ok())
        .unwrap_or_else(|| "cpu".into());
    let n: usize = arg("--frames").and_then(|v| v.parse().ok()).unwrap_or(40);
    let rounds: usize = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(3);
    let spec = device_arg
        .parse::<device::DeviceSpec>()
        .map_err(|e| anyhow::anyhow!(e))?;
    let dev = device::resolve(spec).map_err(|e| anyhow::anyhow!(e))?;
    let dev_prop = match dev {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    anyhow::ensure!(
        models_dir().join("styletransfer.pt").is_file(),
        "models/styletransfer/styletransfer.pt is missing"
    );

    println!(
        "styletransfer benchmark: device {} ({}), torch threads {}, {n} frames x {rounds} rounds per size, style {STYLE}",
        device::describe(dev),
        cpu_name(),
        tch::get_num_threads()
    );
    println!(
        "element = aipipeline pipeline=styletransfer ! appsink fed from the bench thread, one frame in flight; \
         path = the element's per-frame functions (upload, model, download) outside GStreamer; \
         forward = bare tch forward on frames already on the device; live = free-running {LIVE_FPS} fps source"
    );
    println!();
    let dev_col = device::describe(dev);
    let header = [
        "size", "device", "el fps", "el p50", "el p95", "wk p50", "path fps", "path p50",
        "fwd fps", "fwd p50", "fwd p95", "el/fwd", "path/fwd", "live fps",
    ];
    let w = dev_col.len().max(6);
    println!(
        "{:<8} {:<w$} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8}",
        header[0],
        header[1],
        header[2],
        header[3],
        header[4],
        header[5],
        header[6],
        header[7],
        header[8],
        header[9],
        header[10],
        header[11],
        header[12],
        header[13]
    );
    let mut live_lines = Vec::new();
    for s in SIZES {
        let frames = render_frames(n, s)?;
        let m = on_thread(|| measure(&dev_prop, dev, &frames, s, rounds))?;
        let size = format!("{s}x{s}");
        let (fwd, path) = (m.fwd, m.path);
        let path_ratio = format!("{:.2}", ms(path.p50) / ms(fwd.p50).max(1e-9));
        let (el_fps, el_p50, el_p95, wk_p50, el_ratio, live_fps) = match m.element {
            Some((e, worker_p50)) => {
                let (live_fps, line) = live(&dev_prop, s)?;
                live_lines.push(line);
                (
                    format!("{:.2}", e.fps),
                    format!("{:.1}", ms(e.p50)),
                    format!("{:.1}", ms(e.p95)),
                    format!("{worker_p50:.1}"),
                    format!("{:.2}", ms(e.p50) / ms(fwd.p50).max(1e-9)),
                    format!("{live_fps:.2}"),
                )
            }
            None => {
                let na = || "n/a".to_string();
                (na(), na(), na(), na(), na(), na())
            }
        };
        println!(
            "{:<8} {:<w$} {:>7} {:>7} {:>7} {:>7} {:>8.2} {:>8.1} {:>7.2} {:>7.1} {:>7.1} {:>7} {:>8} {:>8}",
            size,
            dev_col,
            el_fps,
            el_p50,
            el_p95,
            wk_p50,
            path.fps,
            ms(path.p50),
            fwd.fps,
            ms(fwd.p50),
            ms(fwd.p95),
            el_ratio,
            path_ratio,
            live_fps
        );
    }
    println!();
    println!("live runs:");
    for l in &live_lines {
        println!("  {l}");
    }
    println!();
    println!(
        "ms per frame; el = element (push to output), wk = the element's inference-latency-p50-ms, \
         path = element path, fwd = bare forward; el/fwd and path/fwd = p50 / forward p50. \
         n/a: the element does not run below {}x{} (params width/height are {}..={}); the \
         element path runs there with params built directly.",
        pipeline::MIN_SIZE,
        pipeline::MIN_SIZE,
        pipeline::MIN_SIZE,
        pipeline::MAX_SIZE
    );
    Ok(())
}
