//! Helpers for end-to-end tests: run the real `etlmesh` binary in a scratch directory.

#![allow(dead_code)]

pub mod hosts;
pub mod jetstream;
pub mod kafka;
pub mod mesh;
pub mod pg;
pub mod s3;
pub mod stream;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use arrow::array::RecordBatch;

/// A scratch directory with a pipeline file.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, content).expect("write");
        p
    }

    /// Runs `etlmesh ARGS` in the scratch directory.
    pub fn etlmesh(&self, args: &[&str]) -> Output {
        self.etlmesh_stdin(args, None)
    }

    pub fn etlmesh_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_etlmesh"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("ETLMESH_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("etlmesh starts");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut s = child.stdin.take().expect("stdin");
            s.write_all(input).expect("write stdin");
        }
        child.wait_with_output().expect("etlmesh runs")
    }

    /// Runs a job and returns its summary (panics with stderr when it fails).
    pub fn run_ok(&self, config: &str, pipeline: &str, inputs: &[&str]) -> serde_json::Value {
        let mut args = vec![
            "run",
            "-c",
            config,
            "--pipeline",
            pipeline,
            "--progress",
            "off",
            "--summary-json",
            "summary.json",
        ];
        args.extend_from_slice(inputs);
        let out = self.etlmesh(&args);
        assert!(
            out.status.success(),
            "etlmesh run failed:\n{}",
            text(&out.stderr)
        );
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.path("summary.json")).expect("summary"))
                .expect("json");
        let (i, o, f, d) = (
            n(&s["records_in"]),
            n(&s["records_out"]),
            n(&s["filtered"]),
            n(&s["dead_lettered"]),
        );
        assert_eq!(i, o + f + d, "in = out + filtered + dead-lettered: {s}");
        s
    }
}

pub fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every file under `dir`, recursively, relative and sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).expect("inside").display().to_string());
        }
    }
}

/// All rows of the Parquet files under `dir`.
pub fn read_parquet_dir(dir: &Path) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for f in files(dir).into_iter().filter(|f| f.ends_with(".parquet")) {
        let file = std::fs::File::open(dir.join(&f)).expect("open");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("parquet")
            .build()
            .expect("reader");
        out.extend(reader.map(|b| b.expect("batch")));
    }
    out
}

pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

/// Lines of the NDJSON files under `dir`, parsed.
pub fn read_ndjson_dir(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for f in files(dir).into_iter().filter(|f| f.ends_with(".ndjson")) {
        for line in std::fs::read_to_string(dir.join(&f)).expect("read").lines() {
            out.push(serde_json::from_str(line).expect("json line"));
        }
    }
    out
}

/// The readings pipeline file used by several tests; `{extra}` goes in the pipeline.
pub fn readings_yaml(transform: &str, sink: &str, extra: &str) -> String {
    format!(
        r#"platform:
  memory_limit: 256MiB
  batch_size: 4096
pipelines:
  p:
    schema:
      device_id: {{ type: utf8, nullable: false }}
      ts: {{ type: timestamp_ms, nullable: false }}
      temperature_c: float64
      humidity: float64
      battery_v: float64
      status: utf8
    transform: |
{}
    sinks:
      - {sink}
{extra}"#,
        transform
            .lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// Whether a service of the machine answers at `addr`. CI sets
/// `ETLMESH_REQUIRE_SERVICES=1` after checking them, and then a missing one fails the
/// test; elsewhere the test is skipped, saying so.
pub fn service(name: &str, addr: &str) -> bool {
    let up = addr
        .parse()
        .ok()
        .and_then(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(2)).ok()
        })
        .is_some();
    if !up {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{name} does not answer at {addr}, and this run requires it (ETLMESH_REQUIRE_SERVICES=1); start it (see the README's Set-up) or unset ETLMESH_REQUIRE_SERVICES"
        );
        eprintln!("skipped: {name} does not answer at {addr}");
    }
    up
}

/// Chromium, or why the browser test cannot run.
pub fn chromium() -> Option<String> {
    let path = std::env::var("ETLMESH_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if std::path::Path::new(&path).exists() {
        return Some(path);
    }
    assert!(
        std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "Chromium is required (install Debian's `chromium`, or set ETLMESH_CHROMIUM)"
    );
    eprintln!("skipped: no Chromium at {path} (install Debian's `chromium`)");
    None
}

/// The page at `url` as headless Chromium leaves it after 4 s of virtual time (its
/// scripts run and poll meanwhile).
pub async fn dump_dom(browser: &str, url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            &format!("--user-data-dir={}", profile.path().display()),
            "--virtual-time-budget=4000",
            "--dump-dom",
            url,
        ])
        .output()
        .await
        .expect("chromium runs");
    let html = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && html.contains("<body"),
        "chromium failed: {}\n{html}",
        String::from_utf8_lossy(&out.stderr)
    );
    html
}

/// Whether every program runs (`name --version`-like `arg`). CI (`.ci/run` sets
/// `ETLMESH_REQUIRE_SERVICES=1` after installing them) fails the test when one is
/// missing; elsewhere the test is skipped, saying so.
pub fn have_programs(programs: &[(&str, &str)]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .filter(|(p, arg)| std::process::Command::new(p).arg(arg).output().is_err())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{} required in this run (.ci/run installs them)",
        missing.join(", ")
    );
    eprintln!("skipped: {} not installed", missing.join(", "));
    false
}

/// A self-signed server certificate for `localhost` and 127.0.0.1 in `dir`
/// (`cert.pem`, `key.pem`), made by openssl (check `have_programs` first).
pub fn server_cert(dir: &Path) {
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args([
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            // A server certificate, not a CA (rustls refuses a CA as the end entity).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", text(&out.stderr));
}
