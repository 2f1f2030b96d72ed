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
        /// Live sessions at once (overrides RIVULET_MAX_SESSIONS; default 1: a new start
        /// stops the running stream, as the runner does).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        max_sessions: Option<u16>,
        /// Register with this orchestrator (overrides RIVULET_ORCHESTRATOR; the secret comes
        /// from RIVULET_ORCH_SECRET only).
        #[arg(long)]
        orchestrator: Option<String>,
        /// URL the orchestrator reaches this daemon at (overrides RIVULET_RUNNER_URL).
        #[arg(long)]
        runner_url: Option<String>,
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
    /// Check that a pipeline or element follows the Rivulet element contract (params JSON
    /// property, full replacement, loading/online events, raw video caps, bad params rejected).
    /// Prints a pass/fail table; exits non-zero when a check fails.
    CheckPipeline {
        /// An aipipeline pipeline name (noop, torchscript, a manifest in RIVULET_PIPELINES) or
        /// a GStreamer element name (found through the registry and GST_PLUGIN_PATH).
        name: String,
        /// Treat NAME as an element even if a pipeline has that name.
        #[arg(long)]
        element: bool,
        /// Bound on each wait (first frame, a change taking effect), in seconds.
        #[arg(long, default_value_t = 20)]
        timeout_s: u64,
        /// TorchScript file for the `torchscript` pipeline (aipipeline's `model` property).
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Run a local video file through a pipeline (or a saved template) as fast as it can go,
    /// with a progress bar on stderr and a summary; exits non-zero if the job fails.
    Process {
        /// Input video file (anything GStreamer's decodebin reads).
        input: PathBuf,
        /// Output file: .ts, .mkv or .mp4 (H.264).
        #[arg(short, long)]
        output: PathBuf,
        /// A template id (templates from RIVULET_DATA_DIR), a definition file (FILE.yaml,
        /// FILE.yml or FILE.json: a stage graph) or a pipeline name.
        #[arg(long, default_value = "noop")]
        pipeline: String,
        /// Stream params as a JSON object.
        #[arg(long)]
        params: Option<String>,
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
    rivulet::session::Session::validate_params(&v)?;
    Ok(v)
}

/// `rivulet process`: one file job on this thread, a progress bar on stderr, the summary on
/// stdout. Returns whether the job succeeded.
fn process(
    input: &std::path::Path,
    output: &std::path::Path,
    pipeline: &str,
    params: Option<&str>,
) -> anyhow::Result<bool> {
    use rivulet::jobs::{JobSpec, JobStatus};
    use std::io::Write;
    let config = Config::from_env()?;
    let params = match params {
        Some(p) => serde_json::from_str(p)
            .map_err(|e| anyhow::anyhow!("params are not valid JSON: {e}"))?,
        None => serde_json::json!({}),
    };
    let spec = JobSpec {
        input: input.to_owned(),
        output: output.to_owned(),
        pipeline: pipeline.to_owned(),
        params,
    };
    let templates = rivulet::templates::Templates::open(&config.data_dir);
    let graph =
        rivulet::jobs::prepare(&spec, &templates, &config).map_err(|e| anyhow::anyhow!(e))?;
    let status = std::sync::Mutex::new(JobStatus::new("cli", &spec, &graph));
    let on_update = |s: &JobStatus| {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{}", s.progress_line());
        let _ = err.flush();
    };
    let never_cancelled = std::sync::atomic::AtomicBool::new(false);
    rivulet::jobs::run(
        &spec,
        &graph,
        &config,
        &status,
        &on_update,
        &|_| {},
        &never_cancelled,
    );
    eprintln!();
    let s = status.lock().unwrap();
    print!("{}", s.summary());
    Ok(s.state == rivulet::jobs::JobState::Done)
}

fn main() -> anyhow::Result<()> {
    // Before anything else: libgomp's idle threads must sleep, not spin (see openmp.rs).
    rivulet::openmp::ensure_passive_wait_policy();
    // The inference child of `aipipeline isolation=process` (the daemon points the element's
    // child-path at this executable): not a user command.
    if std::env::args().nth(1).as_deref() == Some(gstaipipeline::child::SUBCOMMAND) {
        std::process::exit(gstaipipeline::child::run());
    }
    rivulet::media::serve_inference_children();
    let cli = Cli::parse();
    init_tracing();
    rivulet::init_gstreamer()?;
    if let Command::CheckPipeline {
        name,
        element,
        timeout_s,
        model,
    } = &cli.command
    {
        let config = Config::from_env()?;
        let target = rivulet::check::resolve(name, *element, &config.pipelines)
            .map_err(|e| anyhow::anyhow!(e))?;
        let report = rivulet::check::run(&rivulet::check::Options {
            target,
            pipelines: config.pipelines.clone(),
            device: config.device.clone(),
            timeout: std::time::Duration::from_secs(*timeout_s),
            model: model.clone(),
        });
        print!("{}", report.table());
        std::process::exit(if report.passed() { 0 } else { 1 });
    }
    if let Command::Process {
        input,
        output,
        pipeline,
        params,
    } = &cli.command
    {
        let ok = process(input, output, pipeline, params.as_deref())?;
        std::process::exit(if ok { 0 } else { 1 });
    }
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
                max_sessions,
                orchestrator,
                runner_url,
            } => {
                if let Some(n) = max_sessions {
                    config.max_sessions = usize::from(n);
                }
                let r = &mut config.registration;
                r.orchestrator = orchestrator.or(r.orchestrator.take());
                r.runner_url = runner_url.or(r.runner_url.take());
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
                    _ = rivulet::registration::shutdown_signal() => {
                        tracing::info!("shutting down");
                        if let Some(r) = running.registration { r.shutdown().await; }
                        running.daemon.stop_all("shutdown").await;
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
            Command::CheckPipeline { .. } | Command::Process { .. } => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}
