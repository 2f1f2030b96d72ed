// SPDX-License-Identifier: MPL-2.0
//! One live stream: the GStreamer graph, the control loop, the events publisher and the status
//! reporter (docs/runner.md, "Stream start and stop", "Control channel", "Events";
//! docs/trickle.md, "Control and events channels").

use crate::config::Config;
use crate::daemon::Daemon;
use crate::graph::{self, BuiltGraph, GraphDef};
use crate::status::{TransientTracker, ms, now_secs};
use gst::prelude::*;
use gsttrickle::protocol::client::{
    Publisher, PublisherConfig, SegmentOutcome, Subscriber, SubscriberConfig,
};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Largest control message accepted (ComfyUI workflows can be large; docs/trickle.md,
/// "Control and events channels").
pub const MAX_CONTROL_MESSAGE: usize = 16 * 1024 * 1024;

/// A stream start request (docs/runner.md, "HTTP API").
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    pub subscribe_url: String,
    pub publish_url: String,
    pub control_url: String,
    pub events_url: String,
    pub model_id: String,
    pub params: Value,
    pub request_id: String,
    pub manifest_id: String,
    pub stream_id: String,
    /// The graph to run (the `pipeline` field): a template or pipeline name, or an inline
    /// definition (`crate::graph`); `None`: the daemon's pipeline (`MODEL_ID`).
    pub pipeline: Option<Value>,
}

impl StartRequest {
    /// Parses a start body. Unknown fields are ignored; errors are (field, message, type).
    pub fn from_json(v: &Value) -> Result<StartRequest, Vec<(String, String, &'static str)>> {
        let mut errors = Vec::new();
        let Some(map) = v.as_object() else {
            return Err(vec![(
                "body".into(),
                "Input should be a valid dictionary".into(),
                "dict_type",
            )]);
        };
        let mut string = |key: &str, required: bool| -> String {
            match map.get(key) {
                None | Some(Value::Null) if required => {
                    errors.push((key.to_string(), "Field required".to_string(), "missing"));
                    String::new()
                }
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => {
                    errors.push((
                        key.to_string(),
                        "Input should be a valid string".to_string(),
                        "string_type",
                    ));
                    String::new()
                }
            }
        };
        let subscribe_url = string("subscribe_url", true);
        let publish_url = string("publish_url", true);
        let control_url = string("control_url", false);
        let events_url = string("events_url", false);
        let model_id = string("model_id", false);
        let gateway_request_id = string("gateway_request_id", false);
        let request_id = string("request_id", false);
        let manifest_id = string("manifest_id", false);
        let stream_id = string("stream_id", false);
        let pipeline = match map.get("pipeline") {
            None | Some(Value::Null) => None,
            Some(p @ (Value::String(_) | Value::Array(_) | Value::Object(_))) => Some(p.clone()),
            Some(_) => {
                errors.push((
                    "pipeline".into(),
                    "Input should be a template or pipeline name, a list of stages or \
                     {\"stages\": [...]}"
                        .into(),
                    "pipeline_type",
                ));
                None
            }
        };
        let params = match map.get("params") {
            None | Some(Value::Null) => json!({}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                errors.push((
                    "params".into(),
                    "Input should be a valid dictionary".into(),
                    "dict_type",
                ));
                json!({})
            }
        };
        for (key, url) in [
            ("subscribe_url", &subscribe_url),
            ("publish_url", &publish_url),
        ] {
            if !url.is_empty() && !is_http_url(url) {
                errors.push((
                    key.into(),
                    format!("not an http(s) URL: {url}"),
                    "url_parsing",
                ));
            }
        }
        for (key, url) in [("control_url", &control_url), ("events_url", &events_url)] {
            if !url.is_empty() && !is_http_url(url) {
                errors.push((
                    key.into(),
                    format!("not an http(s) URL: {url}"),
                    "url_parsing",
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(StartRequest {
            subscribe_url,
            publish_url,
            control_url,
            events_url,
            model_id,
            params,
            request_id: if gateway_request_id.is_empty() {
                request_id
            } else {
                gateway_request_id
            },
            manifest_id,
            stream_id,
            pipeline,
        })
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "subscribe_url": self.subscribe_url, "publish_url": self.publish_url,
            "control_url": self.control_url, "events_url": self.events_url,
            "model_id": self.model_id, "params": self.params,
            "request_id": self.request_id, "manifest_id": self.manifest_id,
            "stream_id": self.stream_id,
        });
        if let (Some(p), Some(o)) = (&self.pipeline, v.as_object_mut()) {
            o.insert("pipeline".into(), p.clone());
        }
        v
    }
}

fn is_http_url(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

/// The 24 fps cap on PTS (docs/runner.md, "Media"), exactly as the runner applies it.
#[derive(Debug, Default, Clone)]
pub struct FpsCap {
    interval: f64,
    next: Option<f64>,
}

impl FpsCap {
    pub fn new(fps: f64) -> Self {
        FpsCap {
            interval: 1.0 / fps,
            next: None,
        }
    }

    /// Whether the frame with PTS `t` (seconds) passes.
    ///
    /// One deliberate difference from the runner: a PTS that goes back by more than one
    /// interval before the last frame that passed starts a new timeline (the first-frame rule
    /// again). A publisher that restarts on the same channel counts from zero again; the
    /// runner's rule would drop every frame until the new PTS caught up with the old ones
    /// (the stream's video stopped for as long as the first publisher had run).
    pub fn pass(&mut self, t: f64) -> bool {
        match self.next {
            None => {
                self.next = Some(t + self.interval);
                true
            }
            Some(next) if t < next - 2.0 * self.interval => {
                self.next = Some(t + self.interval);
                true
            }
            Some(next) if t < next => false,
            Some(next) if t > next + self.interval => {
                self.next = Some(t + self.interval);
                true
            }
            Some(next) => {
                self.next = Some(next + self.interval);
                true
            }
        }
    }
}

/// The running stream.
pub struct StreamHandle {
    request_id: String,
    pipeline: gst::Pipeline,
    aipipeline: gst::Element,
    /// The built graph when the stream runs one (then `aipipeline` is its bin).
    graph: Option<Arc<crate::graph::BuiltGraph>>,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    events_task: Option<JoinHandle<()>>,
    bus_task: Option<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
}

impl StreamHandle {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Asks `aipipeline` to kill and restart its inference child (isolation=process) at the
    /// next frame; the restart is then reported like a crash (`aipipeline-restart`). False
    /// when there is no such child (a stage graph's aipipelines run in-process).
    pub fn restart_child(&self) -> bool {
        if self.graph.is_some() {
            return false;
        }
        self.aipipeline.emit_by_name::<()>("restart-child", &[]);
        true
    }

    /// Applies a (validated) params object to the running pipeline: full replacement.
    pub fn apply_params(&self, params: &Value) {
        match &self.graph {
            Some(g) => g.set_params(params),
            None => self.aipipeline.set_property("params", params.to_string()),
        }
    }

    /// Builds and starts the stream.
    pub async fn start(daemon: Arc<Daemon>, req: StartRequest) -> Result<StreamHandle, String> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopping = Arc::new(AtomicBool::new(false));
        // Events publisher first, so the graph's first events have somewhere to go.
        let (events_task, events_tx) = if req.events_url.is_empty() {
            (None, None)
        } else {
            let config = PublisherConfig {
                mime: "application/json".into(),
                tls_verify: daemon.config.tls_verify,
                bearer_token: crate::auth::token_for(&daemon.config, &req.events_url),
                ..Default::default()
            };
            let publisher = Publisher::new(&req.events_url, config).map_err(|e| e.to_string())?;
            let (tx, rx) = mpsc::channel::<Value>(64);
            (
                Some(tokio::spawn(events_loop(publisher, rx, stop_rx.clone()))),
                Some(tx),
            )
        };
        daemon.set_events(events_tx);

        let d = daemon.clone();
        let r = req.clone();
        let built = tokio::task::spawn_blocking(move || build_graph(&d, &r))
            .await
            .map_err(|e| format!("graph builder panicked: {e}"))?;
        let (pipeline, aipipeline, graph) = match built {
            Ok(x) => x,
            Err(e) => {
                daemon.set_events(None);
                if let Some(t) = events_task {
                    t.abort();
                }
                return Err(e);
            }
        };
        let bus_task = spawn_bus_watch(daemon.clone(), &pipeline, &req, stopping.clone());
        let p = pipeline.clone();
        let state = tokio::task::spawn_blocking(move || p.set_state(gst::State::Playing))
            .await
            .map_err(|e| format!("state change panicked: {e}"))?;
        if let Err(e) = state {
            if let Some(t) = bus_task {
                t.abort();
            }
            let p = pipeline.clone();
            let _ = tokio::task::spawn_blocking(move || p.set_state(gst::State::Null)).await;
            daemon.set_events(None);
            return Err(format!("cannot start the stream pipeline: {e}"));
        }

        daemon.set_graph(graph.clone());
        let mut tasks = Vec::new();
        if !req.control_url.is_empty() {
            tasks.push(tokio::spawn(control_loop(
                daemon.clone(),
                req.clone(),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(status_loop(
            daemon.clone(),
            req.request_id.clone(),
            stop_rx,
        )));
        Ok(StreamHandle {
            request_id: req.request_id.clone(),
            pipeline,
            aipipeline,
            graph,
            stop_tx,
            tasks,
            events_task,
            bus_task,
            stopping,
        })
    }

    /// Stops everything of this stream: tasks (1 s grace), the graph (the sink closes the
    /// output channel), the events publisher (DELETE of `-events`).
    pub async fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.send(true);
        for t in self.tasks.drain(..) {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let p = self.pipeline.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = p.set_state(gst::State::Null);
        })
        .await;
        if let Some(t) = self.bus_task.take() {
            t.abort();
        }
        // Dropping the sender ends the events loop, which closes the publisher.
        if let Some(t) = self.events_task.take() {
            // The daemon drops its sender in on_stream_stopped; give the loop time to DELETE.
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// Serialises events onto the events channel, one message per segment (docs/trickle.md,
/// "Control and events channels"). On stop, sends what is already queued, then closes the
/// channel (empty segment, DELETE).
async fn events_loop(
    mut publisher: Publisher,
    mut rx: mpsc::Receiver<Value>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stopped = false;
    loop {
        let event = if stopped {
            rx.try_recv().ok()
        } else {
            tokio::select! {
                e = rx.recv() => e,
                _ = stop.changed() => {
                    stopped = true;
                    rx.try_recv().ok()
                }
            }
        };
        let Some(event) = event else { break };
        let body = bytes::Bytes::from(event.to_string());
        match publisher.send_message(body).await {
            Ok(SegmentOutcome::Done) => {}
            Ok(SegmentOutcome::ChannelClosed) => {
                tracing::warn!("events channel closed by the server: no more events");
                return;
            }
            Err(e) => {
                tracing::warn!("cannot publish an event: {e}");
                if matches!(
                    e,
                    gsttrickle::protocol::client::ClientError::NotFound { .. }
                ) {
                    return;
                }
            }
        }
    }
    if let Err(e) = publisher.close().await {
        tracing::debug!("closing the events channel: {e}");
    }
}

/// Reads the control channel: each whole segment is one params object (docs/trickle.md,
/// "Control and events channels"; docs/runner.md, "Control channel").
async fn control_loop(daemon: Arc<Daemon>, req: StartRequest, mut stop: watch::Receiver<bool>) {
    let config = SubscriberConfig {
        start_seq: -2,
        tls_verify: daemon.config.tls_verify,
        ..Default::default()
    };
    let mut sub = match Subscriber::new(&req.control_url, config) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("control channel: {e}");
            None
        }
    };
    while let Some(sub) = sub.as_mut() {
        let next = tokio::select! {
            _ = stop.changed() => return,
            n = sub.next_segment() => n,
        };
        let segment = match next {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::info!("control channel ended");
                break;
            }
            Err(e) => {
                tracing::warn!("control channel: {e}");
                break;
            }
        };
        let body = tokio::select! {
            _ = stop.changed() => return,
            b = segment.read_all(MAX_CONTROL_MESSAGE) => b,
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("control message skipped: {e}");
                continue;
            }
        };
        if body.is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("control message is not JSON, skipped: {e}");
                continue;
            }
        };
        if value == json!({"keep": "alive"}) {
            continue;
        }
        if !value.is_object() {
            tracing::warn!("control message is not a JSON object, skipped");
            continue;
        }
        match daemon.update_params(value).await {
            Ok(()) => {}
            Err(e @ crate::daemon::ParamsError::ResolutionChange(_)) => {
                tracing::warn!("control params rejected: {e}");
            }
            Err(e) => {
                tracing::warn!("control params rejected: {e}");
                daemon.report_error(&format!("invalid params: {e}"));
            }
        }
    }
    // EOS or 404 on the control channel ends the stream (a critical task).
    let d = daemon.clone();
    let id = req.request_id.clone();
    tokio::spawn(async move { d.stream_ended(&id, "control channel ended").await });
}

/// Emits `status` every period while the stream runs (never depends on inference).
async fn status_loop(daemon: Arc<Daemon>, request_id: String, mut stop: watch::Receiver<bool>) {
    let period = daemon.config.status_period;
    let mut tracker = TransientTracker::default();
    let mut last = daemon.status().start_time;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if !daemon.stream_is_current(&request_id) {
            return;
        }
        let now = ms(now_secs());
        let event = tracker.event(&daemon.status(), last, now);
        last = now;
        daemon.emit(event, "ai_stream_events");
    }
}

fn make(factory: &str, name: Option<&str>) -> Result<gst::Element, String> {
    let mut b = gst::ElementFactory::make(factory);
    if let Some(n) = name {
        b = b.name(n);
    }
    b.build()
        .map_err(|e| format!("cannot create GStreamer element {factory}: {e}"))
}

/// A sink pad of `element` for `kind` ("video"/"audio"): a static pad of that name, else a
/// request pad from the `kind_%u` or `kind` template.
fn sink_pad(element: &gst::Element, kind: &str) -> Option<gst::Pad> {
    element
        .static_pad(kind)
        .or_else(|| element.request_pad_simple(&format!("{kind}_%u")))
        .or_else(|| element.request_pad_simple(kind))
        .or_else(|| element.static_pad("sink"))
}

/// A preview branch: at most 2 JPEG snapshots a second, never blocking the main path, and
/// only while someone fetched a preview recently (`Daemon::previews_wanted`): otherwise each
/// frame is dropped where the branch begins, before any copy, conversion or encoding.
fn preview_branch(
    pipeline: &gst::Pipeline,
    daemon: &Arc<Daemon>,
    input: bool,
) -> Result<gst::Element, String> {
    let queue = make("queue", None)?;
    if let Some(pad) = queue.static_pad("sink") {
        let d = daemon.clone();
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if d.previews_wanted() {
                return gst::PadProbeReturn::Ok;
            }
            // As in install_probes: take the buffer and report it handled.
            drop(info.data.take());
            gst::PadProbeReturn::Handled
        });
    }
    queue.set_property_from_str("leaky", "downstream");
    queue.set_property("max-size-buffers", 1u32);
    queue.set_property("max-size-bytes", 0u32);
    queue.set_property("max-size-time", 0u64);
    let rate = make("videorate", None)?;
    rate.set_property("drop-only", true);
    rate.set_property("max-rate", 2i32);
    let convert = make("videoconvert", None)?;
    let scale = make("videoscale", None)?;
    let caps = make("capsfilter", None)?;
    caps.set_property(
        "caps",
        gst::Caps::builder("video/x-raw")
            .field("width", 320i32)
            .field("height", 320i32)
            // Square pixels: videoscale letterboxes instead of squashing a wide input.
            .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
            .build(),
    );
    let enc = make("jpegenc", None)?;
    enc.set_property("quality", 70i32);
    let sink = gst_app::AppSink::builder()
        .sync(false)
        .max_buffers(1)
        .drop(true)
        .build();
    let d = daemon.clone();
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |s| {
                let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                if let Some(buf) = sample.buffer()
                    && let Ok(map) = buf.map_readable()
                {
                    d.set_preview(input, bytes::Bytes::copy_from_slice(map.as_slice()));
                }
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    let sink: gst::Element = sink.upcast();
    // A branch that drops every frame while nobody looks must not hold up the pipeline's
    // preroll (its sink would wait for a first buffer that never comes).
    sink.set_property("async", false);
    let chain = [&queue, &rate, &convert, &scale, &caps, &enc, &sink];
    pipeline
        .add_many(chain)
        .map_err(|e| format!("preview branch: {e}"))?;
    gst::Element::link_many(chain).map_err(|e| format!("preview branch: {e}"))?;
    Ok(queue)
}

/// Links `src` to a new `tee` whose first branch is `main` and second a preview branch.
fn tee_with_preview(
    pipeline: &gst::Pipeline,
    daemon: &Arc<Daemon>,
    input: bool,
) -> Result<gst::Element, String> {
    let tee = make("tee", None)?;
    pipeline.add(&tee).map_err(|e| e.to_string())?;
    let preview = preview_branch(pipeline, daemon, input)?;
    tee.link(&preview)
        .map_err(|e| format!("preview link: {e}"))?;
    Ok(tee)
}

/// Builds the stream graph (design.md):
/// tricklesrc → [24 fps cap] → videoconvert → aipipeline → loadingoverlay → tricklesink,
/// audio → audioconvert → audioresample → tricklesink, and preview taps for the dashboard.
/// The stream's graph: the request's `pipeline` (template or pipeline name, or an inline
/// definition), else the daemon's pipeline when `MODEL_ID` holds a graph definition (JSON);
/// `None` for the plain single pipeline.
fn stream_graph(daemon: &Daemon, req: &StartRequest) -> Result<Option<GraphDef>, String> {
    let cfg = &daemon.config;
    let def = match &req.pipeline {
        Some(Value::String(name)) => crate::templates::resolve(&daemon.templates, name, cfg)
            .map_err(|e| format!("pipeline '{name}': {e}"))?,
        Some(v) => {
            let def = graph::parse(v).map_err(|e| e.to_string())?;
            graph::validate(&def, cfg).map_err(|e| e.to_string())?;
            def
        }
        None => match config_graph(cfg)? {
            Some(def) => def,
            None => return Ok(None),
        },
    };
    Ok(Some(def))
}

/// Checks a start request's graph (or the daemon's) before anything starts; the message
/// names the stage at fault.
pub fn check_pipeline(daemon: &Daemon, req: &StartRequest) -> Result<(), String> {
    stream_graph(daemon, req).map(|_| ())
}

/// The daemon's pipeline as a graph when `MODEL_ID` is a graph definition (JSON).
fn config_graph(cfg: &Config) -> Result<Option<GraphDef>, String> {
    if !cfg.pipeline.trim_start().starts_with(['[', '{']) {
        return Ok(None);
    }
    let def = graph::parse_str(&cfg.pipeline).map_err(|e| e.to_string())?;
    graph::validate(&def, cfg).map_err(|e| e.to_string())?;
    Ok(Some(def))
}

/// The element in `aipipeline`'s place: a lone `aipipeline` (named `ai`) for a single plain
/// pipeline, else the graph's bin (its stages' `aipipeline`s run in-process).
fn make_processing(
    cfg: &Config,
    def: Option<&GraphDef>,
    params: &Value,
    max_restarts: u32,
) -> Result<(gst::Element, Option<Arc<BuiltGraph>>), String> {
    match def {
        None => Ok((make_aipipeline(cfg, params, max_restarts)?, None)),
        Some(d) => match d.single_pipeline() {
            Some(name) => {
                let ai = make_aipipeline(cfg, params, max_restarts)?;
                ai.set_property("pipeline", name);
                Ok((ai, None))
            }
            None => {
                let g = graph::build(d, cfg, params)?;
                // The stages' children share the daemon's restart budget; each element may
                // use at most what is left (the daemon enforces the shared total).
                if cfg.isolation {
                    for ai in g
                        .bin
                        .iterate_all_by_element_factory_name("aipipeline")
                        .into_iter()
                        .flatten()
                    {
                        ai.set_property("max-restarts", max_restarts);
                    }
                }
                Ok((g.bin.clone().upcast(), Some(Arc::new(g))))
            }
        },
    }
}

type Built = (gst::Pipeline, gst::Element, Option<Arc<BuiltGraph>>);

fn build_graph(daemon: &Arc<Daemon>, req: &StartRequest) -> Result<Built, String> {
    let cfg = &daemon.config;
    let pipeline = gst::Pipeline::with_name(&format!("stream-{}", req.request_id));
    let src = make("tricklesrc", Some("src"))?;
    src.set_property("url", &req.subscribe_url);
    src.set_property("start-seq", -2i64);
    // Keep the input PTS (the runner's contract), not arrival times.
    src.set_property("do-timestamp", false);
    src.set_property("tls-verify", cfg.tls_verify);
    let convert = make("videoconvert", None)?;
    // The runner's 3 restarts are counted over the daemon's life.
    let restarts_left = 3u32.saturating_sub(daemon.restart_count());
    let def = stream_graph(daemon, req)?;
    let (ai, graph) = make_processing(cfg, def.as_ref(), &req.params, restarts_left)?;
    let overlay = make("loadingoverlay", Some("overlay"))?;
    let sink = make("tricklesink", Some("sink"))?;
    sink.set_property("url", &req.publish_url);
    sink.set_property("tls-verify", cfg.tls_verify);
    if let Some(token) = crate::auth::token_for(cfg, &req.publish_url) {
        sink.set_property("auth-token", token);
    }
    pipeline
        .add_many([&src, &convert, &ai, &overlay, &sink])
        .map_err(|e| e.to_string())?;
    let in_tee = tee_with_preview(&pipeline, daemon, true)?;
    let out_tee = tee_with_preview(&pipeline, daemon, false)?;
    in_tee.link(&convert).map_err(|e| e.to_string())?;
    gst::Element::link_many([&convert, &ai, &overlay, &out_tee]).map_err(|e| e.to_string())?;
    // A short queue before the encoder: the inference thread hands a frame over and goes
    // back to the mailbox instead of waiting for x264, and the muxer gets the latency headroom
    // it needs (it holds frames only while the encoder is behind, at most 4).
    let out_queue = encoder_queue()?;
    pipeline.add(&out_queue).map_err(|e| e.to_string())?;
    out_tee.link(&out_queue).map_err(|e| e.to_string())?;
    let video_sink_pad = sink_pad(&sink, "video").ok_or("tricklesink has no video sink pad")?;
    out_queue
        .static_pad("src")
        .ok_or("queue has no src pad")?
        .link(&video_sink_pad)
        .map_err(|e| format!("cannot link the output to tricklesink: {e:?}"))?;

    install_probes(daemon, &ai, cfg.fps_cap);

    // tricklesrc exposes its decoded pads as they appear.
    let weak_pipeline = pipeline.downgrade();
    let in_tee_sink = in_tee.static_pad("sink").ok_or("tee has no sink pad")?;
    let sink_weak = sink.downgrade();
    src.connect_pad_added(move |_, pad| {
        let name = pad.name();
        if name.starts_with("video") {
            if in_tee_sink.is_linked() {
                tracing::warn!("a second video stream is ignored");
                return;
            }
            if let Err(e) = pad.link(&in_tee_sink) {
                tracing::error!("cannot link the decoded video: {e:?}");
            }
        } else if name.starts_with("audio") {
            let (Some(pipeline), Some(sink)) = (weak_pipeline.upgrade(), sink_weak.upgrade())
            else {
                return;
            };
            if let Err(e) = link_audio(&pipeline, pad, &sink) {
                tracing::warn!("audio is dropped: {e}");
            }
        }
    });
    Ok((pipeline, ai, graph))
}

/// A queue of at most a few frames (no byte or time bound) in front of an encoder.
fn encoder_queue() -> Result<gst::Element, String> {
    let q = make("queue", None)?;
    q.set_property("max-size-buffers", 4u32);
    q.set_property("max-size-bytes", 0u32);
    q.set_property("max-size-time", 0u64);
    Ok(q)
}

fn link_audio(pipeline: &gst::Pipeline, pad: &gst::Pad, sink: &gst::Element) -> Result<(), String> {
    let convert = make("audioconvert", None)?;
    let resample = make("audioresample", None)?;
    let queue = make("queue", None)?;
    queue.set_property("max-size-buffers", 0u32);
    queue.set_property("max-size-bytes", 0u32);
    queue.set_property("max-size-time", 1_000_000_000u64);
    let chain = [&convert, &resample, &queue];
    pipeline.add_many(chain).map_err(|e| e.to_string())?;
    gst::Element::link_many(chain).map_err(|e| e.to_string())?;
    let sink_pad = sink_pad(sink, "audio").ok_or("tricklesink has no audio pad")?;
    queue
        .static_pad("src")
        .ok_or("no src pad")?
        .link(&sink_pad)
        .map_err(|e| format!("{e:?}"))?;
    for e in chain {
        e.sync_state_with_parent().map_err(|e| e.to_string())?;
    }
    pad.link(&convert.static_pad("sink").ok_or("no sink pad")?)
        .map_err(|e| format!("{e:?}"))?;
    Ok(())
}

fn make_aipipeline(
    cfg: &Config,
    params: &Value,
    max_restarts: u32,
) -> Result<gst::Element, String> {
    let ai = make("aipipeline", Some("ai"))?;
    ai.set_property("pipeline", &cfg.pipeline);
    ai.set_property_from_str("device", &cfg.device);
    if isolate(&ai, cfg)? {
        ai.set_property("max-restarts", max_restarts);
    }
    ai.set_property("pipelines-dir", cfg.pipelines.to_list());
    ai.set_property("params", params.to_string());
    Ok(ai)
}

/// Set by the `rivulet` binary, whose `main()` serves the `aipipeline-child` argument.
static CHILD_HOST: AtomicBool = AtomicBool::new(false);

/// Declares that this executable runs the inference child when started with the
/// `aipipeline-child` argument (the `rivulet` binary), so `aipipeline`s can be isolated.
pub fn serve_inference_children() {
    CHILD_HOST.store(true, Ordering::SeqCst);
}

/// Runs `ai`'s inference in a child process when `RIVULET_ISOLATION=process` (the single
/// pipeline and every pipeline stage of a graph): the child is this executable, with the
/// configured hang timeout. True when isolated. A program that does not serve the child
/// (`serve_inference_children` not called: e.g. a test binary using the library) runs
/// inference in-process.
pub(crate) fn isolate(ai: &gst::Element, cfg: &Config) -> Result<bool, String> {
    if !cfg.isolation || !CHILD_HOST.load(Ordering::SeqCst) {
        return Ok(false);
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the daemon's executable for the inference child: {e}"))?;
    ai.set_property_from_str("isolation", "process");
    ai.set_property("child-path", exe.to_string_lossy().to_string());
    ai.set_property("hang-timeout-ms", cfg.hang_timeout_ms);
    Ok(true)
}

/// Frame accounting for the health rules: input after the fps cap, real output frames.
fn install_probes(daemon: &Arc<Daemon>, ai: &gst::Element, fps_cap: Option<f64>) {
    // Per-frame latency: a frame's time between the two pads, by PTS (`crate::metrics`).
    let clock = Arc::new(crate::metrics::FrameClock::default());
    if let Some(sink) = ai.static_pad("sink") {
        let d = daemon.clone();
        let clock = clock.clone();
        let cap = Mutex::new(fps_cap.map(FpsCap::new));
        sink.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            let pts = info.buffer().and_then(|b| b.pts());
            let mut cap = cap.lock().unwrap();
            if let (Some(cap), Some(pts)) = (cap.as_mut(), pts)
                && !cap.pass(pts.nseconds() as f64 / 1e9)
            {
                d.on_frame_dropped_by_cap();
                // Take the buffer and report it handled: returning Drop here makes
                // gstreamer-rs and the core both release it (a CRITICAL per dropped frame).
                drop(info.data.take());
                return gst::PadProbeReturn::Handled;
            }
            d.on_input_frame();
            if let Some(pts) = pts {
                clock.arrived(pts.nseconds());
            }
            gst::PadProbeReturn::Ok
        });
    }
    if let Some(src) = ai.static_pad("src") {
        let d = daemon.clone();
        let loading = AtomicBool::new(false);
        src.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM,
            move |_, info| {
                match &info.data {
                    Some(gst::PadProbeData::Buffer(b)) => {
                        let real = !loading.load(Ordering::Relaxed);
                        d.on_output_frame(real);
                        if let (true, Some(pts)) = (real, b.pts())
                            && let Some(dt) = clock.left(pts.nseconds())
                        {
                            let labels = crate::metrics::StreamLabels::default();
                            d.metrics.observe_latency(&labels, dt);
                        }
                    }
                    Some(gst::PadProbeData::Event(ev)) => {
                        if let Some(s) = ev.structure() {
                            if s.name() == gstaipipeline::LOADING_EVENT {
                                loading.store(true, Ordering::Relaxed);
                                d.set_pipeline_ready(false);
                            } else if s.name() == gstaipipeline::ONLINE_EVENT {
                                loading.store(false, Ordering::Relaxed);
                                d.set_pipeline_ready(true);
                            }
                        }
                    }
                    _ => {}
                }
                gst::PadProbeReturn::Ok
            },
        );
    }
}

/// Watches the stream's bus: input EOS or a fatal error ends the stream; warnings and errors
/// from `aipipeline` become `error` events; segment messages drive the stream-trace events.
fn spawn_bus_watch(
    daemon: Arc<Daemon>,
    pipeline: &gst::Pipeline,
    req: &StartRequest,
    stopping: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    use futures::StreamExt;
    let bus = pipeline.bus()?;
    let request_id = req.request_id.clone();
    let src_el = pipeline.by_name("src");
    let ai_el = pipeline
        .by_name("ai")
        .or_else(|| pipeline.by_name(graph::BIN_NAME));
    // Whether a message comes from `el` or one of its children.
    let is_from = |msg: &gst::Message, el: &Option<gst::Element>| {
        msg.src()
            .zip(el.as_ref())
            .is_some_and(|(o, e)| o == e.upcast_ref::<gst::Object>() || o.has_as_ancestor(e))
    };
    Some(tokio::spawn(async move {
        let mut messages = bus.stream();
        let mut first_in = true;
        let mut first_out = true;
        let mut queue_drops = crate::metrics::QueueDrops::default();
        while let Some(msg) = messages.next().await {
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            let from = msg
                .src()
                .map(|s| s.path_string().to_string())
                .unwrap_or_default();
            match msg.view() {
                gst::MessageView::Eos(_) => {
                    tracing::info!("input ended (EOS)");
                    let d = daemon.clone();
                    let id = request_id.clone();
                    tokio::spawn(async move { d.stream_ended(&id, "input ended").await });
                    return;
                }
                gst::MessageView::Error(e) => {
                    let text = format!("{} ({from})", e.error());
                    tracing::error!("stream error: {text}; debug: {:?}", e.debug());
                    report_stage_error(&daemon, &msg, &e.error().to_string());
                    if is_from(&msg, &ai_el) {
                        daemon.report_error(&text);
                        if text.contains("inference child crashed") {
                            // Restart limit reached: permanent ERROR (docs/runner.md, "Restarts
                            // and restart policy").
                            daemon.on_child_limit();
                        }
                    } else {
                        // The elements' own words are in the debug text's last line.
                        let detail = e
                            .debug()
                            .and_then(|d| d.rsplit(":\n").next().map(str::to_owned));
                        daemon.report_stream_error(&match detail {
                            Some(d) => format!("{text}: {d}"),
                            None => text.clone(),
                        });
                    }
                    let d = daemon.clone();
                    let id = request_id.clone();
                    tokio::spawn(async move { d.stream_ended(&id, "pipeline error").await });
                    return;
                }
                gst::MessageView::Warning(w) => {
                    let text = w.error().to_string();
                    tracing::warn!("{from}: {text} ({:?})", w.debug());
                    if w.details()
                        .is_some_and(|d| d.name() == gstaipipeline::UNKNOWN_PARAMS_WARNING)
                    {
                        // Accepted params with keys the pipeline ignores: the last warning in
                        // the status, not an error (no `error` event, no effect on health).
                        let text = match msg.src().and_then(graph::stage_of) {
                            Some(stage) => format!("stage {stage}: {text}"),
                            None => text,
                        };
                        daemon.report_warning(&text);
                        continue;
                    }
                    report_stage_error(&daemon, &msg, &text);
                    if is_from(&msg, &ai_el) {
                        daemon.report_error(&text);
                    }
                }
                gst::MessageView::Element(m) => {
                    if let Some(event) = graph::stage_event(&msg) {
                        daemon.feed.send_typed(event.clone());
                        daemon.emit(event, "ai_stream_events");
                        continue;
                    }
                    let Some(s) = m.structure() else { continue };
                    if s.name() == "trickle-segment" {
                        let input = is_from(&msg, &src_el);
                        daemon.on_segment(input);
                        let now = ms(now_secs());
                        if input && first_in {
                            first_in = false;
                            daemon.emit(
                                json!({"type": "runner_receive_first_ingest_segment", "timestamp": now}),
                                "stream_trace",
                            );
                        } else if !input && first_out {
                            first_out = false;
                            daemon.emit(
                                json!({"type": "runner_send_first_processed_segment", "timestamp": now}),
                                "stream_trace",
                            );
                        }
                    } else if s.name() == gstaipipeline::RESTART_MESSAGE && is_from(&msg, &ai_el) {
                        let reason = s.get::<String>("reason").unwrap_or_default();
                        let logs = s.get::<String>("logs").unwrap_or_default();
                        // A graph stage's child names its stage.
                        let stage = msg.src().and_then(graph::stage_of);
                        daemon.on_child_restart(&request_id, stage.as_deref(), &reason, &logs);
                    } else if s.name() == gstaipipeline::STATS_MESSAGE {
                        let stage = msg.src().and_then(graph::stage_of);
                        let labels = crate::metrics::StreamLabels::default();
                        daemon.metrics.on_aipipeline_stats(
                            &mut queue_drops,
                            &labels,
                            &from,
                            stage.as_deref(),
                            s,
                        );
                        if let Ok(p50) = s.get::<f64>("inference-latency-p50-ms") {
                            daemon.set_latency_p50(p50);
                        }
                    }
                }
                _ => {}
            }
        }
    }))
}

/// A warning or error from inside a stage of the graph: a `stage_error` event (events channel
/// and feed) and the stage's `last_error`.
fn report_stage_error(daemon: &Daemon, msg: &gst::Message, text: &str) {
    let Some(stage) = msg.src().and_then(graph::stage_of) else {
        return;
    };
    if let Some(g) = daemon.graph() {
        g.record_error(&stage, text);
    }
    let event = json!({"type": "stage_error", "stage": stage, "error": text});
    daemon.feed.send_typed(event.clone());
    daemon.emit(event, "ai_stream_events");
}

/// Verifies that the pipeline loads with `params`: a few frames through `aipipeline`.
pub fn warm_up(cfg: &Config, params: &Value) -> Result<(), String> {
    let pipeline = gst::Pipeline::new();
    let src = make("videotestsrc", None)?;
    src.set_property("num-buffers", 2i32);
    let caps = make("capsfilter", None)?;
    caps.set_property(
        "caps",
        gst::Caps::builder("video/x-raw")
            .field("format", "RGB")
            .field("width", 64i32)
            .field("height", 64i32)
            .build(),
    );
    let def = config_graph(cfg)?;
    let (ai, _graph) = make_processing(cfg, def.as_ref(), params, 0)?;
    let sink = make("fakesink", None)?;
    pipeline
        .add_many([&src, &caps, &ai, &sink])
        .map_err(|e| e.to_string())?;
    gst::Element::link_many([&src, &caps, &ai, &sink]).map_err(|e| e.to_string())?;
    let result = (|| {
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| "the pipeline refused to start".to_string())?;
        let bus = pipeline.bus().ok_or("no bus")?;
        match bus.timed_pop_filtered(
            gst::ClockTime::from_seconds(180),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        ) {
            Some(msg) => match msg.view() {
                gst::MessageView::Error(e) => Err(e.error().to_string()),
                _ => Ok(()),
            },
            None => Err("loading took more than 180 s".into()),
        }
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}

#[cfg(test)]
mod tests {
    use super::FpsCap;

    fn passed(cap: &mut FpsCap, pts: impl Iterator<Item = f64>) -> usize {
        pts.filter(|t| cap.pass(*t)).count()
    }

    #[test]
    fn fps_cap_keeps_24_of_30_and_restarts_when_pts_go_back() {
        let mut cap = FpsCap::new(24.0);
        // 3 s at 30 fps: 24 a second pass.
        let first = passed(&mut cap, (0..90).map(|i| f64::from(i) / 30.0));
        assert!((71..=73).contains(&first), "{first}");
        // A restarted publisher counts from zero again: its frames pass at once, 24 a second.
        let second = passed(&mut cap, (0..90).map(|i| f64::from(i) / 30.0));
        assert_eq!(second, first);
        // A duplicate or slightly early PTS is still dropped, a small step back too.
        let mut cap = FpsCap::new(24.0);
        assert!(cap.pass(1.0));
        assert!(!cap.pass(1.0));
        assert!(!cap.pass(1.0 - 1.0 / 30.0));
    }
}
