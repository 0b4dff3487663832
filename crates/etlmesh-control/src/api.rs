//! The control plane's HTTP API: the worker protocol, the endpoint watch, the admin API.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Json, Path, State};
use axum::response::Response;
use axum::routing::{get, post, put};
use bytes::Bytes;
use etlmesh_http::{error_response, json_response};
use etlmesh_proto::{EndpointEvent, Heartbeat, Registration};
use http::{HeaderValue, StatusCode, header};
use tokio::sync::broadcast::error::RecvError;

use crate::Registry;

/// A keepalive line goes out when nothing else did for this long.
const KEEPALIVE: Duration = Duration::from_secs(3);

/// The control plane's routes.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v1/workers", post(register))
        .route("/v1/workers/{id}/heartbeat", put(heartbeat))
        .route("/v1/workers/{id}", axum::routing::delete(deregister))
        .route("/v1/endpoints/watch", get(watch))
        .route("/api/v1/workers", get(workers))
        .route("/api/v1/pipelines", get(pipelines))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(registry)
}

async fn register(State(r): State<Arc<Registry>>, Json(reg): Json<Registration>) -> Response {
    if reg.id.is_empty() || reg.address.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_registration",
            "a registration needs an id and an address",
            None,
        );
    }
    r.register(reg);
    json_response(&serde_json::json!({ "heartbeat_ms": 1000 }))
}

async fn heartbeat(
    State(r): State<Arc<Registry>>,
    Path(id): Path<String>,
    Json(beat): Json<Heartbeat>,
) -> Response {
    if r.heartbeat(&id, beat) {
        json_response(&serde_json::json!({}))
    } else {
        error_response(
            StatusCode::NOT_FOUND,
            "unknown_worker",
            format!("no worker `{id}`; register first"),
            None,
        )
    }
}

async fn deregister(State(r): State<Arc<Registry>>, Path(id): Path<String>) -> Response {
    if r.remove(&id, "deregistered") {
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
async fn watch(State(r): State<Arc<Registry>>) -> Response {
    let (snapshot, rx) = r.subscribe();
    r.watchers.inc();
    struct Watch {
        registry: Arc<Registry>,
        rx: tokio::sync::broadcast::Receiver<EndpointEvent>,
        first: Option<Bytes>,
    }
    impl Drop for Watch {
        fn drop(&mut self) {
            self.registry.watchers.dec();
        }
    }
    let state = Watch {
        registry: r.clone(),
        rx,
        first: Some(line(&EndpointEvent::Snapshot {
            endpoints: snapshot,
        })),
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if let Some(first) = st.first.take() {
            return Some((Ok::<_, Infallible>(first), st));
        }
        let ev = match tokio::time::timeout(KEEPALIVE, st.rx.recv()).await {
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

async fn workers(State(r): State<Arc<Registry>>) -> Response {
    json_response(&r.workers())
}

async fn pipelines(State(r): State<Arc<Registry>>) -> Response {
    json_response(&r.pipelines())
}

async fn healthz(State(r): State<Arc<Registry>>) -> Response {
    json_response(&serde_json::json!({ "status": "ok", "workers": r.endpoints().len() }))
}

async fn metrics(State(r): State<Arc<Registry>>) -> Response {
    etlmesh_http::metrics_response(etlmesh_telemetry::metrics::render(&r.metrics))
}
