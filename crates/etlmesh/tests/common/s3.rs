//! A real S3-API server for the object-storage tests: moto's server (PyPI's
//! `moto[server]`, which `.ci/run` installs), one per test on a port of its own, in
//! memory; and boto3 (`tests/s3_client.py`) to look at the bucket as a stranger would.

#![allow(dead_code)]

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A moto server; killed on drop.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
}

/// Whether moto's server and boto3 are installed: CI installs them; elsewhere the test
/// skips, saying so.
pub fn available() -> bool {
    let ok = Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("python3")
            .args(["-c", "import boto3, duckdb"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "moto's S3 server, boto3 and duckdb are required in this run: pip install 'moto[server]' duckdb"
        );
        eprintln!("skipped: moto's S3 server is not installed (pip install 'moto[server]')");
    }
    ok
}

impl Moto {
    /// Starts a server on a free port.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut m = Moto { child: None, port };
        m.up();
        m
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, empty: moto keeps its buckets in memory).
    pub fn up(&mut self) {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto's server did not listen on {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server (-9): the endpoint refuses connections until [`Moto::up`].
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `tests/s3_client.py` (boto3) against this server and reads its JSON.
    pub fn client(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/s3_client.py"))
            .arg(self.endpoint())
            .args(args)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "s3_client.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("s3_client.py answers JSON")
    }

    /// Makes a bucket.
    pub fn bucket(&self, name: &str) {
        self.client(&["mkbucket", name]);
    }

    /// The keys under a prefix.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.client(&["list", bucket, prefix])
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|o| o["key"].as_str().map(str::to_string))
            .collect()
    }

    /// The `s3:` settings of a sink for this server (credentials as moto takes any).
    pub fn sink_settings(&self) -> String {
        format!(
            "{{ endpoint: \"{}\", region: us-east-1, allow_http: true, access_key_id: test, secret_access_key: test }}",
            self.endpoint()
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.down();
    }
}
