// SPDX-License-Identifier: MPL-2.0
//! Renders one loading frame at 512×512 from a real picture (videotestsrc pattern=smpte as the
//! last real frame) and writes it as PNG (default: docs/loading-frame.png at the repository
//! root, or the path given as the first argument).
//!
//! `cargo run -p gst-plugin-overlay --example render_loading_frame [-- out.png]`

use gst::prelude::*;
use gst_check::Harness;
use gstrivuletoverlay::loadingoverlay::loading_event;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    gst::init()?;
    gstrivuletoverlay::plugin_register_static()?;
    let out = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/loading-frame.png").to_string()
    });

    let mut h = Harness::new("loadingoverlay");
    h.add_src_parse(
        "videotestsrc pattern=smpte ! capsfilter caps=video/x-raw,format=RGB,width=512,height=512,framerate=24/1",
        false,
    );
    // The last real frame, then the loading period starts.
    h.push_from_src()?;
    h.pull()?;
    if !h.push_event(loading_event("example", "reload", true)) {
        return Err("loading event refused".into());
    }
    h.push_from_src()?;
    let loading = h.pull()?;
    let caps = h
        .sinkpad()
        .and_then(|p| p.current_caps())
        .ok_or("no negotiated caps")?;

    let mut png = Harness::new("pngenc");
    png.set_src_caps(caps);
    png.push(loading)?;
    let encoded = png.pull()?;
    let map = encoded.map_readable()?;
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, map.as_slice())?;
    eprintln!("wrote {out} ({} bytes)", map.size());
    Ok(())
}
