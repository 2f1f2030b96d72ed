// SPDX-License-Identifier: MPL-2.0
//! `loadingoverlay`: passes raw video through untouched, except while upstream is loading (or
//! while `force` is on): then every frame is replaced by the runner's loading picture
//! (docs/runner.md, "Loading picture"): the last real frame in greyscale and dimmed (or
//! mid-grey), the text "Loading pipeline…" and a spinner turning at 180° per second of running
//! time.
//!
//! Loading is signalled by serialized custom downstream events (the cross-crate contract with
//! `aipipeline`, forwarded unchanged):
//! - [`LOADING_EVENT`] (`rivulet-loading`): `pipeline` (string), `reason` (string),
//!   `show-picture` (bool; `false`: do not draw for this loading period);
//! - [`ONLINE_EVENT`] (`rivulet-online`): `pipeline` (string).
//!
//! Flush-stop and stream-start end a loading period. Starting and stopping to draw posts the
//! element message [`DRAWING_MESSAGE`] (`loadingoverlay-drawing`) with `drawing` (bool),
//! `reason` (`"loading"` or `"force"`) and `running-time` (`GstClockTime`, when known).
//!
//! ```text
//! gst-launch-1.0 videotestsrc ! video/x-raw,width=512,height=512 ! loadingoverlay force=true ! autovideosink
//! ```

use gst::glib;
use gst::prelude::*;

mod imp;
pub mod render;

/// Structure name of the custom downstream event that starts a loading period.
pub const LOADING_EVENT: &str = "rivulet-loading";
/// Structure name of the custom downstream event that ends a loading period.
pub const ONLINE_EVENT: &str = "rivulet-online";
/// Structure name of the element message posted when drawing starts or stops.
pub const DRAWING_MESSAGE: &str = "loadingoverlay-drawing";
/// Default of the `text` property.
pub const DEFAULT_TEXT: &str = "Loading pipeline\u{2026}";

glib::wrapper! {
    pub struct LoadingOverlay(ObjectSubclass<imp::LoadingOverlay>)
        @extends gst_base::BaseTransform, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "loadingoverlay",
        gst::Rank::NONE,
        LoadingOverlay::static_type(),
    )
}

/// Builds the `rivulet-loading` event as `aipipeline` sends it.
pub fn loading_event(pipeline: &str, reason: &str, show_picture: bool) -> gst::Event {
    gst::event::CustomDownstream::new(
        gst::Structure::builder(LOADING_EVENT)
            .field("pipeline", pipeline)
            .field("reason", reason)
            .field("show-picture", show_picture)
            .build(),
    )
}

/// Builds the `rivulet-online` event as `aipipeline` sends it.
pub fn online_event(pipeline: &str) -> gst::Event {
    gst::event::CustomDownstream::new(
        gst::Structure::builder(ONLINE_EVENT)
            .field("pipeline", pipeline)
            .build(),
    )
}
