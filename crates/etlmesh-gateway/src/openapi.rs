//! `GET /openapi.json`: the OpenAPI 3 description of the gateway's HTTP API, shipped in
//! the binary (`openapi.json` beside this file), kept in step with the routes by the
//! test in `api.rs`. A property-based test runs against it:
//! `schemathesis run http://127.0.0.1:8080/openapi.json` (see the README).

use axum::response::Response;
use http::{HeaderValue, header};

/// The document.
pub const OPENAPI: &str = include_str!("openapi.json");

pub(crate) async fn openapi() -> Response {
    let mut r = Response::new(axum::body::Body::from(OPENAPI));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
