// SPDX-License-Identifier: MPL-2.0
//! `/v1/pipelines`: pipeline templates.

use super::{ApiError, detail, read_document};
use crate::daemon::Daemon;
use crate::templates::{Template, TemplateError};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use std::sync::Arc;

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/pipelines", get(list).post(create))
        .route("/v1/pipelines/{id}", get(show).delete(remove))
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
