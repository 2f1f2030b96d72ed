// SPDX-License-Identifier: MPL-2.0
//! Implementation of `loadingoverlay`: a BaseTransform that is in passthrough mode (the input
//! buffer is pushed as is, never mapped or copied) except while it draws, when it works in place.
//! The decision is taken per buffer in `before_transform`, before BaseTransform looks at the
//! passthrough flag for that buffer.

use super::render::{self, Domain, Overlay, PixelLayout};
use super::{DEFAULT_TEXT, DRAWING_MESSAGE, LOADING_EVENT, ONLINE_EVENT};
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::{VideoFormat, VideoInfo};
use std::sync::{LazyLock, Mutex};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "loadingoverlay",
        gst::DebugColorFlags::empty(),
        Some("Rivulet loading picture overlay"),
    )
});

const DEFAULT_FORCE: bool = false;
const DEFAULT_LAST_FRAME_MAX_AGE: u64 = 5_000_000_000;

/// The formats drawn natively.
const FORMATS: &[VideoFormat] = &[
    VideoFormat::Rgb,
    VideoFormat::Bgr,
    VideoFormat::Rgba,
    VideoFormat::Bgra,
    VideoFormat::Argb,
    VideoFormat::Abgr,
    VideoFormat::Rgbx,
    VideoFormat::Bgrx,
    VideoFormat::Xrgb,
    VideoFormat::Xbgr,
    VideoFormat::I420,
    VideoFormat::Yv12,
    VideoFormat::Nv12,
    VideoFormat::Nv21,
    VideoFormat::Y42b,
    VideoFormat::Y444,
];

fn layout_of(format: VideoFormat) -> Option<PixelLayout> {
    use PixelLayout::{Packed, Yuv};
    let p = |bpp, rgb, alpha| Some(Packed { bpp, rgb, alpha });
    match format {
        VideoFormat::Rgb => p(3, [0, 1, 2], None),
        VideoFormat::Bgr => p(3, [2, 1, 0], None),
        VideoFormat::Rgba => p(4, [0, 1, 2], Some(3)),
        VideoFormat::Rgbx => p(4, [0, 1, 2], None),
        VideoFormat::Bgra => p(4, [2, 1, 0], Some(3)),
        VideoFormat::Bgrx => p(4, [2, 1, 0], None),
        VideoFormat::Argb => p(4, [1, 2, 3], Some(0)),
        VideoFormat::Xrgb => p(4, [1, 2, 3], None),
        VideoFormat::Abgr => p(4, [3, 2, 1], Some(0)),
        VideoFormat::Xbgr => p(4, [3, 2, 1], None),
        VideoFormat::I420
        | VideoFormat::Yv12
        | VideoFormat::Nv12
        | VideoFormat::Nv21
        | VideoFormat::Y42b
        | VideoFormat::Y444 => Some(Yuv),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct Settings {
    force: bool,
    last_frame_max_age: u64,
    text: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            force: DEFAULT_FORCE,
            last_frame_max_age: DEFAULT_LAST_FRAME_MAX_AGE,
            text: DEFAULT_TEXT.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Loading,
    Force,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Loading => "loading",
            Reason::Force => "force",
        }
    }
}

/// The current loading period, from a `rivulet-loading` event.
#[derive(Debug, Clone)]
struct Loading {
    pipeline: String,
    reason: String,
    show_picture: bool,
}

/// What the canvas was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Background {
    Grey,
    /// The last real frame with this generation number.
    Frame(u64),
}

struct LastFrame {
    buffer: gst::Buffer,
    running_time: Option<gst::ClockTime>,
    generation: u64,
}

struct Negotiated {
    info: VideoInfo,
    layout: PixelLayout,
    domain: Domain,
    text: String,
    /// Sprites for this size, pre-rendered at the first loading frame (so that streams that
    /// never load never pay for them).
    overlay: Option<Overlay>,
    canvas: Vec<u8>,
    /// The canvas as packed pixels (packed RGB layouts only).
    expanded: Vec<u8>,
    background: Option<Background>,
}

#[derive(Default)]
struct State {
    negotiated: Option<Negotiated>,
    loading: Option<Loading>,
    drawing: Option<Reason>,
    last_frame: Option<LastFrame>,
    generation: u64,
    /// Running time of the buffer being processed (set in `before_transform`).
    current_running_time: Option<gst::ClockTime>,
    /// `last-frame-max-age` as read for the buffer being processed.
    current_max_age: u64,
}

/// A change of drawing state, announced once the state lock is released.
struct Transition {
    drawing: bool,
    reason: Reason,
    running_time: Option<gst::ClockTime>,
    loading: Option<Loading>,
}

#[derive(Default)]
pub struct LoadingOverlay {
    settings: Mutex<Settings>,
    state: Mutex<State>,
}

impl LoadingOverlay {
    /// Posts the message and notifies `drawing`; called without any lock held.
    fn announce(&self, t: Transition) {
        let obj = self.obj();
        obj.set_passthrough(!t.drawing);
        gst::info!(
            CAT,
            imp = self,
            "{} drawing ({}) at {}",
            if t.drawing { "Start" } else { "Stop" },
            t.reason.as_str(),
            t.running_time.display()
        );
        let mut s = gst::Structure::builder(DRAWING_MESSAGE)
            .field("drawing", t.drawing)
            .field("reason", t.reason.as_str())
            .field_if_some("running-time", t.running_time);
        if let Some(l) = &t.loading {
            s = s
                .field("pipeline", l.pipeline.as_str())
                .field("loading-reason", l.reason.as_str());
        }
        let msg = gst::message::Element::builder(s.build()).src(&*obj).build();
        if obj.post_message(msg).is_err() {
            gst::debug!(CAT, imp = self, "No bus to post the drawing message on");
        }
        obj.notify("drawing");
    }

    /// Ends drawing (if drawing) and the loading period; `clear_frame` also forgets the last
    /// real frame. Returns the transition to announce.
    fn reset(state: &mut State, clear_frame: bool) -> Option<Transition> {
        let loading = state.loading.take();
        if clear_frame {
            state.last_frame = None;
            if let Some(n) = state.negotiated.as_mut() {
                n.background = None;
            }
        }
        state.drawing.take().map(|reason| Transition {
            drawing: false,
            reason,
            running_time: state.current_running_time,
            loading,
        })
    }

    /// Draws the loading picture into `buf` (in place).
    fn draw(&self, state: &mut State, buf: &mut gst::BufferRef) -> Result<(), gst::FlowError> {
        let now = state.current_running_time;
        let max_age = state.current_max_age;
        let Some(neg) = state.negotiated.as_mut() else {
            gst::element_imp_error!(
                self,
                gst::CoreError::Negotiation,
                ["loadingoverlay received a buffer before caps were negotiated"]
            );
            return Err(gst::FlowError::NotNegotiated);
        };
        if neg.overlay.is_none() {
            let start = std::time::Instant::now();
            let overlay = Overlay::new(neg.info.width(), neg.info.height(), neg.domain, &neg.text);
            if overlay.text.is_none() && !neg.text.is_empty() {
                gst::warning!(
                    CAT,
                    imp = self,
                    "The text {:?} has no drawable glyphs; drawing the spinner only",
                    neg.text
                );
            }
            gst::debug!(
                CAT,
                imp = self,
                "Pre-rendered sprites for {}x{} in {:?}",
                neg.info.width(),
                neg.info.height(),
                start.elapsed()
            );
            neg.overlay = Some(overlay);
        }
        let Some(overlay) = neg.overlay.as_ref() else {
            return Err(gst::FlowError::Error); // just set above
        };
        // The last real frame if it is recent enough (running times known and age < max).
        let fresh = state
            .last_frame
            .as_ref()
            .filter(|lf| match (now, lf.running_time) {
                (Some(now), Some(then)) => now >= then && (now - then).nseconds() < max_age,
                _ => false,
            });
        let wanted = fresh.map_or(Background::Grey, |lf| Background::Frame(lf.generation));
        if neg.background != Some(wanted) {
            let mut built = false;
            if let Some(lf) = fresh {
                match gst_video::VideoFrameRef::from_buffer_ref_readable(
                    lf.buffer.as_ref(),
                    &neg.info,
                ) {
                    Ok(frame) => {
                        let stride = frame.plane_stride()[0].max(0) as usize;
                        let data = frame.plane_data(0).unwrap_or(&[]);
                        built = if neg.layout.is_rgb() {
                            overlay.rgb_canvas(data, stride, neg.layout, &mut neg.canvas)
                        } else {
                            overlay.luma_canvas(data, stride, &mut neg.canvas)
                        };
                    }
                    Err(err) => {
                        gst::warning!(CAT, imp = self, "Cannot map the last frame: {err}");
                    }
                }
            }
            if !built {
                overlay.grey_canvas(&mut neg.canvas);
            }
            if let PixelLayout::Packed { bpp, alpha, .. } = neg.layout {
                overlay.expand_packed(&neg.canvas, bpp, alpha, &mut neg.expanded);
            }
            neg.background = Some(if built { wanted } else { Background::Grey });
            gst::debug!(CAT, imp = self, "Background now {:?}", neg.background);
        }

        let index = render::spinner_index(now.map_or(0, gst::ClockTime::nseconds));
        let mut frame = gst_video::VideoFrameRef::from_buffer_ref_writable(buf, &neg.info)
            .map_err(|err| {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ["Cannot map the video frame for writing: {err}"]
                );
                gst::FlowError::Error
            })?;
        let ok = match neg.layout {
            PixelLayout::Packed { bpp, alpha, .. } => {
                let stride = frame.plane_stride()[0].max(0) as usize;
                let dst = frame.plane_data_mut(0).unwrap_or(&mut []);
                overlay.write_packed(&neg.canvas, &neg.expanded, index, dst, stride, bpp, alpha)
            }
            PixelLayout::Yuv => {
                let stride = frame.plane_stride()[0].max(0) as usize;
                let ok = {
                    let dst = frame.plane_data_mut(0).unwrap_or(&mut []);
                    overlay.write_luma(&neg.canvas, index, dst, stride)
                };
                for p in 1..frame.n_planes() {
                    if let Ok(chroma) = frame.plane_data_mut(p) {
                        chroma.fill(128);
                    }
                }
                ok
            }
        };
        if !ok {
            gst::element_imp_error!(
                self,
                gst::StreamError::Format,
                ["Video frame smaller than its caps say ({:?})", neg.info]
            );
            return Err(gst::FlowError::Error);
        }
        Ok(())
    }
}

#[glib::object_subclass]
impl ObjectSubclass for LoadingOverlay {
    const NAME: &'static str = "GstLoadingOverlay";
    type Type = super::LoadingOverlay;
    type ParentType = gst_base::BaseTransform;
}

impl ObjectImpl for LoadingOverlay {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecBoolean::builder("force")
                    .nick("Force")
                    .blurb("Draw the loading picture regardless of loading events (from the next buffer)")
                    .default_value(DEFAULT_FORCE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("last-frame-max-age")
                    .nick("Last frame max age")
                    .blurb("GstClockTime (ns): the last real frame is the background only if it is younger than this (by running time); otherwise mid-grey")
                    .default_value(DEFAULT_LAST_FRAME_MAX_AGE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("text")
                    .nick("Text")
                    .blurb("Text drawn above the spinner")
                    .default_value(Some(DEFAULT_TEXT))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("drawing")
                    .nick("Drawing")
                    .blurb("Whether frames are currently replaced by the loading picture")
                    .default_value(false)
                    .read_only()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.settings.lock().unwrap();
        match pspec.name() {
            "force" => {
                let force = value.get().expect("type checked upstream");
                gst::info!(CAT, imp = self, "force {} -> {}", settings.force, force);
                settings.force = force;
            }
            "last-frame-max-age" => {
                settings.last_frame_max_age = value.get().expect("type checked upstream");
            }
            "text" => {
                settings.text = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_default();
            }
            // GLib only calls this for the writable properties installed above.
            other => unreachable!("unknown writable property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "force" => self.settings.lock().unwrap().force.to_value(),
            "last-frame-max-age" => self.settings.lock().unwrap().last_frame_max_age.to_value(),
            "text" => self.settings.lock().unwrap().text.to_value(),
            "drawing" => self.state.lock().unwrap().drawing.is_some().to_value(),
            // GLib only calls this for the properties installed above.
            other => unreachable!("unknown property {other}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        self.obj().set_passthrough(true);
    }
}

impl GstObjectImpl for LoadingOverlay {}

impl ElementImpl for LoadingOverlay {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Loading overlay",
                "Filter/Effect/Video",
                "Passes video through; while upstream loads, draws the loading picture \
                 (dimmed greyscale last frame, text and spinner)",
                "Rivulet developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static PAD_TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new()
                .format_list(FORMATS.iter().copied())
                .build();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid src pad template"),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid sink pad template"),
            ]
        });
        PAD_TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for LoadingOverlay {
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = true;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        *self.state.lock().unwrap() = State::default();
        self.obj().set_passthrough(true);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        let transition = {
            let mut state = self.state.lock().unwrap();
            let t = Self::reset(&mut state, true);
            *state = State::default();
            t
        };
        if let Some(t) = transition {
            self.announce(t);
        }
        self.obj().set_passthrough(true);
        Ok(())
    }

    fn set_caps(&self, incaps: &gst::Caps, _outcaps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = VideoInfo::from_caps(incaps)
            .map_err(|_| gst::loggable_error!(CAT, "Cannot parse video caps {incaps}"))?;
        let layout = layout_of(info.format()).ok_or_else(|| {
            gst::loggable_error!(CAT, "Unsupported video format {:?}", info.format())
        })?;
        let domain = if layout.is_rgb()
            || info.colorimetry().range() == gst_video::VideoColorRange::Range0_255
        {
            Domain::FULL
        } else {
            Domain::LIMITED
        };
        let text = self.settings.lock().unwrap().text.clone();
        let mut state = self.state.lock().unwrap();
        let same = state.negotiated.as_ref().is_some_and(|n| {
            n.info.format() == info.format()
                && n.info.width() == info.width()
                && n.info.height() == info.height()
                && n.domain == domain
                && n.text == text
        });
        if same {
            if let Some(n) = state.negotiated.as_mut() {
                n.info = info;
            }
            return Ok(());
        }
        gst::debug!(
            CAT,
            imp = self,
            "Negotiated {}x{} {:?}",
            info.width(),
            info.height(),
            info.format()
        );
        // A last frame of another size or format cannot be the background.
        state.last_frame = None;
        state.negotiated = Some(Negotiated {
            info,
            layout,
            domain,
            text,
            overlay: None,
            canvas: Vec::new(),
            expanded: Vec::new(),
            background: None,
        });
        Ok(())
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        use gst::EventView;
        let transition = match event.view() {
            EventView::CustomDownstream(ev) => match ev.structure() {
                Some(s) if s.name() == LOADING_EVENT => {
                    let loading = Loading {
                        pipeline: s.get::<String>("pipeline").unwrap_or_default(),
                        reason: s.get::<String>("reason").unwrap_or_default(),
                        show_picture: s.get::<bool>("show-picture").unwrap_or(true),
                    };
                    if s.get::<bool>("show-picture").is_err() && s.has_field("show-picture") {
                        gst::warning!(
                            CAT,
                            imp = self,
                            "{LOADING_EVENT}: show-picture is not a bool, using true: {s}"
                        );
                    }
                    gst::info!(CAT, imp = self, "Loading: {loading:?}");
                    self.state.lock().unwrap().loading = Some(loading);
                    None
                }
                Some(s) if s.name() == ONLINE_EVENT => {
                    gst::info!(CAT, imp = self, "Online: {s}");
                    self.state.lock().unwrap().loading = None;
                    None
                }
                _ => None,
            },
            EventView::FlushStop(_) | EventView::StreamStart(_) => {
                let mut state = self.state.lock().unwrap();
                Self::reset(&mut state, true)
            }
            EventView::Eos(_) => {
                let mut state = self.state.lock().unwrap();
                Self::reset(&mut state, false)
            }
            _ => None,
        };
        if let Some(t) = transition {
            self.announce(t);
        }
        self.parent_sink_event(event)
    }

    fn before_transform(&self, inbuf: &gst::BufferRef) {
        let (force, max_age) = {
            let s = self.settings.lock().unwrap();
            (s.force, s.last_frame_max_age)
        };
        let running_time = inbuf.pts().and_then(|pts| {
            self.obj()
                .segment()
                .downcast_ref::<gst::ClockTime>()
                .and_then(|seg| seg.to_running_time(pts))
        });
        let transition = {
            let mut state = self.state.lock().unwrap();
            state.current_running_time = running_time.or(state.current_running_time);
            state.current_max_age = max_age;
            let want = if force {
                Some(Reason::Force)
            } else if state.loading.as_ref().is_some_and(|l| l.show_picture) {
                Some(Reason::Loading)
            } else {
                None
            };
            match (state.drawing, want) {
                (None, Some(_)) | (Some(_), None) => {
                    let old = state.drawing;
                    state.drawing = want;
                    Some(Transition {
                        drawing: want.is_some(),
                        reason: want.or(old).unwrap_or(Reason::Loading),
                        running_time: state.current_running_time,
                        loading: state.loading.clone(),
                    })
                }
                _ => {
                    state.drawing = want;
                    None
                }
            }
        };
        if let Some(t) = transition {
            self.announce(t);
        }
    }

    fn transform_ip_passthrough(
        &self,
        buf: &gst::Buffer,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        // Keep a reference (no copy) to the last real frame for the next loading picture.
        let mut state = self.state.lock().unwrap();
        state.generation += 1;
        let generation = state.generation;
        let running_time = state.current_running_time;
        state.last_frame = Some(LastFrame {
            buffer: buf.clone(),
            running_time,
            generation,
        });
        Ok(gst::FlowSuccess::Ok)
    }

    fn transform_ip(&self, buf: &mut gst::BufferRef) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut state = self.state.lock().unwrap();
        self.draw(&mut state, buf)?;
        Ok(gst::FlowSuccess::Ok)
    }
}
