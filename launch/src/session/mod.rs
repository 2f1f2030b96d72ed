// SPDX-License-Identifier: MPL-2.0
//! One live session: its stream (GStreamer graph and loops, `stream.rs`), status, health,
//! params, events, counters and restart budget.
//!
//! Layer: below the supervisor (`crate::daemon`), which it never calls: it reports up through
//! the [`Report`] channel it was given. Above media assembly (`crate::media`, `crate::graph`)
//! and the bottom modules (`config`, `health`, `status`, `feed`, `templates`).

pub mod bus;
pub mod processing;
pub mod stream;

use crate::config::{Config, RestartPolicy};
use crate::health::{Action, FpsWindow, Inputs, Machine, State};
use crate::pyjson::params_hash;
use crate::status::{InferenceStatus, InputStatus, Status, envelope, ms, ms_opt, now_secs};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stream::{StartRequest, StreamHandle};
use tokio::sync::mpsc;

/// Inference restarts allowed in a session's life, the daemon's with one session (docs/runner.md,
/// "Restarts and restart policy").
pub const MAX_RESTARTS: u32 = 3;

/// How long a start waits for the previous stream to stop (docs/runner.md, "Stream start and
/// stop").
pub const STOP_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("previous stream did not stop within 10 s")]
    PreviousStillRunning,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Pipeline(String),
    /// `--max-sessions` sessions are running already (503).
    #[error("{0}")]
    Full(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("params must be a JSON object")]
    NotAnObject,
    #[error("{0}")]
    Invalid(String),
    /// Already reported as an `error` event (docs/runner.md, "Params").
    #[error("{0}")]
    ResolutionChange(String),
}

/// How long the dashboard's preview branches keep running after the last preview fetch.
pub const PREVIEW_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub frames_in: u64,
    pub frames_out: u64,
    pub loading_frames_out: u64,
    pub dropped_by_cap: u64,
    pub segments_in: u64,
    pub segments_out: u64,
    pub streams_started: u64,
}

impl Counters {
    /// Adds `other`'s counts to these (totals over several sessions).
    pub fn add(&mut self, other: &Counters) {
        self.frames_in += other.frames_in;
        self.frames_out += other.frames_out;
        self.loading_frames_out += other.loading_frames_out;
        self.dropped_by_cap += other.dropped_by_cap;
        self.segments_in += other.segments_in;
        self.segments_out += other.segments_out;
        self.streams_started += other.streams_started;
    }
}

/// A session's state, under one lock, in four groups.
pub(crate) struct Core {
    /// The health state machine.
    pub machine: Machine,
    pub inf: InferenceSide,
    pub st: StreamSide,
    pub flow: Flow,
    pub preview: Previews,
    pub counters: Counters,
}

/// The inference side: readiness, liveness, the status object's `inference_status` figures,
/// errors and restarts.
pub(crate) struct InferenceSide {
    pub process_start_time: f64,
    pub pipeline_ready: bool,
    pub pipeline_ready_time: Option<f64>,
    pub inference_alive: bool,
    pub inference: InferenceStatus,
    pub last_error_time: Option<f64>,
    pub last_restart_time: Option<f64>,
    /// A computed ERROR asked `aipipeline` for a child restart that has not happened yet.
    pub child_restart_requested: bool,
}

/// The running stream: ids, params, its events sender and stage graph.
pub(crate) struct StreamSide {
    pub stream_running: bool,
    pub stream_start_time: f64,
    pub request_id: String,
    pub manifest_id: String,
    pub stream_id: String,
    pub current_params: Value,
    pub last_params_update_time: Option<f64>,
    pub events: Option<mpsc::Sender<Value>>,
    /// The data channel's queue (`data_url`), when the stream has one.
    pub data: Option<mpsc::Sender<Value>>,
    /// The running stream's stage graph, when it runs one (per-stage status).
    pub graph: Option<Arc<crate::graph::BuiltGraph>>,
}

/// Frames in and out: last times, the runner's 10 s fps windows, and the dashboard's 1 s ones.
pub(crate) struct Flow {
    pub last_input_time: Option<f64>,
    pub last_output_time: Option<f64>,
    pub input_fps: FpsWindow,
    pub output_fps: FpsWindow,
    pub live_input_fps: FpsWindow,
    pub live_output_fps: FpsWindow,
    /// Audio frames from the decoder and into tricklesink (the heartbeat's audio fps).
    pub audio_in_fps: FpsWindow,
    pub audio_out_fps: FpsWindow,
    pub latency_p50_ms: Option<f64>,
}

/// The dashboard's preview pictures.
#[derive(Default)]
pub(crate) struct Previews {
    pub input: Option<bytes::Bytes>,
    pub output: Option<bytes::Bytes>,
    /// When a preview was last fetched: the preview branches run only while someone looks.
    pub fetched: Option<std::time::Instant>,
}

/// What a session tells its supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The session's stream stopped (any reason: a stop, the input's end, an error, idle), and
    /// no new one replaces it. `generation`: the session's start count then (a report older
    /// than the session's last start is stale).
    Stopped { session: String, generation: u64 },
}

pub struct Session {
    /// The session's key (`stream_id`, else `gateway_request_id`); empty for the single
    /// runner session of `--max-sessions 1`.
    pub id: String,
    pub config: Arc<Config>,
    /// Where the session reports to its supervisor.
    reports: mpsc::UnboundedSender<Report>,
    /// `aipipeline`'s `batch-group` for this session's pipeline: sessions with the same group
    /// share one inference child (`None`: its own).
    pub batch_group: Option<String>,
    /// Starts so far (see [`Report::Stopped`]).
    generation: std::sync::atomic::AtomicU64,
    pub(crate) core: Mutex<Core>,
    stream: tokio::sync::Mutex<Option<StreamHandle>>,
    /// Pipeline templates (`/v1/pipelines`), to resolve a start request's `pipeline`.
    pub templates: Arc<crate::templates::Templates>,
    /// The realtime feed (`/v1/events`): stage events.
    pub feed: crate::feed::Feed,
    /// What `/metrics` records as it happens (shared with the daemon and its other sessions).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Session {
    /// A new session with `config`'s initial state.
    pub fn new(
        id: String,
        config: Arc<Config>,
        templates: Arc<crate::templates::Templates>,
        feed: crate::feed::Feed,
        metrics: Arc<crate::metrics::Metrics>,
        reports: mpsc::UnboundedSender<Report>,
        batch_group: Option<String>,
    ) -> Arc<Session> {
        let window = config.fps_window.as_secs_f64();
        let now = now_secs();
        Arc::new(Session {
            id,
            reports,
            batch_group,
            generation: std::sync::atomic::AtomicU64::new(0),
            core: Mutex::new(Core {
                machine: Machine::with_idle_stop(config.input_idle_stop.as_secs_f64()),
                inf: InferenceSide {
                    process_start_time: now,
                    pipeline_ready: false,
                    pipeline_ready_time: None,
                    inference_alive: true,
                    inference: InferenceStatus::default(),
                    last_error_time: None,
                    last_restart_time: None,
                    child_restart_requested: false,
                },
                st: StreamSide {
                    stream_running: false,
                    stream_start_time: 0.0,
                    request_id: String::new(),
                    manifest_id: String::new(),
                    stream_id: String::new(),
                    current_params: config.initial_params.clone(),
                    last_params_update_time: None,
                    events: None,
                    data: None,
                    graph: None,
                },
                flow: Flow {
                    last_input_time: None,
                    last_output_time: None,
                    input_fps: FpsWindow::new(window),
                    output_fps: FpsWindow::new(window),
                    live_input_fps: FpsWindow::new(1.0),
                    live_output_fps: FpsWindow::new(1.0),
                    audio_in_fps: FpsWindow::new(window),
                    audio_out_fps: FpsWindow::new(window),
                    latency_p50_ms: None,
                },
                preview: Previews::default(),
                counters: Counters::default(),
            }),
            templates,
            feed,
            metrics,
            config,
            stream: tokio::sync::Mutex::new(None),
        })
    }

    /// Takes over the inference side's state from `other` (the supervisor's runner session): a
    /// new session of a warm daemon is not LOADING, one of a failed load is in ERROR.
    pub fn inherit(&self, other: &Session) {
        let (ready, ready_time, alive, start) = {
            let o = other.core.lock().unwrap();
            (
                o.inf.pipeline_ready,
                o.inf.pipeline_ready_time,
                o.inf.inference_alive,
                o.inf.process_start_time,
            )
        };
        let mut c = self.core.lock().unwrap();
        c.inf.pipeline_ready = ready;
        c.inf.pipeline_ready_time = ready_time;
        c.inf.inference_alive = alive;
        c.inf.process_start_time = start;
    }

    /// Removes the crash-cleanup file of a session that ended (one of many sessions; the one
    /// session of `--max-sessions 1` keeps its file, as the runner does).
    pub fn forget_state(&self) {
        if !self.id.is_empty() {
            let _ = std::fs::remove_file(self.config.state_file_for(&self.id));
        }
    }

    /// Starts so far (see [`Report::Stopped`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the pipeline is loaded (the warm-up, or the element's online event).
    pub fn pipeline_ready(&self) -> bool {
        self.core.lock().unwrap().inf.pipeline_ready
    }

    /// Whether a stream runs (or is starting) in this session.
    pub fn is_running(&self) -> bool {
        self.core.lock().unwrap().st.stream_running
    }

    /// When the session's stream started (seconds since the epoch; 0: never).
    pub fn started_at(&self) -> f64 {
        self.core.lock().unwrap().st.stream_start_time
    }

    /// The running stream's ids: (request_id, manifest_id, stream_id).
    pub fn ids(&self) -> (String, String, String) {
        let c = self.core.lock().unwrap();
        (
            c.st.request_id.clone(),
            c.st.manifest_id.clone(),
            c.st.stream_id.clone(),
        )
    }

    pub fn state(&self) -> State {
        self.core.lock().unwrap().machine.state
    }

    /// The status object of `GET /api/status`.
    pub fn status(&self) -> Status {
        let c = self.core.lock().unwrap();
        Status {
            kind: "status",
            pipeline: self.config.pipeline.clone(),
            start_time: if c.st.stream_start_time > 0.0 {
                ms(c.st.stream_start_time)
            } else {
                0
            },
            state: c.machine.state.as_str(),
            last_state_update_time: ms_opt(c.machine.last_state_update_time),
            input_status: InputStatus {
                last_input_time: ms_opt(c.flow.last_input_time),
                fps: c.flow.input_fps.fps(),
            },
            inference_status: InferenceStatus {
                last_output_time: ms_opt(c.flow.last_output_time),
                fps: c.flow.output_fps.fps(),
                ..c.inf.inference.clone()
            },
            stages: c.st.graph.as_ref().map(|g| g.stats()),
        }
    }

    pub fn counters(&self) -> Counters {
        self.core.lock().unwrap().counters.clone()
    }

    pub fn current_params(&self) -> Value {
        self.core.lock().unwrap().st.current_params.clone()
    }

    /// Sends an event on the running stream's events channel (dropped when none, or when the
    /// channel is saturated: events are never allowed to block the caller).
    pub fn emit(&self, event: Value, queue_event_type: &str) {
        let tx = self.core.lock().unwrap().st.events.clone();
        if let Some(tx) = tx
            && tx.try_send(envelope(event, queue_event_type)).is_err()
        {
            tracing::warn!("events channel saturated or closed: event dropped");
        }
    }

    // ---- called from the stream's streaming threads (short locks, no I/O) ----

    pub fn on_input_frame(&self) {
        let now = now_secs();
        let mut c = self.core.lock().unwrap();
        c.flow.last_input_time = Some(now);
        c.flow.input_fps.frame(now);
        c.flow.live_input_fps.frame(now);
        c.counters.frames_in += 1;
    }

    /// An audio frame left the decoder (`egress` false) or reached tricklesink (true).
    pub fn on_audio_frame(&self, egress: bool) {
        let now = now_secs();
        let mut c = self.core.lock().unwrap();
        let w = if egress {
            &mut c.flow.audio_out_fps
        } else {
            &mut c.flow.audio_in_fps
        };
        w.frame(now);
    }

    /// Audio frames per second in and out, over the same windows as the video fps (0 without
    /// audio).
    pub fn audio_fps(&self) -> (f64, f64) {
        let now = now_secs();
        let mut c = self.core.lock().unwrap();
        c.flow.audio_in_fps.tick(now);
        c.flow.audio_out_fps.tick(now);
        (c.flow.audio_in_fps.fps(), c.flow.audio_out_fps.fps())
    }

    pub fn on_frame_dropped_by_cap(&self) {
        self.core.lock().unwrap().counters.dropped_by_cap += 1;
    }

    pub fn on_output_frame(&self, real: bool) {
        let now = now_secs();
        let mut c = self.core.lock().unwrap();
        if real {
            c.flow.last_output_time = Some(now);
            c.flow.output_fps.frame(now);
            c.flow.live_output_fps.frame(now);
            c.counters.frames_out += 1;
        } else {
            c.counters.loading_frames_out += 1;
        }
    }

    pub fn set_latency_p50(&self, latency_ms: f64) {
        self.core.lock().unwrap().flow.latency_p50_ms = Some(latency_ms);
    }

    /// Whether a preview was fetched within [`PREVIEW_IDLE`] (else the preview branches drop
    /// their frames before any conversion or JPEG encoding).
    pub fn previews_wanted(&self) -> bool {
        self.core
            .lock()
            .unwrap()
            .preview
            .fetched
            .is_some_and(|t| t.elapsed() < PREVIEW_IDLE)
    }

    pub fn set_preview(&self, input: bool, jpeg: bytes::Bytes) {
        let mut c = self.core.lock().unwrap();
        if input {
            c.preview.input = Some(jpeg);
        } else {
            c.preview.output = Some(jpeg);
        }
    }

    /// The last preview JPEG; fetching one keeps the preview branches running for
    /// [`PREVIEW_IDLE`].
    pub fn preview(&self, input: bool) -> Option<bytes::Bytes> {
        let mut c = self.core.lock().unwrap();
        c.preview.fetched = Some(std::time::Instant::now());
        if input {
            c.preview.input.clone()
        } else {
            c.preview.output.clone()
        }
    }

    /// Rivulet's own dashboard data: the status plus live figures.
    pub fn dashboard(&self) -> Value {
        let status = self.status();
        let now = now_secs();
        let mut c = self.core.lock().unwrap();
        c.flow.live_input_fps.tick(now);
        c.flow.live_output_fps.tick(now);
        // A window that saw no frame for 2 s reads 0.
        let stale = |t: Option<f64>| t.is_none_or(|t| now - t > 2.0);
        json!({
            "status": status,
            "params": c.st.current_params,
            "live_input_fps": if stale(c.flow.last_input_time) { 0.0 } else { c.flow.live_input_fps.fps() },
            "live_output_fps": if stale(c.flow.last_output_time) { 0.0 } else { c.flow.live_output_fps.fps() },
            "latency_p50_ms": c.flow.latency_p50_ms,
            "frames_in": c.counters.frames_in,
            "frames_out": c.counters.frames_out,
        })
    }

    pub fn on_segment(&self, input: bool) {
        let mut c = self.core.lock().unwrap();
        if input {
            c.counters.segments_in += 1;
        } else {
            c.counters.segments_out += 1;
        }
    }

    pub fn set_pipeline_ready(&self, ready: bool) {
        let mut c = self.core.lock().unwrap();
        if ready && !c.inf.pipeline_ready {
            c.inf.pipeline_ready_time = Some(now_secs());
        }
        c.inf.pipeline_ready = ready;
    }

    /// An inference error: `last_error` and an `error` event (docs/runner.md, "Events").
    pub fn report_error(&self, message: &str) {
        let now = now_secs();
        {
            let mut c = self.core.lock().unwrap();
            c.inf.last_error_time = Some(now);
            c.inf.inference.last_error_time = Some(ms(now));
            c.inf.inference.last_error = Some(message.to_string());
        }
        tracing::warn!(%message, "inference error");
        self.emit_error(message, now);
    }

    /// A warning that is not an error (accepted params with unknown keys): `last_warning` in
    /// the status, logged; no `error` event and no effect on the health rules.
    pub fn report_warning(&self, message: &str) {
        {
            let mut c = self.core.lock().unwrap();
            c.inf.inference.last_warning_time = Some(ms(now_secs()));
            c.inf.inference.last_warning = Some(message.to_string());
        }
        tracing::warn!(%message, "pipeline warning");
    }

    /// An error that ends the stream outside inference (the input channel gone with a 404, an
    /// output that cannot be published): an `error` event, so the gateway sees why the stream
    /// stopped; `last_error` stays about inference (docs/runner.md, "Events").
    pub fn report_stream_error(&self, message: &str) {
        self.emit_error(message, now_secs());
    }

    fn emit_error(&self, message: &str, now: f64) {
        self.emit(
            json!({"type": "error", "pipeline": self.config.pipeline, "message": message,
                   "time": now, "timestamp": ms(now)}),
            "ai_stream_events",
        );
    }

    /// Validates a params object against the base params (docs/runner.md, "Params").
    pub fn validate_params(params: &Value) -> Result<(), ParamsError> {
        let map = params.as_object().ok_or(ParamsError::NotAnObject)?;
        for key in ["width", "height"] {
            if let Some(v) = map.get(key) {
                let n = v.as_i64().ok_or_else(|| {
                    ParamsError::Invalid(format!("{key} must be an integer, got {v}"))
                })?;
                if !(384..=1024).contains(&n) || n % 64 != 0 {
                    return Err(ParamsError::Invalid(format!(
                        "{key} must be a multiple of 64 between 384 and 1024, got {n}"
                    )));
                }
            }
        }
        if let Some(v) = map.get("max_framerate") {
            match v.as_i64() {
                Some(n) if (1..=60).contains(&n) => {}
                _ => {
                    return Err(ParamsError::Invalid(format!(
                        "max_framerate must be an integer from 1 to 60, got {v}"
                    )));
                }
            }
        }
        if let Some(v) = map.get("show_reloading_frame")
            && !v.is_boolean()
        {
            return Err(ParamsError::Invalid(format!(
                "show_reloading_frame must be a boolean, got {v}"
            )));
        }
        Ok(())
    }

    /// The output size a params object asks for.
    pub fn size_of(params: &Value) -> (i64, i64) {
        let get = |k: &str| params.get(k).and_then(Value::as_i64).unwrap_or(512);
        (get("width"), get("height"))
    }

    /// A params update (control channel, `POST /api/params` or a start request).
    /// Records it, then applies it to the running stream, if any.
    pub async fn update_params(self: &Arc<Self>, params: Value) -> Result<(), ParamsError> {
        Self::validate_params(&params)?;
        let now = now_secs();
        {
            let mut c = self.core.lock().unwrap();
            c.st.last_params_update_time = Some(now);
            c.inf.inference.last_params_update_time = Some(ms(now));
            c.inf.inference.last_params_hash = Some(params_hash(&params));
            c.inf.inference.last_params = Some(params.clone());
        }
        let stream = self.stream.lock().await;
        if let Some(s) = stream.as_ref() {
            let current = self.current_params();
            if Self::size_of(&current) != Self::size_of(&params) {
                let msg = "Cannot change output resolution mid-stream; restart the stream with \
                           the new width and height";
                self.report_error(msg);
                return Err(ParamsError::ResolutionChange(msg.into()));
            }
            s.apply_params(&params);
        }
        self.core.lock().unwrap().st.current_params = params;
        Ok(())
    }

    /// Starts a stream, stopping the running one first (bounded wait).
    pub async fn start_stream(
        self: &Arc<Self>,
        req: StartRequest,
        received_at: f64,
    ) -> Result<(), StartError> {
        Self::validate_params(&req.params).map_err(|e| StartError::Invalid(e.to_string()))?;
        stream::check_pipeline(self, &req).map_err(StartError::Invalid)?;
        let mut slot = self.stream.lock().await;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(old) = slot.take() {
            if tokio::time::timeout(STOP_WAIT, old.stop()).await.is_err() {
                return Err(StartError::PreviousStillRunning);
            }
            // Replaced, not ended: nothing to report.
            self.on_stream_stopped(false);
        }
        let state_file = self.config.state_file_for(&self.id);
        if let Ok(text) = serde_json::to_vec(&req.to_json())
            && let Err(e) = std::fs::write(&state_file, text)
        {
            tracing::warn!("cannot persist the start request to {state_file:?}: {e}");
        }
        let now = now_secs();
        {
            let mut c = self.core.lock().unwrap();
            c.st.request_id = req.request_id.clone();
            c.st.manifest_id = req.manifest_id.clone();
            c.st.stream_id = req.stream_id.clone();
            c.st.stream_start_time = now;
            c.flow.last_input_time = None;
            c.flow.input_fps.reset();
            c.flow.output_fps.reset();
            c.flow.audio_in_fps.reset();
            c.flow.audio_out_fps.reset();
            c.st.last_params_update_time = Some(now);
            c.inf.inference.last_params_update_time = Some(ms(now));
            c.inf.inference.last_params_hash = Some(params_hash(&req.params));
            c.inf.inference.last_params = Some(req.params.clone());
            c.st.current_params = req.params.clone();
            c.machine.on_stream_start(now);
            c.counters.streams_started += 1;
            // Running from now on, so that a health tick during the (possibly slow: an
            // inference child loading) start does not see "no stream", go OFFLINE and reset
            // the params and ids just set. A failed start clears it below.
            c.st.stream_running = true;
        }
        match StreamHandle::start(self.clone(), req).await {
            Ok(handle) => {
                *slot = Some(handle);
                drop(slot);
                self.emit(
                    json!({"type": "runner_receive_stream_request", "timestamp": ms(received_at)}),
                    "stream_trace",
                );
                Ok(())
            }
            Err(e) => {
                self.on_stream_stopped(true);
                Err(StartError::Pipeline(e))
            }
        }
    }

    /// Stops the running stream, if any.
    pub async fn stop_stream(self: &Arc<Self>, reason: &str) {
        let mut slot = self.stream.lock().await;
        if let Some(old) = slot.take() {
            tracing::info!(%reason, "stopping stream");
            if tokio::time::timeout(STOP_WAIT, old.stop()).await.is_err() {
                tracing::error!("stream did not stop within 10 s");
            }
            self.on_stream_stopped(true);
        }
    }

    /// Stops the stream only if it is still the one with `request_id` (a stream task ending).
    pub async fn stream_ended(self: &Arc<Self>, request_id: &str, reason: &str) {
        let is_current = self
            .stream
            .lock()
            .await
            .as_ref()
            .is_some_and(|s| s.request_id() == request_id);
        if is_current {
            self.stop_stream(reason).await;
        }
    }

    /// The stream stopped; `report`: tell the supervisor (not when a new stream replaces it).
    fn on_stream_stopped(&self, report: bool) {
        {
            let mut c = self.core.lock().unwrap();
            c.st.stream_running = false;
            c.st.events = None;
            c.st.data = None;
            c.st.graph = None;
        }
        // The supervisor may be gone already (shutdown): nobody to tell.
        if report {
            let _ = self.reports.send(Report::Stopped {
                session: self.id.clone(),
                generation: self.generation(),
            });
        }
    }

    /// One health evaluation and its side effects.
    pub async fn health_tick(self: &Arc<Self>) {
        let now = now_secs();
        let (actions, restart_count) = {
            let mut c = self.core.lock().unwrap();
            c.flow.input_fps.tick(now);
            c.flow.output_fps.tick(now);
            let inputs = Inputs {
                inference_alive: c.inf.inference_alive,
                pipeline_ready: c.inf.pipeline_ready,
                stream_running: c.st.stream_running,
                process_start_time: c.inf.process_start_time,
                stream_start_time: c.st.stream_start_time,
                last_input_time: c.flow.last_input_time,
                last_output_time: c.flow.last_output_time,
                last_params_update_time: c.st.last_params_update_time,
                pipeline_ready_time: c.inf.pipeline_ready_time,
                input_fps: c.flow.input_fps.fps(),
                output_fps: c.flow.output_fps.fps(),
                last_error_time: c.inf.last_error_time,
                last_restart_time: c.inf.last_restart_time,
                pipeline: self.config.pipeline.clone(),
            };
            let restart_count = c.inf.inference.restart_count;
            (
                c.machine.evaluate(&inputs, now, restart_count),
                restart_count,
            )
        };
        for action in actions {
            match action {
                Action::StopStreamIdle => {
                    let idle = self.config.input_idle_stop.as_secs_f64();
                    self.stop_stream(&format!("no input for {idle} s")).await
                }
                Action::BecameOffline => {
                    let mut c = self.core.lock().unwrap();
                    c.st.request_id.clear();
                    c.st.manifest_id.clear();
                    c.st.stream_id.clear();
                    c.st.current_params = self.config.initial_params.clone();
                }
                Action::ComputedError { fatal } => {
                    // Isolated inference: replace the child and keep the stream, unless
                    // the runner's behaviour (stop the stream first) is configured.
                    if !fatal
                        && self.config.isolation
                        && self.config.restart_policy == RestartPolicy::KeepStream
                        && self.request_child_restart().await
                    {
                        continue;
                    }
                    self.stop_stream("computed ERROR").await;
                    if !fatal {
                        self.restart_inference(restart_count, "computed ERROR")
                            .await;
                    }
                }
            }
        }
    }

    /// Restarts the inference side: the runner's pipeline-process restart, in process.
    async fn restart_inference(self: &Arc<Self>, restart_count: u32, why: &str) {
        let logs = vec![format!("inference restarted after: {why}")];
        self.count_restart(Some(restart_count), logs, false, None);
        self.clone().load_pipeline();
    }

    /// Inference restarts so far (over the session's life).
    pub fn restart_count(&self) -> u32 {
        self.core.lock().unwrap().inf.inference.restart_count
    }

    /// One inference restart (docs/runner.md, "Restarts and restart policy"): `inference_status`
    /// replaced by `{restart_count + 1, last_restart_time, last_restart_logs}`, LOADING until
    /// ready, and a `restart` event. `from` is the count the decision was taken on (else the
    /// current one).
    /// For a child restart the element's loading/online events drive readiness instead (the
    /// bus message may be seen after a quick reload's online event).
    /// `stage` names the graph stage whose child restarted (a `stage` field in the event).
    fn count_restart(
        &self,
        from: Option<u32>,
        logs: Vec<String>,
        child: bool,
        stage: Option<&str>,
    ) -> u32 {
        let now = now_secs();
        let count = {
            let mut c = self.core.lock().unwrap();
            let count = from.unwrap_or(c.inf.inference.restart_count) + 1;
            c.inf.inference = InferenceStatus {
                restart_count: count,
                last_restart_time: Some(ms(now)),
                last_restart_logs: Some(logs.clone()),
                ..Default::default()
            };
            c.inf.last_restart_time = Some(now);
            c.inf.last_error_time = None;
            c.inf.process_start_time = now;
            if !child {
                c.inf.pipeline_ready = false;
            }
            c.inf.inference_alive = true;
            c.flow.last_output_time = None;
            c.inf.child_restart_requested = false;
            c.machine.on_restart(now);
            count
        };
        let mut event = json!({"type": "restart", "pipeline": self.config.pipeline,
                   "restart_count": count, "restart_time": now,
                   "restart_logs": logs, "timestamp": ms(now)});
        if let (Some(stage), Some(o)) = (stage, event.as_object_mut()) {
            o.insert("stage".into(), json!(stage));
        }
        self.emit(event, "ai_stream_events");
        count
    }

    /// `aipipeline` lost its inference child (isolation=process) and is restarting it while
    /// the stream goes on with loading frames: one runner inference restart. The
    /// element's ONLINE event ends the LOADING state.
    ///
    /// `stage`: the graph stage whose child it was. Every child (the single pipeline's, each
    /// stage's) draws on one budget of [`MAX_RESTARTS`] over the session's life: a loss beyond
    /// it is the permanent ERROR. With `RIVULET_RESTART_POLICY=stop-stream` the stream
    /// (`request_id`) is stopped once the restart is counted, then the pipeline is reloaded,
    /// as the runner does.
    pub fn on_child_restart(
        self: &Arc<Self>,
        request_id: &str,
        stage: Option<&str>,
        reason: &str,
        child_logs: &str,
    ) {
        let whose = match stage {
            Some(s) => format!("inference child of stage '{s}'"),
            None => "inference child".to_string(),
        };
        if self.restart_count() >= MAX_RESTARTS {
            // Only a stage's child gets here (each element's own limit is what was left when
            // the stream started, and several stages share it).
            self.report_error(&format!(
                "{whose} crashed after the daemon's {MAX_RESTARTS} inference restarts: {reason}"
            ));
            self.on_child_limit();
            return;
        }
        let stop = self.config.restart_policy == RestartPolicy::StopStream;
        let mut logs = vec![format!("{whose} restarted: {reason}")];
        logs.extend(child_logs.lines().map(str::to_string));
        let count = self.count_restart(None, logs, !stop, stage);
        tracing::warn!(%reason, ?stage, restart_count = count, "inference child restarted");
        if stop {
            let d = self.clone();
            let id = request_id.to_string();
            tokio::spawn(async move {
                d.stream_ended(
                    &id,
                    "inference restart (RIVULET_RESTART_POLICY=stop-stream)",
                )
                .await;
                d.load_pipeline();
            });
        }
    }

    /// `aipipeline` gave up on its inference child (restart limit): inference is dead, so the
    /// next health evaluation computes ERROR, stored for good since the limit is reached.
    pub fn on_child_limit(&self) {
        self.core.lock().unwrap().inf.inference_alive = false;
    }

    /// Asks the running stream's `aipipeline` to replace its inference child (a computed
    /// ERROR while isolated). False when no stream runs; true while a request is pending.
    async fn request_child_restart(self: &Arc<Self>) -> bool {
        let slot = self.stream.lock().await;
        let Some(stream) = slot.as_ref() else {
            return false;
        };
        if self.core.lock().unwrap().inf.child_restart_requested {
            return true;
        }
        if !stream.restart_child() {
            return false;
        }
        tracing::warn!("computed ERROR: restarting the inference child");
        self.core.lock().unwrap().inf.child_restart_requested = true;
        true
    }

    /// Loads (verifies) the pipeline in the background: initial params first, then `{}`.
    /// The state is LOADING until it finishes; a failure marks inference dead (→ ERROR rules).
    pub fn load_pipeline(self: Arc<Self>) {
        self.set_pipeline_ready(false);
        tokio::task::spawn_blocking(move || {
            let first = processing::warm_up(&self.config, &self.config.initial_params);
            let result = match first {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(
                        "pipeline load with the initial params failed: {e}; retrying with {{}}"
                    );
                    processing::warm_up(&self.config, &json!({}))
                }
            };
            match result {
                Ok(()) => {
                    tracing::info!(pipeline = %self.config.pipeline, "pipeline ready");
                    self.set_pipeline_ready(true);
                }
                Err(e) => {
                    tracing::error!("pipeline {} failed to load: {e}", self.config.pipeline);
                    self.report_error(&format!("pipeline failed to load: {e}"));
                    self.core.lock().unwrap().inf.inference_alive = false;
                }
            }
        });
    }

    /// The running stream's stage graph, if it runs one.
    pub(crate) fn graph(&self) -> Option<Arc<crate::graph::BuiltGraph>> {
        self.core.lock().unwrap().st.graph.clone()
    }

    /// The running stream's stage graph (`None` for a single pipeline).
    pub(crate) fn set_graph(&self, graph: Option<Arc<crate::graph::BuiltGraph>>) {
        self.core.lock().unwrap().st.graph = graph;
    }

    pub(crate) fn set_data(&self, tx: Option<mpsc::Sender<Value>>) {
        self.core.lock().unwrap().st.data = tx;
    }

    /// Queues an item for the stream's data channel (dropped when it has none, or when the
    /// queue is full: producers are never blocked).
    pub fn publish_data(&self, item: Value) {
        let tx = self.core.lock().unwrap().st.data.clone();
        if let Some(tx) = tx
            && tx.try_send(item).is_err()
        {
            tracing::debug!("data channel queue full or closed: item dropped");
        }
    }

    /// The labels of this session's figures in `/metrics`.
    pub fn labels(&self) -> crate::metrics::StreamLabels {
        crate::metrics::StreamLabels {
            session: self.id.clone(),
        }
    }

    /// A real output frame's time through the processing element (input probe to output
    /// probe): the per-frame latency histogram of `/metrics`, and the built-in producer of the
    /// data channel (one `frame` item per frame).
    pub fn on_frame_timed(&self, pts: gst::ClockTime, took: Duration) {
        self.metrics.observe_latency(&self.labels(), took);
        if self.core.lock().unwrap().st.data.is_none() {
            return;
        }
        self.publish_data(json!({
            "type": "frame",
            "pts_ms": pts.mseconds(),
            "latency_ms": took.as_secs_f64() * 1000.0,
            "timestamp": ms(now_secs()),
        }));
    }

    pub(crate) fn set_events(&self, tx: Option<mpsc::Sender<Value>>) {
        self.core.lock().unwrap().st.events = tx;
    }

    /// Used by the status loop.
    pub(crate) fn stream_is_current(&self, request_id: &str) -> bool {
        self.core.lock().unwrap().st.request_id == request_id
    }
}
