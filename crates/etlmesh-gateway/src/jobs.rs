//! `/v1/jobs`: the batch-jobs API for clients. The control plane keeps and runs the
//! jobs; the gateway passes each request to it (`/api/v1/jobs…`) and its answer back.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use bytes::Bytes;
use etlmesh_http::error_response;
use http::{Method, StatusCode, header};

use crate::Gateway;

/// Largest job request accepted.
pub const MAX_JOB_BODY: usize = 64 << 10;

async fn pass(
    gw: &Gateway,
    method: Method,
    path: &str,
    query: Option<String>,
    body: Bytes,
) -> Response {
    if body.len() > MAX_JOB_BODY {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a job request holds at most {MAX_JOB_BODY} bytes"),
            None,
        );
    }
    let mut url = format!("{}/api/v1/jobs{path}", gw.options.control_plane);
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        url.push('?');
        url.push_str(&q);
    }
    match gw.control.send(method.clone(), &url, body).await {
        Ok((status, body)) => {
            tracing::debug!(%method, path, status = status.as_u16(), "job request passed to the control plane");
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap_or_default()
        }
        Err(e) => {
            let mut r = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "control_plane_unavailable",
                format!(
                    "the control plane, which keeps the jobs, does not answer: {e}\n  help: retry shortly; check that the control plane runs"
                ),
                None,
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
            r
        }
    }
}

/// `POST /v1/jobs`: submit.
pub(crate) async fn submit(
    State(gw): State<Arc<Gateway>>,
    client: Option<axum::Extension<crate::access::Client>>,
    body: Bytes,
) -> Response {
    // A token may submit jobs of its own pipelines only.
    if let Some(axum::Extension(c)) = client {
        let pipeline = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["pipeline"].as_str().map(String::from))
            .unwrap_or_default();
        if !c.spec.allows(&pipeline) {
            return error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token `{}` may not run jobs of pipeline `{pipeline}`",
                    c.name
                ),
                None,
            );
        }
    }
    pass(&gw, Method::POST, "", None, body).await
}

/// `GET /v1/jobs`: list.
pub(crate) async fn list(State(gw): State<Arc<Gateway>>, RawQuery(q): RawQuery) -> Response {
    pass(&gw, Method::GET, "", q, Bytes::new()).await
}

/// `GET /v1/jobs/{id}`: status.
pub(crate) async fn status(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    pass(
        &gw,
        Method::GET,
        &format!("/{}", etlmesh_http::encode_component(&id)),
        None,
        Bytes::new(),
    )
    .await
}

/// `DELETE /v1/jobs/{id}`: cancel.
pub(crate) async fn cancel(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    pass(
        &gw,
        Method::DELETE,
        &format!("/{}", etlmesh_http::encode_component(&id)),
        None,
        Bytes::new(),
    )
    .await
}
