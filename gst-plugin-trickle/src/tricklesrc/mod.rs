// SPDX-License-Identifier: MPL-2.0
//! `tricklesrc`: subscribes to a trickle channel (`docs/trickle.md`, "Subscriber (Rivulet's
//! client)") and outputs its MPEG-TS, decoded by default.
//!
//! It is a bin. Inside, a byte source (`bytesrc.rs`) follows the subscriber rules (start at
//! `start-seq`, preconnect, resync on 470 and mark the next buffer DISCONT, EOS on
//! `Lp-Trickle-Closed`, fatal 404, retries with back-off) and pushes every HTTP chunk downstream
//! as soon as it arrives, with caps `video/mpegts, systemstream=true, packetsize=188`.
//!
//! - `mode=decode` (default): the bytes go through `decodebin` (tsdemux, parsers, `avdec_h264`
//!   with `max-threads=1`) and raw video / raw audio come out on "sometimes" pads `video_%u` and
//!   `audio_%u`, the way `uridecodebin` exposes them. With `au-per-pes=true` (default) the
//!   H.264 from tsdemux is marked `alignment=au`, so h264parse passes each frame on at once
//!   instead of holding it until the next frame begins (one frame interval saved; right when
//!   each PES is one access unit, as tricklesink, ffmpeg and go-livepeer write them). A video
//!   PES of 64 KiB or more has no length, so tsdemux would hold it until the next PES begins;
//!   the byte source ends each such PES as soon as its last packet arrives (`delimit.rs`), so a
//!   frame is never held back waiting for the next one (a paused publisher, a segment's end).
//! - `mode=bytes`: the MPEG-TS byte stream comes out unchanged on the "sometimes" pad `src`
//!   (added when the element goes to READY).
//!
//! ```text
//! gst-launch-1.0 tricklesrc url=http://127.0.0.1:2939/in ! videoconvert ! autovideosink
//! gst-launch-1.0 tricklesrc url=http://127.0.0.1:2939/in mode=bytes ! tsdemux ! h264parse ! avdec_h264 ! videoconvert ! autovideosink
//! ```
//!
//! Timing: the source is live and, with `do-timestamp=true` (default), stamps the bytes with
//! their arrival time, so tsdemux maps the stream's PTS onto the pipeline clock and a synced
//! video sink shows frames as they arrive. `do-timestamp=false` keeps the stream's own PTS
//! spacing exactly (for reading a channel faster than real time).
//!
//! Each segment posts an element message `trickle-segment` (`seq`: i64, `bytes`: u64,
//! `discont`: bool, `corrupt`: bool, `lag`: i64 segments behind the live edge or -1) and
//! notifies `stats`. A segment
//! that is not a whole sequence of 188-byte TS packets is skipped from the first bad packet on,
//! with a warning; the stream goes on with the next segment. A 404 before any segment is an
//! error; a 404 after the stream began (the publisher deleted the channel while this
//! subscriber lagged behind) is reported as a warning and ends the stream with EOS.

use gst::glib;
use gst::prelude::*;

mod bytesrc;
mod delimit;
mod imp;

/// What `tricklesrc` outputs.
#[derive(Debug, Eq, PartialEq, Ord, PartialOrd, Hash, Clone, Copy, Default, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstTrickleSrcMode")]
pub enum TrickleSrcMode {
    /// Decoded raw video (and audio) on sometimes pads `video_%u` / `audio_%u`.
    #[default]
    #[enum_value(
        name = "Decode: raw video/audio on video_%u / audio_%u pads",
        nick = "decode"
    )]
    Decode = 0,
    /// The MPEG-TS byte stream unchanged on the `src` pad.
    #[enum_value(name = "Bytes: the MPEG-TS byte stream as received", nick = "bytes")]
    Bytes = 1,
}

glib::wrapper! {
    pub struct TrickleSrc(ObjectSubclass<imp::TrickleSrc>) @extends gst::Bin, gst::Element, gst::Object, @implements gst::ChildProxy;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    TrickleSrcMode::static_type().mark_as_plugin_api(gst::PluginAPIFlags::empty());
    gst::Element::register(
        Some(plugin),
        "tricklesrc",
        gst::Rank::NONE,
        TrickleSrc::static_type(),
    )
}
