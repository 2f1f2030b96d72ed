// SPDX-License-Identifier: MPL-2.0
//! Rivulet's trickle plugin: the trickle protocol (server and client, see `protocol`) and the
//! `tricklesrc` / `tricklesink` GStreamer elements built on it.
#![allow(clippy::non_send_fields_in_send_ty, unused_doc_comments)] // glib macros

use gst::glib;

pub mod protocol;
mod runtime;
mod tricklesink;
mod tricklesrc;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    tricklesrc::register(plugin)?;
    tricklesink::register(plugin)?;
    Ok(())
}

gst::plugin_define!(
    trickle,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MPL",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
