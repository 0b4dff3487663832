//! End-to-end tests of the mesh with real processes: control plane, gateway and
//! workers (separately, or under `etlmesh up`), under load, with workers killed,
//! slowed down and drained.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Scratch;
use common::mesh::*;
use http::{Method, StatusCode};
use nix::sys::signal::Signal;

/// Mesh tests start many processes; on a small machine they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_under_load_fails_no_request_and_is_replaced() {
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    scratch.write("mesh.yaml", MESH_YAML);
    let up = Proc::up(scratch.dir.path(), &["-c", "mesh.yaml", "--workers", "3"]);
    let gw = up.url("gateway");
    let admin = up.url("control plane");
    let http = Http::new();
    let workers_url = format!("{admin}/api/v1/workers");
    eventually(Duration::from_secs(20), "three workers", async || {
        http.get(&workers_url)
            .await
            .json()
            .as_array()
            .map_or(0, |a| a.len())
            == 3
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(
        format!("{gw}/v1/pipelines/clean"),
        readings(500, 0.0, 1),
        6,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let workers = http.get(&workers_url).await.json();
    let victim = workers
        .as_array()
        .and_then(|a| a.iter().find(|w| w["id"] == "clean-2"))
        .cloned()
        .expect("clean-2");
    let (pid, old_address) = (
        victim["pid"].as_i64().expect("pid") as i32,
        victim["address"].clone(),
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill -9");
    let killed = Instant::now();

    let gone = eventually(
        Duration::from_secs(5),
        "the dead worker leaves the endpoint set",
        async || {
            let list = http.get(&workers_url).await.json();
            !list
                .as_array()
                .is_some_and(|a| a.iter().any(|w| w["address"] == old_address))
        },
    )
    .await;
    assert!(gone <= Duration::from_secs(3), "left after {gone:?}");
    eventually(
        Duration::from_secs(15),
        "clean-2 restarted and registered",
        async || {
            let list = http.get(&workers_url).await.json();
            list.as_array().is_some_and(|a| {
                a.iter().any(|w| {
                    w["id"] == "clean-2" && w["address"] != old_address && w["state"] == "ready"
                })
            })
        },
    )
    .await;
    let rejoined = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = running.await.expect("load");

    assert_none_failed(&outcomes);
    let after: Vec<Outcome> = outcomes
        .iter()
        .filter(|o| o.at > rejoined)
        .cloned()
        .collect();
    let by = per_worker(&after);
    assert!(
        by.get("clean-2").copied().unwrap_or(0) > 0,
        "the restarted worker takes load: {by:?}"
    );
    assert!(
        outcomes.len() > 50,
        "steady load: {} requests",
        outcomes.len()
    );
    eprintln!(
        "kill -9: {} requests, none failed; endpoint gone after {gone:?}; restarted after {:?}",
        outcomes.len(),
        rejoined - killed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_gets_fewer_requests() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start(&[&[], &[], &["--inject-latency", "60ms"]], &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(mesh.transform_url(), readings(200, 0.0, 2), 6, stop.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = running.await.expect("load");
    assert!(failures(&outcomes).is_empty());
    let by = per_worker(&outcomes);
    let (w1, w2, w3) = (
        by.get("w1").copied().unwrap_or(0),
        by.get("w2").copied().unwrap_or(0),
        by.get("w3").copied().unwrap_or(0),
    );
    assert!(
        w3 * 3 < w1.min(w2),
        "the slow worker w3 should get clearly fewer requests: {by:?}"
    );
    eprintln!("requests per worker with w3 slowed by 60 ms: {by:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_worker_gone_the_gateway_answers_503_at_once() {
    let _serial = SERIAL.lock().await;
    let mut mesh = Mesh::start(&[&[], &[]], &[]).await;
    for w in &mesh.workers {
        w.signal(Signal::SIGKILL);
    }
    eventually(Duration::from_secs(5), "no ready worker left", async || {
        mesh.ready_workers().await == 0
    })
    .await;
    let started = Instant::now();
    let a = Http::new()
        .post_csv(&mesh.transform_url(), readings(10, 0.0, 3))
        .await
        .expect("an answer");
    let took = started.elapsed();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.header("retry-after"), "1");
    let body = a.json();
    assert_eq!(body["code"], "no_ready_worker");
    assert!(
        body["trace_id"].as_str().is_some_and(|t| t.len() == 32),
        "{body}"
    );
    assert!(took < Duration::from_millis(500), "answered in {took:?}");
    mesh.workers.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_4xx_and_bad_records_are_dead_lettered() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start(&[&[]], &["--max-body-bytes", "200000"]).await;
    let http = Http::new();
    let url = mesh.transform_url();

    let a = http
        .post_csv(
            &format!("{}/v1/pipelines/nope", mesh.gw_url),
            readings(5, 0.0, 4),
        )
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["code"], "unknown_pipeline");
    assert!(
        a.json()["message"].as_str().unwrap_or("").contains("clean"),
        "{}",
        a.json()
    );

    let a = http
        .send(
            Method::POST,
            &url,
            &[("content-type", "text/plain")],
            readings(5, 0.0, 4),
        )
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(a.json()["code"], "unsupported_media_type");

    let a = http
        .send(
            Method::POST,
            &url,
            &[("content-type", "text/csv"), ("accept", "image/png")],
            readings(5, 0.0, 4),
        )
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::NOT_ACCEPTABLE);

    let a = http
        .post_csv(&url, Bytes::from(vec![b'x'; 300_000]))
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("200000"),
        "{}",
        a.json()
    );

    let a = http
        .send(
            Method::POST,
            &url,
            &[("content-type", "application/vnd.apache.parquet")],
            Bytes::from_static(b"not parquet at all"),
        )
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.json()["code"], "bad_body");
    assert!(!a.header("etlmesh-trace-id").is_empty());

    let a = http
        .send(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            Bytes::from_static(b"{\"device_id\": 1}"),
        )
        .await
        .expect("answer");
    assert_eq!(
        a.status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&a.body)
    );

    // A partly bad body: the good records come back, the bad ones are dead-lettered.
    let a = http
        .post_csv(&url, readings(2000, 0.05, 5))
        .await
        .expect("answer");
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let n = |h: &str| a.header(h).parse::<u64>().expect(h);
    let (records_in, out, filtered, dead) = (
        n("etlmesh-records-in"),
        n("etlmesh-records-out"),
        n("etlmesh-records-filtered"),
        n("etlmesh-records-dead-lettered"),
    );
    assert_eq!(records_in, 2000);
    assert_eq!(records_in, out + filtered + dead);
    assert!(dead > 30, "about 5% bad: {dead}");
    assert_eq!(String::from_utf8_lossy(&a.body).lines().count() as u64, out);
    assert!(!a.header("etlmesh-first-error").is_empty());
    let letters = std::fs::read_to_string(mesh.scratch.path("dead/dead-clean-w1.ndjson"))
        .expect("dead letters");
    assert_eq!(letters.lines().count() as u64, dead);
    let first: serde_json::Value =
        serde_json::from_str(letters.lines().next().expect("a line")).expect("json");
    assert_eq!(first["pipeline"], "clean");
    assert!(first["line"].as_u64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_without_failing_requests() {
    let _serial = SERIAL.lock().await;
    let mut mesh = Mesh::start(&[&[], &[], &[]], &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(mesh.transform_url(), readings(500, 0.0, 6), 6, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut drained = mesh.workers.remove(1);
    drained.signal(Signal::SIGTERM);
    let started = Instant::now();
    let status = drained.exit_within(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = running.await.expect("load");
    assert!(
        status.success(),
        "the drained worker exits cleanly: {status:?}"
    );
    assert!(
        drained.output().contains("draining"),
        "{}",
        drained.output()
    );
    assert_none_failed(&outcomes);
    assert_eq!(mesh.ready_workers().await, 2);
    eprintln!(
        "SIGTERM: worker exited after {:?}; {} requests, none failed",
        started.elapsed(),
        outcomes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_flight_lists_pipelines_and_exchanges_tables() {
    use arrow_flight::encode::FlightDataEncoderBuilder;
    use arrow_flight::{FlightClient, FlightDescriptor};
    use futures::TryStreamExt;

    let _serial = SERIAL.lock().await;
    let (mesh, flight) = Mesh::start_with(&[&[]], &[]).await;
    let channel = tonic::transport::Channel::from_shared(flight.clone())
        .expect("url")
        .connect()
        .await
        .expect("connects");
    let mut client = FlightClient::new(channel);

    let infos: Vec<_> = client
        .list_flights(bytes::Bytes::new())
        .await
        .expect("list")
        .try_collect()
        .await
        .expect("infos");
    assert_eq!(infos.len(), 1);
    assert_eq!(
        infos[0].flight_descriptor.as_ref().map(|d| d.path.clone()),
        Some(vec!["clean".to_string()])
    );
    let schema = infos[0].clone().try_decode_schema().expect("schema");
    assert_eq!(schema.field(2).name(), "temperature_f");

    let csv = readings(300, 0.05, 7);
    let decl = etlmesh_config::PipelineFile::parse("mesh.yaml", MESH_YAML).expect("yaml");
    let fields = decl.spec.pipelines[0].schema.clone().expect("schema");
    let input_schema = etlmesh_codec::schema::arrow_schema(&fields);
    let limits = etlmesh_codec::Limits::default();
    let (_, decoded) = etlmesh_codec::decode_body(
        csv.clone(),
        "test",
        etlmesh_config::Format::Csv,
        Some(&input_schema),
        &etlmesh_config::CsvOptions::default(),
        &limits,
        10,
    )
    .expect("decodes");
    let batches: Vec<_> = decoded.batches.into_iter().map(|b| Ok(b.batch)).collect();
    let data = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec!["clean".into()])))
        .build(futures::stream::iter(batches));
    let out: Vec<arrow::array::RecordBatch> = client
        .do_exchange(data)
        .await
        .expect("exchange")
        .try_collect()
        .await
        .expect("batches");
    let rows: usize = out.iter().map(|b| b.num_rows()).sum();

    let http = Http::new()
        .post_csv(&mesh.transform_url(), csv)
        .await
        .expect("http");
    let good = http
        .header("etlmesh-records-out")
        .parse::<usize>()
        .expect("count");
    assert!(rows > 200, "{rows}");
    assert_eq!(rows, good, "Flight and HTTP agree on the clean rows");
    assert_eq!(out[0].schema().field(2).name(), "temperature_f");

    let bad = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec!["nope".into()])))
        .build(futures::stream::iter(vec![Ok(out[0].clone())]));
    let err = match client.do_exchange(bad).await {
        Ok(s) => s
            .try_collect::<Vec<_>>()
            .await
            .expect_err("unknown pipeline"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("unknown_pipeline"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_load_shedding_tracing_and_metrics() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start(
        // The worker answers after 1.5 s: a 504 or a shed answer that comes well
        // before it did not wait for the worker (generous on a loaded machine).
        &[&["--inject-latency", "1500ms"]],
        &["--queue", "2", "--endpoint-concurrency", "1"],
    )
    .await;
    let http = Http::new();
    let url = mesh.transform_url();
    let body = readings(20, 0.0, 8);

    // The worker honours the deadline it is given.
    let started = Instant::now();
    let a = http
        .send(
            Method::POST,
            &format!("{url}?timeout_ms=150"),
            &[("content-type", "text/csv")],
            body.clone(),
        )
        .await
        .expect("answer");
    assert_eq!(
        a.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.json()["code"], "deadline_exceeded");
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "the deadline, not the worker's answer: {:?}",
        started.elapsed()
    );

    // The trace id goes through and comes back.
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let a = http
        .send(
            Method::POST,
            &url,
            &[("content-type", "text/csv"), ("traceparent", trace)],
            body.clone(),
        )
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.header("etlmesh-trace-id"),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert!(
        a.header("traceparent")
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    );
    assert!(
        !a.header("traceparent").contains("00f067aa0ba902b7"),
        "the worker's span is a child"
    );

    // One request at a time per worker, two queued: the rest are shed at once.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let a = http.post_csv(&url, body).await.expect("answer");
            (a, started.elapsed())
        }));
    }
    let mut shed = 0;
    for t in tasks {
        let (a, took) = t.await.expect("task");
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            shed += 1;
            assert_eq!(a.json()["code"], "overloaded");
            assert_eq!(a.header("retry-after"), "1");
            assert!(
                took < Duration::from_millis(1200),
                "shed at once, not queued behind a 1.5 s request: {took:?}"
            );
        } else {
            assert_eq!(a.status, StatusCode::OK);
        }
    }
    assert!(shed >= 5, "{shed} of 10 shed");

    // Metrics move on the gateway and on the worker.
    let gw = http.get(&format!("{}/metrics", mesh.gw_url)).await;
    let text = String::from_utf8_lossy(&gw.body).to_string();
    assert!(
        text.contains("etlmesh_gateway_requests_total{pipeline=\"clean\",code=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("etlmesh_gateway_shed_total{pipeline=\"clean\"}"),
        "{text}"
    );
    assert!(
        text.contains("etlmesh_gateway_request_duration_seconds_bucket"),
        "{text}"
    );
    let worker_url = mesh.workers[0].url("worker");
    let w = http.get(&format!("{worker_url}/metrics")).await;
    let text = String::from_utf8_lossy(&w.body).to_string();
    assert!(
        text.contains("etlmesh_worker_records_total{pipeline=\"clean\",outcome=\"in\"}"),
        "{text}"
    );
}
