// SPDX-License-Identifier: MPL-2.0
//! The `aipipeline` element: sink pad → one-slot mailbox → inference thread → src pad.
//!
//! This file holds the element itself (pads, properties, signals, start/stop, params); the
//! inference thread is in `worker.rs`, the background loader in `loader.rs`, the mailbox in
//! `mailbox.rs` and the statistics in `stats.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use super::batch::{Group, GroupKey};
use super::loader::{Engine, Iso, LoadResult, Member, loader, start_child};
use super::mailbox::{Item, MAX_QUEUED_EVENTS, Mailbox};
use super::stats::Stats;
use super::worker::Worker;
use super::{Isolation, Precision, Status};
use crate::child::{ChildCommand, InputArea, LoadSpec, ShmInputPool, Spawner};
use crate::device::{self, DeviceSpec};
use crate::frame;
use crate::model::{LoadError, Runner};
use crate::pipeline::{self, Params, PipelineDef, Registry};

pub(super) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "aipipeline",
        gst::DebugColorFlags::empty(),
        Some("Rivulet AI pipeline"),
    )
});

const DEFAULT_PIPELINE: &str = "noop";
const DEFAULT_MAX_LATENCY_MS: u32 = 1000;
const DEFAULT_STATS_INTERVAL_MS: u32 = 1000;
const DEFAULT_MAX_RESTARTS: u32 = 3;
const DEFAULT_BATCH_TIMEOUT_MS: u32 = 2;
const DEFAULT_MAX_BATCH: u32 = 4;
/// Buffers the proposed shared-memory input pool keeps at least (no upper bound: a slot per
/// buffer upstream holds).
const INPUT_POOL_MIN: u32 = 2;
/// The runner's "output stalled more than 5 s".
pub(super) const DEFAULT_HANG_TIMEOUT_MS: u32 = 5000;

#[derive(Clone, Debug)]
pub(super) struct Settings {
    pipeline: String,
    model: Option<String>,
    pipelines_dir: Option<String>,
    device: DeviceSpec,
    precision: Precision,
    pub(super) params: String,
    max_latency_ms: u32,
    /// Pass a frame older than max-latency-ms on unchanged instead of dropping it.
    pass_late: bool,
    stats_interval_ms: u32,
    isolation: Isolation,
    child_path: Option<String>,
    max_restarts: u32,
    hang_timeout_ms: u32,
    /// Batch group name (empty: none).
    batch_group: String,
    batch_timeout_ms: u32,
    max_batch: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            pipeline: DEFAULT_PIPELINE.into(),
            model: None,
            pipelines_dir: None,
            device: DeviceSpec::Auto,
            precision: Precision::Fp32,
            params: String::new(),
            max_latency_ms: DEFAULT_MAX_LATENCY_MS,
            pass_late: false,
            stats_interval_ms: DEFAULT_STATS_INTERVAL_MS,
            isolation: Isolation::None,
            child_path: None,
            max_restarts: DEFAULT_MAX_RESTARTS,
            hang_timeout_ms: DEFAULT_HANG_TIMEOUT_MS,
            batch_group: String::new(),
            batch_timeout_ms: DEFAULT_BATCH_TIMEOUT_MS,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

/// Logs one stderr line of an inference child (the parent keeps the last ones too).
pub(crate) fn log_child_line(pid: u32, line: &str) {
    gst::debug!(CAT, "child {pid}: {line}");
}

/// Params and models shared between `set_property`, the loader thread and the inference thread.
#[derive(Default)]
pub(super) struct Ctrl {
    pub(super) running: bool,
    pub(super) session: u64,
    pub(super) def: Option<Arc<PipelineDef>>,
    pub(super) device: Option<tch::Device>,
    pub(super) half: bool,
    /// Latest accepted params, and their JSON.
    pub(super) params: Option<Params>,
    pub(super) params_json: String,
    pub(super) params_gen: u64,
    /// Params the newest requested model is built for.
    pub(super) model_params: Option<Params>,
    /// Params (and JSON) of the model in service: restored when a reload fails.
    pub(super) good_params: Option<Params>,
    pub(super) good_json: String,
    pub(super) reload_gen: u64,
    /// A reload was requested and the inference thread has not taken its result yet.
    pub(super) reload_pending: bool,
    pub(super) reload_req: Option<(u64, Params)>,
    pub(super) loader_running: bool,
    pub(super) loaded: Option<(u64, LoadResult)>,
    pub(super) initial: Option<(Engine, Duration)>,
    /// Set with isolation=process.
    pub(super) iso: Option<Arc<Iso>>,
    /// The pending reload replaces a lost child (restart: `{}` fallback).
    pub(super) reload_restart: bool,
    /// A restart's `{}` fallback took effect: the params now in force.
    pub(super) fallback_json: Option<String>,
    /// In a batch group: sizes change without a reload, the model cannot change.
    pub(super) grouped: bool,
}

#[derive(Default)]
pub(super) struct Shared {
    pub(super) mailbox: Mutex<Mailbox>,
    pub(super) cond: Condvar,
    pub(super) ctrl: Mutex<Ctrl>,
    pub(super) stats: Mutex<Stats>,
    pub(super) status: Mutex<Status>,
    /// `restart-child` was emitted: the inference thread replaces the child at the next frame.
    pub(super) restart_req: AtomicBool,
    /// With its own inference child (isolation=process, no batch group), while started: the
    /// input area its children map, whose slots back the pool proposed upstream.
    pub(super) input_area: Mutex<Option<Arc<InputArea>>>,
}

pub struct AiPipeline {
    sinkpad: gst::Pad,
    pub(super) srcpad: gst::Pad,
    pub(super) settings: Mutex<Settings>,
    pub(super) shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// The unknown params keys last warned about (see `note_unknown_keys`).
    unknown_keys: Mutex<Vec<String>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap()
}

impl AiPipeline {
    pub(super) fn set_status(&self, s: Status) {
        let changed = {
            let mut st = lock(&self.shared.status);
            let changed = *st != s;
            *st = s;
            changed
        };
        if changed {
            self.obj().notify("status");
        }
    }

    pub(super) fn post_warning(&self, msg: &str) {
        gst::warning!(CAT, imp = self, "{msg}");
        gst::element_imp_warning!(self, gst::StreamError::Failed, ("{}", msg));
    }

    /// Accepted params with keys the pipeline does not know: a bus warning naming them (its
    /// details a [`super::UNKNOWN_PARAMS_WARNING`] structure with `pipeline` and `keys`), once
    /// per new set of unknown keys (an update with the same set as the one before says
    /// nothing; `start` begins afresh).
    fn note_unknown_keys(&self, def: &PipelineDef, unknown: Vec<String>, start: bool) {
        {
            let mut last = lock(&self.unknown_keys);
            if start {
                last.clear();
            }
            if *last == unknown {
                return;
            }
            *last = unknown.clone();
        }
        if unknown.is_empty() {
            return;
        }
        let msg = def.unknown_keys_message(&unknown);
        gst::warning!(CAT, imp = self, "{msg}");
        let details = gst::Structure::builder(super::UNKNOWN_PARAMS_WARNING)
            .field("pipeline", def.name.as_str())
            .field("keys", gst::Array::new(unknown.iter().map(String::as_str)))
            .build();
        gst::element_imp_warning!(
            self,
            gst::StreamError::Failed,
            ("{}", msg),
            details: details
        );
    }

    // ---- streaming thread: sink pad ----

    fn sink_chain(&self, buffer: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let dropped = {
            let mut mb = lock(&self.shared.mailbox);
            if mb.shutdown || mb.flushing {
                return Err(gst::FlowError::Flushing);
            }
            mb.flow?;
            let pos = mb.items.iter().position(|i| matches!(i, Item::Buffer(..)));
            let dropped = pos.and_then(|p| mb.items.remove(p)).is_some();
            mb.items.push_back(Item::Buffer(buffer, Instant::now()));
            self.shared.cond.notify_all();
            dropped
        };
        let mut st = lock(&self.shared.stats);
        st.frames_in += 1;
        st.window_in += 1;
        if dropped {
            st.drops += 1;
            gst::trace!(CAT, imp = self, "replaced a waiting frame");
        }
        Ok(gst::FlowSuccess::Ok)
    }

    /// Queues a serialized item behind the waiting ones; waits (bounded queue) while too many
    /// events are queued. Returns false when flushing or stopped.
    fn enqueue(&self, item: Item) -> bool {
        let mut mb = lock(&self.shared.mailbox);
        while mb.events >= MAX_QUEUED_EVENTS && !mb.flushing && !mb.shutdown {
            mb = self.shared.cond.wait(mb).unwrap();
        }
        if mb.flushing || mb.shutdown {
            return false;
        }
        mb.events += 1;
        mb.items.push_back(item);
        self.shared.cond.notify_all();
        true
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        gst::log!(CAT, obj = pad, "sink event {event:?}");
        match event.view() {
            EventView::FlushStart(_) => {
                {
                    let mut mb = lock(&self.shared.mailbox);
                    mb.flushing = true;
                    mb.items.clear();
                    mb.events = 0;
                    self.shared.cond.notify_all();
                }
                self.srcpad.push_event(event)
            }
            EventView::FlushStop(_) => {
                {
                    let mut mb = lock(&self.shared.mailbox);
                    while mb.busy && !mb.shutdown {
                        mb = self.shared.cond.wait(mb).unwrap();
                    }
                    mb.items.clear();
                    mb.events = 0;
                    mb.flushing = false;
                    mb.flow = Ok(gst::FlowSuccess::Ok);
                }
                self.srcpad.push_event(event)
            }
            EventView::Caps(c) => {
                let info = match gst_video::VideoInfo::from_caps(c.caps()) {
                    Ok(i)
                        if frame::pixel_layout(i.format()).is_some()
                            || frame::YUV_FORMATS.contains(&i.format()) =>
                    {
                        i
                    }
                    _ => {
                        gst::warning!(CAT, imp = self, "unsupported input caps {:?}", c.caps());
                        return false;
                    }
                };
                self.enqueue(Item::Caps(info))
            }
            _ if event.is_serialized() => self.enqueue(Item::Event(event)),
            _ => self.srcpad.push_event(event),
        }
    }

    fn sink_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        use gst::QueryViewMut;
        match query.view_mut() {
            QueryViewMut::Allocation(q) => {
                // We map through VideoFrame, so any strides/offsets described by VideoMeta work.
                q.add_allocation_meta::<gst_video::VideoMeta>(None);
                // With its own inference child: a pool of buffers in shared memory the child
                // reads, so upstream writes each frame where the child reads it (no copy).
                let area = lock(&self.shared.input_area).clone();
                if let Some(area) = area
                    && let (Some(caps), _) = q.get()
                    && let caps = caps.to_owned()
                    && let Ok(info) = gst_video::VideoInfo::from_caps(&caps)
                    && let Ok(size) = u32::try_from(info.size())
                {
                    let pool = ShmInputPool::new(area);
                    let mut config = pool.config();
                    config.set_params(Some(&caps), size, INPUT_POOL_MIN, 0);
                    config.add_option(gst_video::BUFFER_POOL_OPTION_VIDEO_META);
                    match pool.set_config(config) {
                        Ok(()) => {
                            gst::debug!(
                                CAT,
                                imp = self,
                                "proposing a shared-memory pool for {caps}"
                            );
                            q.add_allocation_pool(Some(&pool), size, INPUT_POOL_MIN, 0);
                        }
                        Err(e) => {
                            gst::warning!(CAT, imp = self, "cannot configure the input pool: {e}")
                        }
                    }
                }
                true
            }
            QueryViewMut::Drain(_) => {
                // Upstream wants its buffers back: let the mailbox empty first.
                {
                    let mut mb = lock(&self.shared.mailbox);
                    while (mb.busy || !mb.items.is_empty()) && !mb.flushing && !mb.shutdown {
                        mb = self.shared.cond.wait(mb).unwrap();
                    }
                }
                gst::Pad::query_default(pad, Some(&*self.obj()), query)
            }
            QueryViewMut::Caps(q) => {
                let templ = pad.pad_template_caps();
                let caps = match q.filter() {
                    Some(f) => f.intersect_with_mode(&templ, gst::CapsIntersectMode::First),
                    None => templ,
                };
                q.set_result(&caps);
                true
            }
            _ => gst::Pad::query_default(pad, Some(&*self.obj()), query),
        }
    }

    // ---- src pad ----

    fn src_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        use gst::QueryViewMut;
        match query.view_mut() {
            QueryViewMut::Latency(q) => {
                let mut upstream = gst::query::Latency::new();
                if !self.sinkpad.peer_query(&mut upstream) {
                    return false;
                }
                let (live, min, max) = upstream.result();
                let ours = gst::ClockTime::from_nseconds(
                    lock(&self.shared.stats).estimate.as_nanos() as u64,
                );
                let bound =
                    gst::ClockTime::from_mseconds(lock(&self.settings).max_latency_ms as u64)
                        .max(ours * 2);
                gst::debug!(
                    CAT,
                    imp = self,
                    "latency: upstream {min}/{max:?}, ours {ours}"
                );
                q.set(live, min + ours, max.map(|m| m + bound));
                true
            }
            QueryViewMut::Caps(q) => {
                let (size, noop) = {
                    let ctrl = lock(&self.shared.ctrl);
                    let size = ctrl.params.as_ref().map(|p| (p.width, p.height));
                    let noop = ctrl
                        .def
                        .as_ref()
                        .is_some_and(|d| d.kind == pipeline::Kind::Noop);
                    (size, noop)
                };
                // `noop` also gives a YUV input back as it is (at the input's size).
                let yuv: &[gst_video::VideoFormat] = if noop { frame::YUV_FORMATS } else { &[] };
                let mut b = gst_video::VideoCapsBuilder::new()
                    .format_list(yuv.iter().chain(frame::OUTPUT_FORMATS).copied());
                b = match size {
                    Some((w, h)) => b.width(w as i32).height(h as i32),
                    None => b
                        .width_range(pipeline::MIN_SIZE as i32..=pipeline::MAX_SIZE as i32)
                        .height_range(pipeline::MIN_SIZE as i32..=pipeline::MAX_SIZE as i32),
                };
                let caps = b.build();
                let caps = match q.filter() {
                    Some(f) => f.intersect_with_mode(&caps, gst::CapsIntersectMode::First),
                    None => caps,
                };
                q.set_result(&caps);
                true
            }
            _ => gst::Pad::query_default(pad, Some(&*self.obj()), query),
        }
    }

    // ---- params ----

    fn set_params(&self, json: String) {
        let mut ctrl = lock(&self.shared.ctrl);
        let Some(def) = ctrl.def.clone().filter(|_| ctrl.running) else {
            drop(ctrl);
            // Not running: validated against the pipeline at start; reject bad JSON now.
            if !json.trim().is_empty()
                && let Err(e) = serde_json::from_str::<serde_json::Value>(&json)
            {
                self.post_warning(&format!(
                    "Invalid params {json}: not valid JSON ({e}); the previous params stay in force"
                ));
                return;
            }
            lock(&self.settings).params = json;
            return;
        };
        // Selectors that select nothing keep their target's value in force (`ctrl.params`).
        let (p, selector_warnings, unknown) = match def.parse_update(ctrl.params.as_ref(), &json) {
            Ok(u) => {
                let warnings: Vec<String> = (u.warnings.iter())
                    .map(|w| format!("Params for pipeline '{}': {w}", def.name))
                    .collect();
                (u.params, warnings, u.unknown)
            }
            Err(e) => {
                drop(ctrl);
                self.post_warning(&format!(
                    "Invalid params {json} for pipeline '{}': {e}; the previous params stay in force",
                    def.name
                ));
                return;
            }
        };
        let mut reload = ctrl
            .model_params
            .as_ref()
            .is_none_or(|old| def.needs_reload(old, &p));
        if reload && ctrl.grouped {
            // The group's child runs any size (each frame says its own): only a new model
            // would need a reload, and the child is shared.
            if ctrl
                .model_params
                .as_ref()
                .is_some_and(|old| old.model != p.model)
            {
                drop(ctrl);
                self.post_warning(&format!(
                    "Invalid params {json} for pipeline '{}': the model cannot change in batch group '{}' (its inference child is shared); the previous params stay in force",
                    def.name,
                    lock(&self.settings).batch_group
                ));
                return;
            }
            reload = false;
        }
        ctrl.params_gen += 1;
        ctrl.params = Some(p.clone());
        ctrl.params_json = json.clone();
        if reload {
            ctrl.model_params = Some(p.clone());
            ctrl.reload_gen = ctrl.params_gen;
            ctrl.reload_pending = true;
            ctrl.reload_restart = false;
            ctrl.reload_req = Some((ctrl.params_gen, p));
            if !ctrl.loader_running {
                ctrl.loader_running = true;
                let shared = self.shared.clone();
                let session = ctrl.session;
                let device = ctrl.device.unwrap_or(tch::Device::Cpu);
                let half = ctrl.half;
                let iso = ctrl.iso.clone();
                let def = def.clone();
                let spawned = std::thread::Builder::new()
                    .name("aipipeline-loader".into())
                    .spawn(move || loader(shared, session, def, device, half, iso));
                if let Err(e) = spawned {
                    // Report it as a failed load: the inference thread restores the previous
                    // params and warns, as for any failed reload.
                    ctrl.loader_running = false;
                    ctrl.reload_req = None;
                    let failed = (
                        ctrl.reload_gen,
                        Err(LoadError::Thread(e.to_string()).to_string()),
                    );
                    ctrl.loaded = Some(failed);
                }
            }
        } else if !ctrl.reload_pending {
            // The model in service takes these params: they are the ones to restore if a
            // later reload fails.
            ctrl.good_json = json.clone();
            ctrl.good_params = ctrl.params.clone();
        }
        drop(ctrl);
        lock(&self.settings).params = json;
        for w in &selector_warnings {
            self.post_warning(w);
        }
        self.note_unknown_keys(&def, unknown, false);
        gst::info!(CAT, imp = self, "params accepted (reload: {reload})");
        if reload {
            self.set_status(Status::Loading);
        }
    }

    // ---- start / stop ----

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let mut settings = lock(&self.settings).clone();
        self.set_status(Status::Loading);
        let isolated = settings.isolation == Isolation::Process;
        // Isolated: the model's device is the child's business; this process only converts
        // pass-through frames, on the CPU (no CUDA context here).
        let device = if isolated {
            tch::Device::Cpu
        } else {
            device::resolve(settings.device)
                .map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("{}", e)))?
        };
        let half = settings.precision == Precision::Fp16 && device.is_cuda();
        if settings.precision == Precision::Fp16 && !half && !isolated {
            gst::info!(
                CAT,
                imp = self,
                "precision=fp16 is CUDA-only; using fp32 on {device:?}"
            );
        }
        // `pipelines-dir` (a colon-separated list) replaces the default search path.
        let search = match settings.pipelines_dir.as_deref().filter(|d| !d.is_empty()) {
            Some(list) => pipeline::SearchPath::parse(list),
            None => pipeline::SearchPath::from_env(),
        };
        let registry = Registry::scan(&search);
        for w in &registry.warnings {
            self.post_warning(w);
        }
        let def = registry
            .resolve(
                &settings.pipeline,
                settings.model.as_ref().map(PathBuf::from),
            )
            .ok_or_else(|| {
                gst::error_msg!(
                    gst::ResourceError::NotFound,
                    ("{}", registry.unknown_message(&settings.pipeline))
                )
            })?;
        let update = def.parse_update(None, &settings.params).map_err(|e| {
            gst::error_msg!(
                gst::ResourceError::Settings,
                (
                    "Invalid params {} for pipeline '{}': {}",
                    settings.params,
                    def.name,
                    e
                )
            )
        })?;
        for w in &update.warnings {
            self.post_warning(&format!("Params for pipeline '{}': {w}", def.name));
        }
        self.note_unknown_keys(&def, update.unknown.clone(), true);
        let mut params = update.params;
        gst::info!(
            CAT,
            imp = self,
            "loading pipeline '{}' on {} ({}x{})",
            def.name,
            device::describe(device),
            params.width,
            params.height
        );
        let t0 = Instant::now();
        let grouped = !settings.batch_group.is_empty();
        if grouped && !isolated {
            return Err(gst::error_msg!(
                gst::ResourceError::Settings,
                (
                    "batch-group '{}' needs isolation=process (the group shares one inference child)",
                    settings.batch_group
                )
            ));
        }
        let mut input_area = None;
        let (engine, estimate, device_name, iso) = if isolated {
            let mut cmd = ChildCommand::locate(settings.child_path.as_deref())
                .map_err(|e| gst::error_msg!(gst::ResourceError::NotFound, ("{}", e)))?;
            // An own child (not a batch group's): its input area, inherited by every child
            // of this run, backs the pool proposed upstream.
            if !grouped {
                match InputArea::create() {
                    Ok(area) => {
                        cmd = cmd.with_input(area.clone());
                        input_area = Some(area);
                    }
                    Err(e) => self.post_warning(&format!(
                        "Cannot create the shared-memory input area ({e}); every input frame is copied to the inference child"
                    )),
                }
            }
            let spawner =
                Spawner::new().map_err(|e| gst::error_msg!(gst::CoreError::Thread, ("{}", e)))?;
            let iso = Arc::new(Iso {
                spawner,
                cmd,
                spec: LoadSpec {
                    pipeline: settings.pipeline.clone(),
                    model: settings.model.clone(),
                    pipelines_dir: Some(search.to_list()),
                    device: settings.device.to_string(),
                    fp16: settings.precision == Precision::Fp16,
                    params: String::new(),
                    resolved: None,
                },
                hang_timeout: Duration::from_millis(settings.hang_timeout_ms.max(1) as u64),
            });
            let load_error = |e: String| {
                gst::error_msg!(
                    gst::ResourceError::OpenRead,
                    (
                        "Cannot load pipeline '{}' in the inference child {}: {}",
                        def.name,
                        iso.cmd.program.display(),
                        e
                    )
                )
            };
            let (engine, warm, json, name) = if grouped {
                let key = GroupKey {
                    name: settings.batch_group.clone(),
                    pipeline: iso.spec.pipeline.clone(),
                    model: iso.spec.model.clone(),
                    pipelines_dir: iso.spec.pipelines_dir.clone(),
                    device: iso.spec.device.clone(),
                    fp16: iso.spec.fp16,
                    program: iso.cmd.program.clone(),
                };
                let (group, name, json) = Group::join(
                    key,
                    iso.clone(),
                    &settings.params,
                    &params,
                    Duration::from_millis(settings.batch_timeout_ms as u64),
                    settings.max_batch,
                )
                .map_err(load_error)?;
                let (pid, seen, _) = group.child();
                gst::info!(
                    CAT,
                    imp = self,
                    "batch group '{}': inference child {pid} runs pipeline '{}' on {name}",
                    settings.batch_group,
                    def.name
                );
                (
                    Engine::Group(Member { group, seen }),
                    Duration::ZERO,
                    json,
                    name,
                )
            } else {
                let (c, warm, json) =
                    start_child(&iso, &settings.params, Some(&params), true, &|| false)
                        .map_err(load_error)?;
                let name = c.device().to_string();
                gst::info!(
                    CAT,
                    imp = self,
                    "inference child {} runs pipeline '{}' on {name}",
                    c.pid(),
                    def.name
                );
                (Engine::Child(Box::new(c)), warm, json, name)
            };
            if json != settings.params {
                self.post_warning(&format!(
                    "Pipeline '{}' failed to load with params {}; running with the default params {{}}",
                    def.name, settings.params
                ));
                params = def
                    .parse_params(&json)
                    .map_err(|e| gst::error_msg!(gst::ResourceError::Settings, ("{}", e)))?;
                settings.params = json.clone();
                lock(&self.settings).params = json;
            }
            (engine, warm, name, Some(iso))
        } else {
            let runner = Runner::load(&def, &params, device, half)
                .map_err(|e| gst::error_msg!(gst::ResourceError::OpenRead, ("{}", e)))?;
            let warm = runner.warmup_time();
            (Engine::Local(runner), warm, device::describe(device), None)
        };
        gst::info!(
            CAT,
            imp = self,
            "pipeline '{}' loaded in {:?}",
            def.name,
            t0.elapsed()
        );
        let child_pid = match &engine {
            Engine::Child(c) => c.pid(),
            Engine::Group(m) => m.group.child().0,
            Engine::Local(_) => 0,
        };
        let def = Arc::new(def);
        {
            let mut ctrl = lock(&self.shared.ctrl);
            let session = ctrl.session + 1;
            *ctrl = Ctrl {
                running: true,
                session,
                def: Some(def.clone()),
                device: Some(device),
                half,
                params: Some(params.clone()),
                params_json: settings.params.clone(),
                model_params: Some(params.clone()),
                good_params: Some(params.clone()),
                good_json: settings.params.clone(),
                initial: Some((engine, estimate)),
                iso,
                grouped,
                ..Ctrl::default()
            };
        }
        self.shared.restart_req.store(false, Ordering::SeqCst);
        *lock(&self.shared.stats) = Stats {
            estimate,
            device: device_name,
            pipeline: def.name.clone(),
            child_pid,
            ..Stats::default()
        };
        *lock(&self.shared.mailbox) = Mailbox {
            shutdown: false,
            ..Mailbox::default()
        };
        let worker = Worker {
            element: self.obj().clone(),
            shared: self.shared.clone(),
            def,
            runner: None,
            seen_gen: 0,
            seen_reload: 0,
            active: params,
            loading: false,
            pending_online: false,
            in_info: None,
            out: None,
            last_warn: None,
            last_stats: Instant::now(),
            stats_interval: Duration::from_millis(settings.stats_interval_ms as u64),
            max_latency: Duration::from_millis(settings.max_latency_ms as u64),
            pass_late: settings.pass_late,
            restarts: 0,
            max_restarts: settings.max_restarts,
            restarting: false,
            child_checked: None,
            lost: None,
            fatal: false,
            staging: Default::default(),
        };
        let handle = std::thread::Builder::new()
            .name("aipipeline-infer".into())
            .spawn(move || worker.run())
            .map_err(|e| {
                gst::error_msg!(
                    gst::CoreError::Thread,
                    ("Cannot start the inference thread: {}", e)
                )
            })?;
        *lock(&self.worker) = Some(handle);
        *lock(&self.shared.input_area) = input_area;
        self.set_status(Status::Ready);
        Ok(())
    }

    fn shutdown_mailbox(&self) {
        let mut mb = lock(&self.shared.mailbox);
        mb.shutdown = true;
        mb.items.clear();
        mb.events = 0;
        self.shared.cond.notify_all();
    }

    fn stop(&self) {
        self.shutdown_mailbox();
        if let Some(h) = lock(&self.worker).take()
            && h.join().is_err()
        {
            gst::error!(CAT, imp = self, "inference thread panicked");
        }
        let mut ctrl = lock(&self.shared.ctrl);
        ctrl.running = false;
        ctrl.initial = None;
        ctrl.loaded = None;
        ctrl.reload_req = None;
        ctrl.params = None;
        ctrl.def = None;
        let iso = ctrl.iso.take();
        drop(ctrl);
        // The spawner thread ends once no loader holds it any more.
        drop(iso);
        // Buffers upstream still holds keep their slots (and the area) alive until freed.
        lock(&self.shared.input_area).take();
        lock(&self.shared.stats).child_pid = 0;
        gst::info!(CAT, imp = self, "stopped");
    }
}

#[glib::object_subclass]
impl ObjectSubclass for AiPipeline {
    const NAME: &'static str = "GstAiPipeline";
    type Type = super::AiPipeline;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let templ = klass.pad_template("sink").unwrap();
        let sinkpad = gst::Pad::builder_from_template(&templ)
            .chain_function(|_pad, parent, buffer| {
                AiPipeline::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |imp| imp.sink_chain(buffer),
                )
            })
            .event_function(|pad, parent, event| {
                AiPipeline::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.sink_event(pad, event),
                )
            })
            .query_function(|pad, parent, query| {
                AiPipeline::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.sink_query(pad, query),
                )
            })
            .build();
        let templ = klass.pad_template("src").unwrap();
        let srcpad = gst::Pad::builder_from_template(&templ)
            .query_function(|pad, parent, query| {
                AiPipeline::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.src_query(pad, query),
                )
            })
            .build();
        Self {
            sinkpad,
            srcpad,
            settings: Mutex::new(Settings::default()),
            shared: Arc::new(Shared::default()),
            worker: Mutex::new(None),
            unknown_keys: Mutex::new(Vec::new()),
        }
    }
}

impl ObjectImpl for AiPipeline {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPS: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("pipeline")
                    .nick("Pipeline")
                    .blurb("Pipeline name: noop, torchscript, or a manifest's name from the pipelines directory")
                    .default_value(Some(DEFAULT_PIPELINE))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("TorchScript file for pipeline=torchscript (the model param overrides it)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("pipelines-dir")
                    .nick("Pipelines directories")
                    .blurb(
                        "Directories of model manifests (*.toml, also one subdirectory down), \
                         colon-separated, searched in order instead of the default search path \
                         ($RIVULET_PIPELINES, $MODEL_DIR, the data dirs, beside the binary or \
                         the plugin, the build tree)",
                    )
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("auto, cpu, cuda or cuda:N (auto: CUDA when usable, else the CPU)")
                    .default_value(Some("auto"))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("precision", Precision::Fp32)
                    .nick("Precision")
                    .blurb("Float precision of the model (fp16 on CUDA only)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("params")
                    .nick("Params")
                    .blurb("Pipeline params as a JSON object; each set replaces all params (runner semantics)")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("max-latency-ms")
                    .nick("Maximum latency (ms)")
                    .blurb("A frame that waited longer than this in the mailbox is dropped (0: no bound)")
                    .maximum(60_000)
                    .default_value(DEFAULT_MAX_LATENCY_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("pass-late-frames")
                    .nick("Pass late frames")
                    .blurb("Pass a frame that waited longer than max-latency-ms on unchanged (counted in late-frames-passed) instead of dropping it: a per-stage deadline")
                    .default_value(false)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("stats-interval-ms")
                    .nick("Statistics interval (ms)")
                    .blurb("Interval of the aipipeline-stats element message (0: none)")
                    .maximum(3_600_000)
                    .default_value(DEFAULT_STATS_INTERVAL_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("isolation", Isolation::None)
                    .nick("Isolation")
                    .blurb("none: inference in this process; process: in a child process (rivulet-inference), restarted when it crashes or hangs")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("child-path")
                    .nick("Child path")
                    .blurb("Program run as the inference child with isolation=process (argument aipipeline-child); default: rivulet-inference next to the plugin, next to the program, then on PATH")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-restarts")
                    .nick("Maximum restarts")
                    .blurb("Inference child restarts (and in-process out-of-memory reloads) allowed in one run; one more is an element error")
                    .default_value(DEFAULT_MAX_RESTARTS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("hang-timeout-ms")
                    .nick("Hang timeout (ms)")
                    .blurb("An inference child that does not answer a frame within this time is killed and restarted")
                    .minimum(1)
                    .maximum(600_000)
                    .default_value(DEFAULT_HANG_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("batch-group")
                    .nick("Batch group")
                    .blurb("With isolation=process: elements of this process with the same batch-group and the same pipeline selection (pipeline, model, pipelines-dir, device, precision, child-path) share one inference child, which runs their frames as batches (empty: no sharing). Elements may join and leave at any time")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("batch-timeout-ms")
                    .nick("Batch timeout (ms)")
                    .blurb("In a batch group: how long the first frame of a batch waits for the other members' frames (the group's first element sets it)")
                    .maximum(1000)
                    .default_value(DEFAULT_BATCH_TIMEOUT_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-batch")
                    .nick("Maximum batch")
                    .blurb("In a batch group: most frames in one batch (the group's first element sets it)")
                    .minimum(1)
                    .maximum(crate::child::ChildProc::MAX_BATCH as u32)
                    .default_value(DEFAULT_MAX_BATCH)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("status", Status::Loading)
                    .nick("Status")
                    .blurb("loading, ready or error")
                    .read_only()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("input/output fps, inference latency p50/p95 (ms), queue drops, errors, frames in/out")
                    .read_only()
                    .build(),
            ]
        });
        PROPS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        match pspec.name() {
            "params" => {
                let json: Option<String> = value.get().unwrap_or(None);
                self.set_params(json.unwrap_or_default());
            }
            "device" => {
                let s: Option<String> = value.get().unwrap_or(None);
                let s = s.unwrap_or_else(|| "auto".into());
                match s.parse::<DeviceSpec>() {
                    Ok(d) => lock(&self.settings).device = d,
                    Err(e) => self.post_warning(&format!(
                        "{e}; device stays {}",
                        lock(&self.settings).device
                    )),
                }
            }
            name => {
                let mut s = lock(&self.settings);
                match name {
                    "pipeline" => {
                        s.pipeline = value
                            .get::<Option<String>>()
                            .unwrap_or(None)
                            .unwrap_or_else(|| DEFAULT_PIPELINE.into())
                    }
                    "model" => s.model = value.get().unwrap_or(None),
                    "pipelines-dir" => s.pipelines_dir = value.get().unwrap_or(None),
                    "precision" => s.precision = value.get().unwrap_or_default(),
                    "max-latency-ms" => {
                        s.max_latency_ms = value.get().unwrap_or(DEFAULT_MAX_LATENCY_MS)
                    }
                    "pass-late-frames" => s.pass_late = value.get().unwrap_or(false),
                    "stats-interval-ms" => {
                        s.stats_interval_ms = value.get().unwrap_or(DEFAULT_STATS_INTERVAL_MS)
                    }
                    "isolation" => s.isolation = value.get().unwrap_or_default(),
                    "child-path" => s.child_path = value.get().unwrap_or(None),
                    "max-restarts" => s.max_restarts = value.get().unwrap_or(DEFAULT_MAX_RESTARTS),
                    "hang-timeout-ms" => {
                        s.hang_timeout_ms = value.get().unwrap_or(DEFAULT_HANG_TIMEOUT_MS)
                    }
                    "batch-group" => {
                        s.batch_group = value
                            .get::<Option<String>>()
                            .unwrap_or(None)
                            .unwrap_or_default()
                    }
                    "batch-timeout-ms" => {
                        s.batch_timeout_ms = value.get().unwrap_or(DEFAULT_BATCH_TIMEOUT_MS)
                    }
                    "max-batch" => s.max_batch = value.get().unwrap_or(DEFAULT_MAX_BATCH),
                    other => gst::warning!(CAT, imp = self, "unknown property {other}"),
                }
            }
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = lock(&self.settings);
        match pspec.name() {
            "pipeline" => s.pipeline.to_value(),
            "model" => s.model.to_value(),
            "pipelines-dir" => s.pipelines_dir.to_value(),
            "device" => s.device.to_string().to_value(),
            "precision" => s.precision.to_value(),
            "params" => s.params.to_value(),
            "max-latency-ms" => s.max_latency_ms.to_value(),
            "pass-late-frames" => s.pass_late.to_value(),
            "stats-interval-ms" => s.stats_interval_ms.to_value(),
            "isolation" => s.isolation.to_value(),
            "child-path" => s.child_path.to_value(),
            "max-restarts" => s.max_restarts.to_value(),
            "hang-timeout-ms" => s.hang_timeout_ms.to_value(),
            "batch-group" => s.batch_group.to_value(),
            "batch-timeout-ms" => s.batch_timeout_ms.to_value(),
            "max-batch" => s.max_batch.to_value(),
            "status" => lock(&self.shared.status).to_value(),
            "stats" => {
                drop(s);
                let status = *lock(&self.shared.status);
                lock(&self.shared.stats).structure(status).to_value()
            }
            _ => glib::Value::from_type(pspec.value_type()),
        }
    }

    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> = LazyLock::new(|| {
            vec![
                // Action signal: kill and restart the inference child (isolation=process) at
                // the next frame, as for a crash (counted, aipipeline-restart posted).
                glib::subclass::Signal::builder("restart-child")
                    .action()
                    .class_handler(|args| {
                        if let Ok(el) = args[0].get::<super::AiPipeline>() {
                            el.imp().shared.restart_req.store(true, Ordering::SeqCst);
                        }
                        None
                    })
                    .build(),
            ]
        });
        SIGNALS.as_ref()
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.add_pad(&self.sinkpad).unwrap();
        obj.add_pad(&self.srcpad).unwrap();
    }
}

impl GstObjectImpl for AiPipeline {}

impl ElementImpl for AiPipeline {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "AI pipeline",
                "Filter/Effect/Video",
                "Runs a model pipeline (TorchScript via libtorch) on every video frame, off the streaming thread",
                "Rivulet developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let sink_caps = gst_video::VideoCapsBuilder::new()
                .format_list(frame::input_formats())
                .build();
            let src_caps = gst_video::VideoCapsBuilder::new()
                .format_list(frame::OUTPUT_FORMATS.iter().copied())
                .width_range(pipeline::MIN_SIZE as i32..=pipeline::MAX_SIZE as i32)
                .height_range(pipeline::MIN_SIZE as i32..=pipeline::MAX_SIZE as i32)
                .build();
            vec![
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &sink_caps,
                )
                .unwrap(),
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &src_caps,
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
        gst::debug!(CAT, imp = self, "{transition:?}");
        if transition == gst::StateChange::ReadyToPaused
            && let Err(msg) = self.start()
        {
            self.set_status(Status::Error);
            self.post_error_message(msg);
            return Err(gst::StateChangeError);
        }
        if transition == gst::StateChange::PausedToReady {
            // Unblock the streaming thread (it may wait for mailbox space) before the pads
            // are deactivated.
            self.shutdown_mailbox();
        }
        let res = self.parent_change_state(transition);
        if transition == gst::StateChange::PausedToReady {
            self.stop();
        }
        if res.is_err() && transition == gst::StateChange::ReadyToPaused {
            self.stop();
        }
        res
    }
}
