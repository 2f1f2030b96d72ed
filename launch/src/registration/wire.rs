// SPDX-License-Identifier: MPL-2.0
//! The JSON of the dynamic-registration protocol (docs/live-runner.md, "Heartbeat") and the
//! duration strings it uses.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One GPU as a heartbeat advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// The device index, as a string (`"0"`).
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Total memory in MiB; 0 is left out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vram_mb: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub use crate::config::registration::PriceInfo;

/// The body of `POST /runners/heartbeat` (bootstrap and follow-up heartbeats alike).
#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatRequest {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub runner_id: String,
    pub runner_url: String,
    pub app: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    pub status: String,
    pub mode: &'static str,
    pub capacity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<Gpu>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_info: Option<PriceInfo>,
    pub session_ids: Vec<String>,
}

/// A trickle channel descriptor (the O2R channel, a session's channels).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Channel {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub channel_name: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub internal_url: String,
    #[serde(default)]
    pub mime_type: String,
}

impl Channel {
    /// The URL the runner itself uses: `internal_url` when the orchestrator gives one.
    pub fn runner_url(&self) -> &str {
        if self.internal_url.is_empty() {
            &self.url
        } else {
            &self.internal_url
        }
    }
}

/// The answer to a heartbeat (200).
#[derive(Debug, Clone, Deserialize)]
pub struct HeartbeatResponse {
    pub runner_id: String,
    /// The runner-facing orchestrator base URL (where later calls go).
    #[serde(default)]
    pub orchestrator: String,
    #[serde(default)]
    pub heartbeat_interval: String,
    #[serde(default)]
    pub heartbeat_ttl: String,
    /// Only in the answer to a bootstrap.
    #[serde(default)]
    pub heartbeat_secret: String,
    /// Only in the answer to a bootstrap.
    #[serde(default)]
    pub o2r: Option<Channel>,
    /// The orchestrator's sessions for this runner (authoritative); `null` reads as none.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub session_ids: Vec<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// The answer to `POST …/channels`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChannelsResponse {
    pub channels: Vec<Channel>,
}

/// Parses a Go duration string as the orchestrator writes them (`5s`, `500ms`, `1m30s`,
/// `1.5s`, `0s`). `None` for anything else (empty, negative, unknown unit).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_go_duration("20s"), Some(Duration::from_secs(20)));
        assert_eq!(parse_go_duration("200ms"), Some(Duration::from_millis(200)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("1h0m0s"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("-5s"), None);
        assert_eq!(parse_go_duration("5 parsecs"), None);
        assert_eq!(parse_go_duration("s"), None);
    }

    #[test]
    fn heartbeat_response_with_null_sessions() {
        let r: HeartbeatResponse = serde_json::from_str(
            r#"{"runner_id":"r1","heartbeat_interval":"5s","heartbeat_ttl":"20s","session_ids":null}"#,
        )
        .unwrap();
        assert!(r.session_ids.is_empty());
        assert!(r.o2r.is_none());
        assert_eq!(r.heartbeat_secret, "");
    }

    #[test]
    fn request_leaves_out_empty_fields() {
        let r = HeartbeatRequest {
            runner_id: String::new(),
            runner_url: "http://127.0.0.1:8000".into(),
            app: "live-video-to-video/noop".into(),
            version: String::new(),
            status: "ready".into(),
            mode: "persistent",
            capacity: 1,
            gpu: None,
            price_info: None,
            session_ids: vec![],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"runner_url":"http://127.0.0.1:8000",
                "app":"live-video-to-video/noop","status":"ready","mode":"persistent",
                "capacity":1,"session_ids":[]})
        );
    }
}
