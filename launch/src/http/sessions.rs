// SPDX-License-Identifier: MPL-2.0
//! `/v1/sessions`: the live sessions of a daemon (docs/runner.md, "Many sessions").

use super::{ApiError, read_body};
use crate::daemon::Daemon;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::Arc;

pub(super) fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/sessions", get(list))
        .route("/v1/sessions/{id}", get(show).delete(stop))
        .route("/v1/sessions/{id}/params", post(params))
}

fn not_found(id: &str) -> ApiError {
    ApiError::Detail(StatusCode::NOT_FOUND, format!("no session '{id}'"))
}

/// `GET /v1/sessions`: `{"max_sessions": N, "sessions": [...]}`, oldest first.
async fn list(State(daemon): State<Arc<Daemon>>) -> Result<axum::Json<Value>, ApiError> {
    let sessions: Vec<_> = daemon
        .sessions()
        .iter()
        .map(|s| daemon.session_info(s))
        .collect();
    Ok(axum::Json(
        json!({"max_sessions": daemon.capacity(), "sessions": sessions}),
    ))
}

/// `GET /v1/sessions/{id}`: the session's summary and its status object.
async fn show(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let s = daemon.session(&id).ok_or_else(|| not_found(&id))?;
    let mut v = json!(daemon.session_info(&s));
    if let Some(o) = v.as_object_mut() {
        o.insert("status".into(), json!(s.status()));
    }
    Ok(axum::Json(v))
}

/// `DELETE /v1/sessions/{id}`: stops the session's stream (its output and events channels are
/// closed as on any stop).
async fn stop(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
) -> Result<axum::Json<Value>, ApiError> {
    if daemon.stop_session(&id, "stopped through the API").await {
        Ok(axum::Json(json!({"id": id, "stopped": true})))
    } else {
        Err(not_found(&id))
    }
}

/// `POST /v1/sessions/{id}/params`: a full params replacement for one session, validated as
/// `/api/params` is.
async fn params(
    State(daemon): State<Arc<Daemon>>,
    UrlPath(id): UrlPath<String>,
    body: Body,
) -> Result<axum::Json<Value>, ApiError> {
    let s = daemon.session(&id).ok_or_else(|| not_found(&id))?;
    let body = read_body(body)
        .await
        .map_err(|m| ApiError::Detail(StatusCode::PAYLOAD_TOO_LARGE, m))?;
    let params: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Detail(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
    s.update_params(params)
        .await
        .map_err(|e| ApiError::Detail(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok(axum::Json(json!({"id": id, "params": s.current_params()})))
}
