// SPDX-License-Identifier: MPL-2.0
//! The BYOC / pytrickle worker routes of a real `rivulet serve`: `/stream/start`, `/stream/stop`,
//! `/stream/params`, `/stream/status`, with pytrickle's answers, on a stream whose channels live
//! on the daemon's embedded trickle server.

use serde_json::{Value, json};
use std::time::Duration;

mod common;
use common::{get_json, idle_daemon_with_channels, wait_health};

async fn post(http: &reqwest::Client, url: &str, body: Option<&Value>) -> (u16, Value) {
    let mut req = http.post(url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_routes_map_onto_the_runner_handlers() {
    let mid = "byoc";
    let (_d, http, base) = idle_daemon_with_channels("byoc", "none", &[], mid).await;
    let status = get_json(&http, &format!("{base}/stream/status")).await;
    assert_eq!(status["status"], "IDLE", "{status}");
    assert_eq!(status["client_active"], false);
    assert_eq!(status["pipeline_ready"], true);

    // Nothing running yet.
    let (code, v) = post(&http, &format!("{base}/stream/stop"), None).await;
    assert_eq!(
        (code, v),
        (
            400,
            json!({"status": "error", "message": "No active stream to stop"})
        )
    );
    let (code, v) = post(&http, &format!("{base}/stream/params"), Some(&json!({}))).await;
    assert_eq!(
        (code, v),
        (
            400,
            json!({"status": "error", "message": "No active stream to update"})
        )
    );

    // Bad starts.
    let r = http
        .post(format!("{base}/stream/start"))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "error");
    assert_eq!(
        v["message"],
        "Error starting stream: Unknown content type: text/plain"
    );
    assert_eq!(v["current_state"]["status"], "IDLE");
    let (code, v) = post(
        &http,
        &format!("{base}/stream/start"),
        Some(&json!({"gateway_request_id": "x"})),
    )
    .await;
    assert_eq!(code, 400);
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.starts_with("Error starting stream: subscribe_url: Field required"),
        "{msg}"
    );

    // A start.
    let t = format!("{base}/trickle/{mid}");
    let start = json!({
        "subscribe_url": t, "publish_url": format!("{t}-out"),
        "control_url": format!("{t}-control"), "events_url": format!("{t}-events"),
        "gateway_request_id": "byoc-1", "params": {},
    });
    let (code, v) = post(&http, &format!("{base}/stream/start"), Some(&start)).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["status"], "success");
    assert_eq!(v["message"], "Stream started successfully");
    assert_eq!(v["request_id"], "byoc-1");
    assert_eq!(v["current_state"]["active_streams"], 1);
    let status = get_json(&http, &format!("{base}/stream/status")).await;
    assert_eq!(status["client_active"], true, "{status}");
    assert_eq!(status["current_params"]["gateway_request_id"], "byoc-1");

    // Params: the runner's validation, full replacement.
    let (code, v) = post(
        &http,
        &format!("{base}/stream/params"),
        Some(&json!({"width": 100})),
    )
    .await;
    assert_eq!(code, 400);
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.starts_with("Parameter update failed: width must be a multiple of 64"),
        "{msg}"
    );
    let (code, v) = post(
        &http,
        &format!("{base}/stream/params"),
        Some(&json!({"prompt": "a cat"})),
    )
    .await;
    assert_eq!(
        (code, v),
        (
            200,
            json!({"status": "success", "message": "Parameters updated successfully"})
        )
    );
    let s = get_json(&http, &format!("{base}/api/status")).await;
    assert_eq!(
        s["inference_status"]["last_params"],
        json!({"prompt": "a cat"})
    );

    // Stop.
    let (code, v) = post(&http, &format!("{base}/stream/stop"), None).await;
    assert_eq!(
        (code, v),
        (
            200,
            json!({"status": "success", "message": "Stream stopped successfully"})
        )
    );
    wait_health(&http, &base, "IDLE", Duration::from_secs(20)).await;
    let status = get_json(&http, &format!("{base}/stream/status")).await;
    assert_eq!(status["client_active"], false, "{status}");
}
