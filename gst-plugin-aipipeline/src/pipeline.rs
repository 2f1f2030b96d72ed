// SPDX-License-Identifier: MPL-2.0
//! The pipeline registry: built-in `noop` and `torchscript`, and model manifests (TOML) found in
//! a pipelines directory, plus the params (JSON, full replacement) every pipeline accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// Smallest, largest and step of the base params `width`/`height`. The runner accepts
/// 384..=1024 (docs/runner.md, "Params") and the daemon checks that range itself; the element also
/// runs smaller models (e.g. 256² for a fast preview), so its own minimum is one step.
pub const MIN_SIZE: u32 = 64;
pub const MAX_SIZE: u32 = 1024;
pub const SIZE_STEP: u32 = 64;
pub const DEFAULT_SIZE: u32 = 512;

/// Environment variable holding pipelines directories, colon-separated like `PATH`: the first
/// entries of the default search path ([`SearchPath::from_env`]).
pub const PIPELINES_ENV: &str = "RIVULET_PIPELINES";
/// The runner's model directory (one directory), searched after [`PIPELINES_ENV`].
pub const MODEL_DIR_ENV: &str = "MODEL_DIR";

/// Params keys that are never unknown, whatever the pipeline: the runner's base params
/// (docs/runner.md, "Params") and the logging ids the runner hands its inference side through the
/// params queue (same section).
pub const DAEMON_KEYS: [&str; 6] = [
    "width",
    "height",
    "show_reloading_frame",
    "request_id",
    "manifest_id",
    "stream_id",
];

// ---- the search path ----

/// Where the pipeline registry looks for model manifests: directories in order, like `PATH`
/// (the first manifest of a name wins). In each directory, its `*.toml` files and the `*.toml`
/// files of its immediate subdirectories (one folder per model, as `models/styletransfer/`)
/// are manifests. A directory that does not exist is skipped (and named as missing in the
/// error for an unknown pipeline).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchPath {
    dirs: Vec<PathBuf>,
}

/// What the default search path is made of ([`SearchPath::from_sources`]); from the process
/// by [`Sources::from_process`].
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `RIVULET_PIPELINES`: directories, colon-separated.
    pub rivulet_pipelines: Option<String>,
    /// `MODEL_DIR`: one directory.
    pub model_dir: Option<String>,
    /// `XDG_DATA_DIRS` (unset or empty: `/usr/local/share:/usr/share`).
    pub xdg_data_dirs: Option<String>,
    /// The running executable.
    pub exe: Option<PathBuf>,
    /// The plugin file this crate was loaded from (`None` when registered statically).
    pub plugin_file: Option<PathBuf>,
    /// The repository's `models/` in a build tree (only when it exists).
    pub build_tree: Option<PathBuf>,
}

/// The plugin file `libgstaipipeline.so` was loaded from, set by `plugin_init`.
static PLUGIN_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

pub(crate) fn set_plugin_file(path: PathBuf) {
    let _ = PLUGIN_FILE.set(path);
}

/// The repository's `models/` folder at build time.
const BUILD_TREE_MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models");

fn non_empty(v: Option<std::ffi::OsString>) -> Option<String> {
    v.map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

impl Sources {
    /// The process's environment, executable, plugin file and build tree.
    pub fn from_process() -> Sources {
        let build_tree = Path::new(BUILD_TREE_MODELS);
        Sources {
            rivulet_pipelines: non_empty(std::env::var_os(PIPELINES_ENV)),
            model_dir: non_empty(std::env::var_os(MODEL_DIR_ENV)),
            xdg_data_dirs: non_empty(std::env::var_os("XDG_DATA_DIRS")),
            exe: std::env::current_exe().ok(),
            plugin_file: PLUGIN_FILE.get().cloned(),
            build_tree: build_tree.is_dir().then(|| {
                build_tree
                    .canonicalize()
                    .unwrap_or_else(|_| build_tree.into())
            }),
        }
    }
}

impl SearchPath {
    /// Exactly these directories, in this order (duplicates dropped).
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> SearchPath {
        let mut v: Vec<PathBuf> = Vec::new();
        for d in dirs {
            if !d.as_os_str().is_empty() && !v.contains(&d) {
                v.push(d);
            }
        }
        SearchPath { dirs: v }
    }

    /// One directory.
    pub fn dir(dir: impl Into<PathBuf>) -> SearchPath {
        SearchPath::new([dir.into()])
    }

    /// A colon-separated list (as `PATH`; empty entries are skipped).
    pub fn parse(list: &str) -> SearchPath {
        SearchPath::new(list.split(':').map(PathBuf::from))
    }

    /// The default search path, from the process ([`Sources::from_process`]).
    pub fn from_env() -> SearchPath {
        SearchPath::from_sources(&Sources::from_process())
    }

    /// The default search path, in this order:
    /// 1. each directory of `RIVULET_PIPELINES` (colon-separated);
    /// 2. `MODEL_DIR`;
    /// 3. `<d>/rivulet/pipelines` for each `<d>` of `XDG_DATA_DIRS` (default
    ///    `/usr/local/share:/usr/share`): the installed data directories;
    /// 4. beside the running executable: `<bin>/pipelines`, `<bin>/models`,
    ///    `<bin>/../share/rivulet/pipelines`;
    /// 5. beside the plugin file: `<plugin dir>/pipelines`, `<plugin dir>/models`;
    /// 6. the repository's `models/` in a build tree (when it exists at run time).
    pub fn from_sources(s: &Sources) -> SearchPath {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(list) = &s.rivulet_pipelines {
            dirs.extend(SearchPath::parse(list).dirs);
        }
        if let Some(d) = &s.model_dir {
            dirs.push(d.into());
        }
        let xdg = s
            .xdg_data_dirs
            .as_deref()
            .filter(|x| !x.is_empty())
            .unwrap_or("/usr/local/share:/usr/share");
        dirs.extend(
            xdg.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| Path::new(d).join("rivulet/pipelines")),
        );
        if let Some(bin) = s.exe.as_deref().and_then(Path::parent) {
            dirs.push(bin.join("pipelines"));
            dirs.push(bin.join("models"));
            // `<prefix>/bin/rivulet` → `<prefix>/share/rivulet/pipelines`.
            if let Some(prefix) = bin.parent() {
                dirs.push(prefix.join("share/rivulet/pipelines"));
            }
        }
        if let Some(dir) = s.plugin_file.as_deref().and_then(Path::parent) {
            dirs.push(dir.join("pipelines"));
            dirs.push(dir.join("models"));
        }
        if let Some(d) = &s.build_tree {
            dirs.push(d.clone());
        }
        SearchPath::new(dirs)
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// The colon-separated form ([`SearchPath::parse`] reads it back).
    pub fn to_list(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.to_string_lossy())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The directories for a message, in order, those missing marked so.
    pub fn describe(&self) -> String {
        if self.dirs.is_empty() {
            return "none".into();
        }
        self.dirs
            .iter()
            .map(|d| {
                if d.is_dir() {
                    d.display().to_string()
                } else {
                    format!("{} (missing)", d.display())
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

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
    /// The model takes this input per sample: in a batch (a batch group's forward of several
    /// frames) the members' values are stacked in sample order, a vector as (B, len), a scalar
    /// as (B,), so frames whose params differ only in per-sample inputs share one forward. One
    /// frame outside a batch gets the unbatched shape ((len,) or 0-dim) as without the flag.
    #[serde(default)]
    pub per_sample: bool,
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

/// Parsed params, the warnings of the selectors that selected nothing, and the keys the
/// pipeline does not know (ignored, as the runner does).
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub params: Params,
    pub warnings: Vec<String>,
    /// Keys of the update that are neither [`DAEMON_KEYS`] nor the pipeline's own
    /// ([`PipelineDef::known_keys`]), sorted.
    pub unknown: Vec<String>,
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
                unknown: Vec::new(),
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
        let known = self.known_keys();
        let unknown = obj
            .keys()
            .filter(|k| !known.iter().any(|n| n == *k))
            .cloned()
            .collect();
        Ok(Update {
            params: p,
            warnings,
            unknown,
        })
    }

    /// The params keys this pipeline takes: [`DAEMON_KEYS`], `model` for `torchscript`, the
    /// manifest's declared params and its selectors.
    pub fn known_keys(&self) -> Vec<String> {
        let mut v: Vec<String> = DAEMON_KEYS.iter().map(|k| k.to_string()).collect();
        if self.kind == Kind::TorchScript {
            v.push("model".into());
        }
        v.extend(self.params.keys().cloned());
        v.extend(self.selectors.iter().map(|s| s.param.clone()));
        v
    }

    /// The warning for `unknown` keys (see [`Update::unknown`]).
    pub fn unknown_keys_message(&self, unknown: &[String]) -> String {
        let quoted = |v: &[String]| {
            v.iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "Params for pipeline '{}': unknown key{} {} ignored (this pipeline takes {})",
            self.name,
            if unknown.len() == 1 { "" } else { "s" },
            quoted(unknown),
            quoted(&self.known_keys())
        )
    }

    /// Whether frames with params `a` and `b` can share one batched forward: their params are
    /// equal apart from the values of per-sample inputs (`per_sample` in `[[inputs]]`), which
    /// the forward takes stacked, one per frame.
    pub fn batchable(&self, a: &Params, b: &Params) -> bool {
        let per_sample = |k: &String| self.inputs.iter().any(|i| i.per_sample && &i.param == k);
        a.width == b.width
            && a.height == b.height
            && a.show_reloading_frame == b.show_reloading_frame
            && a.model == b.model
            && a.values.keys().eq(b.values.keys())
            && a.values
                .iter()
                .zip(&b.values)
                .all(|((k, va), (_, vb))| va == vb || per_sample(k))
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
    for (i, input) in m.inputs.iter().enumerate() {
        if m.inputs[..i].iter().any(|e| e.param == input.param) {
            return Err(invalid(format!(
                "inputs: param '{}' is given twice",
                input.param
            )));
        }
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

/// The pipelines known to an element: built-ins plus the manifests found on a search path.
#[derive(Debug, Default)]
pub struct Registry {
    manifests: BTreeMap<String, Arc<PipelineDef>>,
    /// Where the manifests were looked for.
    searched: SearchPath,
    /// Problems met while scanning (bad manifests are skipped and reported).
    pub warnings: Vec<String>,
}

/// The manifests of one directory: its `*.toml` and those of its immediate subdirectories,
/// sorted. A directory that does not exist gives none; one that cannot be read, a warning.
fn manifest_files(dir: &Path, warnings: &mut Vec<String>) -> Vec<PathBuf> {
    let toml = |p: &Path| p.is_file() && p.extension().is_some_and(|e| e == "toml");
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warnings.push(format!(
                "cannot read pipelines directory {}: {e}",
                dir.display()
            ));
            return Vec::new();
        }
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    let mut files: Vec<PathBuf> = entries.iter().filter(|p| toml(p)).cloned().collect();
    for sub in entries.iter().filter(|p| p.is_dir()) {
        let Ok(inner) = std::fs::read_dir(sub) else {
            continue;
        };
        let mut inner: Vec<PathBuf> = inner
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| toml(p))
            .collect();
        inner.sort();
        files.extend(inner);
    }
    files
}

impl Registry {
    /// Scans the directories of `path` in order. The first manifest of a name wins; a later
    /// one of the same name in another directory is shadowed (as in `PATH`), one in the same
    /// directory is a warning. Bad manifests are skipped with a warning.
    pub fn scan(path: &SearchPath) -> Registry {
        let mut r = Registry {
            searched: path.clone(),
            ..Registry::default()
        };
        for dir in path.dirs() {
            let mut here: BTreeMap<String, PathBuf> = BTreeMap::new();
            for p in manifest_files(dir, &mut r.warnings) {
                match load_manifest(&p) {
                    Ok(def) => {
                        if let Some(prev) = here.get(&def.name) {
                            r.warnings.push(format!(
                                "manifest {} names pipeline '{}' already defined by {}; ignored",
                                p.display(),
                                def.name,
                                prev.display()
                            ));
                        } else {
                            here.insert(def.name.clone(), p.clone());
                            r.manifests
                                .entry(def.name.clone())
                                .or_insert_with(|| Arc::new(def));
                        }
                    }
                    Err(e) => r.warnings.push(e.to_string()),
                }
            }
        }
        r
    }

    /// Scans one directory.
    pub fn scan_dir(dir: &Path) -> Registry {
        Registry::scan(&SearchPath::dir(dir))
    }

    /// The search path this registry was scanned from.
    pub fn searched(&self) -> &SearchPath {
        &self.searched
    }

    /// The message for a pipeline name that is not known: the known names and every
    /// directory searched.
    pub fn unknown_message(&self, name: &str) -> String {
        format!(
            "Unknown pipeline '{name}'. Known pipelines: {}. Directories searched, in order: {} \
             (add directories with {PIPELINES_ENV}=dir1:dir2 or the pipelines-dir property)",
            self.names().join(", "),
            self.searched.describe()
        )
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
    fn unknown_keys_are_named_not_rejected() {
        let d = gain_def();
        let u = d
            .parse_update(
                None,
                r#"{"gain": 2, "zeta": 1, "alpha": {"x": 1}, "width": 384, "height": 384,
                    "show_reloading_frame": false, "request_id": "r", "manifest_id": "m",
                    "stream_id": "s"}"#,
            )
            .unwrap();
        assert_eq!(u.unknown, ["alpha", "zeta"]);
        assert_eq!(u.params.values["gain"], Value::Number(2.0));
        let msg = d.unknown_keys_message(&u.unknown);
        assert!(
            msg.contains("unknown keys 'alpha', 'zeta' ignored") && msg.contains("'gain'"),
            "{msg}"
        );
        // `model` is torchscript's own; for noop it is unknown.
        let ts = PipelineDef::torchscript(None).parse_update(None, r#"{"model": "x.pt"}"#);
        assert!(ts.unwrap().unknown.is_empty());
        let noop = PipelineDef::noop().parse_update(None, r#"{"model": "x.pt"}"#);
        assert_eq!(noop.unwrap().unknown, ["model"]);
        assert!(d.parse_update(None, "").unwrap().unknown.is_empty());
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

    /// `text` is refused as an invalid manifest, with a message containing `want`.
    fn assert_rejected(text: &str, want: &str) {
        match manifest(text) {
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
            assert_rejected(&format!("{head}{sel}"), want);
        }
        // The same head with a valid selector is accepted.
        let ok = format!(
            "{head}[[selectors]]\nparam = \"style\"\ntarget = \"mix\"\nnames = [\"a\", \"b\"]\n"
        );
        assert!(manifest(&ok).is_ok());
    }

    const PER_SAMPLE_MANIFEST: &str = r#"
name = "ps"
model = "ps.pt"
[params]
gain = 1.0
bias = [0.0, 0.0, 0.0]
label = "a"
[[inputs]]
param = "gain"
kind = "scalar"
per_sample = true
[[inputs]]
param = "bias"
kind = "vector"
len = 3
"#;

    #[test]
    fn per_sample_inputs_decide_which_frames_share_a_forward() {
        let d = manifest(PER_SAMPLE_MANIFEST).unwrap();
        let flags: Vec<(&str, bool)> = d
            .inputs
            .iter()
            .map(|i| (i.param.as_str(), i.per_sample))
            .collect();
        assert_eq!(flags, [("gain", true), ("bias", false)]);
        let p = |json: &str| d.parse_params(json).unwrap();
        let base = p(r#"{"gain": 0.5}"#);
        assert!(d.batchable(&base, &base));
        // Only the per-sample gain differs: one forward.
        assert!(d.batchable(&base, &p(r#"{"gain": 0.25}"#)));
        // The shared bias, a param that feeds no input, or the size differs: forwards apart.
        assert!(!d.batchable(&base, &p(r#"{"gain": 0.25, "bias": [0.5, 0, 0]}"#)));
        assert!(!d.batchable(&base, &p(r#"{"gain": 0.5, "label": "b"}"#)));
        assert!(!d.batchable(&base, &p(r#"{"gain": 0.5, "width": 448}"#)));
        assert!(!d.batchable(&base, &p(r#"{"gain": 0.5, "show_reloading_frame": false}"#)));
        // Without the flag, frames with another gain do not share a forward.
        let plain = manifest(&PER_SAMPLE_MANIFEST.replace("per_sample = true\n", "")).unwrap();
        assert!(!plain.inputs[0].per_sample);
        assert!(plain.batchable(&base, &base));
        assert!(!plain.batchable(&base, &p(r#"{"gain": 0.25}"#)));
    }

    #[test]
    fn bad_per_sample_inputs_are_rejected() {
        let head = "name = \"ps\"\nmodel = \"ps.pt\"\n[params]\ngain = 1.0\nbias = [0.0, 0.0]\n";
        let cases = [
            (
                "[[inputs]]\nparam = \"nope\"\nkind = \"scalar\"\nper_sample = true\n",
                "inputs: param 'nope' is not declared in [params]",
            ),
            (
                "[[inputs]]\nparam = \"gain\"\nkind = \"scalar\"\nper_sample = \"yes\"\n",
                "expected a boolean",
            ),
            (
                "[[inputs]]\nparam = \"gain\"\nkind = \"scalar\"\nper-sample = true\n",
                "unknown field `per-sample`",
            ),
            (
                "[[inputs]]\nparam = \"gain\"\nkind = \"scalar\"\n\
                 [[inputs]]\nparam = \"gain\"\nkind = \"scalar\"\nper_sample = true\n",
                "inputs: param 'gain' is given twice",
            ),
            (
                "[[inputs]]\nparam = \"bias\"\nkind = \"vector\"\nlen = 3\nper_sample = true\n",
                "inputs: param 'bias' has default an array of 2 numbers, which does not fit kind Vector len 3",
            ),
            (
                "[[inputs]]\nparam = \"bias\"\nkind = \"scalar\"\nper_sample = true\n",
                "inputs: param 'bias' has default an array of 2 numbers, which does not fit kind Scalar",
            ),
        ];
        for (inputs, want) in cases {
            assert_rejected(&format!("{head}{inputs}"), want);
        }
        let ok = format!(
            "{head}[[inputs]]\nparam = \"bias\"\nkind = \"vector\"\nlen = 2\nper_sample = true\n"
        );
        assert!(manifest(&ok).unwrap().inputs[0].per_sample);
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
        // mix and strength go to the model per sample: frames of any style share a forward.
        let flags: Vec<(&str, bool)> = d
            .inputs
            .iter()
            .map(|i| (i.param.as_str(), i.per_sample))
            .collect();
        assert_eq!(flags, [("mix", true), ("strength", true)]);
        let p = d.parse_params(r#"{"style": "style_7"}"#).unwrap();
        assert_eq!(p, d.parse_params(r#"{"style": 7}"#).unwrap());
        assert_eq!(mix(&p), sel.one_hot(7));
        // No style and no mix: style 0.
        assert_eq!(mix(&d.initial_params()), sel.one_hot(0));
    }

    fn sources() -> Sources {
        Sources {
            rivulet_pipelines: Some("/a::/b/c".into()),
            model_dir: Some("/models".into()),
            xdg_data_dirs: None,
            exe: Some("/opt/riv/bin/rivulet".into()),
            plugin_file: Some("/usr/lib/gstreamer-1.0/libgstaipipeline.so".into()),
            build_tree: Some("/src/models".into()),
        }
    }

    #[test]
    fn search_path_order_and_colon_separated_list() {
        let want = [
            "/a",
            "/b/c",
            "/models",
            "/usr/local/share/rivulet/pipelines",
            "/usr/share/rivulet/pipelines",
            "/opt/riv/bin/pipelines",
            "/opt/riv/bin/models",
            "/opt/riv/share/rivulet/pipelines",
            "/usr/lib/gstreamer-1.0/pipelines",
            "/usr/lib/gstreamer-1.0/models",
            "/src/models",
        ];
        let p = SearchPath::from_sources(&sources());
        assert_eq!(p.dirs(), want.map(PathBuf::from));
        // The list form reads back the same (the element's pipelines-dir, the child's spec).
        assert_eq!(SearchPath::parse(&p.to_list()), p);
        // XDG_DATA_DIRS replaces the default data dirs; a directory given twice is kept once,
        // at its first place.
        let s = Sources {
            rivulet_pipelines: Some("/usr/share/rivulet/pipelines".into()),
            model_dir: None,
            xdg_data_dirs: Some("/x:/usr/share".into()),
            exe: None,
            plugin_file: None,
            build_tree: None,
        };
        assert_eq!(
            SearchPath::from_sources(&s).dirs(),
            ["/usr/share/rivulet/pipelines", "/x/rivulet/pipelines"].map(PathBuf::from)
        );
        assert!(SearchPath::parse(":").is_empty());
    }

    #[test]
    fn scan_follows_the_order_and_looks_one_level_down() {
        let root = std::env::temp_dir().join(format!("aipipeline-search-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let write = |rel: &str, name: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, format!("name = \"{name}\"\nmodel = \"m.pt\"\n")).unwrap();
        };
        write("a/one/dup.toml", "dup");
        write("b/dup.toml", "dup");
        write("b/other.toml", "other");
        write("b/x/y/deep.toml", "deep"); // two levels down: not a manifest of b
        let (a, b, missing) = (root.join("a"), root.join("b"), root.join("nope"));
        let r = Registry::scan(&SearchPath::new([missing.clone(), a.clone(), b.clone()]));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let dup = r.resolve("dup", None).unwrap();
        assert_eq!(
            dup.source.as_deref(),
            Some(a.join("one/dup.toml").as_path())
        );
        assert_eq!(dup.model.as_deref(), Some(a.join("one/m.pt").as_path()));
        assert!(r.resolve("other", None).is_some());
        assert!(r.resolve("deep", None).is_none());
        let msg = r.unknown_message("nosuch");
        let (im, ia, ib) = (
            msg.find(&format!("{} (missing)", missing.display()))
                .unwrap(),
            msg.find(&a.display().to_string()).unwrap(),
            msg.find(&format!("{}", b.display())).unwrap(),
        );
        assert!(im < ia && ia < ib, "{msg}");
        assert!(msg.contains("Unknown pipeline 'nosuch'") && msg.contains("dup, other"));
        // The other order: b's manifest wins.
        let r = Registry::scan(&SearchPath::new([b.clone(), a]));
        let dup = r.resolve("dup", None).unwrap();
        assert_eq!(dup.source.as_deref(), Some(b.join("dup.toml").as_path()));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_build_tree_has_styletransfer_on_the_default_path() {
        let s = Sources::from_process();
        let bt = s
            .build_tree
            .clone()
            .expect("the repository's models/ exists here");
        let p = SearchPath::from_sources(&Sources {
            rivulet_pipelines: None,
            model_dir: None,
            ..s
        });
        assert!(p.dirs().contains(&bt));
        let d = Registry::scan(&p).resolve("styletransfer", None).unwrap();
        assert!(d.model.unwrap().is_file());
    }

    #[test]
    fn committed_manifests_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/pipelines");
        let r = Registry::scan_dir(&dir);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        for name in ["identity", "invert", "convnet", "gain", "persample"] {
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
