// SPDX-License-Identifier: MPL-2.0
//! `rivulet serve`: the API, the embedded trickle server and the supervisor's timers.
//!
//! The port is served by the trickle library's bounded serving code
//! ([`gsttrickle::protocol::server::serve_router`]), so its connection-level limits (the
//! connection cap, the request-head timeout, the response write idle timeout; the
//! `RIVULET_TRICKLE_*` settings) apply to the whole port: the API and the embedded trickle
//! server alike, also with the embedded server off.

use crate::config::Config;
use crate::daemon::Daemon;
use gsttrickle::protocol::server::{
    ConnectionLimits, ConnectionStats, ServerConfig, TrickleServer, raise_fd_limit, serve_router,
};
use std::sync::Arc;

/// A started daemon: its address, its core and its embedded trickle server.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub daemon: Arc<Daemon>,
    pub trickle: Option<TrickleServer>,
    /// The port's connection counters (open, refused, timeouts).
    pub connections: ConnectionStats,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Registration with an orchestrator, when one is configured (`shutdown()` unregisters).
    pub registration: Option<crate::registration::Registration>,
}

impl Running {
    /// Base URL of the API, e.g. `http://127.0.0.1:8000`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// URL of a channel on the embedded trickle server.
    pub fn trickle_url(&self, channel: &str) -> String {
        format!(
            "{}{}{}",
            self.base_url(),
            self.daemon.config.trickle_base,
            channel
        )
    }
}

/// Binds, starts the timers and the initial pipeline load, and serves in the background.
pub async fn start(mut config: Config) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    // The port actually bound (`--port 0`): the daemon's own trickle URLs are recognised by it.
    config.port = addr.port();
    let daemon = Daemon::new(config);
    let (mut app, registration) =
        crate::registration::attach(crate::http::router(daemon.clone()), &daemon, addr);
    let c = &daemon.config;
    let trickle_config = ServerConfig {
        base_path: c.trickle_base.clone(),
        max_connections: c.trickle_max_connections,
        header_read_timeout: c.trickle_header_read_timeout,
        body_idle_timeout: c.trickle_body_idle_timeout,
        max_waiting_subscribers: c.trickle_max_waiting_subscribers,
        max_waiting_subscribers_per_channel: c.trickle_max_waiting_subscribers_per_channel,
        ..ServerConfig::development()
    };
    let limits: ConnectionLimits = trickle_config.connection_limits();
    let trickle = if c.embedded_trickle {
        let server = TrickleServer::new(trickle_config);
        app = app.merge(server.router());
        Some(server)
    } else {
        None
    };
    let app = crate::http::protect(app, &daemon.config);
    if limits.max_connections > 0
        && let Err(err) = raise_fd_limit(limits.max_connections as u64 + 256)
    {
        tracing::warn!(%err, "cannot raise RLIMIT_NOFILE");
    }
    crash_cleanup(&daemon).await;
    daemon.load_pipeline();
    tokio::spawn(daemon.clone().supervise());
    let d = daemon.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(d.config.health_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            d.health_tick().await;
        }
    });
    let connections = ConnectionStats::default();
    let server = tokio::spawn(serve_router(
        listener,
        app,
        limits,
        connections.clone(),
        std::future::pending(),
    ));
    tracing::info!(
        max_connections = limits.max_connections,
        header_read_timeout_ms = limits.header_read_timeout.as_millis() as u64,
        write_idle_timeout_ms = limits.write_idle_timeout.as_millis() as u64,
        "connection limits"
    );
    // Tests read the address from the end of this line: no fields after it.
    tracing::info!("rivulet listening on http://{addr}");
    Ok(Running {
        addr,
        daemon,
        trickle,
        connections,
        server,
        registration,
    })
}

/// Opens and closes publishers on the output, events and data channels of the start requests
/// left behind by a crashed run, one state file per session (docs/runner.md, "Crash cleanup").
/// All at once, each at most 5 s.
async fn crash_cleanup(daemon: &Daemon) {
    let mut urls = Vec::new();
    for path in daemon.config.state_files() {
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let _ = std::fs::remove_file(&path);
        let v = match serde_json::from_slice::<serde_json::Value>(&text) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("crash cleanup: {path:?} is not JSON ({e}); removed");
                continue;
            }
        };
        for key in ["publish_url", "events_url", "data_url"] {
            if let Some(url) = v
                .get(key)
                .and_then(|u| u.as_str())
                .filter(|u| !u.is_empty())
            {
                urls.push(url.to_owned());
            }
        }
    }
    futures::future::join_all(urls.iter().map(|url| close_stale_channel(daemon, url))).await;
}

/// Closes one stale channel: an empty segment, then a DELETE.
async fn close_stale_channel(daemon: &Daemon, url: &str) {
    let config = gsttrickle::protocol::client::PublisherConfig {
        tls_verify: daemon.config.tls_verify,
        bearer_token: daemon.config.own_trickle_token(url),
        ..Default::default()
    };
    match gsttrickle::protocol::client::Publisher::new(url, config) {
        Ok(p) => {
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), p.close()).await;
            tracing::info!(%url, ok = matches!(r, Ok(Ok(()))), "crash cleanup of a stale channel");
        }
        Err(e) => tracing::debug!("crash cleanup skipped for {url}: {e}"),
    }
}
