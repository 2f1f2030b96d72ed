// SPDX-License-Identifier: MPL-2.0
//! What a new user gets with no configuration, and what unknown params keys do.
//!
//! - `gst-launch-1.0 … aipipeline pipeline=styletransfer …` with neither `RIVULET_PIPELINES`
//!   nor `MODEL_DIR` in its environment finds the shipped model (the build tree's `models/` is
//!   on the default search path) and runs it;
//! - a manifest in `pipelines/<model>/` beside the plugin file is found the same way;
//! - an unknown pipeline's error names every directory searched, in order;
//! - params keys the pipeline does not know are accepted (the runner ignores them) and named in
//!   a bus warning with a `rivulet-unknown-params` details structure, once per new set of
//!   unknown keys, never for the daemon's own keys.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{init, testdata};
use gst::prelude::*;

/// This build's plugin in a folder of its own (`cargo test` builds the cdylib beside the test
/// binary, among many other libraries GStreamer should not try).
fn plugin_dir(tag: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let built = exe.parent().unwrap().join("libgstaipipeline.so");
    assert!(built.is_file(), "{} not found", built.display());
    let dir = std::env::temp_dir().join(format!("aipipeline-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&built, dir.join("libgstaipipeline.so")).unwrap();
    dir
}

/// `gst-launch-1.0` with `aipipeline <props>` on three 256² frames, the plugin from `plugins`,
/// and no `RIVULET_PIPELINES` or `MODEL_DIR` in its environment.
fn launch(plugins: &Path, props: &[&str]) -> Output {
    let mut args: Vec<String> = [
        "videotestsrc",
        "num-buffers=3",
        "!",
        "video/x-raw,format=RGB,width=256,height=256,framerate=24/1",
        "!",
        "aipipeline",
        "device=cpu",
    ]
    .map(String::from)
    .to_vec();
    args.extend(props.iter().map(|p| p.to_string()));
    args.extend(["!", "fakesink"].map(String::from));
    Command::new("gst-launch-1.0")
        .args(&args)
        .env_remove("RIVULET_PIPELINES")
        .env_remove("MODEL_DIR")
        .env("GST_PLUGIN_PATH", plugins)
        .env("GST_REGISTRY", plugins.join("registry.bin"))
        .output()
        .expect("gst-launch-1.0 runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn styletransfer_is_found_with_no_configuration() {
    let plugins = plugin_dir("styletransfer");
    let o = launch(
        &plugins,
        &[
            "pipeline=styletransfer",
            r#"params={"width":256,"height":256,"style":3,"bogus":1}"#,
        ],
    );
    let out = text(&o);
    assert!(o.status.success(), "gst-launch-1.0 failed:\n{out}");
    assert!(out.contains("Got EOS"), "{out}");
    // The unknown key is named (gst-launch prints the element's warnings).
    assert!(
        out.contains("Params for pipeline 'styletransfer': unknown key 'bogus' ignored"),
        "{out}"
    );

    // An unknown pipeline: the error lists the directories searched, in order.
    let o = launch(&plugins, &["pipeline=nosuchpipeline"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    let models = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .canonicalize()
        .unwrap();
    let at = |s: &str| {
        out.find(s)
            .unwrap_or_else(|| panic!("{s} not in the error:\n{out}"))
    };
    assert!(out.contains("Unknown pipeline 'nosuchpipeline'"), "{out}");
    assert!(out.contains("styletransfer"), "known pipelines: {out}");
    let data = at("/usr/share/rivulet/pipelines");
    let beside_plugin = at(&plugins.join("pipelines").display().to_string());
    let build_tree = at(&models.display().to_string());
    assert!(data < beside_plugin && beside_plugin < build_tree, "{out}");
    let _ = std::fs::remove_dir_all(&plugins);
}

#[test]
fn a_model_beside_the_plugin_is_found() {
    let plugins = plugin_dir("beside");
    let model = plugins.join("pipelines/gain");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["gain.toml", "gain.pt"] {
        std::fs::copy(testdata().join(f), model.join(f)).unwrap();
    }
    let o = launch(
        &plugins,
        &["pipeline=gain", r#"params={"width":256,"height":256}"#],
    );
    let out = text(&o);
    assert!(o.status.success(), "gst-launch-1.0 failed:\n{out}");
    assert!(!out.contains("unknown key"), "{out}");
    let _ = std::fs::remove_dir_all(&plugins);
}

/// The unknown keys of the next warning already on the bus (the element posts it while the
/// params are set, before `set_property` returns), or `None`.
fn unknown_keys(bus: &gst::Bus) -> Option<(String, Vec<String>)> {
    let msg = bus.pop_filtered(&[gst::MessageType::Warning])?;
    let gst::MessageView::Warning(w) = msg.view() else {
        unreachable!()
    };
    let d = w
        .details()
        .unwrap_or_else(|| panic!("a warning without details: {}", w.error()));
    assert_eq!(d.name(), gstaipipeline::UNKNOWN_PARAMS_WARNING);
    assert_eq!(d.get::<String>("pipeline").unwrap(), "gain");
    let keys = d
        .get::<gst::Array>("keys")
        .unwrap()
        .iter()
        .map(|v| v.get::<String>().unwrap())
        .collect();
    Some((w.error().to_string(), keys))
}

#[test]
fn unknown_params_keys_warn_once_per_new_set() {
    init();
    let p = common::launch(&format!(
        "appsrc name=src format=time caps=video/x-raw,format=RGB,width=384,height=384,framerate=24/1 ! \
         aipipeline name=ai device=cpu pipelines-dir=\"{}\" pipeline=gain ! \
         appsink name=sink sync=false",
        testdata().display()
    ));
    let ai = p.by_name("ai").unwrap();
    ai.set_property("params", r#"{"gain": 0.5, "zoom": 2}"#);
    let src = common::app_src(&p, "src");
    let sink = common::app_sink(&p, "sink");
    let bus = p.bus().unwrap();
    p.set_state(gst::State::Playing).unwrap();
    // At start: the unknown key is named, with what the pipeline takes.
    let (text, keys) = unknown_keys(&bus).expect("a warning at start");
    assert_eq!(keys, ["zoom"]);
    assert!(
        text.contains("unknown key 'zoom' ignored") && text.contains("'gain'"),
        "{text}"
    );
    let frame = |i: u64| {
        let mut b = gst::Buffer::from_mut_slice(vec![100u8; 384 * 384 * 3]);
        b.get_mut()
            .unwrap()
            .set_pts(gst::ClockTime::from_mseconds(i * 40));
        src.push_buffer(b).unwrap();
        let s = sink
            .try_pull_sample(gst::ClockTime::from_seconds(60))
            .expect("a frame out");
        // The params apply (gain 0.5 → 50); the unknown key changed nothing.
        s.buffer().unwrap().map_readable().unwrap()[0]
    };
    assert_eq!(frame(0), 50);
    // Frames say nothing more.
    assert_eq!(frame(1), 50);
    assert!(unknown_keys(&bus).is_none());
    // The same unknown set again: accepted, no new warning.
    ai.set_property("params", r#"{"gain": 0.25, "zoom": 3}"#);
    assert!(unknown_keys(&bus).is_none());
    assert_eq!(frame(2), 25);
    // A new set: one warning naming every key of it.
    ai.set_property("params", r#"{"gain": 0.25, "zoom": 3, "blur": true}"#);
    assert_eq!(
        unknown_keys(&bus).map(|(_, k)| k).unwrap(),
        ["blur", "zoom"]
    );
    assert!(unknown_keys(&bus).is_none());
    // The daemon's own keys are never unknown.
    ai.set_property(
        "params",
        r#"{"gain": 1.0, "width": 384, "height": 384, "show_reloading_frame": false,
            "request_id": "r1", "manifest_id": "m1", "stream_id": "s1"}"#,
    );
    assert!(unknown_keys(&bus).is_none());
    assert_eq!(frame(3), 100);
    // After a clean update the old set is new again.
    ai.set_property("params", r#"{"gain": 1.0, "zoom": 3}"#);
    assert_eq!(unknown_keys(&bus).map(|(_, k)| k).unwrap(), ["zoom"]);
    // The params readback is what was set (nothing stripped).
    assert_eq!(
        ai.property::<String>("params"),
        r#"{"gain": 1.0, "zoom": 3}"#
    );
    p.set_state(gst::State::Null).unwrap();
}
