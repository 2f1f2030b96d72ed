// SPDX-License-Identifier: MPL-2.0
//! The element's statistics: the `stats` property and the `aipipeline-stats` message.

use std::collections::VecDeque;
use std::time::Duration;

use super::{STATS_MESSAGE, Status};

/// Latency samples kept for p50/p95.
pub(super) const LATENCY_WINDOW: usize = 120;

#[derive(Default)]
pub(super) struct Stats {
    pub(super) frames_in: u64,
    pub(super) frames_out: u64,
    pub(super) passthrough: u64,
    /// Late frames passed on unchanged (`pass-late-frames`).
    pub(super) late_passed: u64,
    pub(super) drops: u64,
    pub(super) errors: u64,
    pub(super) latencies_ms: VecDeque<f64>,
    pub(super) window_in: u64,
    pub(super) window_out: u64,
    pub(super) in_fps: f64,
    pub(super) out_fps: f64,
    /// Processing time estimate for the LATENCY query.
    pub(super) estimate: Duration,
    pub(super) device: String,
    pub(super) pipeline: String,
    /// Inference child's pid (0: none).
    pub(super) child_pid: u32,
    pub(super) restarts: u32,
    /// Batch group: frames in the batch of the last frame (0: none yet, or no group).
    pub(super) batch_size: u32,
    /// Batch group: model forwards the child ran for that batch (0: none yet, no group, or
    /// `noop`).
    pub(super) batch_forwards: u32,
    /// Frames the inference child read straight from their input slot (the proposed
    /// shared-memory pool), not copied.
    pub(super) input_zero_copy: u64,
}

impl Stats {
    pub(super) fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return 0.0;
        }
        let mut v: Vec<f64> = self.latencies_ms.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let idx = ((v.len() - 1) as f64 * p).round() as usize;
        v[idx.min(v.len() - 1)]
    }

    pub(super) fn structure(&self, status: Status) -> gst::Structure {
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
            .field("batch-size", self.batch_size)
            .field("batch-forwards", self.batch_forwards)
            .field("input-zero-copy", self.input_zero_copy)
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
