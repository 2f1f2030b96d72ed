// SPDX-License-Identifier: MPL-2.0
//! `/v1/jobs`: file jobs.

use super::{ApiError, detail, read_document};
use crate::daemon::Daemon;
use crate::jobs::{CancelError, JobSpec, JobState, JobStatus, SubmitError, prepare};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/jobs", get(list).post(create))
        .route("/v1/jobs/{id}", get(show).delete(remove))
}

/// `POST /v1/jobs` with `{"input": PATH, "output": PATH, "pipeline": NAME|TEMPLATE,
/// "params": {…}}` (paths on the daemon's machine): 201 with the job's status.
async fn create(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let doc = read_document(&headers, body).await?;
    let field = |k: &str| {
        doc.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| {
                detail(
                    StatusCode::BAD_REQUEST,
                    format!("missing string field '{k}'"),
                )
            })
    };
    let spec = JobSpec {
        input: PathBuf::from(field("input")?),
        output: PathBuf::from(field("output")?),
        pipeline: field("pipeline")?,
        params: doc.get("params").cloned().unwrap_or_else(|| json!({})),
    };
    let d = daemon.clone();
    let submitted = tokio::task::spawn_blocking(move || {
        let graph = prepare(&spec, &d.templates, &d.config)
            .map_err(|m| detail(StatusCode::BAD_REQUEST, m))?;
        d.jobs
            .submit(d.feed.clone(), d.config.clone(), spec, graph)
            .map_err(|e| match e {
                SubmitError::QueueFull => detail(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
                SubmitError::Worker(_) => detail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            })
    })
    .await
    .map_err(|e| detail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((StatusCode::CREATED, axum::Json(submitted?)).into_response())
}

async fn list(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    axum::Json(json!({"jobs": daemon.jobs.list()}))
}

async fn show(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<JobStatus>, ApiError> {
    daemon
        .jobs
        .get(&id)
        .map(axum::Json)
        .ok_or_else(|| detail(StatusCode::NOT_FOUND, format!("no job '{id}'")))
}

/// `DELETE /v1/jobs/{id}`: 200 with the status when a queued job is cancelled, 202 when a
/// running job is told to stop (it then ends `cancelled`, on the feed and in `GET`), 409 when
/// the job has already ended, 404 when there is no such job.
async fn remove(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    match daemon.jobs.cancel(&id) {
        Ok(s) if s.state == JobState::Cancelled => {
            daemon
                .feed
                .send("progress", json!({"type": "progress", "job": s}));
            Ok((StatusCode::OK, axum::Json(s)).into_response())
        }
        Ok(s) => Ok((StatusCode::ACCEPTED, axum::Json(s)).into_response()),
        Err(CancelError::NotFound) => Err(detail(StatusCode::NOT_FOUND, format!("no job '{id}'"))),
        Err(e @ CancelError::Finished(_)) => {
            Err(detail(StatusCode::CONFLICT, format!("job '{id}': {e}")))
        }
    }
}
