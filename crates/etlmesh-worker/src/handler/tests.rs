//! The transform handler's rules, one request at a time through the worker's router
//! (`tower::ServiceExt::oneshot`): a failure names the rule, not an end-to-end symptom.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use etlmesh_config::PipelineFile;
use http::{Request, StatusCode};
use tokio::sync::watch;
use tower::ServiceExt;

use crate::{App, WorkerOptions, router};

const CSV: &str = "device_id,temperature_c\nd1,21.5\nd2,oops\nd3,-80\n";

struct Worker {
    app: Arc<App>,
    drain: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn worker(tune: impl FnOnce(&mut WorkerOptions)) -> Worker {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "pipelines:\n  clean:\n    schema: {{ device_id: utf8, temperature_c: float64 }}\n    transform: SELECT * FROM input WHERE temperature_c > -50\n    sinks: [{{ type: stdout }}]\n    dead_letter: {{ type: ndjson, path: '{}' }}\n  strict:\n    schema: {{ device_id: utf8, temperature_c: float64 }}\n    transform: SELECT * FROM input\n    sinks: [{{ type: stdout }}]\n",
        dir.path().join("dead").display()
    );
    let file = PipelineFile::parse("worker-test.yaml", yaml).expect("the test's file is valid");
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut options = WorkerOptions::new("w1", addr);
    tune(&mut options);
    let (drain, draining) = watch::channel(false);
    let app = Arc::new(
        App::start(&file, &options, draining)
            .await
            .expect("the pipelines compile"),
    );
    Worker {
        app,
        drain,
        _dir: dir,
    }
}

async fn post(w: &Worker, pipeline: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut req = Request::post(format!("/v1/pipelines/{pipeline}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Body::from(body.to_string())).expect("request");
    answer(
        router(w.app.clone())
            .oneshot(req)
            .await
            .expect("infallible"),
    )
    .await
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: serde_json::Value,
    text: String,
}

async fn answer(resp: axum::response::Response) -> Answer {
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or_default(),
        text,
    }
}

const CSV_IN: &[(&str, &str)] = &[("content-type", "text/csv")];

#[tokio::test]
async fn a_good_body_is_transformed_and_every_record_counted() {
    let w = worker(|_| {}).await;
    let a = post(
        &w,
        "clean",
        &[
            ("content-type", "text/csv"),
            ("accept", "application/x-ndjson"),
        ],
        CSV,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let count = |h: &str| a.headers[h].to_str().expect("ascii").to_string();
    // d1 passes, d3 is filtered by the SQL, d2 is a bad record, dead-lettered.
    assert_eq!(
        (
            count("etlmesh-records-in"),
            count("etlmesh-records-out"),
            count("etlmesh-records-filtered"),
            count("etlmesh-records-dead-lettered")
        ),
        ("3".into(), "1".into(), "1".into(), "1".into())
    );
    assert!(
        a.text.contains("\"d1\"") && !a.text.contains("d3"),
        "{}",
        a.text
    );
    assert!(
        a.headers["etlmesh-first-error"]
            .to_str()
            .expect("ascii")
            .contains("temperature_c")
    );
}

#[tokio::test]
async fn without_a_dead_letter_sink_a_bad_record_refuses_the_request() {
    let w = worker(|_| {}).await;
    let a = post(&w, "strict", CSV_IN, CSV).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.text);
    assert_eq!(a.body["code"], "bad_record");
    assert!(
        a.text.contains("dead_letter"),
        "says what to do: {}",
        a.text
    );
}

#[tokio::test]
async fn an_unknown_pipeline_is_404_and_lists_those_served() {
    let w = worker(|_| {}).await;
    let a = post(&w, "nope", CSV_IN, CSV).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.body["code"], "unknown_pipeline");
    let message = a.body["message"].as_str().expect("message");
    assert!(
        message.contains("clean") && message.contains("strict"),
        "{message}"
    );
}

#[tokio::test]
async fn formats_it_cannot_read_or_write_are_refused() {
    let w = worker(|_| {}).await;
    let a = post(&w, "clean", &[("content-type", "image/png")], CSV).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("unsupported_media_type")
        )
    );
    let a = post(
        &w,
        "clean",
        &[("content-type", "text/csv"), ("accept", "image/png")],
        CSV,
    )
    .await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (StatusCode::NOT_ACCEPTABLE, Some("not_acceptable"))
    );
}

#[tokio::test]
async fn past_max_in_flight_it_sheds_with_retry_after() {
    let w = worker(|o| o.max_in_flight = 0).await;
    let a = post(&w, "clean", CSV_IN, CSV).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.body["code"], "overloaded");
    assert_eq!(a.headers["retry-after"], "1");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let w = worker(|o| o.max_body_bytes = 16).await;
    let a = post(&w, "clean", CSV_IN, CSV).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_the_one_the_request_brings() {
    let w = worker(|o| o.inject_latency = Some(Duration::from_secs(5))).await;
    let started = tokio::time::Instant::now();
    let a = post(
        &w,
        "clean",
        &[("content-type", "text/csv"), ("etlmesh-deadline-ms", "250")],
        CSV,
    )
    .await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (StatusCode::GATEWAY_TIMEOUT, Some("deadline_exceeded"))
    );
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert!(a.text.contains("250 ms"), "{}", a.text);
}

#[tokio::test]
async fn a_draining_worker_says_so_on_healthz() {
    let w = worker(|_| {}).await;
    let health = |w: &Worker| {
        let req = Request::get("/healthz")
            .body(Body::empty())
            .expect("request");
        router(w.app.clone()).oneshot(req)
    };
    assert_eq!(
        health(&w).await.expect("infallible").status(),
        StatusCode::OK
    );
    w.drain.send_replace(true);
    let a = answer(health(&w).await.expect("infallible")).await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("draining"))
    );
}
