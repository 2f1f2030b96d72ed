// SPDX-License-Identifier: MPL-2.0
//! Building a [`GraphDef`] into a `gst::Bin`.
//!
//! ```text
//! sink ─ [tee] ─ queue ─ stage a ─ [tee] ─ queue ─ stage b ──────────┐
//!                 └──── queue ─ stage c ──────────────────────────────┴─ compositor ─ src
//! stage with "when":  tee ─ queue ─ valve ─ stage ─┐
//!                      └─── queue (bypass) ────────┴─ input-selector
//! ```
//! Conditions switch the valve and the selector live (no restart); the stage gets no frames
//! while bypassed, so a bypassed model costs nothing. A stage with several inputs, and the
//! graph's output when several stages feed nothing, get their inputs side by side.

use super::cond::Cond;
use super::stage::Stage;
use super::{GraphDef, INPUT, topo_order};
use crate::config::Config;
pub(super) use crate::media::make;
use gst::prelude::*;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One stage's state and figures, as in `/api/status` and `stage_stats` events.
#[derive(Debug, Clone, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct StageStats {
    pub id: String,
    /// `starting`, `running`, `bypassed`, `failed`.
    pub state: String,
    /// The provider in service (see [`Provider::describe`](super::Provider::describe)).
    pub provider: String,
    /// Output frames per second over the last second.
    pub fps: f64,
    /// Per-frame processing time (p50 over recent frames), for pipeline stages.
    pub latency_ms: Option<f64>,
    pub frames_in: u64,
    pub frames_out: u64,
    /// Frames that missed the stage's deadline and passed on unchanged.
    pub deadline_misses: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// The live switch of a stage with a condition.
struct Bypass {
    cond: Cond,
    valve: gst::Element,
    selector: gst::Element,
    stage_pad: gst::Pad,
    bypass_pad: gst::Pad,
}

/// A built graph: a bin with ghost pads `sink` and `src` (raw video) to put in a pipeline.
pub struct BuiltGraph {
    pub bin: gst::Bin,
    stages: Vec<(Arc<Stage>, Option<Bypass>)>,
    params: Mutex<Value>,
}

impl BuiltGraph {
    /// Applies new stream params live: re-evaluates every stage's condition and hands each
    /// pipeline stage its params (its definition's, overridden key by key by the stream's
    /// `params.<stage id>` object).
    pub fn set_params(&self, params: &Value) {
        *self.params.lock().unwrap() = params.clone();
        for (stage, bypass) in &self.stages {
            stage.set_stream_params(params);
            if let Some(b) = bypass {
                let on = b.cond.eval(params);
                apply_bypass(b, on);
                stage.set_bypassed(!on);
            }
        }
    }

    /// Every stage's state and figures, in definition order.
    pub fn stats(&self) -> Vec<StageStats> {
        self.stages.iter().map(|(s, _)| s.stats()).collect()
    }

    /// Records a warning or error seen on the bus for stage `id` (its `last_error`).
    pub fn record_error(&self, id: &str, error: &str) {
        if let Some((s, _)) = self.stages.iter().find(|(s, _)| s.id() == id) {
            s.record_error(error);
        }
    }

    /// The stream params last applied.
    pub fn params(&self) -> Value {
        self.params.lock().unwrap().clone()
    }
}

fn apply_bypass(b: &Bypass, on: bool) {
    // Open the way to the stage before selecting it, close it after selecting the bypass.
    if on {
        b.valve.set_property("drop", false);
        b.selector.set_property("active-pad", &b.stage_pad);
    } else {
        b.selector.set_property("active-pad", &b.bypass_pad);
        b.valve.set_property("drop", true);
    }
}

/// A bounded, blocking queue (frames are never dropped here; `aipipeline` drops late ones).
fn queue() -> Result<gst::Element, String> {
    let q = make("queue", None)?;
    q.set_property("max-size-buffers", 3u32);
    q.set_property("max-size-bytes", 0u32);
    q.set_property("max-size-time", 0u64);
    Ok(q)
}

/// Where a stage's output (or the graph input) can be taken from, once per consumer.
struct Source {
    pad: gst::Pad,
    consumers: usize,
    tee: Option<gst::Element>,
}

impl Source {
    /// A src pad for one more consumer: the pad itself, or a tee branch with its queue.
    fn take(&mut self, bin: &gst::Bin) -> Result<gst::Pad, String> {
        if self.consumers <= 1 {
            return Ok(self.pad.clone());
        }
        let tee = match &self.tee {
            Some(t) => t.clone(),
            None => {
                let t = make("tee", None)?;
                bin.add(&t).map_err(|e| e.to_string())?;
                let sink = t.static_pad("sink").ok_or("tee without sink pad")?;
                self.pad
                    .link(&sink)
                    .map_err(|e| format!("tee link: {e:?}"))?;
                self.tee = Some(t.clone());
                t
            }
        };
        let q = queue()?;
        bin.add(&q).map_err(|e| e.to_string())?;
        tee.link(&q).map_err(|e| format!("tee branch: {e}"))?;
        q.static_pad("src")
            .ok_or_else(|| "queue without src pad".into())
    }
}

/// Side by side: a compositor whose inputs are placed left to right as their caps arrive.
fn side_by_side(bin: &gst::Bin, inputs: Vec<gst::Pad>) -> Result<gst::Pad, String> {
    let comp = make("compositor", None)?;
    comp.set_property_from_str("background", "black");
    // Output from the first input's time on (not from 0: input PTS are kept, not rebased).
    comp.set_property_from_str("start-time-selection", "first");
    let caps = make("capsfilter", None)?;
    caps.set_property(
        "caps",
        gst::Caps::builder("video/x-raw")
            .field("format", "RGB")
            .build(),
    );
    bin.add_many([&comp, &caps]).map_err(|e| e.to_string())?;
    comp.link(&caps).map_err(|e| e.to_string())?;
    // Each input's pad and the width its caps gave (0 until they come). Widths are recorded
    // here, in the probe, under the lock: reading the other pads' current caps instead raced
    // with their own caps events (two inputs' caps at once could both be placed at x = 0).
    let pads: Arc<Mutex<Vec<(gst::Pad, i32)>>> = Arc::new(Mutex::new(Vec::new()));
    for src in inputs {
        let q = queue()?;
        bin.add(&q).map_err(|e| e.to_string())?;
        src.link(&q.static_pad("sink").ok_or("queue without sink pad")?)
            .map_err(|e| format!("{e:?}"))?;
        let pad = comp
            .request_pad_simple("sink_%u")
            .ok_or("compositor refused a sink pad")?;
        q.static_pad("src")
            .ok_or("queue without src pad")?
            .link(&pad)
            .map_err(|e| format!("{e:?}"))?;
        pads.lock().unwrap().push((pad.clone(), 0));
        let all = pads.clone();
        pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |this, info| {
            if let Some(gst::PadProbeData::Event(ev)) = &info.data
                && let gst::EventView::Caps(c) = ev.view()
            {
                // Left to right in input order; inputs whose caps are not known yet count 0
                // and move the others when their caps arrive. The caps event passes after
                // this, so the compositor renegotiates its size with these places.
                let mut all = all.lock().unwrap();
                let mut x = 0i32;
                for (p, width) in all.iter_mut() {
                    if p == this {
                        *width = width_of(c.caps());
                    }
                    p.set_property("xpos", x);
                    x += *width;
                }
            }
            gst::PadProbeReturn::Ok
        });
    }
    caps.static_pad("src")
        .ok_or_else(|| "capsfilter without src pad".into())
}

fn width_of(caps: &gst::CapsRef) -> i32 {
    caps.structure(0)
        .and_then(|s| s.get::<i32>("width").ok())
        .unwrap_or(0)
}

/// Builds `def` (validate it first) with the stream's initial `params`. Pipeline stages try
/// their providers in order until one loads.
pub fn build(def: &GraphDef, cfg: &Config, params: &Value) -> Result<BuiltGraph, String> {
    let order = topo_order(def).map_err(|e| e.to_string())?;
    let bin = gst::Bin::with_name(super::BIN_NAME);
    // How many consumers each source has (stage ids, INPUT, and the graph output).
    let mut consumers: HashMap<&str, usize> = HashMap::new();
    for s in &def.stages {
        for i in &s.inputs {
            *consumers.entry(i.as_str()).or_default() += 1;
        }
    }
    let outputs = def.outputs();
    for o in &outputs {
        *consumers.entry(o).or_default() += 1;
    }
    let input_queue = queue()?;
    bin.add(&input_queue).map_err(|e| e.to_string())?;
    let ghost_sink = gst::GhostPad::builder_with_target(
        &input_queue
            .static_pad("sink")
            .ok_or("queue without sink pad")?,
    )
    .map_err(|e| e.to_string())?
    .name("sink")
    .build();
    let mut sources: HashMap<String, Source> = HashMap::new();
    sources.insert(
        INPUT.to_string(),
        Source {
            pad: input_queue
                .static_pad("src")
                .ok_or("queue without src pad")?,
            consumers: consumers.get(INPUT).copied().unwrap_or(0),
            tee: None,
        },
    );
    let mut stages: Vec<Option<(Arc<Stage>, Option<Bypass>)>> = vec![];
    stages.resize_with(def.stages.len(), || None);
    for &i in &order {
        let s = &def.stages[i];
        let mut ins = Vec::new();
        for input in &s.inputs {
            let src = sources
                .get_mut(input)
                .ok_or_else(|| format!("stage '{}': input '{input}' is not built", s.id))?;
            ins.push(src.take(&bin)?);
        }
        let in_pad = if ins.len() == 1 {
            ins.remove(0)
        } else {
            side_by_side(&bin, ins)?
        };
        let stage = Stage::new(s, cfg, params)?;
        bin.add(stage.bin()).map_err(|e| e.to_string())?;
        let stage_sink = stage.bin().static_pad("sink").ok_or("stage without sink")?;
        let stage_src = stage.bin().static_pad("src").ok_or("stage without src")?;
        let (out_pad, bypass) = match &s.when {
            None => {
                in_pad
                    .link(&stage_sink)
                    .map_err(|e| format!("stage '{}': {e:?}", s.id))?;
                (stage_src, None)
            }
            Some(when) => {
                let cond = super::cond::parse(when)
                    .map_err(|e| format!("stage '{}': condition: {e}", s.id))?;
                let tee = make("tee", None)?;
                let q_stage = queue()?;
                let q_bypass = queue()?;
                let valve = make("valve", None)?;
                let selector = make("input-selector", None)?;
                selector.set_property("sync-streams", false);
                selector.set_property("cache-buffers", false);
                bin.add_many([&tee, &q_stage, &q_bypass, &valve, &selector])
                    .map_err(|e| e.to_string())?;
                in_pad
                    .link(&tee.static_pad("sink").ok_or("tee without sink")?)
                    .map_err(|e| format!("{e:?}"))?;
                gst::Element::link_many([&tee, &q_stage, &valve]).map_err(|e| e.to_string())?;
                valve
                    .static_pad("src")
                    .ok_or("valve without src")?
                    .link(&stage_sink)
                    .map_err(|e| format!("{e:?}"))?;
                tee.link(&q_bypass).map_err(|e| e.to_string())?;
                let stage_pad = selector
                    .request_pad_simple("sink_%u")
                    .ok_or("input-selector refused a pad")?;
                let bypass_pad = selector
                    .request_pad_simple("sink_%u")
                    .ok_or("input-selector refused a pad")?;
                stage_src.link(&stage_pad).map_err(|e| format!("{e:?}"))?;
                q_bypass
                    .static_pad("src")
                    .ok_or("queue without src")?
                    .link(&bypass_pad)
                    .map_err(|e| format!("{e:?}"))?;
                let b = Bypass {
                    cond,
                    valve,
                    selector: selector.clone(),
                    stage_pad,
                    bypass_pad,
                };
                let on = b.cond.eval(params);
                apply_bypass(&b, on);
                stage.set_bypassed(!on);
                (
                    selector.static_pad("src").ok_or("selector without src")?,
                    Some(b),
                )
            }
        };
        sources.insert(
            s.id.clone(),
            Source {
                pad: out_pad,
                consumers: consumers.get(s.id.as_str()).copied().unwrap_or(0),
                tee: None,
            },
        );
        stages[i] = Some((stage, bypass));
    }
    let mut outs = Vec::new();
    for o in &outputs {
        let src = sources
            .get_mut(*o)
            .ok_or_else(|| format!("output '{o}' is not built"))?;
        outs.push(src.take(&bin)?);
    }
    let out_pad = if outs.len() == 1 {
        outs.remove(0)
    } else {
        side_by_side(&bin, outs)?
    };
    let ghost_src = gst::GhostPad::builder_with_target(&out_pad)
        .map_err(|e| e.to_string())?
        .name("src")
        .build();
    bin.add_pad(&ghost_sink).map_err(|e| e.to_string())?;
    bin.add_pad(&ghost_src).map_err(|e| e.to_string())?;
    let stages = stages.into_iter().flatten().collect();
    Ok(BuiltGraph {
        bin,
        stages,
        params: Mutex::new(params.clone()),
    })
}
