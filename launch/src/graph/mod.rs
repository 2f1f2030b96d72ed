// SPDX-License-Identifier: MPL-2.0
//! Multi-stage pipeline graphs (README.md, "Multi-stage pipelines (stage graphs)"; issue #9).
//!
//! A definition is one of:
//! - a pipeline name: `"gain"` (one stage);
//! - a list of stages, run in sequence: `["gain", {"pipeline": "invert"}]`;
//! - `{"stages": [...]}`: stages with `id`, `pipeline` or `element`, `params`, `inputs` (stage
//!   ids, or `"input"` for the graph's input; omitted: the previous stage), `when` (a condition
//!   on the stream's params, see [`cond`]), `deadline_ms` and `providers` (failover order).
//!
//! Stages fed by the same stage run in parallel branches (tee + queues). A stage with several
//! inputs, and the graph's output when several stages feed nothing, get their inputs side by
//! side in one picture (left to right in the order given): the multi-model comparison.
//!
//! [`parse`] checks the shape, [`validate`] everything that can be checked before anything runs
//! (references, duplicates, cycles, unknown pipelines or elements, caps between stages,
//! conditions, stage params), and [`build`] makes a `gst::Bin` with ghost pads `sink` and `src`
//! (raw video) that replaces the single `aipipeline` of a stream.

pub mod cond;

mod build;
mod stage;
mod stagebin;

pub use build::{BuiltGraph, StageStats, build};

use crate::config::Config;
use gst::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Name of the bin [`build`] makes (unique in a stream pipeline).
pub const BIN_NAME: &str = "graph";

/// The reserved input name for the graph's own input.
pub const INPUT: &str = "input";

/// Structure name of the element messages the graph posts on the bus (field `json`: the event
/// as a JSON string, see [`stage_event`]). Event types: `stage_start`, `stage_stats`,
/// `stage_error`, `stage_failover`.
pub const STAGE_MESSAGE: &str = "rivulet-stage";

/// A validated-shape pipeline graph. Serialises to the `{"stages": [...]}` form, with every
/// stage's `id` and `inputs` explicit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphDef {
    pub stages: Vec<StageDef>,
}

/// One stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageDef {
    pub id: String,
    /// An `aipipeline` pipeline name (`noop`, `torchscript`, or a manifest's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// A GStreamer element factory name (a raw-video filter with one sink and one src pad).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub element: Option<String>,
    /// Stage params: the `params` of an `aipipeline` stage (the stream's `params.<id>` object,
    /// when there is one, overrides them key by key), or properties of an element stage.
    #[serde(default = "empty_object", skip_serializing_if = "is_empty_object")]
    pub params: Value,
    /// Stage ids or [`INPUT`]; after [`parse`], always explicit.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Bypass condition: the stage runs only while it holds (e.g. `params.enhance == true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// A frame that waited longer than this for the stage passes on unchanged (counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u32>,
    /// Alternatives after `pipeline`/`element`, in failover order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<Provider>,
}

/// One way to run a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provider {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub element: Option<String>,
    /// `aipipeline` device (`auto`, `cpu`, `cuda`, `cuda:N`); default: the daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl Provider {
    /// `pipeline NAME [on DEVICE]` or `element NAME`.
    pub fn describe(&self) -> String {
        match (&self.pipeline, &self.element) {
            (Some(p), _) => match &self.device {
                Some(d) => format!("{p} on {d}"),
                None => p.clone(),
            },
            (None, Some(e)) => format!("element {e}"),
            (None, None) => "nothing".into(),
        }
    }
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn is_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.is_empty())
}

impl StageDef {
    /// The stage's providers in failover order: its own `pipeline`/`element` first.
    pub fn providers_in_order(&self) -> Vec<Provider> {
        let mut v = Vec::new();
        if self.pipeline.is_some() || self.element.is_some() {
            v.push(Provider {
                pipeline: self.pipeline.clone(),
                element: self.element.clone(),
                device: None,
            });
        }
        v.extend(self.providers.iter().cloned());
        v
    }
}

impl GraphDef {
    /// The pipeline name when the graph is a single plain pipeline stage (no condition,
    /// deadline, failover or stage params): the stream then runs exactly as without a graph.
    pub fn single_pipeline(&self) -> Option<&str> {
        match self.stages.as_slice() {
            [s] if s.when.is_none()
                && s.deadline_ms.is_none()
                && s.providers.is_empty()
                && s.element.is_none()
                && is_empty_object(&s.params) =>
            {
                s.pipeline.as_deref()
            }
            _ => None,
        }
    }

    /// Stage ids whose output nothing consumes: the graph's output, left to right.
    pub fn outputs(&self) -> Vec<&str> {
        let used: HashSet<&str> = self
            .stages
            .iter()
            .flat_map(|s| s.inputs.iter().map(String::as_str))
            .collect();
        self.stages
            .iter()
            .map(|s| s.id.as_str())
            .filter(|id| !used.contains(id))
            .collect()
    }
}

/// Why a definition is rejected. Every message names the stage concerned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GraphError {
    #[error("invalid pipeline definition: {0}")]
    Syntax(String),
    #[error("the pipeline definition has no stages")]
    Empty,
    #[error("stage {index} ('{stage}'): {msg}")]
    Stage {
        index: usize,
        stage: String,
        msg: String,
    },
    #[error("stage '{0}' is defined twice (stage ids must be unique)")]
    Duplicate(String),
    #[error(
        "stage '{stage}' takes its input from '{input}', which is not a stage id nor \"input\""
    )]
    UnknownInput { stage: String, input: String },
    #[error("stages form a cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
    #[error(
        "stage '{stage}': unknown pipeline '{name}' (known pipelines: {known}; directories searched, in order: {searched})"
    )]
    UnknownPipeline {
        stage: String,
        name: String,
        known: String,
        searched: String,
    },
    #[error(
        "stage '{stage}': unknown element '{name}' (no such GStreamer element; is its plugin installed?)"
    )]
    UnknownElement { stage: String, name: String },
    #[error("stage '{stage}' cannot take the output of '{from}': {detail}")]
    Caps {
        stage: String,
        from: String,
        detail: String,
    },
    #[error("stage '{stage}': invalid condition '{when}': {msg}")]
    Condition {
        stage: String,
        when: String,
        msg: String,
    },
    #[error("stage '{stage}': {msg}")]
    Invalid { stage: String, msg: String },
}

fn stage_err(index: usize, stage: &str, msg: impl Into<String>) -> GraphError {
    GraphError::Stage {
        index,
        stage: stage.to_string(),
        msg: msg.into(),
    }
}

/// Parses a definition (JSON value): a pipeline name, a list of stages, or `{"stages": [...]}`.
/// Checks the shape only; see [`validate`].
pub fn parse(value: &Value) -> Result<GraphDef, GraphError> {
    let (items, sequential) = match value {
        Value::String(name) => {
            if name.trim().is_empty() {
                return Err(GraphError::Syntax("the pipeline name is empty".into()));
            }
            (vec![Value::String(name.clone())], true)
        }
        Value::Array(a) => (a.clone(), true),
        Value::Object(o) => match o.get("stages") {
            Some(Value::Array(a)) => {
                if let Some(k) = o.keys().find(|k| *k != "stages") {
                    return Err(GraphError::Syntax(format!(
                        "unknown key '{k}' (a graph is {{\"stages\": [...]}})"
                    )));
                }
                (a.clone(), false)
            }
            Some(_) => return Err(GraphError::Syntax("\"stages\" must be a list".into())),
            None => {
                return Err(GraphError::Syntax(
                    "an object definition needs \"stages\": [...]".into(),
                ));
            }
        },
        other => {
            return Err(GraphError::Syntax(format!(
                "expected a pipeline name, a list of stages or {{\"stages\": [...]}}, got {}",
                kind_of(other)
            )));
        }
    };
    if items.is_empty() {
        return Err(GraphError::Empty);
    }
    let mut stages: Vec<StageDef> = Vec::with_capacity(items.len());
    let mut explicit_inputs: Vec<bool> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let (stage, explicit) = parse_stage(i, item)?;
        stages.push(stage);
        explicit_inputs.push(explicit);
    }
    // Ids: explicit ones first (duplicates are an error), then generated ones that avoid them.
    let mut taken: HashSet<String> = HashSet::new();
    for s in stages.iter().filter(|s| !s.id.is_empty()) {
        if s.id == INPUT {
            return Err(GraphError::Invalid {
                stage: s.id.clone(),
                msg: "\"input\" is reserved for the graph's input; choose another id".into(),
            });
        }
        if !taken.insert(s.id.clone()) {
            return Err(GraphError::Duplicate(s.id.clone()));
        }
    }
    for s in stages.iter_mut().filter(|s| s.id.is_empty()) {
        let base = s
            .pipeline
            .clone()
            .or_else(|| s.element.clone())
            .or_else(|| {
                s.providers
                    .first()
                    .and_then(|p| p.pipeline.clone().or_else(|| p.element.clone()))
            })
            .unwrap_or_else(|| "stage".into());
        let mut id = base.clone();
        let mut n = 2;
        while taken.contains(&id) || id == INPUT {
            id = format!("{base}-{n}");
            n += 1;
        }
        taken.insert(id.clone());
        s.id = id;
    }
    // Inputs: omitted means the previous stage (the graph input for the first).
    for i in 0..stages.len() {
        if sequential && explicit_inputs[i] {
            return Err(stage_err(
                i,
                &stages[i].id,
                "\"inputs\" needs the {\"stages\": [...]} form (a plain list runs in sequence)",
            ));
        }
        if !explicit_inputs[i] {
            stages[i].inputs = vec![if i == 0 {
                INPUT.to_string()
            } else {
                stages[i - 1].id.clone()
            }];
        }
    }
    Ok(GraphDef { stages })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn opt_string(
    i: usize,
    id: &str,
    o: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<String>, GraphError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(stage_err(i, id, format!("\"{key}\" is empty"))),
        Some(v) => Err(stage_err(
            i,
            id,
            format!("\"{key}\" must be a string, got {}", kind_of(v)),
        )),
    }
}

fn parse_provider(i: usize, id: &str, v: &Value) -> Result<Provider, GraphError> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Ok(Provider {
            pipeline: Some(s.clone()),
            element: None,
            device: None,
        }),
        Value::Object(o) => {
            if let Some(k) = o
                .keys()
                .find(|k| !matches!(k.as_str(), "pipeline" | "element" | "device"))
            {
                return Err(stage_err(
                    i,
                    id,
                    format!("unknown provider key '{k}' (pipeline, element, device)"),
                ));
            }
            let p = Provider {
                pipeline: opt_string(i, id, o, "pipeline")?,
                element: opt_string(i, id, o, "element")?,
                device: opt_string(i, id, o, "device")?,
            };
            match (&p.pipeline, &p.element) {
                (Some(_), Some(_)) | (None, None) => Err(stage_err(
                    i,
                    id,
                    "a provider names exactly one of \"pipeline\" or \"element\"",
                )),
                (None, Some(_)) if p.device.is_some() => Err(stage_err(
                    i,
                    id,
                    "\"device\" applies to pipeline providers only",
                )),
                _ => Ok(p),
            }
        }
        other => Err(stage_err(
            i,
            id,
            format!(
                "a provider is a pipeline name or {{\"pipeline\"|\"element\", \"device\"}}, got {}",
                kind_of(other)
            ),
        )),
    }
}

/// Parses one stage; returns it and whether `inputs` was given.
fn parse_stage(i: usize, item: &Value) -> Result<(StageDef, bool), GraphError> {
    let o = match item {
        Value::String(name) if !name.trim().is_empty() => {
            return Ok((
                StageDef {
                    id: String::new(),
                    pipeline: Some(name.clone()),
                    element: None,
                    params: empty_object(),
                    inputs: Vec::new(),
                    when: None,
                    deadline_ms: None,
                    providers: Vec::new(),
                },
                false,
            ));
        }
        Value::Object(o) => o,
        other => {
            return Err(stage_err(
                i,
                "",
                format!(
                    "a stage is a pipeline name or an object, got {}",
                    kind_of(other)
                ),
            ));
        }
    };
    let id = opt_string(i, "", o, "id")?.unwrap_or_default();
    const KEYS: [&str; 8] = [
        "id",
        "pipeline",
        "element",
        "params",
        "inputs",
        "when",
        "deadline_ms",
        "providers",
    ];
    if let Some(k) = o.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(stage_err(
            i,
            &id,
            format!("unknown key '{k}' (known: {})", KEYS.join(", ")),
        ));
    }
    if id.contains(['.', ' ']) {
        return Err(stage_err(i, &id, "a stage id cannot contain '.' or spaces"));
    }
    let pipeline = opt_string(i, &id, o, "pipeline")?;
    let element = opt_string(i, &id, o, "element")?;
    if pipeline.is_some() && element.is_some() {
        return Err(stage_err(
            i,
            &id,
            "give \"pipeline\" or \"element\", not both",
        ));
    }
    let params = match o.get("params") {
        None | Some(Value::Null) => empty_object(),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(v) => {
            return Err(stage_err(
                i,
                &id,
                format!("\"params\" must be an object, got {}", kind_of(v)),
            ));
        }
    };
    let (inputs, explicit) = match o.get("inputs") {
        None | Some(Value::Null) => (Vec::new(), false),
        Some(Value::String(s)) => (vec![s.clone()], true),
        Some(Value::Array(a)) => {
            let mut v = Vec::new();
            for x in a {
                match x {
                    Value::String(s) => v.push(s.clone()),
                    other => {
                        return Err(stage_err(
                            i,
                            &id,
                            format!("\"inputs\" lists stage ids, got {}", kind_of(other)),
                        ));
                    }
                }
            }
            if v.is_empty() {
                return Err(stage_err(i, &id, "\"inputs\" is empty"));
            }
            (v, true)
        }
        Some(v) => {
            return Err(stage_err(
                i,
                &id,
                format!("\"inputs\" must be a list of stage ids, got {}", kind_of(v)),
            ));
        }
    };
    let when = opt_string(i, &id, o, "when")?;
    let deadline_ms = match o.get("deadline_ms") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(ms) if ms > 0 && ms <= u32::MAX as u64 => Some(ms as u32),
            _ => {
                return Err(stage_err(
                    i,
                    &id,
                    format!("\"deadline_ms\" must be a positive integer, got {n}"),
                ));
            }
        },
        Some(v) => {
            return Err(stage_err(
                i,
                &id,
                format!("\"deadline_ms\" must be a number, got {}", kind_of(v)),
            ));
        }
    };
    let providers = match o.get("providers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| parse_provider(i, &id, p))
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(stage_err(
                i,
                &id,
                format!("\"providers\" must be a list, got {}", kind_of(v)),
            ));
        }
    };
    if pipeline.is_none() && element.is_none() && providers.is_empty() {
        return Err(stage_err(
            i,
            &id,
            "a stage needs \"pipeline\", \"element\" or \"providers\"",
        ));
    }
    Ok((
        StageDef {
            id,
            pipeline,
            element,
            params,
            inputs,
            when,
            deadline_ms,
            providers,
        },
        explicit,
    ))
}

/// Parses a YAML definition (same shapes as [`parse`]).
pub fn parse_yaml(text: &str) -> Result<GraphDef, GraphError> {
    let value: Value = serde_norway::from_str(text)
        .map_err(|e| GraphError::Syntax(format!("not valid YAML: {e}")))?;
    parse(&value)
}

/// Reads a definition file: YAML (`.yaml`, `.yml`) or JSON (anything else; JSON is YAML too,
/// so a file of either kind parses whatever its name).
pub fn parse_file(path: &std::path::Path) -> Result<GraphDef, GraphError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| GraphError::Syntax(format!("cannot read {}: {e}", path.display())))?;
    let yaml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    if yaml {
        return parse_yaml(&text);
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(v) => parse(&v),
        Err(_) => parse_yaml(&text),
    }
}

/// Parses a definition given as text: JSON when it starts with `[`, `{` or `"`, otherwise a
/// pipeline name (the `MODEL_ID` setting, a start request's `pipeline` string).
pub fn parse_str(text: &str) -> Result<GraphDef, GraphError> {
    let t = text.trim();
    if t.starts_with(['[', '{', '"']) {
        let v: Value = serde_json::from_str(t)
            .map_err(|e| GraphError::Syntax(format!("not valid JSON: {e}")))?;
        parse(&v)
    } else {
        parse(&Value::String(t.to_string()))
    }
}

/// The stage ids in an order where every stage comes after its inputs, or the cycle.
pub(crate) fn topo_order(def: &GraphDef) -> Result<Vec<usize>, GraphError> {
    let index: HashMap<&str, usize> = def
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    // 0 = unvisited, 1 = on the stack, 2 = done.
    let mut mark = vec![0u8; def.stages.len()];
    let mut order = Vec::with_capacity(def.stages.len());
    fn visit(
        i: usize,
        def: &GraphDef,
        index: &HashMap<&str, usize>,
        mark: &mut [u8],
        stack: &mut Vec<usize>,
        order: &mut Vec<usize>,
    ) -> Result<(), GraphError> {
        match mark[i] {
            2 => return Ok(()),
            1 => {
                let start = stack.iter().position(|&s| s == i).unwrap_or(0);
                let mut cycle: Vec<String> = stack[start..]
                    .iter()
                    .map(|&s| def.stages[s].id.clone())
                    .collect();
                cycle.push(def.stages[i].id.clone());
                return Err(GraphError::Cycle(cycle));
            }
            _ => {}
        }
        mark[i] = 1;
        stack.push(i);
        for input in &def.stages[i].inputs {
            if let Some(&j) = index.get(input.as_str()) {
                visit(j, def, index, mark, stack, order)?;
            }
        }
        stack.pop();
        mark[i] = 2;
        order.push(i);
        Ok(())
    }
    let mut stack = Vec::new();
    for i in 0..def.stages.len() {
        visit(i, def, &index, &mut mark, &mut stack, &mut order)?;
    }
    Ok(order)
}

/// The pipeline registry the daemon's `aipipeline` elements will see.
pub(crate) fn registry(cfg: &Config) -> gstaipipeline::pipeline::Registry {
    gstaipipeline::pipeline::Registry::scan(&cfg.pipelines)
}

/// Media types (structure names) a pad template of `factory` accepts; `None` for ANY.
fn template_media(factory: &gst::ElementFactory, dir: gst::PadDirection) -> Option<Vec<String>> {
    let mut media = Vec::new();
    for t in factory.static_pad_templates() {
        if t.direction() != dir {
            continue;
        }
        let caps = t.caps();
        if caps.is_any() {
            return None;
        }
        media.extend(caps.iter().map(|s| s.name().to_string()));
    }
    Some(media)
}

const RAW_VIDEO: &str = "video/x-raw";

/// Media types a stage takes or gives (`None`: anything).
type Media = Option<Vec<String>>;

/// Checks everything that can be checked before the graph runs. Every message names the stage.
pub fn validate(def: &GraphDef, cfg: &Config) -> Result<(), GraphError> {
    if def.stages.is_empty() {
        return Err(GraphError::Empty);
    }
    let mut seen = HashSet::new();
    for s in &def.stages {
        if s.id == INPUT {
            return Err(GraphError::Invalid {
                stage: s.id.clone(),
                msg: "\"input\" is reserved for the graph's input; choose another id".into(),
            });
        }
        if !seen.insert(s.id.as_str()) {
            return Err(GraphError::Duplicate(s.id.clone()));
        }
    }
    for s in &def.stages {
        if s.inputs.is_empty() {
            return Err(GraphError::Invalid {
                stage: s.id.clone(),
                msg: "no inputs".into(),
            });
        }
        for input in &s.inputs {
            if input != INPUT && !seen.contains(input.as_str()) {
                return Err(GraphError::UnknownInput {
                    stage: s.id.clone(),
                    input: input.clone(),
                });
            }
        }
        if let Some(dup) = s
            .inputs
            .iter()
            .enumerate()
            .find(|(k, x)| s.inputs[..*k].contains(x))
        {
            return Err(GraphError::Invalid {
                stage: s.id.clone(),
                msg: format!("input '{}' is listed twice", dup.1),
            });
        }
    }
    topo_order(def)?;
    let registry = registry(cfg);
    // Media types each stage takes and gives (None: any).
    let mut io: BTreeMap<&str, (Media, Media)> = BTreeMap::new();
    for s in &def.stages {
        if let Some(when) = &s.when {
            cond::parse(when).map_err(|msg| GraphError::Condition {
                stage: s.id.clone(),
                when: when.clone(),
                msg,
            })?;
        }
        let providers = s.providers_in_order();
        if providers.is_empty() {
            return Err(GraphError::Invalid {
                stage: s.id.clone(),
                msg: "no pipeline, element or provider".into(),
            });
        }
        if !s.params.is_object() {
            return Err(GraphError::Invalid {
                stage: s.id.clone(),
                msg: "\"params\" must be an object".into(),
            });
        }
        let mut stage_io = None;
        for p in &providers {
            let this_io = if let Some(name) = &p.pipeline {
                let Some(pdef) = registry.resolve(name, None) else {
                    return Err(GraphError::UnknownPipeline {
                        stage: s.id.clone(),
                        name: name.clone(),
                        known: registry.names().join(", "),
                        searched: registry.searched().describe(),
                    });
                };
                if let Err(e) = pdef.parse_params(&s.params.to_string()) {
                    return Err(GraphError::Invalid {
                        stage: s.id.clone(),
                        msg: format!("params for pipeline '{name}': {e}"),
                    });
                }
                if let Some(d) = &p.device
                    && !matches!(d.as_str(), "auto" | "cpu" | "cuda")
                    && d.strip_prefix("cuda:")
                        .is_none_or(|n| n.parse::<u32>().is_err())
                {
                    return Err(GraphError::Invalid {
                        stage: s.id.clone(),
                        msg: format!("unknown device '{d}' (auto, cpu, cuda, cuda:N)"),
                    });
                }
                (
                    Some(vec![RAW_VIDEO.to_string()]),
                    Some(vec![RAW_VIDEO.to_string()]),
                )
            } else if let Some(name) = &p.element {
                if s.deadline_ms.is_some() {
                    return Err(GraphError::Invalid {
                        stage: s.id.clone(),
                        msg: "\"deadline_ms\" applies to pipeline stages only".into(),
                    });
                }
                let Some(factory) = gst::ElementFactory::find(name) else {
                    return Err(GraphError::UnknownElement {
                        stage: s.id.clone(),
                        name: name.clone(),
                    });
                };
                let always = |dir| {
                    factory
                        .static_pad_templates()
                        .iter()
                        .filter(|t| {
                            t.direction() == dir && t.presence() == gst::PadPresence::Always
                        })
                        .count()
                };
                if always(gst::PadDirection::Sink) != 1 || always(gst::PadDirection::Src) != 1 {
                    return Err(GraphError::Invalid {
                        stage: s.id.clone(),
                        msg: format!(
                            "element '{name}' is not a filter (a stage element needs exactly one always sink pad and one always src pad)"
                        ),
                    });
                }
                if let Some(obj) = s.params.as_object()
                    && !obj.is_empty()
                {
                    let el = factory.create().build().map_err(|e| GraphError::Invalid {
                        stage: s.id.clone(),
                        msg: format!("cannot create element '{name}': {e}"),
                    })?;
                    if takes_params_json(&el) {
                        // The element contract: the stage params are the element's params.
                        check_contract_params(&el, &contract_params(&s.params)).map_err(|msg| {
                            GraphError::Invalid {
                                stage: s.id.clone(),
                                msg: format!("element '{name}' rejects its params: {msg}"),
                            }
                        })?;
                        continue_io(&factory)
                    } else {
                        for (key, v) in obj {
                            property_text(&el, key, v).map_err(|msg| GraphError::Invalid {
                                stage: s.id.clone(),
                                msg: format!("element '{name}': {msg}"),
                            })?;
                        }
                        continue_io(&factory)
                    }
                } else {
                    continue_io(&factory)
                }
            } else {
                return Err(GraphError::Invalid {
                    stage: s.id.clone(),
                    msg: "a provider without pipeline or element".into(),
                });
            };
            // All providers of a stage must be interchangeable.
            if let Some(prev) = &stage_io
                && prev != &this_io
            {
                return Err(GraphError::Invalid {
                    stage: s.id.clone(),
                    msg: format!(
                        "provider '{}' does not take and give the same media as the first provider",
                        p.describe()
                    ),
                });
            }
            stage_io = Some(this_io);
        }
        if let Some(x) = stage_io {
            io.insert(s.id.as_str(), x);
        }
    }
    let accepts = |media: &Option<Vec<String>>, m: &str| match media {
        None => true,
        Some(v) => v.iter().any(|x| x == m),
    };
    let gives_video = |media: &Option<Vec<String>>| accepts(media, RAW_VIDEO);
    for s in &def.stages {
        let Some((sink, _)) = io.get(s.id.as_str()) else {
            continue;
        };
        for input in &s.inputs {
            let (from, src) = if input == INPUT {
                (INPUT, Some(vec![RAW_VIDEO.to_string()]))
            } else {
                (
                    input.as_str(),
                    io.get(input.as_str()).and_then(|x| x.1.clone()),
                )
            };
            // Raw video between stages (converters are inserted); other media never match.
            let ok = match (&src, sink) {
                (None, _) | (_, None) => true,
                (Some(src), Some(sink)) => src.iter().any(|m| sink.contains(m)),
            };
            if !ok || !accepts(sink, RAW_VIDEO) {
                return Err(GraphError::Caps {
                    stage: s.id.clone(),
                    from: from.to_string(),
                    detail: format!(
                        "'{from}' gives {} but '{}' takes {}",
                        src.map(|v| v.join(", "))
                            .unwrap_or_else(|| "anything".into()),
                        s.id,
                        sink.as_ref()
                            .map(|v| v.join(", "))
                            .unwrap_or_else(|| "anything".into())
                    ),
                });
            }
        }
    }
    for out in def.outputs() {
        if let Some((_, src)) = io.get(out)
            && !gives_video(src)
        {
            return Err(GraphError::Caps {
                stage: "output".into(),
                from: out.to_string(),
                detail: format!(
                    "the graph's output must be raw video, '{out}' gives {}",
                    src.as_ref().map(|v| v.join(", ")).unwrap_or_default()
                ),
            });
        }
    }
    Ok(())
}

/// The media an element stage takes and gives, from its factory's pad templates.
fn continue_io(factory: &gst::ElementFactory) -> (Media, Media) {
    (
        template_media(factory, gst::PadDirection::Sink),
        template_media(factory, gst::PadDirection::Src),
    )
}

/// Whether `el` follows the element contract: a `params` string property (a JSON object,
/// settable while playing). Such an element stage gets its `params` as that JSON, live.
pub(crate) fn takes_params_json(el: &gst::Element) -> bool {
    el.find_property("params").is_some_and(|p| {
        let f = p.flags();
        p.value_type() == gst::glib::Type::STRING
            && f.contains(gst::glib::ParamFlags::WRITABLE)
            && !f.contains(gst::glib::ParamFlags::CONSTRUCT_ONLY)
    })
}

/// A contract element stage's params JSON: the stage's params object, or, in the older form
/// `{"params": {...}}` (the params as the element's property), the inner object.
pub(crate) fn contract_params(p: &Value) -> Value {
    match p.as_object() {
        Some(o) if o.len() == 1 && o.get("params").is_some_and(Value::is_object) => {
            o["params"].clone()
        }
        _ => p.clone(),
    }
}

/// Hands `params` to a contract element in a scratch pipeline: a warning or error it posts
/// (the contract's way to reject params) is the reason.
fn check_contract_params(el: &gst::Element, params: &Value) -> Result<(), String> {
    let scratch = gst::Pipeline::new();
    scratch.add(el).map_err(|e| e.to_string())?;
    el.set_property("params", params.to_string());
    let bus = scratch.bus().ok_or("no bus")?;
    let msg = bus.pop_filtered(&[gst::MessageType::Warning, gst::MessageType::Error]);
    let _ = scratch.remove(el);
    // The reason is in the debug text when there is one (the contract's `[...]` form).
    let text = |err: gst::glib::Error, debug: Option<gst::glib::GString>| {
        debug
            .map(|d| d.to_string())
            .unwrap_or_else(|| err.to_string())
    };
    match msg.as_ref().map(|m| m.view()) {
        Some(gst::MessageView::Warning(w)) => Err(text(w.error(), w.debug())),
        Some(gst::MessageView::Error(e)) => Err(text(e.error(), e.debug())),
        _ => Ok(()),
    }
}

/// The text form of `v` for property `key` of `el`, checked: the property exists, can be set
/// after construction, and the value parses for its type.
pub(crate) fn property_text(el: &gst::Element, key: &str, v: &Value) -> Result<String, String> {
    let Some(pspec) = el.find_property(key) else {
        return Err(format!("has no property '{key}'"));
    };
    let flags = pspec.flags();
    if !flags.contains(gst::glib::ParamFlags::WRITABLE)
        || flags.contains(gst::glib::ParamFlags::CONSTRUCT_ONLY)
    {
        return Err(format!("property '{key}' cannot be set"));
    }
    let text = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // set_property_from_str only logs a bad value: check that it parses first.
    if pspec.value_type() != gst::glib::Type::STRING
        && gst::glib::Value::deserialize(&text, pspec.value_type()).is_err()
    {
        return Err(format!(
            "'{text}' is not a valid value for property '{key}'"
        ));
    }
    Ok(text)
}

/// Decodes a graph event from a bus message (an element message named [`STAGE_MESSAGE`]).
pub fn stage_event(msg: &gst::Message) -> Option<Value> {
    let gst::MessageView::Element(m) = msg.view() else {
        return None;
    };
    let s = m.structure()?;
    if s.name() != STAGE_MESSAGE {
        return None;
    }
    serde_json::from_str(s.get::<&str>("json").ok()?).ok()
}

/// The id of the stage `obj` belongs to (its own or an ancestor's name `stage-<id>`).
pub fn stage_of(obj: &gst::Object) -> Option<String> {
    let mut cur = Some(obj.clone());
    while let Some(o) = cur {
        if let Some(id) = o.name().strip_prefix(STAGE_BIN_PREFIX) {
            return Some(id.to_string());
        }
        cur = o.parent();
    }
    None
}

/// Stage bins are named `stage-<id>`.
pub const STAGE_BIN_PREFIX: &str = "stage-";

/// Posts a graph event from `element` (see [`stage_event`]).
pub(crate) fn post_event(element: &gst::Element, event: Value) {
    let s = gst::Structure::builder(STAGE_MESSAGE)
        .field("json", event.to_string())
        .build();
    let _ = element.post_message(gst::message::Element::builder(s).src(element).build());
}

#[cfg(test)]
mod tests;
