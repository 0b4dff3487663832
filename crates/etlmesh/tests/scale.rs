//! End-to-end tests of elastic scaling with real processes under `etlmesh up`: scale to
//! zero and activation, a load step from 1 to 64 clients, scale-down after the
//! stabilization window without losing requests, and the bounds of activation.
//! (A crashed worker being replaced is tested in `mesh.rs`, under the same scaler.)

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::Scratch;
use common::mesh::*;
use http::StatusCode;

/// These tests start many processes and time them; they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A scratch directory with `mesh.yaml`: `MESH_YAML`, with a scaling policy for
/// `clean` when given.
fn mesh_file(policy: Option<&str>) -> Scratch {
    let scratch = Scratch::new();
    let yaml = match policy {
        Some(p) => format!("{MESH_YAML}    scaling: {p}\n"),
        None => MESH_YAML.to_string(),
    };
    scratch.write("mesh.yaml", yaml);
    scratch
}

fn up(scratch: &Scratch, extra: &[&str]) -> (Proc, String, String) {
    let mut args = vec!["-c", "mesh.yaml"];
    args.extend_from_slice(extra);
    let p = Proc::up(scratch.dir.path(), &args);
    let (gw, admin) = (p.url("gateway"), p.url("control plane"));
    (p, gw, admin)
}

/// Workers of `clean` that are ready, as the control plane sees them.
async fn ready(http: &Http, admin: &str) -> usize {
    http.get(&format!("{admin}/api/v1/workers"))
        .await
        .json()
        .as_array()
        .map_or(0, |a| {
            a.iter()
                .filter(|w| w["state"] == "ready" && w["pipelines"][0] == "clean")
                .count()
        })
}

async fn workers(http: &Http, admin: &str) -> usize {
    http.get(&format!("{admin}/api/v1/workers"))
        .await
        .json()
        .as_array()
        .map_or(0, |a| a.len())
}

async fn events(http: &Http, admin: &str) -> Vec<String> {
    http.get(&format!("{admin}/api/v1/scaling")).await.json()["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["reason"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pipeline_scales_to_zero_and_the_next_request_is_held_not_failed() {
    let _serial = SERIAL.lock().await;
    let scratch = mesh_file(Some(
        "{ min_replicas: 0, max_replicas: 2, scale_down_window: 2s, idle_before_zero: 3s }",
    ));
    let (_up, gw, admin) = up(&scratch, &[]);
    let http = Http::new();
    let url = format!("{gw}/v1/pipelines/clean");

    // min_replicas 0: nothing runs until the first request.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        workers(&http, &admin).await,
        0,
        "no worker before any request"
    );

    for round in 0..2 {
        let sent = Instant::now();
        let a = http
            .post_csv(&url, readings(100, 0.0, round))
            .await
            .expect("answer");
        let cold_start = sent.elapsed();
        assert_eq!(a.status, StatusCode::OK, "round {round}: {:?}", a.body);
        assert_eq!(a.header("etlmesh-records-in"), "100");
        assert!(
            cold_start < Duration::from_secs(5),
            "round {round}: held for {cold_start:?}"
        );
        eprintln!("round {round}: answered from zero workers in {cold_start:?}");

        // Idle: back to zero after idle_before_zero, and not before.
        let idle = Instant::now();
        let took = eventually(Duration::from_secs(20), "scaled to zero", async || {
            workers(&http, &admin).await == 0
        })
        .await;
        assert!(
            idle.elapsed() >= Duration::from_secs(3),
            "went to zero after {took:?}, inside the idle period"
        );
    }
    let reasons = events(&http, &admin).await;
    assert!(
        reasons.iter().any(|r| r.starts_with("0 → 1")),
        "activation decided: {reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("1 → 0") && r.contains("idle")),
        "zero decided for idleness: {reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_are_bounded_and_time_out_with_retry_after() {
    let _serial = SERIAL.lock().await;
    let scratch = mesh_file(Some("{ min_replicas: 0, max_replicas: 1 }"));
    // Workers that cannot start (an unknown flag): requests wait for nothing.
    let (_up, gw, _admin) = up(
        &scratch,
        &[
            "--worker-arg=--no-such-flag",
            "--activation-queue",
            "2",
            "--activation-wait",
            "1s",
        ],
    );
    let url = format!("{gw}/v1/pipelines/clean");
    let http = Http::new();
    let started = Instant::now();
    let sends: Vec<_> = (0..6)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                // The first two are held before the others arrive.
                tokio::time::sleep(Duration::from_millis(if i < 2 { 0 } else { 300 })).await;
                http.post_csv(&url, readings(10, 0.0, i))
                    .await
                    .expect("answer")
            })
        })
        .collect();
    let mut codes = Vec::new();
    for s in sends {
        let a = s.await.expect("task");
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", a.body);
        assert!(!a.header("retry-after").is_empty(), "Retry-After is set");
        codes.push(a.json()["code"].as_str().unwrap_or("").to_string());
    }
    let full = codes
        .iter()
        .filter(|c| *c == "activation_queue_full")
        .count();
    let timed_out = codes.iter().filter(|c| *c == "no_ready_worker").count();
    assert_eq!((timed_out, full), (2, 4), "{codes:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held requests give up after the activation wait"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_step_scales_up_at_once_and_down_only_after_the_window() {
    let _serial = SERIAL.lock().await;
    let scratch = mesh_file(Some(
        "{ min_replicas: 1, max_replicas: 4, target_in_flight: 8, scale_down_window: 6s }",
    ));
    // Each request holds a worker for 200 ms, so that in-flight load is real.
    let (_up, gw, admin) = up(&scratch, &["--worker-arg=--inject-latency=200ms"]);
    let http = Http::new();
    let url = format!("{gw}/v1/pipelines/clean");
    eventually(Duration::from_secs(20), "one worker", async || {
        ready(&http, &admin).await == 1
    })
    .await;

    let body = readings(50, 0.0, 7);
    let stop_one = Arc::new(AtomicBool::new(false));
    let one = load(url.clone(), body.clone(), 1, stop_one.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ready(&http, &admin).await, 1, "one client needs one worker");

    // The step: 63 more clients.
    let stop_many = Arc::new(AtomicBool::new(false));
    let many = load(url.clone(), body.clone(), 63, stop_many.clone());
    let reaction = eventually(Duration::from_secs(10), "four workers", async || {
        ready(&http, &admin).await == 4
    })
    .await;
    // Up at once: decisions that only go up, straight towards max_replicas, none
    // down while the load holds (the tight figure belongs to the benchmarks).
    eprintln!("scaled to max_replicas {reaction:?} after the step");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ready(&http, &admin).await, 4, "never over max_replicas");
    let decisions = http.get(&format!("{admin}/api/v1/scaling")).await.json()["events"].clone();
    let moves: Vec<(u64, u64)> = decisions
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["from"].as_u64().unwrap_or(0),
                e["to"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        !moves.is_empty()
            && moves.iter().all(|(from, to)| to > from)
            && moves.windows(2).all(|w| w[0].1 == w[1].0),
        "only steps up, each from where the last ended: {moves:?}"
    );
    assert_eq!(moves.last().map(|m| m.1), Some(4), "{moves:?}");

    // The load stops but one client stays: nothing comes down inside the window.
    stop_many.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let many = many.await.expect("load");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        ready(&http, &admin).await,
        4,
        "no scale-down inside the 6 s window"
    );
    let down = eventually(Duration::from_secs(20), "back to one worker", async || {
        workers(&http, &admin).await == 1
    })
    .await;
    let down_after = stopped.elapsed();
    assert!(
        down_after >= Duration::from_secs(6),
        "came down after {down_after:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_one.store(true, Ordering::Relaxed);
    let one = one.await.expect("load");

    let all: Vec<Outcome> = one.into_iter().chain(many).collect();
    assert_none_failed(&all);
    let served_by = per_worker(&all);
    assert!(served_by.len() >= 4, "every worker served: {served_by:?}");
    let reasons = events(&http, &admin).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("1 → ") && r.contains("in-flight")),
        "{reasons:?}"
    );
    let metrics = http.get(&format!("{admin}/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(r#"autoscaler_decisions_total{pipeline="clean",direction="up",cause="#),
        "{text}"
    );
    eprintln!(
        "load step: {} requests, none failed; 4 workers {reaction:?} after the step; \
         back to one {:?} after the load stopped (waited {down:?}); by worker {served_by:?}",
        all.len(),
        down_after,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_demo_answers_and_wakes_its_idle_pipeline_on_demand() {
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let p = Proc::up(scratch.dir.path(), &["--demo"]);
    let (gw, admin) = (p.url("gateway"), p.url("control plane"));
    let http = Http::new();
    let sample = bytes::Bytes::from(
        std::fs::read(scratch.dir.path().join("data/sample.csv")).expect("the demo's sample"),
    );
    eventually(
        Duration::from_secs(20),
        "clean_readings ready",
        async || {
            http.get(&format!("{gw}/v1/pipelines"))
                .await
                .json()
                .as_array()
                .is_some_and(|a| {
                    a.iter()
                        .any(|p| p["name"] == "clean_readings" && p["ready_workers"] == 1)
                })
        },
    )
    .await;
    let a = http
        .post_csv(&format!("{gw}/v1/pipelines/clean_readings"), sample.clone())
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("etlmesh-records-in"), "1000");

    // readings_per_minute scales from zero: no worker until asked.
    let pools = http.get(&format!("{admin}/api/v1/scaling")).await.json();
    let per_minute = pools["pools"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["pipeline"] == "readings_per_minute"))
        .cloned()
        .expect("pool");
    assert_eq!(per_minute["ready"], 0, "{pools}");
    let a = http
        .post_csv(&format!("{gw}/v1/pipelines/readings_per_minute"), sample)
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert!(!a.body.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_a_killed_up_exit_instead_of_running_on() {
    let _serial = SERIAL.lock().await;
    let scratch = mesh_file(None);
    let (up, _gw, admin) = up(&scratch, &["--workers", "2"]);
    let http = Http::new();
    eventually(Duration::from_secs(20), "two workers", async || {
        ready(&http, &admin).await == 2
    })
    .await;
    let pids: Vec<i32> = http
        .get(&format!("{admin}/api/v1/workers"))
        .await
        .json()
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["pid"].as_i64().expect("pid") as i32)
        .collect();
    up.signal(nix::sys::signal::Signal::SIGKILL);
    let alive = |pid: i32| {
        // A zombie (exited, not yet reaped by init) counts as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    };
    let gone = eventually(
        Duration::from_secs(10),
        "orphaned workers exit",
        async || pids.iter().all(|p| !alive(*p)),
    )
    .await;
    eprintln!("workers exited {gone:?} after their supervisor was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_drains_and_exits_on_sigterm() {
    let _serial = SERIAL.lock().await;
    let scratch = mesh_file(None);
    let (mut up, gw, admin) = up(&scratch, &["--workers", "2"]);
    let http = Http::new();
    eventually(Duration::from_secs(20), "two workers", async || {
        ready(&http, &admin).await == 2
    })
    .await;
    // A gateway watch is open (the gateway follows the control plane): it must not
    // hold the shutdown.
    let a = http
        .post_csv(&format!("{gw}/v1/pipelines/clean"), readings(10, 0.0, 1))
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::OK);
    up.signal(nix::sys::signal::Signal::SIGTERM);
    let started = Instant::now();
    let status = up.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}\n{}", up.output());
    eprintln!("up exited {:?} after SIGTERM", started.elapsed());
}
