// SPDX-License-Identifier: MPL-2.0
//! `GET /metrics` through `prometheus-client` (Prometheus text format 0.0.4).
//!
//! Two kinds of figures:
//! - recorded as they happen, in [`Metrics`] (owned by the daemon): the per-frame inference
//!   latency histogram (a frame's time from `aipipeline`'s sink pad to its src pad, matched by
//!   PTS in the daemon's pad probes, [`FrameClock`]) and `aipipeline`'s mailbox drops (from its
//!   `aipipeline-stats` messages, [`QueueDrops`]);
//! - read at scrape time from what the daemon already keeps (state, fps, frame and segment
//!   counters, restarts, the running graph's per-stage figures), into a registry built for the
//!   scrape.
//!
//! Every per-stream family is keyed by [`StreamLabels`] (per-stage ones by [`StageLabels`],
//! which flattens it): the multi-session daemon adds its `session` label there, in one place.

use crate::daemon::Daemon;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// Upper bounds (ms) of the inference latency histogram's buckets.
pub const LATENCY_BUCKETS_MS: [f64; 12] = [
    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 160.0, 320.0, 640.0, 1000.0,
];

/// The labels of every per-stream figure. Empty while the daemon runs one stream; the
/// multi-session daemon adds `pub session: String` here.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {}

/// A graph stage's figures (`stage` is empty for the single pipeline's `aipipeline`).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    #[prometheus(flatten)]
    pub stream: StreamLabels,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageStateLabels {
    #[prometheus(flatten)]
    stage: StageLabels,
    state: String,
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    #[prometheus(flatten)]
    stream: StreamLabels,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    app: String,
    version: String,
}

type FGauge = Gauge<f64, AtomicU64>;
type LatencyFamily = Family<StreamLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// The figures recorded as they happen (the rest is read at scrape time).
#[derive(Debug)]
pub struct Metrics {
    latency_ms: LatencyFamily,
    mailbox_drops: Family<StageLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            latency_ms: Family::new_with_constructor(latency_histogram),
            mailbox_drops: Family::default(),
        };
        // Shown from the start (a family without members is left out of the text).
        let labels = StreamLabels::default();
        drop(m.latency_ms.get_or_create(&labels));
        drop(m.mailbox_drops.get_or_create(&StageLabels {
            stream: labels,
            stage: String::new(),
        }));
        m
    }
}

impl Metrics {
    /// One frame's time through `aipipeline` (or the stage graph in its place).
    pub fn observe_latency(&self, labels: &StreamLabels, d: Duration) {
        self.latency_ms
            .get_or_create(labels)
            .observe(d.as_secs_f64() * 1000.0);
    }

    /// An `aipipeline-stats` message from the element at `path` (`stage`: its graph stage):
    /// adds the growth of its cumulative `queue-drops` to the mailbox-drop counter.
    pub fn on_aipipeline_stats(
        &self,
        drops: &mut QueueDrops,
        labels: &StreamLabels,
        path: &str,
        stage: Option<&str>,
        s: &gst::StructureRef,
    ) {
        let Ok(total) = s.get::<u64>("queue-drops") else {
            return;
        };
        let added = drops.update(path, total);
        if added > 0 {
            self.mailbox_drops
                .get_or_create(&StageLabels {
                    stream: labels.clone(),
                    stage: stage.unwrap_or_default().to_string(),
                })
                .inc_by(added);
        }
    }
}

/// The last `queue-drops` seen per element of one stream (a stream's bus watch keeps one).
#[derive(Debug, Default)]
pub struct QueueDrops(HashMap<String, u64>);

impl QueueDrops {
    /// The growth since the last value of `path`; a smaller value (the element restarted its
    /// count) counts from zero.
    pub fn update(&mut self, path: &str, total: u64) -> u64 {
        let last = self.0.insert(path.to_string(), total).unwrap_or(0);
        if total >= last { total - last } else { total }
    }
}

/// Frames between `aipipeline`'s sink and src pads, by PTS: the per-frame latency.
/// Bounded: a frame the mailbox replaced never leaves, and is forgotten when a later one does
/// (or after [`FrameClock::MAX_PENDING`] arrivals).
#[derive(Debug, Default)]
pub struct FrameClock(Mutex<VecDeque<(u64, Instant)>>);

impl FrameClock {
    pub const MAX_PENDING: usize = 64;

    /// A frame with `pts` (ns) entered.
    pub fn arrived(&self, pts: u64) {
        let mut q = self.0.lock().unwrap();
        if q.len() >= Self::MAX_PENDING {
            q.pop_front();
        }
        q.push_back((pts, Instant::now()));
    }

    /// A frame with `pts` left: its time inside, when its arrival was seen. Earlier frames
    /// still waiting were dropped and are forgotten.
    pub fn left(&self, pts: u64) -> Option<Duration> {
        let mut q = self.0.lock().unwrap();
        let i = q.iter().position(|(p, _)| *p == pts)?;
        let (_, t) = q.drain(..=i).next_back()?;
        Some(t.elapsed())
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, labels: &StreamLabels, v: f64) {
    let f = Family::<StreamLabels, FGauge>::default();
    f.get_or_create(labels).set(v);
    registry.register(name, help, f);
}

fn counter(registry: &mut Registry, name: &str, help: &str, labels: &StreamLabels, v: u64) {
    let f = Family::<StreamLabels, Counter>::default();
    f.get_or_create(labels).inc_by(v);
    registry.register(name, help, f);
}

/// The states of `rivulet_state`.
const STATES: [&str; 6] = [
    "LOADING",
    "ONLINE",
    "DEGRADED_INPUT",
    "DEGRADED_INFERENCE",
    "ERROR",
    "OFFLINE",
];

/// The registry of one scrape.
pub fn registry(daemon: &Daemon) -> Registry {
    let labels = StreamLabels::default();
    let status = daemon.status();
    let k = daemon.counters();
    let mut r = Registry::default();

    let version = Family::<VersionLabels, Gauge>::default();
    version
        .get_or_create(&VersionLabels {
            app: "ai-runner".into(),
            version: daemon.config.version.clone(),
        })
        .set(1);
    r.register("version", "Runner version", version);
    let state = Family::<StateLabels, Gauge>::default();
    for st in STATES {
        state
            .get_or_create(&StateLabels {
                stream: labels.clone(),
                state: st.into(),
            })
            .set(i64::from(status.state == st));
    }
    r.register(
        "rivulet_state",
        "Current state (1 for the current one)",
        state,
    );

    let fps = "(10 s window)";
    gauge(
        &mut r,
        "rivulet_input_fps",
        &format!("Input frames per second {fps}"),
        &labels,
        status.input_status.fps,
    );
    gauge(
        &mut r,
        "rivulet_output_fps",
        &format!("Real output frames per second {fps}"),
        &labels,
        status.inference_status.fps,
    );
    gauge(
        &mut r,
        "rivulet_restarts",
        "Inference restarts over the daemon's life (at most 3, then ERROR)",
        &labels,
        f64::from(status.inference_status.restart_count),
    );
    counter(
        &mut r,
        "rivulet_frames_in",
        "Frames handed to the pipeline (after the frame-rate cap)",
        &labels,
        k.frames_in,
    );
    counter(
        &mut r,
        "rivulet_frames_out",
        "Real frames out of the pipeline",
        &labels,
        k.frames_out,
    );
    counter(
        &mut r,
        "rivulet_loading_frames_out",
        "Loading frames out",
        &labels,
        k.loading_frames_out,
    );
    counter(
        &mut r,
        "rivulet_frames_dropped",
        "Input frames dropped by the frame-rate cap (RIVULET_FPS_CAP), before aipipeline",
        &labels,
        k.dropped_by_cap,
    );
    counter(
        &mut r,
        "rivulet_segments_in",
        "Input trickle segments",
        &labels,
        k.segments_in,
    );
    counter(
        &mut r,
        "rivulet_segments_out",
        "Output trickle segments",
        &labels,
        k.segments_out,
    );
    counter(
        &mut r,
        "rivulet_streams_started",
        "Streams started",
        &labels,
        k.streams_started,
    );

    r.register(
        "rivulet_mailbox_drops",
        "Frames aipipeline's one-slot mailbox replaced by a newer one before inference \
         (label stage: the graph stage; empty for the single pipeline)",
        daemon.metrics.mailbox_drops.clone(),
    );
    r.register(
        "rivulet_inference_latency_ms",
        "Per-frame inference latency: each real frame's time from aipipeline's sink pad to its \
         src pad (the whole stage graph for a graph stream), in milliseconds",
        daemon.metrics.latency_ms.clone(),
    );

    stage_families(&mut r, daemon, &labels);
    r
}

/// The running graph's stages (none for a single pipeline).
fn stage_families(r: &mut Registry, daemon: &Daemon, labels: &StreamLabels) {
    let stages = daemon.graph().map(|g| g.stats()).unwrap_or_default();
    let state = Family::<StageStateLabels, Gauge>::default();
    let fps = Family::<StageLabels, FGauge>::default();
    let latency = Family::<StageLabels, FGauge>::default();
    let frames_in = Family::<StageLabels, Counter>::default();
    let frames_out = Family::<StageLabels, Counter>::default();
    let misses = Family::<StageLabels, Counter>::default();
    let errors = Family::<StageLabels, Counter>::default();
    for s in &stages {
        let l = StageLabels {
            stream: labels.clone(),
            stage: s.id.clone(),
        };
        state
            .get_or_create(&StageStateLabels {
                stage: l.clone(),
                state: s.state.clone(),
                provider: s.provider.clone(),
            })
            .set(1);
        fps.get_or_create(&l).set(s.fps);
        if let Some(ms) = s.latency_ms {
            latency.get_or_create(&l).set(ms);
        }
        frames_in.get_or_create(&l).inc_by(s.frames_in);
        frames_out.get_or_create(&l).inc_by(s.frames_out);
        misses.get_or_create(&l).inc_by(s.deadline_misses);
        errors.get_or_create(&l).inc_by(s.errors);
    }
    r.register(
        "rivulet_stage_state",
        "A graph stage's state (starting, running, bypassed, failed) and provider in service",
        state,
    );
    r.register(
        "rivulet_stage_fps",
        "A graph stage's output frames per second (last second)",
        fps,
    );
    r.register(
        "rivulet_stage_latency_ms",
        "A pipeline stage's per-frame processing time, p50 over recent frames",
        latency,
    );
    r.register(
        "rivulet_stage_frames_in",
        "Frames into a graph stage (this stream)",
        frames_in,
    );
    r.register(
        "rivulet_stage_frames_out",
        "Frames out of a graph stage (this stream)",
        frames_out,
    );
    r.register(
        "rivulet_stage_deadline_misses",
        "Frames that missed a stage's deadline_ms and passed on unchanged (this stream)",
        misses,
    );
    r.register(
        "rivulet_stage_errors",
        "A graph stage's errors (this stream)",
        errors,
    );
}

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// `/metrics`: Prometheus text format 0.0.4.
pub fn render(daemon: &Daemon) -> String {
    let mut s = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut s, &registry(daemon))
    {
        tracing::error!("cannot encode the metrics: {e}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_clock_matches_by_pts_and_forgets_dropped_frames() {
        let c = FrameClock::default();
        c.arrived(1);
        c.arrived(2);
        c.arrived(3);
        // 2 was replaced in the mailbox: 3 leaving forgets 1 and 2... after 1 left.
        assert!(c.left(1).is_some());
        assert!(c.left(3).is_some());
        assert!(c.left(2).is_none());
        assert!(c.left(9).is_none());
        for pts in 0..(FrameClock::MAX_PENDING as u64 + 10) {
            c.arrived(pts);
        }
        assert_eq!(c.0.lock().unwrap().len(), FrameClock::MAX_PENDING);
        assert!(c.left(5).is_none(), "evicted");
        assert!(c.left(FrameClock::MAX_PENDING as u64 + 9).is_some());
        assert!(c.0.lock().unwrap().is_empty());
    }

    #[test]
    fn queue_drops_count_growth_and_restarts() {
        let mut d = QueueDrops::default();
        assert_eq!(d.update("a", 3), 3);
        assert_eq!(d.update("a", 5), 2);
        assert_eq!(d.update("b", 1), 1);
        assert_eq!(d.update("a", 1), 1);
        assert_eq!(d.update("a", 1), 0);
    }
}
