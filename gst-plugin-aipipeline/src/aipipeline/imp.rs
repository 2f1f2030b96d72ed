// SPDX-License-Identifier: MPL-2.0
//! The `aipipeline` element: sink pad → one-slot mailbox → inference thread → src pad.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::prelude::*;

use super::{
    Isolation, LOADING_EVENT, ONLINE_EVENT, Precision, RESTART_MESSAGE, STATS_MESSAGE, Status,
};
use crate::child::{ChildCommand, ChildError, ChildProc, InputLayout, LoadSpec, Spawner};
use crate::device::{self, DeviceSpec};
use crate::frame;
use crate::model::{self, LoadError, Runner};
use crate::pipeline::{self, Params, PipelineDef, Registry};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
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
/// The runner's "output stalled more than 5 s".
const DEFAULT_HANG_TIMEOUT_MS: u32 = 5000;
/// The runner's load limit.
const LOAD_TIMEOUT: Duration = Duration::from_secs(180);
/// Serialized events waiting in the mailbox before the streaming thread waits (bounded queue).
const MAX_QUEUED_EVENTS: usize = 64;
/// Latency samples kept for p50/p95.
const LATENCY_WINDOW: usize = 120;
/// At most one frame warning per this interval (the error counter counts all).
const WARN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
struct Settings {
    pipeline: String,
    model: Option<String>,
    pipelines_dir: Option<String>,
    device: DeviceSpec,
    precision: Precision,
    params: String,
    max_latency_ms: u32,
    /// Pass a frame older than max-latency-ms on unchanged instead of dropping it.
    pass_late: bool,
    stats_interval_ms: u32,
    isolation: Isolation,
    child_path: Option<String>,
    max_restarts: u32,
    hang_timeout_ms: u32,
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
        }
    }
}

/// Logs one stderr line of an inference child (the parent keeps the last ones too).
pub(crate) fn log_child_line(pid: u32, line: &str) {
    gst::debug!(CAT, "child {pid}: {line}");
}

/// Where the pipeline runs: in this process, or in an inference child.
enum Engine {
    Local(Runner),
    Child(Box<ChildProc>),
}

/// A finished load: the engine and its warm-up time, or why it failed.
type LoadResult = Result<(Engine, Duration), String>;

/// What a child needs to be (re)started and loaded (isolation=process).
struct Iso {
    spawner: Arc<Spawner>,
    cmd: ChildCommand,
    /// Pipeline selection; `params` is filled per load.
    spec: LoadSpec,
    hang_timeout: Duration,
}

/// Starts a child and loads `json` in it; with `fallback`, a failed load is retried once
/// with `{}` (the runner's initialisation fallback). Returns the child, its warm-up time and
/// the params JSON it runs with.
fn start_child(
    iso: &Iso,
    json: &str,
    resolved: Option<&Params>,
    fallback: bool,
    cancelled: &dyn Fn() -> bool,
) -> Result<(ChildProc, Duration, String), String> {
    let attempt =
        |json: &str, resolved: Option<&Params>| -> Result<(ChildProc, Duration), String> {
            let mut c = iso.spawner.spawn(&iso.cmd)?;
            let spec = LoadSpec {
                params: json.to_string(),
                resolved: resolved.map(Into::into),
                ..iso.spec.clone()
            };
            match c.load(&spec, LOAD_TIMEOUT, cancelled) {
                Ok(w) => Ok((c, w)),
                Err(e) => {
                    let fatal = e.is_fatal();
                    let logs = c.kill();
                    let tail = if fatal && !logs.is_empty() {
                        format!(" (last log lines: {})", logs.join(" | "))
                    } else {
                        String::new()
                    };
                    Err(format!("{e}{tail}"))
                }
            }
        };
    match attempt(json, resolved) {
        Ok((c, w)) => Ok((c, w, json.to_string())),
        Err(e) if fallback && !matches!(json.trim(), "" | "{}") && !cancelled() => {
            gst::warning!(CAT, "load with params {json} failed ({e}); trying {{}}");
            match attempt("{}", None) {
                Ok((c, w)) => Ok((c, w, "{}".to_string())),
                Err(e2) => Err(format!(
                    "{e}; the retry with default params {{}} failed too: {e2}"
                )),
            }
        }
        Err(e) => Err(e),
    }
}

enum Item {
    Buffer(gst::Buffer, Instant),
    Caps(gst_video::VideoInfo),
    Event(gst::Event),
}

/// The one-slot mailbox between the streaming thread and the inference thread. Serialized
/// events travel through it too, so they stay in order with buffers; at most one buffer waits.
struct Mailbox {
    items: VecDeque<Item>,
    events: usize,
    flushing: bool,
    shutdown: bool,
    busy: bool,
    flow: Result<gst::FlowSuccess, gst::FlowError>,
}

impl Default for Mailbox {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            events: 0,
            flushing: false,
            shutdown: true,
            busy: false,
            flow: Ok(gst::FlowSuccess::Ok),
        }
    }
}

/// Params and models shared between `set_property`, the loader thread and the inference thread.
#[derive(Default)]
struct Ctrl {
    running: bool,
    session: u64,
    def: Option<Arc<PipelineDef>>,
    device: Option<tch::Device>,
    half: bool,
    /// Latest accepted params, and their JSON.
    params: Option<Params>,
    params_json: String,
    params_gen: u64,
    /// Params the newest requested model is built for.
    model_params: Option<Params>,
    /// Params (and JSON) of the model in service: restored when a reload fails.
    good_params: Option<Params>,
    good_json: String,
    reload_gen: u64,
    /// A reload was requested and the inference thread has not taken its result yet.
    reload_pending: bool,
    reload_req: Option<(u64, Params)>,
    loader_running: bool,
    loaded: Option<(u64, LoadResult)>,
    initial: Option<(Engine, Duration)>,
    /// Set with isolation=process.
    iso: Option<Arc<Iso>>,
    /// The pending reload replaces a lost child (restart: `{}` fallback).
    reload_restart: bool,
    /// A restart's `{}` fallback took effect: the params now in force.
    fallback_json: Option<String>,
}

#[derive(Default)]
struct Stats {
    frames_in: u64,
    frames_out: u64,
    passthrough: u64,
    /// Late frames passed on unchanged (`pass-late-frames`).
    late_passed: u64,
    drops: u64,
    errors: u64,
    latencies_ms: VecDeque<f64>,
    window_in: u64,
    window_out: u64,
    in_fps: f64,
    out_fps: f64,
    /// Processing time estimate for the LATENCY query.
    estimate: Duration,
    device: String,
    pipeline: String,
    /// Inference child's pid (0: none).
    child_pid: u32,
    restarts: u32,
}

impl Stats {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        let mut v: Vec<f64> = self.latencies_ms.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let idx = ((v.len() - 1) as f64 * p).round() as usize;
        v[idx.min(v.len() - 1)]
    }

    fn structure(&self, status: Status) -> gst::Structure {
        gst::Structure::builder(STATS_MESSAGE)
            .field("input-fps", self.in_fps)
            .field("output-fps", self.out_fps)
            .field("inference-latency-p50-ms", self.percentile(0.5))
            .field("inference-latency-p95-ms", self.percentile(0.95))
            .field("queue-drops", self.drops)
            .field("errors", self.errors)
            .field("frames-in", self.frames_in)
            .field("frames-out", self.frames_out)
            .field("frames-passthrough", self.passthrough)
            .field("late-frames-passed", self.late_passed)
            .field("device", self.device.as_str())
            .field("pipeline", self.pipeline.as_str())
            .field("child-pid", self.child_pid)
            .field("restart-count", self.restarts)
            .field(
                "status",
                match status {
                    Status::Loading => "loading",
                    Status::Ready => "ready",
                    Status::Error => "error",
                },
            )
            .build()
    }
}

#[derive(Default)]
struct Shared {
    mailbox: Mutex<Mailbox>,
    cond: Condvar,
    ctrl: Mutex<Ctrl>,
    stats: Mutex<Stats>,
    status: Mutex<Status>,
    /// `restart-child` was emitted: the inference thread replaces the child at the next frame.
    restart_req: AtomicBool,
}

pub struct AiPipeline {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    settings: Mutex<Settings>,
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap()
}

impl AiPipeline {
    fn set_status(&self, s: Status) {
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

    fn post_warning(&self, msg: &str) {
        gst::warning!(CAT, imp = self, "{msg}");
        gst::element_imp_warning!(self, gst::StreamError::Failed, ("{}", msg));
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
        let (p, selector_warnings) = match def.parse_update(ctrl.params.as_ref(), &json) {
            Ok(u) => {
                let warnings: Vec<String> = (u.warnings.iter())
                    .map(|w| format!("Params for pipeline '{}': {w}", def.name))
                    .collect();
                (u.params, warnings)
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
        let reload = ctrl
            .model_params
            .as_ref()
            .is_none_or(|old| def.needs_reload(old, &p));
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
        let dir = settings
            .pipelines_dir
            .clone()
            .or_else(|| std::env::var(pipeline::PIPELINES_ENV).ok())
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        let registry = Registry::scan(dir.as_deref());
        for w in &registry.warnings {
            self.post_warning(w);
        }
        let def = registry
            .resolve(&settings.pipeline, settings.model.as_ref().map(PathBuf::from))
            .ok_or_else(|| {
                gst::error_msg!(
                    gst::ResourceError::NotFound,
                    (
                        "Unknown pipeline '{}'. Known pipelines: {} (pipelines directory: {}; set pipelines-dir or {})",
                        settings.pipeline,
                        registry.names().join(", "),
                        dir.as_ref().map(|d| d.display().to_string()).unwrap_or_else(|| "none".into()),
                        pipeline::PIPELINES_ENV
                    )
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
        let (engine, estimate, device_name, iso) = if isolated {
            let cmd = ChildCommand::locate(settings.child_path.as_deref())
                .map_err(|e| gst::error_msg!(gst::ResourceError::NotFound, ("{}", e)))?;
            let spawner =
                Spawner::new().map_err(|e| gst::error_msg!(gst::CoreError::Thread, ("{}", e)))?;
            let iso = Arc::new(Iso {
                spawner,
                cmd,
                spec: LoadSpec {
                    pipeline: settings.pipeline.clone(),
                    model: settings.model.clone(),
                    pipelines_dir: dir.as_ref().map(|d| d.to_string_lossy().into_owned()),
                    device: settings.device.to_string(),
                    fp16: settings.precision == Precision::Fp16,
                    params: String::new(),
                    resolved: None,
                },
                hang_timeout: Duration::from_millis(settings.hang_timeout_ms.max(1) as u64),
            });
            let (c, warm, json) =
                start_child(&iso, &settings.params, Some(&params), true, &|| false).map_err(
                    |e| {
                        gst::error_msg!(
                            gst::ResourceError::OpenRead,
                            (
                                "Cannot load pipeline '{}' in the inference child {}: {}",
                                def.name,
                                iso.cmd.program.display(),
                                e
                            )
                        )
                    },
                )?;
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
            let name = c.device().to_string();
            gst::info!(
                CAT,
                imp = self,
                "inference child {} runs pipeline '{}' on {name}",
                c.pid(),
                def.name
            );
            (Engine::Child(Box::new(c)), warm, name, Some(iso))
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
        lock(&self.shared.stats).child_pid = 0;
        gst::info!(CAT, imp = self, "stopped");
    }
}

/// The background loader: loads the newest requested model with no lock held, hands it over.
fn loader(
    shared: Arc<Shared>,
    session: u64,
    def: Arc<PipelineDef>,
    device: tch::Device,
    half: bool,
    iso: Option<Arc<Iso>>,
) {
    loop {
        let (generation, params, json, restart) = {
            let mut ctrl = lock(&shared.ctrl);
            match ctrl.reload_req.take() {
                Some((g, p)) if ctrl.running && ctrl.session == session => {
                    (g, p, ctrl.params_json.clone(), ctrl.reload_restart)
                }
                _ => {
                    if ctrl.session == session {
                        ctrl.loader_running = false;
                    }
                    return;
                }
            }
        };
        if let Some(iso) = &iso {
            // A new child per (re)load: the one in service keeps running until it is replaced.
            let cancelled = || {
                let c = lock(&shared.ctrl);
                !c.running || c.session != session || c.reload_gen != generation
            };
            gst::info!(
                CAT,
                "starting an inference child for '{}' ({}x{})",
                def.name,
                params.width,
                params.height
            );
            let res = start_child(iso, &json, Some(&params), restart, &cancelled);
            let mut ctrl = lock(&shared.ctrl);
            if !ctrl.running || ctrl.session != session {
                return;
            }
            let res = res.map(|(c, warm, used)| {
                if used != json {
                    ctrl.fallback_json = Some(used);
                }
                (Engine::Child(Box::new(c)), warm)
            });
            ctrl.loaded = Some((generation, res));
            continue;
        }
        gst::info!(
            CAT,
            "loading '{}' in the background ({}x{})",
            def.name,
            params.width,
            params.height
        );
        let res = Runner::load(&def, &params, device, half)
            .map(|r| {
                let w = r.warmup_time();
                (Engine::Local(r), w)
            })
            .map_err(|e| e.to_string());
        let mut ctrl = lock(&shared.ctrl);
        if !ctrl.running || ctrl.session != session {
            return;
        }
        ctrl.loaded = Some((generation, res));
    }
}

struct OutState {
    info: gst_video::VideoInfo,
    pool: gst::BufferPool,
    bpp: i64,
    /// `noop` at the input's size, in the input's own (YUV) format: each input buffer goes
    /// on as the output, no conversion or copy.
    passthrough: bool,
}

/// State owned by the inference thread.
struct Worker {
    element: super::AiPipeline,
    shared: Arc<Shared>,
    def: Arc<PipelineDef>,
    runner: Option<Engine>,
    seen_gen: u64,
    seen_reload: u64,
    /// Params the output follows (size), applied at frame boundaries.
    active: Params,
    /// A reload is in progress: frames pass through unprocessed at the new size.
    loading: bool,
    pending_online: bool,
    in_info: Option<gst_video::VideoInfo>,
    out: Option<OutState>,
    last_warn: Option<Instant>,
    last_stats: Instant,
    stats_interval: Duration,
    max_latency: Duration,
    pass_late: bool,
    /// Inference child restarts in this run (isolation=process).
    restarts: u32,
    max_restarts: u32,
    /// The pending load replaces a lost child.
    restarting: bool,
    /// The child was found dead outside a frame (e.g. on a params update): replaced at the
    /// next frame.
    lost: Option<String>,
    /// The restart limit was hit: every frame is an error.
    fatal: bool,
    /// Passthrough (`noop`): when the inference child last got a frame.
    child_checked: Option<Instant>,
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

/// Starts the loader thread for the pending request unless it runs already.
fn ensure_loader(shared: &Arc<Shared>, ctrl: &mut Ctrl) -> Result<(), String> {
    if ctrl.loader_running {
        return Ok(());
    }
    let Some(def) = ctrl.def.clone() else {
        return Err("not running".into());
    };
    ctrl.loader_running = true;
    let shared = shared.clone();
    let session = ctrl.session;
    let device = ctrl.device.unwrap_or(tch::Device::Cpu);
    let half = ctrl.half;
    let iso = ctrl.iso.clone();
    std::thread::Builder::new()
        .name("aipipeline-loader".into())
        .spawn(move || loader(shared, session, def, device, half, iso))
        .map(|_| ())
        .map_err(|e| {
            ctrl.loader_running = false;
            e.to_string()
        })
}

/// What the inference step produced.
enum Produced {
    /// Converted / processed in this process.
    Tensor(Result<tch::Tensor, tch::TchError>),
    /// Processed by the child: the output is in its shared memory.
    Child(Result<(), ChildError>),
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

    fn run(mut self) {
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
                            None => {}
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
                            }
                        }
                        self.restarting = false;
                        lock(&self.shared.stats).child_pid = match &r {
                            Engine::Child(c) => c.pid(),
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
                                None => {}
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

    /// Replaces a lost inference child: counts the restart (an element error beyond
    /// max-restarts), posts `aipipeline-restart` with the child's last log lines, sends the
    /// loading event and asks the loader for a new child with the current params (the `{}`
    /// fallback applies). Frames pass through at the output size meanwhile.
    fn lose_child(&mut self, reason: String) -> Result<(), gst::FlowError> {
        let (pid, logs) = match self.runner.take() {
            Some(Engine::Child(c)) => (c.pid(), c.kill()),
            other => {
                self.runner = other;
                (0, Vec::new())
            }
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
        if self.shared.restart_req.swap(false, Ordering::SeqCst) {
            if matches!(self.runner, Some(Engine::Child(_))) && !self.loading {
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

        let produced = {
            let vframe = match gst_video::VideoFrameRef::from_buffer_ref_readable(
                inbuf.as_ref(),
                &in_info,
            ) {
                Ok(f) => f,
                Err(_) => {
                    self.frame_warning(format!(
                        "Cannot map an input buffer as {}x{} {:?}; frame skipped",
                        in_info.width(),
                        in_info.height(),
                        in_info.format()
                    ));
                    return Ok(gst::FlowSuccess::Ok);
                }
            };
            let crop = frame::cover_crop(vframe.width(), vframe.height(), w, h);
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
            let (planes, strides) = (&planes[..n], &strides[..n]);
            if real && let Some(Engine::Child(c)) = self.runner.as_mut() {
                let wire = match layout {
                    Some(l) => InputLayout::Packed {
                        bpp: l.bpp,
                        first: l.first,
                        bgr: l.bgr,
                    },
                    None => {
                        let m = frame::YuvMatrix::from_info(&in_info);
                        InputLayout::Yuv420 {
                            nv12: in_info.format() == gst_video::VideoFormat::Nv12,
                            kr: m.kr,
                            kb: m.kb,
                            full_range: m.full_range,
                        }
                    }
                };
                // restart-child also ends the wait for a hung child (no hang timeout to sit out).
                let restart_req = &self.shared.restart_req;
                Produced::Child(c.frame_or_cancel(
                    planes,
                    strides,
                    vw,
                    vh,
                    wire,
                    w,
                    h,
                    hang_timeout,
                    &|| restart_req.load(Ordering::SeqCst),
                ))
            } else {
                Produced::Tensor(match (layout, planes.first()) {
                    (Some(layout), Some(data)) => frame::upload_rgb(
                        data,
                        strides.first().copied().unwrap_or(0),
                        vw,
                        vh,
                        layout,
                        crop,
                        device,
                    ),
                    (Some(_), None) => return Ok(gst::FlowSuccess::Ok),
                    (None, _) => frame::upload_yuv420(
                        planes,
                        strides,
                        vw,
                        vh,
                        in_info.format() == gst_video::VideoFormat::Nv12,
                        frame::YuvMatrix::from_info(&in_info),
                        crop,
                        device,
                    ),
                })
            }
        };
        let out_rgb = match produced {
            Produced::Child(Ok(())) => None,
            Produced::Child(Err(e)) if e.is_fatal() => {
                // Lost: start the restart, then this frame passes through like the ones after.
                self.lose_child(e.to_string())?;
                return self.handle_buffer(inbuf, arrived);
            }
            Produced::Child(Err(e)) => {
                self.frame_warning(format!("{e}; frame skipped"));
                return Ok(gst::FlowSuccess::Ok);
            }
            Produced::Tensor(rgb) => {
                let result = rgb.map_err(model::FrameError::from).and_then(|rgb| {
                    match (&self.runner, real) {
                        (Some(Engine::Local(r)), true) => model::process(r, rgb, w, h),
                        _ => Ok(frame::to_u8_frame(rgb, w, h)?),
                    }
                });
                match result {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.frame_warning(format!(
                            "Pipeline '{}' failed on a frame: {e}; frame skipped",
                            self.def.name
                        ));
                        return Ok(gst::FlowSuccess::Ok);
                    }
                }
            }
        };
        if passthrough {
            return self.finish_frame(inbuf, real, late, t0);
        }
        let Some(out) = &self.out else {
            return Err(gst::FlowError::NotNegotiated);
        };
        let mut outbuf = out.pool.acquire_buffer(None)?;
        {
            let Some(bufref) = outbuf.get_mut() else {
                return Err(gst::FlowError::Error);
            };
            bufref.set_pts(inbuf.pts());
            bufref.set_dts(inbuf.dts());
            bufref.set_duration(inbuf.duration());
            bufref.set_offset(inbuf.offset());
            bufref.set_offset_end(inbuf.offset_end());
            if inbuf.flags().contains(gst::BufferFlags::DISCONT) {
                bufref.set_flags(gst::BufferFlags::DISCONT);
            }
            let mut vframe = gst_video::VideoFrameRef::from_buffer_ref_writable(bufref, &out.info)
                .map_err(|_| gst::FlowError::Error)?;
            let stride = vframe.plane_stride()[0].max(0) as usize;
            let (ow, oh) = (vframe.width(), vframe.height());
            let data = vframe
                .plane_data_mut(0)
                .map_err(|_| gst::FlowError::Error)?;
            let written = match (&out_rgb, &self.runner) {
                (Some(t), _) => {
                    frame::download_rgb(t, data, stride, ow, oh, out.bpp).map_err(|e| e.to_string())
                }
                (None, Some(Engine::Child(c))) => {
                    copy_rgb(c.output(), data, stride, ow, oh, out.bpp)
                }
                (None, _) => Err("no output".to_string()),
            };
            if let Err(e) = written {
                drop(vframe);
                self.frame_warning(format!("Cannot write an output frame: {e}; frame skipped"));
                return Ok(gst::FlowSuccess::Ok);
            }
        }
        drop(out_rgb);
        self.finish_frame(outbuf, real, late, t0)
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
                    .nick("Pipelines directory")
                    .blurb("Directory of model manifests (*.toml); default: $RIVULET_PIPELINES")
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
                    .blurb("Inference child restarts allowed in one run; one more loss is an element error")
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
