// SPDX-License-Identifier: MPL-2.0
//! An example external Rivulet pipeline shipped as its own GStreamer plugin: the `rivulettint`
//! element. It follows the Rivulet element contract (gst-plugin-aipipeline/README.md, "Element
//! contract for external pipeline elements") without depending on any Rivulet crate, so the
//! daemon can use it by name in a graph stage (`element: rivulettint`) once it is on
//! `GST_PLUGIN_PATH`, and `rivulet check-pipeline rivulettint` passes.
#![allow(unused_doc_comments)] // glib macros

use gst::glib;

mod rivulettint;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    rivulettint::register(plugin)
}

gst::plugin_define!(
    rivulettint,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    env!("CARGO_PKG_VERSION"),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    "https://example.invalid/rivulet",
    "2026-11-22"
);
