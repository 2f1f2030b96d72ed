// SPDX-License-Identifier: MPL-2.0
//! `rivulettint` implementation: a plain `gst::Element` with one sink and one src pad, so that
//! the contract's custom events, the caps at the params' size and the frames all leave from
//! one place (the chain function) in order.

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::prelude::*;
use std::sync::{Arc, LazyLock, Mutex, mpsc};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "rivulettint",
        gst::DebugColorFlags::empty(),
        Some("Rivulet example tint element"),
    )
});

/// The contract's event names (strings: an external element depends on no Rivulet crate).
const LOADING_EVENT: &str = "rivulet-loading";
const ONLINE_EVENT: &str = "rivulet-online";
const PIPELINE_NAME: &str = "rivulettint";

const DEFAULT_SIZE: u32 = 512;
const DEFAULT_COLOR: [f64; 3] = [1.0, 0.8, 0.6];
const DEFAULT_STRENGTH: f64 = 1.0;

/// The params in force: full replacement, every key not given takes its default.
#[derive(Debug, Clone, PartialEq)]
struct Params {
    width: u32,
    height: u32,
    show_reloading_frame: bool,
    color: [f64; 3],
    strength: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            width: DEFAULT_SIZE,
            height: DEFAULT_SIZE,
            show_reloading_frame: true,
            color: DEFAULT_COLOR,
            strength: DEFAULT_STRENGTH,
        }
    }
}

fn parse_params(json: &str) -> Result<Params, String> {
    if json.trim().is_empty() {
        return Ok(Params::default());
    }
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("params must be a JSON object")?;
    let size = |key: &str| -> Result<u32, String> {
        match obj.get(key) {
            None => Ok(DEFAULT_SIZE),
            Some(x) => match x.as_u64() {
                Some(n) if (384..=1024).contains(&n) && n % 64 == 0 => Ok(n as u32),
                _ => Err(format!(
                    "{key} must be an integer from 384 to 1024, a multiple of 64; got {x}"
                )),
            },
        }
    };
    let show_reloading_frame = match obj.get("show_reloading_frame") {
        None => true,
        Some(x) => x
            .as_bool()
            .ok_or_else(|| format!("show_reloading_frame must be a boolean; got {x}"))?,
    };
    let color = match obj.get("color") {
        None => DEFAULT_COLOR,
        Some(x) => {
            let values: Vec<f64> = x
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
                .unwrap_or_default();
            match values.as_slice() {
                [r, g, b] if [r, g, b].iter().all(|c| (0.0..=2.0).contains(*c)) => [*r, *g, *b],
                _ => return Err(format!("color must be three numbers in [0, 2]; got {x}")),
            }
        }
    };
    let strength = match obj.get("strength") {
        None => DEFAULT_STRENGTH,
        Some(x) => match x.as_f64() {
            Some(s) if (0.0..=1.0).contains(&s) => s,
            _ => return Err(format!("strength must be a number in [0, 1]; got {x}")),
        },
    };
    Ok(Params {
        width: size("width")?,
        height: size("height")?,
        show_reloading_frame,
        color,
        strength,
    })
}

/// What a "load" makes: one 8-bit table per channel for the colour gains.
type Lut = [[u8; 256]; 3];

fn build_lut(color: [f64; 3]) -> Lut {
    let mut lut = [[0u8; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            *out = (v as f64 * color[c]).round().clamp(0.0, 255.0) as u8;
        }
    }
    lut
}

struct Settings {
    /// The JSON last accepted (read back by the `params` property).
    json: String,
    params: Params,
    /// New params the streaming thread has not picked up yet.
    pending: bool,
}

#[derive(Default)]
struct State {
    in_info: Option<gst_video::VideoInfo>,
    out_info: Option<gst_video::VideoInfo>,
    /// The params the streaming thread applies.
    active: Params,
    lut: Option<Arc<Lut>>,
    /// A reload in progress: the loader thread's answer.
    loading: Option<mpsc::Receiver<Lut>>,
}

pub struct RivuletTint {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    settings: Mutex<Settings>,
    state: Mutex<State>,
}

fn out_info(
    in_info: &gst_video::VideoInfo,
    p: &Params,
) -> Result<gst_video::VideoInfo, gst::FlowError> {
    gst_video::VideoInfo::builder(in_info.format(), p.width, p.height)
        .fps(in_info.fps())
        .par(gst::Fraction::new(1, 1))
        .build()
        .map_err(|_| gst::FlowError::NotNegotiated)
}

fn strip_size(mut caps: gst::Caps) -> gst::Caps {
    for s in caps.make_mut().iter_mut() {
        s.remove_fields(["width", "height", "pixel-aspect-ratio"]);
    }
    caps
}

impl RivuletTint {
    fn loading_event(show_picture: bool) -> gst::Event {
        gst::event::CustomDownstream::new(
            gst::Structure::builder(LOADING_EVENT)
                .field("pipeline", PIPELINE_NAME)
                .field("reason", "reload")
                .field("show-picture", show_picture)
                .build(),
        )
    }

    fn online_event() -> gst::Event {
        gst::event::CustomDownstream::new(
            gst::Structure::builder(ONLINE_EVENT)
                .field("pipeline", PIPELINE_NAME)
                .build(),
        )
    }

    fn sink_chain(&self, inbuf: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut events = Vec::new();
        let new_params = {
            let mut s = self.settings.lock().unwrap();
            std::mem::take(&mut s.pending).then(|| s.params.clone())
        };
        let (in_info, out_info, lut, strength) = {
            let mut st = self.state.lock().unwrap();
            if let Some(new) = new_params {
                let resized = (new.width, new.height) != (st.active.width, st.active.height);
                if resized || new.color != st.active.color {
                    gst::info!(CAT, imp = self, "reloading for {new:?}");
                    events.push(Self::loading_event(new.show_reloading_frame));
                    let (tx, rx) = mpsc::sync_channel(1);
                    let color = new.color;
                    std::thread::Builder::new()
                        .name("rivulettint-loader".into())
                        .spawn(move || {
                            let _ = tx.send(build_lut(color));
                        })
                        .map_err(|e| {
                            gst::element_imp_error!(
                                self,
                                gst::CoreError::Failed,
                                ["Cannot start the loader thread: {e}"]
                            );
                            gst::FlowError::Error
                        })?;
                    st.loading = Some(rx);
                }
                if resized && let Some(info) = st.in_info.clone() {
                    let o = out_info(&info, &new)?;
                    let caps = o.to_caps().map_err(|_| gst::FlowError::NotNegotiated)?;
                    events.push(gst::event::Caps::new(&caps));
                    st.out_info = Some(o);
                }
                st.active = new;
            }
            if let Some(rx) = &st.loading {
                match rx.try_recv() {
                    Ok(lut) => {
                        st.lut = Some(Arc::new(lut));
                        st.loading = None;
                        events.push(Self::online_event());
                    }
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => {
                        gst::element_imp_warning!(
                            self,
                            gst::CoreError::Failed,
                            ["The colour table could not be built; the previous one stays"]
                        );
                        st.loading = None;
                        events.push(Self::online_event());
                    }
                }
            }
            let (Some(i), Some(o)) = (st.in_info.clone(), st.out_info.clone()) else {
                gst::element_imp_error!(self, gst::CoreError::Negotiation, ["Buffer before caps"]);
                return Err(gst::FlowError::NotNegotiated);
            };
            // Frames pass untinted while loading.
            let lut = st.loading.is_none().then(|| st.lut.clone()).flatten();
            (i, o, lut, st.active.strength)
        };
        for e in events {
            let is_caps = e.type_() == gst::EventType::Caps;
            if !self.srcpad.push_event(e) && is_caps {
                return Err(gst::FlowError::NotNegotiated);
            }
        }

        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(inbuf.as_ref(), &in_info)
            .map_err(|_| {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Format,
                    ["Input buffer does not match its caps {in_info:?}"]
                );
                gst::FlowError::Error
            })?;
        let mut outbuf =
            gst::Buffer::with_size(out_info.size()).map_err(|_| gst::FlowError::Error)?;
        {
            let b = outbuf.get_mut().ok_or(gst::FlowError::Error)?;
            b.set_pts(inbuf.pts());
            b.set_dts(inbuf.dts());
            b.set_duration(inbuf.duration());
            let mut map = b.map_writable().map_err(|_| gst::FlowError::Error)?;
            render(
                &frame,
                &in_info,
                &out_info,
                map.as_mut_slice(),
                lut.as_deref(),
                strength,
            )
            .ok_or(gst::FlowError::Error)?;
        }
        self.srcpad.push(outbuf)
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        if let gst::EventView::Caps(c) = event.view() {
            let info = match gst_video::VideoInfo::from_caps(c.caps()) {
                Ok(i) => i,
                Err(_) => {
                    gst::warning!(CAT, imp = self, "unusable caps {:?}", c.caps());
                    return false;
                }
            };
            let caps = {
                let mut st = self.state.lock().unwrap();
                let Ok(o) = out_info(&info, &st.active) else {
                    return false;
                };
                let Ok(caps) = o.to_caps() else {
                    return false;
                };
                st.in_info = Some(info);
                st.out_info = Some(o);
                caps
            };
            return self.srcpad.push_event(gst::event::Caps::new(&caps));
        }
        gst::Pad::event_default(pad, Some(&*self.obj()), event)
    }

    fn sink_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        if let gst::QueryViewMut::Caps(q) = query.view_mut() {
            // Any size in; the formats downstream takes.
            let downstream = strip_size(self.srcpad.peer_query_caps(None));
            let mut caps = downstream
                .intersect_with_mode(&pad.pad_template_caps(), gst::CapsIntersectMode::First);
            if let Some(f) = q.filter() {
                caps = f.intersect_with_mode(&caps, gst::CapsIntersectMode::First);
            }
            q.set_result(&caps);
            return true;
        }
        gst::Pad::query_default(pad, Some(&*self.obj()), query)
    }

    fn src_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        if let gst::QueryViewMut::Caps(q) = query.view_mut() {
            // The formats upstream offers, at the params' size.
            let (w, h) = {
                let st = self.state.lock().unwrap();
                let s = self.settings.lock().unwrap();
                let p = if s.pending { &s.params } else { &st.active };
                (p.width as i32, p.height as i32)
            };
            let upstream = strip_size(self.sinkpad.peer_query_caps(None));
            let mut caps = upstream
                .intersect_with_mode(&pad.pad_template_caps(), gst::CapsIntersectMode::First);
            for s in caps.make_mut().iter_mut() {
                s.set("width", w);
                s.set("height", h);
                s.set("pixel-aspect-ratio", gst::Fraction::new(1, 1));
            }
            if let Some(f) = q.filter() {
                caps = f.intersect_with_mode(&caps, gst::CapsIntersectMode::First);
            }
            q.set_result(&caps);
            return true;
        }
        gst::Pad::query_default(pad, Some(&*self.obj()), query)
    }

    /// The initial load, in the READY→PAUSED change (as the contract asks: a start failure is
    /// an element error; building a table cannot fail).
    fn start(&self) {
        let params = {
            let mut s = self.settings.lock().unwrap();
            s.pending = false;
            s.params.clone()
        };
        let lut = Arc::new(build_lut(params.color));
        *self.state.lock().unwrap() = State {
            active: params,
            lut: Some(lut),
            ..Default::default()
        };
        gst::info!(CAT, imp = self, "started");
    }
}

/// Cover-scales (nearest neighbour) and centre-crops `frame` into `out`, then applies the
/// colour table mixed by `strength`. `None` if a plane is smaller than its info says.
fn render(
    frame: &gst_video::VideoFrameRef<&gst::BufferRef>,
    in_info: &gst_video::VideoInfo,
    out_info: &gst_video::VideoInfo,
    out: &mut [u8],
    lut: Option<&Lut>,
    strength: f64,
) -> Option<()> {
    let (iw, ih) = (in_info.width() as usize, in_info.height() as usize);
    let (ow, oh) = (out_info.width() as usize, out_info.height() as usize);
    let bpp = *in_info.format_info().pixel_stride().first()? as usize;
    let istride = *frame.plane_stride().first()? as usize;
    let ostride = *out_info.stride().first()? as usize;
    let src = frame.plane_data(0).ok()?;
    if iw == 0 || ih == 0 || bpp < 3 {
        return None;
    }
    let scale = f64::max(ow as f64 / iw as f64, oh as f64 / ih as f64);
    let (x0, y0) = (
        (iw as f64 - ow as f64 / scale) / 2.0,
        (ih as f64 - oh as f64 / scale) / 2.0,
    );
    let map = |o: usize, origin: f64, max: usize| {
        ((origin + (o as f64 + 0.5) / scale) as usize).min(max - 1)
    };
    let xmap: Vec<usize> = (0..ow).map(|x| map(x, x0, iw) * bpp).collect();
    // The table mixed with the identity by `strength`, once per frame.
    let mut table = [[0u8; 256]; 3];
    for (c, t) in table.iter_mut().enumerate() {
        for (v, o) in t.iter_mut().enumerate() {
            *o = match lut {
                Some(l) => (v as f64 * (1.0 - strength) + l[c][v] as f64 * strength)
                    .round()
                    .clamp(0.0, 255.0) as u8,
                None => v as u8,
            };
        }
    }
    for y in 0..oh {
        let iy = map(y, y0, ih);
        let irow = src.get(iy * istride..iy * istride + iw * bpp)?;
        let orow = out.get_mut(y * ostride..y * ostride + ow * bpp)?;
        for (opx, &ix) in orow.chunks_exact_mut(bpp).zip(&xmap) {
            let ipx = irow.get(ix..ix + bpp)?;
            opx[0] = table[0][ipx[0] as usize];
            opx[1] = table[1][ipx[1] as usize];
            opx[2] = table[2][ipx[2] as usize];
            if bpp == 4 {
                opx[3] = ipx[3];
            }
        }
    }
    Some(())
}

#[glib::object_subclass]
impl ObjectSubclass for RivuletTint {
    const NAME: &'static str = "GstRivuletTint";
    type Type = super::RivuletTint;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let templ = klass.pad_template("sink").unwrap(); // registered in pad_templates()
        let sinkpad = gst::Pad::builder_from_template(&templ)
            .chain_function(|_pad, parent, buffer| {
                RivuletTint::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |this| this.sink_chain(buffer),
                )
            })
            .event_function(|pad, parent, event| {
                RivuletTint::catch_panic_pad_function(
                    parent,
                    || false,
                    |this| this.sink_event(pad, event),
                )
            })
            .query_function(|pad, parent, query| {
                RivuletTint::catch_panic_pad_function(
                    parent,
                    || false,
                    |this| this.sink_query(pad, query),
                )
            })
            .build();
        let templ = klass.pad_template("src").unwrap(); // registered in pad_templates()
        let srcpad = gst::Pad::builder_from_template(&templ)
            .query_function(|pad, parent, query| {
                RivuletTint::catch_panic_pad_function(
                    parent,
                    || false,
                    |this| this.src_query(pad, query),
                )
            })
            .build();
        RivuletTint {
            sinkpad,
            srcpad,
            settings: Mutex::new(Settings {
                json: String::new(),
                params: Params::default(),
                pending: false,
            }),
            state: Mutex::new(State::default()),
        }
    }
}

impl ObjectImpl for RivuletTint {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("params")
                    .nick("Params")
                    .blurb(
                        "JSON object, full replacement: width, height, show_reloading_frame, \
                         color ([r, g, b] gains in [0, 2]), strength ([0, 1])",
                    )
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        if pspec.name() == "params" {
            let json: String = value
                .get::<Option<String>>()
                .unwrap_or(None)
                .unwrap_or_default();
            match parse_params(&json) {
                Ok(p) => {
                    gst::info!(CAT, imp = self, "params {json}");
                    let mut s = self.settings.lock().unwrap();
                    s.json = json;
                    s.params = p;
                    s.pending = true;
                }
                Err(e) => gst::element_imp_warning!(
                    self,
                    gst::LibraryError::Settings,
                    ["Invalid params {json:?}: {e}; the previous params stay"]
                ),
            }
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        match pspec.name() {
            "params" => self.settings.lock().unwrap().json.to_value(),
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.add_pad(&self.sinkpad).unwrap(); // a fresh element has no pad of that name
        obj.add_pad(&self.srcpad).unwrap();
    }
}

impl GstObjectImpl for RivuletTint {}

impl ElementImpl for RivuletTint {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Rivulet example tint",
                "Filter/Effect/Video",
                "Tints raw RGB video at the params' size; an example external Rivulet pipeline",
                "Rivulet developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new()
                .format_list([
                    gst_video::VideoFormat::Rgb,
                    gst_video::VideoFormat::Rgbx,
                    gst_video::VideoFormat::Rgba,
                ])
                .build();
            vec![
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .unwrap(), // static, valid caps
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
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
        if transition == gst::StateChange::ReadyToPaused {
            self.start();
        }
        let r = self.parent_change_state(transition)?;
        if transition == gst::StateChange::PausedToReady {
            *self.state.lock().unwrap() = State::default();
        }
        Ok(r)
    }
}
