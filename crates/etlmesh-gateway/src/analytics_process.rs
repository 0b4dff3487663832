//! Analytics in a process of their own (`etlmesh analytics`, started by `etlmesh up`):
//! the worst query — one that allocates past every bound the query engine keeps — ends
//! that process, capped in address space, never the gateway, the control plane or the
//! certificate authority. The gateway passes `POST /v1/query` on to it over loopback
//! with a key only the two know and the token's pipelines, and answers a query that
//! took the process down with 422.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::query::{MAX_QUERY_BODY, answer_here};
use crate::refusal::ApiRefusal;
use etlmesh_http::ApiError;

/// The header carrying the key.
const KEY: &str = "etlmesh-analytics-key";
/// The header carrying the pipelines a token may read (JSON list; absent: all).
const PIPELINES: &str = "etlmesh-analytics-pipelines";

/// Where the analytics process listens, and its key.
pub struct AnalyticsProcess {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The shared key (random, never logged).
    pub key: String,
    /// The longest answer body passed on.
    pub max_answer_bytes: usize,
    /// How long a query may take there, with a margin.
    pub timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for AnalyticsProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalyticsProcess")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl AnalyticsProcess {
    /// The process at `url` with `key`, for answers of at most `max_answer_bytes` and
    /// queries of at most `timeout`.
    pub fn new(url: String, key: String, max_answer_bytes: usize, timeout: Duration) -> Self {
        Self {
            url,
            key,
            max_answer_bytes,
            timeout,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Waits until the process answers its health check, for at most `within`:
    /// whether it does.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        let Ok(uri) = format!("{}/healthz", self.url).parse::<http::Uri>() else {
            return false;
        };
        while tokio::time::Instant::now() < deadline {
            let req = http::Request::get(uri.clone()).body(Full::new(Bytes::new()));
            if let Ok(req) = req
                && let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(1), self.client.request(req)).await
                && resp.status().is_success()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// Passes a query request on to the analytics process and its answer back.
pub(crate) async fn forward(
    p: &AnalyticsProcess,
    h: &HeaderMap,
    body: Body,
    pipelines: Option<Vec<String>>,
) -> Result<Response, ApiRefusal> {
    let bytes = Limited::new(body, MAX_QUERY_BODY)
        .collect()
        .await
        .map_err(|e| {
            ApiRefusal::BadRequest(format!(
                "cannot read the request: {e}\n  help: a query request holds at most {MAX_QUERY_BODY} bytes"
            ))
        })?
        .to_bytes();
    let mut req = http::Request::post(format!("{}/v1/query", p.url)).header(KEY, p.key.as_str());
    for name in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = h.get(&name) {
            req = req.header(name, v);
        }
    }
    if let Some(list) = &pipelines {
        req = req.header(
            PIPELINES,
            serde_json::to_string(list).unwrap_or_else(|_| "[]".into()),
        );
    }
    let req = req
        .body(Full::new(bytes))
        .map_err(|e| ApiRefusal::QueryFailed(e.to_string()))?;
    let died = || {
        tracing::error!(
            error_kind = "analytics_process_died",
            "a query took the analytics process down (past its memory cap?); it restarts"
        );
        ApiRefusal::AnalyticsDied
    };
    let resp = match tokio::time::timeout(p.timeout, p.client.request(req)).await {
        Err(_) => {
            return Err(ApiRefusal::AnalyticsTimeout);
        }
        Ok(Err(e)) if e.is_connect() => {
            return Err(ApiRefusal::AnalyticsUnavailable(e.to_string()));
        }
        Ok(Err(_)) => return Err(died()),
        Ok(Ok(r)) => r,
    };
    let (parts, body) = resp.into_parts();
    let body = Limited::new(body, p.max_answer_bytes)
        .collect()
        .await
        .map_err(|_| died())?
        .to_bytes();
    if !parts.status.is_success() {
        // The process's own refusal, as the gateway would have said it (and counted
        // under its code, not as an answer).
        let said: etlmesh_proto::ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|_| {
            etlmesh_proto::ErrorBody::new("query_failed", String::from_utf8_lossy(&body), None)
        });
        return Err(ApiRefusal::Relayed {
            status: parts.status,
            code: ApiRefusal::known_code(&said.code),
            message: said.message,
        });
    }
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = parts.status;
    for name in [
        header::CONTENT_TYPE,
        http::HeaderName::from_static("etlmesh-rows"),
        http::HeaderName::from_static("etlmesh-truncated"),
        http::HeaderName::from_static("etlmesh-elapsed-ms"),
    ] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    Ok(out)
}

struct Served {
    analytics: Arc<etlmesh_query::Analytics>,
    key: String,
}

/// The router of the analytics process: `POST /v1/query` for the holder of `key`,
/// and `/healthz`.
pub fn router(analytics: Arc<etlmesh_query::Analytics>, key: String) -> Router {
    Router::new()
        .route("/v1/query", axum::routing::post(serve_query))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(Arc::new(Served { analytics, key }))
}

async fn serve_query(State(s): State<Arc<Served>>, h: HeaderMap, body: Body) -> Response {
    let presented = h.get(KEY).map(HeaderValue::as_bytes).unwrap_or_default();
    // Digests compared: the time taken says nothing about the key.
    let same = etlmesh_tls::sha256(presented) == etlmesh_tls::sha256(s.key.as_bytes());
    if !same {
        return ApiRefusal::NotItsGateway.respond(None);
    }
    let pipelines = h
        .get(PIPELINES)
        .and_then(|v| serde_json::from_slice::<Vec<String>>(v.as_bytes()).ok());
    match answer_here(&s.analytics, &h, body, pipelines).await {
        Ok(r) => r,
        Err(refusal) => refusal.respond(None),
    }
}
