//! PostgreSQL for tests: the machine's (database `test`), and a private instance on a
//! free port for tests that stop and start it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// The machine's PostgreSQL.
pub const MACHINE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Connects, retrying for a few seconds.
pub async fn connect(url: &str) -> Client {
    let start = Instant::now();
    loop {
        match tokio_postgres::connect(url, NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                return c;
            }
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                panic!("cannot connect to {url}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// One number from a query.
pub async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.map_or(-1, |r| r.get(0))
}

fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Runs a PostgreSQL program as the `postgres` user when we are root (initdb refuses
/// to run as root).
fn pg(dir: &Path, program: &str, args: &[&str]) -> std::process::Output {
    let exe = dir.join(program);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args).output().expect("postgres program runs")
}

/// A private PostgreSQL on a free port, removed on drop.
pub struct TempPostgres {
    bin: PathBuf,
    data: PathBuf,
    _root: tempfile::TempDir,
    /// Its port.
    pub port: u16,
}

impl TempPostgres {
    /// Creates and starts one; `None` (test skipped, saying so) when PostgreSQL's
    /// programs are not installed.
    pub fn start() -> Option<Self> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "PostgreSQL's programs (initdb, pg_ctl under /usr/lib/postgresql/*/bin) are required in this run (.ci/run installs them)"
            );
            eprintln!("skipped: PostgreSQL's programs (initdb, pg_ctl) are not installed");
            return None;
        };
        let root = tempfile::Builder::new()
            .prefix("etlmesh-pg-")
            .tempdir_in("/tmp")
            .expect("tmp");
        let data = root.path().join("data");
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(root.path())
                .status();
        }
        let out = pg(
            &bin,
            "initdb",
            &[
                "-D",
                data.to_str().unwrap_or(""),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let pg = Self {
            bin,
            data,
            _root: root,
            port,
        };
        pg.up();
        Some(pg)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again).
    pub fn up(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.data.display()
        );
        let log = self.data.join("server.log");
        let out = self.ctl(&["-l", log.to_str().unwrap_or(""), "-o", &opts, "-w", "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl -D <data> ARGS`.
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["-D", self.data.to_str().unwrap_or("")];
        all.extend_from_slice(args);
        pg(&self.bin, "pg_ctl", &all)
    }

    /// Stops the server (fast: connections are closed).
    pub fn down(&self) {
        self.ctl(&["-m", "fast", "-w", "stop"]);
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.ctl(&["-m", "immediate", "-w", "stop"]);
    }
}
