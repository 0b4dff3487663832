//! `PUT /api/v1/pipelines` (the new file as the body) and `GET /api/v1/reloads`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use etlmesh_http::json_response;
use http::StatusCode;

use super::{Outcome, Trigger};
use crate::ControlState;
use crate::refusal::Refusal;

fn no_file() -> Response {
    Refusal::NoPipelineFile {
        what: "reload pipelines",
    }
    .into_response()
}

/// Reloads with the file in the body: 200 with the reload's record, 422 with the
/// file's diagnostics when it is refused (nothing changed then).
pub(crate) async fn put_pipelines(State(st): State<Arc<ControlState>>, body: String) -> Response {
    let Some(r) = &st.reloader else {
        return no_file();
    };
    let record = r.reload(Trigger::Api, Some(body)).await;
    let status = match record.outcome {
        Outcome::Refused => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    };
    (status, json_response(&record)).into_response()
}

/// The recent reloads, newest last.
pub(crate) async fn reloads(State(st): State<Arc<ControlState>>) -> Response {
    match &st.reloader {
        Some(r) => json_response(&r.records()),
        None => json_response(&Vec::<super::ReloadRecord>::new()),
    }
}
