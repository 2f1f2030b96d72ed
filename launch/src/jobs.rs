// SPDX-License-Identifier: MPL-2.0
//! File jobs: a local video file through a pipeline graph as fast as it can go, not paced to
//! real time, to an encoded file (`rivulet process`, `POST /v1/jobs`).
//!
//! ```text
//! filesrc ! decodebin ─video─► videoconvert ! STAGE ! videoconvert ! queue ! x264enc ! h264parse ! MUX ! filesink
//!                     └other─► fakesink
//! ```
//!
//! STAGE is `aipipeline` when the definition is one plain pipeline, else the stage graph's bin.
//! `aipipeline` replaces a waiting frame by a newer one to keep live latency bounded; a file job
//! wants every frame, so before each frame enters STAGE a DRAIN query waits until the frame
//! before it has been taken and processed (the drain stops at the encoder's queue, so encoding
//! still overlaps inference). Every frame in comes out; the counts are reported.
//!
//! The daemon runs its jobs one at a time, in order, on one worker thread (a job uses the whole
//! machine); at most [`MAX_QUEUED`] wait, beyond that `POST /v1/jobs` answers 429.
//!
//! MUX follows the output's extension: `.ts` MPEG-TS, `.mkv` Matroska, `.mp4`/`.mov` MP4. Audio
//! is not carried. When a stage fails, what it already passed on is encoded and the file is
//! finished (EOS into the encoder's branch), so the partial output is playable; the failing
//! stage is named.
//!
//! `DELETE /v1/jobs/{id}` cancels a job: a queued one never runs; a running one stops taking
//! frames and its output is finished as after a stage failure (partial output kept, playable);
//! either ends in state `cancelled`.

use crate::api::ApiError;
use crate::config::Config;
use crate::daemon::Daemon;
use crate::graph::{self, GraphDef};
use crate::status::now_secs;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use gst::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often progress is sampled (and sent on the feed).
const PROGRESS_PERIOD: Duration = Duration::from_millis(250);
/// After a stage failure, how long finishing the partial output may take.
const FLUSH_WAIT: Duration = Duration::from_secs(10);
/// Application message: EOS reached the output file.
const FLUSHED: &str = "rivulet-job-flushed";

/// What to run.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub input: PathBuf,
    pub output: PathBuf,
    /// The pipeline name or template id, as given.
    pub pipeline: String,
    /// Stream params for the graph (as a stream's params).
    pub params: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    /// Cancelled by `DELETE /v1/jobs/{id}` (while queued, or running: partial output kept).
    Cancelled,
}

impl JobState {
    /// Done, failed or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// The error of a cancelled job.
const CANCELLED: &str = "cancelled";

/// One stage's figures in a job.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StageFigures {
    pub id: String,
    /// `running`, `done`, `failed`.
    pub state: String,
    #[serde(flatten)]
    pub figures: serde_json::Map<String, Value>,
}

/// A job's state, as `GET /v1/jobs/{id}` and the `progress` feed events show it.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    pub input: String,
    pub output: String,
    pub pipeline: String,
    /// 0–100, from the last processed frame's position over the input's duration.
    pub percent: f64,
    pub position_s: f64,
    pub duration_s: Option<f64>,
    /// Frames into and out of the graph.
    pub frames_in: u64,
    pub frames_out: u64,
    pub elapsed_s: f64,
    pub fps: f64,
    pub stages: Vec<StageFigures>,
    pub stages_done: usize,
    pub error: Option<String>,
    /// The stage an error came from, when it came from one.
    pub failed_stage: Option<String>,
    /// On failure: the partial output is left in place (never deleted).
    pub output_kept: bool,
    pub output_bytes: u64,
    pub created_at: f64,
}

impl JobStatus {
    pub fn new(id: &str, spec: &JobSpec, graph: &GraphDef) -> JobStatus {
        JobStatus {
            id: id.to_owned(),
            state: JobState::Queued,
            input: spec.input.display().to_string(),
            output: spec.output.display().to_string(),
            pipeline: spec.pipeline.clone(),
            percent: 0.0,
            position_s: 0.0,
            duration_s: None,
            frames_in: 0,
            frames_out: 0,
            elapsed_s: 0.0,
            fps: 0.0,
            stages: graph
                .stages
                .iter()
                .map(|s| StageFigures {
                    id: s.id.clone(),
                    state: "queued".into(),
                    figures: Default::default(),
                })
                .collect(),
            stages_done: 0,
            error: None,
            failed_stage: None,
            output_kept: false,
            output_bytes: 0,
            created_at: now_secs(),
        }
    }

    /// The one-line progress bar of `rivulet process`.
    pub fn progress_line(&self) -> String {
        const WIDTH: usize = 30;
        let filled = ((self.percent / 100.0) * WIDTH as f64).round() as usize;
        let filled = filled.min(WIDTH);
        format!(
            "[{}{}] {:5.1}% {:.1}/{} s, {} frames, {:.1} fps",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            self.percent,
            self.position_s,
            self.duration_s
                .map(|d| format!("{d:.1}"))
                .unwrap_or_else(|| "?".into()),
            self.frames_out,
            self.fps
        )
    }

    /// The summary printed at the end of `rivulet process`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} {} → {} through '{}': {} frames in, {} frames out, {:.2} s, {:.1} fps\n",
            match self.state {
                JobState::Done => "done:",
                JobState::Failed => "FAILED:",
                JobState::Cancelled => "CANCELLED:",
                _ => "unfinished:",
            },
            self.input,
            self.output,
            self.pipeline,
            self.frames_in,
            self.frames_out,
            self.elapsed_s,
            self.fps
        );
        for st in &self.stages {
            let figures: Vec<String> = st.figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s += &format!("  stage {}: {} {}\n", st.id, st.state, figures.join(" "));
        }
        if let Some(e) = &self.error {
            s += &format!(
                "  error{}: {e}\n",
                self.failed_stage
                    .as_deref()
                    .map(|st| format!(" in stage '{st}'"))
                    .unwrap_or_default()
            );
            s += &format!(
                "  partial output kept: {} ({} bytes)\n",
                self.output, self.output_bytes
            );
        }
        s
    }
}

/// The muxer for an output path, by extension.
fn muxer_for(output: &Path) -> Result<gst::Element, String> {
    let ext = output
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let factory = match ext.as_str() {
        "ts" | "m2ts" => "mpegtsmux",
        "mkv" => "matroskamux",
        "mp4" | "m4v" | "mov" => "mp4mux",
        _ => {
            return Err(format!(
                "cannot tell the container of {}: use .ts, .mkv or .mp4",
                output.display()
            ));
        }
    };
    make(factory, "mux")
}

fn make(factory: &str, name: &str) -> Result<gst::Element, String> {
    gst::ElementFactory::make(factory)
        .name(name)
        .build()
        .map_err(|_| format!("GStreamer element '{factory}' is missing (install its plugin)"))
}

/// Checks a job before it is queued: readable input, writable output directory, known
/// container, and the graph resolved (a template id first, else a pipeline name) and valid.
pub fn prepare(
    spec: &JobSpec,
    templates: &crate::templates::Templates,
    cfg: &Config,
) -> Result<GraphDef, String> {
    std::fs::File::open(&spec.input)
        .map_err(|e| format!("cannot read input {}: {e}", spec.input.display()))?;
    let parent = spec
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(format!(
            "output directory {} does not exist",
            parent.display()
        ));
    }
    if spec.output.canonicalize().ok() == spec.input.canonicalize().ok() && spec.output.exists() {
        return Err("the output must not be the input file".into());
    }
    muxer_for(&spec.output)?;
    if !spec.params.is_object() {
        return Err("params must be a JSON object".into());
    }
    crate::templates::resolve(templates, &spec.pipeline, cfg).map_err(|e| e.to_string())
}

/// The stage element(s) between the decoder and the encoder.
enum Stage {
    Pipeline(gst::Element),
    Graph(graph::BuiltGraph),
}

impl Stage {
    fn element(&self) -> gst::Element {
        match self {
            Stage::Pipeline(e) => e.clone(),
            Stage::Graph(g) => g.bin.clone().upcast(),
        }
    }
}

fn make_stage(graph: &GraphDef, cfg: &Config, params: &Value) -> Result<Stage, String> {
    if let Some(name) = graph.single_pipeline() {
        let ai = make("aipipeline", "ai")?;
        ai.set_property("pipeline", name);
        ai.set_property_from_str("device", &cfg.device);
        ai.set_property("pipelines-dir", cfg.pipelines.to_list());
        // Frames never wait long here (one at a time), and none may be dropped for age.
        ai.set_property("max-latency-ms", 0u32);
        if params.as_object().is_some_and(|o| !o.is_empty()) {
            ai.set_property("params", params.to_string());
        }
        Ok(Stage::Pipeline(ai))
    } else {
        graph::build(graph, cfg, params).map(Stage::Graph)
    }
}

/// The stage an element belongs to: its own or an ancestor's name `stage-<id>` (the graph's
/// stage bins), or the single `aipipeline`.
fn stage_of(src: Option<&gst::Object>, graph: &GraphDef, stage: &gst::Element) -> Option<String> {
    let mut cur = src.cloned();
    while let Some(o) = cur {
        let name = o.name();
        if let Some(id) = name.strip_prefix("stage-")
            && graph.stages.iter().any(|s| s.id == id)
        {
            return Some(id.to_owned());
        }
        if o == *stage.upcast_ref::<gst::Object>() {
            // The stage element itself (single pipeline).
            return graph.stages.first().map(|s| s.id.clone());
        }
        cur = o.parent();
    }
    None
}

fn structure_to_json(s: &gst::StructureRef) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    for (k, v) in s.iter() {
        let j = if let Ok(x) = v.get::<u64>() {
            json!(x)
        } else if let Ok(x) = v.get::<u32>() {
            json!(x)
        } else if let Ok(x) = v.get::<f64>() {
            json!((x * 100.0).round() / 100.0)
        } else if let Ok(x) = v.get::<String>() {
            json!(x)
        } else if let Ok(x) = v.get::<bool>() {
            json!(x)
        } else {
            continue;
        };
        m.insert(k.to_string(), j);
    }
    m
}

/// Runs the job to the end on the calling thread (blocking), updating `status` and calling
/// `on_update` at each progress sample and at the end, and `on_event` for each stage event of
/// the graph.
pub fn run(
    spec: &JobSpec,
    graph: &GraphDef,
    cfg: &Config,
    status: &Mutex<JobStatus>,
    on_update: &dyn Fn(&JobStatus),
    on_event: &dyn Fn(Value),
    cancel: &AtomicBool,
) {
    let started = Instant::now();
    {
        let mut s = status.lock().unwrap();
        if s.state == JobState::Cancelled {
            // Cancelled while queued (under this lock, see `Jobs::cancel`).
            return;
        }
        s.state = JobState::Running;
        for st in &mut s.stages {
            st.state = "running".into();
        }
    }
    let result = run_pipeline(
        spec, graph, cfg, status, on_update, on_event, started, cancel,
    );
    let mut s = status.lock().unwrap();
    s.elapsed_s = started.elapsed().as_secs_f64();
    s.fps = if s.elapsed_s > 0.0 {
        s.frames_out as f64 / s.elapsed_s
    } else {
        0.0
    };
    s.output_bytes = std::fs::metadata(&spec.output)
        .map(|m| m.len())
        .unwrap_or(0);
    match result {
        Ok(()) => {
            s.state = JobState::Done;
            s.percent = 100.0;
            if let Some(d) = s.duration_s {
                s.position_s = d;
            }
            for st in &mut s.stages {
                st.state = "done".into();
            }
            s.stages_done = s.stages.len();
        }
        Err((msg, stage)) => {
            s.state = if stage.is_none() && msg == CANCELLED && cancel.load(Ordering::SeqCst) {
                JobState::Cancelled
            } else {
                JobState::Failed
            };
            s.output_kept = spec.output.exists();
            for st in &mut s.stages {
                if Some(&st.id) == stage.as_ref() {
                    st.state = "failed".into();
                } else if st.state == "running" {
                    st.state = "stopped".into();
                }
            }
            s.error = Some(msg);
            s.failed_stage = stage;
        }
    }
    let snapshot = s.clone();
    drop(s);
    on_update(&snapshot);
}

type JobError = (String, Option<String>);

#[allow(clippy::too_many_arguments)]
fn run_pipeline(
    spec: &JobSpec,
    graph: &GraphDef,
    cfg: &Config,
    status: &Mutex<JobStatus>,
    on_update: &dyn Fn(&JobStatus),
    on_event: &dyn Fn(Value),
    started: Instant,
    cancel: &AtomicBool,
) -> Result<(), JobError> {
    let plain = |m: String| (m, None);
    let stage = make_stage(graph, cfg, &spec.params).map_err(|m| {
        // A build error names its stage as `stage 'id'`.
        let st = graph
            .stages
            .iter()
            .find(|s| m.contains(&format!("'{}'", s.id)))
            .map(|s| s.id.clone());
        (format!("cannot build the pipeline: {m}"), st)
    })?;
    let stage_el = stage.element();

    let pipeline = gst::Pipeline::with_name("job");
    let src = make("filesrc", "src").map_err(plain)?;
    src.set_property("location", spec.input.to_string_lossy().to_string());
    let dec = make("decodebin", "dec").map_err(plain)?;
    let conv_in = make("videoconvert", "conv-in").map_err(plain)?;
    let conv_out = make("videoconvert", "conv-out").map_err(plain)?;
    let queue = make("queue", "enc-queue").map_err(plain)?;
    let enc = make("x264enc", "enc").map_err(plain)?;
    enc.set_property_from_str("speed-preset", "veryfast");
    let parse = make("h264parse", "parse").map_err(plain)?;
    let mux = muxer_for(&spec.output).map_err(plain)?;
    let sink = make("filesink", "sink").map_err(plain)?;
    sink.set_property("location", spec.output.to_string_lossy().to_string());
    sink.set_property("sync", false);
    sink.set_property("async", false);
    pipeline
        .add_many([
            &src, &dec, &conv_in, &stage_el, &conv_out, &queue, &enc, &parse, &mux, &sink,
        ])
        .map_err(|e| plain(format!("cannot assemble the job pipeline: {e}")))?;
    src.link(&dec)
        .map_err(|e| plain(format!("cannot link filesrc to decodebin: {e}")))?;
    gst::Element::link_many([
        &conv_in, &stage_el, &conv_out, &queue, &enc, &parse, &mux, &sink,
    ])
    .map_err(|e| {
        plain(format!(
            "cannot link the stage between the decoder and the encoder (raw video in and \
                 out?): {e}"
        ))
    })?;

    // Decoded video to the stage; any other stream to a fakesink.
    let video_linked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let conv_in = conv_in.clone();
        let pipeline_weak = pipeline.downgrade();
        let linked = video_linked.clone();
        dec.connect_pad_added(move |_, pad| {
            let is_video = pad
                .current_caps()
                .or_else(|| Some(pad.query_caps(None)))
                .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
                .unwrap_or(false);
            if is_video && !linked.swap(true, Ordering::SeqCst) {
                if let Some(sinkpad) = conv_in.static_pad("sink") {
                    let _ = pad.link(&sinkpad);
                }
                return;
            }
            let Some(pipeline) = pipeline_weak.upgrade() else {
                return;
            };
            if let Ok(fake) = gst::ElementFactory::make("fakesink")
                .property("sync", false)
                .property("async", false)
                .build()
                && pipeline.add(&fake).is_ok()
            {
                let _ = fake.sync_state_with_parent();
                if let Some(sp) = fake.static_pad("sink") {
                    let _ = pad.link(&sp);
                }
            }
        });
    }
    {
        let linked = video_linked.clone();
        let input = spec.input.display().to_string();
        dec.connect_no_more_pads(move |dec| {
            if !linked.load(Ordering::SeqCst) {
                gst::element_error!(
                    dec,
                    gst::StreamError::Demux,
                    ["{input} has no video stream"]
                );
            }
        });
    }

    // Counting, and one frame at a time into the stage.
    let frames_in = Arc::new(AtomicU64::new(0));
    let frames_out = Arc::new(AtomicU64::new(0));
    let last_pts = Arc::new(AtomicU64::new(u64::MAX));
    let (Some(stage_sink), Some(stage_src)) =
        (stage_el.static_pad("sink"), stage_el.static_pad("src"))
    else {
        return Err(plain("the stage has no sink or src pad".into()));
    };
    // Set on cancel: no more frames into the stage; the encoder branch gets EOS right after
    // the last frame processed, so the partial output holds every frame counted out.
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let n = frames_in.clone();
        let stopping = stopping.clone();
        let eos_sent = AtomicBool::new(false);
        let enc_in = queue.static_pad("sink");
        stage_sink.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            // Wait until the frame before has been taken and processed (never replaced).
            let mut q = gst::query::Drain::new();
            let _ = pad.query(&mut q);
            if stopping.load(Ordering::SeqCst) {
                if !eos_sent.swap(true, Ordering::SeqCst)
                    && let Some(p) = &enc_in
                {
                    p.send_event(gst::event::Eos::new());
                }
                // Upstream stops too (flow EOS), instead of decoding the rest for nothing.
                info.flow_res = Err(gst::FlowError::Eos);
                return gst::PadProbeReturn::Drop;
            }
            n.fetch_add(1, Ordering::Relaxed);
            gst::PadProbeReturn::Ok
        });
    }
    {
        let n = frames_out.clone();
        let last = last_pts.clone();
        stage_src.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(gst::PadProbeData::Buffer(b)) = &info.data {
                n.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = b.pts() {
                    last.store(p.nseconds(), Ordering::Relaxed);
                }
            }
            gst::PadProbeReturn::Ok
        });
    }
    if let Some(spad) = sink.static_pad("sink") {
        // The output is complete (EOS reached the file), also after a stage failure.
        let weak = sink.downgrade();
        spad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
            if let Some(gst::PadProbeData::Event(ev)) = &info.data
                && ev.type_() == gst::EventType::Eos
                && let Some(sink) = weak.upgrade()
            {
                let _ = sink.post_message(gst::message::Application::new(
                    gst::Structure::new_empty(FLUSHED),
                ));
            }
            gst::PadProbeReturn::Ok
        });
    }
    if let Some(qpad) = queue.static_pad("sink") {
        // The per-frame drain ends here: the encoder keeps its own pace.
        qpad.add_probe(gst::PadProbeType::QUERY_DOWNSTREAM, |_, info| {
            match &info.data {
                Some(gst::PadProbeData::Query(q)) if q.type_() == gst::QueryType::Drain => {
                    gst::PadProbeReturn::Handled
                }
                _ => gst::PadProbeReturn::Ok,
            }
        });
    }

    struct Stop(gst::Pipeline);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.set_state(gst::State::Null);
        }
    }
    let _stop = Stop(pipeline.clone());
    let Some(bus) = pipeline.bus() else {
        return Err(plain("the job pipeline has no bus".into()));
    };
    let stage_figures = || -> Vec<(String, serde_json::Map<String, Value>)> {
        match &stage {
            Stage::Pipeline(ai) => {
                let s = ai.property::<Option<gst::Structure>>("stats");
                let m = s.map(|s| structure_to_json(&s)).unwrap_or_default();
                graph
                    .stages
                    .first()
                    .map(|st| vec![(st.id.clone(), m)])
                    .unwrap_or_default()
            }
            Stage::Graph(g) => g
                .stats()
                .into_iter()
                .map(|st| {
                    let id = st.id.clone();
                    let m = match serde_json::to_value(st) {
                        Ok(Value::Object(mut m)) => {
                            m.remove("id");
                            m.remove("state");
                            m
                        }
                        _ => Default::default(),
                    };
                    (id, m)
                })
                .collect(),
        }
    };
    let sample = |status: &Mutex<JobStatus>, pipeline: &gst::Pipeline| {
        let mut s = status.lock().unwrap();
        s.frames_in = frames_in.load(Ordering::Relaxed);
        s.frames_out = frames_out.load(Ordering::Relaxed);
        if s.duration_s.is_none() {
            s.duration_s = pipeline
                .query_duration::<gst::ClockTime>()
                .map(|d| d.seconds_f64());
        }
        let pts = last_pts.load(Ordering::Relaxed);
        if pts != u64::MAX {
            s.position_s = pts as f64 / 1e9;
        }
        if let Some(d) = s.duration_s.filter(|d| *d > 0.0) {
            // 100 % only at the end (EOS): the last frame's PTS is one frame short of it.
            s.percent = (s.position_s / d * 100.0).clamp(0.0, 99.9);
        }
        s.elapsed_s = started.elapsed().as_secs_f64();
        if s.elapsed_s > 0.0 {
            s.fps = s.frames_out as f64 / s.elapsed_s;
        }
        for (id, m) in stage_figures() {
            if let Some(st) = s.stages.iter_mut().find(|st| st.id == id) {
                st.figures = m;
            }
        }
        s.clone()
    };

    if pipeline.set_state(gst::State::Playing).is_err() {
        // The reason is on the bus.
        let mut msg = "the job pipeline could not start".to_string();
        let mut st = None;
        while let Some(m) = bus.pop_filtered(&[gst::MessageType::Error]) {
            if let gst::MessageView::Error(e) = m.view() {
                msg = format!("{msg}: {}", e.error());
                st = st.or_else(|| stage_of(m.src(), graph, &stage_el));
            }
        }
        return Err((msg, st));
    }
    let mut next_sample = Instant::now() + PROGRESS_PERIOD;
    let mut failure: Option<JobError> = None;
    let mut flush_deadline: Option<Instant> = None;
    loop {
        if let Some(d) = flush_deadline
            && Instant::now() >= d
            && let Some(err) = failure.take()
        {
            sample(status, &pipeline);
            return Err(err);
        }
        if failure.is_none() && cancel.load(Ordering::SeqCst) {
            // Cancelled: finish the output with what was done, as after a stage failure (the
            // stage's input probe sends the encoder branch EOS at the next frame).
            tracing::info!(
                "job {}: cancelled; finishing the partial output",
                spec.input.display()
            );
            failure = Some((CANCELLED.to_string(), None));
            flush_deadline = Some(Instant::now() + FLUSH_WAIT);
            stopping.store(true, Ordering::SeqCst);
        }
        let wait = next_sample.saturating_duration_since(Instant::now());
        let msg = bus.timed_pop(gst::ClockTime::from_nseconds(wait.as_nanos() as u64));
        if Instant::now() >= next_sample {
            let snap = sample(status, &pipeline);
            on_update(&snap);
            next_sample = Instant::now() + PROGRESS_PERIOD;
        }
        let Some(msg) = msg else { continue };
        if let Some(ev) = graph::stage_event(&msg) {
            on_event(ev);
            continue;
        }
        match msg.view() {
            gst::MessageView::Eos(_) => {
                sample(status, &pipeline);
                return match failure.take() {
                    Some(err) => Err(err),
                    None => Ok(()),
                };
            }
            gst::MessageView::Application(a)
                if a.structure().is_some_and(|s| s.name() == FLUSHED) =>
            {
                if let Some(err) = failure.take() {
                    sample(status, &pipeline);
                    return Err(err);
                }
            }
            gst::MessageView::Error(e) => {
                let st = stage_of(msg.src(), graph, &stage_el);
                let from = msg
                    .src()
                    .map(|s| s.path_string().to_string())
                    .unwrap_or_default();
                let dbg = e.debug().map(|d| format!(" ({d})")).unwrap_or_default();
                let err = (format!("{from}: {}{dbg}", e.error()), st.clone());
                if failure.is_some() {
                    // Already finishing the output after an earlier error.
                    tracing::warn!("job {}: further error: {}", spec.input.display(), err.0);
                    continue;
                }
                let from_encoder = msg.src().is_some_and(|src| {
                    [&queue, &enc, &parse, &mux, &sink]
                        .iter()
                        .any(|e| src == e.upcast_ref::<gst::Object>())
                });
                let Some(qpad) = queue.static_pad("sink").filter(|_| !from_encoder) else {
                    sample(status, &pipeline);
                    return Err(err);
                };
                // A stage (or the decoder) failed: what was already processed is encoded and
                // the file finished (EOS into the encoder's branch), so the partial output is
                // playable.
                tracing::warn!(
                    "job {}: {}; finishing the partial output",
                    spec.input.display(),
                    err.0
                );
                failure = Some(err);
                flush_deadline = Some(Instant::now() + FLUSH_WAIT);
                qpad.send_event(gst::event::Eos::new());
            }
            gst::MessageView::Warning(w) => {
                tracing::warn!(
                    "job {}: {}: {}",
                    spec.input.display(),
                    msg.src()
                        .map(|s| s.path_string().to_string())
                        .unwrap_or_default(),
                    w.error()
                );
            }
            _ => {}
        }
    }
}

// ---- the daemon's jobs and /v1/jobs ----

/// Jobs waiting for the worker; beyond this a submission is refused (429).
pub const MAX_QUEUED: usize = 16;
/// Jobs whose status is kept; beyond this the oldest finished ones are forgotten.
pub const MAX_KEPT: usize = 256;

struct Work {
    status: Arc<Mutex<JobStatus>>,
    cancel: Arc<AtomicBool>,
    spec: JobSpec,
    graph: GraphDef,
    feed: crate::feed::Feed,
    config: Arc<Config>,
}

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no such job")]
    NotFound,
    /// The final state, lowercase.
    #[error("the job has already ended ({0})")]
    Finished(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{MAX_QUEUED} jobs are already waiting; try again later")]
    QueueFull,
    #[error("cannot start the job worker: {0}")]
    Worker(std::io::Error),
}

/// The daemon's file jobs: one worker thread runs them one at a time, in order (a job uses the
/// whole machine), from a bounded queue.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Mutex<JobStatus>>>>,
    /// Each kept job's cancel flag.
    cancels: Mutex<BTreeMap<u64, Arc<AtomicBool>>>,
    queue: Mutex<Option<std::sync::mpsc::SyncSender<Work>>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("jobs", &self.jobs.lock().unwrap().len())
            .finish()
    }
}

fn job_number(id: &str) -> Option<u64> {
    id.strip_prefix("job-")?.parse().ok()
}

fn run_work(w: Work) {
    let id = w.status.lock().unwrap().id.clone();
    tracing::info!(job = %id, input = %w.spec.input.display(), "file job started");
    let on_update = |s: &JobStatus| {
        w.feed
            .send("progress", json!({"type": "progress", "job": s}));
    };
    let on_event = |mut ev: Value| {
        if let Some(o) = ev.as_object_mut() {
            o.insert("job".into(), json!(id));
        }
        w.feed.send_typed(ev);
    };
    run(
        &w.spec, &w.graph, &w.config, &w.status, &on_update, &on_event, &w.cancel,
    );
    let s = w.status.lock().unwrap();
    tracing::info!(job = %id, state = ?s.state, frames = s.frames_out, "file job ended");
}

impl Jobs {
    pub fn get(&self, id: &str) -> Option<JobStatus> {
        let j = self.jobs.lock().unwrap().get(&job_number(id)?).cloned();
        j.map(|j| j.lock().unwrap().clone())
    }

    pub fn list(&self) -> Vec<JobStatus> {
        let all: Vec<_> = self.jobs.lock().unwrap().values().cloned().collect();
        all.iter().map(|j| j.lock().unwrap().clone()).collect()
    }

    /// Cancels job `id`: a queued job is `cancelled` at once (it will not run); a running one
    /// is told to stop and ends `cancelled` once its partial output is finished. Returns the
    /// status now, or why not.
    pub fn cancel(&self, id: &str) -> Result<JobStatus, CancelError> {
        let n = job_number(id).ok_or(CancelError::NotFound)?;
        let job = self.jobs.lock().unwrap().get(&n).cloned();
        let flag = self.cancels.lock().unwrap().get(&n).cloned();
        let (Some(job), Some(flag)) = (job, flag) else {
            return Err(CancelError::NotFound);
        };
        let mut s = job.lock().unwrap();
        match s.state {
            JobState::Queued => {
                s.state = JobState::Cancelled;
                s.error = Some(CANCELLED.into());
                for st in &mut s.stages {
                    st.state = "cancelled".into();
                }
            }
            JobState::Running => {}
            done => return Err(CancelError::Finished(format!("{done:?}").to_lowercase())),
        }
        flag.store(true, Ordering::SeqCst);
        Ok(s.clone())
    }

    /// Queues a prepared job; returns its first status (state `queued`).
    pub fn submit(
        &self,
        feed: crate::feed::Feed,
        config: Arc<Config>,
        spec: JobSpec,
        graph: GraphDef,
    ) -> Result<JobStatus, SubmitError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let status = Arc::new(Mutex::new(JobStatus::new(
            &format!("job-{n}"),
            &spec,
            &graph,
        )));
        let first = status.lock().unwrap().clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let work = Work {
            status: status.clone(),
            cancel: cancel.clone(),
            spec,
            graph,
            feed,
            config,
        };
        {
            let mut q = self.queue.lock().unwrap();
            if q.is_none() {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Work>(MAX_QUEUED);
                std::thread::Builder::new()
                    .name("rivulet-jobs".into())
                    .spawn(move || {
                        for w in rx {
                            run_work(w);
                        }
                    })
                    .map_err(SubmitError::Worker)?;
                *q = Some(tx);
            }
            let Some(tx) = q.as_ref() else {
                unreachable!("the worker was just started");
            };
            tx.try_send(work).map_err(|_| SubmitError::QueueFull)?;
        }
        let mut jobs = self.jobs.lock().unwrap();
        let mut cancels = self.cancels.lock().unwrap();
        jobs.insert(n, status);
        cancels.insert(n, cancel);
        // Forget the oldest finished jobs beyond MAX_KEPT.
        if jobs.len() > MAX_KEPT {
            let finished: Vec<u64> = jobs
                .iter()
                .filter(|(_, j)| j.lock().unwrap().state.is_final())
                .map(|(k, _)| *k)
                .take(jobs.len() - MAX_KEPT)
                .collect();
            for k in finished {
                jobs.remove(&k);
                cancels.remove(&k);
            }
        }
        Ok(first)
    }
}

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/jobs", get(list).post(create))
        .route("/v1/jobs/{id}", get(show).delete(remove))
}

fn detail(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError::Detail(code, msg.into())
}

/// `POST /v1/jobs` with `{"input": PATH, "output": PATH, "pipeline": NAME|TEMPLATE,
/// "params": {…}}` (paths on the daemon's machine): 201 with the job's status.
async fn create(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let doc = crate::templates::read_document(&headers, body).await?;
    let field = |k: &str| {
        doc.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                detail(
                    StatusCode::BAD_REQUEST,
                    format!("missing string field '{k}'"),
                )
            })
    };
    let spec = JobSpec {
        input: PathBuf::from(field("input")?),
        output: PathBuf::from(field("output")?),
        pipeline: field("pipeline")?,
        params: doc.get("params").cloned().unwrap_or_else(|| json!({})),
    };
    let d = daemon.clone();
    let submitted = tokio::task::spawn_blocking(move || {
        let graph = prepare(&spec, &d.templates, &d.config)
            .map_err(|m| detail(StatusCode::BAD_REQUEST, m))?;
        d.jobs
            .submit(d.feed.clone(), d.config.clone(), spec, graph)
            .map_err(|e| match e {
                SubmitError::QueueFull => detail(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
                SubmitError::Worker(_) => detail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            })
    })
    .await
    .map_err(|e| detail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::CREATED, axum::Json(submitted?)).into_response())
}

async fn list(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    axum::Json(json!({"jobs": daemon.jobs.list()}))
}

async fn show(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<JobStatus>, ApiError> {
    daemon
        .jobs
        .get(&id)
        .map(axum::Json)
        .ok_or_else(|| detail(StatusCode::NOT_FOUND, format!("no job '{id}'")))
}

/// `DELETE /v1/jobs/{id}`: 200 with the status when a queued job is cancelled, 202 when a
/// running job is told to stop (it then ends `cancelled`, on the feed and in `GET`), 409 when
/// the job has already ended, 404 when there is no such job.
async fn remove(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    match daemon.jobs.cancel(&id) {
        Ok(s) if s.state == JobState::Cancelled => {
            daemon
                .feed
                .send("progress", json!({"type": "progress", "job": s}));
            Ok((StatusCode::OK, axum::Json(s)).into_response())
        }
        Ok(s) => Ok((StatusCode::ACCEPTED, axum::Json(s)).into_response()),
        Err(CancelError::NotFound) => Err(detail(StatusCode::NOT_FOUND, format!("no job '{id}'"))),
        Err(e @ CancelError::Finished(_)) => {
            Err(detail(StatusCode::CONFLICT, format!("job '{id}': {e}")))
        }
    }
}
