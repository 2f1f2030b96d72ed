// SPDX-License-Identifier: MPL-2.0
//! `trickle-server`: a standalone trickle server in development mode (auto-create on,
//! changefeed on), like `j0sh/http-trickle`'s `trickle-server`.
//!
//! ```text
//! trickle-server [--addr 127.0.0.1:2939] [--path /] [--idle-timeout-secs 300] [--max-segment-mib 64]
//!                [--max-connections 4096] [--header-read-timeout-ms 10000]
//!                [--body-idle-timeout-ms 30000] [--max-waiting-subscribers 2048]
//!                [--max-waiting-subscribers-per-channel 128]
//! ```
//! Logs go to stderr (`RUST_LOG`, default `info`); the listening URL goes to stdout. At start
//! the soft `RLIMIT_NOFILE` is raised (up to the hard limit) to fit `--max-connections`.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gsttrickle::protocol::server::{
    DEFAULT_BODY_IDLE_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_WAITING_SUBSCRIBERS, DEFAULT_MAX_WAITING_SUBSCRIBERS_PER_CHANNEL, ServerConfig,
    TrickleServer, raise_fd_limit, serve,
};

#[derive(Parser, Debug)]
#[command(
    name = "trickle-server",
    version,
    about = "Standalone trickle server (development mode)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2939")]
    addr: String,
    /// Base path the channels are served under (begins and ends with '/').
    #[arg(long, default_value = "/")]
    path: String,
    /// Close channels with no write for this many seconds.
    #[arg(long, default_value_t = 300)]
    idle_timeout_secs: u64,
    /// Per-segment size cap in MiB.
    #[arg(long, default_value_t = 64)]
    max_segment_mib: u64,
    /// Most connections served at once; one more is answered 503 and closed (0: no limit).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Time a connection has to send a complete request head, from accept or from the end of
    /// its previous response; a partial head is answered 408 (0: no timeout).
    #[arg(long, default_value_t = DEFAULT_HEADER_READ_TIMEOUT.as_millis() as u64)]
    header_read_timeout_ms: u64,
    /// A POST body that has started and then sends nothing for this long closes its segment
    /// (408); a response write stuck this long drops the connection (0: no timeout).
    #[arg(long, default_value_t = DEFAULT_BODY_IDLE_TIMEOUT.as_millis() as u64)]
    body_idle_timeout_ms: u64,
    /// Most GETs waiting for a segment's first byte, all channels together (0: no limit).
    #[arg(long, default_value_t = DEFAULT_MAX_WAITING_SUBSCRIBERS)]
    max_waiting_subscribers: usize,
    /// Most GETs waiting for a segment's first byte on one channel (0: no limit).
    #[arg(long, default_value_t = DEFAULT_MAX_WAITING_SUBSCRIBERS_PER_CHANNEL)]
    max_waiting_subscribers_per_channel: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = ServerConfig {
        base_path: args.path.clone(),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        max_segment_bytes: args.max_segment_mib.saturating_mul(1024 * 1024),
        max_connections: args.max_connections,
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
        body_idle_timeout: Duration::from_millis(args.body_idle_timeout_ms),
        max_waiting_subscribers: args.max_waiting_subscribers,
        max_waiting_subscribers_per_channel: args.max_waiting_subscribers_per_channel,
        ..ServerConfig::development()
    };
    if config.max_connections > 0 {
        match raise_fd_limit(config.max_connections as u64 + 256) {
            Ok(limit) => tracing::debug!(limit, "RLIMIT_NOFILE soft limit"),
            Err(err) => tracing::warn!(%err, "cannot raise RLIMIT_NOFILE"),
        }
    }
    let server = TrickleServer::new(config);
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let handle = serve(listener, server.clone())
        .await
        .context("cannot start the server")?;
    println!(
        "trickle-server listening on http://{}{}",
        handle.local_addr(),
        server.base_path()
    );
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    tracing::info!("shutting down");
    handle.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
