// SPDX-License-Identifier: MPL-2.0
//! `/v1/pipelines`: templates are validated (a 400 naming the stage), listed, shown, deleted,
//! and survive a daemon restart (one `rivulet serve` process after another on the same
//! `RIVULET_DATA_DIR`).

use serde_json::{Value, json};

mod common;
use common::{TempDir, spawn_daemon};

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    (code, body)
}

/// The template ids of a `GET /v1/pipelines` answer, in its order.
fn template_ids(body: &Value) -> Vec<&str> {
    body["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_validated_and_survive_a_restart() {
    let data = TempDir::new("templates-data-dir");
    let data_dir = data.0.to_string_lossy().to_string();
    let envs = [("RIVULET_DATA_DIR", data_dir.as_str())];
    let http = reqwest::Client::new();

    let chain = json!(["noop", {"id": "second", "pipeline": "noop"}]);
    {
        let d = spawn_daemon("templates-1", &envs);
        let base = &d.base;
        let (code, body) = send(http.get(format!("{base}/v1/pipelines"))).await;
        assert_eq!((code, body), (200, json!({"pipelines": []})));

        let (code, t) = send(
            http.post(format!("{base}/v1/pipelines"))
                .json(&json!({"id": "chain", "pipeline": chain, "description": "two noops"})),
        )
        .await;
        assert_eq!(code, 201, "{t}");
        assert_eq!(t["id"], "chain");
        assert_eq!(t["definition"], chain);
        assert_eq!(t["graph"]["stages"][1]["id"], "second");
        assert_eq!(t["graph"]["stages"][1]["inputs"], json!(["noop"]));

        // YAML, as for files.
        let (code, y) = send(
            http.post(format!("{base}/v1/pipelines"))
                .header("Content-Type", "application/yaml")
                .body("id: single\npipeline: noop\n"),
        )
        .await;
        assert_eq!(code, 201, "{y}");

        // Invalid definitions: 400 in the daemon's error shape, naming the stage.
        let bad = [
            (
                json!({"id": "bad", "pipeline": ["noop", {"id": "x", "pipeline": "no-such"}]}),
                "stage 'x': unknown pipeline 'no-such'",
            ),
            (
                json!({"id": "bad", "pipeline": {"stages": [
                    {"id": "a", "pipeline": "noop", "inputs": ["b"]},
                    {"id": "b", "pipeline": "noop", "inputs": ["a"]}]}}),
                "cycle",
            ),
            (
                json!({"id": "bad", "pipeline": {"stages": [
                    {"id": "a", "pipeline": "noop", "inputs": ["nowhere"]}]}}),
                "stage 'a' takes its input from 'nowhere'",
            ),
            (
                json!({"id": "../escape", "pipeline": "noop"}),
                "invalid template id",
            ),
            (json!({"pipeline": "noop"}), "missing string field 'id'"),
        ];
        for (req, want) in bad {
            let (code, body) = send(http.post(format!("{base}/v1/pipelines")).json(&req)).await;
            assert_eq!(code, 400, "{req} → {body}");
            let msg = body["detail"]["msg"].as_str().unwrap_or_default();
            assert!(msg.contains(want), "{req}: {msg:?} should contain {want:?}");
        }
        let (code, body) = send(
            http.post(format!("{base}/v1/pipelines"))
                .header("Content-Type", "application/json")
                .body("{not json"),
        )
        .await;
        assert_eq!(code, 400);
        assert!(
            body["detail"]["msg"]
                .as_str()
                .unwrap()
                .contains("invalid JSON")
        );

        // Same id again replaces (200).
        let (code, _) = send(
            http.post(format!("{base}/v1/pipelines"))
                .json(&json!({"id": "single", "pipeline": ["noop"]})),
        )
        .await;
        assert_eq!(code, 200);
    }
    // The first daemon is gone; a new one reads the data directory.
    {
        let d = spawn_daemon("templates-2", &envs);
        let base = &d.base;
        let (code, body) = send(http.get(format!("{base}/v1/pipelines"))).await;
        assert_eq!(code, 200);
        assert_eq!(template_ids(&body), ["chain", "single"]);
        let (code, t) = send(http.get(format!("{base}/v1/pipelines/chain"))).await;
        assert_eq!(code, 200);
        assert_eq!(t["definition"], chain);
        assert_eq!(t["description"], "two noops");
        assert_eq!(t["graph"]["stages"].as_array().unwrap().len(), 2);

        let (code, body) = send(http.delete(format!("{base}/v1/pipelines/chain"))).await;
        assert_eq!((code, body), (200, json!({"id": "chain", "deleted": true})));
        let (code, body) = send(http.get(format!("{base}/v1/pipelines/chain"))).await;
        assert_eq!(code, 404);
        assert_eq!(body["detail"]["msg"], "no template named 'chain'");
        let (code, _) = send(http.delete(format!("{base}/v1/pipelines/chain"))).await;
        assert_eq!(code, 404);
    }
    // Deletion persists too.
    let d = spawn_daemon("templates-3", &envs);
    let (_, body) = send(http.get(format!("{}/v1/pipelines", d.base))).await;
    assert_eq!(template_ids(&body), ["single"]);
    // One file per template, no temporary file left behind.
    let mut files: Vec<String> = std::fs::read_dir(data.0.join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["single.json"]);
}
