// SPDX-License-Identifier: MPL-2.0
//! The inference thread: takes frames and events from the mailbox, picks up params changes and
//! finished loads at frame boundaries, runs the pipeline (here or in the inference child),
//! replaces a lost child and pushes the output.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::prelude::*;

use super::batch::{BatchShape, GroupFrame};
use super::imp::{AiPipeline, CAT, DEFAULT_HANG_TIMEOUT_MS, Shared, lock};
use super::loader::{Engine, ensure_loader};
use super::mailbox::Item;
use super::stats::LATENCY_WINDOW;
use super::{LOADING_EVENT, ONLINE_EVENT, RESTART_MESSAGE, Status};
use crate::child::InputLayout;
use crate::frame;
use crate::model;
use crate::pipeline::{self, Params, PipelineDef};

/// At most one frame warning per this interval (the error counter counts all).
const WARN_INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct OutState {
    info: gst_video::VideoInfo,
    pool: gst::BufferPool,
    bpp: i64,
    /// `noop` at the input's size, in the input's own (YUV) format: each input buffer goes
    /// on as the output, no conversion or copy.
    passthrough: bool,
}

/// State owned by the inference thread.
pub(super) struct Worker {
    pub(super) element: super::AiPipeline,
    pub(super) shared: Arc<Shared>,
    pub(super) def: Arc<PipelineDef>,
    pub(super) runner: Option<Engine>,
    pub(super) seen_gen: u64,
    pub(super) seen_reload: u64,
    /// Params the output follows (size), applied at frame boundaries.
    pub(super) active: Params,
    /// A reload is in progress: frames pass through unprocessed at the new size.
    pub(super) loading: bool,
    pub(super) pending_online: bool,
    pub(super) in_info: Option<gst_video::VideoInfo>,
    pub(super) out: Option<OutState>,
    pub(super) last_warn: Option<Instant>,
    pub(super) last_stats: Instant,
    pub(super) stats_interval: Duration,
    pub(super) max_latency: Duration,
    pub(super) pass_late: bool,
    /// Inference child restarts in this run (isolation=process).
    pub(super) restarts: u32,
    pub(super) max_restarts: u32,
    /// The pending load replaces a lost child.
    pub(super) restarting: bool,
    /// The child was found dead outside a frame (e.g. on a params update): replaced at the
    /// next frame.
    pub(super) lost: Option<String>,
    /// The restart limit was hit: every frame is an error.
    pub(super) fatal: bool,
    /// Passthrough (`noop`): when the inference child last got a frame.
    pub(super) child_checked: Option<Instant>,
    /// Buffers reused from frame to frame.
    pub(super) staging: frame::Staging,
}

/// Passthrough (`noop` in its input's format) hands the inference child a frame at most this
/// often: the round trip only checks that the child is alive and answering (its answer is
/// the input), so a crash or hang is still noticed within this bound plus the hang timeout.
const CHILD_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Copies tightly packed u8 RGB into a packed RGB/RGBx/RGBA plane (fourth byte 255), as
/// `frame::download_rgb` does for a tensor.
fn copy_rgb(
    src: &[u8],
    dst: &mut [u8],
    stride: usize,
    width: u32,
    height: u32,
    bpp: i64,
) -> Result<(), String> {
    let (w, h, bpp) = (width as usize, height as usize, bpp as usize);
    let need = if h == 0 {
        0
    } else {
        (h - 1) * stride + w * bpp
    };
    if !(3..=4).contains(&bpp) || src.len() < w * h * 3 || stride < w * bpp || dst.len() < need {
        return Err(format!(
            "child output of {} bytes does not fit a {width}x{height} frame ({} bytes, stride {stride})",
            src.len(),
            dst.len()
        ));
    }
    for (srow, drow) in src.chunks_exact(w * 3).take(h).zip(dst.chunks_mut(stride)) {
        let drow = &mut drow[..w * bpp];
        if bpp == 3 {
            drow.copy_from_slice(srow);
        } else {
            for (d, s) in drow.chunks_exact_mut(bpp).zip(srow.chunks_exact(3)) {
                d[..3].copy_from_slice(s);
                d[3] = 255;
            }
        }
    }
    Ok(())
}

/// What became of a frame.
enum Outcome {
    /// This output buffer goes downstream.
    Done(gst::Buffer),
    /// The input buffer goes downstream as it is (passthrough).
    Input,
    /// Skipped, with this warning.
    Skip(String),
    /// The engine is lost (child died or hung, or out of memory): restart it.
    Lost(String),
    /// The batch group's child of this generation is lost (the group replaces it).
    GroupLost(u64, String),
    /// The batch group could not replace its child.
    Broken(String),
}

/// The output frame geometry [`write_output`] hands its writer.
pub(super) type Out<'a> = model::FrameOut<'a>;

/// Copies `inbuf`'s timestamps, offsets and DISCONT onto `out`.
fn copy_timestamps(inbuf: &gst::Buffer, out: &mut gst::BufferRef) {
    out.set_pts(inbuf.pts());
    out.set_dts(inbuf.dts());
    out.set_duration(inbuf.duration());
    out.set_offset(inbuf.offset());
    out.set_offset_end(inbuf.offset_end());
    if inbuf.flags().contains(gst::BufferFlags::DISCONT) {
        out.set_flags(gst::BufferFlags::DISCONT);
    }
}

/// Copies `inbuf`'s timestamps and DISCONT onto `outbuf`, maps it as `out`'s video frame and
/// lets `write` fill its first plane: `write`'s result, or why the buffer could not be mapped.
fn write_output<E>(
    inbuf: &gst::Buffer,
    outbuf: &mut gst::Buffer,
    out: &OutState,
    write: impl FnOnce(Out<'_>) -> Result<(), E>,
) -> Result<Result<(), E>, String> {
    let bufref = outbuf
        .get_mut()
        .ok_or_else(|| "output buffer not writable".to_string())?;
    copy_timestamps(inbuf, bufref);
    let mut vframe = gst_video::VideoFrameRef::from_buffer_ref_writable(bufref, &out.info)
        .map_err(|_| "cannot map the output buffer".to_string())?;
    let stride = vframe.plane_stride()[0].max(0) as usize;
    let (width, height) = (vframe.width(), vframe.height());
    let data = vframe
        .plane_data_mut(0)
        .map_err(|_| "cannot map the output plane".to_string())?;
    Ok(write(Out {
        data,
        stride,
        width,
        height,
        bpp: out.bpp,
    }))
}

enum Notice {
    Loading(bool),
    Warning(String),
    Status(Status),
    Latency,
    /// Params for the inference child (sent with no lock held).
    ChildParams(Params),
    /// A restart's load failed: replace the child again (counted).
    RestartFailed(String),
}

impl Worker {
    fn imp(&self) -> &AiPipeline {
        self.element.imp()
    }

    pub(super) fn run(mut self) {
        let _no_grad = tch::no_grad_guard();
        self.runner = lock(&self.shared.ctrl).initial.take().map(|(e, _)| e);
        loop {
            let item = {
                let mut mb = lock(&self.shared.mailbox);
                loop {
                    if mb.shutdown {
                        return;
                    }
                    if !mb.flushing
                        && let Some(item) = mb.items.pop_front()
                    {
                        if !matches!(item, Item::Buffer(..)) {
                            mb.events -= 1;
                        }
                        mb.busy = true;
                        self.shared.cond.notify_all();
                        break item;
                    }
                    mb = self.shared.cond.wait(mb).unwrap();
                }
            };
            self.sync();
            let flow = match item {
                Item::Buffer(b, arrived) => self.handle_buffer(b, arrived),
                Item::Caps(info) => self.handle_caps(info),
                Item::Event(e) => {
                    let is_eos = matches!(e.view(), gst::EventView::Eos(_));
                    if is_eos {
                        self.post_stats(true);
                    }
                    if !self.imp().srcpad.push_event(e) && !is_eos {
                        gst::debug!(CAT, obj = self.element, "downstream refused an event");
                    }
                    Ok(gst::FlowSuccess::Ok)
                }
            };
            {
                let mut mb = lock(&self.shared.mailbox);
                mb.busy = false;
                if let Err(e) = flow
                    && !mb.flushing
                {
                    mb.flow = Err(e);
                }
                self.shared.cond.notify_all();
            }
            self.post_stats(false);
        }
    }

    /// Picks up params changes and finished loads (at a frame boundary).
    fn sync(&mut self) {
        let mut notices = Vec::new();
        {
            let mut ctrl = lock(&self.shared.ctrl);
            if ctrl.params_gen != self.seen_gen {
                self.seen_gen = ctrl.params_gen;
                if let Some(p) = ctrl.params.clone() {
                    if ctrl.reload_gen != self.seen_reload {
                        self.seen_reload = ctrl.reload_gen;
                        if !self.loading {
                            // One loading event per loading phase (a newer request while
                            // loading just replaces the model being loaded).
                            self.loading = true;
                            self.pending_online = false;
                            notices.push(Notice::Loading(p.show_reloading_frame));
                        }
                    } else if !self.loading {
                        match self.runner.as_mut() {
                            Some(Engine::Local(r)) => {
                                if let Err(e) = r.set_params(&p) {
                                    notices
                                        .push(Notice::Warning(format!("Cannot apply params: {e}")));
                                }
                            }
                            Some(Engine::Child(_)) => notices.push(Notice::ChildParams(p.clone())),
                            // A batch group's frames carry their params.
                            Some(Engine::Group(_)) | None => {}
                        }
                    }
                    self.active = p;
                }
            }
            if let Some((generation, res)) = ctrl.loaded.take()
                && generation == ctrl.reload_gen
                && self.loading
            {
                self.loading = false;
                self.pending_online = true;
                ctrl.reload_pending = false;
                if let Some(json) = ctrl.fallback_json.take()
                    && let Ok(p) = self.def.parse_params(&json)
                {
                    // A restart fell back to the default params: they are the ones in force.
                    notices.push(Notice::Warning(format!(
                        "Pipeline '{}' failed to load with params {}; running with the default params {json}",
                        self.def.name, ctrl.params_json
                    )));
                    ctrl.params = Some(p.clone());
                    ctrl.model_params = Some(p.clone());
                    ctrl.params_json = json.clone();
                    ctrl.params_gen += 1;
                    self.seen_gen = ctrl.params_gen;
                    self.active = p;
                    lock(&self.imp().settings).params = json;
                }
                match res {
                    Ok((mut r, new)) => {
                        let latest = ctrl.params.clone();
                        if let Some(p) = &latest {
                            match &mut r {
                                Engine::Local(r) => {
                                    if let Err(e) = r.set_params(p) {
                                        notices.push(Notice::Warning(format!(
                                            "Cannot apply params: {e}"
                                        )));
                                    }
                                }
                                Engine::Child(_) => notices.push(Notice::ChildParams(p.clone())),
                                Engine::Group(_) => {}
                            }
                        }
                        self.restarting = false;
                        lock(&self.shared.stats).child_pid = match &r {
                            Engine::Child(c) => c.pid(),
                            Engine::Group(m) => m.group.child().0,
                            Engine::Local(_) => 0,
                        };
                        let old = std::mem::replace(&mut lock(&self.shared.stats).estimate, new);
                        if new.abs_diff(old) > Duration::from_millis(1).max(old / 5) {
                            // Our processing latency changed: let the pipeline recompute it.
                            notices.push(Notice::Latency);
                        }
                        self.runner = Some(r);
                        ctrl.good_params = latest;
                        ctrl.good_json = ctrl.params_json.clone();
                    }
                    Err(e) if self.restarting || (self.runner.is_none() && ctrl.iso.is_some()) => {
                        self.loading = true;
                        self.pending_online = false;
                        ctrl.reload_pending = false;
                        notices.push(Notice::RestartFailed(e));
                    }
                    Err(e) => {
                        let good = ctrl.good_params.clone();
                        notices.push(Notice::Warning(format!(
                            "Reload of pipeline '{}' failed: {e}; the previous params stay in force",
                            self.def.name
                        )));
                        ctrl.params = good.clone();
                        ctrl.model_params = good.clone();
                        ctrl.params_json = ctrl.good_json.clone();
                        ctrl.params_gen += 1;
                        self.seen_gen = ctrl.params_gen;
                        if let Some(g) = good {
                            match self.runner.as_mut() {
                                Some(Engine::Local(r)) => {
                                    let _ = r.set_params(&g);
                                }
                                Some(Engine::Child(_)) => {
                                    notices.push(Notice::ChildParams(g.clone()));
                                }
                                Some(Engine::Group(_)) | None => {}
                            }
                            self.active = g;
                        }
                        let json = ctrl.good_json.clone();
                        drop(ctrl);
                        lock(&self.imp().settings).params = json;
                        notices.push(Notice::Status(Status::Ready));
                        return self.notify(notices);
                    }
                }
            }
        }
        self.notify(notices);
    }

    fn notify(&mut self, notices: Vec<Notice>) {
        for n in notices {
            match n {
                Notice::Loading(show) => {
                    self.imp().set_status(Status::Loading);
                    let s = gst::Structure::builder(LOADING_EVENT)
                        .field("pipeline", self.def.name.as_str())
                        .field("reason", "reload")
                        .field("show-picture", show)
                        .build();
                    gst::info!(CAT, obj = self.element, "reload started: sending {s:?}");
                    let _ = self
                        .imp()
                        .srcpad
                        .push_event(gst::event::CustomDownstream::new(s));
                }
                Notice::Warning(w) => self.imp().post_warning(&w),
                Notice::Status(s) => self.imp().set_status(s),
                Notice::ChildParams(p) => {
                    let timeout = self.hang_timeout();
                    if let Some(Engine::Child(c)) = self.runner.as_mut() {
                        match c.set_params(&p, timeout) {
                            Ok(()) => {}
                            Err(e) if e.is_fatal() => self.lost = Some(e.to_string()),
                            Err(e) => self
                                .imp()
                                .post_warning(&format!("Cannot apply params: {e}")),
                        }
                    }
                }
                Notice::RestartFailed(e) => {
                    self.lost = Some(format!("restart failed: {e}"));
                }
                Notice::Latency => {
                    let _ = self
                        .element
                        .post_message(gst::message::Latency::builder().src(&self.element).build());
                }
            }
        }
    }

    fn hang_timeout(&self) -> Duration {
        lock(&self.shared.ctrl)
            .iso
            .as_ref()
            .map_or(Duration::from_millis(DEFAULT_HANG_TIMEOUT_MS as u64), |i| {
                i.hang_timeout
            })
    }

    /// Replaces a lost inference child, or (in-process) a model that ran out of device
    /// memory: counts the restart (an element error beyond max-restarts), posts
    /// `aipipeline-restart` with the child's last log lines, sends the loading event and asks
    /// the loader for a new child (or model) with the current params (the `{}` fallback
    /// applies). Frames pass through at the output size meanwhile.
    fn lose_child(&mut self, reason: String) -> Result<(), gst::FlowError> {
        let (pid, logs) = match self.runner.take() {
            Some(Engine::Child(c)) => (c.pid(), c.kill()),
            // Dropped before the new one loads: its device memory is freed first.
            Some(Engine::Local(r)) => {
                drop(r);
                (0, Vec::new())
            }
            // A batch group replaces its child itself (see group_lost).
            Some(g @ Engine::Group(_)) => {
                self.runner = Some(g);
                return Ok(());
            }
            None => (0, Vec::new()),
        };
        // A pending restart-child is served by this restart.
        self.shared.restart_req.store(false, Ordering::SeqCst);
        self.restarts += 1;
        {
            let mut st = lock(&self.shared.stats);
            st.child_pid = 0;
            st.restarts = self.restarts;
        }
        gst::warning!(
            CAT,
            obj = self.element,
            "inference child {pid} lost ({reason}); restart {} of at most {}",
            self.restarts,
            self.max_restarts
        );
        if self.restarts > self.max_restarts {
            self.fatal = true;
            self.imp().set_status(Status::Error);
            gst::element_error!(
                self.element,
                gst::ResourceError::Failed,
                (
                    "inference child crashed {} times: {}",
                    self.restarts,
                    reason
                ),
                ["last log lines of the child:\n{}", logs.join("\n")]
            );
            return Err(gst::FlowError::Error);
        }
        let s = gst::Structure::builder(RESTART_MESSAGE)
            .field("restart-count", self.restarts)
            .field("reason", reason.as_str())
            .field("logs", logs.join("\n"))
            .field("pid", pid)
            .build();
        let _ = self
            .element
            .post_message(gst::message::Element::builder(s).src(&self.element).build());
        if !self.loading {
            self.loading = true;
            self.pending_online = false;
            self.imp().set_status(Status::Loading);
            let s = gst::Structure::builder(LOADING_EVENT)
                .field("pipeline", self.def.name.as_str())
                .field("reason", "restart")
                .field("show-picture", true)
                .build();
            gst::info!(CAT, obj = self.element, "restart started: sending {s:?}");
            let _ = self
                .imp()
                .srcpad
                .push_event(gst::event::CustomDownstream::new(s));
        }
        self.restarting = true;
        let mut ctrl = lock(&self.shared.ctrl);
        if ctrl.reload_pending {
            // A reload is on its way: its new child replaces the lost one.
            return Ok(());
        }
        let Some(p) = ctrl.params.clone() else {
            return Ok(());
        };
        ctrl.reload_pending = true;
        ctrl.reload_restart = true;
        ctrl.reload_req = Some((ctrl.reload_gen, p));
        if let Err(e) = ensure_loader(&self.shared, &mut ctrl) {
            ctrl.reload_req = None;
            ctrl.reload_pending = false;
            drop(ctrl);
            self.fatal = true;
            self.imp().set_status(Status::Error);
            gst::element_error!(
                self.element,
                gst::CoreError::Thread,
                ("Cannot restart the inference child: {}", e)
            );
            return Err(gst::FlowError::Error);
        }
        Ok(())
    }

    /// Batch group, restarting: the group's child back (online at the next real frame),
    /// lost again, or beyond repair.
    fn poll_group(&mut self) -> Result<(), gst::FlowError> {
        let Some(Engine::Group(m)) = &self.runner else {
            return Ok(());
        };
        match m.group.status(m.seen) {
            GroupFrame::Done => {
                self.loading = false;
                self.restarting = false;
                self.pending_online = true;
                lock(&self.shared.stats).child_pid = m.group.child().0;
                Ok(())
            }
            GroupFrame::Restarting { generation, reason } if generation != m.seen => {
                self.group_lost(generation, reason)
            }
            GroupFrame::Broken(e) => self.group_broken(e).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// This element sees the loss of its batch group's child (generation `generation` now):
    /// counted against max-restarts, announced (`aipipeline-restart`, loading event) as a
    /// child loss; frames pass through until the group's new child is in service.
    fn group_lost(&mut self, generation: u64, reason: String) -> Result<(), gst::FlowError> {
        let Some(Engine::Group(m)) = self.runner.as_mut() else {
            return Ok(());
        };
        let new_loss = m.seen != generation;
        m.seen = generation;
        if new_loss {
            self.group_loss_counted(reason)?;
        }
        if !self.loading {
            // Also for an element that joined while the group was replacing its child.
            self.loading = true;
            self.pending_online = false;
            self.imp().set_status(Status::Loading);
            let s = gst::Structure::builder(LOADING_EVENT)
                .field("pipeline", self.def.name.as_str())
                .field("reason", "restart")
                .field("show-picture", true)
                .build();
            gst::info!(CAT, obj = self.element, "restart started: sending {s:?}");
            let _ = self
                .imp()
                .srcpad
                .push_event(gst::event::CustomDownstream::new(s));
        }
        self.restarting = true;
        Ok(())
    }

    /// A loss of the group's child, for this element: counted (an element error beyond
    /// max-restarts) and posted as `aipipeline-restart`.
    fn group_loss_counted(&mut self, reason: String) -> Result<(), gst::FlowError> {
        self.restarts += 1;
        let pid = {
            let mut st = lock(&self.shared.stats);
            st.restarts = self.restarts;
            std::mem::take(&mut st.child_pid)
        };
        gst::warning!(
            CAT,
            obj = self.element,
            "batch group child {pid} lost ({reason}); restart {} of at most {}",
            self.restarts,
            self.max_restarts
        );
        if self.restarts > self.max_restarts {
            self.fatal = true;
            self.imp().set_status(Status::Error);
            gst::element_error!(
                self.element,
                gst::ResourceError::Failed,
                (
                    "inference child crashed {} times: {}",
                    self.restarts,
                    reason
                )
            );
            return Err(gst::FlowError::Error);
        }
        let s = gst::Structure::builder(RESTART_MESSAGE)
            .field("restart-count", self.restarts)
            .field("reason", reason.as_str())
            .field("logs", "")
            .field("pid", pid)
            .build();
        let _ = self
            .element
            .post_message(gst::message::Element::builder(s).src(&self.element).build());
        Ok(())
    }

    fn group_broken(&mut self, e: String) -> Result<gst::FlowSuccess, gst::FlowError> {
        self.fatal = true;
        self.imp().set_status(Status::Error);
        gst::element_error!(
            self.element,
            gst::ResourceError::Failed,
            (
                "The batch group's inference child could not be replaced: {}",
                e
            )
        );
        Err(gst::FlowError::Error)
    }

    fn frame_warning(&mut self, msg: String) {
        lock(&self.shared.stats).errors += 1;
        let now = Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL)
        {
            self.last_warn = Some(now);
            self.imp().post_warning(&msg);
        } else {
            gst::debug!(CAT, obj = self.element, "{msg}");
        }
    }

    fn handle_caps(
        &mut self,
        info: gst_video::VideoInfo,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        gst::debug!(
            CAT,
            obj = self.element,
            "input {}x{} {:?}",
            info.width(),
            info.height(),
            info.format()
        );
        // A new rate, or a new format or size while the input itself goes on (passthrough),
        // renegotiates the output.
        let changed = self.in_info.as_ref().is_none_or(|o| {
            o.fps() != info.fps()
                || (self.out.as_ref().is_some_and(|out| out.passthrough)
                    && (o.format() != info.format()
                        || o.width() != info.width()
                        || o.height() != info.height()))
        });
        self.in_info = Some(info);
        if changed {
            self.out = None;
        }
        self.ensure_output()
    }

    /// (Re)negotiates the output caps and buffer pool for the active size when needed.
    fn ensure_output(&mut self) -> Result<gst::FlowSuccess, gst::FlowError> {
        let (w, h) = (self.active.width, self.active.height);
        let srcpad = self.imp().srcpad.clone();
        let reconfigure = srcpad.check_reconfigure();
        if let Some(o) = &self.out
            && o.info.width() == w
            && o.info.height() == h
            && !reconfigure
        {
            return Ok(gst::FlowSuccess::Ok);
        }
        let Some(in_info) = self.in_info.clone() else {
            return Err(gst::FlowError::NotNegotiated);
        };
        // `noop` leaves the picture alone: at the input's size, a YUV input may go on in its
        // own format (offered first), so no RGB round trip is needed on either side.
        let same_yuv = (self.def.kind == pipeline::Kind::Noop
            && frame::YUV_FORMATS.contains(&in_info.format())
            && in_info.width() == w
            && in_info.height() == h)
            .then_some(in_info.format());
        let templ = gst_video::VideoCapsBuilder::new()
            .format_list(
                same_yuv
                    .into_iter()
                    .chain(frame::OUTPUT_FORMATS.iter().copied()),
            )
            .width(w as i32)
            .height(h as i32)
            .framerate(in_info.fps())
            .pixel_aspect_ratio(gst::Fraction::new(1, 1))
            .build();
        let peer = srcpad.peer_query_caps(Some(&templ));
        if peer.is_empty() {
            gst::element_error!(
                self.element,
                gst::CoreError::Negotiation,
                ("Downstream accepts none of {templ}: put videoconvert after aipipeline")
            );
            return Err(gst::FlowError::NotNegotiated);
        }
        let mut caps = peer;
        caps.fixate();
        let info =
            gst_video::VideoInfo::from_caps(&caps).map_err(|_| gst::FlowError::NotNegotiated)?;
        let passthrough = same_yuv == Some(info.format());
        let bpp = match frame::pixel_layout(info.format()) {
            Some(l) => l.bpp,
            None if passthrough => 0,
            None => return Err(gst::FlowError::NotNegotiated),
        };
        if let Some(old) = self.out.take() {
            let _ = old.pool.set_active(false);
        }
        if !srcpad.push_event(gst::event::Caps::new(&caps)) {
            gst::element_error!(
                self.element,
                gst::CoreError::Negotiation,
                ("Downstream refused caps {caps}")
            );
            return Err(gst::FlowError::NotNegotiated);
        }
        let pool = self.make_pool(&srcpad, &caps, &info)?;
        gst::info!(CAT, obj = self.element, "output caps {caps}");
        self.out = Some(OutState {
            info,
            pool,
            bpp,
            passthrough,
        });
        Ok(gst::FlowSuccess::Ok)
    }

    fn make_pool(
        &self,
        srcpad: &gst::Pad,
        caps: &gst::Caps,
        info: &gst_video::VideoInfo,
    ) -> Result<gst::BufferPool, gst::FlowError> {
        let mut q = gst::query::Allocation::new(Some(caps), true);
        let (mut min, mut max) = (2u32, 0u32);
        let mut offered = None;
        if srcpad.peer_query(&mut q)
            && let Some((Some(p), _size, mn, mx)) = q.allocation_pools().next()
        {
            offered = Some(p);
            min = mn.max(2);
            max = mx;
        }
        let size = info.size() as u32;
        for candidate in [offered, None] {
            let pool = candidate.unwrap_or_else(|| gst_video::VideoBufferPool::new().upcast());
            let mut config = pool.config();
            config.set_params(Some(caps), size, min, max);
            if pool.set_config(config).is_ok() && pool.set_active(true).is_ok() {
                return Ok(pool);
            }
        }
        gst::element_error!(
            self.element,
            gst::ResourceError::NoSpaceLeft,
            ("Cannot set up an output buffer pool for {caps}")
        );
        Err(gst::FlowError::Error)
    }

    fn handle_buffer(
        &mut self,
        inbuf: gst::Buffer,
        arrived: Instant,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let late = !self.max_latency.is_zero() && arrived.elapsed() > self.max_latency;
        if late && !self.pass_late {
            lock(&self.shared.stats).drops += 1;
            gst::debug!(
                CAT,
                obj = self.element,
                "dropping a frame older than max-latency"
            );
            return Ok(gst::FlowSuccess::Ok);
        }
        if self.fatal {
            return Err(gst::FlowError::Error);
        }
        if let Some(reason) = self.lost.take() {
            self.lose_child(reason)?;
        }
        if self.loading && self.restarting {
            self.poll_group()?;
        }
        if self.shared.restart_req.swap(false, Ordering::SeqCst) {
            if let Some(Engine::Group(m)) = &self.runner
                && !self.loading
            {
                // The shared child is replaced once; every member sees the loss.
                m.group.replace(m.seen, "restart requested (restart-child)");
            } else if matches!(self.runner, Some(Engine::Child(_))) && !self.loading {
                self.lose_child("restart requested (restart-child)".into())?;
            } else {
                gst::info!(
                    CAT,
                    obj = self.element,
                    "restart-child ignored: no inference child in service"
                );
            }
        }
        self.ensure_output()?;
        let Some(in_info) = self.in_info.clone() else {
            return Err(gst::FlowError::NotNegotiated);
        };
        let layout = frame::pixel_layout(in_info.format());
        let (w, h) = (self.active.width, self.active.height);
        // A late frame with pass-late-frames goes on unchanged (cover-cropped only).
        let real = !late && !self.loading && self.runner.is_some();
        let passthrough = self.out.as_ref().is_some_and(|o| o.passthrough);
        // In passthrough only an inference child still sees a frame now and then (its round
        // trip is what notices a crashed or hung child); its answer is the input anyway.
        if passthrough {
            let check_child = real
                && matches!(self.runner, Some(Engine::Child(_)))
                && self
                    .child_checked
                    .is_none_or(|t| t.elapsed() >= CHILD_CHECK_INTERVAL);
            if !check_child {
                return self.finish_frame(inbuf, real, late, Instant::now());
            }
            self.child_checked = Some(Instant::now());
        }
        let device = lock(&self.shared.ctrl).device.unwrap_or(tch::Device::Cpu);
        let hang_timeout = self.hang_timeout();
        let t0 = Instant::now();

        let outcome = {
            let Ok(vframe) =
                gst_video::VideoFrameRef::from_buffer_ref_readable(inbuf.as_ref(), &in_info)
            else {
                self.frame_warning(format!(
                    "Cannot map an input buffer as {}x{} {:?}; frame skipped",
                    in_info.width(),
                    in_info.height(),
                    in_info.format()
                ));
                return Ok(gst::FlowSuccess::Ok);
            };
            let (vw, vh) = (vframe.width(), vframe.height());
            // At most 3 planes (I420); fixed arrays keep the hot path free of allocations.
            let mut planes: [&[u8]; 3] = [&[]; 3];
            let mut strides = [0usize; 3];
            let n = (vframe.n_planes() as usize).min(3);
            for (i, (plane, stride)) in planes.iter_mut().zip(&mut strides).take(n).enumerate() {
                match vframe.plane_data(i as u32) {
                    Ok(d) => *plane = d,
                    Err(_) => return Ok(gst::FlowSuccess::Ok),
                }
                *stride = vframe
                    .plane_stride()
                    .get(i)
                    .map_or(0, |s| (*s).max(0) as usize);
            }
            let format = match layout {
                Some(l) => frame::InFormat::Packed(l),
                None => frame::InFormat::Yuv420 {
                    nv12: in_info.format() == gst_video::VideoFormat::Nv12,
                    matrix: frame::YuvMatrix::from_info(&in_info),
                },
            };
            let input = frame::FrameIn {
                planes: &planes[..n],
                strides: &strides[..n],
                width: vw,
                height: vh,
                format,
            };
            let wire = match format {
                frame::InFormat::Packed(l) => InputLayout::Packed {
                    bpp: l.bpp,
                    first: l.first,
                    bgr: l.bgr,
                },
                frame::InFormat::Yuv420 { nv12, matrix: m } => InputLayout::Yuv420 {
                    nv12,
                    kr: m.kr,
                    kb: m.kb,
                    full_range: m.full_range,
                },
            };
            if real && let Some(Engine::Group(m)) = self.runner.as_ref() {
                let Some(out) = self.out.as_ref() else {
                    return Err(gst::FlowError::NotNegotiated);
                };
                let mut outbuf = out.pool.acquire_buffer(None)?;
                let params = &self.active;
                let mut batch = BatchShape::default();
                let written = write_output(&inbuf, &mut outbuf, out, |o| {
                    match m.group.frame(
                        m.seen,
                        input.planes,
                        input.strides,
                        (vw, vh),
                        wire,
                        (w, h),
                        params,
                        &mut |src| copy_rgb(src, o.data, o.stride, o.width, o.height, o.bpp),
                        &mut batch,
                    ) {
                        GroupFrame::Done => Ok(()),
                        other => Err(other),
                    }
                });
                {
                    let mut stats = lock(&self.shared.stats);
                    stats.batch_size = batch.size as u32;
                    stats.batch_forwards = batch.forwards;
                }
                match written {
                    Ok(Ok(())) => Outcome::Done(outbuf),
                    Ok(Err(GroupFrame::Restarting { generation, reason })) => {
                        Outcome::GroupLost(generation, reason)
                    }
                    Ok(Err(GroupFrame::Broken(e))) => Outcome::Broken(e),
                    Ok(Err(GroupFrame::Failed(e))) => Outcome::Skip(e),
                    Ok(Err(GroupFrame::Done)) => Outcome::Done(outbuf),
                    Err(e) => {
                        Outcome::Skip(format!("Cannot write an output frame: {e}; frame skipped"))
                    }
                }
            } else if real && let Some(Engine::Child(c)) = self.runner.as_mut() {
                // restart-child also ends the wait for a hung child (no hang timeout to sit out).
                let restart_req = &self.shared.restart_req;
                let done = c.frame_or_cancel(
                    input.planes,
                    input.strides,
                    vw,
                    vh,
                    wire,
                    w,
                    h,
                    hang_timeout,
                    &|| restart_req.load(Ordering::SeqCst),
                );
                if done.is_ok() && c.last_input_zero_copy() {
                    lock(&self.shared.stats).input_zero_copy += 1;
                }
                match done {
                    // Lost: start the restart, then this frame passes through like the ones
                    // after.
                    Err(e) if e.is_fatal() => Outcome::Lost(e.to_string()),
                    Err(e) => Outcome::Skip(format!("{e}; frame skipped")),
                    Ok(()) if passthrough => Outcome::Input,
                    Ok(()) => match self.out.as_ref() {
                        None => return Err(gst::FlowError::NotNegotiated),
                        // Tightly packed RGB as the child writes it: its shared-memory slot
                        // becomes the output buffer's memory (no copy).
                        Some(out)
                            if out.bpp == 3
                                && out.info.stride().first().copied() == Some(w as i32 * 3)
                                && let Some(mem) = c.lend_output() =>
                        {
                            let mut outbuf = gst::Buffer::new();
                            if let Some(b) = outbuf.get_mut() {
                                b.append_memory(mem);
                                copy_timestamps(&inbuf, b);
                            }
                            Outcome::Done(outbuf)
                        }
                        Some(out) => {
                            let mut outbuf = out.pool.acquire_buffer(None)?;
                            let written = write_output(&inbuf, &mut outbuf, out, |o| {
                                copy_rgb(c.output(), o.data, o.stride, o.width, o.height, o.bpp)
                            });
                            match written {
                                Ok(Ok(())) => Outcome::Done(outbuf),
                                Ok(Err(e)) | Err(e) => Outcome::Skip(format!(
                                    "Cannot write an output frame: {e}; frame skipped"
                                )),
                            }
                        }
                    },
                }
            } else {
                let Some(out) = self.out.as_ref() else {
                    return Err(gst::FlowError::NotNegotiated);
                };
                let noop = crate::model::Runner::Noop;
                let runner = match (&self.runner, real) {
                    (Some(Engine::Local(r)), true) => r,
                    _ => &noop,
                };
                let staging = &mut self.staging;
                let mut outbuf = out.pool.acquire_buffer(None)?;
                let written = write_output(&inbuf, &mut outbuf, out, |o| {
                    model::run_frame(runner, staging, &input, device, o)
                });
                match written {
                    Ok(Ok(())) => Outcome::Done(outbuf),
                    // Every frame would fail alike: reload the model (counted as a restart);
                    // this frame passes through like the ones after it.
                    Ok(Err(e)) if real && e.is_out_of_memory() => Outcome::Lost(format!(
                        "pipeline '{}' ran out of device memory: {e}",
                        self.def.name
                    )),
                    Ok(Err(e)) => Outcome::Skip(format!(
                        "Pipeline '{}' failed on a frame: {e}; frame skipped",
                        self.def.name
                    )),
                    Err(e) => {
                        Outcome::Skip(format!("Cannot write an output frame: {e}; frame skipped"))
                    }
                }
            }
        };
        match outcome {
            Outcome::Done(outbuf) => self.finish_frame(outbuf, real, late, t0),
            Outcome::Input => self.finish_frame(inbuf, real, late, t0),
            Outcome::Skip(msg) => {
                self.frame_warning(msg);
                Ok(gst::FlowSuccess::Ok)
            }
            Outcome::Lost(reason) => {
                self.lose_child(reason)?;
                self.handle_buffer(inbuf, arrived)
            }
            Outcome::GroupLost(generation, reason) => {
                self.group_lost(generation, reason)?;
                self.handle_buffer(inbuf, arrived)
            }
            Outcome::Broken(e) => self.group_broken(e),
        }
    }

    /// Counts an output frame, announces the pipeline online after its first real frame and
    /// pushes the frame.
    fn finish_frame(
        &mut self,
        outbuf: gst::Buffer,
        real: bool,
        late: bool,
        t0: Instant,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let elapsed = t0.elapsed();
        {
            let mut st = lock(&self.shared.stats);
            st.frames_out += 1;
            if real {
                st.window_out += 1;
                st.latencies_ms.push_back(elapsed.as_secs_f64() * 1000.0);
                if st.latencies_ms.len() > LATENCY_WINDOW {
                    st.latencies_ms.pop_front();
                }
            } else {
                st.passthrough += 1;
            }
            if late {
                st.late_passed += 1;
            }
        }
        if real && self.pending_online {
            self.pending_online = false;
            let s = gst::Structure::builder(ONLINE_EVENT)
                .field("pipeline", self.def.name.as_str())
                .build();
            gst::info!(CAT, obj = self.element, "pipeline online: sending {s:?}");
            let _ = self
                .imp()
                .srcpad
                .push_event(gst::event::CustomDownstream::new(s));
            self.imp().set_status(Status::Ready);
        }
        gst::trace!(
            CAT,
            obj = self.element,
            "frame {:?} in {elapsed:?}",
            outbuf.pts()
        );
        self.imp().srcpad.push(outbuf)
    }

    /// Every stats interval (1 s when the message is off): computes the rates, posts the
    /// `aipipeline-stats` message (unless off) and, when frames take clearly longer than the
    /// latency we announced, raises the estimate and asks the pipeline to recompute latency.
    fn post_stats(&mut self, force: bool) {
        let interval = if self.stats_interval.is_zero() {
            Duration::from_secs(1)
        } else {
            self.stats_interval
        };
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_stats);
        if !force && elapsed < interval {
            return;
        }
        self.last_stats = now;
        let status = *lock(&self.shared.status);
        let (s, latency_changed) = {
            let mut st = lock(&self.shared.stats);
            let secs = elapsed.as_secs_f64().max(1e-3);
            st.in_fps = st.window_in as f64 / secs;
            st.out_fps = st.window_out as f64 / secs;
            st.window_in = 0;
            st.window_out = 0;
            let p95 = Duration::from_secs_f64(st.percentile(0.95) / 1000.0);
            let changed = p95 > st.estimate + Duration::from_millis(1).max(st.estimate / 2);
            if changed {
                st.estimate = p95;
            }
            (st.structure(status), changed)
        };
        if !self.stats_interval.is_zero() {
            let _ = self
                .element
                .post_message(gst::message::Element::builder(s).src(&self.element).build());
            self.element.notify("stats");
        }
        if latency_changed {
            gst::info!(
                CAT,
                obj = self.element,
                "processing takes longer than announced: new latency"
            );
            let _ = self
                .element
                .post_message(gst::message::Latency::builder().src(&self.element).build());
        }
    }
}
