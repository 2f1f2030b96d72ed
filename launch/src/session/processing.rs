// SPDX-License-Identifier: MPL-2.0
//! What runs in `aipipeline`'s place in a session (a lone `aipipeline` or a stage graph's bin),
//! and the warm-up load that verifies it.

use crate::config::Config;
use crate::graph::{self, BuiltGraph, GraphDef};
use crate::media::{AiSpec, aipipeline, make};
use gst::prelude::*;
use serde_json::Value;
use std::sync::Arc;

/// The daemon's pipeline as a graph when `MODEL_ID` is a graph definition (JSON).
pub fn config_graph(cfg: &Config) -> Result<Option<GraphDef>, String> {
    if !cfg.pipeline.trim_start().starts_with(['[', '{']) {
        return Ok(None);
    }
    let def = graph::parse_str(&cfg.pipeline).map_err(|e| e.to_string())?;
    graph::validate(&def, cfg).map_err(|e| e.to_string())?;
    Ok(Some(def))
}

/// The element in `aipipeline`'s place: a lone `aipipeline` (named `ai`) for a single plain
/// pipeline, else the graph's bin. `batch_group`: the lone `aipipeline`'s `batch-group`.
pub fn make_processing(
    cfg: &Config,
    def: Option<&GraphDef>,
    params: &Value,
    max_restarts: u32,
    batch_group: Option<String>,
) -> Result<(gst::Element, Option<Arc<BuiltGraph>>), String> {
    let single = |name: &str| {
        let spec = AiSpec::from_config(cfg, name)
            .named("ai")
            .params(params)
            .max_restarts(max_restarts)
            .batch_group(batch_group.clone());
        aipipeline(&spec, Some(cfg))
    };
    match def {
        None => Ok((single(&cfg.pipeline)?, None)),
        Some(d) => match d.single_pipeline() {
            Some(name) => Ok((single(name)?, None)),
            None => {
                let g = graph::build(d, cfg, params)?;
                // The stages' children share the session's restart budget; each element may
                // use at most what is left (the session enforces the shared total).
                if cfg.isolation {
                    for ai in g
                        .bin
                        .iterate_all_by_element_factory_name("aipipeline")
                        .into_iter()
                        .flatten()
                    {
                        ai.set_property("max-restarts", max_restarts);
                    }
                }
                Ok((g.bin.clone().upcast(), Some(Arc::new(g))))
            }
        },
    }
}

/// Verifies that the pipeline loads with `params`: a few frames through `aipipeline`.
pub fn warm_up(cfg: &Config, params: &Value) -> Result<(), String> {
    let pipeline = gst::Pipeline::new();
    let src = make("videotestsrc", None)?;
    src.set_property("num-buffers", 2i32);
    let caps = make("capsfilter", None)?;
    caps.set_property(
        "caps",
        gst::Caps::builder("video/x-raw")
            .field("format", "RGB")
            .field("width", 64i32)
            .field("height", 64i32)
            .build(),
    );
    let def = config_graph(cfg)?;
    let params = super::stream::pipeline_params(params);
    let (ai, _graph) = make_processing(cfg, def.as_ref(), &params, 0, None)?;
    let sink = make("fakesink", None)?;
    pipeline
        .add_many([&src, &caps, &ai, &sink])
        .map_err(|e| e.to_string())?;
    gst::Element::link_many([&src, &caps, &ai, &sink]).map_err(|e| e.to_string())?;
    let result = (|| {
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|_| "the pipeline refused to start".to_string())?;
        let bus = pipeline.bus().ok_or("no bus")?;
        match bus.timed_pop_filtered(
            gst::ClockTime::from_seconds(180),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        ) {
            Some(msg) => match msg.view() {
                gst::MessageView::Error(e) => Err(e.error().to_string()),
                _ => Ok(()),
            },
            None => Err("loading took more than 180 s".into()),
        }
    })();
    let _ = pipeline.set_state(gst::State::Null);
    result
}
