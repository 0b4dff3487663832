//! Helpers for end-to-end tests of streams: the machine's broker, pipeline files,
//! publishers (ours and paho-mqtt's), and counting what arrived.

#![allow(dead_code)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::Scratch;
use super::mesh::Proc;
use super::pg;

pub const BROKER: &str = "mqtt://127.0.0.1:1883";

pub fn services() -> bool {
    super::service("Mosquitto", "127.0.0.1:1883") && super::service("PostgreSQL", "127.0.0.1:5432")
}

/// A stream pipeline: readings from `prefix/+/reading` into PostgreSQL.
pub fn stream_yaml(prefix: &str, pg_url: &str, table: &str, extra: &str) -> String {
    format!(
        r#"
pipelines:
  live:
    source:
      type: mqtt
      broker: {BROKER}
      topic: {prefix}/+/reading
      batch: {{ records: 2000, wait: 100ms }}
    schema: &readings
      device_id: {{ type: utf8, nullable: false }}
      seq: {{ type: int64, nullable: false }}
      ts: {{ type: timestamp_ms, nullable: false }}
      temperature_c: float64
      humidity: float64
      battery_v: float64
      status: utf8
    dedup: [device_id, seq]
    sinks:
      - {{ type: postgres, url: "{pg_url}", table: {table}, create: true }}
    dead_letter: {{ type: ndjson, path: out/dead }}
{extra}"#
    )
}

/// Waits until `n` streams of the process subscribed.
pub async fn streams_started(p: &Proc, n: usize) {
    let start = Instant::now();
    while p.output().matches("stream started").count() < n {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "streams did not start:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `etlmesh worker -c s.yaml --id w1` in the scratch directory.
pub fn start_worker(scratch: &Scratch) -> Proc {
    Proc::start(
        scratch.dir.path(),
        &[
            "worker",
            "-c",
            "s.yaml",
            "--listen",
            "127.0.0.1:0",
            "--id",
            "w1",
        ],
    )
}

/// Starts `etlmesh simulate` publishing `count` messages at `rate` to `prefix/…`.
pub fn simulate(
    dir: &std::path::Path,
    prefix: &str,
    count: u64,
    rate: u64,
    extra: &[&str],
) -> std::process::Child {
    let topic = format!("{prefix}/{{device_id}}/reading");
    let (count, rate) = (count.to_string(), rate.to_string());
    let mut args = vec![
        "simulate",
        "--broker",
        BROKER,
        "--topic",
        &topic,
        "--count",
        &count,
        "--rate",
        &rate,
        "--qos",
        "1",
        "--devices",
        "50",
        "--client-id",
    ];
    let id = format!("sim-{prefix}");
    args.push(&id);
    args.extend_from_slice(extra);
    std::process::Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args(&args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("simulate starts")
}

/// The simulator's summary line, and a figure from it ("186 malformed").
pub fn finish(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("simulate ends");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "simulate failed: {text}");
    text
}

pub fn figure(summary: &str, what: &str) -> u64 {
    let words: Vec<&str> = summary
        .split(|c: char| c.is_whitespace() || c == '(' || c == ';' || c == ',')
        .collect();
    words
        .windows(2)
        .find(|w| w[1] == what)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("no `{what}` in {summary}"))
}

/// Dead letters of every worker, parsed.
pub fn dead_letters(scratch: &Scratch) -> Vec<serde_json::Value> {
    super::read_ndjson_dir(&scratch.path("out/dead"))
}

/// Distinct malformed messages among the dead letters (a message delivered twice is
/// dead-lettered twice).
pub fn distinct_raw(dead: &[serde_json::Value], stage: &[&str]) -> usize {
    dead.iter()
        .filter(|d| stage.contains(&d["stage"].as_str().unwrap_or("")))
        .map(|d| format!("{}{}", d["raw"], d["raw_base64"]))
        .collect::<HashSet<_>>()
        .len()
}

pub async fn wait_rows(
    c: &tokio_postgres::Client,
    table: &str,
    want: i64,
    within: Duration,
) -> i64 {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < within {
        n = pg::count(c, &format!("SELECT count(*) FROM {table}")).await;
        if n >= want {
            // Let stragglers (redelivered duplicates) land before counting.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return pg::count(c, &format!("SELECT count(*) FROM {table}")).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    n
}

/// What `paho_publish.py` reports.
#[derive(Debug, serde::Deserialize)]
pub struct Published {
    pub good: u64,
    pub poison: Vec<i64>,
    pub acked: u64,
    pub sent: u64,
}

/// Starts paho-mqtt's publisher (`tests/paho_publish.py`) with `args`.
pub fn paho(args: &[&str]) -> std::process::Child {
    std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/paho_publish.py"
        ))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 starts")
}

/// Waits for the paho publisher and reads its report.
pub fn paho_done(child: std::process::Child) -> Published {
    let out = child.wait_with_output().expect("publisher ends");
    assert!(
        out.status.success(),
        "paho publisher failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).expect("publisher report")
}

/// Whether paho-mqtt (Python) is installed; CI installs it, elsewhere the test skips.
pub fn have_paho() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "paho-mqtt is required in this run: pip install paho-mqtt"
        );
        eprintln!("skipped: paho-mqtt is not installed (pip install paho-mqtt)");
    }
    ok
}

/// A metric's value from a Prometheus text page (the first line starting with `name`).
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Sends `signal` to a process.
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal");
}

/// The workers `up` runs (id, pid), from its admin API, once `n` are registered.
pub async fn up_workers(admin: &str, n: usize) -> Vec<(String, u32)> {
    let http = super::mesh::Http::new();
    let start = Instant::now();
    loop {
        let workers = http.get(&format!("{admin}/api/v1/workers")).await.json();
        let list: Vec<(String, u32)> = workers
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|w| {
                        Some((
                            w["id"].as_str()?.to_string(),
                            u32::try_from(w["pid"].as_u64()?).ok()?,
                        ))
                    })
                    .filter(|(_, pid)| *pid > 0)
                    .collect()
            })
            .unwrap_or_default();
        if list.len() >= n {
            return list;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{n} workers did not register: {workers}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One good reading as the paho publisher logged it.
#[derive(Debug, Clone)]
pub struct Sent {
    pub seq: i64,
    pub device: String,
    pub ts: i64,
}

/// The paho publisher's log (`--log`).
pub fn sent_log(path: &std::path::Path) -> Vec<Sent> {
    std::fs::read_to_string(path)
        .expect("publisher log")
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(Sent {
                seq: w.next()?.parse().ok()?,
                device: w.next()?.to_string(),
                ts: w.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// What each (device, window start) must count, for tumbling windows of `size_ms`.
pub fn window_counts(sent: &[Sent], size_ms: i64) -> std::collections::HashMap<(String, i64), i64> {
    let mut m = std::collections::HashMap::new();
    for s in sent {
        *m.entry((s.device.clone(), s.ts.div_euclid(size_ms) * size_ms))
            .or_insert(0) += 1;
    }
    m
}

/// Distinct (device_id, seq) of rows, and how many rows repeated one.
pub fn distinct_keys(rows: &[serde_json::Value]) -> (HashSet<(String, i64)>, usize) {
    let mut keys = HashSet::new();
    let mut repeats = 0;
    for r in rows {
        let k = (
            r["device_id"].as_str().unwrap_or("").to_string(),
            r["seq"].as_i64().unwrap_or(-1),
        );
        if !keys.insert(k) {
            repeats += 1;
        }
    }
    (keys, repeats)
}

/// Waits until `check` says true or `within` passes; returns its last answer.
pub async fn eventually<T>(within: Duration, mut check: impl FnMut() -> (bool, T)) -> T {
    let start = Instant::now();
    loop {
        let (ok, v) = check();
        if ok || start.elapsed() > within {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Rows of the Parquet files under `dir` as JSON objects (device_id, seq).
pub fn parquet_keys(dir: &std::path::Path) -> Vec<serde_json::Value> {
    use arrow::array::{AsArray, Int64Array};
    let mut out = Vec::new();
    for b in super::read_parquet_dir(dir) {
        let (Ok(d), Ok(s)) = (b.schema().index_of("device_id"), b.schema().index_of("seq")) else {
            continue;
        };
        let dev =
            arrow::compute::cast(b.column(d), &arrow::datatypes::DataType::Utf8).expect("utf8");
        let dev = dev.as_string::<i32>();
        let seq = b
            .column(s)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("int64");
        for i in 0..b.num_rows() {
            out.push(serde_json::json!({"device_id": dev.value(i), "seq": seq.value(i)}));
        }
    }
    out
}

/// A private Mosquitto that keeps its state on disk (a restart keeps persistent
/// sessions and plain subscriptions), on a free port.
pub struct PrivateBroker {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    pub fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {d}/\nautosave_interval 1\n{extra}"),
        )
        .expect("conf");
        let mut b = Self {
            dir,
            port,
            child: None,
        };
        b.up();
        b
    }

    pub fn up(&mut self) {
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it as an operator does (SIGTERM: it saves its state).
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The reasons of the control plane's scaling decisions so far.
pub async fn scaling_reasons(admin: &str) -> Vec<String> {
    super::mesh::Http::new()
        .get(&format!("{admin}/api/v1/scaling"))
        .await
        .json()["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["reason"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for a scaling decision whose reason starts with `change` (`1 → 2`); the
/// reasons seen when it did not come within `within`.
pub async fn scaling_event(
    admin: &str,
    change: &str,
    within: Duration,
) -> Result<String, Vec<String>> {
    let start = Instant::now();
    loop {
        let r = scaling_reasons(admin).await;
        if let Some(found) = r.iter().find(|r| r.starts_with(change)) {
            return Ok(found.clone());
        }
        if start.elapsed() >= within {
            return Err(r);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
