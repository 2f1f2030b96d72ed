// SPDX-License-Identifier: MPL-2.0
//! `trickle-server`: a standalone trickle server in development mode (auto-create on,
//! changefeed on), like `j0sh/http-trickle`'s `trickle-server`.
//!
//! ```text
//! trickle-server [--addr 127.0.0.1:2939] [--path /] [--idle-timeout-secs 300] [--max-segment-mib 64]
//! ```
//! Logs go to stderr (`RUST_LOG`, default `info`); the listening URL goes to stdout.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use gsttrickle::protocol::server::{ServerConfig, TrickleServer, serve};

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
        ..ServerConfig::development()
    };
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
