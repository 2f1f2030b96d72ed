// SPDX-License-Identifier: MPL-2.0
//! `rivulet demo`: the main job on one machine with no other service. It starts the daemon
//! with its embedded trickle server, publishes a generated stream (moving pattern and a tone),
//! starts a stream through the HTTP API exactly as an orchestrator does, changes the params
//! once midway through the control channel, shows live progress, and writes the processed
//! stream to a playable MPEG-TS file.

use crate::config::Config;
use crate::status::now_secs;
use anyhow::{Context, anyhow};
use gst::prelude::*;
use gsttrickle::protocol::client::{Publisher, PublisherConfig, Subscriber, SubscriberConfig};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Runs a state change off the tokio workers (the trickle elements block on their own runtime).
async fn set_state(p: &gst::Pipeline, state: gst::State) -> anyhow::Result<()> {
    let p = p.clone();
    tokio::task::spawn_blocking(move || p.set_state(state))
        .await?
        .map_err(|e| anyhow!("cannot set a demo pipeline to {state:?}: {e}"))?;
    Ok(())
}

/// The demo's default: the shipped `styletransfer` model (issue 8; 26 styles; the midway params
/// change switches style) when the pipeline search path finds it (the repository's `models/`
/// in a build tree, an installed data dir, …), or `noop` when it does not (and it says so).
pub fn default_pipeline(config: &mut Config) {
    let registry = gstaipipeline::pipeline::Registry::scan(&config.pipelines);
    match registry.resolve("styletransfer", None) {
        Some(d) if d.model.as_deref().is_some_and(Path::is_file) => {
            config.pipeline = "styletransfer".into();
        }
        _ => println!(
            "(the styletransfer model is not on the pipeline search path ({}): the demo runs noop)",
            config.pipelines.describe()
        ),
    }
}

/// The stream's initial params. styletransfer runs at 384×384 so that a CPU keeps up
/// (about 60 ms a frame at 384², 160 ms at 512² on 2 cores).
fn initial_params(pipeline: &str) -> Value {
    if pipeline == "styletransfer" {
        json!({"width": 384, "height": 384})
    } else {
        json!({"width": 512, "height": 512})
    }
}

/// Params sent midway: the same size (the output resolution is fixed per stream). For
/// `styletransfer` the style changes (0 → 7), for `gain` the picture gets darker and redder;
/// for other pipelines only the recorded params change.
fn changed_params(initial: &Value, pipeline: &str) -> Value {
    let mut p = initial.clone();
    if let Some(map) = p.as_object_mut() {
        match pipeline {
            "styletransfer" => {
                map.insert("style".into(), json!(7));
            }
            "gain" => {
                map.insert("gain".into(), json!(0.6));
                map.insert("bias".into(), json!([0.25, 0.0, 0.0]));
            }
            _ => {
                map.insert("demo_change".into(), json!(1));
            }
        }
    }
    p
}

pub async fn run(mut config: Config, seconds: u32, output: &Path) -> anyhow::Result<()> {
    config.embedded_trickle = true;
    if config.auth_token.is_some() || config.api_token.is_some() {
        return Err(anyhow!(
            "rivulet demo runs its own clients without tokens: unset AUTH_TOKEN and RIVULET_API_TOKEN"
        ));
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let running = match crate::serve::start(config.clone()).await {
        Ok(r) => r,
        Err(e) if config.port != 0 => {
            println!("port {} is busy ({e}); using a free port", config.port);
            config.port = 0;
            crate::serve::start(config).await?
        }
        Err(e) => return Err(e),
    };
    let base = running.base_url();
    let trickle = running
        .trickle
        .clone()
        .ok_or_else(|| anyhow!("no embedded trickle server"))?;
    println!(
        "Rivulet demo: pipeline '{}'",
        running.daemon.config.pipeline
    );
    println!("  API and dashboard: {base}/  (live while the demo runs)");

    let http = reqwest::Client::new();
    // Wait for the pipeline to load, as the worker does (GET /health every 500 ms).
    let t0 = now_secs();
    loop {
        let health: Value = http
            .get(format!("{base}/health"))
            .send()
            .await?
            .json()
            .await?;
        match health["status"].as_str() {
            Some("IDLE") | Some("OK") => break,
            Some("ERROR") => return Err(anyhow!("the pipeline failed to load: see the log above")),
            _ if now_secs() - t0 > 180.0 => {
                return Err(anyhow!("the pipeline did not load in 180 s"));
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }

    // Channels are created first, as the orchestrator does.
    let mid = "demo0001";
    let names = [
        (mid.to_string(), "video/MP2T"),
        (format!("{mid}-out"), "video/MP2T"),
        (format!("{mid}-control"), "application/json"),
        (format!("{mid}-events"), "application/json"),
    ];
    for (name, mime) in &names {
        trickle
            .create_channel(name, mime)
            .map_err(|e| anyhow!("cannot create channel {name}: {e}"))?;
    }
    let url = |suffix: &str| running.trickle_url(&format!("{mid}{suffix}"));

    // The gateway's side: control publisher with the initial params, then the input.
    let initial = initial_params(&running.daemon.config.pipeline);
    let mut control = Publisher::new(
        &url("-control"),
        PublisherConfig {
            mime: "application/json".into(),
            ..Default::default()
        },
    )?;
    control.send_message(initial.to_string().into()).await?;

    let frames = seconds * 30;
    // RIVULET_DEMO_VIDEO replaces the generated picture (videotestsrc properties), e.g.
    // `pattern=bar horizontal-speed=4` for a large encoded frame every frame.
    let video = std::env::var("RIVULET_DEMO_VIDEO").unwrap_or_else(|_| {
        "pattern=ball background-color=0xff2a5a8a foreground-color=0xfff0d040 motion=sweep".into()
    });
    let input = gst::parse::launch(&format!(
        "videotestsrc is-live=true {video} num-buffers={frames} ! \
         video/x-raw,width=640,height=360,framerate=30/1 ! tricklesink name=pub url={} \
         audiotestsrc is-live=true wave=sine freq=440 samplesperbuffer=1600 num-buffers={} ! \
         audio/x-raw,rate=48000,channels=2 ! pub.",
        url(""),
        seconds * 30,
    ))
    .context("cannot build the input publisher")?
    .downcast::<gst::Pipeline>()
    .map_err(|_| anyhow!("not a pipeline"))?;

    // The output reader: the processed stream, byte for byte, into a file.
    let reader = gst::parse::launch(&format!(
        "tricklesrc url={} mode=bytes start-seq=0 ! filesink location={}",
        url("-out"),
        output.display()
    ))
    .context("cannot build the output reader")?
    .downcast::<gst::Pipeline>()
    .map_err(|_| anyhow!("not a pipeline"))?;

    // Events subscriber: print what the runner reports.
    let mut events = Subscriber::new(
        &url("-events"),
        SubscriberConfig {
            start_seq: -1,
            ..Default::default()
        },
    )?;
    let events_task = tokio::spawn(async move {
        while let Ok(Some(seg)) = events.next_segment().await {
            if let Ok(body) = seg.read_all(1 << 20).await
                && let Ok(v) = serde_json::from_slice::<Value>(&body)
            {
                let kind = v["event"]["type"].as_str().unwrap_or("?").to_string();
                let state = v["event"]["state"]
                    .as_str()
                    .map(|s| format!(" state={s}"))
                    .unwrap_or_default();
                println!("\n  event: {kind}{state}");
            }
        }
    });

    let start = json!({
        "subscribe_url": url(""), "publish_url": url("-out"),
        "control_url": url("-control"), "events_url": url("-events"),
        "model_id": running.daemon.config.pipeline, "params": initial,
        "gateway_request_id": "demo-request", "manifest_id": mid, "stream_id": "demo-stream",
    });
    let resp = http
        .post(format!("{base}/live-video-to-video"))
        .json(&start)
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(anyhow!(
            "stream start failed: {} {}",
            resp.status(),
            resp.text().await?
        ));
    }
    println!("  stream started through POST /live-video-to-video");
    set_state(&reader, gst::State::Playing).await?;
    set_state(&input, gst::State::Playing).await?;

    let bus = input.bus().ok_or_else(|| anyhow!("no bus"))?;
    let mut changed = false;
    let started = now_secs();
    loop {
        if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Eos, gst::MessageType::Error]) {
            if let gst::MessageView::Error(e) = msg.view() {
                return Err(anyhow!("input publisher failed: {}", e.error()));
            }
            break;
        }
        let elapsed = now_secs() - started;
        if !changed && elapsed > f64::from(seconds) / 2.0 {
            changed = true;
            control
                .send_message(
                    changed_params(&initial, &running.daemon.config.pipeline)
                        .to_string()
                        .into(),
                )
                .await?;
            println!("\n  params changed through the control channel");
        }
        let d: Value = http
            .get(format!("{base}/api/dashboard"))
            .send()
            .await?
            .json()
            .await?;
        print!(
            "\r  t={elapsed:5.1}s state={:<18} in {:5.1} fps  out {:5.1} fps  inference p50 {}  frames {}/{}   ",
            d["status"]["state"].as_str().unwrap_or("?"),
            d["live_input_fps"].as_f64().unwrap_or(0.0),
            d["live_output_fps"].as_f64().unwrap_or(0.0),
            d["latency_p50_ms"]
                .as_f64()
                .map(|v| format!("{v:.2} ms"))
                .unwrap_or("-".into()),
            d["frames_in"],
            d["frames_out"],
        );
        let _ = std::io::stdout().flush();
        if elapsed > f64::from(seconds) + 30.0 {
            return Err(anyhow!("the input did not finish in time"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("\n  input finished; closing the stream");
    set_state(&input, gst::State::Null).await?;
    // The input channel ends: the daemon stops the stream and closes -out; the reader sees EOS.
    trickle.close_channel(mid);
    let rbus = reader.bus().ok_or_else(|| anyhow!("no bus"))?;
    let _ = tokio::task::spawn_blocking(move || {
        rbus.timed_pop_filtered(
            gst::ClockTime::from_seconds(15),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
    })
    .await;
    set_state(&reader, gst::State::Null).await?;
    let _ = control.close().await;
    events_task.abort();
    let status = running.daemon.status();
    let counters = running.daemon.counters();
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    println!(
        "Done: {} frames in, {} real frames out, {} output segments; state {}.",
        counters.frames_in, counters.frames_out, counters.segments_out, status.state
    );
    println!(
        "Output: {} ({size} bytes, MPEG-TS H.264 + Opus; play it with ffplay or vlc)",
        output.display()
    );
    if size == 0 || counters.frames_out == 0 {
        return Err(anyhow!("no output was produced"));
    }
    Ok(())
}
