// SPDX-License-Identifier: MPL-2.0
//! `tricklesink`: publishes MPEG-TS to a trickle channel (`docs/trickle.md`,
//! "Publisher (Rivulet's client)").
//!
//! It is a bin with request sink pads; which pads you request decides what it does:
//!
//! - `video_%u` (raw video) and/or `audio_%u` (raw audio): encoded with the runner's settings
//!   (`x264enc speed-preset=superfast tune=zerolatency bframes=0`, an IDR forced whenever
//!   `idr-interval` of PTS has passed; Opus 48 kHz mono) and muxed by `mpegtsmux`. At most one
//!   of each.
//! - `ts` (`video/mpegts, systemstream=true`): an already muxed MPEG-TS byte stream, published
//!   as is. It cannot be combined with the other pads.
//!
//! `gst-launch-1.0` picks the right pad from the upstream caps:
//!
//! ```text
//! gst-launch-1.0 videotestsrc is-live=true ! tricklesink url=http://127.0.0.1:2939/out
//! gst-launch-1.0 videotestsrc ! x264enc ! mpegtsmux ! tricklesink url=http://127.0.0.1:2939/out
//! ```
//!
//! Segments: a new trickle segment starts at a keyframe (a buffer without `DELTA_UNIT`) once
//! `min-segment-duration` has passed since the segment began. Each segment starts with PAT and
//! PMT (mpegtsmux re-sends them on every forced IDR; when a keyframe comes without them the
//! sink re-inserts the last PAT/PMT it saw). Every muxer output is written to the segment's
//! POST at once; the next segment's POST is always preconnected. The internal sink does not
//! sync on the clock (`sync=false`): upstream (a live source or the encoder) paces the data and
//! waiting would only add latency.
//!
//! Each published segment posts an element message `trickle-segment` (`seq`: i64, `bytes`:
//! u64, `duration`: ClockTime of stream time, `publish-time`: ClockTime from the end of the
//! segment's data to the server's answer). EOS ends the pending POST with an empty body and
//! DELETEs the channel (`delete-on-close`), before the EOS message is posted.

use gst::glib;
use gst::prelude::*;

mod bytesink;
mod imp;
pub(crate) mod ts;

glib::wrapper! {
    pub struct TrickleSink(ObjectSubclass<imp::TrickleSink>) @extends gst::Bin, gst::Element, gst::Object, @implements gst::ChildProxy;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "tricklesink",
        gst::Rank::NONE,
        TrickleSink::static_type(),
    )
}
