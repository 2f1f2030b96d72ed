// SPDX-License-Identifier: MPL-2.0
//! One live stream: the GStreamer graph, the control loop, the events publisher and the status
//! reporter (docs/runner.md, "Stream start and stop", "Control channel", "Events";
//! docs/trickle.md, "Control and events channels").

use super::Session;
use crate::graph::{self, BuiltGraph, GraphDef};
use crate::media;
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

/// How often the data channel sends what its producers gave (one JSON array per line, one
/// line per segment).
pub const DATA_BATCH: Duration = Duration::from_millis(333);
/// Items the data channel holds between two batches; more are dropped (logged).
pub const DATA_QUEUE: usize = 1024;
/// The element message a pipeline or stage posts to publish on the stream's data channel:
/// `rivulet-data, json=(string)<a JSON value>` (a string that is not JSON is sent as a JSON
/// string).
pub const DATA_MESSAGE: &str = "rivulet-data";

/// The input frame-rate cap for `params`: its `max_framerate` (validated: 1 to 60), else the
/// daemon's (`RIVULET_FPS_CAP`, 24 by default; `None`: off).
pub fn fps_cap_for(params: &Value, default: Option<f64>) -> Option<f64> {
    params
        .get("max_framerate")
        .and_then(Value::as_f64)
        .filter(|f| *f > 0.0)
        .or(default)
}

/// Params keys the daemon itself acts on, never passed to the pipeline.
pub const DAEMON_PARAMS: [&str; 1] = ["max_framerate"];

/// `params` as the pipeline gets them: without [`DAEMON_PARAMS`].
pub fn pipeline_params(params: &Value) -> Value {
    let mut p = params.clone();
    if let Some(o) = p.as_object_mut() {
        for k in DAEMON_PARAMS {
            o.remove(k);
        }
    }
    p
}

/// A stream start request (docs/runner.md, "HTTP API").
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    pub subscribe_url: String,
    pub publish_url: String,
    pub control_url: String,
    pub events_url: String,
    /// The data channel (`application/jsonl`): batches of JSON items from the stream's
    /// producers (see [`DATA_MESSAGE`]); empty: none.
    pub data_url: String,
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
        let data_url = string("data_url", false);
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
        for (key, url) in [
            ("control_url", &control_url),
            ("events_url", &events_url),
            ("data_url", &data_url),
        ] {
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
            data_url,
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
            "data_url": self.data_url, "model_id": self.model_id, "params": self.params,
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

/// The cap the input probe applies, shared with the stream's params updates.
pub type FpsCapHandle = Arc<Mutex<Option<FpsCap>>>;

impl FpsCap {
    /// The frame rate this cap lets through.
    pub fn fps(&self) -> f64 {
        1.0 / self.interval
    }

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
    /// The input frame-rate cap, changed live by `max_framerate`.
    fps_cap: FpsCapHandle,
    /// The daemon's cap, for params without `max_framerate`.
    default_cap: Option<f64>,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    events_task: Option<JoinHandle<()>>,
    data_task: Option<JoinHandle<()>>,
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
        let cap = fps_cap_for(params, self.default_cap);
        {
            let mut current = self.fps_cap.lock().unwrap();
            if current.as_ref().map(FpsCap::fps) != cap {
                *current = cap.map(FpsCap::new);
            }
        }
        let params = pipeline_params(params);
        match &self.graph {
            Some(g) => g.set_params(&params),
            None => self.aipipeline.set_property("params", params.to_string()),
        }
    }

    /// Builds and starts the stream.
    pub async fn start(session: Arc<Session>, req: StartRequest) -> Result<StreamHandle, String> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopping = Arc::new(AtomicBool::new(false));
        // Events publisher first, so the graph's first events have somewhere to go.
        let (events_task, events_tx) = if req.events_url.is_empty() {
            (None, None)
        } else {
            let config = PublisherConfig {
                mime: "application/json".into(),
                tls_verify: session.config.tls_verify,
                bearer_token: session.config.own_trickle_token(&req.events_url),
                ..Default::default()
            };
            let publisher = Publisher::new(&req.events_url, config).map_err(|e| e.to_string())?;
            let (tx, rx) = mpsc::channel::<Value>(64);
            (
                Some(tokio::spawn(events_loop(publisher, rx, stop_rx.clone()))),
                Some(tx),
            )
        };
        session.set_events(events_tx);
        let (data_task, data_tx) = if req.data_url.is_empty() {
            (None, None)
        } else {
            let config = PublisherConfig {
                mime: "application/jsonl".into(),
                tls_verify: session.config.tls_verify,
                bearer_token: session.config.own_trickle_token(&req.data_url),
                ..Default::default()
            };
            let publisher = Publisher::new(&req.data_url, config).map_err(|e| e.to_string())?;
            let (tx, rx) = mpsc::channel::<Value>(DATA_QUEUE);
            (
                Some(tokio::spawn(data_loop(
                    publisher,
                    rx,
                    stop_rx.clone(),
                    session.config.data_keepalive,
                ))),
                Some(tx),
            )
        };
        session.set_data(data_tx);

        let d = session.clone();
        let r = req.clone();
        let built = tokio::task::spawn_blocking(move || build_graph(&d, &r))
            .await
            .map_err(|e| format!("graph builder panicked: {e}"))?;
        let (pipeline, aipipeline, graph, fps_cap) = match built {
            Ok(x) => x,
            Err(e) => {
                session.set_events(None);
                session.set_data(None);
                for t in [events_task, data_task].into_iter().flatten() {
                    t.abort();
                }
                return Err(e);
            }
        };
        let bus_task =
            super::bus::spawn_bus_watch(session.clone(), &pipeline, &req, stopping.clone());
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
            session.set_events(None);
            session.set_data(None);
            return Err(format!("cannot start the stream pipeline: {e}"));
        }

        session.set_graph(graph.clone());
        let mut tasks = Vec::new();
        if !req.control_url.is_empty() {
            tasks.push(tokio::spawn(control_loop(
                session.clone(),
                req.clone(),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(status_loop(
            session.clone(),
            req.clone(),
            stop_rx,
        )));
        Ok(StreamHandle {
            request_id: req.request_id.clone(),
            pipeline,
            aipipeline,
            graph,
            fps_cap,
            default_cap: session.config.fps_cap,
            stop_tx,
            tasks,
            events_task,
            data_task,
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
        // The data loop sends what is queued and closes its channel on the stop signal.
        if let Some(t) = self.data_task.take() {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        // Dropping the sender ends the events loop, which closes the publisher.
        if let Some(t) = self.events_task.take() {
            // The session drops its sender in on_stream_stopped; give the loop time to DELETE.
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
async fn control_loop(session: Arc<Session>, req: StartRequest, mut stop: watch::Receiver<bool>) {
    let config = SubscriberConfig {
        start_seq: -2,
        tls_verify: session.config.tls_verify,
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
        match session.update_params(value).await {
            Ok(()) => {}
            Err(e @ super::ParamsError::ResolutionChange(_)) => {
                tracing::warn!("control params rejected: {e}");
            }
            Err(e) => {
                tracing::warn!("control params rejected: {e}");
                session.report_error(&format!("invalid params: {e}"));
            }
        }
    }
    // EOS or 404 on the control channel ends the stream (a critical task).
    let d = session.clone();
    let id = req.request_id.clone();
    tokio::spawn(async move { d.stream_ended(&id, "control channel ended").await });
}

/// Emits `status` and a `stream_heartbeat` every period while the stream runs (never depends
/// on inference).
async fn status_loop(session: Arc<Session>, req: StartRequest, mut stop: watch::Receiver<bool>) {
    let period = session.config.status_period;
    let mut tracker = TransientTracker::default();
    let mut last = session.status().start_time;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if !session.stream_is_current(&req.request_id) {
            return;
        }
        let now = ms(now_secs());
        let status = session.status();
        let event = tracker.event(&status, last, now);
        last = now;
        session.emit(event, "ai_stream_events");
        session.emit(
            heartbeat(
                &req,
                &session.current_params(),
                &status,
                session.audio_fps(),
                now,
            ),
            "stream_heartbeat",
        );
    }
}

/// A `stream_heartbeat` event: the stream's URLs, output size and frame rates (10 s windows).
fn heartbeat(
    req: &StartRequest,
    params: &Value,
    status: &crate::status::Status,
    audio_fps: (f64, f64),
    now: i64,
) -> Value {
    let (width, height) = Session::size_of(params);
    json!({
        "type": "heartbeat",
        "timestamp": now,
        "urls": {
            "subscribe": req.subscribe_url, "publish": req.publish_url,
            "control": req.control_url, "events": req.events_url, "data": req.data_url,
        },
        "dimensions": {"width": width, "height": height},
        "fps": {
            "ingress_video_fps": status.input_status.fps,
            "egress_video_fps": status.inference_status.fps,
            "ingress_audio_fps": audio_fps.0,
            "egress_audio_fps": audio_fps.1,
        },
    })
}

/// Sends the data channel's items in batches (docs/runner.md, "Data channel"): every
/// [`DATA_BATCH`] what came, as one JSON array on one line in one segment; `[]` after
/// `keepalive` without any. On stop, sends what is queued, then closes the channel.
async fn data_loop(
    mut publisher: Publisher,
    mut rx: mpsc::Receiver<Value>,
    mut stop: watch::Receiver<bool>,
    keepalive: Duration,
) {
    let mut tick = tokio::time::interval(DATA_BATCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = tokio::time::Instant::now();
    let mut stopped = false;
    while !stopped {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => stopped = true,
        }
        let mut items = Vec::new();
        while let Ok(v) = rx.try_recv() {
            items.push(v);
        }
        if items.is_empty() && last_sent.elapsed() < keepalive {
            continue;
        }
        let mut line = Value::Array(items).to_string();
        line.push('\n');
        match publisher.send_message(bytes::Bytes::from(line)).await {
            Ok(SegmentOutcome::Done) => last_sent = tokio::time::Instant::now(),
            Ok(SegmentOutcome::ChannelClosed) => {
                tracing::warn!("data channel closed by the server: no more data");
                return;
            }
            Err(e) => {
                tracing::warn!("cannot publish on the data channel: {e}");
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
        tracing::debug!("closing the data channel: {e}");
    }
}

/// A preview branch: at most 2 JPEG snapshots a second, never blocking the main path, and
/// only while someone fetched a preview recently (`Session::previews_wanted`): otherwise each
/// frame is dropped where the branch begins, before any copy, conversion or encoding.
fn preview_branch(
    pipeline: &gst::Pipeline,
    session: &Arc<Session>,
    input: bool,
) -> Result<gst::Element, String> {
    let queue = media::make("queue", None)?;
    if let Some(pad) = queue.static_pad("sink") {
        let d = session.clone();
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
    let rate = media::make("videorate", None)?;
    rate.set_property("drop-only", true);
    rate.set_property("max-rate", 2i32);
    let convert = media::make("videoconvert", None)?;
    let scale = media::make("videoscale", None)?;
    let caps = media::make("capsfilter", None)?;
    caps.set_property(
        "caps",
        gst::Caps::builder("video/x-raw")
            .field("width", 320i32)
            .field("height", 320i32)
            // Square pixels: videoscale letterboxes instead of squashing a wide input.
            .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
            .build(),
    );
    let enc = media::make("jpegenc", None)?;
    enc.set_property("quality", 70i32);
    let sink = gst_app::AppSink::builder()
        .sync(false)
        .max_buffers(1)
        .drop(true)
        .build();
    let d = session.clone();
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
    session: &Arc<Session>,
    input: bool,
) -> Result<gst::Element, String> {
    let tee = media::make("tee", None)?;
    pipeline.add(&tee).map_err(|e| e.to_string())?;
    let preview = preview_branch(pipeline, session, input)?;
    tee.link(&preview)
        .map_err(|e| format!("preview link: {e}"))?;
    Ok(tee)
}

/// Builds the stream graph (ARCHITECTURE.md, "Data flow of one stream"):
/// tricklesrc → [24 fps cap] → videoconvert → aipipeline → loadingoverlay → tricklesink,
/// audio → audioconvert → audioresample → tricklesink, and preview taps for the dashboard.
/// The stream's graph: the request's `pipeline` (template or pipeline name, or an inline
/// definition), else the daemon's pipeline when `MODEL_ID` holds a graph definition (JSON);
/// `None` for the plain single pipeline.
fn stream_graph(session: &Session, req: &StartRequest) -> Result<Option<GraphDef>, String> {
    let cfg = &session.config;
    let def = match &req.pipeline {
        Some(Value::String(name)) => crate::templates::resolve(&session.templates, name, cfg)
            .map_err(|e| format!("pipeline '{name}': {e}"))?,
        Some(v) => {
            let def = graph::parse(v).map_err(|e| e.to_string())?;
            graph::validate(&def, cfg).map_err(|e| e.to_string())?;
            def
        }
        None => match super::processing::config_graph(cfg)? {
            Some(def) => def,
            None => return Ok(None),
        },
    };
    Ok(Some(def))
}

/// Checks a start request's graph (or the session's) before anything starts; the message
/// names the stage at fault.
pub fn check_pipeline(session: &Session, req: &StartRequest) -> Result<(), String> {
    stream_graph(session, req).map(|_| ())
}

type Built = (
    gst::Pipeline,
    gst::Element,
    Option<Arc<BuiltGraph>>,
    FpsCapHandle,
);

fn build_graph(session: &Arc<Session>, req: &StartRequest) -> Result<Built, String> {
    let cfg = &session.config;
    let pipeline = gst::Pipeline::with_name(&format!("stream-{}", req.request_id));
    let src = media::make("tricklesrc", Some("src"))?;
    src.set_property("url", &req.subscribe_url);
    src.set_property("start-seq", -2i64);
    // Keep the input PTS (the runner's contract), not arrival times.
    src.set_property("do-timestamp", false);
    src.set_property("tls-verify", cfg.tls_verify);
    let convert = media::make("videoconvert", None)?;
    // The runner's 3 restarts are counted over the session's life.
    let restarts_left = 3u32.saturating_sub(session.restart_count());
    let def = stream_graph(session, req)?;
    let (ai, graph) = super::processing::make_processing(
        cfg,
        def.as_ref(),
        &pipeline_params(&req.params),
        restarts_left,
        session.batch_group.clone(),
    )?;
    let overlay = media::make("loadingoverlay", Some("overlay"))?;
    let sink = media::make("tricklesink", Some("sink"))?;
    sink.set_property("url", &req.publish_url);
    sink.set_property("tls-verify", cfg.tls_verify);
    if let Some(token) = cfg.own_trickle_token(&req.publish_url) {
        sink.set_property("auth-token", token);
    }
    pipeline
        .add_many([&src, &convert, &ai, &overlay, &sink])
        .map_err(|e| e.to_string())?;
    let in_tee = tee_with_preview(&pipeline, session, true)?;
    let out_tee = tee_with_preview(&pipeline, session, false)?;
    in_tee.link(&convert).map_err(|e| e.to_string())?;
    gst::Element::link_many([&convert, &ai, &overlay, &out_tee]).map_err(|e| e.to_string())?;
    // A short queue before the encoder: the inference thread hands a frame over and goes
    // back to the mailbox instead of waiting for x264, and the muxer gets the latency headroom
    // it needs (it holds frames only while the encoder is behind, at most 4).
    let out_queue = media::encoder_queue()?;
    pipeline.add(&out_queue).map_err(|e| e.to_string())?;
    out_tee.link(&out_queue).map_err(|e| e.to_string())?;
    let video_sink_pad =
        media::sink_pad(&sink, "video").ok_or("tricklesink has no video sink pad")?;
    out_queue
        .static_pad("src")
        .ok_or("queue has no src pad")?
        .link(&video_sink_pad)
        .map_err(|e| format!("cannot link the output to tricklesink: {e:?}"))?;

    let fps_cap: FpsCapHandle = Arc::new(Mutex::new(
        fps_cap_for(&req.params, cfg.fps_cap).map(FpsCap::new),
    ));
    install_probes(session, &ai, fps_cap.clone());

    // tricklesrc exposes its decoded pads as they appear.
    let weak_pipeline = pipeline.downgrade();
    let in_tee_sink = in_tee.static_pad("sink").ok_or("tee has no sink pad")?;
    let sink_weak = sink.downgrade();
    let session_weak = Arc::downgrade(session);
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
            match media::link_audio(&pipeline, pad, &sink) {
                Ok(out) => count_audio(&session_weak, pad, &out),
                Err(e) => tracing::warn!("audio is dropped: {e}"),
            }
        }
    });
    Ok((pipeline, ai, graph, fps_cap))
}

/// Audio frames for the heartbeat's `ingress_audio_fps` (decoded, as they leave the decoder)
/// and `egress_audio_fps` (as they reach tricklesink).
fn count_audio(session: &std::sync::Weak<Session>, decoded: &gst::Pad, out: &gst::Pad) {
    for (pad, egress) in [(decoded, false), (out, true)] {
        let s = session.clone();
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            if let Some(s) = s.upgrade() {
                s.on_audio_frame(egress);
            }
            gst::PadProbeReturn::Ok
        });
    }
}

/// Frame accounting for the health rules (input after the fps cap, real output frames), and
/// each real output frame's time through the processing element, matched by PTS.
fn install_probes(session: &Arc<Session>, ai: &gst::Element, cap: FpsCapHandle) {
    let clock = Arc::new(crate::metrics::FrameClock::default());
    if let Some(sink) = ai.static_pad("sink") {
        let d = session.clone();
        let clock = clock.clone();
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
            if let Some(pts) = pts {
                clock.arrived(pts.nseconds());
            }
            d.on_input_frame();
            gst::PadProbeReturn::Ok
        });
    }
    if let Some(src) = ai.static_pad("src") {
        let d = session.clone();
        let loading = AtomicBool::new(false);
        src.add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM,
            move |_, info| {
                match &info.data {
                    Some(gst::PadProbeData::Buffer(b)) => {
                        let real = !loading.load(Ordering::Relaxed);
                        d.on_output_frame(real);
                        if real
                            && let Some(pts) = b.pts()
                            && let Some(took) = clock.left(pts.nseconds())
                        {
                            d.on_frame_timed(pts, took);
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
