// SPDX-License-Identifier: MPL-2.0
//! Rivulet's aipipeline plugin. (being written)
#![allow(clippy::non_send_fields_in_send_ty, unused_doc_comments)] // glib macros

use gst::glib;

fn plugin_init(_plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    Err(glib::bool_error!("aipipeline is not implemented yet"))
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
