// SPDX-License-Identifier: MPL-2.0
//! The runner's status object (docs/runner.md, "Status object") and its time helpers.

use serde::Serialize;
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in float seconds.
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Unix milliseconds as the runner writes them: `int(seconds × 1000)`.
pub fn ms(secs: f64) -> i64 {
    (secs * 1000.0) as i64
}

pub fn ms_opt(secs: Option<f64>) -> Option<i64> {
    secs.map(ms)
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct InputStatus {
    pub last_input_time: Option<i64>,
    pub fps: f64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct InferenceStatus {
    pub last_output_time: Option<i64>,
    pub fps: f64,
    pub last_params_update_time: Option<i64>,
    #[schema(value_type = Option<Object>)]
    pub last_params: Option<Value>,
    pub last_params_hash: Option<String>,
    pub last_error_time: Option<i64>,
    pub last_error: Option<String>,
    pub last_restart_time: Option<i64>,
    pub last_restart_logs: Option<Vec<String>>,
    pub restart_count: u32,
    /// Rivulet's: the last pipeline warning that is not an error (params keys the pipeline
    /// does not know), and when; absent until there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_warning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_warning_time: Option<i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Status {
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub pipeline: String,
    pub start_time: i64,
    #[schema(value_type = String)]
    pub state: &'static str,
    pub last_state_update_time: Option<i64>,
    pub input_status: InputStatus,
    pub inference_status: InferenceStatus,
    /// Per-stage state and figures while the stream runs a stage graph (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<crate::graph::StageStats>>,
}

/// Tracks which transient fields (`last_params`, `last_restart_logs`) the events channel has
/// already carried: each is sent once after it changes, then `null` until it changes again.
#[derive(Debug, Default, Clone)]
pub struct TransientTracker {
    sent_params_hash: Option<String>,
    sent_restart_time: Option<i64>,
}

impl TransientTracker {
    /// Returns the `status` event for `status`, clearing the transient fields already sent.
    pub fn event(
        &mut self,
        status: &Status,
        last_status_timestamp: i64,
        timestamp: i64,
    ) -> serde_json::Value {
        let mut s = status.clone();
        let inf = &mut s.inference_status;
        let params_key = inf
            .last_params_update_time
            .map(|t| format!("{t}:{}", inf.last_params_hash.clone().unwrap_or_default()));
        if params_key.is_some() && params_key == self.sent_params_hash {
            inf.last_params = None;
        } else {
            self.sent_params_hash = params_key;
        }
        if inf.last_restart_time.is_some() && inf.last_restart_time == self.sent_restart_time {
            inf.last_restart_logs = None;
        } else {
            self.sent_restart_time = inf.last_restart_time;
        }
        let mut v = serde_json::to_value(&s).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut v {
            map.insert("last_status_timestamp".into(), last_status_timestamp.into());
            map.insert("timestamp".into(), timestamp.into());
        }
        v
    }
}

/// The events-channel envelope (docs/trickle.md, "Control and events channels").
pub fn envelope(event: Value, queue_event_type: &str) -> Value {
    serde_json::json!({"event": event, "queue_event_type": queue_event_type})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status() -> Status {
        Status {
            kind: "status",
            pipeline: "noop".into(),
            start_time: 1000,
            state: "ONLINE",
            last_state_update_time: Some(1000),
            input_status: InputStatus::default(),
            inference_status: InferenceStatus {
                last_params_update_time: Some(1000),
                last_params: Some(json!({"a": 1})),
                last_params_hash: Some("h".into()),
                ..Default::default()
            },
            stages: None,
        }
    }

    #[test]
    fn status_shape_matches_the_runner() {
        let v = serde_json::to_value(status()).unwrap();
        assert_eq!(v["type"], "status");
        for key in ["pipeline", "start_time", "state", "last_state_update_time"] {
            assert!(v.get(key).is_some(), "{key}");
        }
        for key in ["last_input_time", "fps"] {
            assert!(v["input_status"].get(key).is_some(), "{key}");
        }
        for key in [
            "last_output_time",
            "fps",
            "last_params_update_time",
            "last_params",
            "last_params_hash",
            "last_error_time",
            "last_error",
            "last_restart_time",
            "last_restart_logs",
            "restart_count",
        ] {
            assert!(v["inference_status"].get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn transient_fields_are_sent_once() {
        let mut t = TransientTracker::default();
        let mut s = status();
        let e1 = t.event(&s, 1000, 2000);
        assert_eq!(e1["inference_status"]["last_params"], json!({"a": 1}));
        assert_eq!(e1["last_status_timestamp"], 1000);
        assert_eq!(e1["timestamp"], 2000);
        let e2 = t.event(&s, 2000, 3000);
        assert_eq!(e2["inference_status"]["last_params"], Value::Null);
        s.inference_status.last_params_update_time = Some(2500);
        s.inference_status.last_restart_time = Some(2600);
        s.inference_status.last_restart_logs = Some(vec!["x".into()]);
        let e3 = t.event(&s, 3000, 4000);
        assert_eq!(e3["inference_status"]["last_params"], json!({"a": 1}));
        assert_eq!(e3["inference_status"]["last_restart_logs"], json!(["x"]));
        let e4 = t.event(&s, 4000, 5000);
        assert_eq!(e4["inference_status"]["last_restart_logs"], Value::Null);
    }

    #[test]
    fn ms_truncates() {
        assert_eq!(ms(1.2349), 1234);
        assert_eq!(ms_opt(None), None);
    }
}
