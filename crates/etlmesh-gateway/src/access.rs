//! Who may use the gateway: API tokens (`Authorization: Bearer …`), checked by their
//! SHA-256 against `platform.access.tokens`, each with its pipelines, permissions and a
//! token-bucket rate limit; and CORS for browsers. With no tokens configured the
//! gateway is open (a local or trusted network), as `etlmesh up --demo` is.
//!
//! Answers: 401 without a valid token, 403 for a pipeline or service the token may
//! not use, 429 with `Retry-After` past its rate. Health, readiness, metrics and the
//! OpenAPI document stay open.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use etlmesh_config::{AccessSpec, TokenSpec};
use etlmesh_http::ApiError;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::Gateway;
use crate::refusal::ApiRefusal;

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Send records to a pipeline.
    Pipeline(&'a str),
    /// Read what the mesh serves (pipelines, datasets).
    List,
    /// Run an analytics query.
    Query,
    /// Submit or see batch jobs.
    Jobs,
}

/// The action a request's method and path ask for; `None` for the open routes.
pub fn action<'a>(method: &Method, path: &'a str) -> Option<Action<'a>> {
    if let Some(name) = path.strip_prefix("/v1/pipelines/") {
        return Some(if method == Method::POST {
            Action::Pipeline(name)
        } else {
            Action::List
        });
    }
    match path {
        "/v1/pipelines" | "/v1/datasets" => Some(Action::List),
        "/v1/query" => Some(Action::Query),
        p if p == "/v1/jobs" || p.starts_with("/v1/jobs/") => Some(Action::Jobs),
        _ => None,
    }
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Holder {
    spec: TokenSpec,
    bucket: Mutex<Bucket>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    token: String,
    outcome: &'static str,
}

/// The token a request was let in with.
#[derive(Debug, Clone)]
pub struct Client {
    /// The token's name.
    pub name: String,
    /// What it may do.
    pub spec: TokenSpec,
}

/// The access rules of a gateway.
pub struct Access {
    tokens: HashMap<[u8; 32], Arc<Holder>>,
    cors: Vec<String>,
    decisions: Family<AuthLabels, Counter>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tokens", &self.tokens.len())
            .field("cors", &self.cors)
            .finish()
    }
}

impl Access {
    /// The rules of `spec`, counting decisions in `registry`.
    pub fn new(spec: &AccessSpec, registry: &etlmesh_telemetry::metrics::SharedRegistry) -> Self {
        let decisions = Family::<AuthLabels, Counter>::default();
        registry.lock().register(
            "gateway_auth",
            "Requests by token and access decision",
            decisions.clone(),
        );
        let now = Instant::now();
        Self {
            tokens: spec
                .tokens
                .iter()
                .map(|t| {
                    let holder = Holder {
                        spec: t.clone(),
                        bucket: Mutex::new(Bucket {
                            tokens: t.burst,
                            at: now,
                        }),
                    };
                    (t.sha256, Arc::new(holder))
                })
                .collect(),
            cors: spec.cors_origins.clone(),
            decisions,
        }
    }

    /// Whether requests need a token.
    pub fn required(&self) -> bool {
        !self.tokens.is_empty()
    }

    fn count(&self, token: &str, outcome: &'static str) {
        self.decisions
            .get_or_create(&AuthLabels {
                token: token.to_string(),
                outcome,
            })
            .inc();
    }

    /// Lets a request in, or says why not. `Ok(None)`: open gateway.
    pub(crate) fn authorize(
        &self,
        headers: &HeaderMap,
        action: Action<'_>,
    ) -> Result<Option<Client>, ApiRefusal> {
        if !self.required() {
            return Ok(None);
        }
        let Some(token) = etlmesh_http::bearer_token(headers) else {
            self.count("", "missing");
            return Err(ApiRefusal::Unauthorized(
                "this gateway needs an API token\n  help: send `Authorization: Bearer TOKEN` (etlmesh: --token or ETLMESH_TOKEN); `etlmesh token new NAME` makes one for the file's platform.access.tokens",
            ));
        };
        let Some(holder) = self.tokens.get(&etlmesh_tls::sha256(token.as_bytes())) else {
            self.count("", "invalid");
            return Err(ApiRefusal::Unauthorized(
                "the API token is not known to this gateway\n  help: check the token, and that its SHA-256 is in platform.access.tokens",
            ));
        };
        let spec = &holder.spec;
        let permitted = match action {
            Action::Pipeline(p) => spec.allows(p),
            Action::List => true,
            Action::Query => spec.query,
            Action::Jobs => spec.jobs,
        };
        if !permitted {
            self.count(&spec.name, "forbidden");
            let what = match action {
                Action::Pipeline(p) => format!("pipeline `{p}`"),
                Action::Query => "analytics queries".into(),
                Action::Jobs => "batch jobs".into(),
                Action::List => "this".into(),
            };
            return Err(ApiRefusal::Forbidden {
                token: spec.name.clone(),
                what,
            });
        }
        if spec.rate > 0.0 {
            let mut b = holder.bucket.lock();
            let now = Instant::now();
            b.tokens =
                (b.tokens + now.duration_since(b.at).as_secs_f64() * spec.rate).min(spec.burst);
            b.at = now;
            if b.tokens < 1.0 {
                let wait = ((1.0 - b.tokens) / spec.rate).ceil().max(1.0) as u64;
                drop(b);
                self.count(&spec.name, "rate_limited");
                return Err(ApiRefusal::RateLimited {
                    token: spec.name.clone(),
                    rate: spec.rate,
                    burst: spec.burst,
                    wait,
                });
            }
            b.tokens -= 1.0;
        }
        self.count(&spec.name, "allowed");
        Ok(Some(Client {
            name: spec.name.clone(),
            spec: spec.clone(),
        }))
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, if allowed.
    fn cors_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let o = origin.to_str().ok()?;
        self.cors
            .iter()
            .any(|c| c == "*" || c == o)
            .then(|| origin.clone())
    }
}

const CORS_HEADERS: &str = "authorization, content-type, accept, traceparent, etlmesh-timeout-ms";
const CORS_EXPOSE: &str = "etlmesh-trace-id, traceparent, etlmesh-worker, etlmesh-records-in, etlmesh-records-out, etlmesh-records-filtered, etlmesh-records-dead-lettered, etlmesh-first-error, etlmesh-rows, etlmesh-truncated, etlmesh-elapsed-ms, retry-after";

/// The middleware: CORS preflights answered, tokens checked, the client's name passed
/// on to the handlers (request extension [`Client`]).
pub(crate) async fn layer(
    State(gw): State<Arc<Gateway>>,
    mut req: Request,
    next: Next,
) -> Response {
    let access = &gw.access;
    if !access.required() && access.cors.is_empty() {
        return next.run(req).await; // an open gateway: nothing to check per request
    }
    let allow_origin = access.cors_origin(req.headers());
    if req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        if let Some(o) = allow_origin {
            let h = r.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(CORS_HEADERS),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            h.insert(header::VARY, HeaderValue::from_static("origin"));
        }
        return r;
    }
    let mut resp = match action(req.method(), req.uri().path()) {
        None => next.run(req).await,
        Some(a) => match access.authorize(req.headers(), a) {
            Ok(client) => {
                if let Some(c) = client {
                    req.extensions_mut().insert(c);
                }
                next.run(req).await
            }
            Err(refusal) => {
                let span = tracing::info_span!("request", path = %req.uri().path());
                let _e = span.enter();
                refusal.respond(None)
            }
        },
    };
    if let Some(o) = allow_origin {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(CORS_EXPOSE),
        );
        h.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(rate: f64, burst: f64) -> Access {
        let hash = ring::digest::digest(&ring::digest::SHA256, b"s3cret");
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(hash.as_ref());
        let spec = AccessSpec {
            tokens: vec![TokenSpec {
                name: "ci".into(),
                sha256,
                pipelines: vec!["clean".into()],
                query: false,
                jobs: true,
                rate,
                burst,
            }],
            cors_origins: vec!["http://localhost:7070".into()],
            tls: None,
        };
        Access::new(&spec, &etlmesh_telemetry::metrics::registry())
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
        );
        h
    }

    #[test]
    fn tokens_permissions_and_rates() {
        let a = access(0.0, 1.0);
        let code = |r: Result<Option<Client>, ApiRefusal>| r.err().map(|e| e.status().as_u16());
        assert_eq!(
            code(a.authorize(&HeaderMap::new(), Action::List)),
            Some(401)
        );
        assert_eq!(code(a.authorize(&bearer("wrong"), Action::List)), Some(401));
        assert_eq!(
            code(a.authorize(&bearer("s3cret"), Action::Pipeline("clean"))),
            None
        );
        assert_eq!(
            code(a.authorize(&bearer("s3cret"), Action::Pipeline("other"))),
            Some(403)
        );
        assert_eq!(
            code(a.authorize(&bearer("s3cret"), Action::Query)),
            Some(403)
        );
        assert_eq!(code(a.authorize(&bearer("s3cret"), Action::Jobs)), None);
        let a = access(2.0, 3.0);
        for _ in 0..3 {
            assert_eq!(code(a.authorize(&bearer("s3cret"), Action::List)), None);
        }
        let e = a
            .authorize(&bearer("s3cret"), Action::List)
            .expect_err("over the rate");
        assert_eq!((e.status().as_u16(), e.retry_after()), (429, Some(1)));
    }

    #[test]
    fn paths_map_to_actions() {
        assert_eq!(
            action(&Method::POST, "/v1/pipelines/clean"),
            Some(Action::Pipeline("clean"))
        );
        assert_eq!(action(&Method::GET, "/v1/pipelines"), Some(Action::List));
        assert_eq!(action(&Method::DELETE, "/v1/jobs/j1"), Some(Action::Jobs));
        assert_eq!(action(&Method::POST, "/v1/query"), Some(Action::Query));
        assert_eq!(action(&Method::GET, "/metrics"), None);
        assert_eq!(action(&Method::GET, "/healthz"), None);
    }

    #[test]
    fn cors_echoes_allowed_origins_only() {
        let a = access(0.0, 1.0);
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:7070"),
        );
        assert!(a.cors_origin(&h).is_some());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(a.cors_origin(&h).is_none());
    }
}
