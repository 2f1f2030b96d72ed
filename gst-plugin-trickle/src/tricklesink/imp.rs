// SPDX-License-Identifier: MPL-2.0
//! `tricklesink` implementation: a bin with request pads, encoders, `mpegtsmux` and the byte
//! sink.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use super::bytesink::TrickleByteSink;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "tricklesink",
        gst::DebugColorFlags::empty(),
        Some("Trickle publisher sink"),
    )
});

pub(crate) const DEFAULT_MIN_SEGMENT_DURATION: gst::ClockTime = gst::ClockTime::SECOND;
pub(crate) const DEFAULT_IDR_INTERVAL: gst::ClockTime = gst::ClockTime::from_seconds(2);
pub(crate) const DEFAULT_KEY_INT_MAX: u32 = 0;
pub(crate) const DEFAULT_BITRATE: u32 = 2000;
pub(crate) const DEFAULT_AUDIO_BITRATE: i32 = 64_000;
pub(crate) const DEFAULT_RETRY_PAUSE_MS: u32 = 250;
pub(crate) const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 10_000;
pub(crate) const DEFAULT_TLS_VERIFY: bool = true;
pub(crate) const DEFAULT_DELETE_ON_CLOSE: bool = true;

/// Caps of the `ts` pad and of the byte sink.
pub(crate) fn ts_sink_caps() -> gst::Caps {
    gst::Caps::builder("video/mpegts")
        .field("systemstream", true)
        .build()
}

/// What the user set.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub url: Option<String>,
    pub min_segment_duration: gst::ClockTime,
    pub idr_interval: gst::ClockTime,
    pub key_int_max: u32,
    pub bitrate: u32,
    pub audio_bitrate: i32,
    pub retry_pause: Duration,
    pub connect_timeout: Duration,
    pub tls_verify: bool,
    pub delete_on_close: bool,
    /// `auth-token`: sent as `Authorization: Bearer …` (write-only property).
    pub auth_token: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            url: None,
            min_segment_duration: DEFAULT_MIN_SEGMENT_DURATION,
            idr_interval: DEFAULT_IDR_INTERVAL,
            key_int_max: DEFAULT_KEY_INT_MAX,
            bitrate: DEFAULT_BITRATE,
            audio_bitrate: DEFAULT_AUDIO_BITRATE,
            retry_pause: Duration::from_millis(DEFAULT_RETRY_PAUSE_MS.into()),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS.into()),
            tls_verify: DEFAULT_TLS_VERIFY,
            delete_on_close: DEFAULT_DELETE_ON_CLOSE,
            auth_token: None,
        }
    }
}

/// Counters, read through the `stats` property.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stats {
    pub segments: u64,
    pub bytes: u64,
    pub last_seq: i64,
    pub last_publish_time: gst::ClockTime,
    pub failed_segments: u64,
    pub dropped_buffers: u64,
    pub forced_idrs: u64,
}

/// Shared between the bin and its byte sink.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub settings: Mutex<Settings>,
    pub stats: Mutex<Stats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Video,
    Audio,
    Ts,
}

struct Branch {
    kind: Kind,
    ghost: gst::GhostPad,
    elements: Vec<gst::Element>,
    mux_pad: Option<gst::Pad>,
    encoder: Option<gst::Element>,
}

#[derive(Default)]
struct Graph {
    bytesink: Option<TrickleByteSink>,
    mux: Option<gst::Element>,
    branches: Vec<Branch>,
}

#[derive(Default)]
pub struct TrickleSink {
    shared: Arc<Shared>,
    graph: Mutex<Graph>,
}

#[glib::object_subclass]
impl ObjectSubclass for TrickleSink {
    const NAME: &'static str = "GstTrickleSink";
    type Type = super::TrickleSink;
    type ParentType = gst::Bin;
}

fn make(factory: &str, name: &str) -> Result<gst::Element, gst::ErrorMessage> {
    gst::ElementFactory::make(factory)
        .name(name)
        .build()
        .map_err(|e| {
            gst::error_msg!(
                gst::CoreError::MissingPlugin,
                ["tricklesink needs the {factory} element: {e}"]
            )
        })
}

impl ObjectImpl for TrickleSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("url")
                    .nick("URL")
                    .blurb("Trickle channel URL to publish to (http:// or https://, without the /seq)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("min-segment-duration")
                    .nick("Minimum segment duration")
                    .blurb("A new segment starts at the first keyframe after this much stream time (nanoseconds)")
                    .default_value(DEFAULT_MIN_SEGMENT_DURATION.nseconds())
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("idr-interval")
                    .nick("IDR interval")
                    .blurb("Raw video input: force an IDR whenever this much PTS has passed since the last one (nanoseconds, 0 = never force)")
                    .default_value(DEFAULT_IDR_INTERVAL.nseconds())
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("key-int-max")
                    .nick("Max keyframe interval")
                    .blurb("Raw video input: x264enc key-int-max, in frames (0 = x264's default); idr-interval usually decides")
                    .default_value(DEFAULT_KEY_INT_MAX)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("bitrate")
                    .nick("Video bitrate")
                    .blurb("Raw video input: H.264 bitrate in kbit/s")
                    .minimum(1)
                    .maximum(2_048_000)
                    .default_value(DEFAULT_BITRATE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecInt::builder("audio-bitrate")
                    .nick("Audio bitrate")
                    .blurb("Raw audio input: Opus bitrate in bit/s")
                    .minimum(4000)
                    .maximum(650_000)
                    .default_value(DEFAULT_AUDIO_BITRATE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("retry-pause-ms")
                    .nick("Retry pause (ms)")
                    .blurb("Pause before re-POSTing a segment that failed before any byte was sent, in milliseconds")
                    .default_value(DEFAULT_RETRY_PAUSE_MS)
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
                glib::ParamSpecBoolean::builder("delete-on-close")
                    .nick("Delete on close")
                    .blurb("On EOS or stop, DELETE the channel after the final empty segment")
                    .default_value(DEFAULT_DELETE_ON_CLOSE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("auth-token")
                    .nick("Auth token")
                    .blurb("Bearer token sent on every request (a server behind bearer auth); write-only")
                    .write_only()
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("segments, bytes, last-seq, last-publish-time, failed-segments, dropped-buffers, forced-idrs (notified per segment)")
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
            "min-segment-duration" => {
                settings.min_segment_duration =
                    gst::ClockTime::from_nseconds(value.get::<u64>().unwrap())
            }
            "idr-interval" => {
                settings.idr_interval = gst::ClockTime::from_nseconds(value.get::<u64>().unwrap())
            }
            "key-int-max" => settings.key_int_max = value.get().unwrap(),
            "bitrate" => settings.bitrate = value.get().unwrap(),
            "audio-bitrate" => settings.audio_bitrate = value.get().unwrap(),
            "retry-pause-ms" => {
                settings.retry_pause = Duration::from_millis(value.get::<u32>().unwrap().into())
            }
            "connect-timeout-ms" => {
                settings.connect_timeout = Duration::from_millis(value.get::<u32>().unwrap().into())
            }
            "tls-verify" => settings.tls_verify = value.get().unwrap(),
            "delete-on-close" => settings.delete_on_close = value.get().unwrap(),
            "auth-token" => {
                settings.auth_token = value
                    .get::<Option<String>>()
                    .unwrap()
                    .filter(|t| !t.is_empty())
            }
            other => gst::warning!(CAT, imp = self, "unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.shared.settings.lock().unwrap();
        let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
        match pspec.name() {
            "url" => settings.url.to_value(),
            "min-segment-duration" => settings.min_segment_duration.nseconds().to_value(),
            "idr-interval" => settings.idr_interval.nseconds().to_value(),
            "key-int-max" => settings.key_int_max.to_value(),
            "bitrate" => settings.bitrate.to_value(),
            "audio-bitrate" => settings.audio_bitrate.to_value(),
            "retry-pause-ms" => ms(settings.retry_pause).to_value(),
            "connect-timeout-ms" => ms(settings.connect_timeout).to_value(),
            "tls-verify" => settings.tls_verify.to_value(),
            "delete-on-close" => settings.delete_on_close.to_value(),
            "stats" => {
                drop(settings);
                let s = self.shared.stats.lock().unwrap().clone();
                gst::Structure::builder("trickle-sink-stats")
                    .field("segments", s.segments)
                    .field("bytes", s.bytes)
                    .field("last-seq", s.last_seq)
                    .field("last-publish-time", s.last_publish_time)
                    .field("failed-segments", s.failed_segments)
                    .field("dropped-buffers", s.dropped_buffers)
                    .field("forced-idrs", s.forced_idrs)
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
        self.obj().set_element_flags(gst::ElementFlags::SINK);
    }
}

impl GstObjectImpl for TrickleSink {}

impl ElementImpl for TrickleSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Trickle sink",
                "Sink/Network/HTTP",
                "Publishes MPEG-TS to a trickle channel: raw video/audio (encoded H.264/Opus) or an MPEG-TS byte stream",
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
                    gst::PadDirection::Sink,
                    gst::PadPresence::Request,
                    &gst::Caps::new_empty_simple("video/x-raw"),
                )
                .unwrap(),
                gst::PadTemplate::new(
                    "audio_%u",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Request,
                    &gst::Caps::new_empty_simple("audio/x-raw"),
                )
                .unwrap(),
                gst::PadTemplate::new(
                    "ts",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Request,
                    &ts_sink_caps(),
                )
                .unwrap(),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn request_new_pad(
        &self,
        templ: &gst::PadTemplate,
        _name: Option<&str>,
        _caps: Option<&gst::Caps>,
    ) -> Option<gst::Pad> {
        let kind = match templ.name_template() {
            "video_%u" => Kind::Video,
            "audio_%u" => Kind::Audio,
            "ts" => Kind::Ts,
            _ => return None,
        };
        match self.add_branch(kind, templ) {
            Ok(pad) => Some(pad),
            Err(err) => {
                gst::warning!(CAT, imp = self, "cannot add a {kind:?} pad: {err}");
                self.post_error_message(err);
                None
            }
        }
    }

    fn release_pad(&self, pad: &gst::Pad) {
        let branch = {
            let mut graph = self.graph.lock().unwrap();
            let idx = graph
                .branches
                .iter()
                .position(|b| b.ghost.upcast_ref::<gst::Pad>() == pad);
            idx.map(|i| {
                let branch = graph.branches.remove(i);
                let mux = graph.mux.clone();
                // The last raw input gone: drop the muxer too, so a `ts` pad can follow.
                let unused_mux = if graph.branches.is_empty() {
                    graph.mux.take()
                } else {
                    None
                };
                (branch, mux, unused_mux)
            })
        };
        let Some((branch, mux, unused_mux)) = branch else {
            return;
        };
        let obj = self.obj();
        let _ = branch.ghost.set_active(false);
        let _ = obj.remove_pad(&branch.ghost);
        for element in &branch.elements {
            let _ = element.set_state(gst::State::Null);
            let _ = obj.remove(element);
        }
        if let (Some(mux), Some(mux_pad)) = (mux, branch.mux_pad) {
            mux.release_request_pad(&mux_pad);
        }
        if let Some(mux) = unused_mux {
            let _ = mux.set_state(gst::State::Null);
            let _ = obj.remove(&mux);
        }
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if transition == gst::StateChange::ReadyToPaused {
            self.configure_encoders();
        }
        self.parent_change_state(transition)
    }
}

impl BinImpl for TrickleSink {}

impl TrickleSink {
    /// The byte sink (and, for raw input, the muxer) created on the first request.
    fn ensure_output(
        &self,
        graph: &mut Graph,
        want_mux: bool,
    ) -> Result<Option<gst::Element>, gst::ErrorMessage> {
        let obj = self.obj();
        let add_err =
            |e: glib::BoolError| gst::error_msg!(gst::CoreError::Failed, ["tricklesink: {e}"]);
        if graph.bytesink.is_none() {
            let sink = TrickleByteSink::new("bytesink", self.shared.clone());
            obj.add(&sink).map_err(add_err)?;
            let _ = sink.sync_state_with_parent();
            graph.bytesink = Some(sink);
        }
        if !want_mux {
            return Ok(None);
        }
        if let Some(mux) = &graph.mux {
            return Ok(Some(mux.clone()));
        }
        let mux = make("mpegtsmux", "mux")?;
        obj.add(&mux).map_err(add_err)?;
        if let Some(sink) = &graph.bytesink {
            mux.link(sink)
                .map_err(|e| gst::error_msg!(gst::CoreError::Negotiation, ["tricklesink: {e}"]))?;
        }
        let _ = mux.sync_state_with_parent();
        graph.mux = Some(mux.clone());
        Ok(Some(mux))
    }

    fn add_branch(
        &self,
        kind: Kind,
        templ: &gst::PadTemplate,
    ) -> Result<gst::Pad, gst::ErrorMessage> {
        let obj = self.obj();
        let mut graph = self.graph.lock().unwrap();
        let has = |k: Kind| graph.branches.iter().any(|b| b.kind == k);
        if kind == Kind::Ts && !graph.branches.is_empty() {
            return Err(gst::error_msg!(
                gst::CoreError::Pad,
                ["tricklesink: the ts pad cannot be combined with other pads"]
            ));
        }
        if has(Kind::Ts) {
            return Err(gst::error_msg!(
                gst::CoreError::Pad,
                ["tricklesink: the ts pad is in use; raw video/audio pads cannot be added"]
            ));
        }
        if has(kind) {
            return Err(gst::error_msg!(
                gst::CoreError::Pad,
                ["tricklesink: only one {kind:?} pad is supported"]
            ));
        }
        let add_err =
            |e: glib::BoolError| gst::error_msg!(gst::CoreError::Failed, ["tricklesink: {e}"]);
        let link_err =
            |e: glib::BoolError| gst::error_msg!(gst::CoreError::Negotiation, ["tricklesink: {e}"]);
        let mux = self.ensure_output(&mut graph, kind != Kind::Ts)?;
        let settings = self.shared.settings.lock().unwrap().clone();

        let (name, elements, encoder) = match kind {
            Kind::Ts => ("ts".to_owned(), vec![], None),
            Kind::Video => {
                let convert = make("videoconvert", "video-convert")?;
                // 8-bit 4:2:0, which every WHEP/RTMP player decodes (docs/runner.md, "Media").
                let filter = make("capsfilter", "video-caps")?;
                filter.set_property(
                    "caps",
                    gst::Caps::builder("video/x-raw")
                        .field("format", "I420")
                        .build(),
                );
                let enc = make("x264enc", "video-encoder")?;
                enc.set_property_from_str("speed-preset", "superfast");
                enc.set_property_from_str("tune", "zerolatency");
                enc.set_property("bframes", 0u32);
                enc.set_property("bitrate", settings.bitrate);
                enc.set_property("key-int-max", settings.key_int_max);
                (
                    "video_0".to_owned(),
                    vec![convert, filter, enc.clone()],
                    Some(enc),
                )
            }
            Kind::Audio => {
                let convert = make("audioconvert", "audio-convert")?;
                let resample = make("audioresample", "audio-resample")?;
                let filter = make("capsfilter", "audio-caps")?;
                filter.set_property(
                    "caps",
                    gst::Caps::builder("audio/x-raw")
                        .field("rate", 48_000i32)
                        .field("channels", 1i32)
                        .build(),
                );
                let enc = make("opusenc", "audio-encoder")?;
                enc.set_property("bitrate", settings.audio_bitrate);
                (
                    "audio_0".to_owned(),
                    vec![convert, resample, filter, enc.clone()],
                    Some(enc),
                )
            }
        };
        for e in &elements {
            obj.add(e).map_err(add_err)?;
        }
        if elements.len() > 1 {
            gst::Element::link_many(&elements).map_err(link_err)?;
        }
        let mut mux_pad = None;
        if let (Some(mux), Some(last)) = (&mux, elements.last()) {
            let pad = mux.request_pad_simple("sink_%d").ok_or_else(|| {
                gst::error_msg!(gst::CoreError::Pad, ["mpegtsmux refused a sink pad"])
            })?;
            let src = last
                .static_pad("src")
                .ok_or_else(|| gst::error_msg!(gst::CoreError::Pad, ["encoder has no src pad"]))?;
            src.link(&pad).map_err(|e| {
                gst::error_msg!(gst::CoreError::Negotiation, ["tricklesink: {e:?}"])
            })?;
            mux_pad = Some(pad);
        }
        let target = match elements.first() {
            Some(first) => first.static_pad("sink"),
            None => graph.bytesink.as_ref().and_then(|s| s.static_pad("sink")),
        }
        .ok_or_else(|| gst::error_msg!(gst::CoreError::Pad, ["no sink pad to expose"]))?;

        if kind == Kind::Video
            && let Some(enc) = &encoder
            && let Some(enc_sink) = enc.static_pad("sink")
        {
            self.install_idr_probe(&enc_sink);
        }

        let ghost = gst::GhostPad::builder_from_template(templ)
            .name(name.as_str())
            .build();
        ghost.set_target(Some(&target)).map_err(add_err)?;
        if obj.current_state() > gst::State::Null {
            let _ = ghost.set_active(true);
        }
        obj.add_pad(&ghost).map_err(add_err)?;
        for e in &elements {
            let _ = e.sync_state_with_parent();
        }
        gst::info!(CAT, imp = self, "added {kind:?} input pad {name}");
        graph.branches.push(Branch {
            kind,
            ghost: ghost.clone(),
            elements,
            mux_pad,
            encoder,
        });
        Ok(ghost.upcast())
    }

    /// Force an IDR (downstream force-key-unit event, which mpegtsmux also answers with a
    /// fresh PAT/PMT) whenever `idr-interval` of PTS has passed since the last one.
    fn install_idr_probe(&self, enc_sink: &gst::Pad) {
        let shared = self.shared.clone();
        let last_forced: Mutex<Option<gst::ClockTime>> = Mutex::new(None);
        enc_sink.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            let Some(pts) = info.buffer().and_then(|b| b.pts()) else {
                return gst::PadProbeReturn::Ok;
            };
            let interval = shared.settings.lock().unwrap().idr_interval;
            if interval.is_zero() {
                return gst::PadProbeReturn::Ok;
            }
            let force = {
                let mut last = last_forced.lock().unwrap();
                match *last {
                    // The first frame is an IDR anyway.
                    None => {
                        *last = Some(pts);
                        false
                    }
                    Some(prev) if pts < prev || pts - prev >= interval => {
                        *last = Some(pts);
                        true
                    }
                    Some(_) => false,
                }
            };
            if force {
                shared.stats.lock().unwrap().forced_idrs += 1;
                let event = gst_video::DownstreamForceKeyUnitEvent::builder()
                    .timestamp(pts)
                    .all_headers(true)
                    .build();
                // No lock held; the event is serialized before this buffer.
                let _ = pad.send_event(event);
            }
            gst::PadProbeReturn::Ok
        });
    }

    /// Apply the encoder settings (they may have changed since the pads were requested).
    fn configure_encoders(&self) {
        let settings = self.shared.settings.lock().unwrap().clone();
        let encoders: Vec<(Kind, gst::Element)> = self
            .graph
            .lock()
            .unwrap()
            .branches
            .iter()
            .filter_map(|b| b.encoder.clone().map(|e| (b.kind, e)))
            .collect();
        for (kind, enc) in encoders {
            match kind {
                Kind::Video => {
                    enc.set_property("bitrate", settings.bitrate);
                    enc.set_property("key-int-max", settings.key_int_max);
                }
                Kind::Audio => enc.set_property("bitrate", settings.audio_bitrate),
                Kind::Ts => {}
            }
        }
    }
}
