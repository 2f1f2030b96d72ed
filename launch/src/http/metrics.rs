// SPDX-License-Identifier: MPL-2.0
//! `GET /metrics`: the Prometheus text (format 0.0.4, `prometheus-client`) of one scrape: what
//! the sessions recorded ([`crate::metrics::Metrics`]) plus what the daemon keeps, read now.
//!
//! The runner's families (`version`, `rivulet_state`, the fps gauges, `rivulet_restarts`,
//! the frame and segment counters) keep the runner's single-stream shape: the primary session's
//! state and figures, counters over every session the daemon ran. Each running session also
//! has its own `rivulet_session_*` families with a `session` label (the session's key), and
//! the recorded families (latency, mailbox drops) and the stage families carry it too.

use crate::daemon::Daemon;
use crate::metrics::{StageLabels, StreamLabels};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoLabels {}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoStateLabels {
    state: String,
}

type FGauge = Gauge<f64, AtomicU64>;

fn gauge<
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: &[(L, f64)],
) {
    let f = Family::<L, FGauge>::default();
    for (l, v) in values {
        f.get_or_create(l).set(*v);
    }
    registry.register(name, help, f);
}

fn counter<
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: &[(L, u64)],
) {
    let f = Family::<L, Counter>::default();
    for (l, v) in values {
        f.get_or_create(l).inc_by(*v);
    }
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
pub(super) fn registry(daemon: &Daemon) -> Registry {
    let status = daemon.status();
    let k = daemon.counters();
    let mut r = Registry::default();
    let one = |v: f64| [(NoLabels {}, v)];
    let total = |v: u64| [(NoLabels {}, v)];

    let version = Family::<VersionLabels, Gauge>::default();
    version
        .get_or_create(&VersionLabels {
            app: "ai-runner".into(),
            version: daemon.config.version.clone(),
        })
        .set(1);
    r.register("version", "Runner version", version);
    // The runner's single-stream shape: the primary session (docs/runner.md, "Many sessions").
    let state = Family::<NoStateLabels, Gauge>::default();
    for st in STATES {
        state
            .get_or_create(&NoStateLabels { state: st.into() })
            .set(i64::from(status.state == st));
    }
    r.register(
        "rivulet_state",
        "Current state (1 for the current one; the oldest session's with several)",
        state,
    );
    let fps = "(10 s window; the oldest session's with several)";
    gauge(
        &mut r,
        "rivulet_input_fps",
        &format!("Input frames per second {fps}"),
        &one(status.input_status.fps),
    );
    gauge(
        &mut r,
        "rivulet_output_fps",
        &format!("Real output frames per second {fps}"),
        &one(status.inference_status.fps),
    );
    gauge(
        &mut r,
        "rivulet_restarts",
        "Inference restarts of the session (the daemon's with one session; at most 3, then ERROR)",
        &one(f64::from(status.inference_status.restart_count)),
    );
    for (name, help, v) in [
        (
            "rivulet_frames_in",
            "Frames handed to the pipeline (after the frame-rate cap), all sessions",
            k.frames_in,
        ),
        (
            "rivulet_frames_out",
            "Real frames out of the pipeline, all sessions",
            k.frames_out,
        ),
        (
            "rivulet_loading_frames_out",
            "Loading frames out, all sessions",
            k.loading_frames_out,
        ),
        (
            "rivulet_frames_dropped",
            "Input frames dropped by the frame-rate cap (RIVULET_FPS_CAP, max_framerate), before aipipeline, all sessions",
            k.dropped_by_cap,
        ),
        (
            "rivulet_segments_in",
            "Input trickle segments, all sessions",
            k.segments_in,
        ),
        (
            "rivulet_segments_out",
            "Output trickle segments, all sessions",
            k.segments_out,
        ),
        (
            "rivulet_streams_started",
            "Streams started, all sessions",
            k.streams_started,
        ),
    ] {
        counter(&mut r, name, help, &total(v));
    }

    // Each running session, labelled by its key (empty: the runner session of
    // `--max-sessions 1`).
    let sessions = daemon.sessions();
    let session_state = Family::<StateLabels, Gauge>::default();
    let (mut fin, mut fout, mut cin, mut cout, mut restarts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in &sessions {
        let l = StreamLabels {
            session: s.id.clone(),
        };
        let st = s.status();
        let c = s.counters();
        for name in STATES {
            session_state
                .get_or_create(&StateLabels {
                    stream: l.clone(),
                    state: name.into(),
                })
                .set(i64::from(st.state == name));
        }
        fin.push((l.clone(), st.input_status.fps));
        fout.push((l.clone(), st.inference_status.fps));
        cin.push((l.clone(), c.frames_in));
        cout.push((l.clone(), c.frames_out));
        restarts.push((l, f64::from(st.inference_status.restart_count)));
    }
    r.register(
        "rivulet_session_state",
        "A running session's state (1 for the current one)",
        session_state,
    );
    gauge(
        &mut r,
        "rivulet_session_input_fps",
        "A session's input frames per second (10 s window)",
        &fin,
    );
    gauge(
        &mut r,
        "rivulet_session_output_fps",
        "A session's real output frames per second (10 s window)",
        &fout,
    );
    gauge(
        &mut r,
        "rivulet_session_restarts",
        "A session's inference restarts",
        &restarts,
    );
    counter(
        &mut r,
        "rivulet_session_frames_in",
        "A session's frames handed to the pipeline",
        &cin,
    );
    counter(
        &mut r,
        "rivulet_session_frames_out",
        "A session's real frames out of the pipeline",
        &cout,
    );

    r.register(
        "rivulet_mailbox_drops",
        "Frames aipipeline's one-slot mailbox replaced by a newer one before inference \
         (labels: session; stage, the graph stage, empty for the single pipeline)",
        daemon.metrics.mailbox_drops.clone(),
    );
    r.register(
        "rivulet_inference_latency_ms",
        "Per-frame inference latency: each real frame's time from aipipeline's sink pad to its \
         src pad (the whole stage graph for a graph stream), in milliseconds (label: session)",
        daemon.metrics.latency_ms.clone(),
    );
    stage_families(&mut r, daemon);
    r
}

/// The running graphs' stages (none for single pipelines), per session.
fn stage_families(r: &mut Registry, daemon: &Daemon) {
    let state = Family::<StageStateLabels, Gauge>::default();
    let fps = Family::<StageLabels, FGauge>::default();
    let latency = Family::<StageLabels, FGauge>::default();
    let frames_in = Family::<StageLabels, Counter>::default();
    let frames_out = Family::<StageLabels, Counter>::default();
    let misses = Family::<StageLabels, Counter>::default();
    let errors = Family::<StageLabels, Counter>::default();
    for session in daemon.sessions() {
        let labels = StreamLabels {
            session: session.id.clone(),
        };
        let stages = session.graph().map(|g| g.stats()).unwrap_or_default();
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
pub(super) fn render(daemon: &Daemon) -> String {
    let mut s = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut s, &registry(daemon))
    {
        tracing::error!("cannot encode the metrics: {e}");
    }
    s
}
