//! Streams against inputs and faults crafted to hurt, on the machine's Mosquitto and
//! PostgreSQL, with a publisher that is not ours (paho-mqtt): a row PostgreSQL refuses
//! among good ones, a grant revoked under a running stream, a reading from the future.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::Scratch;
use common::mesh::Http;
use common::pg;
use common::stream::*;

/// These tests publish to the same broker and time themselves; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until the worker's metrics page satisfies `ok`; returns the page.
async fn metrics_until(url: &str, within: Duration, ok: impl Fn(&str) -> bool) -> String {
    let http = Http::new();
    let start = Instant::now();
    loop {
        let page = String::from_utf8_lossy(&http.get(url).await.body).into_owned();
        if ok(&page) || start.elapsed() > within {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `seq` of a dead letter's row (its `raw` is the row as JSON).
fn seq_of(d: &serde_json::Value) -> Option<i64> {
    let raw: serde_json::Value = serde_json::from_str(d["raw"].as_str()?).ok()?;
    raw["seq"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgres_refuses_costs_that_row_not_its_micro_batch_nor_the_stream() {
    if !services() || !have_paho() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let id = std::process::id();
    let prefix = format!("etlmesh-test-poison-{id}");
    let table = format!("stream_poison_{id}");
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
    scratch.write("s.yaml", stream_yaml(&prefix, pg::MACHINE_URL, &table, ""));
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;

    // 20,000 good readings at 2,000/s and, every 100 ms, one whose text holds a NUL
    // byte: valid JSON, refused by PostgreSQL (22021) in the middle of a micro-batch.
    let sent = paho_done(paho(&[
        "--prefix",
        &prefix,
        "--count",
        "20000",
        "--rate",
        "2000",
        "--poison-every-ms",
        "100",
        "--client-id",
        &format!("paho-poison-{id}"),
    ]));
    eprintln!("published {sent:?}");
    assert!(sent.poison.len() >= 50, "{sent:?}");
    let rows = wait_rows(&db, &table, sent.good as i64, Duration::from_secs(60)).await;
    let not_ok = pg::count(
        &db,
        &format!("SELECT count(*) FROM {table} WHERE status <> 'ok'"),
    )
    .await;
    assert_eq!(
        (rows, not_ok),
        (sent.good as i64, 0),
        "every good reading is a row, no poisoned one is:\n{}",
        worker.output()
    );
    let metrics = metrics_until(
        &format!("{}/metrics", worker.url("worker")),
        Duration::from_secs(10),
        |p| metric(p, r#"etlmesh_stream_held_messages{pipeline="live"}"#) == Some(0.0),
    )
    .await;
    assert_eq!(
        metric(&metrics, r#"etlmesh_stream_held_messages{pipeline="live"}"#),
        Some(0.0),
        "every message was acknowledged: the stream did not stall\n{metrics}"
    );
    let dead = dead_letters(&scratch);
    let refused: HashSet<i64> = dead
        .iter()
        .filter(|d| d["stage"] == "load")
        .filter_map(seq_of)
        .collect();
    let poison: HashSet<i64> = sent.poison.iter().copied().collect();
    assert_eq!(
        refused, poison,
        "each poisoned reading is a dead letter, and only those"
    );
    assert_eq!(
        dead.len(),
        poison.len(),
        "nothing else was dead-lettered: {:?}",
        dead.iter().find(|d| d["stage"] != "load")
    );
    let reason = dead[0]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains(&format!("postgres:{table}")) && reason.contains("22021"),
        "the dead letter carries PostgreSQL's message: {reason}"
    );
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_is_an_outage_held_and_retried_never_dead_letters() {
    if !services() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let id = std::process::id();
    let prefix = format!("etlmesh-test-grant-{id}");
    let (table, role) = (format!("stream_grant_{id}"), format!("etlmesh_writer_{id}"));
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         CREATE TABLE {table} (device_id text, seq bigint, ts timestamptz, temperature_c double precision)"
    ))
    .await
    .expect("setup");
    let url = format!("postgres://{role}@127.0.0.1:5432/test");
    scratch.write(
        "s.yaml",
        format!(
            r#"
pipelines:
  live:
    source: {{ type: mqtt, broker: "{BROKER}", topic: "{prefix}/+/reading", batch: {{ records: 500, wait: 100ms }} }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms, temperature_c: float64 }}
    sinks:
      - {{ type: postgres, url: "{url}", table: {table} }}
    dead_letter: {{ type: ndjson, path: out/dead }}
"#
        ),
    );
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    let metrics_url = format!("{}/metrics", worker.url("worker"));
    finish(simulate(
        scratch.dir.path(),
        &prefix,
        2000,
        2000,
        &["--malformed", "0", "--late", "0"],
    ));
    // No INSERT grant: PostgreSQL says 42501 for every write. That is an outage: the
    // batch is held (and the loop with it), nothing acknowledged, retried with backoff.
    let up = r#"etlmesh_stream_sink_up{pipeline="live",sink="postgres:"#;
    let retries = r#"etlmesh_stream_sink_retries_total{pipeline="live""#;
    let page = metrics_until(&metrics_url, Duration::from_secs(20), |p| {
        metric(p, up) == Some(0.0) && metric(p, retries).is_some_and(|n| n >= 3.0)
    })
    .await;
    assert_eq!(metric(&page, up), Some(0.0), "{page}");
    let held = metric(&page, r#"etlmesh_stream_held_messages{pipeline="live"}"#).unwrap_or(0.0);
    assert!(held > 0.0, "the batch is held:\n{page}");
    assert_eq!(
        metric(
            &page,
            r#"etlmesh_stream_messages_total{pipeline="live",outcome="acknowledged"}"#
        ),
        None,
        "nothing is acknowledged:\n{page}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        dead_letters(&scratch).is_empty(),
        "an outage dead-letters nothing"
    );
    let out = worker.output();
    assert!(
        out.contains("error_kind=\"sink_unavailable\"")
            || out.contains("error_kind=sink_unavailable"),
        "the outage is an error kind of its own:\n{out}"
    );
    assert!(
        out.contains("42501"),
        "PostgreSQL's code is in the log:\n{out}"
    );

    db.batch_execute(&format!("GRANT INSERT ON {table} TO {role}"))
        .await
        .expect("grant");
    let rows = wait_rows(&db, &table, 2000, Duration::from_secs(30)).await;
    assert_eq!(rows, 2000, "{}", worker.output());
    let page = metrics_until(&metrics_url, Duration::from_secs(10), |p| {
        metric(p, up) == Some(1.0)
    })
    .await;
    assert_eq!(metric(&page, up), Some(1.0), "{page}");
    assert!(dead_letters(&scratch).is_empty());
    drop(worker);
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP ROLE IF EXISTS {role}"
    ))
    .await
    .expect("drop");
}

/// Publishes lines with mosquitto_pub (QoS 1), one message each.
fn mosquitto_pub(topic: &str, lines: &[String]) {
    mosquitto_pub_to(1883, topic, lines);
}

/// Publishes lines with mosquitto_pub (QoS 1) to the broker on `port`.
fn mosquitto_pub_to(port: u16, topic: &str, lines: &[String]) {
    use std::io::Write as _;
    let port = port.to_string();
    let mut p = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", topic, "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    p.stdin
        .take()
        .expect("stdin")
        .write_all(lines.join("\n").as_bytes())
        .expect("write");
    assert!(p.wait().expect("wait").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_from_the_future_is_a_dead_letter_and_leaves_the_watermark_alone() {
    if !common::service("Mosquitto", "127.0.0.1:1883") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let id = std::process::id();
    let prefix = format!("etlmesh-test-future-{id}");
    scratch.write(
        "s.yaml",
        format!(
            r#"
pipelines:
  per_second:
    source: {{ type: mqtt, broker: "{BROKER}", topic: "{prefix}/{{device_id}}", batch: {{ records: 1000, wait: 50ms }} }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms }}
    window: {{ time: ts, size: 1s, allowed_lateness: 500ms, idle_timeout: 2s }}
    scaling: {{ max_replicas: 1 }}
    transform: SELECT device_id, window_start, count(*) AS n FROM input GROUP BY device_id, window_start
    sinks: [{{ type: ndjson, path: out/rows, roll_interval: 200ms }}]
    dead_letter: {{ type: ndjson, path: out/dead }}
"#
        ),
    );
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    let now = chrono::Utc::now().timestamp_millis();
    let line = |seq: i64, ts: i64| format!(r#"{{"device_id":"d1","seq":{seq},"ts":{ts}}}"#);
    // 50 readings over the last 10 s, then one a year ahead (a device with a bad clock).
    let mut first: Vec<String> = (0..50).map(|i| line(i, now - 10_000 + i * 100)).collect();
    first.push(line(1000, now + 365 * 86_400_000));
    let topic = format!("{prefix}/d1");
    mosquitto_pub(&topic, &first);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // 50 more, on time: with the watermark a year ahead every one would be late.
    let second: Vec<String> = (50..100).map(|i| line(i, now - 10_000 + i * 100)).collect();
    mosquitto_pub(&topic, &second);

    let start = Instant::now();
    let mut total = 0;
    while start.elapsed() < Duration::from_secs(20) {
        total = common::read_ndjson_dir(&scratch.path("out/rows"))
            .iter()
            .map(|r| r["n"].as_i64().unwrap_or(0))
            .sum::<i64>();
        if total >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dead = common::read_ndjson_dir(&scratch.path("out/dead"));
    let stages: Vec<&str> = dead.iter().filter_map(|d| d["stage"].as_str()).collect();
    assert_eq!(stages, vec!["future"], "{dead:?}\n{}", worker.output());
    assert_eq!(seq_of(&dead[0]), Some(1000));
    assert!(
        dead[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("max_future = 5m")),
        "{}",
        dead[0]
    );
    assert_eq!(
        total,
        100,
        "every on-time reading is counted in its window:\n{}",
        worker.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_whose_topic_changed_does_not_receive_its_old_topic() {
    if !common::service("Mosquitto", "127.0.0.1:1883") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let id = std::process::id();
    let yaml = |topic: &str, out: &str| {
        format!(
            r#"
pipelines:
  moving:
    source: {{ type: mqtt, broker: "{BROKER}", topic: "etlmesh-test-move-{id}/{topic}/{{device_id}}/r" }}
    schema: {{ device_id: utf8, seq: int64 }}
    sinks: [{{ type: ndjson, path: {out}, roll_interval: 200ms }}]
    dead_letter: {{ type: ndjson, path: out/dead }}
"#
        )
    };
    scratch.write("s.yaml", yaml("A", "out/a"));
    let mut worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    // The mesh crashes; while it is down, 50 readings go to A.
    worker.signal(nix::sys::signal::Signal::SIGKILL);
    worker.exit_within(Duration::from_secs(5)).await;
    let line = |seq: usize| format!(r#"{{"device_id":"d1","seq":{seq}}}"#);
    let a: Vec<String> = (1..=50).map(line).collect();
    mosquitto_pub(&format!("etlmesh-test-move-{id}/A/d1/r"), &a);
    // The file now says B, into another place.
    scratch.write("s.yaml", yaml("B", "out/b"));
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    let b: Vec<String> = (1001..=1010).map(line).collect();
    mosquitto_pub(&format!("etlmesh-test-move-{id}/B/d1/r"), &b);
    let rows = eventually(Duration::from_secs(15), || {
        let rows = common::read_ndjson_dir(&scratch.path("out/b"));
        (rows.len() >= 10, rows)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = common::read_ndjson_dir(&scratch.path("out/b"))
        .into_iter()
        .chain(rows)
        .collect::<Vec<_>>();
    let seqs: HashSet<i64> = rows.iter().filter_map(|r| r["seq"].as_i64()).collect();
    assert_eq!(
        seqs,
        (1001..=1010).collect::<HashSet<i64>>(),
        "only B's readings reach the changed pipeline:\n{}",
        worker.output()
    );
    assert!(
        worker.output().contains("the pipeline's source changed"),
        "the change is said:\n{}",
        worker.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_three_times_loses_nothing_of_a_single_worker_stream() {
    if !common::service("Mosquitto", "127.0.0.1:1883") || !have_paho() {
        return;
    }
    let _serial = SERIAL.lock().await;
    // As the README asks of Mosquitto: with its stock 1,000 queued messages per offline
    // session, what the publisher flushes after a restart before the worker is back is
    // dropped by the broker (seen here when the machine is busy: 21 of 12,000).
    let mut broker = PrivateBroker::start("max_queued_messages 0\n");
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-restart-{}", std::process::id());
    scratch.write(
        "s.yaml",
        format!(
            r#"
pipelines:
  live:
    source: {{ type: mqtt, broker: "mqtt://127.0.0.1:{port}", topic: "{prefix}/+/reading", batch: {{ records: 1000, wait: 100ms }}, broker_keeps_queued: true }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms }}
    scaling: {{ max_replicas: 1 }}
    sinks: [{{ type: ndjson, path: out/rows, roll_interval: 300ms }}]
    dead_letter: {{ type: ndjson, path: out/dead }}
"#,
            port = broker.port
        ),
    );
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    let port = broker.port.to_string();
    let publisher = paho(&[
        "--port",
        &port,
        "--prefix",
        &prefix,
        "--count",
        "12000",
        "--rate",
        "2000",
        "--client-id",
        &format!("{prefix}-pub"),
    ]);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        broker.down();
        tokio::time::sleep(Duration::from_millis(300)).await;
        broker.up();
    }
    let sent = paho_done(publisher);
    let (keys, repeats) = eventually(Duration::from_secs(60), || {
        let (k, r) = distinct_keys(&common::read_ndjson_dir(&scratch.path("out/rows")));
        (k.len() as u64 >= sent.good, (k, r))
    })
    .await;
    eprintln!(
        "broker restarted 3 times: {} of {} readings, {repeats} repeated",
        keys.len(),
        sent.good
    );
    assert_eq!(keys.len() as u64, sent.good, "{}", worker.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_fills_the_bound_and_memory_stays_bounded() {
    if !services() {
        return;
    }
    let _serial = SERIAL.lock().await;
    // A broker that queues without limit: the stock one drops what passes its queue
    // (1,000 beyond what is in flight) for a consumer slower than its publishers.
    let broker = PrivateBroker::start("max_queued_messages 0\n");
    let scratch = Scratch::new();
    let id = std::process::id();
    let prefix = format!("etlmesh-test-slow-{id}");
    let table = format!("stream_slow_{id}");
    let db = pg::connect(pg::MACHINE_URL).await;
    // Every write takes 2 s: a database under load.
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (device_id text, seq bigint, payload text);
         CREATE OR REPLACE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
         CREATE TRIGGER slow BEFORE INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {table}_slow();"
    ))
    .await
    .expect("setup");
    scratch.write(
        "s.yaml",
        format!(
            r#"
pipelines:
  live:
    source: {{ type: mqtt, broker: "mqtt://127.0.0.1:{port}", topic: "{prefix}/+/reading", batch: {{ records: 5000, wait: 100ms }}, broker_keeps_queued: true }}
    schema: {{ device_id: utf8, seq: int64, payload: utf8 }}
    sinks: [{{ type: postgres, url: "{url}", table: {table} }}]
    dead_letter: {{ type: ndjson, path: out/dead }}
"#,
            url = pg::MACHINE_URL,
            port = broker.port
        ),
    );
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    let pid = worker.pid();
    // 100,000 readings of 1 KiB from paho-mqtt, as fast as it sends them: far more than
    // the sink takes, so the worker fills its bound (65,535 unacknowledged).
    let port = broker.port.to_string();
    let publisher = paho(&[
        "--port",
        &port,
        "--prefix",
        &prefix,
        "--count",
        "100000",
        "--rate",
        "100000",
        "--payload-bytes",
        "1000",
    ]);
    let metrics_url = format!("{}/metrics", worker.url("worker"));
    let mut peak_rss = 0u64;
    let mut peak_held = 0f64;
    let start = Instant::now();
    let mut rows = 0;
    while start.elapsed() < Duration::from_secs(120) {
        peak_rss = peak_rss.max(rss_kib(pid));
        let page = String::from_utf8_lossy(&common::mesh::Http::new().get(&metrics_url).await.body)
            .into_owned();
        peak_held = peak_held
            .max(metric(&page, r#"etlmesh_stream_held_messages{pipeline="live"}"#).unwrap_or(0.0));
        rows = pg::count(&db, &format!("SELECT count(*) FROM {table}")).await;
        if rows >= 100_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sent = paho_done(publisher);
    assert_eq!(sent.acked, 100_000);
    eprintln!(
        "slow sink: {rows} rows, peak held {peak_held}, peak worker RSS {} MiB",
        peak_rss / 1024
    );
    assert_eq!(rows, 100_000, "{}", worker.output());
    assert!(peak_held <= 65_535.0, "held {peak_held}");
    assert!(
        peak_held >= 10_000.0,
        "the bound was reached (the sink was slower than the stream): {peak_held}"
    );
    assert!(
        peak_rss < 600 * 1024,
        "memory stays bounded: {} MiB",
        peak_rss / 1024
    );
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP FUNCTION IF EXISTS {table}_slow()"
    ))
    .await
    .expect("drop");
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
