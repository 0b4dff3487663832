//! Streams from NATS JetStream, end to end on the real server: readings published by
//! a client that is not ours (nats-py, `tests/nats_publish.py`) through two workers
//! into PostgreSQL and rolling Parquet with one worker killed by kill -9; a NATS → NATS
//! pipeline whose output is stored once per row and whose undecodable messages are
//! dead-lettered and terminated; a private server restarted mid-stream; and a backlog
//! that scales the pipeline out on its consumer lag and back in once drained.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Scratch;
use common::jetstream::{NATS, js, names, publish, remove_stream};
use common::mesh::Proc;
use common::pg;
use common::stream::*;
use nix::sys::signal::Signal;

/// The tests time themselves and share the machine's server; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ready() -> bool {
    common::service("NATS", "127.0.0.1:4222")
        && common::service("PostgreSQL", "127.0.0.1:5432")
        && have_python_module("nats", "nats-py")
}

fn have_python_module(module: &str, package: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "{package} is required in this run: pip install {package}"
        );
        eprintln!("skipped: {package} is not installed (pip install {package})");
    }
    ok
}

/// A source block: the stream, the readings' subject, their schema.
fn source(url: &str, prefix: &str, stream: &str, extra: &str) -> String {
    format!(
        r#"    source: {{ type: nats, url: "{url}", stream: {stream}, subject: "{prefix}.*.reading", create: true, batch: {{ records: 1000, wait: 100ms }}{extra} }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms, temperature_c: float64, status: utf8 }}
"#
    )
}

fn want_keys(log: &std::path::Path) -> HashSet<(String, i64)> {
    sent_log(log)
        .into_iter()
        .map(|s| (s.device, s.seq))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_two_workers_loses_nothing_into_postgres_and_parquet() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (prefix, stream) = names("k9");
    remove_stream(NATS, &stream).await;
    let table = format!("nats_k9_{}", std::process::id());
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
    let scratch = Scratch::new();
    scratch.write(
        "s.yaml",
        format!(
            "pipelines:\n  live:\n{}    dedup: [device_id, seq]\n    sinks:\n      - {{ type: postgres, url: \"{}\", table: {table}, create: true }}\n      - {{ type: parquet, path: out/rows, roll_interval: 1s }}\n    dead_letter: {{ type: ndjson, path: out/dead }}\n",
            source(
                NATS,
                &prefix,
                &stream,
                r#", columns: { subj: subject, msg_id: "header:Nats-Msg-Id" }"#
            ),
            pg::MACHINE_URL
        ),
    );
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml", "--workers", "2"]);
    let admin = up.url("control plane");
    streams_started(&up, 2).await;
    let log = scratch.path("sent.log");
    let total = 100_000;
    let publisher = publish(NATS, &prefix, None, total, 5_000, Some(&log));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let victim = up_workers(&admin, 2).await[0].clone();
    signal(victim.1, Signal::SIGKILL);
    eprintln!("killed {victim:?}");
    let sent = paho_done(publisher);
    assert_eq!(sent.acked, total, "JetStream stored every reading");
    let want = want_keys(&log);
    assert_eq!(want.len() as u64, total);
    let start = Instant::now();
    let rows = loop {
        let n = pg::count(&db, &format!("SELECT count(*) FROM {table}")).await;
        if n >= total as i64 || start.elapsed() > Duration::from_secs(120) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let distinct = pg::count(
        &db,
        &format!("SELECT count(DISTINCT (device_id, seq)) FROM {table}"),
    )
    .await;
    eprintln!("postgres: {rows} rows, {distinct} distinct keys of {total}");
    assert_eq!(
        distinct,
        total as i64,
        "every reading is a row\n{}",
        up.output()
    );
    assert_eq!(rows, total as i64, "each key once (dedup)");
    // The subject and a header became columns (nats_publish.py sets Nats-Msg-Id to seq).
    let wrong = pg::count(
        &db,
        &format!("SELECT count(*) FROM {table} WHERE msg_id IS DISTINCT FROM seq::text OR subj <> '{prefix}.' || device_id || '.reading'"),
    )
    .await;
    assert_eq!(wrong, 0, "subject and header columns");
    let (keys, repeats) = eventually(Duration::from_secs(60), || {
        let (k, r) = distinct_keys(&parquet_keys(&scratch.path("out/rows")));
        (k.len() >= want.len(), (k, r))
    })
    .await;
    eprintln!(
        "parquet: {} distinct keys of {}, {repeats} repeated rows (at least once: the killed worker's unacknowledged messages came again)",
        keys.len(),
        want.len()
    );
    let missing: Vec<_> = want.difference(&keys).take(5).collect();
    assert!(missing.is_empty(), "parquet misses keys, e.g. {missing:?}");
    assert!(
        up.output().contains("restarting"),
        "the killed worker came back"
    );
    // The consumer's lag reaches the control plane with the workers' load.
    let http = common::mesh::Http::new();
    let start = Instant::now();
    let pending = loop {
        let workers = http.get(&format!("{admin}/api/v1/workers")).await.json();
        let seen: Vec<u64> = workers
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w["load"]["pipelines"]["live"]["source_pending"].as_u64())
            .collect();
        if seen.contains(&0) || start.elapsed() > Duration::from_secs(15) {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        pending.contains(&0),
        "the workers report the consumer's pending messages (0 once all is taken): {pending:?}"
    );
    assert!(
        up.output().contains("JetStream consumer ready"),
        "the workers said which consumer they use"
    );
    drop(up);
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
    remove_stream(NATS, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_to_nats_stores_each_row_once_and_terminates_what_cannot_be_read() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (prefix, stream) = names("n2n");
    let out_stream = format!("{stream}_OUT");
    remove_stream(NATS, &stream).await;
    remove_stream(NATS, &out_stream).await;
    let scratch = Scratch::new();
    scratch.write(
        "s.yaml",
        format!(
            "pipelines:\n  relay:\n{}    transform: SELECT device_id, seq, temperature_c * 9 / 5 + 32 AS temperature_f FROM input\n    sinks:\n      - {{ type: nats, url: \"{NATS}\", subject: \"{prefix}-out.{{device_id}}\", stream: {out_stream}, create: true, key: [device_id, seq] }}\n    dead_letter: {{ type: ndjson, path: out/dead }}\n",
            source(NATS, &prefix, &stream, ""),
        ),
    );
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml", "--workers", "1"]);
    let admin = up.url("control plane");
    streams_started(&up, 1).await;
    let js = js(NATS).await;
    for bad in ["not json", "[1, 2", ""] {
        js.publish(format!("{prefix}.dev-bad.reading"), bad.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let log = scratch.path("sent.log");
    let total = 5_000;
    let sent = paho_done(publish(NATS, &prefix, None, total, 2_500, Some(&log)));
    assert_eq!(sent.acked, total);
    // Kill the worker once: what it had not acknowledged comes again and is
    // published again — with the same message ids, stored once.
    let victim = up_workers(&admin, 1).await[0].clone();
    signal(victim.1, Signal::SIGKILL);
    let start = Instant::now();
    let stored = loop {
        let n = match js.get_stream(&out_stream).await {
            Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        };
        if n >= total || start.elapsed() > Duration::from_secs(60) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("output stream: {stored} messages for {total} readings");
    assert_eq!(stored, total, "each row stored once\n{}", up.output());
    // A published row reads back as JSON with the SQL's columns.
    let out = js.get_stream(&out_stream).await.expect("out stream");
    let first = out.get_raw_message(1).await.expect("first message");
    let row: serde_json::Value = serde_json::from_slice(&first.payload).expect("JSON row");
    assert!(row["temperature_f"].is_number(), "{row}");
    assert!(first.subject.starts_with(&format!("{prefix}-out.dev-")));
    // The unreadable messages are dead letters, terminated: never sent again.
    let dead = eventually(Duration::from_secs(20), || {
        let d = dead_letters(&scratch);
        (d.len() >= 3, d)
    })
    .await;
    let sources: HashSet<String> = dead
        .iter()
        .filter_map(|d| d["source"].as_str().map(String::from))
        .collect();
    assert!(
        sources.contains(&format!("nats:{prefix}.dev-bad.reading")),
        "{dead:?}"
    );
    let mut consumer = js
        .get_stream(&stream)
        .await
        .expect("stream")
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("relay")
        .await
        .expect("the durable consumer the pipeline made");
    let start = Instant::now();
    let info = loop {
        let i = consumer.info().await.expect("consumer info").clone();
        if (i.num_ack_pending == 0 && i.num_pending == 0)
            || start.elapsed() > Duration::from_secs(30)
        {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "everything acknowledged or terminated: {info:?}"
    );
    drop(up);
    remove_stream(NATS, &stream).await;
    remove_stream(NATS, &out_stream).await;
}

/// A private nats-server with JetStream on a free port, its store in `dir`.
struct PrivateNats {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    fn start(dir: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut s = Self {
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        s.up();
        s
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let child = std::process::Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A graceful stop (SIGTERM): the server flushes its store.
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn have_nats_server() -> bool {
    let ok = std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "nats-server is required in this run"
        );
        eprintln!("skipped: nats-server is not installed");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_mid_stream_loses_nothing() {
    if !ready() || !have_nats_server() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let mut server = PrivateNats::start(&scratch.path("nats-store"));
    let url = server.url();
    let (prefix, stream) = names("restart");
    let table = format!("nats_restart_{}", std::process::id());
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
    scratch.write(
        "s.yaml",
        format!(
            "pipelines:\n  live:\n{}    dedup: [device_id, seq]\n    sinks:\n      - {{ type: postgres, url: \"{}\", table: {table}, create: true }}\n    dead_letter: {{ type: ndjson, path: out/dead }}\n",
            source(&url, &prefix, &stream, ""),
            pg::MACHINE_URL
        ),
    );
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml", "--workers", "1"]);
    streams_started(&up, 1).await;
    let log = scratch.path("sent.log");
    let total = 20_000;
    let publisher = publish(&url, &prefix, None, total, 2_000, Some(&log));
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.down();
    eprintln!("server stopped");
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.up();
    eprintln!("server started again");
    let sent = paho_done(publisher);
    assert_eq!(sent.acked, total);
    let start = Instant::now();
    let distinct = loop {
        let n = pg::count(
            &db,
            &format!("SELECT count(DISTINCT (device_id, seq)) FROM {table}"),
        )
        .await;
        if n >= total as i64 || start.elapsed() > Duration::from_secs(120) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("postgres: {distinct} distinct keys of {total}");
    assert_eq!(distinct, total as i64, "nothing lost\n{}", up.output());
    drop(up);
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
}

#[test]
fn a_missing_stream_is_a_clear_error_naming_it() {
    if !common::service("NATS", "127.0.0.1:4222") {
        return;
    }
    let scratch = Scratch::new();
    let (prefix, stream) = names("missing");
    scratch.write(
        "s.yaml",
        format!(
            "pipelines:\n  live:\n    source: {{ type: nats, url: \"{NATS}\", stream: {stream}, subject: \"{prefix}.>\" }}\n    schema: {{ seq: int64 }}\n    sinks: [{{ type: parquet, path: out/rows }}]\n    dead_letter: {{ type: ndjson, path: out/dead }}\n"
        ),
    );
    let w = Proc::start(
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
    );
    let out = w.wait_for("does not exist", Duration::from_secs(20));
    assert!(
        out.contains(&format!("JetStream stream `{stream}` does not exist"))
            && out.contains("create: true")
            && !out.contains("MQTT broker"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_longer_than_ack_wait_is_counted_once_in_full() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (prefix, stream) = names("win");
    remove_stream(NATS, &stream).await;
    let scratch = Scratch::new();
    // Windows of 6 s hold their messages unacknowledged far longer than ack_wait (1 s):
    // the worker must keep saying they are in progress, or JetStream sends them again
    // and the window counts them twice.
    scratch.write(
        "s.yaml",
        format!(
            "pipelines:\n  per_window:\n{}    window: {{ time: ts, size: 6s, allowed_lateness: 200ms, idle_timeout: 2s }}\n    scaling: {{ max_replicas: 1 }}\n    transform: SELECT device_id, window_start, count(*) AS n FROM input GROUP BY device_id, window_start\n    sinks: [{{ type: ndjson, path: out/windows, roll_interval: 300ms }}]\n    dead_letter: {{ type: ndjson, path: out/dead }}\n",
            source(NATS, &prefix, &stream, ", ack_wait: 1s"),
        ),
    );
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml"]);
    streams_started(&up, 1).await;
    let log = scratch.path("sent.log");
    paho_done(publish(NATS, &prefix, None, 4_000, 500, Some(&log)));
    let want = window_counts(&sent_log(&log), 6000);
    let read = || {
        let mut m: std::collections::HashMap<(String, i64), Vec<i64>> = Default::default();
        for r in common::read_ndjson_dir(&scratch.path("out/windows")) {
            let start = r["window_start"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.timestamp_millis())
                .or_else(|| r["window_start"].as_i64())
                .unwrap_or(i64::MIN);
            m.entry((r["device_id"].as_str().unwrap_or("").to_string(), start))
                .or_default()
                .push(r["n"].as_i64().unwrap_or(-1));
        }
        m
    };
    let got = eventually(Duration::from_secs(40), || {
        let g = read();
        (want.keys().all(|k| g.contains_key(k)), g)
    })
    .await;
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, n)| got.get(*k) != Some(&vec![**n]))
        .map(|(k, n)| format!("{k:?}: want {n}, rows {:?}", got.get(k)))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} windows wrong, e.g. {wrong:?}\n{}",
        want.iter()
            .filter(|(k, n)| got.get(*k) != Some(&vec![**n]))
            .count(),
        want.len(),
        up.output()
    );
    drop(up);
    remove_stream(NATS, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_scales_the_pipeline_out_on_its_lag_and_back_once_drained() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let (prefix, stream) = names("lag");
    remove_stream(NATS, &stream).await;
    // A slow sink: every statement into the table takes 200 ms more (a trigger), so a
    // worker loads about 1,000 rows a second (micro-batches of 200) and a backlog lasts.
    let table = format!("nats_lag_{}", std::process::id());
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (device_id text, seq bigint, ts timestamptz, temperature_c double precision, status text);
         CREATE OR REPLACE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.2); RETURN NULL; END $$;
         CREATE TRIGGER slow AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {table}_slow();"
    ))
    .await
    .expect("slow table");
    let scratch = Scratch::new();
    // The backlog is there before any worker: the publisher makes the stream.
    let log = scratch.path("sent.log");
    let total = 30_000;
    let publisher = publish(NATS, &prefix, Some(&stream), total, 100_000, Some(&log));
    assert_eq!(paho_done(publisher).acked, total);
    scratch.write(
        "s.yaml",
        format!(
            "pipelines:\n  live:\n    source: {{ type: nats, url: \"{NATS}\", stream: {stream}, subject: \"{prefix}.*.reading\", create: true, max_ack_pending: 1000, batch: {{ records: 200, wait: 100ms }} }}\n    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms, temperature_c: float64, status: utf8 }}\n    scaling: {{ min_replicas: 1, max_replicas: 2, target_lag: 5000, scale_down_window: 5s }}\n    sinks:\n      - {{ type: postgres, url: \"{}\", table: {table} }}\n    dead_letter: {{ type: ndjson, path: out/dead }}\n",
            pg::MACHINE_URL
        ),
    );
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml"]);
    let admin = up.url("control plane");
    let start = Instant::now();
    let up_reason = scaling_event(&admin, "1 → 2", Duration::from_secs(30))
        .await
        .unwrap_or_else(|r| {
            panic!(
                "no scale-out on a backlog of {total}: {r:?}\n{}",
                up.output()
            )
        });
    eprintln!("scaled out after {:?}: {up_reason}", start.elapsed());
    assert!(up_reason.contains(", lag "), "{up_reason}");
    let distinct = loop {
        let n = pg::count(
            &db,
            &format!("SELECT count(DISTINCT (device_id, seq)) FROM {table}"),
        )
        .await;
        if n >= total as i64 || start.elapsed() > Duration::from_secs(120) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "drained after {:?}: {distinct} keys of {total}",
        start.elapsed()
    );
    assert_eq!(
        distinct,
        total as i64,
        "every reading loaded\n{}",
        up.output()
    );
    // Drained: back to one worker after the 5 s window.
    let drained = Instant::now();
    let down = scaling_event(&admin, "2 → 1", Duration::from_secs(60))
        .await
        .unwrap_or_else(|r| panic!("no scale-in once drained: {r:?}"));
    eprintln!("scaled in {:?} after draining: {down}", drained.elapsed());
    drop(up);
    remove_stream(NATS, &stream).await;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP FUNCTION IF EXISTS {table}_slow();"
    ))
    .await
    .expect("drop");
}
