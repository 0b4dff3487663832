//! The worker protocol and the endpoint watch, through the router (no socket): what a
//! worker and a gateway may rely on, named rule by rule.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use etlmesh_config::{CarbonSpec, EnergySpec};
use etlmesh_proto::{Heartbeat, Load, PipelineInfo, Registration, WorkerState};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::{ControlState, router};
use crate::Registry;

fn state(heartbeat_timeout: Duration) -> Arc<ControlState> {
    let registry = Arc::new(Registry::new(heartbeat_timeout));
    let (_closing_tx, closing) = tokio::sync::watch::channel(false);
    Arc::new(ControlState {
        logs: Arc::new(crate::logs::LogStore::new(&registry.metrics)),
        registry,
        autoscaling: None,
        closing,
        timeline: Arc::default(),
        meter: Arc::new(
            crate::energy::Meter::new(&EnergySpec::default(), &CarbonSpec::default(), "mesh:test")
                .expect("a model meter"),
        ),
        jobs: None,
        mesh: None,
        reloader: None,
        replaying: tokio::sync::Mutex::new(()),
    })
}

fn registration(id: &str) -> Registration {
    Registration {
        id: id.into(),
        address: "http://127.0.0.1:9".into(),
        pipelines: vec![PipelineInfo {
            name: "clean".into(),
            ..PipelineInfo::default()
        }],
        pid: 1,
        version: "test".into(),
    }
}

async fn call(
    st: &Arc<ControlState>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .expect("request");
    let res = router(st.clone()).oneshot(req).await.expect("infallible");
    let status = res.status();
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

fn beat() -> serde_json::Value {
    serde_json::to_value(Heartbeat {
        state: WorkerState::Ready,
        load: Load::default(),
    })
    .expect("json")
}

#[tokio::test]
async fn a_registered_worker_is_listed_and_its_heartbeats_are_taken() {
    let st = state(Duration::from_secs(5));
    let reg = serde_json::to_value(registration("w1")).expect("json");
    let (s, body) = call(&st, Method::POST, "/v1/workers", Some(reg)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        body["heartbeat_ms"], 1000,
        "tells the worker how often to beat"
    );
    let (s, _) = call(&st, Method::PUT, "/v1/workers/w1/heartbeat", Some(beat())).await;
    assert_eq!(s, StatusCode::OK);
    let (_, workers) = call(&st, Method::GET, "/api/v1/workers", None).await;
    assert_eq!(workers[0]["id"], "w1", "{workers}");
}

#[tokio::test]
async fn a_heartbeat_from_a_worker_it_does_not_know_says_so_so_that_it_registers_again() {
    let st = state(Duration::from_secs(5));
    let (s, body) = call(&st, Method::PUT, "/v1/workers/w9/heartbeat", Some(beat())).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "unknown_worker", "{body}");
}

#[tokio::test]
async fn a_registration_without_an_id_or_address_is_refused() {
    let st = state(Duration::from_secs(5));
    let mut reg = registration("");
    reg.address = String::new();
    let (s, body) = call(
        &st,
        Method::POST,
        "/v1/workers",
        Some(serde_json::to_value(reg).expect("json")),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body["code"].is_string(), "{body}");
    let (_, workers) = call(&st, Method::GET, "/api/v1/workers", None).await;
    assert_eq!(workers, serde_json::json!([]));
}

#[tokio::test]
async fn a_deregistered_worker_is_gone_and_deregistering_twice_is_harmless() {
    let st = state(Duration::from_secs(5));
    let reg = serde_json::to_value(registration("w1")).expect("json");
    call(&st, Method::POST, "/v1/workers", Some(reg)).await;
    for _ in 0..2 {
        let (s, _) = call(&st, Method::DELETE, "/v1/workers/w1", None).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (_, workers) = call(&st, Method::GET, "/api/v1/workers", None).await;
    assert_eq!(workers, serde_json::json!([]));
    let (s, _) = call(&st, Method::PUT, "/v1/workers/w1/heartbeat", Some(beat())).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a deregistered worker is unknown");
}

#[tokio::test]
async fn the_endpoint_watch_starts_with_a_snapshot_of_every_worker() {
    let st = state(Duration::from_secs(5));
    for id in ["w1", "w2"] {
        let reg = serde_json::to_value(registration(id)).expect("json");
        call(&st, Method::POST, "/v1/workers", Some(reg)).await;
    }
    let req = Request::builder()
        .uri("/v1/endpoints/watch")
        .body(Body::empty())
        .expect("request");
    let res = router(st.clone()).oneshot(req).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the snapshot comes at once")
        .expect("a frame")
        .expect("data");
    let data = frame.into_data().expect("data");
    let first: serde_json::Value =
        serde_json::from_slice(data.split(|b| *b == b'\n').next().expect("a line")).expect("json");
    let ids: Vec<&str> = first["endpoints"]
        .as_array()
        .expect("a snapshot")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert!(ids.contains(&"w1") && ids.contains(&"w2"), "{first}");
}
