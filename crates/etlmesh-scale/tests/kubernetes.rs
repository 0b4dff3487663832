//! The Kubernetes scaler against a fake API server that checks every request it gets:
//! the scale subresource of the right Deployment, a merge patch of `spec.replicas`, the
//! field manager; and errors of the API server surfaced with what to do.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use etlmesh_scale::Scaler;
use etlmesh_scale::kubernetes::{KubernetesOptions, KubernetesScaler};

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    content_type: String,
    body: serde_json::Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn scale(
    State(log): State<Log>,
    Path((ns, name)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    log.lock().expect("log").push(Seen {
        method,
        uri: uri.to_string(),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: body.clone(),
    });
    if name.contains("missing") {
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("deployments.apps \"{name}\" not found"),
            "reason": "NotFound", "code": 404
        });
        return (StatusCode::NOT_FOUND, axum::Json(status)).into_response();
    }
    let replicas = body["spec"]["replicas"].as_i64().unwrap_or(0);
    axum::Json(serde_json::json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "replicas": replicas },
        "status": { "replicas": replicas, "selector": "app=etlmesh-worker" }
    }))
    .into_response()
}

async fn fake_api_server() -> (String, Log) {
    let log: Log = Arc::default();
    let app = Router::new()
        .route(
            "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
            axum::routing::any(scale),
        )
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), log)
}

fn scaler(url: &str, namespace: Option<&str>) -> KubernetesScaler {
    let mut config = kube::Config::new(url.parse().expect("url"));
    config.default_namespace = "etlmesh".into();
    KubernetesScaler::with_config(
        config,
        KubernetesOptions {
            namespace: namespace.map(String::from),
            ..KubernetesOptions::default()
        },
    )
    .expect("client")
}

#[tokio::test]
async fn patches_the_scale_subresource_of_the_pipelines_deployment() {
    let (url, log) = fake_api_server().await;
    let s = scaler(&url, None);
    s.set_replicas("clean_readings", 3).await.expect("scaled");
    s.set_replicas("clean_readings", 0).await.expect("to zero");

    let seen = log.lock().expect("log").clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (req, replicas) in seen.iter().zip([3, 0]) {
        assert_eq!(req.method, Method::PATCH);
        assert!(
            req.uri.starts_with(
                "/apis/apps/v1/namespaces/etlmesh/deployments/etlmesh-worker-clean-readings/scale?"
            ),
            "{}",
            req.uri
        );
        assert!(
            req.uri.contains("fieldManager=etlmesh-autoscaler"),
            "{}",
            req.uri
        );
        assert_eq!(req.content_type, "application/merge-patch+json");
        assert_eq!(
            req.body,
            serde_json::json!({ "spec": { "replicas": replicas } })
        );
    }
}

#[tokio::test]
async fn the_namespace_and_deployment_names_are_configurable() {
    let (url, log) = fake_api_server().await;
    let mut config = kube::Config::new(url.parse().expect("url"));
    config.default_namespace = "default".into();
    let s = KubernetesScaler::with_config(
        config,
        KubernetesOptions {
            namespace: Some("data".into()),
            deployment: "prod-{pipeline}-workers".into(),
        },
    )
    .expect("client");
    s.set_replicas("agg", 2).await.expect("scaled");
    let seen = log.lock().expect("log").clone();
    assert!(
        seen[0]
            .uri
            .starts_with("/apis/apps/v1/namespaces/data/deployments/prod-agg-workers/scale"),
        "{}",
        seen[0].uri
    );
}

#[tokio::test]
async fn a_missing_deployment_is_an_error_that_says_what_to_check() {
    let (url, _log) = fake_api_server().await;
    let s = scaler(&url, Some("etlmesh"));
    let e = s
        .set_replicas("missing", 1)
        .await
        .expect_err("no such deployment");
    let msg = e.to_string();
    assert!(msg.contains("etlmesh-worker-missing"), "{msg}");
    assert!(msg.contains("not found"), "{msg}");
    assert!(msg.contains("deployments/scale"), "{msg}");
}

#[tokio::test]
async fn an_unreachable_api_server_is_an_error_not_a_hang() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let s = scaler(&url, None);
    let e = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.set_replicas("clean", 1),
    )
    .await
    .expect("no hang")
    .expect_err("unreachable");
    assert!(e.to_string().contains("etlmesh-worker-clean"), "{e}");
}
