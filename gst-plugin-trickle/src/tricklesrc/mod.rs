// SPDX-License-Identifier: MPL-2.0
//! tricklesrc (being written)
use gst::glib;
pub fn register(_plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    Err(glib::bool_error!("tricklesrc is not implemented yet"))
}
