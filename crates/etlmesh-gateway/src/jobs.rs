//! `/v1/jobs`: the batch-jobs API for clients. The control plane keeps and runs the
//! jobs; the gateway passes each request to it (`/api/v1/jobs…`) and its answer back.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{Method, StatusCode, header};

use crate::Gateway;
use crate::refusal::ApiRefusal;

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
        return ApiRefusal::JobTooLarge.into_response();
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
        Err(e) => ApiRefusal::ControlPlaneUnavailable(e.to_string()).into_response(),
    }
}

/// The job request's body, read up to [`MAX_JOB_BODY`]: a larger one is refused
/// before it is read (by its length) or as soon as it passes the bound.
async fn read_body(headers: &http::HeaderMap, body: Body) -> Result<Bytes, ApiRefusal> {
    let too_large = || ApiRefusal::JobTooLarge;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_JOB_BODY as u64) {
        return Err(too_large());
    }
    http_body_util::BodyExt::collect(http_body_util::Limited::new(body, MAX_JOB_BODY))
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|_| too_large())
}

/// The pipeline of a job as the control plane describes it.
fn pipeline_of(job: &serde_json::Value) -> &str {
    job["pipeline"].as_str().unwrap_or("")
}

/// A job of a pipeline the token may not see is, for it, no job at all.
fn no_job(id: &str) -> Response {
    ApiRefusal::UnknownJob(id.to_string()).into_response()
}

/// `POST /v1/jobs`: submit.
pub(crate) async fn submit(
    State(gw): State<Arc<Gateway>>,
    client: Option<axum::Extension<crate::access::Client>>,
    headers: http::HeaderMap,
    body: Body,
) -> Response {
    let body = match read_body(&headers, body).await {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    // A token may submit jobs of its own pipelines only.
    if let Some(axum::Extension(c)) = client {
        let pipeline = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["pipeline"].as_str().map(String::from))
            .unwrap_or_default();
        if !c.spec.allows(&pipeline) {
            return ApiRefusal::JobForbidden {
                token: c.name,
                pipeline,
            }
            .into_response();
        }
    }
    pass(&gw, Method::POST, "", None, body).await
}

/// `GET /v1/jobs`: list — with a token, the jobs of its pipelines only.
pub(crate) async fn list(
    State(gw): State<Arc<Gateway>>,
    client: Option<axum::Extension<crate::access::Client>>,
    RawQuery(q): RawQuery,
) -> Response {
    let resp = pass(&gw, Method::GET, "", q, Bytes::new()).await;
    let Some(axum::Extension(c)) = client else {
        return resp;
    };
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let Ok(body) = http_body_util::BodyExt::collect(resp.into_body()).await else {
        return no_answer();
    };
    let mut v: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    if let Some(jobs) = v["jobs"].as_array_mut() {
        jobs.retain(|j| c.spec.allows(pipeline_of(j)));
    }
    etlmesh_http::json_response(&v)
}

fn no_answer() -> Response {
    ApiRefusal::ControlPlaneAnswer.into_response()
}

/// With a token: whether job `id` is of a pipeline it may see (`Err`: the answer).
async fn visible(gw: &Gateway, c: &crate::access::Client, id: &str) -> Result<(), Response> {
    let resp = pass(
        gw,
        Method::GET,
        &format!("/{}", etlmesh_http::encode_component(id)),
        None,
        Bytes::new(),
    )
    .await;
    if resp.status() != StatusCode::OK {
        return Err(resp);
    }
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|_| no_answer())?
        .to_bytes();
    let job: serde_json::Value = serde_json::from_slice(&body).map_err(|_| no_answer())?;
    if c.spec.allows(pipeline_of(&job)) {
        Ok(())
    } else {
        Err(no_job(id))
    }
}

/// One job's status (GET) or cancellation (DELETE), for a token only if the job is
/// of one of its pipelines.
async fn one_job(
    gw: &Gateway,
    client: Option<axum::Extension<crate::access::Client>>,
    id: &str,
    method: Method,
) -> Response {
    if let Some(axum::Extension(c)) = &client
        && let Err(r) = visible(gw, c, id).await
    {
        return r;
    }
    let path = format!("/{}", etlmesh_http::encode_component(id));
    pass(gw, method, &path, None, Bytes::new()).await
}

/// `GET /v1/jobs/{id}`: status.
pub(crate) async fn status(
    State(gw): State<Arc<Gateway>>,
    client: Option<axum::Extension<crate::access::Client>>,
    Path(id): Path<String>,
) -> Response {
    one_job(&gw, client, &id, Method::GET).await
}

/// `DELETE /v1/jobs/{id}`: cancel.
pub(crate) async fn cancel(
    State(gw): State<Arc<Gateway>>,
    client: Option<axum::Extension<crate::access::Client>>,
    Path(id): Path<String>,
) -> Response {
    one_job(&gw, client, &id, Method::DELETE).await
}
