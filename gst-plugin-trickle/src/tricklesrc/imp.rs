// SPDX-License-Identifier: MPL-2.0
//! `tricklesrc` implementation: a bin around the byte source (and `decodebin` in decode mode).

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use super::TrickleSrcMode;
use super::bytesrc::TrickleByteSrc;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "tricklesrc",
        gst::DebugColorFlags::empty(),
        Some("Trickle subscriber source"),
    )
});

pub(crate) const DEFAULT_START_SEQ: i64 = -2;
pub(crate) const DEFAULT_MODE: TrickleSrcMode = TrickleSrcMode::Decode;
pub(crate) const DEFAULT_MAX_RETRIES: u32 = 5;
pub(crate) const DEFAULT_RETRY_PAUSE_MS: u32 = 500;
pub(crate) const DEFAULT_PRECONNECT_REFRESH_MS: u32 = 20_000;
pub(crate) const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 10_000;
pub(crate) const DEFAULT_TLS_VERIFY: bool = true;
pub(crate) const DEFAULT_DO_TIMESTAMP: bool = true;
pub(crate) const DEFAULT_AU_PER_PES: bool = true;

/// The caps of the MPEG-TS byte stream.
pub(crate) fn ts_caps() -> gst::Caps {
    gst::Caps::builder("video/mpegts")
        .field("systemstream", true)
        .field("packetsize", 188i32)
        .build()
}

/// What the user set.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub url: Option<String>,
    pub start_seq: i64,
    pub mode: TrickleSrcMode,
    pub max_retries: u32,
    pub retry_pause: Duration,
    pub preconnect_refresh: Duration,
    pub connect_timeout: Duration,
    pub tls_verify: bool,
    pub do_timestamp: bool,
    pub au_per_pes: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            url: None,
            start_seq: DEFAULT_START_SEQ,
            mode: DEFAULT_MODE,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_pause: Duration::from_millis(DEFAULT_RETRY_PAUSE_MS.into()),
            preconnect_refresh: Duration::from_millis(DEFAULT_PRECONNECT_REFRESH_MS.into()),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS.into()),
            tls_verify: DEFAULT_TLS_VERIFY,
            do_timestamp: DEFAULT_DO_TIMESTAMP,
            au_per_pes: DEFAULT_AU_PER_PES,
        }
    }
}

/// Counters, read through the `stats` property.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stats {
    pub segments: u64,
    pub bytes: u64,
    pub empty_segments: u64,
    pub corrupt_segments: u64,
    pub resyncs: u64,
    pub discont_buffers: u64,
    pub last_seq: i64,
    pub lag: i64,
}

/// Shared between the bin and its byte source.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub settings: Mutex<Settings>,
    pub stats: Mutex<Stats>,
}

#[derive(Default)]
enum State {
    #[default]
    Stopped,
    Built {
        children: Vec<gst::Element>,
        ghosts: Arc<Mutex<Vec<gst::GhostPad>>>,
    },
}

#[derive(Default)]
pub struct TrickleSrc {
    shared: Arc<Shared>,
    state: Mutex<State>,
}

#[glib::object_subclass]
impl ObjectSubclass for TrickleSrc {
    const NAME: &'static str = "GstTrickleSrc";
    type Type = super::TrickleSrc;
    type ParentType = gst::Bin;
}

impl ObjectImpl for TrickleSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("url")
                    .nick("URL")
                    .blurb("Trickle channel URL to subscribe to (http:// or https://, without the /seq)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecInt64::builder("start-seq")
                    .nick("Start seq")
                    .blurb("First segment to read: -2 = current (default), -1 = next, N >= 0 = that segment")
                    .minimum(-2)
                    .default_value(DEFAULT_START_SEQ)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("mode", DEFAULT_MODE)
                    .nick("Mode")
                    .blurb("decode: raw video/audio on video_%u/audio_%u pads; bytes: the MPEG-TS byte stream on the src pad")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-retries")
                    .nick("Max retries")
                    .blurb("Consecutive failed attempts on a segment before giving up with an error")
                    .minimum(1)
                    .default_value(DEFAULT_MAX_RETRIES)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("retry-pause-ms")
                    .nick("Retry pause (ms)")
                    .blurb("Pause before retrying a failed request, in milliseconds")
                    .default_value(DEFAULT_RETRY_PAUSE_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("preconnect-refresh-ms")
                    .nick("Preconnect refresh (ms)")
                    .blurb("Re-issue a waiting GET that got no response headers for this long, in milliseconds")
                    .minimum(100)
                    .default_value(DEFAULT_PRECONNECT_REFRESH_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("connect-timeout-ms")
                    .nick("Connect timeout (ms)")
                    .blurb("TCP/TLS connection set-up timeout, in milliseconds")
                    .minimum(1)
                    .default_value(DEFAULT_CONNECT_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("tls-verify")
                    .nick("TLS verify")
                    .blurb("Verify the server's TLS certificate on https:// URLs")
                    .default_value(DEFAULT_TLS_VERIFY)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("do-timestamp")
                    .nick("Do timestamp")
                    .blurb("Stamp the bytes with their arrival time, so the demuxer maps the stream's PTS onto the live clock \
                            (right for live playback). false: keep the stream's own PTS exactly (tsdemux ignores the \
                            PCR; for streams read faster than real time, and for processing that must keep input PTS)")
                    .default_value(DEFAULT_DO_TIMESTAMP)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("au-per-pes")
                    .nick("One access unit per PES")
                    .blurb("Decode mode: each MPEG-TS video PES holds one whole H.264 access unit (true for tricklesink, \
                            ffmpeg and go-livepeer output), so frames are decoded without waiting for the next one \
                            (saves a frame interval). Turn off for streams that split frames across PES packets")
                    .default_value(DEFAULT_AU_PER_PES)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("segments, bytes, empty-segments, corrupt-segments, resyncs, discont-buffers, last-seq, lag (notified per segment)")
                    .read_only()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.shared.settings.lock().unwrap();
        // The types are guaranteed by GObject's property checks.
        match pspec.name() {
            "url" => settings.url = value.get().unwrap(),
            "start-seq" => settings.start_seq = value.get().unwrap(),
            "mode" => settings.mode = value.get().unwrap(),
            "max-retries" => settings.max_retries = value.get().unwrap(),
            "retry-pause-ms" => {
                settings.retry_pause = Duration::from_millis(value.get::<u32>().unwrap().into())
            }
            "preconnect-refresh-ms" => {
                settings.preconnect_refresh =
                    Duration::from_millis(value.get::<u32>().unwrap().into())
            }
            "connect-timeout-ms" => {
                settings.connect_timeout = Duration::from_millis(value.get::<u32>().unwrap().into())
            }
            "tls-verify" => settings.tls_verify = value.get().unwrap(),
            "do-timestamp" => settings.do_timestamp = value.get().unwrap(),
            "au-per-pes" => settings.au_per_pes = value.get().unwrap(),
            other => gst::warning!(CAT, imp = self, "unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.shared.settings.lock().unwrap();
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        match pspec.name() {
            "url" => settings.url.to_value(),
            "start-seq" => settings.start_seq.to_value(),
            "mode" => settings.mode.to_value(),
            "max-retries" => settings.max_retries.to_value(),
            "retry-pause-ms" => ms(settings.retry_pause).to_value(),
            "preconnect-refresh-ms" => ms(settings.preconnect_refresh).to_value(),
            "connect-timeout-ms" => ms(settings.connect_timeout).to_value(),
            "tls-verify" => settings.tls_verify.to_value(),
            "do-timestamp" => settings.do_timestamp.to_value(),
            "au-per-pes" => settings.au_per_pes.to_value(),
            "stats" => {
                drop(settings);
                let s = self.shared.stats.lock().unwrap().clone();
                gst::Structure::builder("trickle-src-stats")
                    .field("segments", s.segments)
                    .field("bytes", s.bytes)
                    .field("empty-segments", s.empty_segments)
                    .field("corrupt-segments", s.corrupt_segments)
                    .field("resyncs", s.resyncs)
                    .field("discont-buffers", s.discont_buffers)
                    .field("last-seq", s.last_seq)
                    .field("lag", s.lag)
                    .build()
                    .to_value()
            }
            // GObject only asks for the properties declared above.
            _ => unreachable!(),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        self.obj()
            .set_suppressed_flags(gst::ElementFlags::SOURCE | gst::ElementFlags::SINK);
        self.obj().set_element_flags(gst::ElementFlags::SOURCE);
    }
}

impl GstObjectImpl for TrickleSrc {}

impl ElementImpl for TrickleSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Trickle source",
                "Source/Network/HTTP",
                "Subscribes to a trickle channel and outputs its MPEG-TS, decoded (default) or as bytes",
                "Rivulet developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            // Static, valid templates.
            vec![
                gst::PadTemplate::new(
                    "video_%u",
                    gst::PadDirection::Src,
                    gst::PadPresence::Sometimes,
                    &gst::Caps::new_empty_simple("video/x-raw"),
                )
                .unwrap(),
                gst::PadTemplate::new(
                    "audio_%u",
                    gst::PadDirection::Src,
                    gst::PadPresence::Sometimes,
                    &gst::Caps::new_empty_simple("audio/x-raw"),
                )
                .unwrap(),
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Sometimes,
                    &ts_caps(),
                )
                .unwrap(),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if transition == gst::StateChange::NullToReady {
            self.build().map_err(|err| {
                self.post_error_message(err);
                gst::StateChangeError
            })?;
        }
        let result = self.parent_change_state(transition);
        if transition == gst::StateChange::ReadyToNull
            || (result.is_err() && transition == gst::StateChange::NullToReady)
        {
            self.teardown();
        }
        result
    }
}

impl BinImpl for TrickleSrc {}

impl TrickleSrc {
    /// Build the internal graph for the configured mode.
    fn build(&self) -> Result<(), gst::ErrorMessage> {
        let mode = self.shared.settings.lock().unwrap().mode;
        let obj = self.obj();
        let bytesrc = TrickleByteSrc::new("bytesrc", self.shared.clone());
        let ghosts: Arc<Mutex<Vec<gst::GhostPad>>> = Arc::default();
        let mut children: Vec<gst::Element> = vec![bytesrc.clone().upcast()];
        let add_err =
            |e: glib::BoolError| gst::error_msg!(gst::CoreError::Failed, ["tricklesrc: {e}"]);
        obj.add(&bytesrc).map_err(add_err)?;
        let bytesrc_pad = bytesrc
            .static_pad("src")
            .ok_or_else(|| gst::error_msg!(gst::CoreError::Failed, ["byte source has no pad"]))?;

        match mode {
            TrickleSrcMode::Bytes => {
                let templ = obj
                    .pad_template("src")
                    .ok_or_else(|| gst::error_msg!(gst::CoreError::Failed, ["no src template"]))?;
                let ghost = gst::GhostPad::builder_from_template(&templ)
                    .name("src")
                    .build();
                ghost.set_target(Some(&bytesrc_pad)).map_err(add_err)?;
                // Activation follows the element's state; an inactive ghost pad is fine here.
                obj.add_pad(&ghost).map_err(add_err)?;
                ghosts.lock().unwrap().push(ghost);
                obj.no_more_pads();
            }
            TrickleSrcMode::Decode => {
                let decodebin = gst::ElementFactory::make("decodebin")
                    .name("decodebin")
                    .build()
                    .map_err(|e| {
                        gst::error_msg!(
                            gst::CoreError::MissingPlugin,
                            ["tricklesrc needs decodebin (gst-plugins-base): {e}"]
                        )
                    })?;
                decodebin.set_property("sink-caps", ts_caps());
                obj.add(&decodebin).map_err(add_err)?;
                children.push(decodebin.clone());
                bytesrc.link(&decodebin).map_err(|e| {
                    gst::error_msg!(gst::CoreError::Negotiation, ["tricklesrc: {e}"])
                })?;
                let bin = decodebin.downcast_ref::<gst::Bin>().ok_or_else(|| {
                    gst::error_msg!(gst::CoreError::Failed, ["decodebin is not a bin"])
                })?;
                let (au_per_pes, do_timestamp) = {
                    let s = self.shared.settings.lock().unwrap();
                    (s.au_per_pes, s.do_timestamp)
                };
                bin.connect_deep_element_added(move |_bin, _sub, element| {
                    tune_decode_element(element, au_per_pes, do_timestamp);
                });
                let weak = obj.downgrade();
                let pads = ghosts.clone();
                decodebin.connect_pad_added(move |_db, pad| {
                    if let Some(obj) = weak.upgrade() {
                        obj.imp().expose(pad, &pads);
                    }
                });
                let weak = obj.downgrade();
                let pads = ghosts.clone();
                decodebin.connect_pad_removed(move |_db, pad| {
                    if let Some(obj) = weak.upgrade() {
                        let found = {
                            let mut pads = pads.lock().unwrap();
                            let idx = pads.iter().position(|g| g.target().as_ref() == Some(pad));
                            idx.map(|i| pads.remove(i))
                        };
                        if let Some(ghost) = found {
                            let _ = ghost.set_active(false);
                            let _ = obj.remove_pad(&ghost);
                        }
                    }
                });
                let weak = obj.downgrade();
                decodebin.connect_no_more_pads(move |_db| {
                    if let Some(obj) = weak.upgrade() {
                        obj.no_more_pads();
                    }
                });
            }
        }
        *self.state.lock().unwrap() = State::Built { children, ghosts };
        gst::debug!(CAT, imp = self, "built for mode {mode:?}");
        Ok(())
    }

    /// Expose a decodebin pad as `video_%u` / `audio_%u`.
    fn expose(&self, pad: &gst::Pad, ghosts: &Mutex<Vec<gst::GhostPad>>) {
        let obj = self.obj();
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        let media = caps
            .structure(0)
            .map(|s| s.name().to_string())
            .unwrap_or_default();
        let kind = if media.starts_with("video/") {
            "video"
        } else if media.starts_with("audio/") {
            "audio"
        } else {
            gst::info!(CAT, imp = self, "ignoring decoded stream with caps {caps}");
            return;
        };
        // One pad per kind, like the runner's decoder (first video, first audio stream). When
        // the demuxer re-creates its streams (e.g. after a corrupt segment or a publisher
        // restart), the existing pad follows the new decoded stream instead of a new,
        // unlinked pad appearing.
        let existing = ghosts
            .lock()
            .unwrap()
            .iter()
            .find(|g| g.name().starts_with(kind))
            .cloned();
        if let Some(ghost) = existing {
            match ghost.set_target(Some(pad)) {
                Ok(()) => gst::info!(
                    CAT,
                    imp = self,
                    "{} follows a new decoded stream",
                    ghost.name()
                ),
                Err(err) => gst::element_imp_warning!(
                    self,
                    gst::CoreError::Pad,
                    ["Cannot follow the new decoded {kind} stream: {err}"]
                ),
            }
            return;
        }
        let Some(templ) = obj.pad_template(&format!("{kind}_%u")) else {
            return;
        };
        let ghost = gst::GhostPad::builder_from_template(&templ)
            .name(format!("{kind}_0"))
            .build();
        if let Err(err) = ghost.set_target(Some(pad)) {
            gst::element_imp_warning!(
                self,
                gst::CoreError::Pad,
                ["Cannot expose the decoded {kind} stream: {err}"]
            );
            return;
        }
        let _ = ghost.set_active(true);
        ghosts.lock().unwrap().push(ghost.clone());
        gst::info!(CAT, imp = self, "exposing {} ({caps})", ghost.name());
        if let Err(err) = obj.add_pad(&ghost) {
            gst::element_imp_warning!(
                self,
                gst::CoreError::Pad,
                ["Cannot add pad {}: {err}", ghost.name()]
            );
        }
    }

    fn teardown(&self) {
        let state = std::mem::take(&mut *self.state.lock().unwrap());
        if let State::Built { children, ghosts } = state {
            let obj = self.obj();
            let ghosts = std::mem::take(&mut *ghosts.lock().unwrap());
            for ghost in ghosts {
                let _ = ghost.set_active(false);
                let _ = obj.remove_pad(&ghost);
            }
            for child in children {
                let _ = child.set_state(gst::State::Null);
                let _ = obj.remove(&child);
            }
        }
    }
}

/// Low-latency settings for the elements decodebin plugs.
fn tune_decode_element(element: &gst::Element, au_per_pes: bool, do_timestamp: bool) {
    let Some(factory) = element.factory() else {
        return;
    };
    match factory.name().as_str() {
        // No frame threading: frame threads hold one frame per thread.
        "avdec_h264" => {
            element.set_property("max-threads", 1i32);
        }
        // Latency tsdemux reports in live pipelines (default 700 ms); the bytes arrive as
        // they are written, so a small margin suffices.
        "tsdemux" => {
            element.set_property("latency", 50i32);
            // Without arrival timestamps, the stream's own PTS are the timeline: the PCR-based
            // clock-skew correction would bend them by the network jitter.
            if !do_timestamp {
                element.set_property("ignore-pcr", true);
            }
            if au_per_pes {
                element.connect_pad_added(|_, pad| mark_au_aligned(pad));
            }
        }
        _ => {}
    }
}

/// tsdemux outputs H.264 without an `alignment` in its caps, so h264parse holds every frame
/// until the next one begins (to find where it ends): a whole frame interval of latency.
/// When each PES holds one access unit (as tricklesink, ffmpeg and go-livepeer write them),
/// saying `alignment=au` lets the parser pass each frame on at once.
pub(crate) fn mark_au_aligned(pad: &gst::Pad) {
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, |_, info| {
        let Some(gst::PadProbeData::Event(event)) = &info.data else {
            return gst::PadProbeReturn::Ok;
        };
        let gst::EventView::Caps(caps_event) = event.view() else {
            return gst::PadProbeReturn::Ok;
        };
        let caps = caps_event.caps();
        let Some(s) = caps.structure(0) else {
            return gst::PadProbeReturn::Ok;
        };
        if s.name() != "video/x-h264" || s.has_field("alignment") {
            return gst::PadProbeReturn::Ok;
        }
        let mut caps = caps.to_owned();
        if let Some(s) = caps.make_mut().structure_mut(0) {
            s.set("alignment", "au");
        }
        let seqnum = event.seqnum();
        info.data = Some(gst::PadProbeData::Event(
            gst::event::Caps::builder(&caps).seqnum(seqnum).build(),
        ));
        gst::PadProbeReturn::Ok
    });
}
