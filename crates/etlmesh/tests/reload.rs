//! Reloading the pipeline file of a running `etlmesh up`, as a user would: clients keep
//! sending through the reload and none of them fails; from some moment on only the new
//! transform answers; an added pipeline is routed, a removed one is gone, an unchanged
//! one keeps its workers; a bad file is refused with its line and changes nothing; a
//! stream reloaded mid-stream loses no reading.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::mesh::{Http, Proc, readings};
use common::stream::{paho, paho_done, services, stream_yaml, streams_started};
use common::*;
use http::{Method, StatusCode};

/// A pipeline file: `clean` answers with `version`, `other` never changes, and
/// `extra` (a whole pipeline block) comes last.
fn pipelines(version: &str, extra: &str) -> String {
    format!(
        r#"platform:
  batch_size: 4096
pipelines:
  clean:
    schema: &readings
      device_id: {{ type: utf8, nullable: false }}
      ts: {{ type: timestamp_ms, nullable: false }}
      temperature_c: float64
      humidity: float64
      battery_v: float64
      status: utf8
    transform: SELECT device_id, '{version}' AS version FROM input
    sinks: [{{ type: stdout, format: ndjson }}]
  other:
    schema: *readings
    transform: SELECT device_id FROM input
    sinks: [{{ type: stdout, format: ndjson }}]
{extra}"#
    )
}

const GONE: &str = r#"  gone:
    schema: *readings
    transform: SELECT device_id FROM input
    sinks: [{ type: stdout, format: ndjson }]
"#;

const FRESH: &str = r#"  fresh:
    schema: *readings
    transform: SELECT device_id, 'fresh' AS version FROM input
    sinks: [{ type: stdout, format: ndjson }]
"#;

/// One answer to a client during the reload: when its request started, and what came
/// back (the transform's version, or the failure).
struct Seen {
    started: Instant,
    answer: Result<String, String>,
}

/// Clients sending `body` to `url` until `stop`.
fn clients(
    url: String,
    body: Bytes,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Seen>>> {
    (0..n)
        .map(|_| {
            let (url, body, stop, http) = (url.clone(), body.clone(), stop.clone(), Http::new());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let answer = match http.post_csv(&url, body.clone()).await {
                        Ok(a) if a.status == StatusCode::OK => {
                            let text = String::from_utf8_lossy(&a.body).to_string();
                            Ok(if text.contains("\"v2\"") {
                                "v2".to_string()
                            } else if text.contains("\"v1\"") {
                                "v1".to_string()
                            } else {
                                format!("neither version: {}", &text[..text.len().min(200)])
                            })
                        }
                        Ok(a) => Err(format!("{} {}", a.status, String::from_utf8_lossy(&a.body))),
                        Err(e) => Err(e),
                    };
                    seen.push(Seen { started, answer });
                }
                seen
            })
        })
        .collect()
}

/// The workers of `pool` the control plane knows, sorted.
async fn pool_workers(http: &Http, admin: &str, pool: &str) -> Vec<String> {
    let all = http.get(&format!("{admin}/api/v1/workers")).await.json();
    let mut ids: Vec<String> = all
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| {
            w["pipelines"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n == pool))
        })
        .filter(|w| w["state"] == "ready")
        .map(|w| w["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

/// Polls `check` every 200 ms until it gives a value; past `within`, fails saying
/// `what` with the output of `up`.
async fn until<T>(
    within: Duration,
    up: &Proc,
    what: impl Fn() -> String,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < within, "{}:\n{}", what(), up.output());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the reloads recorded number `n`; the last one.
async fn reloaded(http: &Http, admin: &str, n: usize, up: &Proc) -> serde_json::Value {
    let url = format!("{admin}/api/v1/reloads");
    until(
        Duration::from_secs(120),
        up,
        || format!("reload {n} not recorded"),
        async || {
            let all = http.get(&url).await.json();
            all.as_array().and_then(|a| a.get(n - 1)).cloned()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_fails_no_request_and_only_the_new_transform_answers_after_it() {
    let scratch = Scratch::new();
    scratch.write("p.yaml", pipelines("v1", GONE));
    let up = Proc::up(
        scratch.dir.path(),
        &["-c", "p.yaml", "--workers", "2", "--watch-config"],
    );
    let (gateway, admin) = (up.url("gateway"), up.url("control plane"));
    let http = Http::new();
    let body = readings(20, 0.0, 7);
    eventually_ok(&http, &format!("{gateway}/v1/pipelines/clean"), &body, &up).await;
    eventually_ok(&http, &format!("{gateway}/v1/pipelines/gone"), &body, &up).await;
    let others = wait_pool(&http, &admin, "other", 2, &up).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = clients(
        format!("{gateway}/v1/pipelines/clean"),
        body.clone(),
        4,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGHUP with a changed `clean`, `gone` removed and `fresh` added.
    scratch.write("p.yaml", pipelines("v2", FRESH));
    up.signal(nix::sys::signal::Signal::SIGHUP);
    let record = reloaded(&http, &admin, 1, &up).await;
    let applied = Instant::now();
    assert_eq!(record["outcome"], "applied", "{record:#}\n{}", up.output());
    assert_eq!(record["trigger"], "signal");
    for (what, pipelines) in [
        ("changed", "clean"),
        ("added", "fresh"),
        ("removed", "gone"),
        ("unchanged", "other"),
    ] {
        assert_eq!(
            record["diff"][what],
            serde_json::json!([pipelines]),
            "{record:#}"
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for c in load {
        seen.extend(c.await.expect("client"));
    }

    let failed: Vec<&String> = seen
        .iter()
        .filter_map(|s| s.answer.as_ref().err())
        .collect();
    let v1 = seen
        .iter()
        .filter(|s| s.answer.as_deref() == Ok("v1"))
        .count();
    let v2 = seen
        .iter()
        .filter(|s| s.answer.as_deref() == Ok("v2"))
        .count();
    eprintln!(
        "requests through the reload: {} ({v1} answered by v1, {v2} by v2), {} failed",
        seen.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    let odd: Vec<&Seen> = seen
        .iter()
        .filter(|s| !matches!(s.answer.as_deref(), Ok("v1" | "v2")))
        .collect();
    assert!(odd.is_empty(), "{:?}", odd.first().map(|s| &s.answer));
    assert!(
        v1 > 0 && v2 > 0,
        "both transforms answered: v1 {v1}, v2 {v2}"
    );
    // From some moment on, only the new transform answers: no request sent later than
    // 2 s after the reload was applied got the old one (old workers drain meanwhile).
    let last_v1 = seen
        .iter()
        .filter(|s| s.answer.as_deref() == Ok("v1"))
        .map(|s| s.started)
        .max()
        .expect("a v1 answer");
    assert!(
        last_v1 < applied + Duration::from_secs(2),
        "the old transform answered {:?} after the reload was applied",
        last_v1.saturating_duration_since(applied)
    );
    assert!(
        seen.iter()
            .filter(|s| s.started > applied + Duration::from_secs(2))
            .count()
            > 0,
        "requests were sent after the switch"
    );

    // The unchanged pipeline kept its workers; the added one is routed; the removed one
    // is gone from the gateway.
    assert_eq!(
        wait_pool(&http, &admin, "other", 2, &up).await,
        others,
        "`other` untouched"
    );
    eventually_ok(&http, &format!("{gateway}/v1/pipelines/fresh"), &body, &up).await;
    let gone = format!("{gateway}/v1/pipelines/gone");
    until(
        Duration::from_secs(60),
        &up,
        || "`gone` still answers".into(),
        async || {
            let a = http.post_csv(&gone, body.clone()).await.ok()?;
            (a.status == StatusCode::NOT_FOUND).then_some(())
        },
    )
    .await;

    // A bad file through the API is refused with its line; nothing changes, the file on
    // disk included.
    let bad = pipelines("v3", FRESH).replace(
        "    transform: SELECT device_id FROM input\n",
        "    transfrom: SELECT device_id FROM input\n",
    );
    let a = put(&http, &admin, bad).await;
    assert_eq!(
        a.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let refused = a.json();
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("p.yaml:") && error.contains("transfrom"),
        "{error}"
    );
    assert_eq!(refused["outcome"], "refused");
    assert!(
        std::fs::read_to_string(scratch.path("p.yaml"))
            .expect("p.yaml")
            .contains("'v2'"),
        "the file on disk is the accepted one"
    );
    let a = http
        .post_csv(&format!("{gateway}/v1/pipelines/clean"), body.clone())
        .await
        .expect("POST");
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&a.body).contains("\"v2\""),
        "still v2 after a refused reload"
    );

    // A file that parses but whose SQL names no such column: `etlmesh validate` refuses
    // it before any worker moves.
    let bad_sql = pipelines("v3", FRESH).replace(
        "SELECT device_id, 'v3' AS version",
        "SELECT device_idd, 'v3' AS version",
    );
    let a = put(&http, &admin, bad_sql).await;
    assert_eq!(
        a.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let error = a.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("p.yaml") && error.contains("device_idd"),
        "{error}"
    );
    assert!(
        !error.contains("candidate"),
        "the diagnostics name the pipeline file: {error}"
    );

    // A good file through the API is applied and written to the file; the watch then
    // finds nothing to do.
    let a = put(&http, &admin, pipelines("v3", FRESH)).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(
        a.json()["outcome"],
        "applied",
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert!(
        std::fs::read_to_string(scratch.path("p.yaml"))
            .expect("p.yaml")
            .contains("'v3'")
    );
    // The old workers left the ready set before the answer; gateways learn it within
    // moments, and from then on only v3 answers.
    let mut first_v3 = None;
    for _ in 0..50 {
        let a = http
            .post_csv(&format!("{gateway}/v1/pipelines/clean"), body.clone())
            .await
            .expect("POST");
        let v3 = String::from_utf8_lossy(&a.body).contains("\"v3\"");
        match first_v3 {
            None if v3 => first_v3 = Some(Instant::now()),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
            Some(_) => assert!(v3, "v2 answered after v3 had"),
        }
    }
    assert!(first_v3.is_some(), "v3 answers once applied");

    // The dashboard's overview carries the reloads.
    let overview = http.get(&format!("{admin}/api/v1/overview")).await.json();
    let outcomes: Vec<&str> = overview["reloads"]
        .as_array()
        .expect("reloads in the overview")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        outcomes,
        ["applied", "refused", "refused", "applied"],
        "{overview:#}"
    );
    let metrics =
        String::from_utf8_lossy(&http.get(&format!("{admin}/metrics")).await.body).to_string();
    assert!(
        metrics.contains("control_reloads_total{outcome=\"refused\"} 2"),
        "{metrics}"
    );
}

/// `PUT /api/v1/pipelines` with `file`.
async fn put(http: &Http, admin: &str, file: impl Into<Bytes>) -> common::mesh::Answer {
    http.send(
        Method::PUT,
        &format!("{admin}/api/v1/pipelines"),
        &[("content-type", "application/yaml")],
        file.into(),
    )
    .await
    .expect("PUT")
}

/// Posts until `url` answers 200.
async fn eventually_ok(http: &Http, url: &str, body: &Bytes, up: &Proc) {
    until(
        Duration::from_secs(60),
        up,
        || format!("{url} never answered 200"),
        async || {
            let a = http.post_csv(url, body.clone()).await.ok()?;
            (a.status == StatusCode::OK).then_some(())
        },
    )
    .await
}

/// Waits until `pool` has `n` ready workers; their ids.
async fn wait_pool(http: &Http, admin: &str, pool: &str, n: usize, up: &Proc) -> Vec<String> {
    until(
        Duration::from_secs(60),
        up,
        || format!("{pool} never had {n} ready workers"),
        async || {
            let ids = pool_workers(http, admin, pool).await;
            (ids.len() == n).then_some(ids)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reloaded_mid_stream_loses_no_reading() {
    if !(services() && stream::have_paho()) {
        return;
    }
    let scratch = Scratch::new();
    let id = std::process::id();
    let (prefix, table) = (format!("etlmesh-test-reload-{id}"), format!("reload_{id}"));
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
    let file = |version: &str| {
        stream_yaml(
            &prefix,
            pg::MACHINE_URL,
            &table,
            &format!("    transform: SELECT device_id, seq, '{version}' AS version FROM input\n"),
        )
    };
    scratch.write("s.yaml", file("v1"));
    let up = Proc::up(
        scratch.dir.path(),
        &["-c", "s.yaml", "--workers", "2", "--watch-config"],
    );
    let admin = up.url("control plane");
    streams_started(&up, 2).await;
    let log = scratch.path("sent.ndjson");
    let total = 8_000u64;
    let publisher = paho(&[
        "--prefix",
        &prefix,
        "--count",
        &total.to_string(),
        "--rate",
        "1000",
        "--devices",
        "20",
        "--log",
        log.to_str().expect("utf-8 path"),
    ]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The watch picks the new file up.
    scratch.write("s.yaml", file("v2"));
    let http = Http::new();
    let record = reloaded(&http, &admin, 1, &up).await;
    assert_eq!(record["outcome"], "applied", "{record:#}\n{}", up.output());
    assert_eq!(record["trigger"], "watch");
    let how = record["pipelines"]["live"].as_str().unwrap_or_default();
    assert!(how.contains("2 worker(s) restarted in place"), "{record:#}");
    let sent = tokio::task::spawn_blocking(move || paho_done(publisher))
        .await
        .expect("publisher");
    assert_eq!(sent.acked, total, "the broker took every reading");
    let rows = stream::wait_rows(&db, &table, total as i64, Duration::from_secs(90)).await;
    let distinct = pg::count(
        &db,
        &format!("SELECT count(DISTINCT (device_id, seq)) FROM {table}"),
    )
    .await;
    let by_version: Vec<(String, i64)> = db
        .query(
            &format!("SELECT version, count(*) FROM {table} GROUP BY 1 ORDER BY 1"),
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!(
        "stream reload: {total} sent, {rows} rows, {distinct} distinct; by version {by_version:?}"
    );
    assert_eq!(
        distinct,
        total as i64,
        "every reading loaded through the reload:\n{}",
        up.output()
    );
    assert_eq!(
        by_version.len(),
        2,
        "both transforms loaded: {by_version:?}"
    );
    drop(up);
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_pipeline_is_restarted_in_place_under_its_id() {
    if !services() {
        return;
    }
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-reload-win-{}", std::process::id());
    // Windows without Kafka partitions run on one worker: a reload must not start a
    // second one beside it.
    let file = |size: &str| {
        format!(
            r#"pipelines:
  win:
    source: {{ type: mqtt, broker: "mqtt://127.0.0.1:1883", topic: "{prefix}/+/reading" }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms }}
    window: {{ time: ts, size: {size} }}
    transform: SELECT device_id, window_start, count(*) AS n FROM input GROUP BY device_id, window_start
    sinks: [{{ type: ndjson, path: out/win }}]
    dead_letter: {{ type: ndjson, path: out/dead }}
    scaling: {{ max_replicas: 1 }}
"#
        )
    };
    scratch.write("w.yaml", file("10s"));
    let up = Proc::up(scratch.dir.path(), &["-c", "w.yaml"]);
    let admin = up.url("control plane");
    streams_started(&up, 1).await;
    let http = Http::new();
    let before = wait_pool(&http, &admin, "win", 1, &up).await;
    scratch.write("w.yaml", file("20s"));
    up.signal(nix::sys::signal::Signal::SIGHUP);
    let record = reloaded(&http, &admin, 1, &up).await;
    assert_eq!(record["outcome"], "applied", "{record:#}\n{}", up.output());
    let how = record["pipelines"]["win"].as_str().unwrap_or_default();
    assert!(how.contains("restarted in place"), "{record:#}");
    assert_eq!(
        wait_pool(&http, &admin, "win", 1, &up).await,
        before,
        "the same id"
    );
    assert_eq!(
        up.output().matches("stream started").count(),
        2,
        "{}",
        up.output()
    );
}
