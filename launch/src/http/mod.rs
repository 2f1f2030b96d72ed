// SPDX-License-Identifier: MPL-2.0
//! The HTTP handlers: the runner's container API, its internal API, `/metrics` and the
//! dashboard (`runner.rs`, docs/runner.md, "HTTP API"), the sessions (`sessions.rs`), pipeline
//! templates, file jobs and the realtime feed, on one port.
//!
//! Layer: the top. Handlers call the supervisor (`crate::daemon`); nothing imports them but
//! `serve`, which serves the router.

mod auth;
mod byoc;
mod feed;
mod jobs;
mod metrics;
pub mod openapi;
pub mod routes;
mod runner;
mod sessions;
mod templates;

pub use auth::protect;
pub use runner::metrics_text;

use crate::daemon::Daemon;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;

/// Largest request body accepted (params can be large ComfyUI workflows).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// One error type for every endpoint, in the shape each endpoint family uses.
#[derive(Debug)]
pub enum ApiError {
    /// Container API: `{"detail":{"msg":…}}`.
    Detail(StatusCode, String),
    /// FastAPI's validation-error shape, 422.
    Validation(Vec<(String, String, &'static str)>),
    /// Container API auth failure.
    Unauthorized,
    /// Internal API: plain text.
    Text(StatusCode, String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Detail(code, msg) => {
                (code, axum::Json(json!({"detail": {"msg": msg}}))).into_response()
            }
            ApiError::Validation(errors) => {
                let detail: Vec<Value> = errors
                    .into_iter()
                    .map(|(loc, msg, kind)| json!({"loc": ["body", loc], "msg": msg, "type": kind}))
                    .collect();
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    axum::Json(json!({"detail": detail})),
                )
                    .into_response()
            }
            ApiError::Unauthorized => {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"detail": {"msg": "Invalid bearer token."}})),
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            ApiError::Text(code, text) => (code, text).into_response(),
        }
    }
}

/// How much of an oversized body is read and thrown away before answering 413: closing the
/// connection on a client still sending makes its kernel see a reset that can destroy the
/// 413 response before the client reads it.
const DRAIN_BYTES: usize = 8 * MAX_BODY_BYTES;

/// A request body of at most [`MAX_BODY_BYTES`]; a larger one is an error (413) after the rest
/// of it, up to [`DRAIN_BYTES`], has been read and dropped.
pub(crate) async fn read_body(body: Body) -> Result<bytes::Bytes, String> {
    use futures::StreamExt;
    let too_large = || format!("request body larger than {MAX_BODY_BYTES} bytes");
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("request body unreadable: {e}"))?;
        total += chunk.len();
        if total > DRAIN_BYTES {
            return Err(too_large());
        }
        if total <= MAX_BODY_BYTES {
            buf.extend_from_slice(&chunk);
        }
    }
    if total > MAX_BODY_BYTES {
        return Err(too_large());
    }
    Ok(buf.freeze())
}

/// Every route of the daemon (the embedded trickle server's are added by `serve`).
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .merge(runner::routes())
        .merge(sessions::routes())
        .merge(byoc::routes())
        .merge(templates::routes())
        .merge(jobs::routes())
        .merge(feed::routes())
        .with_state(daemon)
}

/// The `{"detail":{"msg":…}}` error of Rivulet's own `/v1` endpoints.
pub(crate) fn detail(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError::Detail(code, msg.into())
}

/// A JSON body, or YAML when the content type says so (`application/yaml`, `text/yaml`).
pub(crate) async fn read_document(headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let bytes = read_body(body)
        .await
        .map_err(|m| ApiError::Detail(StatusCode::PAYLOAD_TOO_LARGE, m))?;
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("yaml"));
    if yaml {
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            ApiError::Detail(StatusCode::BAD_REQUEST, "the YAML body is not UTF-8".into())
        })?;
        serde_norway::from_str::<Value>(text)
            .map_err(|e| ApiError::Detail(StatusCode::BAD_REQUEST, format!("invalid YAML: {e}")))
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::Detail(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
    }
}
