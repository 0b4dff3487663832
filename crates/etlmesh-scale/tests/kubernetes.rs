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
use etlmesh_scale::kubernetes::{ClusterConfig, KubernetesOptions, KubernetesScaler};

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    uri: String,
    content_type: String,
    authorization: String,
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
    // What the workload runs: its last patch, or 3 (as the cluster had it before).
    let patched = log
        .lock()
        .expect("log")
        .iter()
        .rev()
        .find(|s| s.method == Method::PATCH && s.uri.contains(&format!("/{name}/scale")))
        .and_then(|s| s.body["spec"]["replicas"].as_i64())
        .unwrap_or(3);
    let get = method == Method::GET;
    log.lock().expect("log").push(Seen {
        method,
        uri: uri.to_string(),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        authorization: headers
            .get("authorization")
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
    let replicas = if get {
        patched
    } else {
        body["spec"]["replicas"].as_i64().unwrap_or(0)
    };
    axum::Json(serde_json::json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "replicas": replicas },
        "status": { "replicas": replicas, "selector": "app=etlmesh-worker" }
    }))
    .into_response()
}

/// The fake API server's routes, recording into `log`.
fn app(log: &Log) -> Router {
    Router::new()
        .route(
            "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale",
            axum::routing::any(scale),
        )
        .route(
            "/apis/apps/v1/namespaces/{ns}/statefulsets/{name}/scale",
            axum::routing::any(scale),
        )
        .with_state(log.clone())
}

async fn fake_api_server() -> (String, Log) {
    let log: Log = Arc::default();
    let app = app(&log);
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
    let mut config = ClusterConfig::new(url);
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
    let mut config = ClusterConfig::new(&url);
    config.default_namespace = "default".into();
    let s = KubernetesScaler::with_config(
        config,
        KubernetesOptions {
            namespace: Some("data".into()),
            deployment: "prod-{pipeline}-workers".into(),
            ..KubernetesOptions::default()
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
async fn statefulsets_are_scaled_through_their_own_subresource() {
    let (url, log) = fake_api_server().await;
    let mut config = ClusterConfig::new(&url);
    config.default_namespace = "etlmesh".into();
    let s = KubernetesScaler::with_config(
        config,
        KubernetesOptions {
            kind: etlmesh_scale::kubernetes::WorkloadKind::StatefulSet,
            ..KubernetesOptions::default()
        },
    )
    .expect("client");
    s.set_replicas("clean_readings", 2).await.expect("scaled");
    let e = s
        .set_replicas("missing", 1)
        .await
        .expect_err("no such workload");
    let seen = log.lock().expect("log").clone();
    assert!(
        seen[0].uri.starts_with(
            "/apis/apps/v1/namespaces/etlmesh/statefulsets/etlmesh-worker-clean-readings/scale?"
        ),
        "{}",
        seen[0].uri
    );
    assert!(e.to_string().contains("statefulsets/scale"), "{e}");
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

#[tokio::test]
async fn a_token_file_is_read_at_every_request_as_the_kubelet_rotates_it() {
    let (url, log) = fake_api_server().await;
    let dir = tempfile::tempdir().expect("tmp");
    let token = dir.path().join("token");
    std::fs::write(&token, "first\n").expect("token");
    let mut config = ClusterConfig::new(&url);
    config.credentials = etlmesh_scale::kubernetes::Credentials::TokenFile(token.clone());
    let s = KubernetesScaler::with_config(config, KubernetesOptions::default()).expect("client");
    s.set_replicas("a", 1).await.expect("scaled");
    std::fs::write(&token, "second").expect("rotated");
    s.set_replicas("a", 2).await.expect("scaled");
    let seen = log.lock().expect("log").clone();
    assert_eq!(seen[0].authorization, "Bearer first");
    assert_eq!(seen[1].authorization, "Bearer second");
}

/// The fake API server behind TLS with a certificate of its own CA (as in a cluster),
/// and that certificate's PEM.
async fn fake_api_server_tls() -> (String, String, Log) {
    let log: Log = Arc::default();
    let app = app(&log);
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let dir = tempfile::tempdir().expect("tmp");
    let (cert, keyf) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, key.cert.pem()).expect("cert");
    std::fs::write(&keyf, key.signing_key.serialize_pem()).expect("key");
    let config =
        etlmesh_tls::listener::server_config_from_pem(&cert, &keyf, &[b"http/1.1"], "test")
            .expect("tls config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tls = etlmesh_tls::listener::TlsListener::new(listener, config, None).expect("tls");
    tokio::spawn(async move {
        let _ = axum::serve(tls, app).await;
    });
    (format!("https://localhost:{port}"), key.cert.pem(), log)
}

#[tokio::test]
async fn over_tls_the_server_is_checked_against_the_clusters_ca() {
    let (url, ca, log) = fake_api_server_tls().await;
    let mut config = ClusterConfig::new(&url);
    config.ca = Some(ca.into_bytes());
    config.credentials = etlmesh_scale::kubernetes::Credentials::Token("t0k".into());
    let s = KubernetesScaler::with_config(config, KubernetesOptions::default()).expect("client");
    s.set_replicas("a", 2).await.expect("scaled over TLS");
    assert_eq!(log.lock().expect("log")[0].authorization, "Bearer t0k");
    // Another CA: the server is not trusted.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let mut config = ClusterConfig::new(&url);
    config.ca = Some(other.cert.pem().into_bytes());
    let s = KubernetesScaler::with_config(config, KubernetesOptions::default()).expect("client");
    let e = s.set_replicas("a", 3).await.expect_err("untrusted");
    assert!(e.to_string().contains("does not answer"), "{e}");
    assert_eq!(
        log.lock().expect("log").len(),
        1,
        "nothing sent to an untrusted server"
    );
}

#[tokio::test]
async fn reads_what_the_workload_runs_from_its_scale_subresource() {
    let (url, log) = fake_api_server().await;
    let s = scaler(&url, None);
    assert_eq!(s.running("clean_readings").await.expect("read"), Some(3));
    s.set_replicas("clean_readings", 5).await.expect("scaled");
    assert_eq!(s.running("clean_readings").await.expect("read"), Some(5));
    let seen = log.lock().expect("log").clone();
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(
        seen[0].uri,
        "/apis/apps/v1/namespaces/etlmesh/deployments/etlmesh-worker-clean-readings/scale"
    );
    let e = s.running("missing").await.expect_err("no such workload");
    assert!(
        e.to_string().contains("may get deployments/scale"),
        "says what to check: {e}"
    );
}
