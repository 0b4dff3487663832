//! End to end: who may use the gateway. Tokens made by `etlmesh token new` and listed
//! (hashed) in the file: no token or a wrong one gets 401, a pipeline or service the
//! token may not use 403, a token over its rate 429 with Retry-After; CORS answers
//! preflights for allowed origins only; the public listeners (HTTP and Arrow Flight)
//! speak TLS when given a certificate, and `etlmesh query` reaches them with
//! `--ca-cert`; health stays open.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::mesh::{MESH_YAML, Proc};
use common::{Scratch, have_programs, server_cert, text};

/// A new token: (the token, its file entry).
fn new_token(s: &Scratch, args: &[&str]) -> (String, String) {
    let mut all = vec!["token", "new"];
    all.extend_from_slice(args);
    let out = s.etlmesh(&all);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    let entry = text(&out.stderr)
        .lines()
        .find(|l| l.trim_start().starts_with("- { name:"))
        .expect("entry")
        .to_string();
    (token, entry)
}

/// `curl` against the TLS gateway: (status, headers and body).
fn curl(ca: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--http1.1", "--cacert", ca, "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs");
    let all = text(&out.stdout);
    let status = all
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, all)
}

/// `curl` POSTing `body` as `content_type` with a bearer token.
fn post(ca: &str, token: &str, content_type: &str, body: &str, url: &str) -> (u16, String) {
    let auth = format!("Authorization: Bearer {token}");
    let ct = format!("Content-Type: {content_type}");
    curl(ca, &["-H", &auth, "-H", &ct, "--data-binary", body, url])
}

/// Flight calls over `channel`: refused without a token, saying so; served with `token`
/// in the `authorization` metadata.
async fn flight_needs_the_token(channel: tonic::transport::Channel, token: &str) {
    let mut client = arrow_flight::FlightClient::new(channel);
    let e = client
        .list_flights(bytes::Bytes::new())
        .await
        .err()
        .expect("no token");
    assert!(
        e.to_string()
            .contains("unauthorized: this gateway needs an API token"),
        "{e}"
    );
    client
        .add_header("authorization", &format!("Bearer {token}"))
        .expect("header");
    assert!(client.list_flights(bytes::Bytes::new()).await.is_ok());
}

/// A Flight client over TLS trusting `ca`: refused without a token, served with one;
/// plain gRPC gets nothing from the TLS port.
async fn flight_over_tls(addr: &str, ca: &std::path::Path, token: &str) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots.add(c.expect("a certificate")).expect("a root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let at = addr.to_string();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, at) = (connector.clone(), at.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&at).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .expect("a name")
                    .to_owned();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .expect("a TLS channel to the Flight listener");
    flight_needs_the_token(channel, token).await;
    let plain = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let mut c = arrow_flight::FlightClient::new(ch);
        c.add_header("authorization", &format!("Bearer {token}"))
            .expect("header");
        assert!(
            c.list_flights(bytes::Bytes::new()).await.is_err(),
            "plain gRPC on the TLS port"
        );
    }
}

const READING: &str = "device_id,ts,temperature_c,humidity,battery_v,status\nd1,2026-01-01T00:00:00Z,20.5,40,3.7,ok\n";

#[test]
fn tokens_rates_cors_and_tls_guard_the_gateway() {
    if !have_programs(&[("openssl", "version"), ("curl", "--version")]) {
        return;
    }
    let s = Scratch::new();
    server_cert(s.dir.path());
    let (ci, ci_entry) = new_token(
        &s,
        &["ci", "--pipelines", "clean", "--rate", "4", "--no-query"],
    );
    let (analyst, analyst_entry) = new_token(&s, &["analyst"]);
    assert!(
        ci.starts_with("etm_") && !ci_entry.contains(&ci),
        "the file holds the hash, not the token"
    );
    let access = format!(
        "platform:\n  threads: 1\n  access:\n    tokens:\n{ci_entry}\n{analyst_entry}\n    cors: {{ origins: ['http://dash.example'] }}\n    tls: {{ cert: cert.pem, key: key.pem }}\n"
    );
    let yaml = MESH_YAML.replacen("platform:\n  threads: 1\n", &access, 1).replace(
        "  clean:\n",
        "  other:\n    schema: { a: int64 }\n    transform: SELECT a FROM input\n    sinks: [ { type: stdout, format: ndjson } ]\n  clean:\n",
    );
    s.write("mesh.yaml", &yaml);
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
    assert!(gw.starts_with("https://"), "{gw}");
    let gw = gw.replace("127.0.0.1", "localhost");
    let ca = s.path("cert.pem").display().to_string();
    let bearer = |t: &str| format!("Authorization: Bearer {t}");

    // Open routes stay open; plain HTTP is not spoken on the TLS port.
    assert_eq!(curl(&ca, &[&format!("{gw}/healthz")]).0, 200);
    assert_eq!(
        curl(
            &ca,
            &[&gw
                .replace("https://", "http://")
                .replace("localhost", "127.0.0.1")]
        )
        .0,
        0
    );

    // Without a token, or with a wrong one: 401.
    let (code, all) = curl(&ca, &[&format!("{gw}/v1/pipelines")]);
    assert_eq!(code, 401, "{all}");
    assert!(
        all.to_lowercase().contains("www-authenticate: bearer"),
        "{all}"
    );
    assert!(all.contains("etlmesh token new"), "{all}");
    assert_eq!(
        curl(
            &ca,
            &["-H", &bearer("etm_wrong"), &format!("{gw}/v1/pipelines")]
        )
        .0,
        401
    );

    // The pipeline is served once its worker is up.
    let started = Instant::now();
    loop {
        let clean = format!("{gw}/v1/pipelines/clean");
        let (code, all) = post(&ca, &analyst, "text/csv", READING, &clean);
        if code == 200 {
            assert!(all.contains(",68.9"), "{all}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no worker: {code} {all}\n{}",
            up.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // ci may use `clean`, not `other`, and no analytics.
    let (code, all) = post(
        &ca,
        &ci,
        "text/csv",
        READING,
        &format!("{gw}/v1/pipelines/clean"),
    );
    assert_eq!(code, 200, "{all}");
    let other = format!("{gw}/v1/pipelines/other");
    let (code, all) = post(&ca, &ci, "application/x-ndjson", "{\"a\":1}\n", &other);
    assert_eq!(code, 403, "{all}");
    assert!(all.contains("may not use pipeline `other`"), "{all}");
    let query = format!("{gw}/v1/query");
    let (code, all) = post(
        &ca,
        &ci,
        "application/json",
        "{\"sql\":\"SELECT 1\"}",
        &query,
    );
    assert_eq!(code, 403, "{all}");
    let job = "{\"pipeline\":\"other\",\"inputs\":[\"x.csv\"]}";
    let (code, all) = post(&ca, &ci, "application/json", job, &format!("{gw}/v1/jobs"));
    assert_eq!(code, 403, "{all}");
    let sql = "{\"sql\":\"SELECT 41 + 1 AS answer\"}";
    let (code, all) = post(&ca, &analyst, "application/json", sql, &query);
    assert_eq!(code, 200, "{all}");
    assert!(all.contains("\"answer\":42"), "{all}");

    // ci's rate is 4 per second (a bucket of 4): a burst of 12 meets 429 with Retry-After.
    // One curl sends the 12 back to back over one connection, so that the burst is a
    // burst however slow the machine starts processes or shakes hands.
    std::thread::sleep(Duration::from_millis(1100));
    let url = format!("{gw}/v1/pipelines");
    let mut args = vec!["-H".to_string(), bearer(&ci)];
    args.extend(std::iter::repeat_n(url, 12));
    let (_, all) = curl(&ca, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let codes: Vec<(u16, String)> = all
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|answer| {
            let code = answer.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            (code, format!("HTTP/1.1 {answer}"))
        })
        .collect();
    assert_eq!(codes.len(), 12, "{all}");
    let limited: Vec<&(u16, String)> = codes.iter().filter(|(c, _)| *c == 429).collect();
    assert!(
        codes.iter().filter(|(c, _)| *c == 200).count() >= 4,
        "{codes:?}"
    );
    assert!(!limited.is_empty(), "{codes:?}");
    assert!(
        limited[0].1.to_lowercase().contains("retry-after: 1"),
        "{}",
        limited[0].1
    );
    // Another token is not limited by ci's bucket.
    assert_eq!(
        curl(
            &ca,
            &["-H", &bearer(&analyst), &format!("{gw}/v1/pipelines")]
        )
        .0,
        200
    );

    // CORS: a preflight from an allowed origin is answered, another origin is not.
    let (code, all) = curl(
        &ca,
        &[
            "-X",
            "OPTIONS",
            "-H",
            "Origin: http://dash.example",
            "-H",
            "Access-Control-Request-Method: POST",
            &format!("{gw}/v1/query"),
        ],
    );
    assert_eq!(code, 204, "{all}");
    assert!(
        all.to_lowercase()
            .contains("access-control-allow-origin: http://dash.example"),
        "{all}"
    );
    assert!(all.to_lowercase().contains("authorization"), "{all}");
    let (_, all) = curl(
        &ca,
        &[
            "-X",
            "OPTIONS",
            "-H",
            "Origin: http://evil.example",
            "-H",
            "Access-Control-Request-Method: POST",
            &format!("{gw}/v1/query"),
        ],
    );
    assert!(
        !all.to_lowercase().contains("access-control-allow-origin"),
        "{all}"
    );
    let (_, all) = curl(
        &ca,
        &[
            "-H",
            "Origin: http://dash.example",
            "-H",
            &bearer(&analyst),
            &format!("{gw}/v1/pipelines"),
        ],
    );
    assert!(
        all.to_lowercase().contains("access-control-expose-headers"),
        "{all}"
    );

    // `etlmesh query` reaches the TLS gateway when told what to trust, and says how
    // when it is not.
    let at = format!("--gateway={gw}");
    let out = s.etlmesh(&["query", &at, "--token", &analyst, "SELECT 1 AS one"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--ca-cert"),
        "{}",
        text(&out.stderr)
    );
    let out = s.etlmesh(&[
        "query",
        &at,
        "--token",
        &analyst,
        "--ca-cert",
        "cert.pem",
        "SELECT 1 AS one",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("one"),
        "{}",
        text(&out.stdout)
    );
    let out = s.etlmesh(&["job", &at, "--ca-cert", "key.pem", "list"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("key.pem: holds no certificate"),
        "{}",
        text(&out.stderr)
    );

    // Arrow Flight speaks TLS too (grpc+tls), with the same token rules.
    let flight = up.url("Arrow Flight");
    assert!(flight.starts_with("grpc+tls://"), "{flight}");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(flight_over_tls(
        flight.trim_start_matches("grpc+tls://"),
        &s.path("cert.pem"),
        &analyst,
    ));

    // Decisions are counted per token, never with the token itself.
    let (_, m) = curl(&ca, &[&format!("{gw}/metrics")]);
    assert!(
        m.contains("etlmesh_gateway_auth_total{token=\"ci\",outcome=\"rate_limited\"}"),
        "{m}"
    );
    assert!(m.contains("outcome=\"forbidden\""), "{m}");
    assert!(!m.contains(&ci), "a token in the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_and_arrow_flight_need_the_token() {
    let s = Scratch::new();
    let (token, entry) = new_token(&s, &["cli", "--no-jobs"]);
    s.write(
        "g.yaml",
        format!(
            "platform:\n  access:\n    tokens:\n{entry}\n{}",
            MESH_YAML.replacen("platform:\n", "", 1)
        ),
    );
    let gw = Proc::start(
        s.dir.path(),
        &[
            "gateway",
            "-c",
            "g.yaml",
            "--listen",
            "127.0.0.1:0",
            "--flight",
            "127.0.0.1:0",
            "--control-plane",
            "http://127.0.0.1:9",
        ],
    );
    let url = format!("--gateway={}", gw.url("gateway"));
    let out = s.etlmesh(&["query", &url, "SELECT 1 AS one"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));
    let out = s.etlmesh(&["query", &url, "--token", &token, "SELECT 1 AS one"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("one"),
        "{}",
        text(&out.stdout)
    );
    let out = s.etlmesh(&["job", &url, "--token", &token, "list"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));

    // Arrow Flight keeps the same rules, with the token in the `authorization` metadata.
    let flight = gw.url("Arrow Flight").replace("grpc://", "http://");
    let channel = tonic::transport::Channel::from_shared(flight)
        .expect("url")
        .connect()
        .await
        .expect("connects");
    flight_needs_the_token(channel, &token).await;
}
