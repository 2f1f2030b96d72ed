// SPDX-License-Identifier: MPL-2.0
//! Rivulet's `aipipeline` plugin: realtime model inference on video frames through libtorch.
//!
//! Besides the element, the crate exposes the pieces other code may reuse: the pipeline
//! registry and manifests ([`pipeline`]), device handling ([`device`]), the frame conversion
//! ([`frame`]) and loaded models ([`model`]).
#![allow(clippy::non_send_fields_in_send_ty, unused_doc_comments)] // glib macros

use gst::glib;

pub mod aipipeline;
pub mod child;
pub mod device;
pub mod frame;
pub mod model;
pub mod par;
pub mod pipeline;

pub use aipipeline::{
    Isolation, LOADING_EVENT, ONLINE_EVENT, Precision, RESTART_MESSAGE, STATS_MESSAGE, Status,
    UNKNOWN_PARAMS_WARNING,
};

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    // Loaded from a file (not registered statically): the search path includes its folder.
    if let Some(file) = plugin.filename() {
        pipeline::set_plugin_file(file);
    }
    aipipeline::register(plugin)
}

gst::plugin_define!(
    aipipeline,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
