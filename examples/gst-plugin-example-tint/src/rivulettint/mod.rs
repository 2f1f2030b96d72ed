// SPDX-License-Identifier: MPL-2.0
//! `rivulettint`: tints raw RGB video, cover-scaled and centre-cropped to the params'
//! width×height, following the Rivulet element contract.
//!
//! ```text
//! gst-launch-1.0 videotestsrc ! videoconvert ! \
//!     rivulettint params='{"color":[1.0,0.5,0.2],"strength":0.8}' ! videoconvert ! autovideosink
//! ```
//!
//! Params (JSON object, full replacement; a key not given takes its default):
//! `width`, `height` (384–1024, multiple of 64, default 512), `show_reloading_frame` (default
//! true), `color` (three channel gains in [0, 2], default `[1.0, 0.8, 0.6]`), `strength`
//! (mix of the tinted picture in [0, 1], default 1.0). A new `strength` applies at the next
//! frame; a new size or colour "reloads" (the colour table is rebuilt on a loader thread): the
//! element sends `rivulet-loading`, the new caps, frames passed through untinted at the new
//! size, then `rivulet-online`. Invalid params are a bus warning and the old ones stay.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct RivuletTint(ObjectSubclass<imp::RivuletTint>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "rivulettint",
        gst::Rank::NONE,
        RivuletTint::static_type(),
    )
}
