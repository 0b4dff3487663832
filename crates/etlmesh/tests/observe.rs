//! End-to-end tests of observability with real processes: metrics that move under
//! load, a request's trace id in the gateway's and the worker's logs and in the
//! control plane's collection, errors grouped, `etlmesh top`, `etlmesh logs`,
//! `etlmesh tap`, and the `/ui` dashboard in headless Chromium.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::mesh::*;
use http::{Method, StatusCode};

/// Mesh tests start many processes; on a small machine they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Debug lines of gateway and worker say when each request is served (in its span).
const LOG_ENV: &[(&str, &str)] = &[(
    "ETLMESH_LOG",
    "info,etlmesh_gateway=debug,etlmesh_worker=debug",
)];

/// `name{labels} value` lines of a scrape, summed by name and label subset.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (n, rest) = key.split_once('{').unwrap_or((key, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

async fn scrape(url: &str) -> String {
    let a = Http::new().get(&format!("{url}/metrics")).await;
    assert_eq!(a.status, StatusCode::OK, "{url}/metrics");
    String::from_utf8_lossy(&a.body).into_owned()
}

async fn worker_url(cp: &str) -> String {
    let list = Http::new()
        .get(&format!("{cp}/api/v1/workers"))
        .await
        .json();
    list[0]["address"].as_str().expect("address").to_string()
}

/// Runs `etlmesh ARGS` to the end; its stdout.
async fn etlmesh(args: Vec<String>) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args(&args)
        .output()
        .await
        .expect("etlmesh runs");
    assert!(
        out.status.success(),
        "etlmesh {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_load_and_a_trace_id_reaches_every_log() {
    let _serial = SERIAL.lock().await;
    let (mesh, _) = Mesh::start_env(&[&[]], &[], LOG_ENV).await;
    let cp = mesh.cp_url.clone();
    let worker = worker_url(&cp).await;
    let before_gw = scrape(&mesh.gw_url).await;
    let before_w = scrape(&worker).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = load(
        mesh.transform_url(),
        readings(500, 0.02, 7),
        3,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Under load: every family moves.
    let gw = scrape(&mesh.gw_url).await;
    let w = scrape(&worker).await;
    let control = scrape(&cp).await;
    let ok = [("pipeline", "clean"), ("code", "200")];
    let grew = |name: &str, before: &str, after: &str, labels: &[(&str, &str)]| {
        let (a, b) = (metric(before, name, labels), metric(after, name, labels));
        assert!(b > a, "{name} {labels:?} did not grow: {a} → {b}");
    };
    grew("etlmesh_gateway_requests_total", &before_gw, &gw, &ok);
    grew(
        "etlmesh_gateway_request_duration_seconds_count",
        &before_gw,
        &gw,
        &[("pipeline", "clean")],
    );
    grew(
        "etlmesh_gateway_records_total",
        &before_gw,
        &gw,
        &[("pipeline", "clean"), ("outcome", "out")],
    );
    grew("etlmesh_worker_requests_total", &before_w, &w, &ok);
    for outcome in ["in", "out", "filtered", "dead_lettered"] {
        grew(
            "etlmesh_worker_records_total",
            &before_w,
            &w,
            &[("pipeline", "clean"), ("outcome", outcome)],
        );
    }
    for direction in ["in", "out"] {
        grew(
            "etlmesh_worker_bytes_total",
            &before_w,
            &w,
            &[("pipeline", "clean"), ("direction", direction)],
        );
    }
    grew("etlmesh_process_cpu_seconds_total", &before_w, &w, &[]);
    assert!(metric(&w, "etlmesh_worker_latency_ewma_seconds", &[]) > 0.0);
    assert!(metric(&w, "etlmesh_process_resident_memory_bytes", &[]) > 1e6);
    assert!(metric(&control, "etlmesh_process_resident_memory_bytes", &[]) > 1e6);
    assert!(
        metric(
            &control,
            "etlmesh_errors_total",
            &[("pipeline", "clean"), ("kind", "bad_record.cast")]
        ) > 0.0,
        "dead-lettered records counted as errors:\n{control}"
    );

    // The overview: rates and latency from the gateway, records from the worker.
    let o = Http::new()
        .get(&format!("{cp}/api/v1/overview"))
        .await
        .json();
    let clean = o["pipelines"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "clean"))
        .expect("clean in the overview")
        .clone();
    assert!(clean["requests_per_sec"].as_f64() > Some(1.0), "{clean}");
    assert!(clean["records_per_sec"].as_f64() > Some(100.0), "{clean}");
    assert!(clean["p99_ms"].as_f64() > Some(0.0), "{clean}");
    assert_eq!(clean["ready"], 1);
    assert!(o["series"].as_array().is_some_and(|s| s.len() >= 2), "{o}");

    // `etlmesh top --once` draws the same figures.
    let top = etlmesh(vec![
        "top".into(),
        "--once".into(),
        "--control-plane".into(),
        cp.clone(),
    ])
    .await;
    assert!(
        top.contains("etlmesh top") && top.contains("gateways 1"),
        "{top}"
    );
    assert!(
        top.contains("clean") && top.contains("w1") && top.contains("ready"),
        "{top}"
    );

    // `etlmesh tap`: live records at each stage, as many as asked.
    for (stage, n, field) in [
        ("input", 3, "humidity"),
        ("output", 5, "temperature_f"),
        ("dead_letter", 2, "reason"),
    ] {
        let out = etlmesh(vec![
            "tap".into(),
            "clean".into(),
            "--stage".into(),
            stage.into(),
            "-n".into(),
            n.to_string(),
            "--timeout".into(),
            "20s".into(),
            "--control-plane".into(),
            cp.clone(),
        ])
        .await;
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), n, "{stage}: {out}");
        for l in &lines {
            assert_eq!(l["worker"], "w1", "{l}");
            assert_eq!(l["stage"], stage, "{l}");
            assert!(l["record"].get(field).is_some(), "{stage}: {l}");
        }
    }

    stop.store(true, Ordering::Relaxed);
    let outcomes = load.await.expect("load");
    assert_none_failed(&outcomes);

    // One request with a known trace: its id is in the gateway's and the worker's logs.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let a = Http::new()
        .send(
            Method::POST,
            &mesh.transform_url(),
            &[("content-type", "text/csv"), ("traceparent", &parent)],
            readings(20, 0.0, 3),
        )
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::OK);
    let gateway = &mesh._processes[1];
    let gw_line = gateway.wait_for(trace, Duration::from_secs(5));
    assert!(gw_line.contains("request served"), "{gw_line}");
    let w_line = mesh.workers[0].wait_for(trace, Duration::from_secs(5));
    assert!(w_line.contains("request served"), "{w_line}");

    // An error answer carries its trace id, and is grouped by kind and pipeline.
    let bad_trace = "0af7651916cd43dd8448eb211c80319c";
    let a = Http::new()
        .send(
            Method::POST,
            &mesh.transform_url(),
            &[
                ("content-type", "text/plain"),
                (
                    "traceparent",
                    &format!("00-{bad_trace}-b7ad6b7169203331-01"),
                ),
            ],
            Bytes::from_static(b"x"),
        )
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(a.json()["trace_id"], bad_trace);

    // The control plane collected both processes' lines, with the trace ids.
    let sources_with_trace = async || {
        let page = Http::new()
            .get(&format!("{cp}/api/v1/logs?level=debug&limit=4000"))
            .await
            .json();
        let mut by: HashMap<String, usize> = HashMap::new();
        for l in page["lines"].as_array().into_iter().flatten() {
            if l["trace_id"] == trace {
                *by.entry(l["source"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
            }
        }
        by
    };
    eventually(
        Duration::from_secs(10),
        "the trace's lines collected from gateway and worker",
        async || {
            let by = sources_with_trace().await;
            by.contains_key("w1") && by.keys().any(|s| s.starts_with("gateway-"))
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the 415 grouped with its trace id",
        async || {
            let e = Http::new().get(&format!("{cp}/api/v1/errors")).await.json();
            e["groups"].as_array().into_iter().flatten().any(|g| {
                g["kind"] == "unsupported_media_type"
                    && g["pipeline"] == "clean"
                    && g["count"].as_u64() >= Some(1)
                    && g["first_seen"].is_string()
                    && g["trace_ids"]
                        .as_array()
                        .is_some_and(|t| t.iter().any(|t| t == bad_trace))
            })
        },
    )
    .await;

    // `etlmesh logs` shows them; --worker and --level filter.
    let logs = etlmesh(vec![
        "logs".into(),
        "--control-plane".into(),
        cp.clone(),
        "--worker".into(),
        "w1".into(),
        "--level".into(),
        "debug".into(),
        "-n".into(),
        "4000".into(),
    ])
    .await;
    assert!(
        logs.lines()
            .any(|l| l.contains(trace) && l.contains("[w1]")),
        "{logs}"
    );
    let warnings = etlmesh(vec![
        "logs".into(),
        "--control-plane".into(),
        cp.clone(),
        "--level".into(),
        "warn".into(),
        "-n".into(),
        "4000".into(),
    ])
    .await;
    assert!(!warnings.contains("request served"), "{warnings}");
    let errors = etlmesh(vec!["errors".into(), "--control-plane".into(), cp.clone()]).await;
    assert!(errors.contains("unsupported_media_type"), "{errors}");
}

/// The number in `attr="N"` right after `anchor` in `html`.
fn number_after(html: &str, anchor: &str, attr: &str) -> Option<f64> {
    let at = html.find(anchor)? + anchor.len();
    let rest = &html[at..];
    let v = rest.find(attr)? + attr.len();
    let s: String = rest[v..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ',')
        .filter(|c| *c != ',')
        .collect();
    s.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures_and_draws_charts_in_chromium() {
    let Some(browser) = common::chromium() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start(&[&[]], &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(mesh.transform_url(), readings(300, 0.0, 5), 2, stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;

    let html = common::dump_dom(&browser, &format!("{}/ui", mesh.cp_url)).await;
    stop.store(true, Ordering::Relaxed);
    assert_none_failed(&load.await.expect("load"));

    // The page fetched the overview at least once and drew it.
    let updates = number_after(&html, "<body", "data-updates=\"").unwrap_or(0.0);
    assert!(updates >= 1.0, "no update of the page:\n{html}");
    for chart in [
        "chart-requests",
        "chart-records",
        "chart-latency",
        "chart-replicas",
    ] {
        let points = number_after(&html, &format!("id=\"{chart}\""), "data-points=\"");
        assert!(
            points.is_some_and(|p| p >= 2.0),
            "{chart} has no line drawn ({points:?}):\n{html}"
        );
    }
    assert!(html.contains("<polyline class=\"series\""), "{html}");
    // Live figures: the pipeline's requests per second, its worker in the topology.
    let rps = number_after(&html, "data-pipeline=\"clean\"", "class=\"n rps\">");
    assert!(
        rps.is_some_and(|r| r > 0.0),
        "requests/s of clean: {rps:?}\n{html}"
    );
    assert!(
        html.contains("w1 · "),
        "the worker in the topology:\n{html}"
    );
    assert!(
        html.contains("stdout:ndjson"),
        "the sink in the topology:\n{html}"
    );
    // Energy: the source in use and the pipeline's joules, above zero under load.
    assert!(
        html.contains("id=\"energy-source\">model<") || html.contains("id=\"energy-source\">rapl<"),
        "the energy source on the page:\n{html}"
    );
    let joules = number_after(
        &html,
        "<tr data-pipeline=\"clean\"><td>clean</td><td class=\"n\">",
        "data-joules=\"",
    );
    assert!(
        joules.is_some_and(|j| j > 0.0),
        "the pipeline's energy on the page: {joules:?}\n{html}"
    );
}

/// A minimal OTLP/HTTP receiver: keeps the JSON bodies posted to `/v1/traces`.
async fn otlp_receiver() -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    sink.lock().expect("spans").push(v);
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), got)
}

/// Every span received: (service, span).
fn spans(bodies: &[serde_json::Value]) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for b in bodies {
        for rs in b["resourceSpans"].as_array().into_iter().flatten() {
            let service = rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .and_then(|a| a["value"]["stringValue"].as_str())
                .unwrap_or("")
                .to_string();
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    out.push((service.clone(), s.clone()));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_an_otlp_collector_as_one_trace_from_gateway_to_worker() {
    let _serial = SERIAL.lock().await;
    let (endpoint, bodies) = otlp_receiver().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let (mesh, _) = Mesh::start_env(&[&[]], &[], &env).await;
    let trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let client_span = "00f067aa0ba902b8";
    let a = Http::new()
        .send(
            Method::POST,
            &mesh.transform_url(),
            &[
                ("content-type", "text/csv"),
                ("traceparent", &format!("00-{trace}-{client_span}-01")),
            ],
            readings(50, 0.1, 9),
        )
        .await
        .expect("answer");
    assert_eq!(a.status, StatusCode::OK);
    let mut found = Vec::new();
    eventually(
        Duration::from_secs(15),
        "the gateway's and the worker's spans at the collector",
        async || {
            found = spans(&bodies.lock().expect("spans"))
                .into_iter()
                .filter(|(_, s)| s["traceId"] == trace)
                .collect();
            found.len() >= 2
        },
    )
    .await;
    let (gw_service, gw) = found
        .iter()
        .find(|(_, s)| s["name"] == "gateway.request")
        .expect("the gateway's span");
    let (w_service, w) = found
        .iter()
        .find(|(_, s)| s["name"] == "worker.transform")
        .expect("the worker's span");
    assert_eq!(gw_service, "etlmesh-gateway");
    assert_eq!(w_service, "etlmesh-worker");
    // One trace: client → gateway → worker.
    assert_eq!(gw["parentSpanId"], client_span, "{gw}");
    assert_eq!(w["parentSpanId"], gw["spanId"], "{w}");
    let attr = |s: &serde_json::Value, k: &str| {
        s["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == k)
            .map(|a| a["value"].clone())
    };
    assert_eq!(
        attr(gw, "pipeline").and_then(|v| v["stringValue"].as_str().map(String::from)),
        Some("clean".to_string())
    );
    assert!(attr(w, "etlmesh.records_in").is_some(), "{w}");
    // The worker's answer names its own span, a child in the same trace.
    let tp = a.header("traceparent");
    assert!(tp.contains(trace), "{tp}");
    assert_eq!(
        w["spanId"].as_str(),
        tp.split('-').nth(2),
        "the worker's span is the one it answers with"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sampler_exports_only_the_traces_it_keeps() {
    let _serial = SERIAL.lock().await;
    let (endpoint, bodies) = otlp_receiver().await;
    // Ratio 0 for new traces; a caller's decision is followed.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
    ];
    let (mesh, _) = Mesh::start_env(&[&[]], &[], &env).await;
    let send = async |traceparent: Option<String>| {
        let mut h = vec![("content-type", "text/csv")];
        if let Some(tp) = &traceparent {
            h.push(("traceparent", tp.as_str()));
        }
        let a = Http::new()
            .send(Method::POST, &mesh.transform_url(), &h, readings(5, 0.0, 4))
            .await
            .expect("answer");
        assert_eq!(a.status, StatusCode::OK);
        a.header("etlmesh-trace-id").to_string()
    };
    let unsampled_caller = "6bf92f3577b34da6a3ce929d0e0e4738";
    send(Some(format!("00-{unsampled_caller}-00f067aa0ba902b9-00"))).await;
    let new_trace = send(None).await;
    assert_eq!(new_trace.len(), 32, "a trace id even when not sampled");
    let sampled_caller = "7bf92f3577b34da6a3ce929d0e0e4739";
    send(Some(format!("00-{sampled_caller}-00f067aa0ba902ba-01"))).await;
    // The sampled one arrives (both spans); the others were sent before it.
    eventually(
        Duration::from_secs(15),
        "the sampled trace's spans at the collector",
        async || {
            spans(&bodies.lock().expect("spans"))
                .iter()
                .filter(|(_, s)| s["traceId"] == sampled_caller)
                .count()
                >= 2
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let traces: Vec<String> = spans(&bodies.lock().expect("spans"))
        .iter()
        .filter_map(|(_, s)| s["traceId"].as_str().map(String::from))
        .collect();
    assert!(
        !traces.contains(&unsampled_caller.to_string()),
        "a caller's 'not sampled' is followed"
    );
    assert!(
        !traces.contains(&new_trace),
        "a new trace is not sampled at ratio 0"
    );
}
