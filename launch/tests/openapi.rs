// SPDX-License-Identifier: MPL-2.0
//! `/openapi.json` describes every route the daemon serves: the routers' own `.route(...)`
//! calls (read from their source files: `http/runner.rs`, `sessions.rs`, `byoc.rs`,
//! `templates.rs`, `jobs.rs`, `feed.rs` and the embedded trickle server's) are exactly
//! `rivulet::http::routes::ROUTES`, and the document a real
//! `rivulet serve` answers has each of them, with the bearer scheme on the protected ones.

mod common;

use common::*;
use rivulet::http::routes::{Access, ROUTES};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

/// The text of the call starting at `s` (`s` begins just after an opening parenthesis) up to
/// its closing parenthesis.
fn call_args(s: &str) -> &str {
    let mut depth = 1;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &s[..i];
                }
            }
            _ => {}
        }
    }
    s
}

/// Every (method, path) of the `.route(PATH, METHODS)` calls in `src`; `{base}` in a path
/// (the trickle server's `format!`) is the embedded server's base path.
fn routes_in(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, _) in src.match_indices(".route(") {
        let args = call_args(&src[i + ".route(".len()..]);
        let Some(q0) = args.find('"') else { continue };
        let Some(len) = args[q0 + 1..].find('"') else {
            continue;
        };
        let path = args[q0 + 1..q0 + 1 + len]
            .replace("{base}", rivulet::http::routes::TRICKLE_BASE)
            .replace("{{", "{")
            .replace("}}", "}");
        let methods = &args[q0 + 1 + len + 1..];
        for m in ["get", "post", "delete", "put", "patch"] {
            for (j, _) in methods.match_indices(&format!("{m}(")) {
                let before = methods[..j].chars().last();
                if before.is_none_or(|c| !c.is_alphanumeric() && c != '_') {
                    out.push((m.to_uppercase(), path.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn the_route_table_is_what_the_routers_serve() {
    let sources = [
        include_str!("../src/http/runner.rs"),
        include_str!("../src/http/sessions.rs"),
        include_str!("../src/http/byoc.rs"),
        include_str!("../src/http/templates.rs"),
        include_str!("../src/http/jobs.rs"),
        include_str!("../src/http/feed.rs"),
        include_str!("../../gst-plugin-trickle/src/protocol/server.rs"),
    ];
    let served: BTreeSet<(String, String)> = sources.iter().flat_map(|s| routes_in(s)).collect();
    assert!(served.len() > 20, "{served:?}");
    let table: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(table.len(), ROUTES.len(), "a route is twice in the table");
    let missing: Vec<_> = served.difference(&table).collect();
    let stale: Vec<_> = table.difference(&served).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "routes served but not in rivulet::http::routes::ROUTES: {missing:?}; \
         in the table but not served: {stale:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_json_describes_every_route() {
    init_trickle();
    let d = spawn_daemon("openapi", &[("RIVULET_API_TOKEN", "t")]);
    let http = reqwest::Client::new();
    let base = d.base.clone();
    // Open: no token needed.
    let r = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().unwrap();
    for route in ROUTES {
        let op = &paths
            .get(route.path)
            .unwrap_or_else(|| panic!("{} is not in /openapi.json", route.path))
            [route.method.to_lowercase()];
        assert!(
            op.is_object(),
            "{} {} is not in /openapi.json",
            route.method,
            route.path
        );
        assert_eq!(op["summary"], route.summary);
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        assert_eq!(
            secured,
            route.access != Access::Open,
            "{} {}",
            route.method,
            route.path
        );
        for seg in route.path.split('/').filter(|s| s.starts_with('{')) {
            let name = seg.trim_matches(['{', '}']);
            assert!(
                op["parameters"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["name"] == name && p["in"] == "path")),
                "{} {}: parameter {name}",
                route.method,
                route.path
            );
        }
    }
    let described: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(described, ROUTES.len(), "no operation beyond the table");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // Schemas derived from the handlers' types.
    let schemas = &doc["components"]["schemas"];
    for field in ["input_status", "inference_status", "state", "stages"] {
        assert!(
            schemas["Status"]["properties"][field].is_object(),
            "Status.{field}: {}",
            schemas["Status"]
        );
    }
    assert!(schemas["InferenceStatus"]["properties"]["restart_count"].is_object());
    assert!(schemas["StageStats"]["properties"]["deadline_misses"].is_object());
    assert_eq!(
        paths["/api/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Status"
    );
    // And the daemon answers what it describes: /api/status has the Status fields.
    let status: Value = http
        .get(format!("{base}/api/status"))
        .bearer_auth("t")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for field in schemas["Status"]["required"].as_array().unwrap() {
        assert!(
            status.get(field.as_str().unwrap()).is_some(),
            "/api/status lacks {field}: {status}"
        );
    }
    wait_health(&http, &base, "IDLE", Duration::from_secs(60)).await;
}
