//! The control plane's HTTP API: the worker protocol, the endpoint watch, the admin API.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Json, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use etlmesh_http::json_response;
use etlmesh_proto::{EndpointEvent, Heartbeat, Registration};
use http::{HeaderValue, header};
use tokio::sync::broadcast::error::RecvError;

use crate::Registry;
use crate::autoscale::Autoscaling;
use crate::logs::{LogQuery, LogStore};
use crate::refusal::Refusal;
use crate::timeline::Timeline;

/// A keepalive line goes out when nothing else did for this long.
const KEEPALIVE: Duration = Duration::from_secs(3);

/// What the handlers share.
pub struct ControlState {
    /// The registry of workers.
    pub registry: Arc<Registry>,
    /// The autoscaler, when the control plane scales.
    pub autoscaling: Option<Arc<Autoscaling>>,
    /// Becomes `true` when the control plane shuts down: endpoint watches end then, so
    /// that a graceful shutdown does not wait for gateways to hang up.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// Logs collected from every process.
    pub logs: Arc<LogStore>,
    /// The mesh over time.
    pub timeline: Arc<Timeline>,
    /// Energy and carbon.
    pub meter: Arc<crate::energy::Meter>,
    /// Batch jobs (none: no pipeline file to run them with).
    pub jobs: Option<Arc<crate::jobs::Jobs>>,
    /// The mesh's authority, when the mesh speaks mTLS.
    pub(crate) mesh: Option<Arc<crate::mesh::Mesh>>,
    /// Reloads of the pipeline file, when the control plane scales its pools.
    pub reloader: Option<Arc<crate::reload::Reloader>>,
    /// Held while a dead-letter replay runs (one at a time).
    pub replaying: tokio::sync::Mutex<()>,
}

/// The control plane's routes.
pub fn router(state: Arc<ControlState>) -> Router {
    let mut r = Router::new();
    if state.mesh.is_some() {
        r = r
            .route("/v1/mesh/join", post(crate::mesh::join))
            .route("/v1/mesh/renew", post(crate::mesh::renew));
    }
    r.route("/v1/gateways/{id}/load", put(gateway_load))
        .route("/v1/pools/{pipeline}/activate", post(activate))
        .route("/api/v1/scaling", get(scaling))
        .route("/v1/workers", post(register))
        .route("/v1/workers/{id}/heartbeat", put(heartbeat))
        .route("/v1/workers/{id}", axum::routing::delete(deregister))
        .route("/v1/endpoints/watch", get(watch))
        .route("/api/v1/workers", get(workers))
        .route(
            "/api/v1/pipelines",
            get(pipelines).put(crate::reload::api::put_pipelines),
        )
        .route("/api/v1/reloads", get(crate::reload::api::reloads))
        .route(
            "/api/v1/deadletters/{pipeline}",
            get(crate::deadletters::list),
        )
        .route(
            "/api/v1/deadletters/{pipeline}/replay",
            post(crate::deadletters::replay),
        )
        .route("/v1/logs/{source}", post(ship_logs))
        .route("/api/v1/logs", get(logs))
        .route("/api/v1/logs/sources", get(log_sources))
        .route("/api/v1/errors", get(errors))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/energy", get(energy))
        .route("/api/v1/tap/{pipeline}", get(crate::tap::tap))
        .route(
            "/api/v1/jobs",
            post(crate::jobs::api::submit).get(crate::jobs::api::list),
        )
        .route(
            "/api/v1/jobs/{id}",
            get(crate::jobs::api::get).delete(crate::jobs::api::cancel),
        )
        .route("/ui", get(ui))
        .route("/ui/", get(ui))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn gateway_load(
    State(st): State<Arc<ControlState>>,
    Path(id): Path<String>,
    Json(load): Json<etlmesh_proto::GatewayLoad>,
) -> Response {
    if let Some(a) = &st.autoscaling {
        a.report(&id, load.clone());
    }
    st.timeline.gateway_report(&id, load);
    json_response(&revoked_answer(&st))
}

/// The answer to a member's report: the certificates it must refuse (a mesh's).
fn revoked_answer(st: &ControlState) -> serde_json::Value {
    match &st.mesh {
        Some(m) => {
            serde_json::json!({ "revoked": m.authority.revoked().iter().collect::<Vec<_>>() })
        }
        None => serde_json::json!({}),
    }
}

async fn energy(State(st): State<Arc<ControlState>>) -> Response {
    json_response(&st.meter.report())
}

async fn activate(State(st): State<Arc<ControlState>>, Path(pipeline): Path<String>) -> Response {
    match &st.autoscaling {
        Some(a) if a.activate(&pipeline) => {
            json_response(&serde_json::json!({ "activating": pipeline }))
        }
        _ => Refusal::NotScaled(pipeline).into_response(),
    }
}

async fn scaling(State(st): State<Arc<ControlState>>) -> Response {
    match &st.autoscaling {
        Some(a) => json_response(&serde_json::json!({
            "scaler": a.scaler_name(),
            "pools": a.view(&st.registry),
            "events": a.events(),
        })),
        None => json_response(&serde_json::json!({ "scaler": null, "pools": [], "events": [] })),
    }
}

async fn register(State(st): State<Arc<ControlState>>, Json(reg): Json<Registration>) -> Response {
    if reg.id.is_empty() || reg.address.is_empty() {
        return Refusal::BadRegistration.into_response();
    }
    st.registry.register(reg);
    json_response(&serde_json::json!({ "heartbeat_ms": 1000 }))
}

async fn heartbeat(
    State(st): State<Arc<ControlState>>,
    Path(id): Path<String>,
    Json(beat): Json<Heartbeat>,
) -> Response {
    if st.registry.heartbeat(&id, beat) {
        json_response(&revoked_answer(&st))
    } else {
        Refusal::UnknownWorker(id).into_response()
    }
}

async fn deregister(State(st): State<Arc<ControlState>>, Path(id): Path<String>) -> Response {
    if st.registry.remove(&id, "deregistered") {
        tracing::info!(worker = %id, "worker deregistered");
    }
    json_response(&serde_json::json!({}))
}

fn line(ev: &EndpointEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// The endpoint set as NDJSON: a snapshot, then every change, with keepalives.
async fn watch(State(st): State<Arc<ControlState>>) -> Response {
    let (snapshot, rx) = st.registry.subscribe();
    st.registry.watchers.inc();
    let pipelines = st.autoscaling.as_ref().map(|a| {
        line(&EndpointEvent::Pipelines {
            pipelines: a.pipelines(),
        })
    });
    struct Watch {
        registry: Arc<Registry>,
        rx: tokio::sync::broadcast::Receiver<EndpointEvent>,
        first: Vec<Bytes>,
        closing: tokio::sync::watch::Receiver<bool>,
    }
    impl Drop for Watch {
        fn drop(&mut self) {
            self.registry.watchers.dec();
        }
    }
    let mut first: Vec<Bytes> = pipelines.into_iter().collect();
    first.push(line(&EndpointEvent::Snapshot {
        endpoints: snapshot,
    }));
    first.reverse();
    let state = Watch {
        registry: st.registry.clone(),
        rx,
        first,
        closing: st.closing.clone(),
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if let Some(first) = st.first.pop() {
            return Some((Ok::<_, Infallible>(first), st));
        }
        if *st.closing.borrow() {
            return None;
        }
        let next = tokio::select! {
            r = tokio::time::timeout(KEEPALIVE, st.rx.recv()) => r,
            _ = st.closing.changed() => return None,
        };
        let ev = match next {
            Err(_) => EndpointEvent::Keepalive,
            Ok(Ok(ev)) => ev,
            Ok(Err(RecvError::Lagged(_))) => EndpointEvent::Snapshot {
                endpoints: st.registry.endpoints(),
            },
            Ok(Err(RecvError::Closed)) => return None,
        };
        Some((Ok(line(&ev)), st))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

async fn workers(State(st): State<Arc<ControlState>>) -> Response {
    json_response(&st.registry.workers())
}

async fn pipelines(State(st): State<Arc<ControlState>>) -> Response {
    json_response(&st.registry.pipelines())
}

async fn healthz(State(st): State<Arc<ControlState>>) -> Response {
    json_response(&serde_json::json!({ "status": "ok", "workers": st.registry.endpoints().len() }))
}

async fn metrics(State(st): State<Arc<ControlState>>) -> Response {
    etlmesh_http::metrics_response(&st.registry.metrics)
}

async fn ship_logs(
    State(st): State<Arc<ControlState>>,
    Path(source): Path<String>,
    Json(batch): Json<etlmesh_telemetry::logs::LogBatch>,
) -> Response {
    st.logs.ingest(&source, batch);
    json_response(&serde_json::json!({}))
}

/// `GET /api/v1/logs?worker=ID&level=warn&after=SEQ&limit=N`.
#[derive(Debug, serde::Deserialize)]
struct LogParams {
    worker: Option<String>,
    level: Option<String>,
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn logs(State(st): State<Arc<ControlState>>, Query(p): Query<LogParams>) -> Response {
    let level = match p.level.as_deref().map(etlmesh_telemetry::logs::parse_level) {
        None => None,
        Some(Some(l)) => Some(l),
        Some(None) => {
            return Refusal::BadLevel.into_response();
        }
    };
    let q = LogQuery {
        source: p.worker,
        level,
        after: p.after,
        limit: p
            .limit
            .unwrap_or(200)
            .min(crate::logs::LINES_PER_SOURCE * 4),
    };
    json_response(&st.logs.query(&q))
}

async fn log_sources(State(st): State<Arc<ControlState>>) -> Response {
    json_response(&st.logs.sources())
}

async fn errors(State(st): State<Arc<ControlState>>) -> Response {
    json_response(&serde_json::json!({
        "total": st.logs.errors_total(),
        "groups": st.logs.errors(),
    }))
}

#[derive(Debug, serde::Deserialize)]
struct OverviewParams {
    #[serde(default)]
    since: i64,
}

/// `GET /api/v1/overview?since=UNIX_MS`: the series holds points after `since`.
async fn overview(
    State(st): State<Arc<ControlState>>,
    Query(p): Query<OverviewParams>,
) -> Response {
    json_response(&crate::overview::build(&st, p.since))
}

/// The dashboard: one page, its script and styles inline, shipped in the binary.
const UI: &str = include_str!("ui/index.html");

async fn ui() -> Response {
    let mut resp = Response::new(Body::from(UI));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests;
