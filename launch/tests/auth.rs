// SPDX-License-Identifier: MPL-2.0
//! Bearer auth over the daemon's whole port (`launch/src/auth.rs`), against a real
//! `rivulet serve`: every route of `rivulet::http::routes::ROUTES` refuses a request without a token
//! and with a wrong one (401, JSON body, `WWW-Authenticate: Bearer`) and takes the right one;
//! the open routes stay open; `AUTH_TOKEN` alone keeps the runner's scope; and with
//! `RIVULET_API_TOKEN` set a stream through the embedded trickle server still runs (the
//! daemon's own publishers carry the token, trickle GETs are open).

mod common;

use common::*;
use gst::prelude::*;
use rivulet::http::routes::{Access, ROUTES, Route};
use serde_json::{Value, json};
use std::time::Duration;

/// A request path for `r`: its parameters filled in. Trickle GETs name a channel that does not
/// exist (answered at once; a GET on an existing channel waits for its segment).
fn concrete(r: &Route) -> String {
    let channel = if r.method == "GET" {
        "no-such-channel"
    } else {
        "auth-chan"
    };
    r.path
        .replace("{id}", "no-such-id")
        .replace("{channel}", channel)
        .replace("{seq}", "0")
}

async fn call(
    http: &reqwest::Client,
    base: &str,
    r: &Route,
    token: Option<&str>,
) -> reqwest::Response {
    let url = format!("{base}{}", concrete(r));
    let method = reqwest::Method::from_bytes(r.method.as_bytes()).unwrap();
    let mut req = http
        .request(method, url)
        .timeout(Duration::from_secs(30))
        .header("Content-Type", "application/json");
    if r.method == "POST" {
        req = req.body("{}");
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send()
        .await
        .unwrap_or_else(|e| panic!("{} {}: {e}", r.method, r.path))
}

async fn assert_refused(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), 401, "{what}");
    assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{what}");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"detail": {"msg": "Invalid bearer token."}}),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protected_route_needs_the_api_token() {
    init_trickle();
    let d = spawn_daemon(
        "auth-api",
        &[
            ("RIVULET_API_TOKEN", "api-secret"),
            ("AUTH_TOKEN", "runner-secret"),
        ],
    );
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
    let mut protected = 0;
    for r in ROUTES {
        let what = format!("{} {}", r.method, r.path);
        if r.access == Access::Open {
            let resp = call(&http, &base, r, None).await;
            assert_ne!(resp.status(), 401, "{what} is open");
            if !r.path.starts_with("/trickle/") {
                assert_eq!(resp.status(), 200, "{what} is served");
            }
            continue;
        }
        protected += 1;
        assert_refused(
            call(&http, &base, r, None).await,
            &format!("{what}, no token"),
        )
        .await;
        assert_refused(
            call(&http, &base, r, Some("api-secreT")).await,
            &format!("{what}, wrong token"),
        )
        .await;
        assert_refused(
            call(&http, &base, r, Some("api-secret-longer")).await,
            &format!("{what}, longer token"),
        )
        .await;
        // Either configured token passes; what the route then answers is its own business
        // (400, 404, 422 for these bodies), never 401.
        for token in ["api-secret", "runner-secret"] {
            let resp = call(&http, &base, r, Some(token)).await;
            assert_ne!(resp.status(), 401, "{what} with the right token");
            assert_ne!(resp.status(), 405, "{what} is served");
        }
    }
    assert!(protected > 20, "{protected} protected routes");
    // A path not in the table is refused too (no route discovery without the token).
    let r = http.get(format!("{base}/nowhere")).send().await.unwrap();
    assert_refused(r, "unknown path").await;
    // /health stays open.
    let r = http.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await.unwrap()["status"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_token_alone_keeps_the_runner_scope() {
    init_trickle();
    let d = spawn_daemon("auth-runner", &[("AUTH_TOKEN", "runner-secret")]);
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
    for r in ROUTES {
        let what = format!("{} {}", r.method, r.path);
        if r.access == Access::Runner {
            assert_refused(
                call(&http, &base, r, None).await,
                &format!("{what}, no token"),
            )
            .await;
            assert_refused(
                call(&http, &base, r, Some("wrong")).await,
                &format!("{what}, wrong token"),
            )
            .await;
            let resp = call(&http, &base, r, Some("runner-secret")).await;
            assert_ne!(resp.status(), 401, "{what} with the right token");
        } else if r.method == "GET" {
            // Reads stay open without RIVULET_API_TOKEN (the worker reads /hardware/info and
            // /version; today's behaviour).
            let resp = call(&http, &base, r, None).await;
            assert_ne!(resp.status(), 401, "{what} is open");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_runs_through_the_embedded_server_with_the_api_token() {
    init_trickle();
    let token = "api-secret";
    let d = spawn_daemon(
        "auth-stream",
        &[("RIVULET_API_TOKEN", token), ("RIVULET_ISOLATION", "none")],
    );
    let http = reqwest::Client::new();
    let base = d.base.clone();
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
    for (name, mime) in [("au", "video/MP2T"), ("au-out", "video/MP2T")] {
        let url = format!("{base}/trickle/{name}");
        let r = http
            .post(&url)
            .header("Expect-Content", mime)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "channel creation needs the token");
        let r = http
            .post(&url)
            .header("Expect-Content", mime)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "create {name}");
    }
    let input = live_input(&format!("{base}/trickle/au"));
    input
        .by_name("pub")
        .unwrap()
        .set_property("auth-token", token);
    set_state(&input, gst::State::Playing).await;
    let (reader, count) = output_counter(&format!("{base}/trickle/au-out"));
    set_state(&reader, gst::State::Playing).await;
    let r = http
        .post(format!("{base}/live-video-to-video"))
        .bearer_auth(token)
        .json(&json!({"subscribe_url": format!("{base}/trickle/au"),
                      "publish_url": format!("{base}/trickle/au-out"),
                      "gateway_request_id": "auth-stream"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // The daemon publishes its output to its own server with the token; the reader's GETs
    // are open.
    wait_frames(&count, 30).await;
    set_state(&input, gst::State::Null).await;
    set_state(&reader, gst::State::Null).await;
}
