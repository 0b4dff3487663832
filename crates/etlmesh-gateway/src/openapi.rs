//! `GET /openapi.json`: the OpenAPI 3 description of the gateway's HTTP API, shipped in
//! the binary (`openapi.json` beside this file). A property-based test runs against it:
//! `schemathesis run http://127.0.0.1:8080/openapi.json` (see the README).

use axum::response::Response;
use http::{HeaderValue, header};

/// The document.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every path the gateway routes (the router in `lib.rs`); the test below keeps the
/// document in step with it.
pub const PATHS: [&str; 10] = [
    "/v1/pipelines",
    "/v1/query",
    "/v1/datasets",
    "/v1/pipelines/{name}",
    "/v1/jobs",
    "/v1/jobs/{id}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

pub(crate) async fn openapi() -> Response {
    let mut r = Response::new(axum::body::Body::from(OPENAPI));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        documented.sort_unstable();
        let mut routed = PATHS.to_vec();
        routed.sort_unstable();
        assert_eq!(documented, routed);
    }
}
