//! The embedded MQTT broker (`etlmesh broker`, `platform.broker`) with clients that are
//! not ours: paho-mqtt speaking MQTT 5 and 3.1.1, Mosquitto's own mosquitto_pub and
//! mosquitto_sub over TLS with logins — and inputs crafted to hurt it. `up --demo` on a
//! host where nothing answers on 1883 (a network namespace of its own) streams through
//! the broker it starts itself. The kill -9 test of a stream worker through it is in
//! `stream_kill.rs`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mesh::{Http, Proc};
use common::stream::{have_paho, metric};
use common::{Scratch, have_programs, read_parquet_dir, rows, server_cert, text};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `etlmesh broker -c b.yaml` with `platform.broker` = `listen` + `extra` (YAML lines
/// indented by four), metrics on a port of their own. Returns the process, the MQTT
/// port and the metrics URL.
fn start_broker(s: &Scratch, extra: &str) -> (Proc, u16, String) {
    let (port, mport) = (free_port(), free_port());
    s.write(
        "b.yaml",
        format!("platform:\n  broker:\n    listen: 127.0.0.1:{port}\n{extra}pipelines:\n  a:\n    sinks: [{{ type: stdout }}]\n"),
    );
    let metrics = format!("127.0.0.1:{mport}");
    let p = Proc::start(
        s.dir.path(),
        &["broker", "-c", "b.yaml", "--metrics", &metrics],
    );
    p.wait_for("MQTT broker on", Duration::from_secs(20));
    (p, port, format!("http://{metrics}/metrics"))
}

/// Runs a scenario of `tests/paho_broker.py`; its report.
fn scenario(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho_broker.py"))
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "paho scenario {args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).expect("a JSON report")
}

async fn metrics(url: &str) -> String {
    String::from_utf8_lossy(&Http::new().get(url).await.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_clients_share_a_group_and_find_their_session_again() {
    if !have_paho() {
        return;
    }
    let s = Scratch::new();
    let (broker, port, murl) = start_broker(&s, "");
    let port = port.to_string();
    // MQTT 5 subscribers in one shared group, an MQTT 3.1.1 publisher.
    let r = scenario(&[
        "shared", "--port", &port, "--prefix", "sh", "--count", "2000",
    ]);
    eprintln!("shared: {r}");
    assert_eq!(r["acked"], 2000);
    assert_eq!(r["total"], 2000, "each message once across the group: {r}");
    assert_eq!(r["distinct"], 2000);
    assert!(
        r["a"].as_u64() > Some(0) && r["b"].as_u64() > Some(0),
        "both members served: {r}"
    );
    // An MQTT 3.1.1 persistent session gets what came while it was away.
    let r = scenario(&[
        "persistent",
        "--port",
        &port,
        "--prefix",
        "ps",
        "--count",
        "500",
    ]);
    eprintln!("persistent: {r}");
    assert_eq!(r["present"], true);
    assert_eq!(r["distinct"], 500, "{r}");
    let page = metrics(&murl).await;
    let received = metric(&page, "etlmesh_broker_messages_received_total").unwrap_or(0.0);
    assert!(received >= 2500.0, "{page}\n{}", broker.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_tls_with_mosquittos_own_clients() {
    if !have_programs(&[
        ("openssl", "version"),
        ("mosquitto_pub", "--help"),
        ("mosquitto_sub", "--help"),
    ]) {
        return;
    }
    let s = Scratch::new();
    server_cert(s.dir.path());
    let sha = sha256_hex("s3cret");
    let (broker, port, murl) = start_broker(
        &s,
        &format!(
            "    tls: {{ cert: cert.pem, key: key.pem }}\n    users: [{{ username: dev, sha256: {sha} }}]\n"
        ),
    );
    let port = port.to_string();
    let tls = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "--cafile",
        "cert.pem",
        "-q",
        "1",
    ];
    let mut sub = Command::new("mosquitto_sub")
        .args(tls)
        .args([
            "-u", "dev", "-P", "s3cret", "-t", "t/#", "-C", "3", "-W", "60", "-i", "sub1",
        ])
        .current_dir(s.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub starts");
    // Publish until the subscriber has had its three (it may subscribe after the first).
    for _ in 0..150 {
        if sub.try_wait().ok().flatten().is_some() {
            break;
        }
        let out = Command::new("mosquitto_pub")
            .args(tls)
            .args(["-u", "dev", "-P", "s3cret", "-t", "t/x", "-m", "hello"])
            .current_dir(s.dir.path())
            .output()
            .expect("mosquitto_pub runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = sub.wait_with_output().expect("mosquitto_sub ends");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stderr),
        broker.output()
    );
    assert_eq!(
        text(&out.stdout).lines().filter(|l| *l == "hello").count(),
        3
    );
    // A wrong password, and no TLS, are refused.
    let bad = Command::new("mosquitto_pub")
        .args(tls)
        .args(["-u", "dev", "-P", "wrong", "-t", "t/x", "-m", "x"])
        .current_dir(s.dir.path())
        .output()
        .expect("mosquitto_pub runs");
    assert!(!bad.status.success());
    eprintln!("wrong password: {}", text(&bad.stderr).trim());
    let plain = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-u",
            "dev",
            "-P",
            "s3cret",
            "-t",
            "t/x",
            "-m",
            "x",
        ])
        .output()
        .expect("mosquitto_pub runs");
    assert!(!plain.status.success(), "plain MQTT on the TLS listener");
    let page = metrics(&murl).await;
    assert!(
        page.contains("etlmesh_broker_connections_refused_total{reason=\"login\"} 1"),
        "{page}"
    );
}

fn sha256_hex(s: &str) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    text(&out.stdout)[..64].to_string()
}

/// The broker's resident memory (kB).
fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Whether the server closed `c` within `within`.
fn closed(c: &mut TcpStream, within: Duration) -> bool {
    let _ = c.set_read_timeout(Some(within));
    let mut buf = [0u8; 256];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_inputs_do_not_hurt_the_broker() {
    if !have_paho() {
        return;
    }
    let s = Scratch::new();
    let (broker, port, murl) =
        start_broker(&s, "    max_packet: 64KiB\n    max_connections: 300\n");
    let addr = format!("127.0.0.1:{port}");
    // Bytes that are not MQTT.
    let mut c = TcpStream::connect(&addr).expect("connects");
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("writes");
    assert!(
        closed(&mut c, Duration::from_secs(5)),
        "garbage closes the connection"
    );
    // A CONNECT that claims 200 MB: refused from its header, nothing buffered.
    let mut c = TcpStream::connect(&addr).expect("connects");
    c.write_all(&[0x10, 0x80, 0x80, 0x80, 0x60])
        .expect("writes");
    assert!(
        closed(&mut c, Duration::from_secs(5)),
        "an oversized packet closes it"
    );
    // A valid CONNECT (MQTT 3.1.1), then a PUBLISH larger than max_packet.
    let mut c = TcpStream::connect(&addr).expect("connects");
    c.write_all(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 1, b'x',
    ])
    .expect("writes");
    let mut connack = [0u8; 4];
    c.read_exact(&mut connack).expect("a CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let mut big = vec![0x30, 0x80, 0x80, 0x08]; // remaining length 131072
    big.extend(std::iter::repeat_n(b'a', 4096));
    let _ = c.write_all(&big);
    assert!(
        closed(&mut c, Duration::from_secs(5)),
        "a 128 KiB PUBLISH past a 64 KiB limit"
    );
    // A crowd of sockets that never say CONNECT: past max_connections (+64) new ones are
    // closed, and the broker still serves a real client once they go.
    let idle: Vec<TcpStream> = (0..400)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kb(broker.pid());
    drop(idle);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = scenario(&[
        "shared",
        "--port",
        &port.to_string(),
        "--prefix",
        "after",
        "--count",
        "200",
    ]);
    assert_eq!(r["distinct"], 200, "{r}");
    let page = metrics(&murl).await;
    eprintln!("broker RSS with 400 idle sockets: {before} kB");
    assert!(before < 100_000, "resident memory {before} kB");
    // 400 sockets against 300 connections + 64 pending: at least 36 closed at once.
    let unavailable = metric(
        &page,
        "etlmesh_broker_connections_refused_total{reason=\"unavailable\"}",
    )
    .unwrap_or(0.0);
    assert!(
        unavailable >= 36.0,
        "the crowd past the limit was refused and counted:\n{page}"
    );
    let protocol = metric(
        &page,
        "etlmesh_broker_connections_refused_total{reason=\"protocol\"}",
    )
    .unwrap_or(0.0);
    assert!(
        protocol >= 2.0,
        "garbage and the oversized CONNECT:\n{page}"
    );
}

/// A network namespace (a host with a loopback only) that goes away with the value.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Option<Self> {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("ip")
                .args(["-n", name, "link", "set", "lo", "up"])
                .status()
                .is_ok_and(|s| s.success());
        ok.then(|| Self(name.to_string()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_demo_streams_through_its_own_broker_where_none_answers() {
    if !have_programs(&[("ip", "-V")]) {
        return;
    }
    let Some(ns) = Netns::new(&format!("etlm-demo-{}", std::process::id())) else {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "network namespaces need root (ip netns add)"
        );
        eprintln!("skipped: cannot make a network namespace (not root?)");
        return;
    };
    let s = Scratch::new();
    let up = Proc::start_in_netns(
        &ns.0,
        s.dir.path(),
        &[
            "up",
            "--demo",
            "--http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--flight",
            "off",
        ],
    );
    up.wait_for(
        "MQTT broker    mqtt://127.0.0.1:1883",
        Duration::from_secs(30),
    );
    up.wait_for("streaming: 20 simulated devices", Duration::from_secs(5));
    let live = s.path("data/out/live");
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(90) {
        n = if live.is_dir() {
            rows(&read_parquet_dir(&live))
        } else {
            0
        };
        if n >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "demo on a bare host: {n} readings in data/out/live after {:?}",
        started.elapsed()
    );
    assert!(n >= 100, "{}", up.output());
}
