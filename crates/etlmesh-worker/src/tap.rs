//! `GET /v1/tap/{pipeline}?stage=input|output|dead_letter&limit=N&timeout_ms=T`:
//! live records of a pipeline as NDJSON, one `{"worker", "pipeline", "stage",
//! "record"}` object per line, until `limit` records (10 by default, 10,000 at most)
//! or `timeout_ms` (60 s by default, 10 min at most) — whichever comes first — or
//! until the client hangs up.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use bytes::Bytes;
use etlmesh_http::ApiError;
use etlmesh_proto::tap::TapQuery;
use etlmesh_sink::tap::TapStage;
use http::{HeaderValue, header};

use crate::App;
use crate::refusal::Refusal;

pub(crate) async fn tap(
    State(app): State<Arc<App>>,
    Path(pipeline): Path<String>,
    Query(q): Query<TapQuery>,
) -> Response {
    if app.pipelines.get(&pipeline).is_none() {
        return crate::handler::unknown_pipeline(&app, &pipeline).respond(None);
    }
    let stage_name = q.stage();
    let Some(stage) = TapStage::parse(stage_name) else {
        return Refusal::BadStage(stage_name.to_string()).respond(None);
    };
    let (limit, wait) = (q.limit(), q.wait());
    let rx = app.taps.open(&pipeline, stage, limit);
    let prefix = format!(
        "{{\"worker\":{},\"pipeline\":{},\"stage\":\"{}\",\"record\":",
        serde_json::Value::from(app.id.as_str()),
        serde_json::Value::from(pipeline.as_str()),
        stage.as_str()
    );
    let deadline = tokio::time::Instant::now() + wait;
    let stream = futures::stream::unfold((rx, prefix), move |(mut rx, prefix)| async move {
        let row = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        let line = Bytes::from(format!("{prefix}{row}}}\n"));
        Some((Ok::<_, Infallible>(line), (rx, prefix)))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}
