//! `POST /v1/query` and `GET /v1/datasets`: the analytics service on the front door.
//! Read-only SQL over the datasets the pipelines' sinks wrote ([`etlmesh_query`]);
//! the answer comes in the format of `Accept` (JSON records by default).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use etlmesh_codec::encode::{EncodeOptions, encode_to_vec};
use etlmesh_config::Format;
use etlmesh_http::{ApiError, json_response};
use etlmesh_query::QueryRequest;

use crate::refusal::ApiRefusal;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::{BodyExt, Limited};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tracing::Instrument;

use crate::Gateway;

/// The largest query request.
pub const MAX_QUERY_BODY: usize = 1 << 20;

/// A query request as JSON.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    sql: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The analytics service's metrics.
#[derive(Clone)]
pub(crate) struct QueryMetrics {
    queries: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    rows: Counter,
}

impl QueryMetrics {
    pub(crate) fn register(registry: &etlmesh_telemetry::metrics::SharedRegistry) -> Self {
        let m = Self {
            queries: Family::default(),
            duration: etlmesh_telemetry::metrics::latency_histogram(),
            rows: Counter::default(),
        };
        let mut r = registry.lock();
        r.register(
            "queries",
            "Analytics queries by outcome (ok or the error code)",
            m.queries.clone(),
        );
        r.register(
            "query_duration_seconds",
            "Time to answer an analytics query",
            m.duration.clone(),
        );
        r.register(
            "query_rows",
            "Rows answered by analytics queries",
            m.rows.clone(),
        );
        m
    }
}

/// `GET /v1/datasets`: what a query may read (with a token: of its pipelines).
pub(crate) async fn datasets(
    State(gw): State<Arc<Gateway>>,
    client: Option<axum::Extension<crate::access::Client>>,
) -> Response {
    let Some(a) = &gw.options.analytics else {
        return ApiRefusal::NoAnalytics.into_response();
    };
    let list: Vec<_> = a
        .catalog()
        .datasets()
        .filter(|d| client.as_ref().is_none_or(|c| c.spec.allows(&d.pipeline)))
        .collect();
    json_response(&list)
}

/// `POST /v1/query`.
pub(crate) async fn query(
    State(gw): State<Arc<Gateway>>,
    client: Option<axum::Extension<crate::access::Client>>,
    req_headers: HeaderMap,
    body: Body,
) -> Response {
    let pipelines = client.map(|axum::Extension(c)| c.spec.pipelines);
    let (trace, _parent) = etlmesh_http::server_span(&req_headers);
    let trace_id = trace.trace_id_hex();
    let span = tracing::info_span!("query", trace_id = %trace_id);
    let started = std::time::Instant::now();
    let result = answer(&gw, &req_headers, body, pipelines)
        .instrument(span.clone())
        .await;
    let outcome = result.as_ref().map_or_else(ApiError::code, |_| "ok");
    gw.query_metrics
        .queries
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    gw.query_metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let mut resp = match result {
        Ok(r) => r,
        Err(refusal) => {
            let _entered = span.enter();
            refusal.respond(Some(trace_id.clone()))
        }
    };
    if let Ok(v) = HeaderValue::from_str(&trace_id) {
        resp.headers_mut()
            .insert(etlmesh_proto::headers::TRACE_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(&trace.header()) {
        resp.headers_mut()
            .insert(etlmesh_proto::headers::TRACEPARENT, v);
    }
    resp
}

async fn answer(
    gw: &Gateway,
    h: &HeaderMap,
    body: Body,
    pipelines: Option<Vec<String>>,
) -> Result<Response, ApiRefusal> {
    let resp = match (&gw.options.analytics_process, &gw.options.analytics) {
        (Some(p), _) => crate::analytics_process::forward(p, h, body, pipelines).await?,
        (None, Some(analytics)) => answer_here(analytics, h, body, pipelines).await?,
        (None, None) => {
            return Err(ApiRefusal::NoAnalytics);
        }
    };
    let rows = resp
        .headers()
        .get("etlmesh-rows")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    gw.query_metrics.rows.inc_by(rows);
    Ok(resp)
}

/// Runs a query request in this process.
pub(crate) async fn answer_here(
    analytics: &etlmesh_query::Analytics,
    h: &HeaderMap,
    body: Body,
    pipelines: Option<Vec<String>>,
) -> Result<Response, ApiRefusal> {
    let bad = ApiRefusal::BadRequest;
    let format = Format::from_accept(
        h.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
        Format::Json,
    )
    .map_err(ApiRefusal::NotAcceptable)?;
    let bytes = Limited::new(body, MAX_QUERY_BODY)
        .collect()
        .await
        .map_err(|e| {
            bad(format!(
                "cannot read the request: {e}\n  help: a query request holds at most {MAX_QUERY_BODY} bytes"
            ))
        })?
        .to_bytes();
    let content_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let request = if content_type.starts_with("application/json") {
        let b = serde_json::from_slice::<QueryBody>(&bytes).map_err(|e| {
            bad(format!(
                "the request is not a query: {e}\n  help: send {{\"sql\": \"SELECT …\", \"limit\": 1000, \"timeout_ms\": 10000}}, or the SQL alone as text/plain"
            ))
        })?;
        QueryRequest {
            sql: b.sql,
            max_rows: b.limit,
            timeout: b.timeout_ms.map(Duration::from_millis),
            pipelines,
        }
    } else if content_type.starts_with("text/plain") || content_type.starts_with("application/sql")
    {
        let sql =
            String::from_utf8(bytes.to_vec()).map_err(|_| bad("the SQL is not UTF-8".into()))?;
        QueryRequest {
            sql,
            max_rows: None,
            timeout: None,
            pipelines,
        }
    } else {
        return Err(bad(format!(
            "cannot read a query from `{content_type}`\n  help: send application/json ({{\"sql\": …}}) or text/plain"
        )));
    };
    if request.sql.trim().is_empty() {
        return Err(bad("the query is empty".into()));
    }
    if request.timeout == Some(Duration::ZERO) || request.max_rows == Some(0) {
        return Err(bad("limit and timeout_ms must be at least 1".into()));
    }
    let a = analytics.run(request).await?;
    tracing::info!(
        rows = a.rows,
        truncated = a.truncated,
        elapsed_ms = a.elapsed.as_millis() as u64,
        datasets = %a.datasets.join(","),
        "query answered"
    );
    let body = encode_to_vec(&a.batches, &a.schema, &EncodeOptions::new(format)).map_err(|e| {
        ApiRefusal::QueryFailed(format!("cannot encode the answer as {format}: {e}"))
    })?;
    let mut resp = Response::new(Body::from(body));
    let hs = resp.headers_mut();
    hs.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    hs.insert("etlmesh-rows", HeaderValue::from(a.rows as u64));
    hs.insert(
        "etlmesh-truncated",
        HeaderValue::from_static(if a.truncated { "true" } else { "false" }),
    );
    hs.insert(
        "etlmesh-elapsed-ms",
        HeaderValue::from(a.elapsed.as_millis() as u64),
    );
    Ok(resp)
}
