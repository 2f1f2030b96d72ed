// SPDX-License-Identifier: MPL-2.0
//! The supervisor of live sessions (and the owner of templates, the feed and file jobs).
//!
//! Layer: below the HTTP handlers, above `session`. Sessions never call it: they report
//! through a [`Report`] channel, which [`Daemon::supervise`] reads.
//!
//! With `--max-sessions 1` (the default) there is one session, the runner session, which
//! lives as long as the daemon: a new start stops its stream and starts the new one, and its
//! restart budget, health state and counters are the daemon's, as in the runner. With more,
//! each start is a session of its own keyed by `stream_id` (else `gateway_request_id`), made
//! when it starts and dropped when its stream stops; the runner session then never streams: it
//! holds the warm-up state that new sessions start from and answers `/health` and
//! `/api/status` while no session runs. While sessions run, those two report the oldest
//! session (docs/runner.md, "Many sessions").

use crate::config::Config;
use crate::health::State;
use crate::session::stream::StartRequest;
use crate::session::{Counters, ParamsError, Report, Session, StartError};
use crate::status::Status;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

pub struct Daemon {
    pub config: Arc<Config>,
    /// Pipeline templates (`/v1/pipelines`), kept in `config.data_dir`.
    pub templates: Arc<crate::templates::Templates>,
    /// The realtime feed (`/v1/events`): job progress, stage events.
    pub feed: crate::feed::Feed,
    /// File jobs (`/v1/jobs`).
    pub jobs: crate::jobs::Jobs,
    /// What `/metrics` records as it happens, shared with the sessions.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The runner session (see the module's documentation).
    runner: Arc<Session>,
    /// With `max_sessions > 1`: the running sessions, oldest first.
    sessions: Mutex<Vec<Arc<Session>>>,
    /// Counts of the sessions already dropped (so that totals never go back).
    retired: Mutex<Counters>,
    reports: mpsc::UnboundedSender<Report>,
    reports_rx: Mutex<Option<mpsc::UnboundedReceiver<Report>>>,
}

/// One session as `GET /v1/sessions` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub state: &'static str,
    pub request_id: String,
    pub manifest_id: String,
    pub stream_id: String,
    /// Milliseconds since the epoch.
    pub start_time: i64,
    pub input_fps: f64,
    pub output_fps: f64,
    pub restart_count: u32,
    pub params: Value,
}

impl Daemon {
    pub fn new(config: Config) -> Arc<Daemon> {
        let config = Arc::new(config);
        let templates = Arc::new(crate::templates::Templates::open(&config.data_dir));
        let feed = crate::feed::Feed::new();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let (reports, rx) = mpsc::unbounded_channel();
        let runner = Session::new(
            String::new(),
            config.clone(),
            templates.clone(),
            feed.clone(),
            metrics.clone(),
            reports.clone(),
            None,
        );
        Arc::new(Daemon {
            runner,
            sessions: Mutex::new(Vec::new()),
            retired: Mutex::new(Counters::default()),
            reports,
            reports_rx: Mutex::new(Some(rx)),
            templates,
            feed,
            metrics,
            jobs: crate::jobs::Jobs::default(),
            config,
        })
    }

    /// Reads the sessions' reports until the daemon ends (spawned once by `serve::start`).
    pub async fn supervise(self: Arc<Self>) {
        let Some(mut rx) = self.reports_rx.lock().unwrap().take() else {
            return;
        };
        while let Some(report) = rx.recv().await {
            match report {
                Report::Stopped {
                    session,
                    generation,
                } => self.drop_session(&session, Some(generation)),
            }
        }
    }

    /// Whether each start is its own session (`--max-sessions` above 1).
    pub fn multi(&self) -> bool {
        self.config.max_sessions > 1
    }

    /// Live sessions this daemon runs at once.
    pub fn capacity(&self) -> usize {
        self.config.max_sessions
    }

    /// The running sessions, oldest first (the runner session when it streams, with one).
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        if self.multi() {
            self.sessions.lock().unwrap().clone()
        } else if self.runner.is_running() {
            vec![self.runner.clone()]
        } else {
            Vec::new()
        }
    }

    /// The running sessions' keys, oldest first.
    pub fn session_ids(&self) -> Vec<String> {
        self.sessions().iter().map(|s| session_key(s)).collect()
    }

    /// A running session by id (its key; with one session, its `stream_id` or
    /// `request_id`).
    pub fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions().into_iter().find(|s| session_key(s) == id)
    }

    /// What `GET /v1/sessions` shows of a session.
    pub fn session_info(&self, s: &Session) -> SessionInfo {
        let status = s.status();
        let (request_id, manifest_id, stream_id) = s.ids();
        SessionInfo {
            id: session_key(s),
            state: status.state,
            request_id,
            manifest_id,
            stream_id,
            start_time: status.start_time,
            input_fps: status.input_status.fps,
            output_fps: status.inference_status.fps,
            restart_count: status.inference_status.restart_count,
            params: s.current_params(),
        }
    }

    /// The session the runner's single-stream views show: the oldest running one, else the
    /// runner session.
    pub fn primary(&self) -> Arc<Session> {
        if self.multi()
            && let Some(s) = self.sessions.lock().unwrap().first()
        {
            return s.clone();
        }
        self.runner.clone()
    }

    pub fn state(&self) -> State {
        self.primary().state()
    }

    /// The status object of `GET /api/status` (the primary session's).
    pub fn status(&self) -> Status {
        self.primary().status()
    }

    /// Totals over every session the daemon ran.
    pub fn counters(&self) -> Counters {
        let mut total = self.retired.lock().unwrap().clone();
        total.add(&self.runner.counters());
        for s in self.sessions.lock().unwrap().iter() {
            total.add(&s.counters());
        }
        total
    }

    pub fn current_params(&self) -> Value {
        self.primary().current_params()
    }

    /// `POST /api/params`: the primary session's params.
    pub async fn update_params(&self, params: Value) -> Result<(), ParamsError> {
        self.primary().update_params(params).await
    }

    /// The dashboard's data: the chosen session's (else the primary's), with the list of
    /// sessions.
    pub fn dashboard(&self, session: Option<&str>) -> Value {
        let chosen = session
            .and_then(|id| self.session(id))
            .unwrap_or_else(|| self.primary());
        let mut v = chosen.dashboard();
        let list: Vec<SessionInfo> = self
            .sessions()
            .iter()
            .map(|s| self.session_info(s))
            .collect();
        if let Some(o) = v.as_object_mut() {
            o.insert("session".into(), json!(session_key(&chosen)));
            o.insert("sessions".into(), json!(list));
            o.insert("max_sessions".into(), json!(self.capacity()));
        }
        v
    }

    /// The last preview JPEG of a session (the primary when `None`).
    pub fn preview(&self, input: bool, session: Option<&str>) -> Option<bytes::Bytes> {
        let s = match session {
            Some(id) => self.session(id)?,
            None => self.primary(),
        };
        s.preview(input)
    }

    /// Starts a stream. One session: stops the running stream first. More: the session of
    /// the request's key (a running one is restarted with the new request), a new one while
    /// there is room, else [`StartError::Full`].
    pub async fn start_stream(
        self: &Arc<Self>,
        req: StartRequest,
        received_at: f64,
    ) -> Result<(), StartError> {
        if !self.multi() {
            return self.runner.start_stream(req, received_at).await;
        }
        let key = request_key(&req);
        Session::validate_params(&req.params).map_err(|e| StartError::Invalid(e.to_string()))?;
        // The lookup, the capacity check and the insertion are one step under the list's lock;
        // the start itself (the model load) runs outside it, so sessions start side by side.
        let session = {
            let mut sessions = self.sessions.lock().unwrap();
            match sessions.iter().find(|s| s.id == key) {
                Some(s) => s.clone(),
                None => {
                    let n = sessions.len();
                    if n >= self.capacity() {
                        return Err(StartError::Full(format!(
                            "all {n} sessions of this runner are in use (--max-sessions {})",
                            self.capacity()
                        )));
                    }
                    let session = Session::new(
                        key,
                        self.config.clone(),
                        self.templates.clone(),
                        self.feed.clone(),
                        self.metrics.clone(),
                        self.reports.clone(),
                        Some(batch_group(&self.config)),
                    );
                    session.inherit(&self.runner);
                    sessions.push(session.clone());
                    session
                }
            }
        };
        let result = session.start_stream(req, received_at).await;
        if result.is_err() {
            // Not streaming after a failed (re)start: the session ends, unless a later start
            // of the same key has begun meanwhile (its generation).
            self.drop_session(&session.id, Some(session.generation()));
        }
        result
    }

    /// Stops one session's stream (`DELETE /v1/sessions/{id}`); false when none has that id.
    pub async fn stop_session(&self, id: &str, reason: &str) -> bool {
        match self.session(id) {
            Some(s) => {
                s.stop_stream(reason).await;
                true
            }
            None => false,
        }
    }

    /// Stops every stream (shutdown).
    pub async fn stop_all(&self, reason: &str) {
        self.runner.stop_stream(reason).await;
        for s in self.sessions() {
            s.stop_stream(reason).await;
        }
    }

    /// One health evaluation of every session.
    pub async fn health_tick(&self) {
        self.runner.health_tick().await;
        for s in self.sessions() {
            s.health_tick().await;
        }
    }

    /// Loads (verifies) the pipeline in the background (the runner session's warm-up).
    pub fn load_pipeline(&self) {
        self.runner.clone().load_pipeline();
    }

    /// Drops a session whose stream stopped (multi-session only; the runner session stays).
    /// `generation`: the session's start count the report was sent at; a session started
    /// again since is kept.
    fn drop_session(&self, id: &str, generation: Option<u64>) {
        if !self.multi() || id.is_empty() {
            return;
        }
        let mut sessions = self.sessions.lock().unwrap();
        if let Some(i) = sessions.iter().position(|s| {
            s.id == id && !s.is_running() && generation.is_none_or(|g| g == s.generation())
        }) {
            let s = sessions.remove(i);
            s.forget_state();
            self.retired.lock().unwrap().add(&s.counters());
            tracing::info!(session = %id, "session ended");
        }
    }
}

/// A start request's session key: its `stream_id`, else its `gateway_request_id` (or the
/// generated request id).
pub fn request_key(req: &StartRequest) -> String {
    if req.stream_id.is_empty() {
        req.request_id.clone()
    } else {
        req.stream_id.clone()
    }
}

/// A session's key: its id, or for the runner session its stream's `stream_id` / `request_id`.
fn session_key(s: &Session) -> String {
    if !s.id.is_empty() {
        return s.id.clone();
    }
    let (request_id, _, stream_id) = s.ids();
    if stream_id.is_empty() {
        request_id
    } else {
        stream_id
    }
}

/// The `batch-group` of the daemon's sessions: the sessions of one daemon that run the same model
/// on the same device share one inference child (and its loaded model).
fn batch_group(cfg: &Config) -> String {
    format!("rivulet-{}@{}", std::process::id(), cfg.device)
}
