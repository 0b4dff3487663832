//! The jobs API of the control plane (`/api/v1/jobs`); gateways pass `/v1/jobs` here.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use bytes::Bytes;
use etlmesh_http::{error_response, json_response};
use etlmesh_proto::jobs::{JobRequest, JobState};
use http::StatusCode;

use super::{Jobs, JobsError};
use crate::api::ControlState;

fn jobs(st: &ControlState) -> Result<&Arc<Jobs>, Box<Response>> {
    st.jobs.as_ref().ok_or_else(|| {
        Box::new(error_response(
            StatusCode::NOT_FOUND,
            "jobs_disabled",
            "this control plane runs no batch jobs\n  help: start it with a pipeline file (-c FILE) to run jobs",
            None,
        ))
    })
}

fn failed(e: JobsError) -> Response {
    let (status, code) = match &e {
        JobsError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_job"),
        JobsError::NotFound(_) => (StatusCode::NOT_FOUND, "unknown_job"),
        JobsError::Conflict(_) => (StatusCode::CONFLICT, "job_state"),
        JobsError::Full(_) => {
            let mut r = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "jobs_full",
                e.to_string(),
                None,
            );
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("60"),
            );
            return r;
        }
        JobsError::Db(_) | JobsError::Open { .. } => {
            (StatusCode::INTERNAL_SERVER_ERROR, "jobs_store")
        }
    };
    error_response(status, code, e.to_string(), None)
}

/// `POST /api/v1/jobs`.
pub(crate) async fn submit(State(st): State<Arc<ControlState>>, body: Bytes) -> Response {
    let j = match jobs(&st) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let req: JobRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_job",
                format!(
                    "the job is not valid JSON: {e}\n  help: send {{\"pipeline\": \"…\", \"inputs\": [\"data/*.csv\"], \"deadline\": \"RFC 3339\", \"expected_duration_secs\": 600}}"
                ),
                None,
            );
        }
    };
    match j.submit(req) {
        Ok(job) => {
            let mut r = json_response(&job);
            *r.status_mut() = StatusCode::CREATED;
            r
        }
        Err(e) => failed(e),
    }
}

/// Filters of `GET /api/v1/jobs`.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ListParams {
    state: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/jobs`.
pub(crate) async fn list(
    State(st): State<Arc<ControlState>>,
    p: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let j = match jobs(&st) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    // A malformed query gets the JSON error body every error has.
    let Query(p) = match p {
        Ok(p) => p,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!(
                    "{e}\n  help: give at most one `state` (scheduled, running, succeeded, failed, cancelled) and one `limit` (a number)"
                ),
                None,
            );
        }
    };
    let state = match p.state.as_deref().map(|s| (s, JobState::parse(s))) {
        None => None,
        Some((_, Some(s))) => Some(s),
        Some((s, None)) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_state",
                format!(
                    "no job state `{s}`; use scheduled, running, succeeded, failed or cancelled"
                ),
                None,
            );
        }
    };
    match j.list(state, p.limit.unwrap_or(100)) {
        Ok(list) => json_response(&serde_json::json!({ "jobs": list })),
        Err(e) => failed(e),
    }
}

/// `GET /api/v1/jobs/{id}`.
pub(crate) async fn get(State(st): State<Arc<ControlState>>, Path(id): Path<String>) -> Response {
    match jobs(&st) {
        Ok(j) => j.get(&id).map_or_else(failed, |job| json_response(&job)),
        Err(r) => *r,
    }
}

/// `DELETE /api/v1/jobs/{id}`: cancel.
pub(crate) async fn cancel(
    State(st): State<Arc<ControlState>>,
    Path(id): Path<String>,
) -> Response {
    match jobs(&st) {
        Ok(j) => j.cancel(&id).map_or_else(failed, |job| json_response(&job)),
        Err(r) => *r,
    }
}
