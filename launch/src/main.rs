// SPDX-License-Identifier: MPL-2.0
//! `rivulet`: the Livepeer runner-compatible daemon (`serve`) and the self-contained `demo`.

use clap::{Parser, Subcommand};
use rivulet::config::Config;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "rivulet",
    version,
    about = "Realtime AI video on GStreamer: a Livepeer live-video-to-video runner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the runner API (HOST/PORT, default 127.0.0.1:8000) with an embedded trickle server.
    Serve {
        /// Bind address (overrides HOST).
        #[arg(long)]
        host: Option<String>,
        /// Port (overrides PORT).
        #[arg(long)]
        port: Option<u16>,
        /// Pipeline name (overrides MODEL_ID; default noop).
        #[arg(long)]
        pipeline: Option<String>,
        /// Initial params as a JSON object.
        #[arg(long)]
        params: Option<String>,
        /// Initial params from a JSON file.
        #[arg(long)]
        params_file: Option<PathBuf>,
        /// Do not serve the embedded trickle server.
        #[arg(long)]
        no_embedded_trickle: bool,
    },
    /// Run the whole job on this machine: a generated stream through the daemon to a file.
    Demo {
        /// Seconds of video to process.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
        /// Where to write the processed stream (MPEG-TS).
        #[arg(long, default_value = "out/demo.ts")]
        output: PathBuf,
        /// Pipeline name (default noop).
        #[arg(long)]
        pipeline: Option<String>,
        /// API port (0 picks a free one).
        #[arg(long, default_value_t = 8000)]
        port: u16,
    },
}

fn init_tracing() {
    let default = if std::env::var("VERBOSE_LOGGING").is_ok_and(|v| v == "1") {
        "debug"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn load_params(params: Option<String>, file: Option<PathBuf>) -> anyhow::Result<serde_json::Value> {
    let text = match (params, file) {
        (Some(p), _) => p,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .map_err(|e| anyhow::anyhow!("cannot read params file {}: {e}", f.display()))?,
        (None, None) => return Ok(serde_json::json!({})),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("params are not valid JSON: {e}"))?;
    rivulet::daemon::Daemon::validate_params(&v)?;
    Ok(v)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    rivulet::init_gstreamer()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut config = Config::from_env()?;
        match cli.command {
            Command::Serve {
                host,
                port,
                pipeline,
                params,
                params_file,
                no_embedded_trickle,
            } => {
                if let Some(h) = host {
                    config.host = h;
                }
                if let Some(p) = port {
                    config.port = p;
                }
                if let Some(p) = pipeline {
                    config.pipeline = p;
                }
                config.initial_params = load_params(params, params_file)?;
                if no_embedded_trickle {
                    config.embedded_trickle = false;
                }
                let running = rivulet::serve::start(config).await?;
                tokio::select! {
                    r = running.server => { r??; }
                    _ = tokio::signal::ctrl_c() => {
                        tracing::info!("shutting down");
                        running.daemon.stop_stream("shutdown").await;
                    }
                }
                Ok(())
            }
            Command::Demo {
                seconds,
                output,
                pipeline,
                port,
            } => {
                match pipeline {
                    Some(p) => config.pipeline = p,
                    None if std::env::var_os("MODEL_ID").is_none() => {
                        rivulet::demo::default_pipeline(&mut config)
                    }
                    None => {}
                }
                config.port = port;
                rivulet::demo::run(config, seconds, &output).await
            }
        }
    })
}
