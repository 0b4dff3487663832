//! The server side's small helpers: JSON and metrics answers, request headers (trace
//! context, bearer token), socket options and path encoding.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::error::error_response;

/// Turns Nagle's algorithm off on an accepted connection: small writes (headers, the
/// end of a body) must not wait for the peer's delayed ACK, which costs up to 40 ms.
pub fn no_delay(stream: &mut tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// This hop's span for a request: a child of its `traceparent` (whose span id is
/// returned as the parent), or the root of a new trace when it has none or a
/// malformed one.
pub fn server_span(h: &http::HeaderMap) -> (etlmesh_telemetry::TraceContext, Option<u64>) {
    let parent = h
        .get(etlmesh_proto::headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(etlmesh_telemetry::TraceContext::parse);
    match parent {
        Some(p) => (p.child(), Some(p.span_id)),
        None => (etlmesh_telemetry::TraceContext::new_root(), None),
    }
}

/// The token of an `Authorization: Bearer TOKEN` header, if the request has one.
pub fn bearer_token(h: &http::HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// A JSON response.
pub fn json_response<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = Response::new(Body::from(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
            None,
        ),
    }
}

/// A router that serves only `GET /metrics` from `registry` (for a process whose API
/// is not HTTP, such as the broker).
pub fn metrics_router(registry: etlmesh_telemetry::metrics::SharedRegistry) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || std::future::ready(metrics_response(&registry))),
    )
}

/// A Prometheus `/metrics` response: `registry` in the OpenMetrics text format.
pub fn metrics_response(registry: &etlmesh_telemetry::metrics::SharedRegistry) -> Response {
    let text = etlmesh_telemetry::metrics::render(registry);
    let mut resp = Response::new(Body::from(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// `s` percent-encoded for one path segment or query value (unreserved bytes kept).
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
