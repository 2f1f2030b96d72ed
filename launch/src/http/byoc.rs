// SPDX-License-Identifier: MPL-2.0
//! The BYOC / pytrickle worker routes (`/stream/start`, `/stream/stop`, `/stream/params`,
//! `/stream/status`) as thin aliases of the runner handlers, with pytrickle's JSON answers
//! (docs/runner.md, "BYOC stream routes").

use crate::daemon::Daemon;
use crate::session::stream::StartRequest;
use crate::status::now_secs;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::Arc;

pub(super) fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/stream/start", post(start))
        .route("/stream/stop", post(stop))
        .route("/stream/params", post(params))
        .route("/stream/status", get(status))
}

/// pytrickle's pipeline state: `status` (= `/health`), `state`, `pipeline_ready`,
/// `active_streams`, `startup_complete`, `pipeline_state` (Rivulet's state name).
fn pipeline_state(daemon: &Daemon) -> Value {
    let state = daemon.state();
    let ready = daemon.primary().pipeline_ready();
    let running = daemon.sessions().len();
    json!({
        "status": state.health(),
        "state": state.health(),
        "error_message": null,
        "pipeline_ready": ready,
        "active_streams": running,
        "startup_complete": state != crate::health::State::Loading,
        "pipeline_state": state.as_str(),
        "additional_info": {},
    })
}

fn answer(
    code: StatusCode,
    status: &str,
    message: String,
    extra: Option<(&str, Value)>,
) -> Response {
    let mut v = json!({"status": status, "message": message});
    if let Some((k, x)) = extra {
        v[k] = x;
    }
    (code, axum::Json(v)).into_response()
}

/// A JSON object body (`Content-Type: application/json`), or the message saying why not.
async fn json_body(headers: &HeaderMap, body: Body) -> Result<Value, String> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !ct.to_ascii_lowercase().starts_with("application/json") {
        return Err(format!("Unknown content type: {ct}"));
    }
    let bytes = super::read_body(body).await?;
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))
}

fn stream_running(daemon: &Daemon) -> bool {
    !daemon.sessions().is_empty()
}

/// `POST /stream/start`: the internal start (one attempt; a running stream is replaced, as
/// the runner does). 200 `{"status":"success","message":"Stream started successfully",
/// "request_id":…,"current_state":…}`; 400 `{"status":"error","message":"Error starting
/// stream: …","current_state":…}`.
async fn start(State(daemon): State<Arc<Daemon>>, headers: HeaderMap, body: Body) -> Response {
    let received_at = now_secs();
    let fail = |d: &Daemon, m: String| {
        answer(
            StatusCode::BAD_REQUEST,
            "error",
            format!("Error starting stream: {m}"),
            Some(("current_state", pipeline_state(d))),
        )
    };
    let value = match json_body(&headers, body).await {
        Ok(v) => v,
        Err(m) => return fail(&daemon, m),
    };
    let req = match StartRequest::from_json(&value) {
        Ok(r) => r,
        Err(errs) => {
            let m = errs
                .into_iter()
                .map(|(l, m, _)| format!("{l}: {m}"))
                .collect::<Vec<_>>()
                .join("; ");
            return fail(&daemon, m);
        }
    };
    let request_id = req.request_id.clone();
    if let Err(e) = daemon.start_stream(req, received_at).await {
        return fail(&daemon, e.to_string());
    }
    let body = json!({"status": "success", "message": "Stream started successfully",
                      "request_id": request_id, "current_state": pipeline_state(&daemon)});
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// `POST /stream/stop`: 200 `{"status":"success","message":"Stream stopped successfully"}`;
/// 400 `{"status":"error","message":"No active stream to stop"}`.
async fn stop(State(daemon): State<Arc<Daemon>>) -> Response {
    if !stream_running(&daemon) {
        return answer(
            StatusCode::BAD_REQUEST,
            "error",
            "No active stream to stop".into(),
            None,
        );
    }
    daemon.stop_all("POST /stream/stop").await;
    answer(
        StatusCode::OK,
        "success",
        "Stream stopped successfully".into(),
        None,
    )
}

/// `POST /stream/params`: a complete params object, as `POST /api/params`. 200
/// `{"status":"success","message":"Parameters updated successfully"}`; 400 with
/// `"No active stream to update"` or `"Parameter update failed: …"`.
async fn params(State(daemon): State<Arc<Daemon>>, headers: HeaderMap, body: Body) -> Response {
    let fail = |m: String| {
        answer(
            StatusCode::BAD_REQUEST,
            "error",
            format!("Parameter update failed: {m}"),
            None,
        )
    };
    let value = match json_body(&headers, body).await {
        Ok(v) => v,
        Err(m) => return fail(m),
    };
    if !stream_running(&daemon) {
        return answer(
            StatusCode::BAD_REQUEST,
            "error",
            "No active stream to update".into(),
            None,
        );
    }
    match daemon.update_params(value).await {
        Ok(()) => answer(
            StatusCode::OK,
            "success",
            "Parameters updated successfully".into(),
            None,
        ),
        Err(e) => fail(e.to_string()),
    }
}

/// `GET /stream/status`: the pipeline state plus `client_active`, and while a stream runs
/// `current_params.gateway_request_id` and `fps` (input and output, 10 s windows).
async fn status(State(daemon): State<Arc<Daemon>>) -> Response {
    let mut v = pipeline_state(&daemon);
    let running = stream_running(&daemon);
    v["client_active"] = json!(running);
    if running {
        let s = daemon.status();
        let (request_id, _, _) = daemon.primary().ids();
        v["client_running"] = json!(true);
        v["current_params"] = json!({"gateway_request_id": request_id});
        v["fps"] = json!({"input": s.input_status.fps, "output": s.inference_status.fps});
    }
    axum::Json(v).into_response()
}
