// SPDX-License-Identifier: MPL-2.0
//! The shipped `styletransfer` pipeline (models/styletransfer: manifest + TorchScript file) in
//! the `aipipeline` element on the CPU: `videotestsrc ! aipipeline pipeline=styletransfer !
//! appsink`. Strength 1 changes the picture clearly, strength 0 gives the input back, two
//! styles give two different pictures, a live `params` change (`mix`) takes effect within the
//! frames already in flight, mixes are normalised, and the not-yet-implemented `style` key is
//! ignored (the params fall back to their defaults, without a warning).

use std::path::PathBuf;
use std::sync::Once;
use std::time::{Duration, Instant};

use gst::prelude::*;

const SIZE: u32 = 512;
const NUM_STYLES: usize = 26;
/// Frames that may still carry the previous params after a `params` set: the one in appsink's
/// queue, the one being pushed into it, the one being processed.
const IN_FLIGHT: usize = 4;

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstaipipeline::plugin_register_static().unwrap();
    });
}

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/styletransfer")
}

fn params(style: usize, weight: f64, strength: f64) -> String {
    let mut mix = vec![0.0; NUM_STYLES];
    mix[style] = weight;
    serde_json::json!({ "mix": mix, "strength": strength }).to_string()
}

struct Run {
    pipeline: gst::Pipeline,
    ai: gst::Element,
    sink: gst_app::AppSink,
}

impl Run {
    /// A live 15 fps SMPTE 75 % bars test picture (static, unlike `smpte` with its noise, so a given style always gives the same output)
    /// at 512×512 RGB through `aipipeline` on the CPU into an appsink holding one frame.
    fn start(pipeline: &str, params: &str) -> Run {
        init();
        let desc = format!(
            "videotestsrc is-live=true num-buffers=600 pattern=smpte75 ! \
             video/x-raw,format=RGB,width={SIZE},height={SIZE},framerate=15/1 ! \
             aipipeline name=ai pipeline={pipeline} device=cpu ! \
             appsink name=sink sync=false max-buffers=1"
        );
        let pipeline = gst::parse::launch(&desc)
            .unwrap()
            .downcast::<gst::Pipeline>()
            .unwrap();
        let ai = pipeline.by_name("ai").unwrap();
        ai.set_property("pipelines-dir", models_dir().to_str().unwrap());
        ai.set_property("params", params);
        let sink = pipeline
            .by_name("sink")
            .unwrap()
            .downcast::<gst_app::AppSink>()
            .unwrap();
        if pipeline.set_state(gst::State::Playing).is_err() {
            let msg = pipeline
                .bus()
                .unwrap()
                .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error]);
            panic!("pipeline failed to start: {msg:?}");
        }
        Run { pipeline, ai, sink }
    }

    fn frame(&self) -> Vec<u8> {
        let sample = self
            .sink
            .try_pull_sample(gst::ClockTime::from_seconds(30))
            .expect("no frame within 30 s");
        let caps = sample.caps().unwrap().structure(0).unwrap().to_owned();
        assert_eq!(caps.get::<i32>("width").unwrap(), SIZE as i32);
        assert_eq!(caps.get::<i32>("height").unwrap(), SIZE as i32);
        assert_eq!(caps.get::<&str>("format").unwrap(), "RGB");
        let data = sample.buffer().unwrap().map_readable().unwrap().to_vec();
        assert_eq!(data.len(), (SIZE * SIZE * 3) as usize);
        data
    }

    /// Sets `params` while PLAYING and returns the first frame that is `close` to `want`,
    /// failing if none comes within the frames in flight.
    fn change(&self, params: &str, what: &str, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        self.ai.set_property("params", params);
        for _ in 0..=IN_FLIGHT {
            let f = self.frame();
            if want(&f) {
                return f;
            }
        }
        panic!("{what}: not applied within {IN_FLIGHT} frames of the params change");
    }

    fn warnings(&self) -> Vec<String> {
        let bus = self.pipeline.bus().unwrap();
        std::iter::from_fn(|| {
            bus.pop_filtered(&[gst::MessageType::Warning, gst::MessageType::Error])
        })
        .map(|m| format!("{m:?}"))
        .collect()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Mean absolute difference per byte.
fn mean_diff(a: &[u8], b: &[u8]) -> f64 {
    let sum: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as i64 - *y as i64).unsigned_abs())
        .sum();
    sum as f64 / a.len() as f64
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn styletransfer_styles_strength_and_live_mix_changes() {
    let t0 = Instant::now();
    // The input as the element sees it (512² RGB in, 512² out: the exact u8 path of noop).
    let input = {
        let noop = Run::start("noop", "");
        let a = noop.frame();
        assert_eq!(noop.frame(), a, "the test picture is not static");
        a
    };

    let run = Run::start("styletransfer", &params(0, 1.0, 1.0));
    // Deterministic: the static test picture gives the same styled frame every time.
    let style0 = run.frame();
    let again = run.frame();
    assert!(max_diff(&style0, &again) <= 1, "style 0 is not stable");
    let d_input0 = mean_diff(&style0, &input);
    assert!(
        d_input0 > 20.0,
        "strength 1 hardly changes the picture (mean diff {d_input0:.1})"
    );

    // Per-frame time on the CPU, steady state (the appsink holds one frame, so frames are pulled
    // at the model's pace).
    let timed = 5;
    let t = Instant::now();
    for _ in 0..timed {
        assert!(max_diff(&run.frame(), &style0) <= 1);
    }
    let per_frame = t.elapsed() / timed;

    // Live switch to another style: applied within the frames in flight, then stable.
    let style7 = run.change(&params(7, 1.0, 1.0), "style 7", |f| {
        mean_diff(f, &style0) > 5.0
    });
    assert!(
        max_diff(&run.frame(), &style7) <= 1,
        "style 7 is not stable"
    );
    let d_styles = mean_diff(&style0, &style7);
    assert!(
        d_styles > 10.0,
        "styles 0 and 7 give nearly the same picture (mean diff {d_styles:.1})"
    );
    assert!(mean_diff(&style7, &input) > 20.0);

    // The not-yet-implemented `style` key is ignored: full replacement, so `mix` and `strength`
    // take their defaults (style 0, strength 1). No warning.
    run.change(r#"{"style": 7}"#, "style key ignored", |f| {
        max_diff(f, &style0) <= 1
    });

    // Mixes are normalised: 3 × one-hot 7 is style 7.
    run.change(&params(7, 3.0, 1.0), "unnormalised mix", |f| {
        max_diff(f, &style7) <= 1
    });

    // An invalid `style` (a name that does not exist) is ignored the same way, no warning.
    run.change(r#"{"style": "no such style"}"#, "bad style ignored", |f| {
        max_diff(f, &style0) <= 1
    });

    // Strength 0: the input, ±2.
    let plain = run.change(&params(7, 1.0, 0.0), "strength 0", |f| {
        max_diff(f, &input) <= 2
    });
    assert!(max_diff(&plain, &input) <= 2);

    // Half strength lies between the input and the styled picture.
    let half = run.change(&params(7, 1.0, 0.5), "strength 0.5", |f| {
        max_diff(f, &input) > 2
    });
    let (d_in, d_st) = (mean_diff(&half, &input), mean_diff(&half, &style7));
    assert!(
        d_in > 5.0 && d_st > 5.0,
        "strength 0.5: mean diff {d_in:.1} to the input, {d_st:.1} to the styled picture"
    );

    let stats = run.ai.property::<gst::Structure>("stats");
    let p50 = stats.get::<f64>("inference-latency-p50-ms").unwrap_or(-1.0);
    let warnings = run.warnings();
    assert!(warnings.is_empty(), "warnings or errors: {warnings:?}");
    println!(
        "styletransfer {SIZE}x{SIZE} on CPU: {:.1} ms per frame pulled, element p50 {p50:.1} ms; \
         mean diff style 0 vs input {d_input0:.1}, style 0 vs 7 {d_styles:.1}; test {:.1} s",
        per_frame.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64()
    );
    assert!(t0.elapsed() < Duration::from_secs(120));
}
