//! Clients crafted to hurt the gateway: bodies larger than any route reads, Arrow
//! Flight descriptors naming no pipeline (or megabytes of one), sockets that never
//! speak, and batch jobs that reach outside their pipeline (other tokens' jobs, host
//! paths, inputs shaped like flags, runs that never end).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mesh::Proc;
use common::{Scratch, have_programs, server_cert, text};

const YAML: &str = r#"platform:
  threads: 1
pipelines:
  clean:
    schema: { device_id: utf8, temperature_c: float64 }
    transform: SELECT device_id, temperature_c * 9 / 5 + 32 AS temperature_f FROM input
    sinks: [ { type: parquet, path: out/clean } ]
    dead_letter: { type: ndjson, path: out/dead }
"#;

/// `host:port` of a URL.
fn authority(url: &str) -> String {
    url.split("://")
        .nth(1)
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_string()
}

/// Sends raw bytes and reads the answer's status line (the server may answer before
/// it read what was sent, and close).
fn raw(addr: &str, request: &[u8], then: impl FnOnce(&mut TcpStream)) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = s.write_all(request);
    then(&mut s);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let status = text(&answer).lines().next().unwrap_or("").to_string();
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_descriptors_and_silent_sockets_cannot_bloat_or_block_the_gateway() {
    let s = Scratch::new();
    s.write("mesh.yaml", YAML);
    let up = Proc::up(
        s.dir.path(),
        &[
            "-c",
            "mesh.yaml",
            "--workers",
            "1",
            "--flight",
            "127.0.0.1:0",
            "--state-dir",
            "state",
        ],
    );
    let gw = up.url("gateway");
    let addr = authority(&gw);

    // A job request that says it is 1 GiB: refused before it is read.
    let (status, took) = raw(
        &addr,
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{\"pipeline\"",
        |_| {},
    );
    assert!(status.contains(" 413 "), "{status}");
    assert!(took < Duration::from_secs(2), "answered in {took:?}");
    // One that streams without a length: cut at the bound, not read to its end.
    let (status, _) = raw(
        &addr,
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        |s| {
            let chunk = format!("{:x}\r\n{}\r\n", 16384, "x".repeat(16384));
            for _ in 0..640 {
                if s.write_all(chunk.as_bytes()).is_err() {
                    break;
                }
            }
        },
    );
    assert!(status.contains(" 413 "), "{status}");

    // A request whose headers never end is closed, not kept.
    let (status, took) = raw(&addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", |_| {});
    assert!(
        !status.contains(" 200 ") && took < Duration::from_secs(15),
        "{status} after {took:?}"
    );

    // 600 sockets that never send a byte: the next client is served at once.
    let silent: Vec<TcpStream> = (0..600)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    let (status, took) = raw(
        &addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        |_| {},
    );
    assert!(status.contains(" 200 "), "{status}");
    assert!(took < Duration::from_secs(1), "healthz took {took:?}");
    drop(silent);

    // Arrow Flight: an unknown pipeline is NOT_FOUND and counted as `unknown`; a
    // descriptor of a megabyte is refused and named nowhere.
    let flight = up.url("gateway Arrow Flight");
    let channel = tonic::transport::Endpoint::from_shared(flight.replace("grpc://", "http://"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = arrow_flight::flight_service_client::FlightServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let long = "p".repeat(1 << 20);
    for (name, code) in [
        ("no_such_pipeline", tonic::Code::NotFound),
        (long.as_str(), tonic::Code::InvalidArgument),
    ] {
        let first = arrow_flight::FlightData {
            flight_descriptor: Some(arrow_flight::FlightDescriptor::new_path(vec![
                name.to_string(),
            ])),
            ..Default::default()
        };
        let err = client
            .do_exchange(futures::stream::iter(vec![first]))
            .await
            .expect_err("refused");
        assert_eq!(
            err.code(),
            code,
            "{}",
            &err.message()[..err.message().len().min(200)]
        );
    }
    let metrics = common::mesh::Http::new()
        .get(&format!("{gw}/metrics"))
        .await
        .body;
    let metrics = text(&metrics);
    assert!(
        !metrics.contains("no_such_pipeline") && !metrics.contains("pppppppppppppppp"),
        "no label is made of a name that is not a pipeline"
    );
    assert!(
        metrics.contains(r#"pipeline="unknown",code="404""#),
        "{metrics}"
    );

    // Analytics: queries that would build gigabytes in one call answer an error, and
    // the gateway stays up, small.
    let http = common::mesh::Http::new();
    for (sql, want) in [
        ("SELECT repeat('ab', 1000000000) AS x", &[422][..]),
        ("SELECT lpad('x', 2000000000) AS x", &[422]),
        (
            "SELECT length(repeat(CAST(value AS VARCHAR), 50000000)) AS n FROM generate_series(1, 100)",
            &[422],
        ),
        // The memory pool or the time limit, whichever comes first.
        (
            "SELECT array_agg(value) AS a FROM generate_series(1, 2000000000)",
            &[422, 504],
        ),
        (
            "SELECT count(*) AS n FROM generate_series(1, 100000000000)",
            &[504],
        ),
    ] {
        let body = serde_json::json!({"sql": sql, "timeout_ms": 3000}).to_string();
        let a = http
            .send(
                http::Method::POST,
                &format!("{gw}/v1/query"),
                &[("content-type", "application/json")],
                bytes::Bytes::from(body),
            )
            .await
            .expect("the gateway answers");
        assert!(
            want.contains(&a.status.as_u16()),
            "{sql}: {} {}",
            a.status,
            text(&a.body)
        );
        let health = http.get(&format!("{gw}/healthz")).await;
        assert_eq!(health.status.as_u16(), 200, "after {sql}");
    }
    let rss = std::fs::read_to_string(format!("/proc/{}/status", up.pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    assert!(
        rss < 1536 * 1024,
        "the gateway's peak memory: {} MiB",
        rss / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_silent_tls_sockets_do_not_lock_out_the_next_client() {
    if !have_programs(&[("openssl", "version"), ("curl", "--version")]) {
        return;
    }
    let s = Scratch::new();
    server_cert(s.dir.path());
    s.write(
        "mesh.yaml",
        YAML.replace(
            "platform:\n  threads: 1\n",
            "platform:\n  threads: 1\n  access:\n    tls: { cert: cert.pem, key: key.pem }\n",
        ),
    );
    let up = Proc::up(
        s.dir.path(),
        &["-c", "mesh.yaml", "--workers", "1", "--state-dir", "state"],
    );
    let gw = up.url("gateway").replace("127.0.0.1", "localhost");
    let addr = authority(&up.url("gateway"));
    let curl = || {
        let started = Instant::now();
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "15",
                "--cacert",
            ])
            .arg(s.path("cert.pem"))
            .arg(format!("{gw}/healthz"))
            .output()
            .expect("curl");
        (text(&out.stdout), started.elapsed())
    };
    assert_eq!(curl().0, "200");
    // Sockets that never send a ClientHello, more than any bound on pending handshakes.
    let silent: Vec<TcpStream> = (0..600)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (code, took) = curl();
    assert_eq!(code, "200", "{}", up.output());
    assert!(
        took < Duration::from_secs(1),
        "the handshake waited {took:?}"
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_stay_in_their_pipeline_their_directories_and_their_time() {
    let s = Scratch::new();
    let token = |name: &str, args: &[&str]| -> (String, String) {
        let mut all = vec!["token", "new", name];
        all.extend_from_slice(args);
        let out = s.etlmesh(&all);
        assert!(out.status.success(), "{}", text(&out.stderr));
        (
            text(&out.stdout).trim().to_string(),
            text(&out.stderr)
                .lines()
                .find(|l| l.trim_start().starts_with("- { name:"))
                .expect("the entry")
                .trim()
                .to_string(),
        )
    };
    let (ci, ci_entry) = token("ci", &["--pipelines", "clean"]);
    let (admin, admin_entry) = token("admin", &[]);
    std::fs::create_dir_all(s.path("in")).expect("mkdir");
    s.write("in/a.csv", "device_id,temperature_c\nd1,20\n");
    let fifo = s.path("in/never.csv");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let yaml = format!(
        "platform:\n  threads: 1\n  access:\n    tokens:\n      {ci_entry}\n      {admin_entry}\n{}  other:\n    schema: {{ device_id: utf8, temperature_c: float64 }}\n    sinks: [ {{ type: ndjson, path: out/other }} ]\n    jobs: {{ inputs: [in], timeout: 2s }}\n",
        YAML.trim_start_matches("platform:\n  threads: 1\n")
    );
    s.write("mesh.yaml", &yaml);
    let up = Proc::up(
        s.dir.path(),
        &["-c", "mesh.yaml", "--workers", "1", "--state-dir", "state"],
    );
    let gw = up.url("gateway");
    let call = |method: &str, path: &str, token: &str, body: &str| {
        let out = Command::new("curl")
            .args(["-s", "-X", method, "-w", "\n%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {token}"))
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .arg(format!("{gw}{path}"))
            .output()
            .expect("curl");
        let all = text(&out.stdout);
        let (body, code) = all.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse::<u16>().unwrap_or(0), body.to_string())
    };

    // Inputs outside the pipeline's directories are refused at submission.
    for input in ["/etc/passwd", "in/../mesh.yaml", "/tmp/*.csv"] {
        let (code, body) = call(
            "POST",
            "/v1/jobs",
            &admin,
            &format!(r#"{{"pipeline":"other","inputs":["{input}"],"expected_duration_secs":1}}"#),
        );
        assert_eq!(code, 400, "{input}: {body}");
        assert!(body.contains("not under the directories"), "{body}");
    }

    // An input shaped like a flag is an input, not a flag.
    let (code, body) = call(
        "POST",
        "/v1/jobs",
        &admin,
        r#"{"pipeline":"other","inputs":["in/--threads=100000"],"expected_duration_secs":1}"#,
    );
    assert_eq!(code, 201, "{body}");
    let flag_job: serde_json::Value = serde_json::from_str(&body).expect("job");
    // (`clean` may read under the pipeline file's directory, where this one would be.)
    let (code, body) = call(
        "POST",
        "/v1/jobs",
        &admin,
        r#"{"pipeline":"clean","inputs":["--threads=100000"],"expected_duration_secs":1}"#,
    );
    assert_eq!(code, 201, "{body}");
    let bare_flag: serde_json::Value = serde_json::from_str(&body).expect("job");

    // A run that never ends (its input is a pipe nobody writes) stops at its timeout.
    let (code, body) = call(
        "POST",
        "/v1/jobs",
        &admin,
        r#"{"pipeline":"other","inputs":["in/never.csv"],"expected_duration_secs":1}"#,
    );
    assert_eq!(code, 201, "{body}");
    let stuck: serde_json::Value = serde_json::from_str(&body).expect("job");

    // ci sees `clean`'s job and none of `other`'s, and cannot read or cancel those.
    let id = stuck["id"].as_str().expect("id");
    let (code, body) = call("GET", "/v1/jobs", &ci, "");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).expect("list");
    let pipelines: Vec<&str> = list["jobs"]
        .as_array()
        .map(|a| a.iter().filter_map(|j| j["pipeline"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(pipelines, vec!["clean"], "{body}");
    let (code, _) = call("GET", "/v1/jobs", &admin, "");
    assert_eq!(code, 200);
    assert_eq!(call("GET", &format!("/v1/jobs/{id}"), &ci, "").0, 404);
    assert_eq!(call("DELETE", &format!("/v1/jobs/{id}"), &ci, "").0, 404);
    assert_eq!(call("GET", &format!("/v1/jobs/{id}"), &admin, "").0, 200);

    let state = |job: &serde_json::Value| {
        let (_, body) = call(
            "GET",
            &format!("/v1/jobs/{}", job["id"].as_str().unwrap_or("")),
            &admin,
            "",
        );
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()
    };
    let started = Instant::now();
    let ended = |j: &serde_json::Value| {
        matches!(
            j["state"].as_str(),
            Some("failed" | "succeeded" | "cancelled")
        )
    };
    let (mut a, mut b, mut c) = (state(&flag_job), state(&bare_flag), state(&stuck));
    while !(ended(&a) && ended(&b) && ended(&c)) {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "{a}\n{b}\n{c}\n{}",
            up.output()
        );
        std::thread::sleep(Duration::from_millis(300));
        (a, b, c) = (state(&flag_job), state(&bare_flag), state(&stuck));
    }
    for j in [&a, &b] {
        assert_eq!(j["state"], "failed", "{j}");
        assert!(
            j["error"]
                .as_str()
                .is_some_and(|e| e.contains("--threads=100000")),
            "the input was read as a path: {j}"
        );
    }
    assert_eq!(c["state"], "failed", "{c}");
    assert!(
        c["error"]
            .as_str()
            .is_some_and(|e| e.contains("past its timeout")),
        "{c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_every_bound_ends_the_analytics_process_not_the_gateway() {
    let s = Scratch::new();
    // A small cap, so that the test allocates little.
    s.write(
        "mesh.yaml",
        YAML.replace(
            "platform:\n  threads: 1\n",
            "platform:\n  threads: 1\n  query: { memory_limit: 64MiB, process_memory: 1GiB }\n",
        ),
    );
    let up = Proc::up(
        s.dir.path(),
        &["-c", "mesh.yaml", "--workers", "1", "--state-dir", "state"],
    );
    let gw = up.url("gateway");
    up.wait_for("analytics listening on", Duration::from_secs(20));
    let http = common::mesh::Http::new();
    let query = |sql: &str| {
        let body = serde_json::json!({"sql": sql, "timeout_ms": 20000}).to_string();
        let http = &http;
        let url = format!("{gw}/v1/query");
        async move {
            http.send(
                http::Method::POST,
                &url,
                &[("content-type", "application/json")],
                bytes::Bytes::from(body),
            )
            .await
            .expect("the gateway answers")
        }
    };
    assert_eq!(query("SELECT 41 + 1 AS answer").await.status.as_u16(), 200);
    // Each repeat stays under its bound (16 MiB of the 64 MiB pool); concat of 100 of
    // them builds 1.5 GB in one call, past the process's 1 GiB of address space.
    let parts = vec!["repeat('x', 15000000)"; 100].join(", ");
    let a = query(&format!("SELECT length(concat({parts})) AS n")).await;
    assert_eq!(a.status.as_u16(), 422, "{}", text(&a.body));
    assert!(
        text(&a.body).contains("analytics process"),
        "{}",
        text(&a.body)
    );
    // The gateway still serves, and the analytics process is back.
    assert_eq!(
        http.get(&format!("{gw}/healthz")).await.status.as_u16(),
        200
    );
    let started = Instant::now();
    loop {
        let a = query("SELECT 41 + 1 AS answer").await;
        if a.status.as_u16() == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "analytics did not come back: {} {}\n{}",
            a.status,
            text(&a.body),
            up.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        up.output()
            .contains("the analytics process ended; restarting it"),
        "{}",
        up.output()
    );
    let rss = std::fs::read_to_string(format!("/proc/{}/status", up.pid()))
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    assert!(
        rss < 512 * 1024,
        "the gateway's peak memory: {} MiB",
        rss / 1024
    );
}
