//! The jobs API of the control plane (`/api/v1/jobs`); gateways pass `/v1/jobs` here.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use bytes::Bytes;
use etlmesh_http::json_response;
use etlmesh_proto::jobs::{JobRequest, JobState};
use http::StatusCode;

use super::Jobs;
use crate::api::ControlState;
use crate::refusal::Refusal;

fn jobs(st: &ControlState) -> Result<&Arc<Jobs>, Refusal> {
    st.jobs.as_ref().ok_or(Refusal::JobsDisabled)
}

/// `POST /api/v1/jobs`.
pub(crate) async fn submit(
    State(st): State<Arc<ControlState>>,
    body: Bytes,
) -> Result<Response, Refusal> {
    let j = jobs(&st)?;
    let req: JobRequest = serde_json::from_slice(&body).map_err(Refusal::BadJobJson)?;
    let job = j.submit(req)?;
    let mut r = json_response(&job);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
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
) -> Result<Response, Refusal> {
    let j = jobs(&st)?;
    // A malformed query gets the JSON error body every error has.
    let Query(p) = p.map_err(|e| Refusal::BadQuery(e.to_string()))?;
    let state = match p.state {
        None => None,
        Some(s) => Some(JobState::parse(&s).ok_or(Refusal::BadState(s))?),
    };
    let list = j.list(state, p.limit.unwrap_or(100))?;
    Ok(json_response(&serde_json::json!({ "jobs": list })))
}

/// `GET /api/v1/jobs/{id}`.
pub(crate) async fn get(
    State(st): State<Arc<ControlState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    Ok(json_response(&jobs(&st)?.get(&id)?))
}

/// `DELETE /api/v1/jobs/{id}`: cancel.
pub(crate) async fn cancel(
    State(st): State<Arc<ControlState>>,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    Ok(json_response(&jobs(&st)?.cancel(&id)?))
}
