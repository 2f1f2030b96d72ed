// SPDX-License-Identifier: MPL-2.0
//! Bearer auth for the daemon's whole port, as one layer over the merged router (the API and
//! the embedded trickle server alike). Each route's access class comes from
//! [`super::routes::ROUTES`]:
//!
//! - `AUTH_TOKEN` (the runner's): required on the runner scope ([`Access::Runner`]: the starts,
//!   `/api/params`, writes under `/v1`), as before.
//! - `RIVULET_API_TOKEN` (Rivulet's): when set, required on every route but the open ones
//!   ([`Access::Api`] too: status, metrics, hardware, version, previews, dashboard data,
//!   templates and jobs, the feed, the embedded trickle server's POST and DELETE).
//! - A protected route takes either configured token, so an orchestrator holding `AUTH_TOKEN`
//!   passes everywhere it needs to.
//! - Open: `GET /health` (the orchestrator's and Docker's probes carry no token), `GET /` (the
//!   static dashboard page: its data calls carry the token) and `GET /openapi.json` (static,
//!   holds no state), and trickle `GET`s (the channel name is the capability, as on the
//!   gateway's trickle server; the daemon's own subscribers carry no token).
//!
//! Refusals are 401 `{"detail":{"msg":"Invalid bearer token."}}` with `WWW-Authenticate:
//! Bearer`. Tokens are compared in constant time (`subtle`).

use super::routes::Access;
use crate::config::Config;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The tokens the layer checks (from [`Config`]).
#[derive(Clone, Default)]
pub struct Tokens {
    /// `AUTH_TOKEN`.
    pub runner: Option<String>,
    /// `RIVULET_API_TOKEN`.
    pub api: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("Tokens")
            .field("runner", &self.runner.is_some())
            .field("api", &self.api.is_some())
            .finish()
    }
}

impl Tokens {
    pub fn from_config(c: &Config) -> Tokens {
        Tokens {
            runner: c.auth_token.clone(),
            api: c.api_token.clone(),
        }
    }

    /// Whether a request of class `access` needs a token.
    pub fn required(&self, access: Access) -> bool {
        match access {
            Access::Open => false,
            Access::Api => self.api.is_some(),
            Access::Runner => self.api.is_some() || self.runner.is_some(),
        }
    }

    /// Whether `presented` is one of the configured tokens. Every configured token is
    /// compared, each in constant time for its length (`subtle`); there is no early exit on
    /// content.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0u8);
        for t in [&self.runner, &self.api].into_iter().flatten() {
            ok |= t.as_bytes().ct_eq(presented);
        }
        bool::from(ok)
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
        .filter(|t| !t.is_empty())
}

async fn check(State(tokens): State<Arc<Tokens>>, req: Request, next: Next) -> Response {
    let access = super::routes::access(req.method().as_str(), req.uri().path());
    if tokens.required(access) && !bearer(req.headers()).is_some_and(|t| tokens.accepts(t)) {
        return super::ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// `app` behind the bearer check (a no-op layer when no token is configured).
pub fn protect(app: Router, config: &Config) -> Router {
    let tokens = Tokens::from_config(config);
    if tokens.runner.is_none() && tokens.api.is_none() {
        return app;
    }
    app.layer(axum::middleware::from_fn_with_state(
        Arc::new(tokens),
        check,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer_header_forms() {
        assert_eq!(bearer(&headers("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&headers("bearer  abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&headers("Bearer")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn tokens_and_classes() {
        let t = Tokens {
            runner: Some("r".into()),
            api: None,
        };
        assert!(t.required(Access::Runner));
        assert!(!t.required(Access::Api));
        assert!(!t.required(Access::Open));
        assert!(t.accepts(b"r"));
        assert!(!t.accepts(b"rr"));
        assert!(!t.accepts(b""));
        let t = Tokens {
            runner: Some("r".into()),
            api: Some("a".into()),
        };
        assert!(t.required(Access::Api));
        assert!(t.accepts(b"r") && t.accepts(b"a"));
        assert!(!t.accepts(b"b"));
    }
}
