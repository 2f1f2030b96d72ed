// SPDX-License-Identifier: MPL-2.0
//! Dynamic live-runner registration with a go-livepeer orchestrator, and the session callbacks
//! of proxied starts (docs/live-runner.md).
//!
//! - [`Registration`]: bootstrap (`POST /runners/heartbeat` with the orchestrator secret),
//!   heartbeats with the returned secret at the returned interval, re-registration on 404/401,
//!   reconciliation with the orchestrator's `session_ids`, the O2R channel (`o2r.rs`), and
//!   `POST /runners/{id}/unregister` on shutdown.
//! - `sessions.rs`: a start proxied by the orchestrator (it carries the `Livepeer-Session-*`
//!   headers) gets its trickle channels from the orchestrator (`…/channels` callback); a
//!   session that ends here is released there (`…/stop` callback).
//!
//! The daemon is reached only through [`RunnerHost`] (implemented for `Daemon` in `host.rs`).

mod host;
mod o2r;
mod sessions;
pub mod wire;

pub use sessions::{SessionBook, attach_sessions};

pub use crate::config::registration::Settings;
#[cfg(test)]
use crate::config::registration::parse_price;
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use wire::{Gpu, HeartbeatRequest, HeartbeatResponse, PriceInfo};

/// What the registration needs from the daemon: a small seam, so that another session model
/// can implement it.
pub trait RunnerHost: Send + Sync + 'static {
    /// Sessions this runner can hold at once (advertised as `capacity`).
    fn capacity(&self) -> u32;
    /// Whether the runner can take a session now (advertised as `status`).
    fn readiness(&self) -> Readiness;
    /// Ids of the sessions running now (the ids a proxied start gave them, see
    /// `sessions.rs`).
    fn session_ids(&self) -> Vec<String>;
    /// Stops the running session `id`, if it still runs.
    fn stop_session(self: Arc<Self>, id: String, reason: String) -> BoxFuture<'static, ()>;
    /// The GPU the runner uses, if known.
    fn gpu(&self) -> Option<Gpu>;
}

/// The runner's `status` in a heartbeat: only `ready` is offered sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// The pipeline is loading (and no session runs).
    Loading,
    /// Permanently failed (health ERROR).
    Error,
}

impl Readiness {
    pub fn as_str(self) -> &'static str {
        match self {
            Readiness::Ready => "ready",
            Readiness::Loading => "loading",
            Readiness::Error => "error",
        }
    }
}

/// A URL's base without a trailing `/`, if it is an http(s) URL with a host and no query.
fn http_base(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return None;
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return None;
    }
    Some(url.trim_end_matches('/').to_string())
}

/// First pause after a failed heartbeat; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Bound on each call to the orchestrator.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the unregister call at shutdown.
const UNREGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeat interval used until the orchestrator gives one (its default).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// How often the readiness is looked at between heartbeats.
const READINESS_POLL: Duration = Duration::from_millis(250);
/// Longest error body quoted in a log line.
const MAX_QUOTED: usize = 300;

/// Where the registration stands.
#[derive(Default)]
struct State {
    /// The runner id: proposed, then the orchestrator's.
    runner_id: String,
    /// Set after a successful bootstrap; cleared when the orchestrator forgets the runner.
    heartbeat_secret: Option<String>,
    /// The runner-facing base URL the orchestrator returned.
    orchestrator: String,
    interval: Option<Duration>,
    last_status: Option<&'static str>,
    o2r: Option<tokio::task::JoinHandle<()>>,
}

pub(crate) struct Shared {
    /// The configured orchestrator base (bootstrap goes there).
    bootstrap_base: String,
    secret: String,
    runner_url: String,
    app: String,
    version: String,
    price: Option<PriceInfo>,
    http: reqwest::Client,
    host: Arc<dyn RunnerHost>,
    book: Arc<SessionBook>,
    state: Mutex<State>,
    /// Read once (NVML, off the async workers) before the first heartbeat.
    gpu: std::sync::OnceLock<Option<Gpu>>,
    stop: Notify,
}

/// A running registration; [`Registration::shutdown`] unregisters.
pub struct Registration {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// Why a heartbeat failed (each says what to check).
#[derive(Debug, thiserror::Error)]
enum BeatError {
    #[error("cannot reach the orchestrator at {url}: {err}")]
    Unreachable { url: String, err: String },
    #[error(
        "the orchestrator refused the registration secret (401 {body}): check RIVULET_ORCH_SECRET"
    )]
    BadSecret { body: String },
    #[error(
        "the orchestrator answered 404 to the registration ({body}): is dynamic registration \
         enabled there (-useLiveRunners with -orchSecret)?"
    )]
    Disabled { body: String },
    #[error("the orchestrator rejected the heartbeat (400 {body}): check the runner settings")]
    Rejected { body: String },
    #[error("the orchestrator answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("the orchestrator's heartbeat answer is not valid: {0}")]
    BadAnswer(String),
}

/// What a heartbeat led to.
enum Beat {
    /// Registered (or still): next heartbeat after the interval.
    Ok,
    /// The orchestrator forgot the runner: bootstrap again at once.
    Forgotten,
}

fn quote(body: &str) -> String {
    let body = body.trim();
    if body.chars().count() > MAX_QUOTED {
        format!("{}…", body.chars().take(MAX_QUOTED).collect::<String>())
    } else {
        body.to_string()
    }
}

impl Registration {
    /// Starts registering, if an orchestrator is configured. `listening` is the daemon's
    /// bound address (the default runner URL). Misconfiguration is logged, and the daemon
    /// runs unregistered: never an error here.
    pub fn start(
        settings: &Settings,
        host: Arc<dyn RunnerHost>,
        book: Arc<SessionBook>,
        config: &crate::config::Config,
        listening: std::net::SocketAddr,
    ) -> Option<Registration> {
        let orchestrator = settings.orchestrator.as_deref()?;
        let Some(bootstrap_base) = http_base(orchestrator) else {
            tracing::error!(
                "registration disabled: RIVULET_ORCHESTRATOR={orchestrator:?} is not an \
                 http(s) URL with a host (e.g. https://orchestrator:8935)"
            );
            return None;
        };
        let Some(secret) = settings.secret.clone() else {
            tracing::error!(
                "registration disabled: RIVULET_ORCH_SECRET (or RIVULET_ORCH_SECRET_FILE) is \
                 not set; the orchestrator's -orchSecret is needed to register"
            );
            return None;
        };
        let runner_url = match &settings.runner_url {
            Some(u) => match http_base(u) {
                Some(u) => u,
                None => {
                    tracing::error!(
                        "registration disabled: RIVULET_RUNNER_URL={u:?} is not an http(s) URL \
                         with a host"
                    );
                    return None;
                }
            },
            None => {
                let mut addr = listening;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                    tracing::warn!(
                        "listening on all interfaces: advertising runner URL http://{addr}; set \
                         RIVULET_RUNNER_URL to the address the orchestrator can reach"
                    );
                }
                format!("http://{addr}")
            }
        };
        let http = match reqwest::Client::builder()
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .tls_danger_accept_invalid_certs(!config.tls_verify)
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("registration disabled: cannot build an HTTP client: {e}");
                return None;
            }
        };
        let app = settings
            .app
            .clone()
            .unwrap_or_else(|| format!("{}/{}", config.pipeline_kind, config.pipeline));
        let shared = Arc::new(Shared {
            bootstrap_base,
            secret,
            runner_url,
            app,
            version: config.version.clone(),
            price: settings.price.clone(),
            http,
            host,
            book,
            state: Mutex::new(State {
                runner_id: settings.runner_id.clone().unwrap_or_default(),
                ..Default::default()
            }),
            gpu: std::sync::OnceLock::new(),
            stop: Notify::new(),
        });
        tracing::info!(
            orchestrator = %shared.bootstrap_base,
            runner_url = %shared.runner_url,
            app = %shared.app,
            "registering with the orchestrator"
        );
        let task = tokio::spawn(run(shared.clone()));
        Some(Registration { shared, task })
    }

    /// The runner id the orchestrator knows this runner by (empty before the first bootstrap).
    pub fn runner_id(&self) -> String {
        self.shared.state.lock().unwrap().runner_id.clone()
    }

    /// Stops heartbeating and unregisters (bounded by 5 s; failures are logged).
    pub async fn shutdown(self) {
        self.shared.stop.notify_one();
        self.task.abort();
        let _ = self.task.await;
        let (id, secret, base, o2r) = {
            let mut s = self.shared.state.lock().unwrap();
            (
                s.runner_id.clone(),
                s.heartbeat_secret.take(),
                s.orchestrator.clone(),
                s.o2r.take(),
            )
        };
        if let Some(o2r) = o2r {
            o2r.abort();
        }
        let Some(secret) = secret else {
            tracing::info!("not registered with the orchestrator: nothing to unregister");
            return;
        };
        let base = if base.is_empty() {
            self.shared.bootstrap_base.clone()
        } else {
            base
        };
        let url = format!("{base}/runners/{}/unregister", path_segment(&id));
        let call = self
            .shared
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, secret)
            .send();
        match tokio::time::timeout(UNREGISTER_TIMEOUT, call).await {
            Ok(Ok(r)) if r.status().is_success() => {
                tracing::info!(runner_id = %id, "unregistered from the orchestrator");
            }
            Ok(Ok(r)) => {
                let status = r.status().as_u16();
                let body = quote(&r.text().await.unwrap_or_default());
                tracing::warn!(runner_id = %id, "unregister answered HTTP {status}: {body}");
            }
            Ok(Err(e)) => tracing::warn!(runner_id = %id, "cannot unregister at {base}: {e}"),
            Err(_) => tracing::warn!(runner_id = %id, "unregister at {base} timed out after 5 s"),
        }
    }
}

/// A path segment with the characters that would change the path escaped.
fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

async fn run(shared: Arc<Shared>) {
    let host = shared.host.clone();
    let gpu = tokio::task::spawn_blocking(move || host.gpu())
        .await
        .ok()
        .flatten();
    let _ = shared.gpu.set(gpu);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let wait = match beat(&shared).await {
            Ok(Beat::Ok) => {
                backoff = FIRST_BACKOFF;
                shared
                    .state
                    .lock()
                    .unwrap()
                    .interval
                    .unwrap_or(DEFAULT_INTERVAL)
            }
            Ok(Beat::Forgotten) => Duration::ZERO,
            Err(e) => {
                tracing::error!("registration: {e}; retrying in {} s", backoff.as_secs_f64());
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
        };
        // Wait, but heartbeat at once when the readiness changes (a pipeline that finished
        // loading is offered sessions without waiting a whole interval).
        let until = tokio::time::Instant::now() + wait;
        let sent = shared.state.lock().unwrap().last_status;
        loop {
            let now = tokio::time::Instant::now();
            if now >= until {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until.min(now + READINESS_POLL)) => {}
                _ = shared.stop.notified() => return,
            }
            if sent.is_some() && sent != Some(shared.host.readiness().as_str()) {
                break;
            }
        }
    }
}

/// One heartbeat (a bootstrap when not registered) and what follows from its answer.
async fn beat(shared: &Arc<Shared>) -> Result<Beat, BeatError> {
    // Sessions that ended here are released at the orchestrator first.
    let running = shared.host.session_ids();
    for ended in shared.book.take_ended(&running) {
        sessions::release(&shared.http, &ended).await;
    }
    let tracked = shared.book.ids();
    let readiness = shared.host.readiness();
    let (bootstrap, auth, base, runner_id) = {
        let s = shared.state.lock().unwrap();
        match &s.heartbeat_secret {
            Some(secret) => (
                false,
                secret.clone(),
                s.orchestrator.clone(),
                s.runner_id.clone(),
            ),
            None => (
                true,
                shared.secret.clone(),
                shared.bootstrap_base.clone(),
                s.runner_id.clone(),
            ),
        }
    };
    let body = HeartbeatRequest {
        runner_id: runner_id.clone(),
        runner_url: shared.runner_url.clone(),
        app: shared.app.clone(),
        version: shared.version.clone(),
        status: readiness.as_str().to_string(),
        mode: "persistent",
        capacity: shared.host.capacity().max(1),
        gpu: shared.gpu.get().cloned().flatten(),
        price_info: shared.price.clone(),
        session_ids: tracked.clone(),
    };
    let url = format!("{base}/runners/heartbeat");
    let resp = shared
        .http
        .post(&url)
        .header(reqwest::header::AUTHORIZATION, auth)
        .json(&body)
        .send()
        .await
        .map_err(|e| BeatError::Unreachable {
            url: base.clone(),
            err: error_chain(&e),
        })?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| BeatError::Unreachable {
        url: base.clone(),
        err: error_chain(&e),
    })?;
    match status {
        200 => {}
        404 | 401 if !bootstrap => {
            let why = if status == 404 {
                "no longer knows this runner (404)"
            } else {
                "refused the heartbeat secret (401)"
            };
            tracing::warn!(runner_id = %runner_id, "the orchestrator {why}: registering again");
            forget(shared);
            return Ok(Beat::Forgotten);
        }
        401 => return Err(BeatError::BadSecret { body: quote(&text) }),
        404 => return Err(BeatError::Disabled { body: quote(&text) }),
        400 => return Err(BeatError::Rejected { body: quote(&text) }),
        _ => {
            return Err(BeatError::Http {
                status,
                body: quote(&text),
            });
        }
    }
    let answer: HeartbeatResponse = serde_json::from_str(&text)
        .map_err(|e| BeatError::BadAnswer(format!("invalid JSON ({e}): {}", quote(&text))))?;
    let new_id = answer.runner_id.trim().to_string();
    if new_id.is_empty() {
        return Err(BeatError::BadAnswer("no runner_id".into()));
    }
    let interval = match wire::parse_go_duration(&answer.heartbeat_interval) {
        Some(d) if d >= Duration::from_millis(10) => d,
        _ => {
            tracing::warn!(
                interval = %answer.heartbeat_interval,
                "no usable heartbeat_interval in the answer: using 5 s"
            );
            DEFAULT_INTERVAL
        }
    };
    if bootstrap {
        let secret = answer.heartbeat_secret.trim();
        if secret.is_empty() {
            return Err(BeatError::BadAnswer(
                "the bootstrap answer has no heartbeat_secret".into(),
            ));
        }
        let orchestrator =
            http_base(answer.orchestrator.trim()).unwrap_or_else(|| shared.bootstrap_base.clone());
        tracing::info!(
            runner_id = %new_id,
            orchestrator = %orchestrator,
            heartbeat_interval = %answer.heartbeat_interval,
            heartbeat_ttl = %answer.heartbeat_ttl,
            "registered with the orchestrator"
        );
        let o2r = answer
            .o2r
            .as_ref()
            .map(|c| c.runner_url().to_string())
            .filter(|u| !u.is_empty())
            .map(|u| o2r::spawn(shared.clone(), u));
        if o2r.is_none() {
            tracing::info!("the orchestrator gave no O2R channel");
        }
        shared.book.set_orchestrator(&orchestrator);
        let mut s = shared.state.lock().unwrap();
        s.heartbeat_secret = Some(secret.to_string());
        s.orchestrator = orchestrator;
        if let Some(old) = std::mem::replace(&mut s.o2r, o2r) {
            old.abort();
        }
    } else if let Some(o) = http_base(answer.orchestrator.trim()) {
        shared.state.lock().unwrap().orchestrator = o;
    }
    {
        let mut s = shared.state.lock().unwrap();
        s.runner_id = new_id.clone();
        s.interval = Some(interval);
        if s.last_status != Some(readiness.as_str()) {
            tracing::info!(runner_id = %new_id, status = readiness.as_str(), "runner status");
            s.last_status = Some(readiness.as_str());
        }
    }
    // Sessions tracked when the heartbeat left and absent from the orchestrator's list are
    // gone there: stop them here. (One started meanwhile is not in `tracked`.)
    for sid in tracked {
        if answer.session_ids.contains(&sid) {
            continue;
        }
        if let Some(local) = shared.book.remove(&sid) {
            tracing::info!(session_id = %sid, "the orchestrator no longer has this session: stopping it");
            shared
                .host
                .clone()
                .stop_session(local, "session released by the orchestrator".into())
                .await;
        }
    }
    Ok(Beat::Ok)
}

/// The orchestrator forgot the runner: drop the heartbeat secret and the O2R channel (the
/// next bootstrap proposes the same runner id).
fn forget(shared: &Shared) {
    let mut s = shared.state.lock().unwrap();
    s.heartbeat_secret = None;
    s.last_status = None;
    if let Some(o2r) = s.o2r.take() {
        o2r.abort();
    }
}

/// An error and its sources on one line (reqwest's own text hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Wires registration into a daemon being started: the proxied-start layer on `app` (always:
/// static registration uses the session headers too) and, with an orchestrator configured,
/// the registration loop. The one hook in `serve.rs`.
pub fn attach(
    app: axum::Router,
    daemon: &Arc<crate::daemon::Daemon>,
    listening: std::net::SocketAddr,
) -> (axum::Router, Option<Registration>) {
    let book = Arc::new(SessionBook::new(&daemon.config));
    let app = attach_sessions(app, book.clone());
    let host: Arc<dyn RunnerHost> = daemon.clone();
    let registration = Registration::start(
        &daemon.config.registration,
        host,
        book,
        &daemon.config,
        listening,
    );
    (app, registration)
}

/// Resolves on SIGINT (ctrl-c) or SIGTERM (what `docker stop` and Kubernetes send).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases() {
        assert_eq!(
            http_base("http://127.0.0.1:8935/").as_deref(),
            Some("http://127.0.0.1:8935")
        );
        assert_eq!(
            http_base("https://o.example:8935/x").as_deref(),
            Some("https://o.example:8935/x")
        );
        assert_eq!(http_base("orchestrator:8935"), None);
        assert_eq!(http_base("ftp://o.example"), None);
        assert_eq!(http_base("not a url"), None);
        assert_eq!(http_base("http://o.example/?a=1"), None);
    }

    #[test]
    fn secret_is_not_in_debug() {
        let s = Settings {
            secret: Some("hunter2-secret".into()),
            ..Default::default()
        };
        let text = format!("{s:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<set>"), "{text}");
    }

    #[test]
    fn prices() {
        let p = parse_price("3.50", None).unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"price": 3.5, "currency": "usd", "unit": "hour"})
        );
        assert_eq!(parse_price("2", Some("fixed")).unwrap().unit, "fixed");
        for bad in ["0", "-1", "abc", ""] {
            assert!(parse_price(bad, None).is_err(), "{bad}");
        }
        let e = parse_price("1", Some("minute")).unwrap_err().to_string();
        assert!(e.contains("RIVULET_RUNNER_PRICE_UNIT"), "{e}");
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(path_segment("runner_abc"), "runner_abc");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
