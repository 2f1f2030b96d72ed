// SPDX-License-Identifier: MPL-2.0
//! Pipeline templates: named graph definitions saved through `POST /v1/pipelines`, validated
//! before they are kept, and persisted in the data directory (`RIVULET_DATA_DIR`) as one JSON
//! file per template (`pipelines/<id>.json`, written to a temporary file, synced, then renamed),
//! so they survive a restart. A stream start or a file job may name a template instead of a
//! pipeline ([`Templates::lookup`]).

use crate::api::ApiError;
use crate::config::Config;
use crate::daemon::Daemon;
use crate::graph::{self, GraphDef, GraphError};
use crate::status::now_secs;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A saved definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    pub id: String,
    /// The definition as given (a name, a list of stages or `{"stages": …}`).
    pub definition: Value,
    /// The parsed graph (every stage's id and inputs explicit).
    pub graph: GraphDef,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub created_at: f64,
    pub updated_at: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid template id {0:?}: use 1 to 64 letters, digits, '-' or '_'")]
    BadId(String),
    #[error("{0}")]
    Invalid(#[from] GraphError),
    #[error("no template named '{0}'")]
    NotFound(String),
    #[error("cannot store template '{id}' in {dir}: {err}")]
    Io {
        id: String,
        dir: String,
        err: std::io::Error,
    },
}

/// Template ids become file names: a conservative alphabet.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The template store: an in-memory map mirrored in `dir`.
#[derive(Debug)]
pub struct Templates {
    dir: PathBuf,
    items: Mutex<BTreeMap<String, Template>>,
}

impl Templates {
    /// Opens the store in `<data_dir>/pipelines`, loading every template found there. A file
    /// that cannot be read is skipped with a warning (it is left in place).
    pub fn open(data_dir: &Path) -> Templates {
        let dir = data_dir.join("pipelines");
        let mut items = BTreeMap::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
                    if path.extension().is_none_or(|e| e != "json") {
                        continue;
                    }
                    let loaded = std::fs::read(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|b| {
                            serde_json::from_slice::<Template>(&b).map_err(|e| e.to_string())
                        });
                    match loaded {
                        Ok(t) if valid_id(&t.id) => {
                            items.insert(t.id.clone(), t);
                        }
                        Ok(t) => tracing::warn!(
                            "template file {} has an invalid id {:?}; skipped",
                            path.display(),
                            t.id
                        ),
                        Err(e) => {
                            tracing::warn!("cannot load template {}: {e}; skipped", path.display())
                        }
                    }
                }
                tracing::info!("{} pipeline template(s) in {}", items.len(), dir.display());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot read templates directory {}: {e}", dir.display()),
        }
        Templates {
            dir,
            items: Mutex::new(items),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn list(&self) -> Vec<Template> {
        self.items.lock().unwrap().values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<Template> {
        self.items.lock().unwrap().get(id).cloned()
    }

    /// The graph of template `id`, for a stream start or a job naming a template.
    pub fn lookup(&self, id: &str) -> Option<GraphDef> {
        self.get(id).map(|t| t.graph)
    }

    /// Validates `definition` and saves it as `id` (replacing a template of that id). Returns
    /// the template and whether it is new. Blocking (file I/O, GStreamer registry look-ups).
    pub fn save(
        &self,
        id: &str,
        definition: Value,
        description: String,
        cfg: &Config,
    ) -> Result<(Template, bool), TemplateError> {
        if !valid_id(id) {
            return Err(TemplateError::BadId(id.to_owned()));
        }
        let graph = graph::parse(&definition)?;
        graph::validate(&graph, cfg)?;
        let mut items = self.items.lock().unwrap();
        let now = now_secs();
        let created_at = items.get(id).map(|t| t.created_at).unwrap_or(now);
        let t = Template {
            id: id.to_owned(),
            definition,
            graph,
            description,
            created_at,
            updated_at: now,
        };
        self.write(&t).map_err(|err| TemplateError::Io {
            id: id.to_owned(),
            dir: self.dir.display().to_string(),
            err,
        })?;
        let new = items.insert(id.to_owned(), t.clone()).is_none();
        Ok((t, new))
    }

    /// Deletes template `id` (its file first, so a failure leaves both in place).
    pub fn delete(&self, id: &str) -> Result<Template, TemplateError> {
        let mut items = self.items.lock().unwrap();
        if !items.contains_key(id) {
            return Err(TemplateError::NotFound(id.to_owned()));
        }
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(TemplateError::Io {
                    id: id.to_owned(),
                    dir: self.dir.display().to_string(),
                    err,
                });
            }
        }
        items
            .remove(id)
            .ok_or_else(|| TemplateError::NotFound(id.to_owned()))
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Atomic write: a temporary file in the same directory, synced, then renamed over.
    fn write(&self, t: &Template) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self
            .dir
            .join(format!(".{}.json.tmp-{}", t.id, std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(t).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.path(&t.id))?;
            // The rename itself is durable once the directory is synced.
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Whether `name` names a definition file (`.yaml`, `.yml`, `.json`) rather than a template
/// or pipeline.
pub fn is_definition_file(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|e| lower.ends_with(e))
}

/// Resolves what a job or a start names: a template id first, else a definition file
/// (`FILE.yaml`, `FILE.yml`, `FILE.json`, see [`graph::parse_file`]), else a pipeline name.
/// Validated against `cfg`.
pub fn resolve(templates: &Templates, name: &str, cfg: &Config) -> Result<GraphDef, GraphError> {
    let graph = match templates.lookup(name) {
        Some(g) => g,
        None if is_definition_file(name) => {
            graph::parse_file(std::path::Path::new(name)).map_err(|e| match e {
                GraphError::Syntax(m) if !m.contains(name) => {
                    GraphError::Syntax(format!("{name}: {m}"))
                }
                e => e,
            })?
        }
        None => graph::parse(&Value::String(name.to_owned()))?,
    };
    graph::validate(&graph, cfg)?;
    Ok(graph)
}

// ---- HTTP: /v1/pipelines ----

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/pipelines", get(list).post(create))
        .route("/v1/pipelines/{id}", get(show).delete(remove))
}

fn detail(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError::Detail(code, msg.into())
}

/// A JSON body, or YAML when the content type says so (`application/yaml`, `text/yaml`).
pub(crate) async fn read_document(headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let bytes = crate::api::read_body(body)
        .await
        .map_err(|m| detail(StatusCode::PAYLOAD_TOO_LARGE, m))?;
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("yaml"));
    if yaml {
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| detail(StatusCode::BAD_REQUEST, "the YAML body is not UTF-8"))?;
        serde_norway::from_str::<Value>(text)
            .map_err(|e| detail(StatusCode::BAD_REQUEST, format!("invalid YAML: {e}")))
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| detail(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
    }
}

/// `POST /v1/pipelines` with `{"id": "…", "pipeline": <definition>, "description": "…"}`:
/// 201 (new) or 200 (replaced) with the template; 400 naming the stage when invalid.
async fn create(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let doc = read_document(&headers, body).await?;
    let Some(obj) = doc.as_object() else {
        return Err(detail(
            StatusCode::BAD_REQUEST,
            "the body must be an object: {\"id\": …, \"pipeline\": …}",
        ));
    };
    let id = obj
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| detail(StatusCode::BAD_REQUEST, "missing string field 'id'"))?
        .to_owned();
    let definition = obj.get("pipeline").cloned().ok_or_else(|| {
        detail(
            StatusCode::BAD_REQUEST,
            "missing field 'pipeline' (the definition)",
        )
    })?;
    let description = obj
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let d = daemon.clone();
    let saved = tokio::task::spawn_blocking(move || {
        d.templates.save(&id, definition, description, &d.config)
    })
    .await
    .map_err(|e| {
        detail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("save failed: {e}"),
        )
    })?;
    match saved {
        Ok((t, new)) => {
            tracing::info!(id = %t.id, new, "pipeline template saved");
            let code = if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((code, axum::Json(t)).into_response())
        }
        Err(e @ TemplateError::Io { .. }) => {
            Err(detail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        }
        Err(e) => Err(detail(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

async fn list(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    axum::Json(json!({"pipelines": daemon.templates.list()}))
}

async fn show(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<Template>, ApiError> {
    daemon
        .templates
        .get(&id)
        .map(axum::Json)
        .ok_or_else(|| detail(StatusCode::NOT_FOUND, format!("no template named '{id}'")))
}

async fn remove(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let d = daemon.clone();
    let i = id.clone();
    match tokio::task::spawn_blocking(move || d.templates.delete(&i)).await {
        Ok(Ok(_)) => Ok(axum::Json(json!({"id": id, "deleted": true}))),
        Ok(Err(e @ TemplateError::NotFound(_))) => {
            Err(detail(StatusCode::NOT_FOUND, e.to_string()))
        }
        Ok(Err(e)) => Err(detail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => Err(detail(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("delete failed: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("rivulet-templates-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ids_are_safe_file_names() {
        assert!(valid_id("two-styles_v2"));
        for bad in ["", "../x", "a/b", "a.json", &"x".repeat(65), "é"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn saved_templates_are_reloaded_and_deleted() {
        gst::init().unwrap();
        let d = dir("unit");
        let cfg = Config::from_env().unwrap();
        let store = Templates::open(&d);
        let (t, new) = store
            .save("chain", json!(["noop", "noop"]), "two noops".into(), &cfg)
            .unwrap();
        assert!(new);
        assert_eq!(t.graph.stages.len(), 2);
        let (_, new) = store
            .save("chain", json!("noop"), String::new(), &cfg)
            .unwrap();
        assert!(!new, "same id replaces");
        assert!(matches!(
            store.save("bad", json!(["no-such-pipeline"]), String::new(), &cfg),
            Err(TemplateError::Invalid(_))
        ));
        assert!(matches!(
            store.save("../x", json!("noop"), String::new(), &cfg),
            Err(TemplateError::BadId(_))
        ));
        // No temporary file left behind; one file per template.
        let files: Vec<_> = std::fs::read_dir(d.join("pipelines"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, vec!["chain.json".to_string()]);

        let reopened = Templates::open(&d);
        assert_eq!(reopened.get("chain"), store.get("chain"));
        assert_eq!(reopened.lookup("chain").unwrap().stages.len(), 1);
        reopened.delete("chain").unwrap();
        assert!(matches!(
            reopened.delete("chain"),
            Err(TemplateError::NotFound(_))
        ));
        assert!(Templates::open(&d).list().is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }
}
