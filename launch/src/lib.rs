// SPDX-License-Identifier: MPL-2.0
//! The rivulet daemon as a library, in layers (ARCHITECTURE.md, "Layers of `launch/src`"): the
//! HTTP handlers (`http`), the supervisor of sessions (`daemon`), one live session (`session`),
//! file jobs and `check-pipeline`, media assembly (`media`, `graph`), and the records and rules
//! below them (`status`, `health`, `metrics`, `config`, ...). The `rivulet` binary wires them
//! together (`serve`, `registration`).

pub mod check;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod feed;
pub mod graph;
pub mod health;
pub mod http;
pub mod jobs;
pub mod media;
pub mod metrics;
pub mod nvml;
pub mod openmp;
pub mod pyjson;
pub mod registration;
pub mod serve;
pub mod session;
pub mod status;
pub mod templates;

/// Initialises GStreamer and registers Rivulet's plugins statically (never via GST_PLUGIN_PATH).
pub fn init_gstreamer() -> Result<(), gst::glib::Error> {
    gst::init()?;
    gsttrickle::plugin_register_static()
        .map_err(|e| gst::glib::Error::new(gst::CoreError::Failed, &e.to_string()))?;
    gstaipipeline::plugin_register_static()
        .map_err(|e| gst::glib::Error::new(gst::CoreError::Failed, &e.to_string()))?;
    gstrivuletoverlay::plugin_register_static()
        .map_err(|e| gst::glib::Error::new(gst::CoreError::Failed, &e.to_string()))?;
    Ok(())
}
