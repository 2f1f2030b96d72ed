// SPDX-License-Identifier: MPL-2.0
//! The figures `GET /metrics` (`crate::http`, through `prometheus-client`) records as they
//! happen, and their labels. The rest is read at scrape time by the handler.
//!
//! - Recorded as they happen, in [`Metrics`] (shared by the daemon and its sessions): the per-frame inference
//!   latency histogram (a frame's time from `aipipeline`'s sink pad to its src pad, matched by
//!   PTS in the daemon's pad probes, [`FrameClock`]) and `aipipeline`'s mailbox drops (from its
//!   `aipipeline-stats` messages, [`QueueDrops`]);
//! - read at scrape time from what the daemon already keeps (state, fps, frame and segment
//!   counters, restarts, the running graph's per-stage figures), into a registry built for the
//!   scrape.
//!
//! Every per-stream family is keyed by [`StreamLabels`] (per-stage ones by [`StageLabels`],
//! which flattens it): the multi-session daemon adds its `session` label there, in one place.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds (ms) of the inference latency histogram's buckets.
pub const LATENCY_BUCKETS_MS: [f64; 12] = [
    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 160.0, 320.0, 640.0, 1000.0,
];

/// The labels of every per-stream figure: the session's key (`stream_id`, else the request
/// id; empty for the runner session of `--max-sessions 1`, whose figures go on across its
/// streams).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub session: String,
}

/// A graph stage's figures (`stage` is empty for the single pipeline's `aipipeline`).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    #[prometheus(flatten)]
    pub stream: StreamLabels,
    pub stage: String,
}

type LatencyFamily = Family<StreamLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_MS)
}

/// The figures recorded as they happen (the rest is read at scrape time).
#[derive(Debug)]
pub struct Metrics {
    pub(crate) latency_ms: LatencyFamily,
    pub(crate) mailbox_drops: Family<StageLabels, Counter>,
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
