// SPDX-License-Identifier: MPL-2.0
//! Every route the daemon's port serves, in one table: the auth layer (`super::auth`) takes
//! each route's access class from it, `/openapi.json` (`super::openapi`) describes each of
//! them, and `launch/tests/openapi.rs` checks that the routers (`http/`'s, the embedded trickle
//! server's) serve exactly these.

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Never needs a token.
    Open,
    /// Needs a token when `RIVULET_API_TOKEN` is set (reads, previews, trickle writes).
    Api,
    /// Needs a token when `AUTH_TOKEN` or `RIVULET_API_TOKEN` is set: the runner's scope
    /// (starts, params) and Rivulet's writes under `/v1`.
    Runner,
}

/// One method on one path (axum's path syntax: `{name}` is one segment).
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
    /// The OpenAPI operation's summary.
    pub summary: &'static str,
    /// The OpenAPI tag (which API family).
    pub tag: &'static str,
}

const fn r(
    method: &'static str,
    path: &'static str,
    access: Access,
    tag: &'static str,
    summary: &'static str,
) -> Route {
    Route {
        method,
        path,
        access,
        summary,
        tag,
    }
}

use Access::{Api, Open, Runner};

/// The embedded trickle server's base path (`Config::trickle_base`).
pub const TRICKLE_BASE: &str = "/trickle/";

/// Every route, in the order of the README's table.
#[rustfmt::skip]
pub const ROUTES: &[Route] = &[
    r("POST", "/live-video-to-video", Runner, "runner", "Start a stream (container API)"),
    r("POST", "/live-video-to-video/", Runner, "runner", "Start a stream (container API, trailing slash)"),
    r("GET", "/health", Open, "runner", "Health: LOADING, IDLE, OK or ERROR"),
    r("GET", "/hardware/info", Api, "runner", "GPU information (NVML)"),
    r("GET", "/hardware/stats", Api, "runner", "GPU utilisation (NVML)"),
    r("GET", "/version", Api, "runner", "Pipeline, model id and version"),
    r("GET", "/metrics", Api, "rivulet", "Prometheus metrics (text format 0.0.4)"),
    r("POST", "/api/live-video-to-video", Runner, "internal", "Start a stream (internal API)"),
    r("POST", "/api/params", Runner, "internal", "Replace the running stream's params"),
    r("GET", "/api/status", Api, "internal", "The runner's status object"),
    r("GET", "/api/dashboard", Api, "rivulet", "The dashboard's data"),
    r("GET", "/api/preview/input.jpg", Api, "rivulet", "Input preview (JPEG)"),
    r("GET", "/api/preview/output.jpg", Api, "rivulet", "Output preview (JPEG)"),
    r("GET", "/", Open, "rivulet", "The dashboard page (static HTML; its data calls carry the token)"),
    r("GET", "/openapi.json", Open, "rivulet", "This OpenAPI description"),
    r("GET", "/v1/pipelines", Api, "templates", "List pipeline templates"),
    r("POST", "/v1/pipelines", Runner, "templates", "Create or replace a pipeline template"),
    r("GET", "/v1/pipelines/{id}", Api, "templates", "One pipeline template"),
    r("DELETE", "/v1/pipelines/{id}", Runner, "templates", "Delete a pipeline template"),
    r("GET", "/v1/jobs", Api, "jobs", "List file jobs"),
    r("POST", "/v1/jobs", Runner, "jobs", "Queue a file job"),
    r("GET", "/v1/jobs/{id}", Api, "jobs", "One file job"),
    r("DELETE", "/v1/jobs/{id}", Runner, "jobs", "Cancel a file job"),
    r("GET", "/v1/events", Api, "rivulet", "Server-Sent Events: job progress and stage events"),
    r("GET", "/v1/sessions", Api, "sessions", "List the live sessions, oldest first"),
    r("GET", "/v1/sessions/{id}", Api, "sessions", "One live session with its status object"),
    r("DELETE", "/v1/sessions/{id}", Runner, "sessions", "Stop one live session"),
    r("POST", "/v1/sessions/{id}/params", Runner, "sessions", "Replace one session's params"),
    r("POST", "/stream/start", Runner, "byoc", "Start a stream (BYOC / pytrickle alias of the internal start)"),
    r("POST", "/stream/stop", Runner, "byoc", "Stop the stream (BYOC / pytrickle)"),
    r("POST", "/stream/params", Runner, "byoc", "Replace the stream's params (BYOC / pytrickle)"),
    r("GET", "/stream/status", Api, "byoc", "The pipeline and stream state (BYOC / pytrickle)"),
    r("POST", "/trickle/{channel}", Api, "trickle", "Create a channel (embedded trickle server)"),
    r("DELETE", "/trickle/{channel}", Api, "trickle", "Close a channel"),
    r("POST", "/trickle/{channel}/{seq}", Api, "trickle", "Publish a segment"),
    r("GET", "/trickle/{channel}/{seq}", Open, "trickle", "Subscribe to a segment (open: the channel name is the capability)"),
    r("DELETE", "/trickle/{channel}/{seq}", Api, "trickle", "Delete a segment"),
];

/// Whether `path` (a request path, no query) matches `pattern` (`{x}`: one non-empty segment).
pub fn matches(pattern: &str, path: &str) -> bool {
    let mut p = pattern.split('/');
    let mut q = path.split('/');
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.starts_with('{') && a.ends_with('}') => {
                if b.is_empty() {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The access class of a request: its route's, or [`Access::Api`] for anything not in the
/// table (an unknown path answers 404 only to a caller with the token, when one is set).
pub fn access(method: &str, path: &str) -> Access {
    // HEAD is answered by the GET route.
    let method = if method == "HEAD" { "GET" } else { method };
    ROUTES
        .iter()
        .find(|r| r.method == method && matches(r.path, path))
        .map(|r| r.access)
        .unwrap_or(Access::Api)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_segments() {
        assert!(matches("/v1/jobs/{id}", "/v1/jobs/job-1"));
        assert!(!matches("/v1/jobs/{id}", "/v1/jobs/"));
        assert!(!matches("/v1/jobs/{id}", "/v1/jobs/a/b"));
        assert!(matches("/", "/"));
        assert!(!matches("/health", "/health/"));
        assert_eq!(access("GET", "/health"), Access::Open);
        assert_eq!(access("HEAD", "/health"), Access::Open);
        assert_eq!(access("GET", "/trickle/in/3"), Access::Open);
        assert_eq!(access("POST", "/trickle/in/3"), Access::Api);
        assert_eq!(access("POST", "/trickle/in"), Access::Api);
        assert_eq!(access("POST", "/api/params"), Access::Runner);
        assert_eq!(access("GET", "/nowhere"), Access::Api);
    }

    #[test]
    fn the_trickle_base_is_the_configs() {
        for r in ROUTES.iter().filter(|r| r.tag == "trickle") {
            assert!(r.path.starts_with(TRICKLE_BASE), "{}", r.path);
        }
    }
}
