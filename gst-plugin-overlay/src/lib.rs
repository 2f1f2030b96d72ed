// SPDX-License-Identifier: MPL-2.0
//! Rivulet's overlay plugin `rivuletoverlay`: the `loadingoverlay` element.
#![allow(clippy::non_send_fields_in_send_ty, unused_doc_comments)] // glib macros

use gst::glib;

pub mod loadingoverlay;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    loadingoverlay::register(plugin)
}

gst::plugin_define!(
    rivuletoverlay,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
