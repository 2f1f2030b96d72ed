// SPDX-License-Identifier: MPL-2.0
//! `/v1/events`: the realtime feed as server-sent events.

use crate::daemon::Daemon;
use axum::Router;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::broadcast;

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new().route("/v1/events", get(events))
}

async fn events(
    State(daemon): State<Arc<Daemon>>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let rx = daemon.feed.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(e) => Event::default().event(e.kind).data(e.data.to_string()),
            Err(broadcast::error::RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(json!({"type": "lagged", "missed": n}).to_string()),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
