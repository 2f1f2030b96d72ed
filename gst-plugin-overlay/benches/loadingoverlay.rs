// SPDX-License-Identifier: MPL-2.0
//! Cost of `loadingoverlay` per frame, beside a plain `identity` measured in the same run.
//!
//! `cargo bench -p gst-plugin-overlay --bench loadingoverlay`
//!
//! Two measurements per case:
//! - *harness*: frames pushed through the element alone (gst_check::Harness), each pulled
//!   buffer pushed again so buffers are recycled as from a pool: the element's own cost plus a
//!   small, identical push/pull overhead;
//! - *pipeline*: `videotestsrc num-buffers=N pattern=black ! <element> ! fakesink`, wall time of
//!   the whole pipeline (source included, so the ratio is diluted by the source's cost).
//!
//! - *pre-render*: building the text and spinner sprites for one size, paid once per negotiated
//!   size at the first loading frame.
//!
//! Single-threaded streaming: each figure is one CPU core.

use gst::prelude::*;
use gst_check::Harness;
use gstrivuletoverlay::loadingoverlay::{DEFAULT_TEXT, render};
use std::time::{Duration, Instant};

const CASES: &[(&str, u32, u32, u32)] = &[
    ("RGB", 512, 512, 2000),
    ("I420", 512, 512, 2000),
    ("RGB", 1920, 1080, 300),
    ("I420", 1920, 1080, 300),
];

const ROUNDS: usize = 6;

fn caps(format: &str, w: u32, h: u32) -> String {
    format!("video/x-raw,format={format},width={w},height={h},framerate=24/1")
}

/// Per-frame time through the element alone (one run).
fn harness_per_frame(element: &str, force: bool, format: &str, w: u32, h: u32, n: u32) -> Duration {
    {
        let mut hs = Harness::new(element);
        if force {
            hs.element().expect("element").set_property("force", true);
        }
        hs.set_src_caps_str(&caps(format, w, h));
        let info = gst_video::VideoInfo::from_caps(
            &caps(format, w, h).parse::<gst::Caps>().expect("caps"),
        )
        .expect("info");
        let mut buf = gst::Buffer::with_size(info.size()).expect("alloc");
        buf.get_mut()
            .expect("writable")
            .map_writable()
            .expect("map")
            .fill(16);
        // Warm-up (sprite pre-rendering happens at caps time; first frame builds the canvas).
        for _ in 0..5 {
            hs.push(buf.clone()).expect("push");
            hs.pull().expect("pull");
        }
        let start = Instant::now();
        for i in 0..n {
            if buf.is_writable() {
                buf.get_mut()
                    .expect("writable")
                    .set_pts(gst::ClockTime::from_nseconds(u64::from(i) * 41_666_667));
            }
            hs.push(buf).expect("push");
            buf = hs.pull().expect("pull");
        }
        start.elapsed() / n
    }
}

/// Per-frame wall time of a videotestsrc pipeline through the element (one run).
fn pipeline_per_frame(element: &str, format: &str, w: u32, h: u32, n: u32) -> Duration {
    {
        let desc = format!(
            "videotestsrc num-buffers={n} pattern=black ! capsfilter caps={} ! {element} ! fakesink sync=false",
            caps(format, w, h)
        );
        let pipeline = gst::parse::launch(&desc).expect("pipeline");
        let bus = pipeline.bus().expect("bus");
        let start = Instant::now();
        pipeline.set_state(gst::State::Playing).expect("playing");
        let msg = bus
            .timed_pop_filtered(
                gst::ClockTime::from_seconds(300),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            )
            .expect("EOS within 300 s");
        let elapsed = start.elapsed();
        if let gst::MessageView::Error(e) = msg.view() {
            panic!("{desc}: {}", e.error());
        }
        pipeline.set_state(gst::State::Null).expect("null");
        elapsed / n
    }
}

/// Best of `ROUNDS` runs of each, interleaved (alternating which goes first) so that load from
/// other processes hits both alike.
fn compare(
    mut overlay: impl FnMut() -> Duration,
    mut identity: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    let (mut o, mut i) = (Duration::MAX, Duration::MAX);
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            o = o.min(overlay());
            i = i.min(identity());
        } else {
            i = i.min(identity());
            o = o.min(overlay());
        }
    }
    (o, i)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    gst::init().expect("gst init");
    gstrivuletoverlay::plugin_register_static().expect("register");
    println!(
        "loadingoverlay benchmark (one streaming thread = one CPU core; best of 6 interleaved runs)"
    );
    println!();
    println!(
        "{:<10} {:<6} {:<12} {:<9} {:>14} {:>14} {:>8}",
        "method", "format", "size", "mode", "overlay us/fr", "identity us/fr", "ratio"
    );
    for &(format, w, h, n) in CASES {
        if format == "RGB" {
            // Sprite pre-rendering, paid once per negotiated size at the first loading frame.
            let start = Instant::now();
            let o = render::Overlay::new(w, h, render::Domain::FULL, DEFAULT_TEXT);
            println!(
                "{:<10} {:<6} {:<12} {:<9} {:>14.1} {:>14} {:>8}",
                "pre-render",
                "any",
                format!("{w}x{h}"),
                "once",
                us(start.elapsed()),
                "-",
                "-"
            );
            assert_eq!(o.spinner.len(), render::SPINNER_FRAMES);
        }
        let size = format!("{w}x{h}");
        for (mode, force, overlay) in [
            ("passthru", false, "loadingoverlay"),
            ("drawing", true, "loadingoverlay"),
        ] {
            let (o, i) = compare(
                || harness_per_frame(overlay, force, format, w, h, n),
                || harness_per_frame("identity", false, format, w, h, n),
            );
            println!(
                "{:<10} {:<6} {:<12} {:<9} {:>14.1} {:>14.1} {:>8.2}",
                "harness",
                format,
                size,
                mode,
                us(o),
                us(i),
                us(o) / us(i)
            );
        }
        for (mode, overlay) in [
            ("passthru", "loadingoverlay"),
            ("drawing", "loadingoverlay force=true"),
        ] {
            let n = n / 2;
            let (o, i) = compare(
                || pipeline_per_frame(overlay, format, w, h, n),
                || pipeline_per_frame("identity", format, w, h, n),
            );
            println!(
                "{:<10} {:<6} {:<12} {:<9} {:>14.1} {:>14.1} {:>8.2}",
                "pipeline",
                format,
                size,
                mode,
                us(o),
                us(i),
                us(o) / us(i)
            );
        }
    }
}
