// SPDX-License-Identifier: MPL-2.0
//! `rivulet serve`: the API, the embedded trickle server and the supervisor's timers.

use crate::config::Config;
use crate::daemon::Daemon;
use gsttrickle::protocol::server::{ServerConfig, TrickleServer};
use std::sync::Arc;

/// A started daemon: its address, its core and its embedded trickle server.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub daemon: Arc<Daemon>,
    pub trickle: Option<TrickleServer>,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
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
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    let daemon = Daemon::new(config);
    let mut app = crate::api::router(daemon.clone());
    let trickle = if daemon.config.embedded_trickle {
        let cfg = ServerConfig {
            base_path: daemon.config.trickle_base.clone(),
            ..ServerConfig::development()
        };
        let server = TrickleServer::new(cfg);
        app = app.merge(server.router());
        Some(server)
    } else {
        None
    };
    crash_cleanup(&daemon).await;
    daemon.clone().load_pipeline();
    let d = daemon.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(d.config.health_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            d.health_tick().await;
        }
    });
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    tracing::info!("rivulet listening on http://{addr}");
    Ok(Running {
        addr,
        daemon,
        trickle,
        server,
    })
}

/// Opens and closes publishers on the output and events channels of a start request left
/// behind by a crashed run (runner-compat.md §6.4).
async fn crash_cleanup(daemon: &Daemon) {
    let path = &daemon.config.state_file;
    let Ok(text) = std::fs::read(path) else {
        return;
    };
    let _ = std::fs::remove_file(path);
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return;
    };
    for key in ["publish_url", "events_url"] {
        let Some(url) = v
            .get(key)
            .and_then(|u| u.as_str())
            .filter(|u| !u.is_empty())
        else {
            continue;
        };
        let config = gsttrickle::protocol::client::PublisherConfig {
            tls_verify: daemon.config.tls_verify,
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
}
