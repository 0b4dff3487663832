//! Helpers for end-to-end tests on NATS JetStream: names of a run's own, the stream
//! removed after, and readings published by nats-py (`tests/nats_publish.py`), a
//! client that is not ours.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The machine's NATS server.
pub const NATS: &str = "nats://127.0.0.1:4222";

/// Names unique to this run: a subject prefix and a stream.
pub fn names(tag: &str) -> (String, String) {
    let id = std::process::id();
    (
        format!("etlmesh-test-{tag}-{id}"),
        format!("ETLMESH_TEST_{}_{id}", tag.to_uppercase()),
    )
}

pub async fn js(url: &str) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(url).await.expect("NATS answers"))
}

/// Removes a test's stream (and its consumers).
pub async fn remove_stream(url: &str, stream: &str) {
    let _ = js(url).await.delete_stream(stream).await;
}

/// nats-py publishing `count` readings at `rate` to `<prefix>.<device>.reading`; with
/// `stream`, it makes the stream first; with `log`, it writes what it sent there.
pub fn publish(
    url: &str,
    prefix: &str,
    stream: Option<&str>,
    count: u64,
    rate: u64,
    log: Option<&Path>,
) -> Child {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/nats_publish.py"
    ))
    .args(["--url", url, "--prefix", prefix])
    .args(["--count", &count.to_string(), "--rate", &rate.to_string()]);
    if let Some(s) = stream {
        cmd.args(["--stream", s]);
    }
    if let Some(l) = log {
        cmd.args(["--log", l.to_str().expect("utf-8 path")]);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts")
}
