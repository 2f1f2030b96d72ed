// SPDX-License-Identifier: MPL-2.0
//! `GET /openapi.json`: an OpenAPI 3.1 description of the daemon's port, made with utoipa.
//! Its paths are [`super::routes::ROUTES`] (the table the auth layer uses and that
//! `launch/tests/openapi.rs` checks against the routers); its schemas are derived from the
//! types the handlers serialise (`Status`, `InputStatus`, `InferenceStatus`, `StageStats`)
//! and, for bodies the handlers parse by hand (the start request, the error shapes), from the
//! documentation types below.

use super::routes::{Access, ROUTES, Route};
use axum::response::IntoResponse;
use std::sync::LazyLock;
use utoipa::OpenApi;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Ref, Required};

/// The start request body (`POST /live-video-to-video`, `POST /api/live-video-to-video`;
/// parsed by `StartRequest::from_json`, docs/runner.md "HTTP API").
#[allow(dead_code)] // A schema only: the handler parses the body by hand (FastAPI's errors).
#[derive(utoipa::ToSchema)]
pub struct StartBody {
    /// Input channel (`…/{mid}`), an http(s) URL.
    pub subscribe_url: String,
    /// Output channel (`…/{mid}-out`), an http(s) URL.
    pub publish_url: String,
    /// Control channel (`…/{mid}-control`).
    pub control_url: Option<String>,
    /// Events channel (`…/{mid}-events`).
    pub events_url: Option<String>,
    /// Checked against `MODEL_ID` (container API).
    pub model_id: Option<String>,
    /// The stream's initial params.
    #[schema(value_type = Object)]
    pub params: Option<serde_json::Value>,
    /// The stream's `request_id`.
    pub gateway_request_id: Option<String>,
    pub request_id: Option<String>,
    pub manifest_id: Option<String>,
    pub stream_id: Option<String>,
    /// A template or pipeline name, or a stage graph (README, "Multi-stage pipelines").
    #[schema(value_type = Object)]
    pub pipeline: Option<serde_json::Value>,
}

/// `{"detail": {"msg": …}}`: every JSON error of the container API and of `/v1`, and 401.
#[allow(dead_code)] // A schema only: `ApiError` writes it with `json!`.
#[derive(utoipa::ToSchema)]
pub struct ErrorDetail {
    pub detail: ErrorMsg,
}

#[allow(dead_code)] // A schema only.
#[derive(utoipa::ToSchema)]
pub struct ErrorMsg {
    pub msg: String,
}

/// `GET /health`.
#[allow(dead_code)] // A schema only: the handler writes it with `json!`.
#[derive(utoipa::ToSchema)]
pub struct Health {
    /// `LOADING`, `IDLE`, `OK` or `ERROR`.
    pub status: String,
}

/// `GET /version`.
#[allow(dead_code)] // A schema only: the handler writes it with `json!`.
#[derive(utoipa::ToSchema)]
pub struct Version {
    pub pipeline: String,
    pub model_id: String,
    pub version: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "rivulet",
        description = "The Rivulet daemon: the Livepeer AI runner's live-video-to-video API, \
                       Rivulet's own endpoints and the embedded trickle server, on one port."
    ),
    components(schemas(
        StartBody,
        ErrorDetail,
        ErrorMsg,
        Health,
        Version,
        crate::status::Status,
        crate::status::InputStatus,
        crate::status::InferenceStatus,
        crate::graph::StageStats,
    ))
)]
struct Doc;

fn method(m: &str) -> HttpMethod {
    match m {
        "POST" => HttpMethod::Post,
        "DELETE" => HttpMethod::Delete,
        "PUT" => HttpMethod::Put,
        "PATCH" => HttpMethod::Patch,
        _ => HttpMethod::Get,
    }
}

fn json_ref(name: &str) -> Content {
    Content::new(Some(Ref::from_schema_name(name)))
}

/// The success response of a route: its content type and schema, where they are known.
fn ok_response(r: &Route) -> ResponseBuilder {
    let ok = ResponseBuilder::new().description("Success");
    match (r.method, r.path) {
        ("GET", "/health") => ok.content("application/json", json_ref("Health")),
        ("GET", "/version") => ok.content("application/json", json_ref("Version")),
        ("GET", "/api/status") => ok.content("application/json", json_ref("Status")),
        ("GET", "/metrics") => ok.content("text/plain; version=0.0.4", Content::default()),
        ("GET", "/") => ok.content("text/html", Content::default()),
        ("GET", p) if p.ends_with(".jpg") => ok.content("image/jpeg", Content::default()),
        ("GET", "/v1/events") => ok.content("text/event-stream", Content::default()),
        ("POST", "/api/live-video-to-video") | ("POST", "/api/params") => {
            ok.content("text/plain", Content::default())
        }
        (_, p) if p.starts_with(super::routes::TRICKLE_BASE) => ok,
        _ => ok.content("application/json", Content::default()),
    }
}

fn operation(r: &Route) -> utoipa::openapi::path::Operation {
    let mut op = OperationBuilder::new()
        .summary(Some(r.summary))
        .tag(r.tag)
        .operation_id(Some(format!(
            "{}{}",
            r.method.to_ascii_lowercase(),
            r.path.replace(['/', '.', '-'], "_").replace(['{', '}'], "")
        )))
        .response("200", ok_response(r));
    for seg in r.path.split('/') {
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .build(),
            );
        }
    }
    if r.path.starts_with("/live-video-to-video") || r.path == "/api/live-video-to-video" {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content("application/json", json_ref("StartBody"))
                .build(),
        ));
        if r.path.starts_with("/live-video-to-video") {
            for code in ["400", "413", "500"] {
                op = op.response(
                    code,
                    ResponseBuilder::new()
                        .description("Error in the runner's shape")
                        .content("application/json", json_ref("ErrorDetail")),
                );
            }
            op = op.response(
                "422",
                ResponseBuilder::new().description("Validation error in FastAPI's shape"),
            );
        }
    }
    if r.access != Access::Open {
        op = op
            .security(SecurityRequirement::new("bearer", Vec::<String>::new()))
            .response(
                "401",
                ResponseBuilder::new()
                    .description(match r.access {
                        Access::Runner => {
                            "No or a wrong token (AUTH_TOKEN or RIVULET_API_TOKEN set)"
                        }
                        _ => "No or a wrong token (RIVULET_API_TOKEN set)",
                    })
                    .content("application/json", json_ref("ErrorDetail")),
            );
    }
    op.build()
}

/// The description, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
        let mut doc = Doc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").into();
        for r in ROUTES {
            doc.paths
                .add_path_operation(r.path, vec![method(r.method)], operation(r));
        }
        if let Some(c) = doc.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
        doc
    });
    &DOC
}

/// `GET /openapi.json`.
pub async fn serve() -> impl IntoResponse {
    axum::Json(document())
}
