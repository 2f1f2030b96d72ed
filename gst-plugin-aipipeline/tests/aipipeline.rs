// SPDX-License-Identifier: MPL-2.0
//! `aipipeline` element tests: real pipelines (appsrc ! aipipeline ! fakesink with a recording
//! probe, videotestsrc ! videoconvert ! aipipeline ! fakesink), the committed TorchScript test
//! models and manifests (testdata/pipelines), exact or ±1 pixel checks.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::{Announcement, caps, init, testdata};
use gst::prelude::*;

const TIMEOUT: Duration = Duration::from_secs(30);

fn model(name: &str) -> String {
    testdata().join(name).to_string_lossy().into_owned()
}

fn temp_file(tag: &str, contents: &[u8]) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "aipipeline-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&p, contents).unwrap();
    p
}

/// What reached the sink, in order.
enum Rec {
    Caps(gst::Caps),
    Buffer {
        pts: Option<gst::ClockTime>,
        duration: Option<gst::ClockTime>,
        data: Vec<u8>,
    },
    Loading(gst::Structure),
    Online(gst::Structure),
    Eos,
}

impl std::fmt::Debug for Rec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rec::Caps(c) => write!(f, "Caps({c})"),
            Rec::Buffer { pts, data, .. } => write!(f, "Buffer({pts:?}, {} bytes)", data.len()),
            Rec::Loading(s) => write!(f, "Loading({s})"),
            Rec::Online(s) => write!(f, "Online({s})"),
            Rec::Eos => write!(f, "Eos"),
        }
    }
}

struct Rig {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    el: gst::Element,
    rx: mpsc::Receiver<Rec>,
    bus: gst::Bus,
}

/// appsrc ! aipipeline (props) ! fakesink, recording caps, buffers and our events in order.
fn rig(props: &[(&str, &str)], in_caps: &gst::Caps) -> Rig {
    rig_with(props, in_caps, None)
}

/// Like `rig`, with `videoconvert ! video/x-raw,format=<convert>` before aipipeline.
fn rig_with(props: &[(&str, &str)], in_caps: &gst::Caps, convert: Option<&str>) -> Rig {
    init();
    let pipeline = gst::Pipeline::new();
    let src = gst_app::AppSrc::builder()
        .caps(in_caps)
        .format(gst::Format::Time)
        .build();
    let el = gst::ElementFactory::make("aipipeline").build().unwrap();
    for (k, v) in props {
        el.set_property_from_str(k, v);
    }
    let sink = gst::ElementFactory::make("fakesink")
        .property("sync", false)
        .build()
        .unwrap();
    let mut chain: Vec<gst::Element> = vec![src.clone().upcast()];
    if let Some(format) = convert {
        chain.push(gst::ElementFactory::make("videoconvert").build().unwrap());
        chain.push(
            gst::ElementFactory::make("capsfilter")
                .property(
                    "caps",
                    gst::Caps::builder("video/x-raw")
                        .field("format", format)
                        .build(),
                )
                .build()
                .unwrap(),
        );
    }
    chain.push(el.clone());
    chain.push(sink.clone());
    pipeline.add_many(&chain).unwrap();
    gst::Element::link_many(&chain).unwrap();
    let (tx, rx) = mpsc::channel();
    sink.static_pad("sink").unwrap().add_probe(
        gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM,
        move |_, info| {
            let rec = match &info.data {
                Some(gst::PadProbeData::Buffer(b)) => Some(Rec::Buffer {
                    pts: b.pts(),
                    duration: b.duration(),
                    data: b.map_readable().unwrap().to_vec(),
                }),
                Some(gst::PadProbeData::Event(e)) => match e.view() {
                    gst::EventView::Caps(c) => Some(Rec::Caps(c.caps_owned())),
                    gst::EventView::Eos(_) => Some(Rec::Eos),
                    _ => common::announcement(e).map(|a| match a {
                        Announcement::Loading(s) => Rec::Loading(s),
                        Announcement::Online(s) => Rec::Online(s),
                    }),
                },
                _ => None,
            };
            if let Some(r) = rec {
                let _ = tx.send(r);
            }
            gst::PadProbeReturn::Ok
        },
    );
    let bus = pipeline.bus().unwrap();
    Rig {
        pipeline,
        src,
        el,
        rx,
        bus,
    }
}

impl Rig {
    fn play(&self) {
        if self.pipeline.set_state(gst::State::Playing).is_err() {
            let err = self.wait_message(gst::MessageType::Error);
            panic!("pipeline failed to start: {err:?}");
        }
    }

    fn push(&self, buf: gst::Buffer) {
        self.src.push_buffer(buf).unwrap();
    }

    fn next(&self) -> Rec {
        self.rx
            .recv_timeout(TIMEOUT)
            .expect("nothing reached the sink in time")
    }

    /// Next buffer (skipping caps), with the output caps in force.
    fn next_buffer(&self) -> Vec<u8> {
        loop {
            match self.next() {
                Rec::Buffer { data, .. } => return data,
                Rec::Caps(_) => {}
                other => panic!("expected a buffer, got {other:?}"),
            }
        }
    }

    fn wait_message(&self, t: gst::MessageType) -> gst::Message {
        self.bus
            .timed_pop_filtered(gst::ClockTime::from_seconds(30), &[t])
            .unwrap_or_else(|| panic!("no {t:?} message in time"))
    }

    fn warning_text(&self) -> String {
        let msg = self.wait_message(gst::MessageType::Warning);
        match msg.view() {
            gst::MessageView::Warning(w) => format!("{} {:?}", w.error(), w.debug()),
            _ => unreachable!(),
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Tightly packed RGB (widths here keep rows 4-byte aligned).
fn rgb_buffer(w: u32, h: u32, pts_ms: u64, f: impl Fn(u32, u32) -> [u8; 3]) -> gst::Buffer {
    assert_eq!(w * 3 % 4, 0);
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&f(x, y));
        }
    }
    let mut buf = gst::Buffer::from_mut_slice(data);
    {
        let b = buf.get_mut().unwrap();
        b.set_pts(gst::ClockTime::from_mseconds(pts_ms));
        b.set_duration(gst::ClockTime::from_mseconds(41));
    }
    buf
}

fn pattern(x: u32, y: u32) -> [u8; 3] {
    [
        (x * 7 + y) as u8,
        (y * 3 + x / 2) as u8,
        ((x ^ y) * 5) as u8,
    ]
}

fn px(data: &[u8], w: u32, x: u32, y: u32) -> [u8; 3] {
    let o = ((y * w + x) * 3) as usize;
    [data[o], data[o + 1], data[o + 2]]
}

fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (*x as i32 - y as i32).abs() <= tol)
}

fn assert_all(data: &[u8], w: u32, h: u32, tol: i32, expect: impl Fn(u32, u32) -> [u8; 3]) {
    for y in 0..h {
        for x in 0..w {
            let got = px(data, w, x, y);
            let want = expect(x, y);
            assert!(
                close(got, want, tol),
                "pixel ({x},{y}): got {got:?}, want {want:?}"
            );
        }
    }
}

const S384: &str = r#"{"width": 384, "height": 384}"#;

#[test]
fn noop_is_bit_exact_and_keeps_timestamps() {
    let r = rig(
        &[("pipeline", "noop"), ("params", S384)],
        &caps("RGB", 384, 384),
    );
    r.play();
    r.push(rgb_buffer(384, 384, 1000, pattern));
    let mut got = None;
    while got.is_none() {
        match r.next() {
            Rec::Buffer {
                pts,
                duration,
                data,
            } => got = Some((pts, duration, data)),
            Rec::Caps(c) => {
                let s = c.structure(0).unwrap();
                assert_eq!(s.get::<&str>("format").unwrap(), "RGB");
                assert_eq!(s.get::<i32>("width").unwrap(), 384);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (pts, duration, data) = got.unwrap();
    assert_eq!(pts, Some(gst::ClockTime::from_mseconds(1000)));
    assert_eq!(duration, Some(gst::ClockTime::from_mseconds(41)));
    assert_eq!(
        data,
        rgb_buffer(384, 384, 0, pattern)
            .map_readable()
            .unwrap()
            .as_slice()
    );
}

#[test]
fn bgrx_input_is_converted_exactly() {
    let r = rig(&[("params", S384)], &caps("BGRx", 384, 384));
    r.play();
    let mut data = Vec::new();
    for y in 0..384 {
        for x in 0..384 {
            let [rr, g, b] = pattern(x, y);
            data.extend_from_slice(&[b, g, rr, 0xAA]);
        }
    }
    r.push(gst::Buffer::from_mut_slice(data));
    let out = r.next_buffer();
    assert_all(&out, 384, 384, 0, pattern);
}

#[test]
fn cover_crop_picks_the_centre_of_a_wide_frame() {
    // 640x480 with thirds red | green | blue; 384x384 output covers the centre 480x480.
    let third = |x: u32| match x {
        0..214 => [200, 10, 10],
        214..427 => [10, 200, 10],
        _ => [10, 10, 200],
    };
    let r = rig(&[("params", S384)], &caps("RGB", 640, 480));
    r.play();
    r.push(rgb_buffer(640, 480, 0, |x, _| third(x)));
    let out = r.next_buffer();
    assert_eq!(out.len(), 384 * 384 * 3);
    // Source column sx maps to output column (sx - 80) * 0.8.
    for y in [0, 100, 383] {
        for x in (0..100).chain(120..250).chain(280..384) {
            let want = if x < 100 {
                [200, 10, 10]
            } else if x < 250 {
                [10, 200, 10]
            } else {
                [10, 10, 200]
            };
            assert!(
                close(px(&out, 384, x, y), want, 1),
                "({x},{y}) {:?}",
                px(&out, 384, x, y)
            );
        }
    }
}

#[test]
fn invert_model_gives_255_minus_x() {
    for pipeline in ["invert", "invert_nchw"] {
        let dir = testdata().to_string_lossy().into_owned();
        let r = rig(
            &[("pipelines-dir", &dir), ("pipeline", pipeline)],
            &caps("RGB", 384, 384),
        );
        r.play();
        r.push(rgb_buffer(384, 384, 0, pattern));
        let out = r.next_buffer();
        assert_all(&out, 384, 384, 1, |x, y| pattern(x, y).map(|v| 255 - v));
    }
}

#[test]
fn convnet_matches_bare_forward() {
    let dir = testdata().to_string_lossy().into_owned();
    let r = rig(
        &[
            ("pipelines-dir", &dir),
            ("pipeline", "convnet"),
            ("params", S384),
        ],
        &caps("RGB", 384, 384),
    );
    r.play();
    let input = rgb_buffer(384, 384, 0, pattern);
    r.push(input.clone());
    let out = r.next_buffer();
    // Reference: the same model through tch directly.
    let m = tch::CModule::load(model("convnet.pt")).unwrap();
    let map = input.map_readable().unwrap();
    let x = tch::Tensor::from_slice(map.as_slice())
        .view([1, 384, 384, 3])
        .to_kind(tch::Kind::Float)
        / 255.0;
    let y = tch::no_grad(|| m.forward_ts(&[x]).unwrap());
    let y = (y.clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(tch::Kind::Uint8);
    let want = Vec::<u8>::try_from(y.flatten(0, -1)).unwrap();
    let diff = out
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(diff <= 1, "max difference {diff}");
    // And it is not an identity.
    assert_ne!(out, map.as_slice());
}

#[test]
fn params_change_applies_on_the_next_frame() {
    let dir = testdata().to_string_lossy().into_owned();
    let r = rig(
        &[("pipelines-dir", &dir), ("pipeline", "gain")],
        &caps("RGB", 384, 384),
    );
    r.play();
    r.push(rgb_buffer(384, 384, 0, pattern));
    let out = r.next_buffer();
    assert_all(&out, 384, 384, 1, pattern);
    r.el.set_property("params", r#"{"gain": 0.5, "bias": [0.2, 0.0, 0.0]}"#);
    r.push(rgb_buffer(384, 384, 41, pattern));
    let out = r.next_buffer();
    assert_all(&out, 384, 384, 1, |x, y| {
        let p = pattern(x, y);
        let f =
            |v: u8, b: f32| ((v as f32 / 255.0 * 0.5 + b).clamp(0.0, 1.0) * 255.0).round() as u8;
        [f(p[0], 0.2), f(p[1], 0.0), f(p[2], 0.0)]
    });
    // A fast change sends no loading event.
    assert!(r.rx.try_recv().is_err());
}

/// Pushes frames until `online` has been seen and `after` real frames followed it; returns the
/// records in order.
fn run_until_online(r: &Rig, w: u32, after: usize) -> Vec<Rec> {
    let mut recs = Vec::new();
    let mut pts = 100;
    let mut online_at = None;
    loop {
        pts += 41;
        r.push(rgb_buffer(w, w, pts, pattern));
        // One record at least per pushed frame (the mailbox may replace a waiting frame, so
        // wait for a record rather than for one buffer per frame).
        let rec = r.next();
        recs.push(rec);
        while let Ok(rec) = r.rx.try_recv() {
            recs.push(rec);
        }
        if online_at.is_none() {
            online_at = recs.iter().position(|r| matches!(r, Rec::Online(_)));
        }
        if let Some(i) = online_at {
            let buffers = recs[i..]
                .iter()
                .filter(|r| matches!(r, Rec::Buffer { .. }))
                .count();
            if buffers >= after {
                return recs;
            }
        }
        assert!(recs.len() < 10_000, "no online event");
    }
}

#[test]
fn reload_to_another_model_keeps_flowing_with_loading_then_online() {
    let r = rig(
        &[
            ("pipeline", "torchscript"),
            ("model", &model("identity.pt")),
            ("params", S384),
        ],
        &caps("RGB", 384, 384),
    );
    r.play();
    r.push(rgb_buffer(384, 384, 0, pattern));
    assert_all(&r.next_buffer(), 384, 384, 1, pattern);
    let json = format!(
        r#"{{"width": 384, "height": 384, "model": "{}", "show_reloading_frame": false}}"#,
        model("invert.pt")
    );
    r.el.set_property("params", json.as_str());
    let recs = run_until_online(&r, 384, 2);
    let loading = recs
        .iter()
        .position(|r| matches!(r, Rec::Loading(_)))
        .expect("no loading event");
    let online = recs
        .iter()
        .position(|r| matches!(r, Rec::Online(_)))
        .unwrap();
    assert!(loading < online);
    let Rec::Loading(s) = &recs[loading] else {
        unreachable!()
    };
    assert_eq!(s.get::<&str>("pipeline").unwrap(), "torchscript");
    assert_eq!(s.get::<&str>("reason").unwrap(), "reload");
    assert!(!s.get::<bool>("show-picture").unwrap());
    for (i, rec) in recs.iter().enumerate() {
        if let Rec::Buffer { data, .. } = rec {
            if i < loading {
                assert_all(data, 384, 384, 1, pattern); // old model
            } else if i < online {
                assert_all(data, 384, 384, 0, pattern); // passed through unprocessed
            } else {
                assert_all(data, 384, 384, 1, |x, y| pattern(x, y).map(|v| 255 - v));
            }
        }
    }
    let Rec::Online(s) = &recs[online] else {
        unreachable!()
    };
    assert_eq!(s.get::<&str>("pipeline").unwrap(), "torchscript");
    // The first thing after online is a real frame.
    assert!(matches!(recs[online + 1], Rec::Buffer { .. }));
    assert_eq!(
        r.el.property::<gstaipipeline::Status>("status"),
        gstaipipeline::Status::Ready
    );
}

#[test]
fn reload_to_another_size_renegotiates_and_keeps_flowing() {
    let dir = testdata().to_string_lossy().into_owned();
    let r = rig(
        &[("pipelines-dir", &dir), ("pipeline", "invert")],
        &caps("RGB", 640, 640),
    );
    r.play();
    r.push(rgb_buffer(640, 640, 0, |_, _| [40, 80, 120]));
    assert_eq!(r.next_buffer().len(), 384 * 384 * 3);
    r.el.set_property("params", r#"{"width": 448, "height": 448}"#);
    let mut recs = Vec::new();
    let mut pts = 0;
    while !recs.iter().any(|r| matches!(r, Rec::Online(_)))
        || !matches!(recs.last(), Some(Rec::Buffer { .. }))
    {
        pts += 41;
        r.push(rgb_buffer(640, 640, pts, |_, _| [40, 80, 120]));
        recs.push(r.next());
        while let Ok(rec) = r.rx.try_recv() {
            recs.push(rec);
        }
    }
    let loading = recs
        .iter()
        .position(|r| matches!(r, Rec::Loading(_)))
        .unwrap();
    let online = recs
        .iter()
        .position(|r| matches!(r, Rec::Online(_)))
        .unwrap();
    let Rec::Loading(s) = &recs[loading] else {
        unreachable!()
    };
    assert!(s.get::<bool>("show-picture").unwrap());
    let new_caps = recs
        .iter()
        .position(
            |r| matches!(r, Rec::Caps(c) if c.structure(0).unwrap().get::<i32>("width") == Ok(448)),
        )
        .expect("no caps at the new size");
    assert!(new_caps > loading && new_caps < online);
    for rec in &recs[loading..] {
        if let Rec::Buffer { data, .. } = rec {
            assert_eq!(data.len(), 448 * 448 * 3);
        }
    }
    let Some(Rec::Buffer { data, .. }) = recs.last() else {
        unreachable!()
    };
    assert_all(data, 448, 448, 1, |_, _| [215, 175, 135]);
}

#[test]
fn eos_drains_the_last_frame_first() {
    let r = rig(&[("params", S384)], &caps("RGB", 384, 384));
    r.play();
    for i in 0..5u64 {
        r.push(rgb_buffer(384, 384, i * 41, |_, _| [i as u8; 3]));
    }
    r.src.end_of_stream().unwrap();
    let mut last = None;
    loop {
        match r.next() {
            Rec::Buffer { data, .. } => last = Some(data[0]),
            Rec::Eos => break,
            _ => {}
        }
    }
    assert_eq!(
        last,
        Some(4),
        "the last frame before EOS must come out before EOS"
    );
    r.wait_message(gst::MessageType::Eos);
}

#[test]
fn device_auto_falls_back_to_cpu_and_cuda_is_a_clear_error() {
    init();
    let cuda = gstaipipeline::device::cuda_available();
    let r = rig(
        &[("device", "auto"), ("params", S384)],
        &caps("RGB", 384, 384),
    );
    r.play();
    r.push(rgb_buffer(384, 384, 0, pattern));
    assert_all(&r.next_buffer(), 384, 384, 0, pattern);
    let stats = r.el.property::<gst::Structure>("stats");
    let dev = stats.get::<String>("device").unwrap();
    if cuda {
        assert!(dev.starts_with("cuda"), "{dev}");
        println!("CUDA present: device=cuda error case skipped");
        return;
    }
    assert!(dev.starts_with("cpu"), "{dev}");
    let r = rig(&[("device", "cuda")], &caps("RGB", 384, 384));
    assert!(r.pipeline.set_state(gst::State::Playing).is_err());
    let msg = r.wait_message(gst::MessageType::Error);
    let gst::MessageView::Error(e) = msg.view() else {
        unreachable!()
    };
    let text = e.error().to_string();
    assert!(
        text.contains("device=cuda") && text.contains("CUDA is not available"),
        "{text}"
    );
    assert_eq!(
        r.el.property::<gstaipipeline::Status>("status"),
        gstaipipeline::Status::Error
    );
}

fn start_error(props: &[(&str, &str)]) -> String {
    let r = rig(props, &caps("RGB", 384, 384));
    assert!(r.pipeline.set_state(gst::State::Playing).is_err());
    let msg = r.wait_message(gst::MessageType::Error);
    let gst::MessageView::Error(e) = msg.view() else {
        unreachable!()
    };
    e.error().to_string()
}

#[test]
fn bad_configuration_fails_start_with_a_clear_error() {
    let missing = "/nonexistent/rivulet/model.pt";
    let text = start_error(&[("pipeline", "torchscript"), ("model", missing)]);
    assert!(
        text.contains(missing) && text.contains("does not exist"),
        "{text}"
    );

    let corrupt = temp_file("corrupt.pt", b"this is not a TorchScript archive");
    let text = start_error(&[
        ("pipeline", "torchscript"),
        ("model", &corrupt.to_string_lossy()),
    ]);
    assert!(text.contains("cannot load TorchScript model"), "{text}");
    assert!(text.contains(&*corrupt.to_string_lossy()), "{text}");
    let _ = std::fs::remove_file(corrupt);

    let dir = testdata().to_string_lossy().into_owned();
    let text = start_error(&[("pipelines-dir", &dir), ("pipeline", "badshape")]);
    assert!(
        text.contains("shape") && text.contains("badshape.pt"),
        "{text}"
    );

    let text = start_error(&[
        ("pipeline", "torchscript"),
        ("model", &model("baddtype.pt")),
    ]);
    assert!(
        text.contains("dtype") && text.contains("baddtype.pt"),
        "{text}"
    );

    let text = start_error(&[("pipelines-dir", &dir), ("pipeline", "nosuchpipeline")]);
    assert!(
        text.contains("Unknown pipeline 'nosuchpipeline'") && text.contains("invert"),
        "{text}"
    );

    let text = start_error(&[("pipeline", "torchscript")]);
    assert!(text.contains("needs a TorchScript model"), "{text}");

    let text = start_error(&[("params", r#"{"width": 1000}"#)]);
    assert!(
        text.contains("width") && text.contains("out of range"),
        "{text}"
    );
}

#[test]
fn bad_params_while_playing_warn_and_keep_the_previous_ones() {
    let dir = testdata().to_string_lossy().into_owned();
    let r = rig(
        &[
            ("pipelines-dir", &dir),
            ("pipeline", "gain"),
            ("params", r#"{"gain": 0.5}"#),
        ],
        &caps("RGB", 384, 384),
    );
    r.play();
    let half = |x, y| pattern(x, y).map(|v| ((v as f32 * 0.5).round()) as u8);
    for (i, (bad, needle)) in [
        ("{not json", "not valid JSON"),
        (r#"{"width": 1000}"#, "out of range"),
        (r#"{"width": 500}"#, "multiple of 64"),
        (r#"{"gain": "loud"}"#, "params.gain must be a number"),
        (
            r#"{"bias": [1, 2]}"#,
            "params.bias must be an array of 3 numbers",
        ),
        ("[1, 2]", "must be a JSON object"),
    ]
    .into_iter()
    .enumerate()
    {
        r.el.set_property("params", bad);
        let text = r.warning_text();
        assert!(text.contains(needle), "{bad}: {text}");
        assert_eq!(r.el.property::<String>("params"), r#"{"gain": 0.5}"#);
        r.push(rgb_buffer(384, 384, i as u64 * 41, pattern));
        assert_all(&r.next_buffer(), 384, 384, 1, half);
    }
}

#[test]
fn failed_reload_warns_and_reverts_while_the_stream_goes_on() {
    let r = rig(
        &[
            ("pipeline", "torchscript"),
            ("model", &model("invert.pt")),
            ("params", S384),
        ],
        &caps("RGB", 384, 384),
    );
    r.play();
    let inverted = |x, y| pattern(x, y).map(|v| 255 - v);
    r.push(rgb_buffer(384, 384, 0, pattern));
    assert_all(&r.next_buffer(), 384, 384, 1, inverted);
    for (tag, path) in [
        (
            "corrupt",
            temp_file("corrupt2.pt", b"garbage")
                .to_string_lossy()
                .into_owned(),
        ),
        ("badshape", model("badshape.pt")),
        ("missing", "/nonexistent/x.pt".to_owned()),
    ] {
        let json = format!(r#"{{"width": 384, "height": 384, "model": "{path}"}}"#);
        r.el.set_property("params", json.as_str());
        let recs = run_until_online(&r, 384, 1);
        assert!(recs.iter().any(|r| matches!(r, Rec::Loading(_))), "{tag}");
        let text = r.warning_text();
        assert!(
            text.contains("Reload of pipeline 'torchscript' failed") && text.contains(&path),
            "{tag}: {text}"
        );
        let Some(Rec::Buffer { data, .. }) = recs.last() else {
            panic!("{tag}: no frame")
        };
        assert_all(data, 384, 384, 1, inverted);
        assert!(!r.el.property::<String>("params").contains(&path));
        if tag == "corrupt" {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// `aipipeline pipeline=convnet` at 384×384 in a Harness with RGB 384×384 input caps set.
fn convnet_harness() -> (gst::Element, gst_check::Harness) {
    let dir = testdata().to_string_lossy().into_owned();
    let el = gst::ElementFactory::make("aipipeline")
        .property("pipelines-dir", dir.as_str())
        .property("pipeline", "convnet")
        .property("params", S384)
        .build()
        .unwrap();
    let mut h = gst_check::Harness::with_element(&el, Some("sink"), Some("src"));
    h.set_src_caps(caps("RGB", 384, 384));
    (el, h)
}

#[test]
fn latency_query_adds_processing_latency() {
    init();
    let (el, mut h) = convnet_harness();
    h.set_upstream_latency(gst::ClockTime::from_mseconds(10));
    h.push(rgb_buffer(384, 384, 0, pattern)).unwrap();
    let out = h.pull().unwrap();
    assert_eq!(out.pts(), Some(gst::ClockTime::ZERO));
    let mut q = gst::query::Latency::new();
    assert!(el.static_pad("src").unwrap().query(&mut q));
    let (_live, min, _max) = q.result();
    assert!(min > gst::ClockTime::from_mseconds(10), "min latency {min}");
}

#[test]
fn real_pipeline_posts_stats_and_reaches_eos() {
    init();
    let pipeline = common::launch(
        "videotestsrc num-buffers=12 ! video/x-raw,width=320,height=240,framerate=24/1 ! videoconvert \
         ! aipipeline name=ai stats-interval-ms=50 ! videoconvert ! fakesink",
    );
    let ai = pipeline.by_name("ai").unwrap();
    ai.set_property("params", S384);
    let (tx, rx) = mpsc::channel();
    ai.connect_notify(Some("stats"), move |_, _| {
        let _ = tx.send(());
    });
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let mut stats = None;
    loop {
        let msg = bus
            .timed_pop_filtered(
                gst::ClockTime::from_seconds(30),
                &[
                    gst::MessageType::Element,
                    gst::MessageType::Eos,
                    gst::MessageType::Error,
                ],
            )
            .expect("no EOS in time");
        match msg.view() {
            gst::MessageView::Element(e) => {
                if let Some(s) = e
                    .structure()
                    .filter(|s| s.name() == gstaipipeline::STATS_MESSAGE)
                {
                    stats = Some(s.to_owned());
                }
            }
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => panic!("{} {:?}", e.error(), e.debug()),
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    let s = stats.expect("no aipipeline-stats message");
    assert_eq!(s.get::<u64>("frames-in").unwrap(), 12);
    let out = s.get::<u64>("frames-out").unwrap();
    let drops = s.get::<u64>("queue-drops").unwrap();
    assert_eq!(out + drops, 12);
    for f in [
        "input-fps",
        "output-fps",
        "inference-latency-p50-ms",
        "inference-latency-p95-ms",
    ] {
        assert!(s.get::<f64>(f).unwrap() >= 0.0, "{f}");
    }
    assert_eq!(s.get::<u64>("errors").unwrap(), 0);
    rx.recv_timeout(TIMEOUT).expect("no stats notify");
}

#[test]
fn flush_clears_the_mailbox_and_the_stream_resumes() {
    init();
    let el = gst::ElementFactory::make("aipipeline")
        .property("params", S384)
        .build()
        .unwrap();
    let mut h = gst_check::Harness::with_element(&el, Some("sink"), Some("src"));
    h.set_src_caps(caps("RGB", 384, 384));
    h.push(rgb_buffer(384, 384, 0, pattern)).unwrap();
    assert_eq!(h.pull().unwrap().pts(), Some(gst::ClockTime::ZERO));
    assert!(h.push_event(gst::event::FlushStart::new()));
    assert_eq!(
        h.push(rgb_buffer(384, 384, 41, pattern)),
        Err(gst::FlowError::Flushing)
    );
    assert!(h.push_event(gst::event::FlushStop::new(true)));
    let segment = gst::FormattedSegment::<gst::ClockTime>::new();
    assert!(h.push_event(gst::event::Segment::new(&segment)));
    h.push(rgb_buffer(384, 384, 82, pattern)).unwrap();
    let out = h.pull().unwrap();
    assert_eq!(out.pts(), Some(gst::ClockTime::from_mseconds(82)));
    assert_all(&out.map_readable().unwrap(), 384, 384, 0, pattern);
}

#[test]
fn restarts_after_ready_with_new_settings() {
    let dir = testdata().to_string_lossy().into_owned();
    let r = rig(
        &[("pipelines-dir", &dir), ("params", S384)],
        &caps("RGB", 384, 384),
    );
    r.play();
    r.push(rgb_buffer(384, 384, 0, pattern));
    assert_all(&r.next_buffer(), 384, 384, 0, pattern);
    r.pipeline.set_state(gst::State::Null).unwrap();
    while r.rx.try_recv().is_ok() {}
    r.el.set_property("pipeline", "invert");
    r.play();
    r.push(rgb_buffer(384, 384, 0, pattern));
    assert_all(&r.next_buffer(), 384, 384, 1, |x, y| {
        pattern(x, y).map(|v| 255 - v)
    });
}

#[test]
fn manifest_extra_inputs_and_status_notify() {
    // A manifest written by the test in its own directory: adding a model needs no code.
    let dir = std::env::temp_dir().join(format!("aipipeline-test-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("brighten.toml"),
        format!(
            "name = \"brighten\"\nmodel = \"{}\"\nwidth = 384\nheight = 384\n\
             [params]\ngain = 1.0\nbias = [0.25, 0.25, 0.25]\n\
             [[inputs]]\nparam = \"gain\"\nkind = \"scalar\"\n\
             [[inputs]]\nparam = \"bias\"\nkind = \"vector\"\nlen = 3\n",
            model("gain.pt")
        ),
    )
    .unwrap();
    std::fs::write(dir.join("broken.toml"), "name = 3").unwrap();
    let r = rig(
        &[
            ("pipelines-dir", &dir.to_string_lossy()),
            ("pipeline", "brighten"),
        ],
        &caps("RGB", 384, 384),
    );
    let (tx, rx) = mpsc::channel();
    r.el.connect_notify(Some("status"), move |el, _| {
        let _ = tx.send(el.property::<gstaipipeline::Status>("status"));
    });
    r.play();
    // The broken manifest is reported, the good one works.
    assert!(r.warning_text().contains("broken.toml"));
    let seen: Vec<_> = rx.try_iter().collect();
    assert!(seen.contains(&gstaipipeline::Status::Ready), "{seen:?}");
    r.push(rgb_buffer(384, 384, 0, |_, _| [100, 100, 100]));
    assert_all(&r.next_buffer(), 384, 384, 1, |_, _| [164, 164, 164]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn i420_and_nv12_are_converted_on_the_device() {
    const COLOURS: [[u8; 3]; 8] = [
        [200, 30, 30],
        [30, 200, 30],
        [30, 30, 200],
        [220, 220, 40],
        [128, 128, 128],
        [20, 20, 20],
        [235, 235, 235],
        [90, 160, 210],
    ];
    let block = |bx: u32, by: u32| COLOURS[((bx + by * 4) % 8) as usize];
    for format in ["I420", "NV12"] {
        // RGB 640x480 -> videoconvert -> YUV 4:2:0 -> aipipeline (cover+crop to the centre
        // 480x480, scaled to 384x384) -> RGB. The centre holds 4x4 blocks of 120 px.
        let r = rig_with(&[("params", S384)], &caps("RGB", 640, 480), Some(format));
        r.play();
        r.push(rgb_buffer(640, 480, 0, |x, y| {
            if (80..560).contains(&x) {
                block((x - 80) / 120, y / 120)
            } else {
                [0, 0, 0]
            }
        }));
        let out = r.next_buffer();
        let in_caps = r.el.static_pad("sink").unwrap().current_caps().unwrap();
        assert_eq!(
            in_caps.structure(0).unwrap().get::<&str>("format").unwrap(),
            format
        );
        for y in 0..384 {
            for x in 0..384 {
                // Skip pixels near block edges (chroma subsampling and scaling blur them).
                if x % 96 < 4 || x % 96 > 91 || y % 96 < 4 || y % 96 > 91 {
                    continue;
                }
                let want = block(x / 96, y / 96);
                let got = px(&out, 384, x, y);
                assert!(
                    close(got, want, 4),
                    "{format} ({x},{y}): got {got:?}, want {want:?}"
                );
            }
        }
    }
}

#[test]
fn drain_query_waits_for_the_mailbox() {
    init();
    let (el, mut h) = convnet_harness();
    for i in 0..3u64 {
        h.push(rgb_buffer(384, 384, i * 41, pattern)).unwrap();
    }
    // Once the drain query returns, every frame is out (or was replaced): nothing is held.
    let mut q = gst::query::Drain::new();
    assert!(el.static_pad("sink").unwrap().query(&mut q));
    let stats = el.property::<gst::Structure>("stats");
    let out = stats.get::<u64>("frames-out").unwrap();
    let drops = stats.get::<u64>("queue-drops").unwrap();
    assert_eq!(out + drops, 3);
    assert_eq!(h.buffers_in_queue(), out as u32);
}

#[test]
fn a_failing_frame_is_reported_and_skipped_and_the_stream_goes_on() {
    let dir = testdata().to_string_lossy().into_owned();
    let r = rig(
        &[("pipelines-dir", &dir), ("pipeline", "failsbright")],
        &caps("RGB", 384, 384),
    );
    r.play();
    let dark = |_, _| [40u8, 60, 80];
    r.push(rgb_buffer(384, 384, 0, dark));
    assert_all(&r.next_buffer(), 384, 384, 1, dark);
    // Bright frame: the model fails at run time (index out of range).
    r.push(rgb_buffer(384, 384, 41, |_, _| [250, 250, 250]));
    let text = r.warning_text();
    assert!(
        text.contains("Pipeline 'failsbright' failed on a frame") && text.contains("frame skipped"),
        "{text}"
    );
    r.push(rgb_buffer(384, 384, 82, dark));
    let mut got = None;
    while got.is_none() {
        match r.next() {
            Rec::Buffer { pts, data, .. } => got = Some((pts, data)),
            Rec::Caps(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let (pts, data) = got.unwrap();
    assert_eq!(
        pts,
        Some(gst::ClockTime::from_mseconds(82)),
        "the failed frame must be skipped"
    );
    assert_all(&data, 384, 384, 1, dark);
    let stats = r.el.property::<gst::Structure>("stats");
    assert_eq!(stats.get::<u64>("errors").unwrap(), 1);
}

#[test]
fn noop_applies_a_new_size_at_once_without_loading_events() {
    let r = rig(&[("params", S384)], &caps("RGB", 640, 640));
    r.play();
    r.push(rgb_buffer(640, 640, 0, |_, _| [1, 2, 3]));
    assert_eq!(r.next_buffer().len(), 384 * 384 * 3);
    r.el.set_property("params", r#"{"width": 448, "height": 512}"#);
    r.push(rgb_buffer(640, 640, 41, |_, _| [1, 2, 3]));
    let mut recs = Vec::new();
    loop {
        let rec = r.next();
        let done = matches!(rec, Rec::Buffer { .. });
        recs.push(rec);
        if done {
            break;
        }
    }
    assert!(
        matches!(&recs[0], Rec::Caps(c) if c.structure(0).unwrap().get::<i32>("width") == Ok(448)
            && c.structure(0).unwrap().get::<i32>("height") == Ok(512)),
        "{recs:?}"
    );
    assert_eq!(recs.len(), 2, "no loading/online events for noop: {recs:?}");
    let Some(Rec::Buffer { data, .. }) = recs.last() else {
        unreachable!()
    };
    assert_eq!(data.len(), 448 * 512 * 3);
    assert_all(data, 448, 512, 0, |_, _| [1, 2, 3]);
}

/// Writes a TorchScript model computing 1 - x slowly (many element-wise ops), so that its
/// warm-up at 1024x1024 takes far longer than passing a frame through.
fn slow_invert_model() -> PathBuf {
    let path = temp_file("slow-invert.pt", b"");
    let mut f = |xs: &[tch::Tensor]| {
        let mut y = xs[0].shallow_clone();
        for _ in 0..40 {
            y = (y + 1.0) - 1.0;
        }
        vec![y.neg() + 1.0]
    };
    let x = tch::Tensor::zeros([1, 8, 8, 3], (tch::Kind::Float, tch::Device::Cpu));
    let m = tch::CModule::create_by_tracing("SlowInvert", "forward", &[x], &mut f).unwrap();
    m.save(&path).unwrap();
    path
}

#[test]
fn frames_pass_through_unprocessed_at_the_new_size_while_loading() {
    let slow = slow_invert_model();
    let r = rig(
        &[
            ("pipeline", "torchscript"),
            ("model", &model("identity.pt")),
            ("params", S384),
        ],
        &caps("RGB", 1024, 1024),
    );
    r.play();
    let input = |x: u32, y: u32| [(x / 4) as u8, (y / 4) as u8, 77];
    r.push(rgb_buffer(1024, 1024, 0, input));
    assert_eq!(r.next_buffer().len(), 384 * 384 * 3);
    let json = format!(
        r#"{{"width": 1024, "height": 1024, "model": "{}"}}"#,
        slow.display()
    );
    r.el.set_property("params", json.as_str());
    // The next frame comes out at once while the slow model warms up (3 runs at 1024x1024):
    // the loading event, caps at the new size, then the frame, unprocessed.
    r.push(rgb_buffer(1024, 1024, 41, input));
    let mut recs = Vec::new();
    while !matches!(recs.last(), Some(Rec::Buffer { .. })) {
        recs.push(r.next());
    }
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert!(matches!(&recs[0], Rec::Loading(_)), "{recs:?}");
    assert!(
        matches!(&recs[1], Rec::Caps(c) if c.structure(0).unwrap().get::<i32>("width") == Ok(1024)),
        "{recs:?}"
    );
    let Some(Rec::Buffer { data, .. }) = recs.last() else {
        unreachable!()
    };
    assert_all(data, 1024, 1024, 0, input);
    let passthrough =
        r.el.property::<gst::Structure>("stats")
            .get::<u64>("frames-passthrough")
            .unwrap();
    assert!(passthrough >= 1);
    // Then the new model comes online and its output follows.
    let recs = run_until_online(&r, 1024, 1);
    let Some(Rec::Buffer { data, .. }) = recs.last() else {
        unreachable!()
    };
    assert_all(data, 1024, 1024, 1, |x, y| pattern(x, y).map(|v| 255 - v));
    let _ = std::fs::remove_file(slow);
}

/// `noop` at the input's size gives a YUV input back in its own format, the very same memory
/// (no conversion, no copy: the daemon's decoder output reaches x264 as it is); `noop` at
/// another size still outputs RGB (as model pipelines always do).
#[test]
fn noop_passes_yuv_through_in_its_own_format_without_a_copy() {
    init();
    for (format, params, same) in [
        ("I420", S384, true),
        ("NV12", S384, true),
        ("I420", r#"{"width": 448, "height": 448}"#, false),
    ] {
        let pipeline = common::launch(&format!(
            "appsrc name=src format=time caps=video/x-raw,format={format},width=384,height=384,framerate=24/1 \
             ! aipipeline pipeline=noop name=ai ! appsink name=out sync=false"
        ));
        pipeline
            .by_name("ai")
            .unwrap()
            .set_property("params", params);
        let src = common::app_src(&pipeline, "src");
        let out = common::app_sink(&pipeline, "out");
        if pipeline.set_state(gst::State::Playing).is_err() {
            let msg = pipeline
                .bus()
                .unwrap()
                .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error]);
            let err = msg.map(|m| match m.view() {
                gst::MessageView::Error(e) => e.error().to_string(),
                _ => String::new(),
            });
            panic!("{format}: cannot start: {err:?}");
        }
        let mut data = vec![0u8; 384 * 384 * 3 / 2];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let mut buf = gst::Buffer::from_mut_slice(data.clone());
        buf.get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(500));
        let ptr = buf.map_readable().unwrap().as_ptr();
        src.push_buffer(buf).unwrap();
        let sample = out
            .try_pull_sample(gst::ClockTime::from_seconds(30))
            .expect("no output frame");
        let s = sample.caps().unwrap().structure(0).unwrap().to_owned();
        let got = sample.buffer().unwrap();
        assert_eq!(got.pts(), Some(gst::ClockTime::from_mseconds(500)));
        let map = got.map_readable().unwrap();
        if same {
            assert_eq!(s.get::<&str>("format").unwrap(), format, "{s}");
            assert_eq!(map.as_ptr(), ptr, "{format}: the input's memory goes on");
            assert_eq!(map.as_slice(), &data[..]);
        } else {
            assert_eq!(s.get::<&str>("format").unwrap(), "RGB", "{s}");
            assert_eq!(s.get::<i32>("width").unwrap(), 448);
        }
        drop(map);
        pipeline.set_state(gst::State::Null).unwrap();
    }
}
