// SPDX-License-Identifier: MPL-2.0
//! Starts proxied by the orchestrator, and the session callbacks (docs/live-runner.md,
//! "Sessions").
//!
//! The orchestrator's reverse proxy adds `Livepeer-Session-Id`, `Livepeer-Session-Token`,
//! `Livepeer-Runner-Route` and `Livepeer-Session-Control` to every request it forwards. A
//! `POST /live-video-to-video` carrying them and no `subscribe_url`/`publish_url` gets its
//! four channels from the orchestrator (`POST {control}/channels`, names `in`, `out`,
//! `control`, `events`): the runner uses their `internal_url` (else `url`), and the answer
//! gives the client their public `url`s. Every proxied start that succeeds is remembered
//! here, so that heartbeats report it, the orchestrator's list can stop it, and its end here
//! releases it there (`POST {control}/stop`). Requests without the headers are untouched.

use crate::session::stream::StartRequest;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wire::{Channel, ChannelsResponse};

pub const HEADER_SESSION_ID: &str = "Livepeer-Session-Id";
pub const HEADER_SESSION_TOKEN: &str = "Livepeer-Session-Token";
pub const HEADER_RUNNER_ROUTE: &str = "Livepeer-Runner-Route";
pub const HEADER_SESSION_CONTROL: &str = "Livepeer-Session-Control";

/// The channels a proxied live-video-to-video start asks for: (name, MIME type, start-body
/// field the runner uses it for).
const CHANNELS: [(&str, &str, &str); 4] = [
    ("in", "video/MP2T", "subscribe_url"),
    ("out", "video/MP2T", "publish_url"),
    ("control", "application/json", "control_url"),
    ("events", "application/json", "events_url"),
];

const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// An orchestrator session running here.
#[derive(Clone)]
pub(crate) struct Tracked {
    pub session_id: String,
    /// The id the daemon knows the stream by ([`super::RunnerHost::session_ids`]).
    pub local_id: String,
    /// The session's callback base, `…/runner/{runner}/session/{session}`.
    pub control: String,
    /// `Livepeer-Session-Token` (a credential: never logged).
    pub token: String,
}

/// The orchestrator sessions running here, and the HTTP client for their callbacks.
pub struct SessionBook {
    auth_token: Option<String>,
    http: reqwest::Client,
    sessions: Mutex<BTreeMap<String, Tracked>>,
    /// The registration's orchestrator URL: the callback base when a request has no
    /// `Livepeer-Session-Control`.
    orchestrator: Mutex<Option<String>>,
}

impl SessionBook {
    pub fn new(config: &crate::config::Config) -> SessionBook {
        let http = reqwest::Client::builder()
            .connect_timeout(CALLBACK_TIMEOUT)
            .timeout(CALLBACK_TIMEOUT)
            .tls_danger_accept_invalid_certs(!config.tls_verify)
            .build()
            .unwrap_or_default();
        SessionBook {
            auth_token: config.auth_token.clone(),
            http,
            sessions: Mutex::new(BTreeMap::new()),
            orchestrator: Mutex::new(None),
        }
    }

    /// Orchestrator session ids running here, in id order.
    pub fn ids(&self) -> Vec<String> {
        self.sessions.lock().unwrap().keys().cloned().collect()
    }

    pub(crate) fn set_orchestrator(&self, base: &str) {
        *self.orchestrator.lock().unwrap() = Some(base.to_string());
    }

    fn track(&self, t: Tracked) {
        self.sessions
            .lock()
            .unwrap()
            .insert(t.session_id.clone(), t);
    }

    /// Forgets session `sid`; its local id, if it was tracked.
    pub(crate) fn remove(&self, sid: &str) -> Option<String> {
        self.sessions
            .lock()
            .unwrap()
            .remove(sid)
            .map(|t| t.local_id)
    }

    /// Forgets and returns the sessions whose stream no longer runs here (`running`: the
    /// host's session ids).
    pub(crate) fn take_ended(&self, running: &[String]) -> Vec<Tracked> {
        let mut map = self.sessions.lock().unwrap();
        let ended: Vec<String> = map
            .iter()
            .filter(|(_, t)| !running.contains(&t.local_id))
            .map(|(sid, _)| sid.clone())
            .collect();
        ended.iter().filter_map(|sid| map.remove(sid)).collect()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = self.auth_token.as_deref() else {
            return true;
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == token)
    }
}

/// Releases an ended session at the orchestrator (`POST {control}/stop`); 404 means it was
/// already gone. Failures are logged.
pub(crate) async fn release(http: &reqwest::Client, t: &Tracked) {
    let r = http
        .post(format!("{}/stop", t.control))
        .header(HEADER_SESSION_TOKEN, &t.token)
        .send()
        .await;
    match r {
        Ok(r) if r.status().is_success() => {
            tracing::info!(session_id = %t.session_id, "session ended here: released at the orchestrator");
        }
        Ok(r) if r.status() == StatusCode::NOT_FOUND => {
            tracing::debug!(session_id = %t.session_id, "session already gone at the orchestrator");
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let body = super::quote(&r.text().await.unwrap_or_default());
            tracing::warn!(session_id = %t.session_id, "releasing the session at the orchestrator answered HTTP {status}: {body}");
        }
        Err(e) => tracing::warn!(
            session_id = %t.session_id,
            "cannot release the session at the orchestrator: {}",
            super::error_chain(&e)
        ),
    }
}

/// The session headers of a proxied request.
struct SessionHeaders {
    id: String,
    token: String,
    route: String,
    control: String,
}

fn header_str(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

impl SessionHeaders {
    fn from(h: &HeaderMap) -> Option<SessionHeaders> {
        let id = header_str(h, HEADER_SESSION_ID);
        let token = header_str(h, HEADER_SESSION_TOKEN);
        (!id.is_empty() && !token.is_empty()).then(|| SessionHeaders {
            id,
            token,
            route: header_str(h, HEADER_RUNNER_ROUTE),
            control: header_str(h, HEADER_SESSION_CONTROL)
                .trim_end_matches('/')
                .to_string(),
        })
    }
}

/// Adds the proxied-start handling to `app` (every route passes through one header check).
pub fn attach_sessions(app: Router, book: Arc<SessionBook>) -> Router {
    app.layer(axum::middleware::from_fn_with_state(book, proxied_start))
}

fn detail(code: StatusCode, msg: String) -> Response {
    (code, axum::Json(json!({"detail": {"msg": msg}}))).into_response()
}

fn is_empty_field(v: &Value, key: &str) -> bool {
    match v.get(key) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

async fn proxied_start(State(book): State<Arc<SessionBook>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if req.method() != Method::POST
        || !matches!(path, "/live-video-to-video" | "/live-video-to-video/")
    {
        return next.run(req).await;
    }
    let Some(session) = SessionHeaders::from(req.headers()) else {
        return next.run(req).await;
    };
    if !book.authorized(req.headers()) {
        return next.run(req).await; // the handler answers 401
    }
    let (mut parts, body) = req.into_parts();
    let bytes = match crate::http::read_body(body).await {
        Ok(b) => b,
        Err(m) => return detail(StatusCode::PAYLOAD_TOO_LARGE, m),
    };
    let mut value: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        // Not a JSON object: the handler gives its 422.
        _ => {
            return next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
        }
    };
    let control = if session.control.is_empty() {
        let base = book.orchestrator.lock().unwrap().clone();
        match base {
            Some(base) if !session.route.is_empty() => format!(
                "{base}/runner/{}/session/{}",
                super::path_segment(&session.route),
                super::path_segment(&session.id)
            ),
            _ => {
                return detail(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "proxied session {} has no {HEADER_SESSION_CONTROL} header and the runner \
                         is not registered: cannot call the orchestrator back",
                        session.id
                    ),
                );
            }
        }
    } else {
        session.control.clone()
    };
    let mut public: Option<Vec<Channel>> = None;
    if is_empty_field(&value, "subscribe_url") && is_empty_field(&value, "publish_url") {
        match create_channels(&book.http, &control, &session.token).await {
            Ok(channels) => {
                for (name, _, field) in CHANNELS {
                    if let Some(c) = channels.iter().find(|c| c.name == name) {
                        value[field] = json!(c.runner_url());
                    }
                }
                public = Some(channels);
            }
            Err(msg) => {
                tracing::warn!(session_id = %session.id, "proxied start: {msg}");
                return detail(StatusCode::BAD_GATEWAY, msg);
            }
        }
    }
    if is_empty_field(&value, "gateway_request_id") && is_empty_field(&value, "request_id") {
        value["gateway_request_id"] = json!(session.id);
    }
    let local_id = StartRequest::from_json(&value)
        .map(|r| crate::daemon::request_key(&r))
        .unwrap_or_default();
    let body = serde_json::to_vec(&value).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    let resp = next.run(Request::from_parts(parts, Body::from(body))).await;
    if resp.status() != StatusCode::OK {
        return resp;
    }
    tracing::info!(session_id = %session.id, "proxied session started");
    book.track(Tracked {
        session_id: session.id.clone(),
        local_id,
        control,
        token: session.token,
    });
    let Some(channels) = public else {
        return resp;
    };
    // The client's view: the same fields, with the channels' public URLs, and the session.
    let (mut parts, body) = resp.into_parts();
    let mut answer: Value = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|_| json!({})),
        Err(_) => json!({}),
    };
    if !answer.is_object() {
        answer = json!({});
    }
    for (name, _, field) in CHANNELS {
        if let Some(c) = channels.iter().find(|c| c.name == name) {
            answer[field] = json!(c.url);
        }
    }
    answer["session_id"] = json!(session.id);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(answer.to_string()))
}

/// `POST {control}/channels` for the four channels; all four must come back with URLs.
async fn create_channels(
    http: &reqwest::Client,
    control: &str,
    token: &str,
) -> Result<Vec<Channel>, String> {
    let request = json!({"channels": CHANNELS
        .iter()
        .map(|(name, mime, _)| json!({"name": name, "mime_type": mime}))
        .collect::<Vec<_>>()});
    let url = format!("{control}/channels");
    let fail = |what: String| {
        format!("cannot create the session's trickle channels at the orchestrator ({url}): {what}")
    };
    let r = http
        .post(&url)
        .header(HEADER_SESSION_TOKEN, token)
        .json(&request)
        .send()
        .await
        .map_err(|e| fail(super::error_chain(&e)))?;
    let status = r.status();
    let text = r.text().await.map_err(|e| fail(super::error_chain(&e)))?;
    if status != StatusCode::OK {
        return Err(fail(format!(
            "HTTP {}: {}",
            status.as_u16(),
            super::quote(&text)
        )));
    }
    let answer: ChannelsResponse = serde_json::from_str(&text)
        .map_err(|e| fail(format!("the answer is not the channels JSON ({e})")))?;
    for (name, _, _) in CHANNELS {
        if !answer
            .channels
            .iter()
            .any(|c| c.name == name && !c.runner_url().is_empty() && !c.url.is_empty())
        {
            return Err(fail(format!("the answer has no URL for channel '{name}'")));
        }
    }
    Ok(answer.channels)
}
