//! A Kafka-protocol broker of a test's own (tansu, in memory), and clients that are
//! not ours (confluent-kafka): a producer of readings and the group's committed offsets.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tansu binary: `$ETLMESH_TANSU`, `tansu` on the PATH, or where `.ci/run` puts it.
pub fn tansu() -> Option<PathBuf> {
    let cached =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/etlmesh-tools/bin/tansu"));
    let found = std::env::var_os("ETLMESH_TANSU")
        .map(PathBuf::from)
        .or_else(|| {
            Command::new("tansu")
                .arg("--version")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| PathBuf::from("tansu"))
        })
        .or(cached.filter(|p| p.exists()));
    if found.is_none() {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "tansu is required in this run: .ci/run installs it (cargo install tansu)"
        );
        eprintln!("skipped: tansu is not installed (cargo install tansu --features dynostore)");
    }
    found
}

/// The tansu binary when a Kafka test can run here: tansu, confluent-kafka and nats-py,
/// and the machine's NATS (skipped with a word where they are missing, unless required).
pub fn ready() -> Option<PathBuf> {
    let python = Command::new("python3")
        .args(["-c", "import confluent_kafka, nats"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !python {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "confluent-kafka and nats-py are required in this run"
        );
        eprintln!("skipped: pip install confluent-kafka nats-py");
        return None;
    }
    if !super::service("NATS", "127.0.0.1:4222") {
        return None;
    }
    tansu()
}

/// A tansu broker of the test's own, in memory.
pub struct Broker {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    pub fn start(bin: PathBuf) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut b = Self {
            bin,
            port,
            child: None,
        };
        b.up();
        b
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tansu did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let out = Command::new(&self.bin)
            .args([
                "topic",
                "create",
                topic,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .output()
            .expect("tansu topic create");
        assert!(
            out.status.success(),
            "topic {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the broker answering (SIGSTOP), its state kept: to its clients, a broker
    /// that hangs or a network that drops everything.
    pub fn pause(&self) {
        self.send(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        self.send(nix::sys::signal::Signal::SIGCONT);
    }

    fn send(&self, sig: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the broker runs");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("signal the broker");
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.down();
    }
}

/// What confluent-kafka's idempotent producer delivered.
#[derive(Debug, serde::Deserialize)]
pub struct Produced {
    pub acked: u64,
    pub failed: u64,
}

/// tansu 0.6 answers a fetch from inside a record batch with the batches after it (on
/// Kafka the client skips the records before the offset it asked for): a test whose
/// group resumes from a commit inside a batch (a partition moved, a worker killed)
/// produces one record per batch.
pub const ONE_PER_BATCH: &str = "--one-per-batch";

fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kafka_produce.py")
}

/// Starts producing `count` readings of `devices` devices (keyed by device, a `trace`
/// header each) at about `rate` per second (0: as fast as it can), with the script's
/// `extra` flags; `produced` waits.
pub fn produce(
    brokers: &str,
    topic: &str,
    count: u64,
    devices: u32,
    rate: u32,
    extra: &[&str],
) -> Child {
    Command::new("python3")
        .arg(script())
        .args(["--brokers", brokers, "--topic", topic])
        .args([
            "--count",
            &count.to_string(),
            "--devices",
            &devices.to_string(),
        ])
        .args(["--rate", &rate.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs")
}

/// Waits for a producer and reads its report.
pub fn produced(child: Child) -> Produced {
    let out = child.wait_with_output().expect("producer");
    assert!(
        out.status.success(),
        "producer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).expect("producer report")
}

/// Commits `offset` of `topic`'s partition 0 for `group`, as a consumer that stopped
/// there would have (confluent-kafka).
pub fn commit(brokers: &str, topic: &str, group: &str, offset: i64) {
    let out = Command::new("python3")
        .arg(script())
        .args(["--brokers", brokers, "--topic", topic, "--commit", group])
        .args(["--offset", &offset.to_string()])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "commit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A group's committed offsets of a topic, summed over its partitions, and the end.
#[derive(Debug, serde::Deserialize)]
pub struct Committed {
    pub committed: i64,
    pub end: i64,
    pub lag: i64,
}

/// What the group coordinator says `group` committed of `topic`.
pub fn committed(brokers: &str, topic: &str, group: &str) -> Committed {
    let out = Command::new("python3")
        .arg(script())
        .args(["--brokers", brokers, "--topic", topic, "--committed", group])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "committed offsets: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).expect("committed report")
}
