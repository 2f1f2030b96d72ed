// SPDX-License-Identifier: MPL-2.0
//! [`RunnerHost`] for the daemon: its `--max-sessions` capacity, and its running sessions by
//! key (`stream_id`, else the request id; `crate::daemon::request_key`).

use super::wire::Gpu;
use super::{Readiness, RunnerHost};
use crate::daemon::Daemon;
use crate::health::State;
use futures::future::BoxFuture;
use std::sync::Arc;

impl RunnerHost for Daemon {
    fn capacity(&self) -> u32 {
        u32::try_from(Daemon::capacity(self)).unwrap_or(u32::MAX)
    }

    /// `Loading` only while no stream runs: a reload during a stream (a params change, an
    /// inference child restarting) keeps `Ready`, or the orchestrator would refuse the
    /// session's own calls until it ends.
    fn readiness(&self) -> Readiness {
        match self.state() {
            State::Loading if !self.sessions().is_empty() => Readiness::Ready,
            State::Loading => Readiness::Loading,
            State::Error => Readiness::Error,
            State::Offline | State::Online | State::DegradedInput | State::DegradedInference => {
                Readiness::Ready
            }
        }
    }

    fn session_ids(&self) -> Vec<String> {
        self.session_ids()
    }

    fn stop_session(self: Arc<Self>, id: String, reason: String) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            Daemon::stop_session(&self, &id, &reason).await;
        })
    }

    fn gpu(&self) -> Option<Gpu> {
        gpu_for_device(&self.config.device, &crate::nvml::gpu_info())
    }
}

/// The GPU `device` (`auto`, `cpu`, `cuda`, `cuda:N`) runs on, from NVML's `gpu_info` map:
/// index N (0 for `auto`/`cuda`); none for `cpu` or without NVML.
fn gpu_for_device(device: &str, gpus: &serde_json::Value) -> Option<Gpu> {
    let index = match device {
        "cpu" => return None,
        "auto" | "cuda" => 0,
        d => d.strip_prefix("cuda:")?.parse::<u32>().ok()?,
    };
    let g = gpus.get(index.to_string())?;
    Some(Gpu {
        id: index.to_string(),
        name: g
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string(),
        vram_mb: g.get("memory_total").and_then(|m| m.as_u64()).unwrap_or(0) / (1024 * 1024),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gpu_by_device() {
        let gpus = json!({
            "0": {"id": "GPU-a", "name": "NVIDIA L40S", "memory_total": 48_305_799_168u64},
            "1": {"id": "GPU-b", "name": "NVIDIA H200", "memory_total": 150_754_820_096u64},
        });
        let g = gpu_for_device("auto", &gpus).unwrap();
        assert_eq!(
            g,
            Gpu {
                id: "0".into(),
                name: "NVIDIA L40S".into(),
                vram_mb: 46068
            }
        );
        assert_eq!(gpu_for_device("cuda:1", &gpus).unwrap().name, "NVIDIA H200");
        assert_eq!(gpu_for_device("cuda:2", &gpus), None);
        assert_eq!(gpu_for_device("cpu", &gpus), None);
        assert_eq!(gpu_for_device("auto", &json!({})), None);
        assert_eq!(gpu_for_device("cuda:x", &gpus), None);
    }
}
