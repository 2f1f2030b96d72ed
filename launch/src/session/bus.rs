// SPDX-License-Identifier: MPL-2.0
//! A session's bus watch: what the stream's elements post becomes the session's state and
//! events.

use super::Session;
use super::stream::StartRequest;
use crate::graph;
use crate::status::{ms, now_secs};
use gst::prelude::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::task::JoinHandle;

/// Watches the stream's bus: input EOS or a fatal error ends the stream; warnings and errors
/// from `aipipeline` become `error` events; segment messages drive the stream-trace events.
pub(super) fn spawn_bus_watch(
    session: Arc<Session>,
    pipeline: &gst::Pipeline,
    req: &StartRequest,
    stopping: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    use futures::StreamExt;
    let bus = pipeline.bus()?;
    let request_id = req.request_id.clone();
    let src_el = pipeline.by_name("src");
    let ai_el = pipeline
        .by_name("ai")
        .or_else(|| pipeline.by_name(graph::BIN_NAME));
    // Whether a message comes from `el` or one of its children.
    let is_from = |msg: &gst::Message, el: &Option<gst::Element>| {
        msg.src()
            .zip(el.as_ref())
            .is_some_and(|(o, e)| o == e.upcast_ref::<gst::Object>() || o.has_as_ancestor(e))
    };
    Some(tokio::spawn(async move {
        let mut messages = bus.stream();
        let mut first_in = true;
        let mut first_out = true;
        let mut queue_drops = crate::metrics::QueueDrops::default();
        while let Some(msg) = messages.next().await {
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            let from = msg
                .src()
                .map(|s| s.path_string().to_string())
                .unwrap_or_default();
            match msg.view() {
                gst::MessageView::Eos(_) => {
                    tracing::info!("input ended (EOS)");
                    let d = session.clone();
                    let id = request_id.clone();
                    tokio::spawn(async move { d.stream_ended(&id, "input ended").await });
                    return;
                }
                gst::MessageView::Error(e) => {
                    let text = format!("{} ({from})", e.error());
                    tracing::error!("stream error: {text}; debug: {:?}", e.debug());
                    report_stage_error(&session, &msg, &e.error().to_string());
                    if is_from(&msg, &ai_el) {
                        session.report_error(&text);
                        if text.contains("inference child crashed") {
                            // Restart limit reached: permanent ERROR (docs/runner.md, "Restarts
                            // and restart policy").
                            session.on_child_limit();
                        }
                    } else {
                        // The elements' own words are in the debug text's last line.
                        let detail = e
                            .debug()
                            .and_then(|d| d.rsplit(":\n").next().map(str::to_owned));
                        session.report_stream_error(&match detail {
                            Some(d) => format!("{text}: {d}"),
                            None => text.clone(),
                        });
                    }
                    let d = session.clone();
                    let id = request_id.clone();
                    tokio::spawn(async move { d.stream_ended(&id, "pipeline error").await });
                    return;
                }
                gst::MessageView::Warning(w) => {
                    let text = w.error().to_string();
                    tracing::warn!("{from}: {text} ({:?})", w.debug());
                    if w.details()
                        .is_some_and(|d| d.name() == gstaipipeline::UNKNOWN_PARAMS_WARNING)
                    {
                        // Accepted params with keys the pipeline ignores: the last warning in
                        // the status, not an error (no `error` event, no effect on health).
                        let text = match msg.src().and_then(graph::stage_of) {
                            Some(stage) => format!("stage {stage}: {text}"),
                            None => text,
                        };
                        session.report_warning(&text);
                        continue;
                    }
                    report_stage_error(&session, &msg, &text);
                    if is_from(&msg, &ai_el) {
                        session.report_error(&text);
                    }
                }
                gst::MessageView::Element(m) => {
                    if let Some(event) = graph::stage_event(&msg) {
                        session.feed.send_typed(event.clone());
                        session.emit(event, "ai_stream_events");
                        continue;
                    }
                    let Some(s) = m.structure() else { continue };
                    if s.name() == super::stream::DATA_MESSAGE {
                        // A pipeline's or stage's own item for the data channel.
                        if let Ok(text) = s.get::<String>("json") {
                            session.publish_data(
                                serde_json::from_str(&text).unwrap_or(Value::String(text)),
                            );
                        }
                        continue;
                    }
                    if s.name() == "trickle-segment" {
                        let input = is_from(&msg, &src_el);
                        session.on_segment(input);
                        let now = ms(now_secs());
                        if input && first_in {
                            first_in = false;
                            session.emit(
                                json!({"type": "runner_receive_first_ingest_segment", "timestamp": now}),
                                "stream_trace",
                            );
                        } else if !input && first_out {
                            first_out = false;
                            session.emit(
                                json!({"type": "runner_send_first_processed_segment", "timestamp": now}),
                                "stream_trace",
                            );
                        }
                    } else if s.name() == gstaipipeline::RESTART_MESSAGE && is_from(&msg, &ai_el) {
                        let reason = s.get::<String>("reason").unwrap_or_default();
                        let logs = s.get::<String>("logs").unwrap_or_default();
                        // A graph stage's child names its stage.
                        let stage = msg.src().and_then(graph::stage_of);
                        session.on_child_restart(&request_id, stage.as_deref(), &reason, &logs);
                    } else if s.name() == gstaipipeline::STATS_MESSAGE {
                        let stage = msg.src().and_then(graph::stage_of);
                        session.metrics.on_aipipeline_stats(
                            &mut queue_drops,
                            &session.labels(),
                            &from,
                            stage.as_deref(),
                            s,
                        );
                        if let Ok(p50) = s.get::<f64>("inference-latency-p50-ms") {
                            session.set_latency_p50(p50);
                        }
                    }
                }
                _ => {}
            }
        }
    }))
}

/// A warning or error from inside a stage of the graph: a `stage_error` event (events channel
/// and feed) and the stage's `last_error`.
fn report_stage_error(session: &Session, msg: &gst::Message, text: &str) {
    let Some(stage) = msg.src().and_then(graph::stage_of) else {
        return;
    };
    if let Some(g) = session.graph() {
        g.record_error(&stage, text);
    }
    let event = json!({"type": "stage_error", "stage": stage, "error": text});
    session.feed.send_typed(event.clone());
    session.emit(event, "ai_stream_events");
}
