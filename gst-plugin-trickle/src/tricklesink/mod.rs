// SPDX-License-Identifier: MPL-2.0
//! tricklesink (being written)
use gst::glib;
pub fn register(_plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    Err(glib::bool_error!("tricklesink is not implemented yet"))
}
