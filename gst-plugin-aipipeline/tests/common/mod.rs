// SPDX-License-Identifier: MPL-2.0
//! Code shared by the aipipeline integration tests: GStreamer set-up, test data paths,
//! pipelines from launch lines, rendered frames and the element's own downstream events.
#![allow(dead_code)] // each test file uses a different subset

use std::path::PathBuf;
use std::sync::Once;

use gst::prelude::*;

/// `gst::init` and the statically registered plugin, once per process.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstaipipeline::plugin_register_static().unwrap();
    });
}

/// The committed test manifests and TorchScript models.
pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines")
}

/// The `rivulet-inference` child built with this crate.
pub fn child_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rivulet-inference")
}

/// Raw video caps at 24 fps.
pub fn caps(format: &str, w: u32, h: u32) -> gst::Caps {
    init();
    gst::Caps::builder("video/x-raw")
        .field("format", format)
        .field("width", w as i32)
        .field("height", h as i32)
        .field("framerate", gst::Fraction::new(24, 1))
        .build()
}

/// A pipeline from a launch line.
pub fn launch(desc: &str) -> gst::Pipeline {
    gst::parse::launch(desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap()
}

/// The appsrc called `name` in `p`.
pub fn app_src(p: &gst::Pipeline, name: &str) -> gst_app::AppSrc {
    p.by_name(name)
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap()
}

/// The appsink called `name` in `p`.
pub fn app_sink(p: &gst::Pipeline, name: &str) -> gst_app::AppSink {
    p.by_name(name)
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap()
}

/// Plays a finite pipeline ending in `appsink name=sink` and returns every buffer it output.
pub fn render(desc: &str) -> Vec<gst::Buffer> {
    let p = launch(desc);
    let sink = app_sink(&p, "sink");
    p.set_state(gst::State::Playing).unwrap();
    let mut v = Vec::new();
    while let Ok(s) = sink.pull_sample() {
        v.push(s.buffer_owned().unwrap());
    }
    p.set_state(gst::State::Null).unwrap();
    v
}

/// The element's custom downstream events.
pub enum Announcement {
    /// `gstaipipeline::LOADING_EVENT`
    Loading(gst::Structure),
    /// `gstaipipeline::ONLINE_EVENT`
    Online(gst::Structure),
}

/// `e` as one of the element's announcements, if it is one.
pub fn announcement(e: &gst::Event) -> Option<Announcement> {
    match e.view() {
        gst::EventView::CustomDownstream(c) => {
            let s = c.structure().unwrap().to_owned();
            if s.name() == gstaipipeline::LOADING_EVENT {
                Some(Announcement::Loading(s))
            } else if s.name() == gstaipipeline::ONLINE_EVENT {
                Some(Announcement::Online(s))
            } else {
                None
            }
        }
        _ => None,
    }
}
