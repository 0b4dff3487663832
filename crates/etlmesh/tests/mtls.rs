//! mTLS inside the mesh, end to end with real processes: `etlmesh up` (mTLS by
//! default) issues certificates from its own trust anchor; a peer with no certificate,
//! or one from another anchor (made here with openssl), can neither register with the
//! control plane nor reach a worker; a wrong join token is refused; certificates
//! renew before they expire and new connections keep working after the first ones
//! expired; `etlmesh tap` reaches the workers through the control plane; `--insecure`
//! says loudly what it turns off.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Scratch;
use common::mesh::*;
use http::{Method, StatusCode};

const LIFETIME_YAML: &str = "  mesh: { certificate_lifetime: 8s }\n";

/// `curl` over HTTPS to `url` (host 127.0.0.1), as `mesh.etlmesh`, with a client
/// certificate or none; the HTTP status, or `None` when the handshake failed.
fn curl(url: &str, anchor: &Path, client: Option<(&Path, &Path)>, post: bool) -> Option<u16> {
    let (port, path) = url
        .trim_start_matches("https://127.0.0.1:")
        .split_once('/')
        .map_or((url.rsplit(':').next().unwrap_or(""), ""), |(p, rest)| {
            (p, rest)
        });
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
    ])
    .arg("--cacert")
    .arg(anchor)
    .args(["--resolve", &format!("mesh.etlmesh:{port}:127.0.0.1")]);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    if post {
        cmd.args([
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            "{}",
        ]);
    }
    cmd.arg(format!("https://mesh.etlmesh:{port}/{path}"));
    let out = cmd.output().expect("curl runs");
    let code: u16 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (out.status.success() && code != 0).then_some(code)
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client certificate for `name` signed by the CA `ca`/`ca_key` (files in `dir`).
fn leaf(dir: &Path, name: &str, ca: &str, ca_key: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "subjectAltName=DNS:mesh.etlmesh\nextendedKeyUsage=clientAuth,serverAuth\n",
    )
    .expect("ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

fn workers(admin: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-s", &format!("{admin}/api/v1/workers")])
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_with_certificates_of_the_control_plane_register_and_serve() {
    if !common::have_programs(&[("openssl", "version")]) {
        return;
    }
    let scratch = Scratch::new();
    let dir = scratch.dir.path();
    scratch.write(
        "mesh.yaml",
        MESH_YAML.replacen("platform:\n", &format!("platform:\n{LIFETIME_YAML}"), 1),
    );
    let up = Proc::up(
        dir,
        &["-c", "mesh.yaml", "--workers", "1", "--state-dir", "st"],
    );
    // Every first certificate is issued after this moment.
    let started = std::time::Instant::now();
    let gw = up.url("gateway");
    let admin = up.url("control plane");
    let mesh = up.url("control plane mesh");
    assert!(mesh.starts_with("https://127.0.0.1:"), "{mesh}");
    let http = Http::new();
    eventually(Duration::from_secs(30), "a worker over mTLS", async || {
        workers(&admin).as_array().map_or(0, |a| a.len()) == 1
    })
    .await;
    let list = workers(&admin);
    for w in list.as_array().expect("workers") {
        let a = w["address"].as_str().expect("address");
        assert!(a.starts_with("https://"), "a worker serves mTLS: {w}");
    }
    let worker_url = list[0]["address"].as_str().expect("address").to_string();
    let anchor = dir.join("st/mesh/ca.pem");
    let token_file = dir.join("st/mesh/join-token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).expect("token").permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the join token is private");
    assert!(up.output().contains("mesh (mTLS)"), "{}", up.output());

    // Work flows: client → gateway → worker (mTLS).
    let a = http
        .post_csv(&format!("{gw}/v1/pipelines/clean"), readings(50, 0.0, 1))
        .await
        .expect("answer");
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );

    // The admin listener (people) refuses the worker protocol.
    let refused = http
        .send(
            Method::POST,
            &format!("{admin}/v1/workers"),
            &[("content-type", "application/json")],
            bytes::Bytes::from_static(b"{}"),
        )
        .await
        .expect("answer");
    assert_eq!(
        refused.status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(
        String::from_utf8_lossy(&refused.body).contains("mesh_listener_only"),
        "{}",
        String::from_utf8_lossy(&refused.body)
    );

    // Certificates: one from the mesh's anchor (signed here with its key, as the
    // control plane would), one from another anchor.
    leaf(dir, "member", "st/mesh/ca.pem", "st/mesh/ca.key");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other.pem",
            "-days",
            "1",
            "-subj",
            "/CN=another mesh",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=keyCertSign,digitalSignature",
        ],
    );
    leaf(dir, "intruder", "other.pem", "other.key");
    let member = (dir.join("member.pem"), dir.join("member.key"));
    let intruder = (dir.join("intruder.pem"), dir.join("intruder.key"));
    let member = Some((member.0.as_path(), member.1.as_path()));
    let intruder = Some((intruder.0.as_path(), intruder.1.as_path()));

    // Registering: no certificate → 401; another anchor's → no handshake; a member
    // gets past the check (and its empty registration is a 4xx of the protocol).
    let register = format!("{mesh}/v1/workers");
    assert_eq!(curl(&register, &anchor, None, true), Some(401));
    assert_eq!(
        curl(&register, &anchor, intruder, true),
        None,
        "a foreign certificate is refused"
    );
    let by_member = curl(&register, &anchor, member, true);
    assert!(
        by_member.is_some_and(|c| (400..500).contains(&c) && c != 401),
        "{by_member:?}"
    );
    // Serving: a worker answers members only.
    let health = format!("{worker_url}/healthz");
    assert_eq!(
        curl(&health, &anchor, None, false),
        None,
        "no certificate, no handshake"
    );
    assert_eq!(
        curl(&health, &anchor, intruder, false),
        None,
        "a foreign certificate, no handshake"
    );
    assert_eq!(curl(&health, &anchor, member, false), Some(200));

    // A worker with a wrong join token cannot join; one that trusts another anchor
    // does not show its token to this control plane.
    let token = std::fs::read_to_string(&token_file).expect("token");
    let anchor_pin = token.trim().split_once('.').expect("token").1.to_string();
    for (bad, expect) in [
        (format!("{}.{anchor_pin}", "0".repeat(32)), "join token"),
        (
            format!("{}.{}", "1".repeat(32), "2".repeat(64)),
            "trust anchor",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_etlmesh"))
            .args([
                "worker",
                "-c",
                "mesh.yaml",
                "--id",
                "intruder",
                "--control-plane",
                &mesh,
            ])
            .env("ETLMESH_JOIN_TOKEN", &bad)
            .current_dir(dir)
            .output()
            .expect("worker runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(expect), "{expect}: {err}");
    }
    assert_eq!(
        workers(&admin).as_array().map_or(0, |a| a.len()),
        1,
        "no intruder registered"
    );

    // `etlmesh tap` goes through the control plane, which reaches the workers.
    let tap = tokio::process::Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args([
            "tap",
            "clean",
            "-n",
            "2",
            "--timeout",
            "20s",
            "--control-plane",
            &admin,
        ])
        .output();
    let feed = async {
        for _ in 0..20 {
            let _ = http
                .post_csv(&format!("{gw}/v1/pipelines/clean"), readings(20, 0.0, 2))
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (tapped, ()) = tokio::join!(tap, feed);
    let tapped = tapped.expect("tap runs");
    let lines = String::from_utf8_lossy(&tapped.stdout).lines().count();
    assert_eq!(lines, 2, "{}", String::from_utf8_lossy(&tapped.stderr));

    // Renewal: certificates live 8 s and renew at 70 %. Past the first ones' expiry,
    // a replacement worker joins, registers, and takes requests over new connections.
    let renewals = async || {
        let page = http.get(&format!("{admin}/metrics")).await.body;
        metric(
            &String::from_utf8_lossy(&page),
            "etlmesh_mesh_certificates_total{kind=\"renew\",outcome=\"issued\"}",
        )
    };
    eventually(Duration::from_secs(30), "the worker renewed", async || {
        renewals().await >= 1.0
    })
    .await;
    // Past the first certificates' expiry (8 s), whatever the machine's pace.
    let expired = started + Duration::from_secs(9);
    tokio::time::sleep_until(expired.into()).await;
    let metrics =
        String::from_utf8_lossy(&http.get(&format!("{admin}/metrics")).await.body).into_owned();
    assert!(
        metric(&metrics, "etlmesh_mesh_handshakes_refused_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "etlmesh_mesh_certificates_total{kind=\"join\",outcome=\"refused\"}"
        ) >= 1.0,
        "{metrics}"
    );
    let victim = workers(&admin)[0].clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim["pid"].as_i64().expect("pid") as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    eventually(
        Duration::from_secs(20),
        "a replacement worker",
        async || {
            workers(&admin).as_array().is_some_and(|a| {
                a.len() == 1
                    && a.iter()
                        .all(|w| w["address"] != victim["address"] && w["state"] == "ready")
            })
        },
    )
    .await;
    // The gateway opens a new connection to the replacement: both sides show renewed
    // certificates (the first ones expired 8 s after start).
    for i in 0..5 {
        let a = http
            .post_csv(&format!("{gw}/v1/pipelines/clean"), readings(20, 0.0, i))
            .await
            .expect("answer");
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.header("etlmesh-worker"), "clean-1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_says_so_and_speaks_plain_http() {
    let scratch = Scratch::new();
    scratch.write("mesh.yaml", MESH_YAML);
    let up = Proc::up(
        scratch.dir.path(),
        &[
            "-c",
            "mesh.yaml",
            "--workers",
            "1",
            "--state-dir",
            "st",
            "--insecure",
        ],
    );
    let admin = up.url("control plane");
    eventually(Duration::from_secs(20), "a worker", async || {
        workers(&admin).as_array().map_or(0, |a| a.len()) == 1
    })
    .await;
    assert!(
        workers(&admin)[0]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("http://"))
    );
    let out = up.output();
    assert!(
        out.contains("WARNING: --insecure") && out.contains("WITHOUT mTLS"),
        "{out}"
    );
    assert!(!scratch.dir.path().join("st/mesh/ca.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_join_with_the_token() {
    let scratch = Scratch::new();
    let dir = scratch.dir.path();
    scratch.write("mesh.yaml", MESH_YAML);
    let cp = Proc::start(
        dir,
        &[
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--mesh-listen",
            "127.0.0.1:0",
            "--state-dir",
            "st",
        ],
    );
    let admin = cp.url("control plane");
    let mesh = cp.url("control plane mesh");
    let token = std::fs::read_to_string(dir.join("st/mesh/join-token"))
        .expect("the join token")
        .trim()
        .to_string();

    // Without the token a gateway says what it needs and stops.
    let out = Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--flight",
            "off",
            "--control-plane",
            &mesh,
        ])
        .env_remove("ETLMESH_JOIN_TOKEN")
        .current_dir(dir)
        .output()
        .expect("gateway runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("join token"), "{err}");

    let env = [("ETLMESH_JOIN_TOKEN".to_string(), token)];
    let gw = Proc::gateway(dir, &mesh, &env);
    let _worker = Proc::worker(dir, "mesh.yaml", "w1", &mesh, &env);
    let gw_url = gw.url("gateway");
    eventually(
        Duration::from_secs(20),
        "the worker registered",
        async || {
            workers(&admin).as_array().is_some_and(|a| {
                a.len() == 1
                    && a[0]["address"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("https://"))
            })
        },
    )
    .await;
    let http = Http::new();
    let a = http
        .post_until_ok(&format!("{gw_url}/v1/pipelines/clean"), 50)
        .await
        .expect("the gateway reaches the worker over mTLS");
    assert_eq!(a.header("etlmesh-worker"), "w1");
    let metrics =
        String::from_utf8_lossy(&http.get(&format!("{admin}/metrics")).await.body).into_owned();
    assert_eq!(
        metric(
            &metrics,
            "etlmesh_mesh_certificates_total{kind=\"join\",outcome=\"issued\"}"
        ),
        2.0,
        "the gateway and the worker joined: {metrics}"
    );
}

/// One HTTP/1.1 request over a mesh connection that shows `identity`'s certificate;
/// the answer's status line and body, or the handshake's error.
async fn as_member(
    identity: &std::sync::Arc<etlmesh_tls::Identity>,
    mesh_url: &str,
    path: &str,
    body: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = mesh_url.trim_start_matches("https://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut config = (*identity.client_config()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("mesh.etlmesh").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_keeps_identities_spends_tokens_and_honours_revocations() {
    let scratch = Scratch::new();
    let dir = scratch.dir.path();
    scratch.write("mesh.yaml", MESH_YAML);
    let cp = Proc::start(
        dir,
        &[
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--mesh-listen",
            "127.0.0.1:0",
            "--state-dir",
            "st",
        ],
    );
    let mesh = cp.url("control plane mesh");
    let token: etlmesh_tls::JoinToken = std::fs::read_to_string(dir.join("st/mesh/join-token"))
        .expect("the join token")
        .trim()
        .parse()
        .expect("token");
    let join = |t: etlmesh_tls::JoinToken, name: &'static str, hosts: Vec<String>| {
        let mesh = mesh.clone();
        async move {
            etlmesh_tls::join(
                &mesh,
                &t,
                name,
                etlmesh_tls::Role::Worker,
                &hosts,
                Duration::from_secs(5),
            )
            .await
        }
    };

    // Hosts: no wildcard, no name outside the configured suffixes.
    for bad in ["*.etlmesh", "evil.example.com"] {
        let e = join(token.clone(), "w-bad", vec![bad.into()])
            .await
            .expect_err(bad)
            .to_string();
        assert!(e.contains("may not be in a mesh certificate"), "{e}");
    }

    // A minted token joins once.
    let out = scratch.etlmesh(&[
        "token",
        "join",
        "--state-dir",
        "st",
        "--uses",
        "1",
        "--ttl",
        "10m",
        "--name",
        "ci",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let once: etlmesh_tls::JoinToken = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("minted token");
    let member = join(once.clone(), "w-ci", vec!["127.0.0.1".into()])
        .await
        .expect("first join");
    let e = join(once, "w-again", vec![])
        .await
        .expect_err("second join")
        .to_string();
    assert!(e.contains("used as often as it may"), "{e}");

    // Renewal keeps the identity of the certificate presented.
    let csr = |name: &str, role: &str, hosts: &str| {
        let key = rcgen::KeyPair::generate().expect("key");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .expect("csr");
        serde_json::json!({"name": name, "role": role, "hosts": serde_json::from_str::<serde_json::Value>(hosts).expect("hosts"), "csr": csr}).to_string()
    };
    let answer = as_member(
        &member,
        &mesh,
        "/v1/mesh/renew",
        &csr("control-plane", "control-plane", "[]"),
    )
    .await
    .expect("connects");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("renews itself only"), "{answer}");
    let answer = as_member(
        &member,
        &mesh,
        "/v1/mesh/renew",
        &csr("w-ci", "worker", r#"["*.etlmesh"]"#),
    )
    .await
    .expect("connects");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let answer = as_member(
        &member,
        &mesh,
        "/v1/mesh/renew",
        &csr("w-ci", "worker", r#"["127.0.0.1"]"#),
    )
    .await
    .expect("connects");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Revoked: the control plane refuses the certificate within a second or two.
    let serial = etlmesh_tls::serial_of(&member.certificate()).expect("serial");
    assert!(
        cp.output().contains(&serial),
        "the serial is logged when issued:\n{}",
        cp.output()
    );
    let out = scratch.etlmesh(&["token", "revoke", &serial, "--state-dir", "st"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let refused = as_member(
        &member,
        &mesh,
        "/v1/mesh/renew",
        &csr("w-ci", "worker", r#"["127.0.0.1"]"#),
    )
    .await;
    assert!(
        refused.as_ref().is_err()
            || refused
                .as_ref()
                .is_ok_and(|a| !a.starts_with("HTTP/1.1 200")),
        "a revoked certificate is refused: {refused:?}"
    );
}
