// SPDX-License-Identifier: MPL-2.0
//! The realtime feed for the dashboard: Server-Sent Events at `GET /v1/events`. Anything in the
//! daemon can publish on it ([`Feed::send`]): file jobs send `progress`, the stage graph its
//! `stage_start` / `stage_stats` / `stage_error` events. A bounded broadcast channel: a client
//! that falls behind loses the oldest events (it is told how many with a `lagged` event), and
//! nobody publishing ever waits.

use serde_json::Value;
use tokio::sync::broadcast;

/// Events kept for slow clients.
const CAPACITY: usize = 256;

/// One feed event: its SSE event name and its JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEvent {
    pub kind: String,
    pub data: Value,
}

#[derive(Debug, Clone)]
pub struct Feed {
    tx: broadcast::Sender<FeedEvent>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed::new()
    }
}

impl Feed {
    pub fn new() -> Feed {
        Feed {
            tx: broadcast::channel(CAPACITY).0,
        }
    }

    /// Publishes an event named `kind` (dropped when nobody listens).
    pub fn send(&self, kind: &str, data: Value) {
        let _ = self.tx.send(FeedEvent {
            kind: kind.to_owned(),
            data,
        });
    }

    /// Publishes an event whose name is its `type` field (e.g. the graph's stage events).
    pub fn send_typed(&self, data: Value) {
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message")
            .to_owned();
        self.send(&kind, data);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.tx.subscribe()
    }
}
