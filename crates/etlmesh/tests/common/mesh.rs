//! Helpers for end-to-end tests of the mesh: processes that print where they listen,
//! and an HTTP client.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::Scratch;

/// An `etlmesh` process whose stderr is captured.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `etlmesh ARGS` in `dir`.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        Self::start_env(dir, args, &[])
    }

    /// Starts `etlmesh up` in `dir` with its HTTP and admin listeners on free ports,
    /// Arrow Flight off unless `args` asks for it, then `args`.
    pub fn up(dir: &Path, args: &[&str]) -> Self {
        let mut all = vec!["up", "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        if !args.contains(&"--flight") {
            all.extend(["--flight", "off"]);
        }
        all.extend_from_slice(args);
        Self::start(dir, &all)
    }

    /// Starts `etlmesh ARGS` in `dir` with `env` set.
    pub fn start_env(dir: &Path, args: &[&str], env: &[(String, String)]) -> Self {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_etlmesh")), dir, args, env)
    }

    /// `etlmesh gateway` on a free port, Arrow Flight off, following `control_plane`
    /// (`env`: the join token, for a mesh with mTLS).
    pub fn gateway(dir: &Path, control_plane: &str, env: &[(String, String)]) -> Self {
        Self::start_env(
            dir,
            &[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--flight",
                "off",
                "--control-plane",
                control_plane,
            ],
            env,
        )
    }

    /// `etlmesh worker -c CONFIG --id ID` registering with `control_plane`.
    pub fn worker(
        dir: &Path,
        config: &str,
        id: &str,
        control_plane: &str,
        env: &[(String, String)],
    ) -> Self {
        Self::start_env(
            dir,
            &[
                "worker",
                "-c",
                config,
                "--id",
                id,
                "--control-plane",
                control_plane,
            ],
            env,
        )
    }

    /// Starts `etlmesh ARGS` in `dir` inside the network namespace `ns` (a host of
    /// its own, with only a loopback).
    pub fn start_in_netns(ns: &str, dir: &Path, args: &[&str]) -> Self {
        Self::start_in_netns_env(ns, dir, args, &[])
    }

    /// [`Proc::start_in_netns`] with `env` set.
    pub fn start_in_netns_env(
        ns: &str,
        dir: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let mut ip = Command::new("ip");
        ip.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_etlmesh")]);
        Self::spawn(ip, dir, args, env)
    }

    fn spawn(mut command: Command, dir: &Path, args: &[&str], env: &[(String, String)]) -> Self {
        let mut child = command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir)
            .env("ETLMESH_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etlmesh starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Self { child, lines }
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .expect("lines")
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if start.elapsed() > timeout {
                panic!(
                    "no line with {needle:?} within {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL in the first line that says `{what} listening on <url>`.
    pub fn url(&self, what: &str) -> String {
        let needle = format!("{what} listening on ");
        let line = self.wait_for(&needle, Duration::from_secs(20));
        let at = line.find(&needle).expect("found") + needle.len();
        line[at..]
            .split_whitespace()
            .next()
            .expect("url")
            .to_string()
    }

    pub fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the process to exit; panics with its output past `timeout`.
    pub async fn exit_within(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                started.elapsed() < timeout,
                "still running {timeout:?} later:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A plain HTTP/1.1 client.
#[derive(Clone)]
pub struct Http(Client<HttpConnector, Full<Bytes>>);

impl Http {
    pub fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, String> {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = self.0.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, url: &str) -> Answer {
        self.send(Method::GET, url, &[], Bytes::new())
            .await
            .expect("GET")
    }

    /// Posts readings to `url` until one is answered 200 (within `tries`, 100 ms
    /// apart): that answer, or the last status.
    pub async fn post_until_ok(&self, url: &str, tries: usize) -> Result<Answer, StatusCode> {
        let mut last = StatusCode::SERVICE_UNAVAILABLE;
        for _ in 0..tries {
            let a = self
                .post_csv(url, readings(10, 0.0, 3))
                .await
                .expect("an answer");
            if a.status == StatusCode::OK {
                return Ok(a);
            }
            last = a.status;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last)
    }

    pub async fn post_csv(&self, url: &str, body: Bytes) -> Result<Answer, String> {
        self.send(
            Method::POST,
            url,
            &[
                ("content-type", "text/csv"),
                ("accept", "application/x-ndjson"),
            ],
            body,
        )
        .await
    }
}

/// The mesh pipeline file used by the tests.
pub const MESH_YAML: &str = r#"
platform:
  threads: 1
  batch_size: 8192
pipelines:
  clean:
    schema:
      device_id: { type: utf8, nullable: false }
      ts: { type: timestamp_ms, nullable: false }
      temperature_c: float64
      humidity: float64
      battery_v: float64
      status: utf8
    transform: |
      SELECT device_id, ts, temperature_c * 9 / 5 + 32 AS temperature_f, status
      FROM input WHERE status <> 'err' AND temperature_c BETWEEN -50 AND 150
    sinks: [ { type: stdout, format: ndjson } ]
    dead_letter: { type: ndjson, path: dead }
"#;

/// `rows` readings as CSV, `bad` of them malformed.
pub fn readings(rows: u64, bad: f64, seed: u64) -> Bytes {
    let mut out = Vec::new();
    let opts = etlmesh_datagen_opts(rows, bad, seed);
    let status = Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args(opts)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .expect("generate");
    out.extend_from_slice(&status.stdout);
    Bytes::from(out)
}

fn etlmesh_datagen_opts(rows: u64, bad: f64, seed: u64) -> Vec<String> {
    vec![
        "generate".into(),
        "--rows".into(),
        rows.to_string(),
        "--bad-fraction".into(),
        bad.to_string(),
        "--seed".into(),
        seed.to_string(),
    ]
}

/// Polls until `check` holds.
pub async fn eventually(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request's outcome under load.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub at: Instant,
    pub status: Result<StatusCode, String>,
    pub worker: String,
}

/// Sends `body` from `concurrency` clients until `stop`.
pub fn load(
    url: String,
    body: Bytes,
    concurrency: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Outcome>> {
    tokio::spawn(async move {
        let client = Http::new();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, url, body, stop) =
                (client.clone(), url.clone(), body.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = client.post_csv(&url, body.clone()).await;
                    out.push(Outcome {
                        at: Instant::now(),
                        worker: r
                            .as_ref()
                            .map(|a| a.header("etlmesh-worker"))
                            .unwrap_or_default(),
                        status: r.map(|a| a.status),
                    });
                }
                out
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    })
}

/// Panics with the first failures, if any request failed.
pub fn assert_none_failed(outcomes: &[Outcome]) {
    let failed = failures(outcomes);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
}

pub fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes
        .iter()
        .filter(|o| o.status != Ok(StatusCode::OK))
        .collect()
}

pub fn per_worker(outcomes: &[Outcome]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for o in outcomes {
        *m.entry(o.worker.clone()).or_insert(0) += 1;
    }
    m
}

/// Control plane, gateway and workers as separate processes.
pub struct Mesh {
    pub scratch: Scratch,
    pub cp_url: String,
    pub gw_url: String,
    pub workers: Vec<Proc>,
    /// Environment of every process started.
    pub env: Vec<(String, String)>,
    // Kept alive (and stopped) with the mesh.
    pub _processes: [Proc; 2],
}

impl Mesh {
    pub async fn start(workers: &[&[&str]], gateway_args: &[&str]) -> Self {
        Self::start_with(workers, gateway_args).await.0
    }

    /// Also returns the gateway's Arrow Flight URL.
    pub async fn start_with(workers: &[&[&str]], gateway_args: &[&str]) -> (Self, String) {
        Self::start_env(workers, gateway_args, &[]).await
    }

    /// With `env` set for every process.
    pub async fn start_env(
        workers: &[&[&str]],
        gateway_args: &[&str],
        env: &[(&str, &str)],
    ) -> (Self, String) {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let scratch = Scratch::new();
        scratch.write("mesh.yaml", MESH_YAML);
        let dir = scratch.dir.path().to_path_buf();
        let cp = Proc::start_env(&dir, &["control-plane", "--listen", "127.0.0.1:0"], &env);
        let cp_url = cp.url("control plane");
        let mut args = vec![
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--flight",
            "127.0.0.1:0",
            "--control-plane",
            &cp_url,
        ];
        args.extend_from_slice(gateway_args);
        let gw = Proc::start_env(&dir, &args, &env);
        let gw_url = gw.url("gateway");
        let flight = gw.url("Arrow Flight").replace("grpc://", "http://");
        let mut mesh = Self {
            scratch,
            cp_url,
            gw_url,
            workers: Vec::new(),
            env,
            _processes: [cp, gw],
        };
        for (i, extra) in workers.iter().enumerate() {
            mesh.add_worker(&format!("w{}", i + 1), extra);
        }
        mesh.wait_ready(workers.len()).await;
        (mesh, flight)
    }

    pub fn add_worker(&mut self, id: &str, extra: &[&str]) {
        let mut args = vec![
            "worker",
            "-c",
            "mesh.yaml",
            "--control-plane",
            &self.cp_url,
            "--id",
            id,
        ];
        args.extend_from_slice(extra);
        let w = Proc::start_env(self.scratch.dir.path(), &args, &self.env);
        w.url("worker");
        self.workers.push(w);
    }

    pub async fn ready_workers(&self) -> u64 {
        let list = Http::new()
            .get(&format!("{}/v1/pipelines", self.gw_url))
            .await
            .json();
        list.as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == "clean"))
            .and_then(|p| p["ready_workers"].as_u64())
            .unwrap_or(0)
    }

    pub async fn wait_ready(&self, n: usize) {
        eventually(
            Duration::from_secs(20),
            "workers ready at the gateway",
            async || self.ready_workers().await == n as u64,
        )
        .await;
    }

    pub fn transform_url(&self) -> String {
        format!("{}/v1/pipelines/clean", self.gw_url)
    }
}
