// SPDX-License-Identifier: MPL-2.0
//! Daemon configuration: the runner's environment variables (docs/runner.md, "Environment
//! variables") and
//! Rivulet's own settings.

pub mod registration;

use gstaipipeline::pipeline::SearchPath;
use gsttrickle::protocol::server as trickle;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// `MODEL_ID`: the live pipeline's name (`noop` by default).
    pub pipeline: String,
    /// `PIPELINE`: always `live-video-to-video`.
    pub pipeline_kind: String,
    pub version: String,
    pub auth_token: Option<String>,
    /// `RIVULET_API_TOKEN`: bearer token for every route but the open ones (`crate::http::auth`).
    pub api_token: Option<String>,
    /// The pipeline's initial params (restored when a stream ends).
    pub initial_params: Value,
    /// Serve an embedded trickle server on the API port under `trickle_base`.
    pub embedded_trickle: bool,
    pub trickle_base: String,
    /// `RIVULET_TRICKLE_MAX_CONNECTIONS`: most connections served at once on the daemon's port
    /// (API and embedded trickle server together); one more is answered 503 and closed.
    /// 0: no limit.
    pub trickle_max_connections: usize,
    /// `RIVULET_TRICKLE_HEADER_READ_TIMEOUT_MS`: time a connection on the daemon's port has to
    /// send a complete request head (from accept, or from the end of its previous response);
    /// a partial head is answered 408. 0: no timeout.
    pub trickle_header_read_timeout: Duration,
    /// `RIVULET_TRICKLE_BODY_IDLE_TIMEOUT_MS`: a trickle POST body that has started and then
    /// sends nothing for this long closes its segment (408); a response write on the daemon's
    /// port stuck this long drops the connection. 0: no timeout.
    pub trickle_body_idle_timeout: Duration,
    /// `RIVULET_TRICKLE_MAX_WAITING_SUBSCRIBERS`: most GETs waiting for a segment's first byte
    /// on the embedded trickle server; one more is answered 503. 0: no limit.
    pub trickle_max_waiting_subscribers: usize,
    /// `RIVULET_TRICKLE_MAX_WAITING_SUBSCRIBERS_PER_CHANNEL`: the same, per channel.
    pub trickle_max_waiting_subscribers_per_channel: usize,
    /// Period of `status` events (10 s in the runner).
    pub status_period: Duration,
    /// Period of the health evaluation (1 s in the runner).
    pub health_period: Duration,
    /// `RIVULET_INPUT_IDLE_STOP_MS`: a stream whose input has been idle this long is stopped
    /// (health rule 5; 60 s in the runner); still running 30 s later is a computed ERROR.
    pub input_idle_stop: Duration,
    /// Length of the FPS window (10 s in the runner).
    pub fps_window: Duration,
    /// `RIVULET_DATA_KEEPALIVE_MS`: with nothing to send for this long, the data channel sends
    /// an empty batch `[]` (25 s by default).
    pub data_keepalive: Duration,
    /// The input frame-rate cap (24 fps); `None` disables it.
    pub fps_cap: Option<f64>,
    /// Where model manifests are looked for: the pipeline registry's default search path
    /// (`RIVULET_PIPELINES`, `MODEL_DIR`, the data dirs, beside the binary, the build tree;
    /// `gstaipipeline::pipeline::SearchPath::from_env`). Every `aipipeline` the daemon makes
    /// gets it as its `pipelines-dir`.
    pub pipelines: SearchPath,
    /// `aipipeline` device (`auto` by default).
    pub device: String,
    /// Where the last start request is kept for crash cleanup.
    pub state_file: PathBuf,
    /// Verify TLS certificates on trickle URLs (off in runner mode, as the runner).
    pub tls_verify: bool,
    /// `RIVULET_ISOLATION=process` (default): inference runs in a child process (this
    /// executable with the `aipipeline-child` argument), restarted on a crash or hang;
    /// `none`: in the daemon's own process.
    pub isolation: bool,
    /// `RIVULET_RESTART_POLICY`: what an inference restart does to the running stream.
    pub restart_policy: RestartPolicy,
    /// `RIVULET_HANG_TIMEOUT_MS`: an inference child that does not answer a frame within this
    /// time is replaced by `aipipeline` itself (its `hang-timeout-ms`, 5000 by default, the
    /// runner's "output stalled more than 5 s").
    pub hang_timeout_ms: u32,
    /// Where pipeline templates are kept (`RIVULET_DATA_DIR`, else `$XDG_DATA_HOME/rivulet`,
    /// else `~/.local/share/rivulet`, else `./data`).
    pub data_dir: PathBuf,
    /// `RIVULET_MAX_SESSIONS` / `--max-sessions`: live sessions at once. 1 (default): the
    /// runner's behaviour, a new start stops the running stream; more: each start is its own
    /// session keyed by `stream_id` (else `gateway_request_id`), and one start beyond the
    /// limit is refused (503).
    pub max_sessions: usize,
    /// Dynamic live-runner registration (`RIVULET_ORCHESTRATOR`, …; docs/live-runner.md).
    pub registration: registration::Settings,
}

/// What an inference restart (a lost or replaced inference child) does to the running stream
/// (docs/runner.md, "Restarts and restart policy").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// `keep-stream` (default, Rivulet's): the stream goes on with loading frames while the
    /// child restarts; real frames resume after the reload.
    KeepStream,
    /// `stop-stream` (the runner's): the stream is stopped first, then the inference side is
    /// restarted (the gateway fails over at once).
    StopStream,
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep-stream" => Ok(RestartPolicy::KeepStream),
            "stop-stream" => Ok(RestartPolicy::StopStream),
            _ => Err("expected keep-stream or stop-stream".into()),
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(d) = env("XDG_DATA_HOME") {
        return PathBuf::from(d).join("rivulet");
    }
    match env("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/rivulet"),
        None => PathBuf::from("data"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("PIPELINE={0} is not supported: Rivulet only runs live-video-to-video")]
    Pipeline(String),
    #[error("STREAM_PROTOCOL={0} is not supported: Rivulet only speaks trickle")]
    Protocol(String),
    #[error("invalid {name}={value}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_ms(name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
    match env(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| ConfigError::Invalid {
                name,
                value: v,
                reason: e.to_string(),
            }),
    }
}

fn env_count(name: &'static str, default: usize) -> Result<usize, ConfigError> {
    match env(name) {
        None => Ok(default),
        Some(v) => v.parse::<usize>().map_err(|e| ConfigError::Invalid {
            name,
            value: v,
            reason: e.to_string(),
        }),
    }
}

impl Config {
    /// Where a start request is kept for crash cleanup (docs/runner.md, "Crash cleanup"):
    /// `state_file` for the one session of `--max-sessions 1` (empty `session`), else
    /// `<state_file>.session-<key in hex>`, one file per running session.
    pub fn state_file_for(&self, session: &str) -> PathBuf {
        if session.is_empty() {
            return self.state_file.clone();
        }
        let hex: String = session.bytes().map(|b| format!("{b:02x}")).collect();
        let mut name = self.state_file.as_os_str().to_owned();
        name.push(format!(".session-{hex}"));
        PathBuf::from(name)
    }

    /// Every state file a crashed run may have left: `state_file` and the per-session files.
    pub fn state_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.state_file.clone()];
        let (Some(dir), Some(base)) = (self.state_file.parent(), self.state_file.file_name())
        else {
            return files;
        };
        let prefix = format!("{}.session-", base.to_string_lossy());
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut more: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect();
            more.sort();
            files.extend(more);
        }
        files
    }

    /// The token the daemon's own trickle clients send to `url`: `RIVULET_API_TOKEN` when `url`
    /// is on the daemon's embedded trickle server (a loopback host or the configured host, the
    /// daemon's port, under the trickle base), else none (a token never leaves for another
    /// server).
    pub fn own_trickle_token(&self, url: &str) -> Option<String> {
        let config = self;
        let token = config.api_token.clone()?;
        if !config.embedded_trickle {
            return None;
        }
        let u = url::Url::parse(url).ok()?;
        let host = u.host_str()?.trim_start_matches('[').trim_end_matches(']');
        let local = matches!(host, "127.0.0.1" | "localhost" | "::1") || host == config.host;
        (local
            && u.port_or_known_default() == Some(config.port)
            && u.path().starts_with(&config.trickle_base))
        .then_some(token)
    }

    /// Reads the environment. `HOST`/`PORT` default to 127.0.0.1:8000 for a plain
    /// `rivulet serve` (the images set `HOST=0.0.0.0`).
    pub fn from_env() -> Result<Config, ConfigError> {
        let pipeline_kind = env("PIPELINE").unwrap_or_else(|| "live-video-to-video".into());
        if pipeline_kind != "live-video-to-video" {
            return Err(ConfigError::Pipeline(pipeline_kind));
        }
        if let Some(p) = env("STREAM_PROTOCOL")
            && p != "trickle"
        {
            return Err(ConfigError::Protocol(p));
        }
        let port = match env("PORT") {
            None => 8000,
            Some(v) => v
                .parse()
                .map_err(|e: std::num::ParseIntError| ConfigError::Invalid {
                    name: "PORT",
                    value: v,
                    reason: e.to_string(),
                })?,
        };
        let fps_cap = match env("RIVULET_FPS_CAP") {
            None => Some(24.0),
            Some(v) => {
                let f: f64 =
                    v.parse()
                        .map_err(|e: std::num::ParseFloatError| ConfigError::Invalid {
                            name: "RIVULET_FPS_CAP",
                            value: v.clone(),
                            reason: e.to_string(),
                        })?;
                (f > 0.0).then_some(f)
            }
        };
        Ok(Config {
            host: env("HOST").unwrap_or_else(|| "127.0.0.1".into()),
            port,
            pipeline: env("MODEL_ID").unwrap_or_else(|| "noop".into()),
            pipeline_kind,
            version: env("VERSION").unwrap_or_else(|| "undefined".into()),
            auth_token: env("AUTH_TOKEN"),
            api_token: env("RIVULET_API_TOKEN"),
            initial_params: Value::Object(Default::default()),
            embedded_trickle: env("RIVULET_EMBEDDED_TRICKLE").is_none_or(|v| v != "0"),
            trickle_base: "/trickle/".into(),
            trickle_max_connections: env_count(
                "RIVULET_TRICKLE_MAX_CONNECTIONS",
                trickle::DEFAULT_MAX_CONNECTIONS,
            )?,
            trickle_header_read_timeout: env_ms(
                "RIVULET_TRICKLE_HEADER_READ_TIMEOUT_MS",
                trickle::DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            trickle_body_idle_timeout: env_ms(
                "RIVULET_TRICKLE_BODY_IDLE_TIMEOUT_MS",
                trickle::DEFAULT_BODY_IDLE_TIMEOUT,
            )?,
            trickle_max_waiting_subscribers: env_count(
                "RIVULET_TRICKLE_MAX_WAITING_SUBSCRIBERS",
                trickle::DEFAULT_MAX_WAITING_SUBSCRIBERS,
            )?,
            trickle_max_waiting_subscribers_per_channel: env_count(
                "RIVULET_TRICKLE_MAX_WAITING_SUBSCRIBERS_PER_CHANNEL",
                trickle::DEFAULT_MAX_WAITING_SUBSCRIBERS_PER_CHANNEL,
            )?,
            status_period: env_ms("RIVULET_STATUS_PERIOD_MS", Duration::from_secs(10))?,
            health_period: env_ms("RIVULET_HEALTH_PERIOD_MS", Duration::from_secs(1))?,
            input_idle_stop: env_ms("RIVULET_INPUT_IDLE_STOP_MS", Duration::from_secs(60))?,
            fps_window: env_ms("RIVULET_FPS_WINDOW_MS", Duration::from_secs(10))?,
            data_keepalive: env_ms("RIVULET_DATA_KEEPALIVE_MS", Duration::from_secs(25))?,
            fps_cap,
            pipelines: SearchPath::from_env(),
            device: env("RIVULET_DEVICE").unwrap_or_else(|| "auto".into()),
            state_file: env("RIVULET_STATE_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| std::env::temp_dir().join("rivulet_last_start.json")),
            tls_verify: env("RIVULET_TLS_VERIFY").is_some_and(|v| v == "1"),
            isolation: match env("RIVULET_ISOLATION").as_deref() {
                None | Some("process") => true,
                Some("none") => false,
                Some(v) => {
                    return Err(ConfigError::Invalid {
                        name: "RIVULET_ISOLATION",
                        value: v.into(),
                        reason: "expected process or none".into(),
                    });
                }
            },
            restart_policy: match env("RIVULET_RESTART_POLICY") {
                None => RestartPolicy::KeepStream,
                Some(v) => v.parse().map_err(|reason| ConfigError::Invalid {
                    name: "RIVULET_RESTART_POLICY",
                    value: v.clone(),
                    reason,
                })?,
            },
            hang_timeout_ms: match env("RIVULET_HANG_TIMEOUT_MS") {
                None => 5000,
                Some(v) => match v.parse::<u32>() {
                    Ok(ms) if (1..=600_000).contains(&ms) => ms,
                    _ => {
                        return Err(ConfigError::Invalid {
                            name: "RIVULET_HANG_TIMEOUT_MS",
                            value: v,
                            reason: "expected milliseconds from 1 to 600000".into(),
                        });
                    }
                },
            },
            data_dir: env("RIVULET_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(default_data_dir),
            max_sessions: match env("RIVULET_MAX_SESSIONS") {
                None => 1,
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if (1..=64).contains(&n) => n,
                    _ => {
                        return Err(ConfigError::Invalid {
                            name: "RIVULET_MAX_SESSIONS",
                            value: v,
                            reason: "expected a session count from 1 to 64".into(),
                        });
                    }
                },
            },
            registration: registration::Settings::from_env()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RestartPolicy;

    #[test]
    fn restart_policy_values() {
        assert_eq!("keep-stream".parse(), Ok(RestartPolicy::KeepStream));
        assert_eq!("stop-stream".parse(), Ok(RestartPolicy::StopStream));
        assert_eq!(
            "restart".parse::<RestartPolicy>(),
            Err("expected keep-stream or stop-stream".to_string())
        );
    }
}
