// SPDX-License-Identifier: MPL-2.0
//! The shipped `styletransfer` pipeline (models/styletransfer: manifest + TorchScript file) in
//! the `aipipeline` element on the CPU, against the bare TorchScript forward of the same file
//! on the same frame: `appsrc ! aipipeline pipeline=styletransfer ! appsink`, one frame in
//! flight at a time, so "the next frame" is exact.
//!
//! - a `style` change (index or name) applies at the next frame, which equals the bare model's
//!   output for that style; index and name give the same output;
//! - `mix` is normalised by the model: `[0, 3, 0, …]` is style 1;
//! - a bad style index or name warns on the bus (naming the value and the valid range and
//!   names) and keeps the previous style, while the rest of the update (`strength`) applies;
//! - `strength` blends with the input.
//!
//! Tolerance: the element's output and the bare forward (same conversions, `frame::to_frame`
//! and `frame::frame_to_u8`) may differ by 1 of 255 per byte (rounding of floats summed in
//! another order by other threads); they are compared with max abs diff <= 1.

mod common;

use std::path::PathBuf;

use common::init;
use gst::prelude::*;
use gstaipipeline::frame;
use tch::Tensor;

/// 256², below the runner's 384 minimum (the element runs smaller models), to keep the CPU
/// test short.
const SIZE: u32 = 256;
const NUM_STYLES: usize = 26;
const TOL: u8 = 1;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/styletransfer")
}

/// Params at the test size plus `extra` (full replacement: the size is in every update).
fn params(extra: serde_json::Value) -> String {
    let mut p = serde_json::json!({ "width": SIZE, "height": SIZE });
    if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    p.to_string()
}

fn one_hot(style: usize, weight: f64) -> Vec<f64> {
    let mut v = vec![0.0; NUM_STYLES];
    v[style] = weight;
    v
}

/// One static SMPTE 75 % bars frame, SIZE² RGB.
fn input_frame() -> gst::Buffer {
    init();
    common::render(&format!(
        "videotestsrc num-buffers=1 pattern=smpte75 ! \
         video/x-raw,format=RGB,width={SIZE},height={SIZE},framerate=24/1 ! \
         appsink name=sink sync=false"
    ))
    .into_iter()
    .next()
    .unwrap()
}

/// The bare TorchScript forward of styletransfer.pt on `input`, with the element's own
/// conversions (u8 → [0, 1] BHWC → model → clamp, round → u8).
struct Bare {
    module: tch::CModule,
    frame: Tensor,
}

impl Bare {
    fn new(input: &gst::Buffer) -> Bare {
        let module = tch::CModule::load(models_dir().join("styletransfer.pt")).unwrap();
        let map = input.map_readable().unwrap();
        let rgb = Tensor::from_slice(map.as_slice()).view([SIZE as i64, SIZE as i64, 3]);
        let frame = frame::to_frame(&rgb, SIZE, SIZE).unwrap();
        Bare { module, frame }
    }

    fn output(&self, mix: &[f64], strength: f64) -> Vec<u8> {
        let _g = tch::no_grad_guard();
        let mix: Vec<f32> = mix.iter().map(|x| *x as f32).collect();
        let y = self
            .module
            .forward_ts(&[
                self.frame.shallow_clone(),
                Tensor::from_slice(&mix),
                Tensor::from(strength as f32),
            ])
            .unwrap();
        let u8 = frame::frame_to_u8(&y).unwrap().contiguous();
        let n = (SIZE * SIZE * 3) as usize;
        let mut out = vec![0u8; n];
        u8.copy_data_u8(&mut out, n);
        out
    }
}

struct Element {
    pipeline: gst::Pipeline,
    ai: gst::Element,
    src: gst_app::AppSrc,
    sink: gst_app::AppSink,
    input: gst::Buffer,
    pushed: u64,
}

impl Element {
    fn start(input: &gst::Buffer, params: &str) -> Element {
        Self::start_with(input, params, false)
    }

    /// `isolated`: inference in the `rivulet-inference` child (`isolation=process`).
    fn start_with(input: &gst::Buffer, params: &str, isolated: bool) -> Element {
        Self::start_in(input, params, isolated, None)
    }

    /// In batch group `group` of `max_batch` members (`isolation=process`); a batch waits up
    /// to 1 s for all members' frames, so frames pushed to every member at once meet in one
    /// batch.
    fn start_grouped(input: &gst::Buffer, params: &str, group: &str, max_batch: u32) -> Element {
        Self::start_in(input, params, true, Some((group, max_batch)))
    }

    fn start_in(
        input: &gst::Buffer,
        params: &str,
        isolated: bool,
        group: Option<(&str, u32)>,
    ) -> Element {
        init();
        let pipeline = gst::Pipeline::new();
        let caps = common::caps("RGB", SIZE, SIZE);
        let src = gst_app::AppSrc::builder()
            .caps(&caps)
            .format(gst::Format::Time)
            .build();
        let ai = gst::ElementFactory::make("aipipeline")
            .property("pipeline", "styletransfer")
            .property("pipelines-dir", models_dir().to_str().unwrap())
            .property("device", "cpu")
            .property("max-latency-ms", 0u32)
            .property("params", params)
            .build()
            .unwrap();
        if isolated {
            ai.set_property_from_str("isolation", "process");
            ai.set_property("child-path", common::child_bin());
        }
        if let Some((name, max_batch)) = group {
            ai.set_property("batch-group", name);
            ai.set_property("max-batch", max_batch);
            ai.set_property("batch-timeout-ms", 1000u32);
        }
        let sink = gst_app::AppSink::builder().sync(false).build();
        pipeline
            .add_many([src.upcast_ref(), &ai, sink.upcast_ref()])
            .unwrap();
        gst::Element::link_many([src.upcast_ref(), &ai, sink.upcast_ref()]).unwrap();
        if pipeline.set_state(gst::State::Playing).is_err() {
            let msg = pipeline
                .bus()
                .unwrap()
                .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error]);
            panic!("pipeline failed to start: {msg:?}");
        }
        Element {
            pipeline,
            ai,
            src,
            sink,
            input: input.clone(),
            pushed: 0,
        }
    }

    /// Pushes the input frame and returns its output (one frame in flight).
    fn frame(&mut self) -> Vec<u8> {
        self.push();
        self.pull()
    }

    /// Pushes the input frame.
    fn push(&mut self) {
        let mut b = self.input.copy();
        b.get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(self.pushed * 41));
        self.pushed += 1;
        self.src.push_buffer(b).unwrap();
    }

    /// The next output frame.
    fn pull(&mut self) -> Vec<u8> {
        let sample = self
            .sink
            .try_pull_sample(gst::ClockTime::from_seconds(60))
            .expect("no output frame within 60 s");
        let data = sample.buffer().unwrap().map_readable().unwrap().to_vec();
        assert_eq!(data.len(), (SIZE * SIZE * 3) as usize);
        data
    }

    /// Sets `params` (PLAYING) and returns the next frame's output.
    fn set(&mut self, params: &str) -> Vec<u8> {
        self.ai.set_property("params", params);
        self.frame()
    }

    /// The next warning on the bus (posted while `params` is set), as text.
    fn expect_warning(&self) -> String {
        let msg = self
            .pipeline
            .bus()
            .unwrap()
            .timed_pop_filtered(
                gst::ClockTime::from_seconds(5),
                &[gst::MessageType::Warning],
            )
            .expect("no warning on the bus");
        match msg.view() {
            gst::MessageView::Warning(w) => format!("{} {:?}", w.error(), w.debug()),
            _ => unreachable!(),
        }
    }

    fn no_warnings(&self) {
        let bus = self.pipeline.bus().unwrap();
        let w: Vec<String> = std::iter::from_fn(|| {
            bus.pop_filtered(&[gst::MessageType::Warning, gst::MessageType::Error])
        })
        .map(|m| format!("{m:?}"))
        .collect();
        assert!(w.is_empty(), "warnings or errors: {w:?}");
    }
}

impl Drop for Element {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

fn mean_diff(a: &[u8], b: &[u8]) -> f64 {
    let sum: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    sum as f64 / a.len() as f64
}

#[track_caller]
fn assert_close(got: &[u8], want: &[u8], what: &str) {
    let d = max_diff(got, want);
    assert!(
        d <= TOL,
        "{what}: max abs diff {d} to the bare model output (mean {:.2}), tolerance {TOL}",
        mean_diff(got, want)
    );
}

#[test]
fn style_change_applies_at_the_next_frame_index_and_name_alike() {
    let input = input_frame();
    let bare = Bare::new(&input);
    let want: Vec<Vec<u8>> = [0, 7, 19]
        .iter()
        .map(|s| bare.output(&one_hot(*s, 1.0), 1.0))
        .collect();
    // The styles give clearly different pictures, so the comparisons below mean something.
    assert!(mean_diff(&want[0], &want[1]) > 10.0);
    assert!(mean_diff(&want[1], &want[2]) > 10.0);
    let input_bytes = input.map_readable().unwrap().to_vec();
    assert!(mean_diff(&want[0], &input_bytes) > 20.0);

    let mut el = Element::start(&input, &params(serde_json::json!({ "style": 0 })));
    assert_close(&el.frame(), &want[0], "style 0 at start");
    assert_close(&el.frame(), &want[0], "style 0 again");
    // Each change: the very next frame.
    let by_index = el.set(&params(serde_json::json!({ "style": 7 })));
    assert_close(&by_index, &want[1], "style 7 (index)");
    let by_name = el.set(&params(serde_json::json!({ "style": "style_19" })));
    assert_close(&by_name, &want[2], "style_19 (name)");
    let by_name7 = el.set(&params(serde_json::json!({ "style": "style_7" })));
    assert_close(&by_name7, &want[1], "style_7 (name)");
    assert!(
        max_diff(&by_name7, &by_index) <= TOL,
        "index 7 != name style_7"
    );
    let by_index19 = el.set(&params(serde_json::json!({ "style": 19 })));
    assert!(
        max_diff(&by_name, &by_index19) <= TOL,
        "index 19 != name style_19"
    );
    // Full replacement: no style and no mix is style 0.
    assert_close(
        &el.set(&params(serde_json::json!({}))),
        &want[0],
        "no style",
    );
    // mix wins over style when both are given.
    let both = el.set(&params(
        serde_json::json!({ "style": 19, "mix": one_hot(7, 1.0) }),
    ));
    assert_close(&both, &want[1], "mix given beside style");
    el.no_warnings();
}

#[test]
fn mixes_are_normalised() {
    let input = input_frame();
    let bare = Bare::new(&input);
    let style1 = bare.output(&one_hot(1, 1.0), 1.0);
    let mut half = vec![0.0; NUM_STYLES];
    half[0] = 0.5;
    half[7] = 0.5;
    let blend = bare.output(&half, 1.0);
    assert!(mean_diff(&blend, &bare.output(&one_hot(0, 1.0), 1.0)) > 3.0);
    assert!(mean_diff(&blend, &bare.output(&one_hot(7, 1.0), 1.0)) > 3.0);

    let mut el = Element::start(&input, &params(serde_json::json!({ "style": 1 })));
    let by_style = el.frame();
    assert_close(&by_style, &style1, "style 1");
    let unnormalised = el.set(&params(serde_json::json!({ "mix": one_hot(1, 3.0) })));
    assert_close(&unnormalised, &style1, "mix [0, 3, 0, …]");
    assert!(max_diff(&unnormalised, &by_style) <= TOL);
    let mut two = vec![0.0; NUM_STYLES];
    two[0] = 2.0;
    two[7] = 2.0;
    let got = el.set(&params(serde_json::json!({ "mix": two })));
    assert_close(&got, &blend, "mix 2:2 of styles 0 and 7");
    // Negative weights count as 0.
    let mut neg = one_hot(1, 1.0);
    neg[5] = -4.0;
    let got = el.set(&params(serde_json::json!({ "mix": neg })));
    assert_close(&got, &style1, "mix with a negative weight");
    el.no_warnings();
}

#[test]
fn bad_style_warns_and_keeps_the_previous_style() {
    let input = input_frame();
    let input_bytes = input.map_readable().unwrap().to_vec();
    let bare = Bare::new(&input);
    let style0 = bare.output(&one_hot(0, 1.0), 1.0);
    let style1 = bare.output(&one_hot(1, 1.0), 1.0);
    let style1_off = bare.output(&one_hot(1, 1.0), 0.0);
    let style1_half = bare.output(&one_hot(1, 1.0), 0.5);
    let style2 = bare.output(&one_hot(2, 1.0), 1.0);
    // Strength 0 gives the input (±1: float round trip), 0.5 lies between.
    assert!(max_diff(&style1_off, &input_bytes) <= 1);
    assert!(mean_diff(&style1_half, &input_bytes) > 5.0 && mean_diff(&style1_half, &style1) > 5.0);

    // A bad name at start: a warning, and the default style (0).
    let mut el = Element::start(&input, &params(serde_json::json!({ "style": "nope" })));
    let w = el.expect_warning();
    assert!(
        w.contains(r#"params.style = "nope""#) && w.contains("0..=25"),
        "{w}"
    );
    assert_close(&el.frame(), &style0, "bad style at start: default style 0");

    assert_close(
        &el.set(&params(serde_json::json!({ "style": 1 }))),
        &style1,
        "style 1",
    );
    el.no_warnings();

    // Bad index with a strength: warning; style 1 kept, the strength applies.
    let got = el.set(&params(serde_json::json!({ "style": 26, "strength": 0.0 })));
    let w = el.expect_warning();
    assert!(
        w.contains("params.style = 26")
            && w.contains("index 0..=25")
            && w.contains("style_0, style_1,")
            && w.contains("style_25")
            && w.contains("keeps its previous value"),
        "{w}"
    );
    assert_close(
        &got,
        &style1_off,
        "bad index 26 + strength 0: style 1 at strength 0",
    );
    let got = el.set(&params(serde_json::json!({ "style": 26, "strength": 0.5 })));
    el.expect_warning();
    assert_close(&got, &style1_half, "bad index 26 + strength 0.5");

    // Bad name: warning naming it; style 1 kept (strength back to its default 1).
    let got = el.set(&params(serde_json::json!({ "style": "starry night" })));
    let w = el.expect_warning();
    assert!(w.contains(r#"params.style = "starry night""#), "{w}");
    assert_close(&got, &style1, "bad name: style 1 kept");
    // Other values that select nothing: negative, fractional, a boolean.
    for bad in [
        serde_json::json!(-1),
        serde_json::json!(2.5),
        serde_json::json!(true),
    ] {
        let got = el.set(&params(serde_json::json!({ "style": bad })));
        let w = el.expect_warning();
        assert!(w.contains(&format!("params.style = {bad}")), "{w}");
        assert_close(&got, &style1, &format!("style {bad}: style 1 kept"));
    }

    // A good one again: applied, no warning.
    assert_close(
        &el.set(&params(serde_json::json!({ "style": 2 }))),
        &style2,
        "style 2",
    );
    el.no_warnings();
}

/// The same through an inference child (`isolation=process`, the daemon's default): the
/// element resolves `style` and sends the child the resulting `mix`.
#[test]
fn style_change_in_an_inference_child() {
    let input = input_frame();
    let bare = Bare::new(&input);
    let style0 = bare.output(&one_hot(0, 1.0), 1.0);
    let style7 = bare.output(&one_hot(7, 1.0), 1.0);
    let mut el = Element::start_with(&input, &params(serde_json::json!({ "style": 0 })), true);
    assert_close(&el.frame(), &style0, "child: style 0");
    let got = el.set(&params(serde_json::json!({ "style": "style_7" })));
    assert_close(&got, &style7, "child: style_7 at the next frame");
    el.no_warnings();
    let got = el.set(&params(serde_json::json!({ "style": 99 })));
    let w = el.expect_warning();
    assert!(w.contains("params.style = 99"), "{w}");
    assert_close(&got, &style7, "child: bad style keeps style 7");
}

/// Three elements of one batch group with different styles and strengths: the child runs their
/// frames in one forward (styletransfer takes `mix` and `strength` per sample: the manifest's
/// `per_sample`), and each output equals the bare model's output for that element's style
/// alone.
#[test]
fn different_styles_in_a_batch_group_share_one_forward() {
    let input = input_frame();
    let bare = Bare::new(&input);
    let styles = [(0usize, 1.0), (7, 1.0), (19, 0.6)];
    let want: Vec<Vec<u8>> = styles
        .iter()
        .map(|(s, strength)| bare.output(&one_hot(*s, 1.0), *strength))
        .collect();
    // The three pictures differ clearly, so a swapped or shared mix would show.
    for (i, j) in [(0, 1), (1, 2), (0, 2)] {
        assert!(mean_diff(&want[i], &want[j]) > 10.0, "styles {i} and {j}");
    }
    let mut els: Vec<Element> = styles
        .iter()
        .map(|(s, strength)| {
            Element::start_grouped(
                &input,
                &params(serde_json::json!({ "style": s, "strength": strength })),
                "st-per-sample",
                styles.len() as u32,
            )
        })
        .collect();
    let pids: Vec<u32> = els
        .iter()
        .map(|e| {
            e.ai.property::<gst::Structure>("stats")
                .get::<u32>("child-pid")
                .unwrap()
        })
        .collect();
    assert!(
        pids[0] > 0 && pids.iter().all(|p| *p == pids[0]),
        "one child: {pids:?}"
    );
    // Each round pushes one frame to every member, then takes every output. A round whose
    // frames did not all meet in one batch (a member's frame later than the 1 s batch timeout
    // on a loaded machine) is checked too and repeated.
    let mut batched = false;
    for round in 0..5 {
        for e in &mut els {
            e.push();
        }
        let outs: Vec<Vec<u8>> = els.iter_mut().map(|e| e.pull()).collect();
        for (k, (out, want)) in outs.iter().zip(&want).enumerate() {
            assert_close(
                out,
                want,
                &format!("round {round}, member {k} (style {:?})", styles[k]),
            );
        }
        let shapes: Vec<(u32, u32)> = els
            .iter()
            .map(|e| {
                let s = e.ai.property::<gst::Structure>("stats");
                (
                    s.get::<u32>("batch-size").unwrap(),
                    s.get::<u32>("batch-forwards").unwrap(),
                )
            })
            .collect();
        if shapes.iter().all(|(size, _)| *size == styles.len() as u32) {
            assert!(
                shapes.iter().all(|(_, forwards)| *forwards == 1),
                "a batch of 3 styles took more than one forward: {shapes:?}"
            );
            batched = true;
            break;
        }
        println!("round {round}: frames not in one batch ({shapes:?}); again");
    }
    assert!(batched, "the three members' frames never met in one batch");
    // A style change of one member applies to its next frame, still in one forward.
    let style3 = bare.output(&one_hot(3, 1.0), 1.0);
    els[1]
        .ai
        .set_property("params", params(serde_json::json!({ "style": "style_3" })));
    let mut batched = false;
    for round in 0..5 {
        for e in &mut els {
            e.push();
        }
        let outs: Vec<Vec<u8>> = els.iter_mut().map(|e| e.pull()).collect();
        assert_close(&outs[0], &want[0], "member 0 after member 1's change");
        assert_close(&outs[1], &style3, "member 1: style 3");
        assert_close(&outs[2], &want[2], "member 2 after member 1's change");
        let s = els[1].ai.property::<gst::Structure>("stats");
        if s.get::<u32>("batch-size").unwrap() == 3 {
            assert_eq!(s.get::<u32>("batch-forwards").unwrap(), 1);
            batched = true;
            break;
        }
        println!("round {round} after the change: not one batch; again");
    }
    assert!(batched, "no batch of 3 after the change");
    for e in &els {
        e.no_warnings();
    }
}
