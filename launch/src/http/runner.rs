// SPDX-License-Identifier: MPL-2.0
//! The runner's routes: its container API, its internal API, `/metrics` and the dashboard
//! (docs/runner.md, "HTTP API").

use super::{ApiError, read_body};
use crate::daemon::Daemon;
use crate::session::StartError;
use crate::session::stream::StartRequest;
use crate::status::now_secs;
use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

pub(super) fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/live-video-to-video", post(container_start))
        .route("/live-video-to-video/", post(container_start))
        .route("/health", get(health))
        .route("/hardware/info", get(hardware_info))
        .route("/hardware/stats", get(hardware_stats))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/api/live-video-to-video", post(internal_start))
        .route("/api/params", post(internal_params))
        .route("/api/status", get(internal_status))
        .route("/api/dashboard", get(dashboard_data))
        .route("/api/preview/input.jpg", get(preview_input))
        .route("/api/preview/output.jpg", get(preview_output))
        .route("/", get(dashboard))
        .route("/openapi.json", get(super::openapi::serve))
}

/// Parses a start body, reporting every problem in FastAPI's shape.
fn parse_start(body: &[u8]) -> Result<StartRequest, Vec<(String, String, &'static str)>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        vec![(
            "body".to_string(),
            format!("JSON decode error: {e}"),
            "json_invalid",
        )]
    })?;
    StartRequest::from_json(&value)
}

async fn container_start(
    State(daemon): State<Arc<Daemon>>,
    body: Body,
) -> Result<Response, ApiError> {
    let received_at = now_secs();
    let body = read_body(body)
        .await
        .map_err(|m| ApiError::Detail(StatusCode::PAYLOAD_TOO_LARGE, m))?;
    let req = parse_start(&body).map_err(ApiError::Validation)?;
    if !req.model_id.is_empty() && req.model_id != daemon.config.pipeline {
        return Err(ApiError::Detail(
            StatusCode::BAD_REQUEST,
            format!(
                "pipeline configured with {} but called with {}.",
                daemon.config.pipeline, req.model_id
            ),
        ));
    }
    // As patient as the runner: up to 10 attempts, 1 s apart.
    let mut last = String::new();
    for attempt in 0..10 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match daemon.start_stream(req.clone(), received_at).await {
            Ok(()) => {
                return Ok(axum::Json(json!({
                    "publish_url": "", "subscribe_url": "", "control_url": "",
                    "events_url": "", "request_id": "", "manifest_id": ""
                }))
                .into_response());
            }
            Err(StartError::Invalid(msg)) => {
                return Err(ApiError::Detail(StatusCode::BAD_REQUEST, msg));
            }
            Err(StartError::Full(msg)) => {
                return Err(ApiError::Detail(StatusCode::SERVICE_UNAVAILABLE, msg));
            }
            Err(e) => {
                tracing::warn!(attempt, "stream start failed: {e}");
                last = e.to_string();
            }
        }
    }
    let msg = if last.to_lowercase().contains("out of memory") {
        "Out of memory error. Try reducing input image resolution."
    } else {
        "live-video-to-video pipeline error."
    };
    Err(ApiError::Detail(
        StatusCode::INTERNAL_SERVER_ERROR,
        msg.into(),
    ))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json"))
}

async fn internal_start(
    State(daemon): State<Arc<Daemon>>,
    headers: HeaderMap,
    body: Body,
) -> Result<&'static str, ApiError> {
    let received_at = now_secs();
    let fail = |m: String| {
        ApiError::Text(
            StatusCode::BAD_REQUEST,
            format!("Error starting stream: {m}"),
        )
    };
    if !is_json(&headers) {
        return Err(fail("Content-Type must be application/json".into()));
    }
    let body = read_body(body).await.map_err(fail)?;
    let req = parse_start(&body).map_err(|errs| {
        fail(
            errs.into_iter()
                .map(|(l, m, _)| format!("{l}: {m}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    match daemon.start_stream(req, received_at).await {
        Ok(()) => Ok("Stream started successfully"),
        Err(StartError::Full(m)) => Err(ApiError::Text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Error starting stream: {m}"),
        )),
        Err(e) => Err(fail(e.to_string())),
    }
}

async fn internal_params(
    State(daemon): State<Arc<Daemon>>,
    body: Body,
) -> Result<&'static str, ApiError> {
    let fail = |m: String| {
        ApiError::Text(
            StatusCode::BAD_REQUEST,
            format!("Error updating params: {m}"),
        )
    };
    let body = read_body(body).await.map_err(fail)?;
    let params: Value =
        serde_json::from_slice(&body).map_err(|e| fail(format!("invalid JSON: {e}")))?;
    daemon
        .update_params(params)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok("Params updated successfully")
}

async fn internal_status(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    axum::Json(daemon.status())
}

async fn health(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    axum::Json(json!({"status": daemon.state().health()}))
}

async fn version(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    let c = &daemon.config;
    axum::Json(json!({"pipeline": c.pipeline_kind, "model_id": c.pipeline, "version": c.version}))
}

async fn hardware_info(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    let c = &daemon.config;
    let gpus = tokio::task::spawn_blocking(crate::nvml::gpu_info)
        .await
        .unwrap_or_else(|_| json!({}));
    axum::Json(json!({"pipeline": c.pipeline_kind, "model_id": c.pipeline, "gpu_info": gpus}))
}

async fn hardware_stats(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    let c = &daemon.config;
    let gpus = tokio::task::spawn_blocking(crate::nvml::gpu_stats)
        .await
        .unwrap_or_else(|_| json!({}));
    axum::Json(json!({"pipeline": c.pipeline_kind, "model_id": c.pipeline, "gpu_stats": gpus}))
}

/// Prometheus text format (docs/runner.md, "Metrics"; `super::metrics`).
pub fn metrics_text(daemon: &Daemon) -> String {
    super::metrics::render(daemon)
}

async fn metrics(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
        metrics_text(&daemon),
    )
}

/// `?session=ID`: the session a dashboard view or preview is about (else the primary one).
#[derive(Debug, Default, serde::Deserialize)]
struct Chosen {
    session: Option<String>,
}

async fn dashboard_data(
    State(daemon): State<Arc<Daemon>>,
    Query(chosen): Query<Chosen>,
) -> impl IntoResponse {
    axum::Json(daemon.dashboard(chosen.session.as_deref()))
}

fn preview(daemon: &Daemon, input: bool, session: Option<&str>) -> Response {
    match daemon.preview(input, session) {
        Some(jpeg) => ([(header::CONTENT_TYPE, "image/jpeg")], jpeg).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"detail": {"msg": "no preview yet: no stream is running"}})),
        )
            .into_response(),
    }
}

async fn preview_input(
    State(daemon): State<Arc<Daemon>>,
    Query(chosen): Query<Chosen>,
) -> Response {
    preview(&daemon, true, chosen.session.as_deref())
}

async fn preview_output(
    State(daemon): State<Arc<Daemon>>,
    Query(chosen): Query<Chosen>,
) -> Response {
    preview(&daemon, false, chosen.session.as_deref())
}

async fn dashboard() -> impl IntoResponse {
    Html(include_str!("dashboard.html"))
}
