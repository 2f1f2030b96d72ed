// SPDX-License-Identifier: MPL-2.0
//! An orchestrator stand-in for the registration tests: the live-runner endpoints of a
//! go-livepeer orchestrator as docs/live-runner.md describes them, on 127.0.0.1, with a real
//! trickle server (the crate's own) for the O2R channel and the session channels.
//!
//! Implemented: `POST /runners/heartbeat` (bootstrap with the secret, heartbeats with the
//! derived secret, 400/401/404 as documented, TTL expiry by a sweeper every heartbeat
//! interval), `POST /runners/{id}/unregister`, `GET /discovery` (ready, unexpired runners),
//! `POST /apps/{id}/session` (reserve: 404, 503 beyond capacity), `POST
//! /apps/{id}/session/{sid}/stop`, the proxy `/apps/{id}/session/{sid}/app/{path}` (adds the
//! four `Livepeer-*` headers), and the session callbacks `POST`/`DELETE
//! /runner/{id}/session/{sid}/channels` and `POST /runner/{id}/session/{sid}/stop` (token
//! checked). Not implemented (Rivulet does not use them): payments, session-scoped proxy
//! URLs, single-shot mode, static runners. Errors are plain text, as go-livepeer writes them.
//!
//! Test controls: [`Orchestrator::expire_runner`] (the next heartbeat gets 404),
//! [`Orchestrator::forget_runner`] (gone without trace: the next heartbeat gets 401),
//! [`Orchestrator::forget_session`] (dropped with no O2R event: only the heartbeat's
//! `session_ids` tells the runner).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use gsttrickle::protocol::client::{Publisher, PublisherConfig};
use gsttrickle::protocol::server::{ServerConfig, TrickleServer};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Options {
    /// The bootstrap secret (`-orchSecret`).
    pub secret: String,
    pub heartbeat_interval: Duration,
    pub heartbeat_ttl: Duration,
    /// Period of the O2R keepalive.
    pub o2r_interval: Duration,
    /// Answer every heartbeat 200 with a body that is not JSON.
    pub garbage_answers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            secret: "orch-secret-for-tests".into(),
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_ttl: Duration::from_secs(2),
            o2r_interval: Duration::from_millis(500),
            garbage_answers: false,
        }
    }
}

/// One heartbeat as received, with the status it was answered.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub auth: String,
    pub body: Value,
    pub status: u16,
}

pub struct Session {
    pub token: String,
    pub channels: Vec<String>,
}

pub struct Runner {
    pub id: String,
    pub heartbeat_secret: String,
    /// The last accepted heartbeat body.
    pub request: Value,
    pub last_heartbeat: Instant,
    pub sessions: BTreeMap<String, Session>,
    /// The O2R channel's name (a credential: the runner must not log it).
    pub o2r_channel: String,
    o2r: tokio::sync::mpsc::Sender<String>,
    /// Expired by [`Orchestrator::expire_runner`]: answered 404 once, then swept.
    stale: bool,
}

impl Runner {
    fn ready(&self) -> bool {
        matches!(
            self.request.get("status").and_then(Value::as_str),
            None | Some("") | Some("ready")
        )
    }

    fn capacity(&self) -> usize {
        self.request
            .get("capacity")
            .and_then(Value::as_u64)
            .filter(|c| *c > 0)
            .unwrap_or(1) as usize
    }
}

/// What the stand-in holds and has seen.
#[derive(Default)]
pub struct Registry {
    pub runners: BTreeMap<String, Runner>,
    pub heartbeats: Vec<Heartbeat>,
    /// Runner ids, in order: bootstraps that succeeded.
    pub registrations: Vec<String>,
    pub unregistered: Vec<String>,
    pub expired: Vec<String>,
    /// (session id, who released it: "client", "runner", "expiry", "unregister").
    pub released: Vec<(String, String)>,
    /// Session channels created by callbacks (full channel names).
    pub channels_created: Vec<String>,
    counter: u64,
}

struct Inner {
    opts: Options,
    base: String,
    reg: Mutex<Registry>,
    trickle: TrickleServer,
    http: reqwest::Client,
}

type Shared = Arc<Inner>;

pub struct Orchestrator {
    /// e.g. `http://127.0.0.1:41234`
    pub base: String,
    inner: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TRICKLE_BASE: &str = "/ai/trickle/";

fn text(code: StatusCode, msg: &str) -> Response {
    (code, format!("{msg}\n")).into_response()
}

/// A refused callback: its status and message (plain text, as go-livepeer writes it).
struct Reject(StatusCode, &'static str);

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        text(self.0, self.1)
    }
}

/// A Go `time.Duration.String()` for the durations the tests use.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) && ms < 60_000 {
        format!("{}s", ms / 1000)
    } else if ms.is_multiple_of(1000) {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

fn auth(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

impl Orchestrator {
    pub async fn start(opts: Options) -> Orchestrator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let trickle = TrickleServer::new(ServerConfig {
            base_path: TRICKLE_BASE.into(),
            ..ServerConfig::default()
        });
        let inner = Arc::new(Inner {
            opts,
            base: base.clone(),
            reg: Mutex::new(Registry::default()),
            trickle: trickle.clone(),
            http: reqwest::Client::new(),
        });
        let app = Router::new()
            .route("/runners/heartbeat", post(heartbeat))
            .route("/runners/{runner_id}/unregister", post(unregister))
            .route("/discovery", get(discovery))
            .route("/apps/{runner_id}/session", post(reserve))
            .route(
                "/apps/{runner_id}/session/{session_id}/stop",
                post(client_stop),
            )
            .route(
                "/apps/{runner_id}/session/{session_id}/app/{*app_path}",
                any(proxy),
            )
            .route(
                "/runner/{runner_id}/session/{session_id}/channels",
                post(create_channels).delete(delete_channels),
            )
            .route(
                "/runner/{runner_id}/session/{session_id}/stop",
                post(runner_stop),
            )
            .with_state(inner.clone())
            .merge(trickle.router());
        let sweeper = inner.clone();
        let task = tokio::spawn(async move {
            let sweep = async {
                let mut tick = tokio::time::interval(sweeper.opts.heartbeat_interval);
                loop {
                    tick.tick().await;
                    sweeper.sweep();
                }
            };
            tokio::select! {
                _ = axum::serve(listener, app) => {}
                _ = sweep => {}
            }
        });
        Orchestrator { base, inner, task }
    }

    /// Polls `f` on the registry every 50 ms until it holds; `within` is the failure bound.
    pub async fn wait(&self, within: Duration, what: &str, f: impl Fn(&Registry) -> bool) {
        let t = Instant::now();
        loop {
            if f(&self.inner.reg.lock().unwrap()) {
                return;
            }
            assert!(t.elapsed() < within, "orchestrator stand-in: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads the registry.
    pub fn with<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        f(&self.inner.reg.lock().unwrap())
    }

    /// Makes the runner expired but not yet swept: its next heartbeat gets 404 (and it is
    /// swept right after, as the orchestrator's sweeper would).
    pub fn expire_runner(&self, id: &str) {
        if let Some(r) = self.inner.reg.lock().unwrap().runners.get_mut(id) {
            r.stale = true;
        }
    }

    /// Drops the runner without trace (an orchestrator restart): its secret is unknown now.
    pub fn forget_runner(&self, id: &str) {
        self.inner.reg.lock().unwrap().runners.remove(id);
    }

    /// Drops a session with no O2R event (a lost message).
    pub fn forget_session(&self, runner: &str, session: &str) {
        if let Some(r) = self.inner.reg.lock().unwrap().runners.get_mut(runner) {
            r.sessions.remove(session);
        }
    }

    /// The one registered runner's id (panics if there is not exactly one).
    pub fn only_runner(&self) -> String {
        let reg = self.inner.reg.lock().unwrap();
        assert_eq!(reg.runners.len(), 1, "runners: {:?}", reg.runners.keys());
        reg.runners.keys().next().unwrap().clone()
    }
}

impl Inner {
    fn next(&self, reg: &mut Registry) -> u64 {
        reg.counter += 1;
        reg.counter
    }

    fn expired(&self, r: &Runner) -> bool {
        r.stale || r.last_heartbeat.elapsed() > self.opts.heartbeat_ttl
    }

    /// Expired by time (the sweeper's rule; a stale runner waits for its 404).
    fn timed_out(&self, r: &Runner) -> bool {
        r.last_heartbeat.elapsed() > self.opts.heartbeat_ttl
    }

    fn sweep(&self) {
        let mut reg = self.reg.lock().unwrap();
        let gone: Vec<String> = reg
            .runners
            .values()
            .filter(|r| self.timed_out(r))
            .map(|r| r.id.clone())
            .collect();
        for id in gone {
            if let Some(r) = reg.runners.remove(&id) {
                self.drop_runner(&mut reg, r, "expiry");
                reg.expired.push(id);
            }
        }
    }

    /// Releases a removed runner's sessions and closes its channels (dropping the O2R sender
    /// closes the O2R channel).
    fn drop_runner(&self, reg: &mut Registry, r: Runner, why: &str) {
        for (sid, s) in r.sessions {
            for c in s.channels {
                self.trickle.close_channel(&c);
            }
            reg.released.push((sid, why.into()));
        }
    }

    fn release(&self, reg: &mut Registry, runner: &str, sid: &str, by: &str) {
        let Some(r) = reg.runners.get_mut(runner) else {
            return;
        };
        if let Some(s) = r.sessions.remove(sid) {
            let _ = r.o2r.try_send(
                json!({"event": "released", "session": sid, "timestamp": "2026-01-01T00:00:00Z"})
                    .to_string(),
            );
            for c in s.channels {
                self.trickle.close_channel(&c);
            }
            reg.released.push((sid.to_string(), by.into()));
        }
    }

    /// The live runner `id` if it exists and has not expired (else 404 "runner not found").
    fn live<'a>(&self, reg: &'a mut Registry, id: &str) -> Result<&'a mut Runner, Reject> {
        match reg.runners.get_mut(id) {
            Some(r) if !(r.stale || r.last_heartbeat.elapsed() > self.opts.heartbeat_ttl) => Ok(r),
            _ => Err(Reject(StatusCode::NOT_FOUND, "runner not found")),
        }
    }

    /// The session check of every runner callback: 404 (runner, readiness, session), 401
    /// (token).
    fn check_token(
        &self,
        reg: &mut Registry,
        runner: &str,
        sid: &str,
        headers: &HeaderMap,
    ) -> Result<(), Reject> {
        let r = self.live(reg, runner)?;
        if !r.ready() {
            return Err(Reject(StatusCode::NOT_FOUND, "runner not found"));
        }
        let Some(s) = r.sessions.get(sid) else {
            return Err(Reject(StatusCode::NOT_FOUND, "runner session not found"));
        };
        let token = headers
            .get("livepeer-session-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if token != s.token {
            return Err(Reject(StatusCode::UNAUTHORIZED, "invalid authorization"));
        }
        Ok(())
    }
}

/// Validates and normalises a heartbeat body as the orchestrator does.
fn normalize(mut body: Value) -> Result<Value, String> {
    let url_ok = body
        .get("runner_url")
        .and_then(Value::as_str)
        .and_then(|u| url::Url::parse(u).ok())
        .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
    if !url_ok {
        return Err("invalid runner_url".into());
    }
    let app = body.get("app").and_then(Value::as_str).unwrap_or_default();
    if app.is_empty() || app != app.trim() {
        return Err("app must be trimmed".into());
    }
    let status = body
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if status != status.trim().to_lowercase() {
        return Err("status must be lowercase and trimmed".into());
    }
    let mode = match body.get("mode").and_then(Value::as_str).unwrap_or_default() {
        "" | "persistent" => "persistent",
        "single-shot" | "single_shot" => "single-shot",
        _ => return Err("mode must be \"persistent\" or \"single-shot\"".into()),
    };
    body["mode"] = json!(mode);
    match body.get("capacity").and_then(Value::as_i64) {
        Some(c) if c < 0 => return Err("capacity must be >= 0".into()),
        Some(0) | None => body["capacity"] = json!(1),
        Some(_) => {}
    }
    Ok(body)
}

async fn heartbeat(State(o): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = auth(&headers);
    let parsed: Result<Value, String> = serde_json::from_slice::<Value>(&body)
        .map_err(|e| e.to_string())
        .and_then(|v| {
            if v.is_object() {
                Ok(v)
            } else {
                Err("not an object".into())
            }
        });
    let record = |o: &Inner, body: Value, status: u16| {
        o.reg.lock().unwrap().heartbeats.push(Heartbeat {
            auth: auth.clone(),
            body,
            status,
        });
    };
    let raw = parsed.clone().unwrap_or(Value::Null);
    let body = match parsed.and_then(normalize) {
        Ok(b) => b,
        Err(e) => {
            record(&o, raw, 400);
            return text(StatusCode::BAD_REQUEST, &e);
        }
    };
    if o.opts.garbage_answers {
        record(&o, raw, 200);
        return (StatusCode::OK, "<html>this is not JSON</html>").into_response();
    }
    let interval = go_duration(o.opts.heartbeat_interval);
    let ttl = go_duration(o.opts.heartbeat_ttl);
    let mut reg = o.reg.lock().unwrap();
    let proposed = body
        .get("runner_id")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    let id = if proposed.is_empty() {
        let n = o.next(&mut reg);
        format!("runner_{n}")
    } else {
        proposed
    };
    let (code, answer) = match reg.runners.get_mut(&id) {
        None => {
            if auth != o.opts.secret {
                (StatusCode::UNAUTHORIZED, None)
            } else {
                let n = o.next(&mut reg);
                let secret = format!("hbsecret{n}x{:x}", std::process::id());
                let o2r_channel = format!("{id}-{n:016x}-o2r");
                o.trickle
                    .create_channel(&o2r_channel, "application/json")
                    .unwrap();
                let (tx, rx) = tokio::sync::mpsc::channel(32);
                tokio::spawn(o2r_writer(
                    format!("{}{TRICKLE_BASE}{o2r_channel}", o.base),
                    rx,
                    o.opts.o2r_interval,
                ));
                let runner = Runner {
                    id: id.clone(),
                    heartbeat_secret: secret.clone(),
                    request: body.clone(),
                    last_heartbeat: Instant::now(),
                    sessions: BTreeMap::new(),
                    o2r_channel: o2r_channel.clone(),
                    o2r: tx,
                    stale: false,
                };
                reg.runners.insert(id.clone(), runner);
                reg.registrations.push(id.clone());
                (
                    StatusCode::OK,
                    Some(json!({
                        "runner_id": id, "orchestrator": o.base,
                        "heartbeat_interval": interval, "heartbeat_ttl": ttl,
                        "heartbeat_secret": secret,
                        "o2r": {"name": "o2r", "channel_name": o2r_channel,
                                "url": format!("{}{TRICKLE_BASE}{o2r_channel}", o.base),
                                "mime_type": "application/json"},
                        "session_ids": [],
                    })),
                )
            }
        }
        Some(r) if r.stale => {
            if let Some(r) = reg.runners.remove(&id) {
                o.drop_runner(&mut reg, r, "expiry");
                reg.expired.push(id.clone());
            }
            (StatusCode::NOT_FOUND, None)
        }
        Some(r) => {
            if r.last_heartbeat.elapsed() > o.opts.heartbeat_ttl {
                (StatusCode::NOT_FOUND, None)
            } else if auth != r.heartbeat_secret {
                (StatusCode::UNAUTHORIZED, None)
            } else {
                r.request = body.clone();
                r.last_heartbeat = Instant::now();
                let sessions: Vec<&String> = r.sessions.keys().collect();
                (
                    StatusCode::OK,
                    Some(json!({
                        "runner_id": id, "orchestrator": o.base,
                        "heartbeat_interval": interval, "heartbeat_ttl": ttl,
                        "session_ids": sessions,
                    })),
                )
            }
        }
    };
    reg.heartbeats.push(Heartbeat {
        auth: auth.clone(),
        body: raw,
        status: code.as_u16(),
    });
    drop(reg);
    match (code, answer) {
        (StatusCode::OK, Some(a)) => axum::Json(a).into_response(),
        (StatusCode::NOT_FOUND, _) => text(code, "runner not found"),
        (StatusCode::UNAUTHORIZED, _) => text(code, "invalid heartbeat authorization"),
        (code, _) => text(code, "error"),
    }
}

/// Publishes the O2R messages: a keepalive every `every`, and each queued event; ends (and
/// closes the channel) when the runner is dropped.
async fn o2r_writer(url: String, mut rx: tokio::sync::mpsc::Receiver<String>, every: Duration) {
    let Ok(mut p) = Publisher::new(
        &url,
        PublisherConfig {
            mime: "application/json".into(),
            ..Default::default()
        },
    ) else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    loop {
        let msg = tokio::select! {
            _ = tick.tick() => r#"{"keep":"alive"}"#.to_string(),
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        if p.send_message(Bytes::from(msg)).await.is_err() {
            return;
        }
    }
    let _ = p.close().await;
}

async fn unregister(
    State(o): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut reg = o.reg.lock().unwrap();
    let r = match o.live(&mut reg, &id) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if auth(&headers) != r.heartbeat_secret {
        return text(StatusCode::UNAUTHORIZED, "invalid authorization");
    }
    if let Some(r) = reg.runners.remove(&id) {
        o.drop_runner(&mut reg, r, "unregister");
    }
    reg.unregistered.push(id);
    StatusCode::NO_CONTENT.into_response()
}

async fn discovery(State(o): State<Shared>) -> Response {
    let reg = o.reg.lock().unwrap();
    let runners: Vec<Value> = reg
        .runners
        .values()
        .filter(|r| !o.expired(r) && r.ready())
        .map(|r| {
            let cap = r.capacity();
            json!({
                "url": format!("{}/apps/{}/session", o.base, r.id),
                "app": r.request.get("app"),
                "version": r.request.get("version"),
                "gpu": r.request.get("gpu"),
                "mode": r.request.get("mode"),
                "capacity": cap,
                "capacity_used": r.sessions.len(),
                "capacity_available": cap.saturating_sub(r.sessions.len()),
            })
        })
        .collect();
    axum::Json(json!([{"address": o.base, "runners": runners}])).into_response()
}

async fn reserve(State(o): State<Shared>, Path(id): Path<String>) -> Response {
    let mut reg = o.reg.lock().unwrap();
    let n = o.next(&mut reg);
    let r = match o.live(&mut reg, &id) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !r.ready() {
        return text(StatusCode::NOT_FOUND, "runner not found");
    }
    if r.sessions.len() >= r.capacity() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no capacity available for runner",
        );
    }
    let sid = format!("session_{n}");
    r.sessions.insert(
        sid.clone(),
        Session {
            token: format!("token-{n}-{}", id.len() * 7919),
            channels: Vec::new(),
        },
    );
    let _ = r.o2r.try_send(
        json!({"event": "reserved", "session": sid, "timestamp": "2026-01-01T00:00:00Z"})
            .to_string(),
    );
    axum::Json(json!({
        "session_id": sid,
        "app_url": format!("{}/apps/{id}/session/{sid}/app", o.base),
        "control_url": format!("{}/apps/{id}/session/{sid}", o.base),
    }))
    .into_response()
}

async fn client_stop(State(o): State<Shared>, Path((id, sid)): Path<(String, String)>) -> Response {
    let mut reg = o.reg.lock().unwrap();
    if let Err(e) = o.live(&mut reg, &id) {
        return e.into_response();
    }
    o.release(&mut reg, &id, &sid, "client");
    StatusCode::NO_CONTENT.into_response()
}

async fn proxy(
    State(o): State<Shared>,
    Path((id, sid, path)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (runner_url, token) = {
        let mut reg = o.reg.lock().unwrap();
        let r = match o.live(&mut reg, &id) {
            Ok(r) => r,
            Err(e) => return e.into_response(),
        };
        if !r.ready() {
            return text(StatusCode::NOT_FOUND, "runner not found");
        }
        let Some(s) = r.sessions.get(&sid) else {
            return text(StatusCode::NOT_FOUND, "runner session not found");
        };
        let url = r
            .request
            .get("runner_url")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string();
        (url, s.token.clone())
    };
    let mut req = o
        .http
        .request(method, format!("{runner_url}/{path}"))
        .header("Livepeer-Runner-Route", &id)
        .header("Livepeer-Session-Id", &sid)
        .header("Livepeer-Session-Token", token)
        .header(
            "Livepeer-Session-Control",
            format!("{}/runner/{id}/session/{sid}", o.base),
        )
        .body(body);
    for name in ["content-type", "authorization"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    match req.send().await {
        Ok(r) => {
            let code = StatusCode::from_u16(r.status().as_u16()).unwrap();
            let ct = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_string();
            let bytes = r.bytes().await.unwrap_or_default();
            (code, [("content-type", ct)], bytes).into_response()
        }
        Err(e) => text(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

fn channel_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

async fn create_channels(
    State(o): State<Shared>,
    Path((id, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut reg = o.reg.lock().unwrap();
    if let Err(e) = o.check_token(&mut reg, &id, &sid, &headers) {
        return e.into_response();
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let list = req
        .get("channels")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if list.is_empty() {
        return text(StatusCode::BAD_REQUEST, "channels is required");
    }
    if list.len() > 25 {
        return text(
            StatusCode::BAD_REQUEST,
            "channels cannot contain more than 25 entries",
        );
    }
    let mut out = Vec::new();
    for c in list {
        let name = c
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim()
            .replace('/', "-");
        if name.is_empty() {
            return text(StatusCode::BAD_REQUEST, "trickle channel name is required");
        }
        if !channel_name_ok(&name) {
            return text(
                StatusCode::BAD_REQUEST,
                "trickle channel name may only contain alphanumerics, underscores, or hyphens",
            );
        }
        let mime = c
            .get("mime_type")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .unwrap_or("application/octet-stream")
            .to_string();
        let channel = format!("{sid}-{name}");
        o.trickle.create_channel(&channel, &mime).unwrap();
        let url = format!("{}{TRICKLE_BASE}{channel}", o.base);
        out.push(json!({"name": name, "channel_name": channel, "url": url,
                        "internal_url": url, "mime_type": mime}));
        if let Some(s) = reg
            .runners
            .get_mut(&id)
            .and_then(|r| r.sessions.get_mut(&sid))
            && !s.channels.contains(&channel)
        {
            s.channels.push(channel.clone());
        }
        reg.channels_created.push(channel);
    }
    axum::Json(json!({"channels": out})).into_response()
}

async fn delete_channels(
    State(o): State<Shared>,
    Path((id, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut reg = o.reg.lock().unwrap();
    if let Err(e) = o.check_token(&mut reg, &id, &sid, &headers) {
        return e.into_response();
    }
    let names: Vec<String> = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v
            .get("channels")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if names.is_empty() {
        return text(StatusCode::BAD_REQUEST, "channels is required");
    }
    let Some(s) = reg
        .runners
        .get_mut(&id)
        .and_then(|r| r.sessions.get_mut(&sid))
    else {
        return text(StatusCode::NOT_FOUND, "runner session not found");
    };
    for n in &names {
        let channel = format!("{sid}-{n}");
        let Some(i) = s.channels.iter().position(|c| *c == channel) else {
            return text(StatusCode::NOT_FOUND, "trickle channel not found");
        };
        s.channels.remove(i);
        o.trickle.close_channel(&channel);
    }
    axum::Json(json!({"deleted": names})).into_response()
}

async fn runner_stop(
    State(o): State<Shared>,
    Path((id, sid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut reg = o.reg.lock().unwrap();
    if let Err(e) = o.check_token(&mut reg, &id, &sid, &headers) {
        return e.into_response();
    }
    o.release(&mut reg, &id, &sid, "runner");
    StatusCode::NO_CONTENT.into_response()
}
