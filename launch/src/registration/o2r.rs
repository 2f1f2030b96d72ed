// SPDX-License-Identifier: MPL-2.0
//! The orchestrator-to-runner (O2R) channel: a trickle channel of JSON messages, one per
//! segment: `{"keep":"alive"}` about every 10 s, and `{"event":"reserved"|"released",
//! "session":ID,"timestamp":…}` (docs/live-runner.md, "O2R channel"). A `released` session
//! that runs here is stopped at once, without waiting for the next heartbeat.

use super::Shared;
use gsttrickle::protocol::client::{ClientError, Subscriber, SubscriberConfig};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Largest O2R message read.
const MAX_MESSAGE: usize = 64 * 1024;
/// Pause before subscribing again after the subscriber gave up.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(2);

/// Reads the channel at `url` until it ends (or the task is aborted: re-registration gives a
/// new channel).
pub(super) fn spawn(shared: Arc<Shared>, url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let config = SubscriberConfig {
                start_seq: 0,
                ..Default::default()
            };
            let mut sub = match Subscriber::new(&url, config) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("O2R channel unusable: {}", kind(&e));
                    return;
                }
            };
            tracing::info!("subscribed to the O2R channel");
            loop {
                match sub.next_segment().await {
                    Ok(Some(seg)) => match seg.read_all(MAX_MESSAGE).await {
                        Ok(body) => handle(&shared, &body).await,
                        Err(e) => tracing::debug!("O2R segment unreadable: {}", kind(&e)),
                    },
                    Ok(None) => {
                        tracing::info!("the O2R channel was closed by the orchestrator");
                        return;
                    }
                    Err(ClientError::NotFound { .. }) => {
                        tracing::info!("the O2R channel is gone (404)");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("O2R channel failed ({}): subscribing again", kind(&e));
                        break;
                    }
                }
            }
            tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
        }
    })
}

/// What went wrong, without the channel URL (its name is a credential: never logged).
fn kind(e: &ClientError) -> String {
    match e {
        ClientError::InvalidUrl { .. } => "not a valid trickle URL".into(),
        ClientError::NotFound { .. } => "404".into(),
        ClientError::Http { status, .. } => format!("HTTP {status}"),
        ClientError::Transport { .. } => "connection error".into(),
        ClientError::RetriesExhausted { attempts, .. } => format!("{attempts} failed attempts"),
        ClientError::TooLarge { limit, .. } => format!("a message over {limit} bytes"),
        ClientError::Closed => "closed".into(),
    }
}

async fn handle(shared: &Arc<Shared>, body: &[u8]) {
    let Ok(msg) = serde_json::from_slice::<Value>(body) else {
        tracing::warn!(bytes = body.len(), "O2R message is not JSON: ignored");
        return;
    };
    if msg.get("keep").and_then(Value::as_str) == Some("alive") {
        tracing::trace!("O2R keepalive");
        return;
    }
    let event = msg.get("event").and_then(Value::as_str).unwrap_or_default();
    let session = msg
        .get("session")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or_default();
    match event {
        "reserved" if !session.is_empty() => {
            tracing::info!(session_id = %session, "the orchestrator reserved a session");
        }
        "released" if !session.is_empty() => {
            tracing::info!(session_id = %session, "the orchestrator released a session");
            if let Some(local) = shared.book.remove(session) {
                shared
                    .host
                    .clone()
                    .stop_session(local, "session released by the orchestrator".into())
                    .await;
            }
        }
        _ => tracing::warn!(%event, "unknown O2R message: ignored"),
    }
}
