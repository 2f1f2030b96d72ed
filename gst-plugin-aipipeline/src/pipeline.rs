// SPDX-License-Identifier: MPL-2.0
//! The pipeline registry: built-in `noop` and `torchscript`, and model manifests (TOML) found in
//! a pipelines directory, plus the params (JSON, full replacement) every pipeline accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// Smallest, largest and step of the base params `width`/`height`. The runner accepts
/// 384..=1024 (runner-compat §8.3) and the daemon checks that range itself; the element also
/// runs smaller models (e.g. 256² for a fast preview), so its own minimum is one step.
pub const MIN_SIZE: u32 = 64;
pub const MAX_SIZE: u32 = 1024;
pub const SIZE_STEP: u32 = 64;
pub const DEFAULT_SIZE: u32 = 512;

/// Environment variable naming a pipelines directory (used when `pipelines-dir` is unset).
pub const PIPELINES_ENV: &str = "RIVULET_PIPELINES";

/// Tensor layout a model expects and returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// (1, H, W, 3): the runner's frame contract.
    #[default]
    Bhwc,
    /// (1, 3, H, W).
    Nchw,
}

/// Value range a model expects and returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
pub enum Range {
    /// [0, 1]: the runner's frame contract.
    #[default]
    #[serde(rename = "0_1")]
    ZeroOne,
    /// [-1, 1].
    #[serde(rename = "-1_1")]
    MinusOneOne,
}

/// How a param feeds the model as an extra tensor input (after the frame, in manifest order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// A 0-dim float tensor.
    Scalar,
    /// A 1-dim float tensor of `len` values.
    Vector,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub param: String,
    pub kind: InputKind,
    #[serde(default)]
    pub len: Option<usize>,
}

/// A selector (`[[selectors]]` in a manifest): a param that picks one entry of a vector param
/// by index or by name and sets that vector param to the one-hot vector of the entry.
///
/// An update gives the selector param as an integer index (`0..names.len()`) or as one of
/// `names` (a string). The target is set from the selector only when the update does not give
/// the target itself (the target wins when both are given). A selector value that selects
/// nothing (out of range, unknown name, wrong type) is not an error: it gives a warning and the
/// target keeps the value it had before the update, while the rest of the update applies.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorSpec {
    /// The param an update sets (not declared in `[params]`; it has no value of its own).
    pub param: String,
    /// A vector param declared in `[params]` with one value per name.
    pub target: String,
    /// One name per index of the target.
    pub names: Vec<String>,
}

impl SelectorSpec {
    /// The index a selector value selects, or a message naming the bad value and what is valid.
    pub fn select(&self, v: &serde_json::Value) -> Result<usize, String> {
        let n = self.names.len();
        let index = match v {
            serde_json::Value::Number(x) => x
                .as_u64()
                .or_else(|| {
                    x.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .filter(|i| *i < n as u64)
                .map(|i| i as usize),
            serde_json::Value::String(s) => self.names.iter().position(|name| name == s),
            _ => None,
        };
        index.ok_or_else(|| {
            format!(
                "params.{} = {v} selects nothing: it must be an index 0..={} or one of the names {}",
                self.param,
                n.saturating_sub(1),
                self.names.join(", ")
            )
        })
    }

    /// The one-hot vector of `index` (the target's value).
    pub fn one_hot(&self, index: usize) -> Vec<f64> {
        (0..self.names.len())
            .map(|i| if i == index { 1.0 } else { 0.0 })
            .collect()
    }
}

/// A declared param's value (its default's type is the type every update must have).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Number(f64),
    Vector(Vec<f64>),
    Bool(bool),
    Text(String),
}

impl Value {
    fn from_json(v: &serde_json::Value) -> Option<Value> {
        match v {
            serde_json::Value::Number(n) => n.as_f64().map(Value::Number),
            serde_json::Value::Bool(b) => Some(Value::Bool(*b)),
            serde_json::Value::String(s) => Some(Value::Text(s.clone())),
            serde_json::Value::Array(a) => a
                .iter()
                .map(serde_json::Value::as_f64)
                .collect::<Option<Vec<_>>>()
                .map(Value::Vector),
            _ => None,
        }
    }

    fn from_toml(v: &toml::Value) -> Option<Value> {
        match v {
            toml::Value::Integer(i) => Some(Value::Number(*i as f64)),
            toml::Value::Float(f) => Some(Value::Number(*f)),
            toml::Value::Boolean(b) => Some(Value::Bool(*b)),
            toml::Value::String(s) => Some(Value::Text(s.clone())),
            toml::Value::Array(a) => a
                .iter()
                .map(|x| match x {
                    toml::Value::Integer(i) => Some(*i as f64),
                    toml::Value::Float(f) => Some(*f),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .map(Value::Vector),
            _ => None,
        }
    }

    fn same_type(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Vector(a), Value::Vector(b)) => a.len() == b.len(),
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }

    fn type_name(&self) -> String {
        match self {
            Value::Number(_) => "a number".into(),
            Value::Vector(v) => format!("an array of {} numbers", v.len()),
            Value::Bool(_) => "a boolean".into(),
            Value::Text(_) => "a string".into(),
        }
    }
}

/// What kind of pipeline a definition is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Copy of the (cover+cropped) input; never reloads.
    Noop,
    /// A TorchScript module named by the `model` property or the `model` param.
    TorchScript,
    /// A model manifest.
    Manifest,
}

/// A resolved pipeline: everything needed to validate params and load the model.
#[derive(Clone, Debug)]
pub struct PipelineDef {
    pub name: String,
    pub kind: Kind,
    /// The TorchScript file (manifest: resolved relative to the manifest; torchscript: the
    /// `model` property), if any.
    pub model: Option<PathBuf>,
    pub layout: Layout,
    pub range: Range,
    pub width: u32,
    pub height: u32,
    /// Declared params and their defaults.
    pub params: BTreeMap<String, Value>,
    pub inputs: Vec<InputSpec>,
    /// Selector params mapping an index or a name to a one-hot vector param.
    pub selectors: Vec<SelectorSpec>,
    /// Where the manifest came from (for messages).
    pub source: Option<PathBuf>,
}

/// Params in force: the base params plus the declared ones (full replacement on each update).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub width: u32,
    pub height: u32,
    pub show_reloading_frame: bool,
    /// torchscript pipeline only: the model file.
    pub model: Option<PathBuf>,
    pub values: BTreeMap<String, Value>,
}

/// Parsed params and the warnings of the selectors that selected nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub params: Params,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamsError {
    #[error("params are not valid JSON: {0}")]
    Json(String),
    #[error("params must be a JSON object, got {0}")]
    NotObject(&'static str),
    #[error("params.{key} must be {expected}, got {got}")]
    Type {
        key: String,
        expected: String,
        got: String,
    },
    #[error(
        "params.{key} = {value} is out of range: it must be {MIN_SIZE}..={MAX_SIZE} and a multiple of {SIZE_STEP}"
    )]
    Size { key: &'static str, value: String },
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn parse_size(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &'static str,
    default: u32,
) -> Result<u32, ParamsError> {
    let Some(v) = obj.get(key) else {
        return Ok(default);
    };
    let n = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    });
    match n {
        Some(n)
            if (MIN_SIZE as u64..=MAX_SIZE as u64).contains(&n)
                && n.is_multiple_of(SIZE_STEP as u64) =>
        {
            Ok(n as u32)
        }
        Some(_) => Err(ParamsError::Size {
            key,
            value: v.to_string(),
        }),
        None => Err(ParamsError::Type {
            key: key.into(),
            expected: "an integer".into(),
            got: json_kind(v).into(),
        }),
    }
}

impl PipelineDef {
    /// The built-in `noop` pipeline.
    pub fn noop() -> Self {
        Self {
            name: "noop".into(),
            kind: Kind::Noop,
            model: None,
            layout: Layout::Bhwc,
            range: Range::ZeroOne,
            width: DEFAULT_SIZE,
            height: DEFAULT_SIZE,
            params: BTreeMap::new(),
            inputs: Vec::new(),
            selectors: Vec::new(),
            source: None,
        }
    }

    /// The built-in `torchscript` pipeline with an optional model file.
    pub fn torchscript(model: Option<PathBuf>) -> Self {
        Self {
            name: "torchscript".into(),
            kind: Kind::TorchScript,
            model,
            ..Self::noop()
        }
    }

    /// Params with every default (the pipeline's initial params).
    pub fn initial_params(&self) -> Params {
        Params {
            width: self.width,
            height: self.height,
            show_reloading_frame: true,
            model: self.model.clone(),
            values: self.params.clone(),
        }
    }

    /// Parses a params JSON object with full-replacement semantics, ignoring selector warnings:
    /// for validation only; the element uses [`PipelineDef::parse_update`].
    pub fn parse_params(&self, json: &str) -> Result<Params, ParamsError> {
        self.parse_update(None, json).map(|u| u.params)
    }

    /// Parses a params JSON object with full-replacement semantics: keys not given take their
    /// defaults; unknown keys are ignored unless declared. A selector param sets its target
    /// to a one-hot vector when the update does not give the target; a selector value that
    /// selects nothing is a warning (in [`Update::warnings`]) and the target keeps its value in
    /// `prev` (the params in force; its default when `None`). Any other invalid key rejects
    /// the whole update.
    pub fn parse_update(&self, prev: Option<&Params>, json: &str) -> Result<Update, ParamsError> {
        let trimmed = json.trim();
        if trimmed.is_empty() {
            return Ok(Update {
                params: self.initial_params(),
                warnings: Vec::new(),
            });
        }
        let v: serde_json::Value =
            serde_json::from_str(trimmed).map_err(|e| ParamsError::Json(e.to_string()))?;
        let serde_json::Value::Object(obj) = v else {
            return Err(ParamsError::NotObject(json_kind(&v)));
        };
        let mut p = self.initial_params();
        p.width = parse_size(&obj, "width", self.width)?;
        p.height = parse_size(&obj, "height", self.height)?;
        if let Some(v) = obj.get("show_reloading_frame") {
            p.show_reloading_frame = v.as_bool().ok_or_else(|| ParamsError::Type {
                key: "show_reloading_frame".into(),
                expected: "a boolean".into(),
                got: json_kind(v).into(),
            })?;
        }
        if self.kind == Kind::TorchScript
            && let Some(v) = obj.get("model")
        {
            let s = v.as_str().ok_or_else(|| ParamsError::Type {
                key: "model".into(),
                expected: "a string (path to a TorchScript file)".into(),
                got: json_kind(v).into(),
            })?;
            p.model = Some(PathBuf::from(s));
        }
        for (key, default) in &self.params {
            let Some(v) = obj.get(key) else { continue };
            let value = Value::from_json(v)
                .filter(|x| x.same_type(default))
                .ok_or_else(|| ParamsError::Type {
                    key: key.clone(),
                    expected: default.type_name(),
                    got: match Value::from_json(v) {
                        Some(x) => x.type_name(),
                        None => json_kind(v).into(),
                    },
                })?;
            p.values.insert(key.clone(), value);
        }
        let mut warnings = Vec::new();
        for sel in &self.selectors {
            let Some(v) = obj.get(&sel.param) else {
                continue;
            };
            let given_target = obj.contains_key(&sel.target);
            match sel.select(v) {
                Ok(_) if given_target => {}
                Ok(i) => {
                    p.values
                        .insert(sel.target.clone(), Value::Vector(sel.one_hot(i)));
                }
                Err(msg) if given_target => warnings.push(format!(
                    "{msg}; ignored, params.{} is given and used",
                    sel.target
                )),
                Err(msg) => {
                    if let Some(old) = prev.and_then(|q| q.values.get(&sel.target)) {
                        p.values.insert(sel.target.clone(), old.clone());
                    }
                    warnings.push(format!(
                        "{msg}; params.{} keeps its previous value, the rest of the update applies",
                        sel.target
                    ));
                }
            }
        }
        Ok(Update {
            params: p,
            warnings,
        })
    }

    /// Whether going from `old` to `new` needs the model reloaded (in the background).
    /// `noop` never reloads: a new size is applied at once.
    pub fn needs_reload(&self, old: &Params, new: &Params) -> bool {
        self.kind != Kind::Noop
            && (old.width != new.width || old.height != new.height || old.model != new.model)
    }
}

// ---- manifests ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    name: String,
    model: PathBuf,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    layout: Layout,
    #[serde(default)]
    range: Range,
    #[serde(default)]
    params: toml::Table,
    #[serde(default)]
    inputs: Vec<InputSpec>,
    #[serde(default)]
    selectors: Vec<SelectorSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("invalid manifest {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

fn check_size(v: Option<u32>, what: &str) -> Result<u32, String> {
    let n = v.unwrap_or(DEFAULT_SIZE);
    if (MIN_SIZE..=MAX_SIZE).contains(&n) && n.is_multiple_of(SIZE_STEP) {
        Ok(n)
    } else {
        Err(format!(
            "{what} = {n} must be {MIN_SIZE}..={MAX_SIZE} and a multiple of {SIZE_STEP}"
        ))
    }
}

const BASE_PARAMS: [&str; 4] = ["width", "height", "show_reloading_frame", "model"];

/// A selector's param is new (not a base param, not in `[params]`, not another selector's), its
/// target a vector param with one value per name, its names non-empty and distinct.
fn check_selectors(
    selectors: &[SelectorSpec],
    params: &BTreeMap<String, Value>,
) -> Result<(), String> {
    for (i, sel) in selectors.iter().enumerate() {
        let earlier = &selectors[..i];
        let p = &sel.param;
        if p.is_empty() {
            return Err("selectors: param is empty".into());
        }
        if BASE_PARAMS.contains(&p.as_str()) {
            return Err(format!(
                "selectors: param '{p}' is a base param and cannot be a selector"
            ));
        }
        if params.contains_key(p) {
            return Err(format!(
                "selectors: param '{p}' is also declared in [params]; a selector has no value of its own"
            ));
        }
        if earlier.iter().any(|e| &e.param == p) {
            return Err(format!("selectors: param '{p}' is declared twice"));
        }
        if earlier.iter().any(|e| e.target == sel.target) {
            return Err(format!(
                "selectors: target '{}' has two selectors",
                sel.target
            ));
        }
        match params.get(&sel.target) {
            None => {
                return Err(format!(
                    "selectors: target '{}' of '{p}' is not declared in [params]",
                    sel.target
                ));
            }
            Some(Value::Vector(v)) if v.len() == sel.names.len() => {}
            Some(other) => {
                return Err(format!(
                    "selectors: target '{}' of '{p}' must be an array of {} numbers (one per name), its default is {}",
                    sel.target,
                    sel.names.len(),
                    other.type_name()
                ));
            }
        }
        if sel.names.is_empty() {
            return Err(format!("selectors: '{p}' has no names"));
        }
        for (j, name) in sel.names.iter().enumerate() {
            if name.is_empty() {
                return Err(format!("selectors: '{p}' has an empty name at index {j}"));
            }
            if sel.names[..j].contains(name) {
                return Err(format!("selectors: '{p}' has the name '{name}' twice"));
            }
        }
    }
    Ok(())
}

/// Parses one manifest file; the model path is resolved relative to the manifest's folder.
pub fn load_manifest(path: &Path) -> Result<PipelineDef, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|err| ManifestError::Io {
        path: path.into(),
        err,
    })?;
    let invalid = |msg: String| ManifestError::Invalid {
        path: path.into(),
        msg,
    };
    let m: ManifestFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let _ = m.description;
    if m.name.is_empty() || m.name == "noop" || m.name == "torchscript" {
        return Err(invalid(format!(
            "name '{}' is empty or reserved for a built-in pipeline",
            m.name
        )));
    }
    let width = check_size(m.width, "width").map_err(invalid)?;
    let height = check_size(m.height, "height").map_err(invalid)?;
    let mut params = BTreeMap::new();
    for (k, v) in &m.params {
        if BASE_PARAMS.contains(&k.as_str()) {
            return Err(invalid(format!(
                "params.{k} is a base param and cannot be declared"
            )));
        }
        let value = Value::from_toml(v).ok_or_else(|| {
            invalid(format!(
                "params.{k} must be a number, an array of numbers, a boolean or a string"
            ))
        })?;
        params.insert(k.clone(), value);
    }
    for input in &m.inputs {
        let Some(default) = params.get(&input.param) else {
            return Err(invalid(format!(
                "inputs: param '{}' is not declared in [params]",
                input.param
            )));
        };
        match (input.kind, default) {
            (InputKind::Scalar, Value::Number(_)) => {}
            (InputKind::Vector, Value::Vector(v)) if input.len.is_none_or(|l| l == v.len()) => {}
            _ => {
                return Err(invalid(format!(
                    "inputs: param '{}' has default {}, which does not fit kind {:?}{}",
                    input.param,
                    default.type_name(),
                    input.kind,
                    input.len.map(|l| format!(" len {l}")).unwrap_or_default()
                )));
            }
        }
    }
    check_selectors(&m.selectors, &params).map_err(invalid)?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(PipelineDef {
        name: m.name,
        kind: Kind::Manifest,
        model: Some(base.join(&m.model)),
        layout: m.layout,
        range: m.range,
        width,
        height,
        params,
        inputs: m.inputs,
        selectors: m.selectors,
        source: Some(path.into()),
    })
}

/// The pipelines known to an element: built-ins plus the manifests of a directory.
#[derive(Debug, Default)]
pub struct Registry {
    manifests: BTreeMap<String, Arc<PipelineDef>>,
    /// Problems met while scanning (bad manifests are skipped and reported).
    pub warnings: Vec<String>,
}

impl Registry {
    /// Scans `dir` (`*.toml`, not recursive). A missing directory is a warning.
    pub fn scan(dir: Option<&Path>) -> Registry {
        let mut r = Registry::default();
        let Some(dir) = dir else { return r };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                r.warnings.push(format!(
                    "cannot read pipelines directory {}: {e}",
                    dir.display()
                ));
                return r;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        paths.sort();
        for p in paths {
            match load_manifest(&p) {
                Ok(def) => {
                    if let Some(prev) = r.manifests.get(&def.name) {
                        r.warnings.push(format!(
                            "manifest {} names pipeline '{}' already defined by {}; ignored",
                            p.display(),
                            def.name,
                            prev.source.as_deref().unwrap_or(Path::new("?")).display()
                        ));
                    } else {
                        r.manifests.insert(def.name.clone(), Arc::new(def));
                    }
                }
                Err(e) => r.warnings.push(e.to_string()),
            }
        }
        r
    }

    /// All pipeline names, built-ins first.
    pub fn names(&self) -> Vec<String> {
        let mut v = vec!["noop".to_owned(), "torchscript".to_owned()];
        v.extend(self.manifests.keys().cloned());
        v
    }

    /// Looks a pipeline up by name.
    pub fn resolve(&self, name: &str, model: Option<PathBuf>) -> Option<PipelineDef> {
        match name {
            "noop" => Some(PipelineDef::noop()),
            "torchscript" => Some(PipelineDef::torchscript(model)),
            _ => self.manifests.get(name).map(|d| (**d).clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gain_def() -> PipelineDef {
        let mut d = PipelineDef::torchscript(None);
        d.kind = Kind::Manifest;
        d.params.insert("gain".into(), Value::Number(1.0));
        d.params.insert("bias".into(), Value::Vector(vec![0.0; 3]));
        d
    }

    #[test]
    fn full_replacement_and_defaults() {
        let d = gain_def();
        let p = d.parse_params(r#"{"gain": 2, "unknown": 5}"#).unwrap();
        assert_eq!(p.values["gain"], Value::Number(2.0));
        assert_eq!(p.values["bias"], Value::Vector(vec![0.0; 3]));
        assert_eq!((p.width, p.height), (512, 512));
        let p2 = d.parse_params(r#"{"width": 384}"#).unwrap();
        assert_eq!(p2.values["gain"], Value::Number(1.0));
        assert_eq!(p2.width, 384);
        assert!(d.needs_reload(&p, &p2));
        assert!(!d.needs_reload(&p, &d.initial_params()));
    }

    #[test]
    fn rejects_bad_params() {
        let d = gain_def();
        assert!(matches!(d.parse_params("{"), Err(ParamsError::Json(_))));
        assert!(matches!(
            d.parse_params("[1]"),
            Err(ParamsError::NotObject(_))
        ));
        assert!(matches!(
            d.parse_params(r#"{"width": 400}"#),
            Err(ParamsError::Size { .. })
        ));
        assert!(matches!(
            d.parse_params(r#"{"height": 2048}"#),
            Err(ParamsError::Size { .. })
        ));
        assert!(matches!(
            d.parse_params(r#"{"gain": "x"}"#),
            Err(ParamsError::Type { .. })
        ));
        assert!(matches!(
            d.parse_params(r#"{"bias": [1, 2]}"#),
            Err(ParamsError::Type { .. })
        ));
        assert!(matches!(
            d.parse_params(r#"{"show_reloading_frame": 1}"#),
            Err(ParamsError::Type { .. })
        ));
    }

    #[test]
    fn noop_never_reloads() {
        let d = PipelineDef::noop();
        let a = d.initial_params();
        let b = d.parse_params(r#"{"width": 640}"#).unwrap();
        assert!(!d.needs_reload(&a, &b));
    }

    /// Writes a manifest into a fresh temporary folder and parses it.
    fn manifest(text: &str) -> Result<PipelineDef, ManifestError> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "aipipeline-manifest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.toml");
        std::fs::write(&path, text).unwrap();
        let r = load_manifest(&path);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    const SELECTOR_MANIFEST: &str = r#"
name = "sel"
model = "sel.pt"
[params]
mix = [0.0, 0.0, 1.0]
strength = 1.0
[[inputs]]
param = "mix"
kind = "vector"
len = 3
[[selectors]]
param = "style"
target = "mix"
names = ["ink", "oil", "pastel"]
"#;

    fn mix(p: &Params) -> Vec<f64> {
        match &p.values["mix"] {
            Value::Vector(v) => v.clone(),
            other => panic!("mix is {other:?}"),
        }
    }

    #[test]
    fn selector_selects_by_index_or_name() {
        let d = manifest(SELECTOR_MANIFEST).unwrap();
        assert_eq!(d.selectors.len(), 1);
        let parse = |json: &str| {
            let u = d.parse_update(None, json).unwrap();
            assert!(u.warnings.is_empty(), "{json}: {:?}", u.warnings);
            u.params
        };
        // No selector, no mix: the default (full replacement).
        assert_eq!(mix(&parse("{}")), [0.0, 0.0, 1.0]);
        assert_eq!(mix(&parse(r#"{"style": 0}"#)), [1.0, 0.0, 0.0]);
        assert_eq!(mix(&parse(r#"{"style": 1.0}"#)), [0.0, 1.0, 0.0]);
        assert_eq!(parse(r#"{"style": 1}"#), parse(r#"{"style": "oil"}"#));
        assert_eq!(mix(&parse(r#"{"style": "pastel"}"#)), [0.0, 0.0, 1.0]);
        // The target wins when both are given; the other params are unaffected.
        let p = parse(r#"{"style": 0, "mix": [0, 2, 2], "strength": 0.5}"#);
        assert_eq!(mix(&p), [0.0, 2.0, 2.0]);
        assert_eq!(p.values["strength"], Value::Number(0.5));
        assert!(!p.values.contains_key("style"));
    }

    #[test]
    fn bad_selector_value_warns_and_keeps_the_previous_target() {
        let d = manifest(SELECTOR_MANIFEST).unwrap();
        let prev = d
            .parse_params(r#"{"style": "oil", "strength": 0.3}"#)
            .unwrap();
        for bad in [
            "3",
            "-1",
            "1.5",
            r#""Oil""#,
            r#""style_1""#,
            "true",
            "null",
            "[1]",
        ] {
            let json = format!(r#"{{"style": {bad}, "strength": 0.7, "width": 640}}"#);
            let u = d.parse_update(Some(&prev), &json).unwrap();
            assert_eq!(mix(&u.params), [0.0, 1.0, 0.0], "{json}");
            // The rest of the update applies.
            assert_eq!(u.params.values["strength"], Value::Number(0.7));
            assert_eq!(u.params.width, 640);
            assert_eq!(u.warnings.len(), 1, "{json}");
            let w = &u.warnings[0];
            assert!(
                w.contains(&format!("params.style = {}", bad.replace(' ', "")))
                    && w.contains("0..=2")
                    && w.contains("ink, oil, pastel")
                    && w.contains("keeps its previous value"),
                "{w}"
            );
            // Without params in force (at start) the target takes its default.
            let u = d.parse_update(None, &json).unwrap();
            assert_eq!(mix(&u.params), [0.0, 0.0, 1.0]);
            assert_eq!(u.warnings.len(), 1);
        }
        // A bad selector beside a given target: the target is used, still a warning.
        let u = d
            .parse_update(Some(&prev), r#"{"style": 9, "mix": [1, 1, 0]}"#)
            .unwrap();
        assert_eq!(mix(&u.params), [1.0, 1.0, 0.0]);
        assert_eq!(u.warnings.len(), 1);
        assert!(u.warnings[0].contains("params.mix is given and used"));
        // A wrong target type is still an error for the whole update.
        assert!(matches!(
            d.parse_update(Some(&prev), r#"{"style": 1, "mix": [1, 1]}"#),
            Err(ParamsError::Type { .. })
        ));
    }

    #[test]
    fn bad_selector_manifests_are_rejected() {
        let head = "name = \"sel\"\nmodel = \"sel.pt\"\n[params]\nmix = [1.0, 0.0]\ngain = 1.0\n";
        let cases = [
            (
                "[[selectors]]\nparam = \"style\"\ntarget = \"nope\"\nnames = [\"a\", \"b\"]\n",
                "target 'nope' of 'style' is not declared in [params]",
            ),
            (
                "[[selectors]]\nparam = \"style\"\ntarget = \"gain\"\nnames = [\"a\"]\n",
                "target 'gain' of 'style' must be an array of 1 numbers (one per name), its default is a number",
            ),
            (
                "[[selectors]]\nparam = \"style\"\ntarget = \"mix\"\nnames = [\"a\", \"b\", \"c\"]\n",
                "must be an array of 3 numbers (one per name), its default is an array of 2 numbers",
            ),
            (
                "[[selectors]]\nparam = \"style\"\ntarget = \"mix\"\nnames = [\"a\", \"a\"]\n",
                "'style' has the name 'a' twice",
            ),
            (
                "[[selectors]]\nparam = \"style\"\ntarget = \"mix\"\nnames = [\"a\", \"\"]\n",
                "'style' has an empty name at index 1",
            ),
            (
                "[[selectors]]\nparam = \"gain\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n",
                "param 'gain' is also declared in [params]",
            ),
            (
                "[[selectors]]\nparam = \"width\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n",
                "param 'width' is a base param",
            ),
            (
                "[[selectors]]\nparam = \"\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n",
                "param is empty",
            ),
            (
                "[[selectors]]\nparam = \"s\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n\
                 [[selectors]]\nparam = \"s\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n",
                "param 's' is declared twice",
            ),
            (
                "[[selectors]]\nparam = \"s\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n\
                 [[selectors]]\nparam = \"t\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n",
                "target 'mix' has two selectors",
            ),
            (
                "[[selectors]]\nparam = \"style\"\ntarget = \"mix\"\n",
                "missing field `names`",
            ),
            (
                "[[selectors]]\nparam = \"style\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\nlen = 2\n",
                "unknown field `len`",
            ),
        ];
        for (sel, want) in cases {
            let text = format!("{head}{sel}");
            match manifest(&text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("invalid manifest") && msg.contains(want),
                        "{msg}\nwanted: {want}"
                    );
                }
            }
        }
        // The same head with a valid selector is accepted.
        let ok = format!(
            "{head}[[selectors]]\nparam = \"style\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n"
        );
        assert!(manifest(&ok).is_ok());
    }

    #[test]
    fn styletransfer_manifest_has_26_named_styles() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/styletransfer/styletransfer.toml");
        let d = load_manifest(&path).unwrap();
        let [sel] = d.selectors.as_slice() else {
            panic!("selectors: {:?}", d.selectors)
        };
        assert_eq!((sel.param.as_str(), sel.target.as_str()), ("style", "mix"));
        let names: Vec<String> = (0..26).map(|i| format!("style_{i}")).collect();
        assert_eq!(sel.names, names);
        let p = d.parse_params(r#"{"style": "style_7"}"#).unwrap();
        assert_eq!(p, d.parse_params(r#"{"style": 7}"#).unwrap());
        assert_eq!(mix(&p), sel.one_hot(7));
        // No style and no mix: style 0.
        assert_eq!(mix(&d.initial_params()), sel.one_hot(0));
    }

    #[test]
    fn committed_manifests_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines");
        let r = Registry::scan(Some(&dir));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        for name in ["identity", "invert", "convnet", "gain"] {
            let d = r
                .resolve(name, None)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert!(
                d.model.as_ref().unwrap().exists(),
                "{name}: model file missing"
            );
        }
        assert!(r.resolve("nope", None).is_none());
    }
}
