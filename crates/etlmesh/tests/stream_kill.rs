//! At least once under faults, for every kind of stream sink: a worker killed with
//! kill -9 mid-stream (rolling Parquet files, the MQTT sink, an event-time windowed
//! pipeline), a worker drained with SIGTERM, and a windowed worker stopped with
//! SIGTERM mid-window and started again. Readings come from paho-mqtt at a steady rate
//! through the machine's stock Mosquitto (the Parquet kill test also through the
//! embedded broker, `platform.broker`); what arrived is counted by key.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::Scratch;
use common::mesh::Proc;
use common::pg;
use common::stream::*;
use nix::sys::signal::Signal;

/// These tests publish to the same broker and time themselves; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ready() -> bool {
    services() && have_paho()
}

/// Starts the paho publisher: `count` readings at `rate` to `prefix/<device>/reading`,
/// logged to `log`.
fn publish(prefix: &str, count: u64, rate: u64, log: &std::path::Path) -> std::process::Child {
    publish_to(1883, prefix, count, rate, log)
}

/// The same, to the broker on `port`.
fn publish_to(
    port: u16,
    prefix: &str,
    count: u64,
    rate: u64,
    log: &std::path::Path,
) -> std::process::Child {
    let (count, rate, port) = (count.to_string(), rate.to_string(), port.to_string());
    paho(&[
        "--port",
        &port,
        "--prefix",
        prefix,
        "--count",
        &count,
        "--rate",
        &rate,
        "--devices",
        "20",
        "--log",
        log.to_str().expect("utf-8 path"),
    ])
}

/// A source block for `prefix`, and the readings' schema.
fn source(prefix: &str) -> String {
    source_at(BROKER, prefix, "")
}

/// A source block on `broker`, with `extra` settings.
fn source_at(broker: &str, prefix: &str, extra: &str) -> String {
    format!(
        r#"    source: {{ type: mqtt, broker: "{broker}", topic: "{prefix}/+/reading", batch: {{ records: 1000, wait: 100ms }}{extra} }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms, temperature_c: float64, status: utf8 }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_into_rolling_parquet_files() {
    kill_9_into_parquet(None).await;
}

/// The same through the broker `up` runs itself (`platform.broker`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_through_the_embedded_broker() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    kill_9_into_parquet(Some(port)).await;
}

/// 10,000 readings from paho into rolling Parquet files through two workers, one
/// killed with kill -9 mid-stream: every reading lands. Through the stock Mosquitto,
/// or through the embedded broker on `embedded`.
async fn kill_9_into_parquet(embedded: Option<u16>) {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-k9pq-{}", std::process::id());
    let (platform, source) = match embedded {
        Some(port) => (
            format!("platform:\n  broker: {{ listen: \"127.0.0.1:{port}\" }}\n"),
            source_at(&format!("127.0.0.1:{port}"), &prefix, ""),
        ),
        None => (String::new(), source(&prefix)),
    };
    scratch.write(
        "s.yaml",
        format!(
            "{platform}pipelines:\n  live:\n{source}    sinks: [{{ type: parquet, path: out/rows, roll_interval: 1s }}]\n    dead_letter: {{ type: ndjson, path: out/dead }}\n",
        ),
    );
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml", "--workers", "2"]);
    let admin = up.url("control plane");
    streams_started(&up, 2).await;
    let log = scratch.path("sent.log");
    let publisher = publish_to(embedded.unwrap_or(1883), &prefix, 10_000, 1000, &log);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let victim = up_workers(&admin, 2).await[0].clone();
    signal(victim.1, Signal::SIGKILL);
    eprintln!("killed {victim:?}");
    let sent = paho_done(publisher);
    let want: HashSet<(String, i64)> = sent_log(&log)
        .into_iter()
        .map(|s| (s.device, s.seq))
        .collect();
    assert_eq!(want.len() as u64, sent.good);
    let (keys, repeats) = eventually(Duration::from_secs(60), || {
        let (k, r) = distinct_keys(&parquet_keys(&scratch.path("out/rows")));
        (k.len() >= want.len(), (k, r))
    })
    .await;
    let missing: Vec<_> = want.difference(&keys).take(5).collect();
    eprintln!(
        "parquet ({}): {} distinct keys of {}, {repeats} repeated rows",
        if embedded.is_some() {
            "embedded broker"
        } else {
            "Mosquitto"
        },
        keys.len(),
        want.len()
    );
    assert!(
        missing.is_empty(),
        "missing {} keys, e.g. {missing:?}\n{}",
        want.difference(&keys).count(),
        up.output()
    );
    assert!(
        up.output().contains("restarting"),
        "the killed worker came back"
    );
    if embedded.is_some() {
        let page = common::mesh::Http::new()
            .get(&format!("{admin}/metrics"))
            .await
            .body;
        let page = String::from_utf8_lossy(&page);
        eprintln!(
            "embedded broker: {:?} messages sent again to the restarted worker, {:?} dropped",
            metric(&page, "etlmesh_broker_messages_redelivered_total"),
            metric(&page, "etlmesh_broker_messages_dropped_total"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_through_the_mqtt_sink() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-k9mq-{}", std::process::id());
    scratch.write(
        "s.yaml",
        format!(
            "pipelines:\n  relay:\n{}    transform: SELECT device_id, seq, temperature_c * 9 / 5 + 32 AS temperature_f FROM input\n    sinks: [{{ type: mqtt, broker: \"{BROKER}\", topic: \"{prefix}-out/{{device_id}}\" }}]\n    dead_letter: {{ type: ndjson, path: out/dead }}\n",
            source(&prefix)
        ),
    );
    // A persistent subscriber on the output, started first.
    let mut o = rumqttc::MqttOptions::new(format!("{prefix}-reader"), "127.0.0.1", 1883);
    o.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(15));
    let (client, mut ev) = rumqttc::AsyncClient::new(o, 4096);
    client
        .subscribe(format!("{prefix}-out/+"), rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = e
                && let Ok(v) = serde_json::from_slice(&p.payload)
            {
                sink.lock().expect("lock").push(v);
            }
        }
    });
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml", "--workers", "2"]);
    let admin = up.url("control plane");
    streams_started(&up, 2).await;
    let log = scratch.path("sent.log");
    let publisher = publish(&prefix, 10_000, 1000, &log);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let victim = up_workers(&admin, 2).await[0].clone();
    signal(victim.1, Signal::SIGKILL);
    let sent = paho_done(publisher);
    let want: HashSet<(String, i64)> = sent_log(&log)
        .into_iter()
        .map(|s| (s.device, s.seq))
        .collect();
    assert_eq!(want.len() as u64, sent.good);
    let (keys, repeats) = eventually(Duration::from_secs(60), || {
        let (k, r) = distinct_keys(&got.lock().expect("lock"));
        (k.len() >= want.len(), (k, r))
    })
    .await;
    eprintln!(
        "mqtt sink: {} distinct keys of {}, {repeats} repeated messages",
        keys.len(),
        want.len()
    );
    assert_eq!(
        want.difference(&keys).count(),
        0,
        "every reading was published once at least\n{}",
        up.output()
    );
    let _ = client.disconnect().await;
}

/// (device, window start) → counts of the rows the windows wrote.
fn window_rows(dir: &std::path::Path) -> HashMap<(String, i64), Vec<i64>> {
    let mut m: HashMap<(String, i64), Vec<i64>> = HashMap::new();
    for r in common::read_ndjson_dir(dir) {
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
}

/// A windowed pipeline: per device and second, the count. Its windows hold about
/// 1,200 messages unacknowledged, more than a stock Mosquitto keeps for a session that
/// is offline: it runs against a broker set to keep them all.
fn windowed_yaml(broker: &PrivateBroker, prefix: &str) -> String {
    format!(
        "pipelines:\n  per_second:\n{}    window: {{ time: ts, size: 1s, allowed_lateness: 200ms, idle_timeout: 2s }}\n    scaling: {{ max_replicas: 1 }}\n    transform: SELECT device_id, window_start, count(*) AS n FROM input GROUP BY device_id, window_start\n    sinks: [{{ type: ndjson, path: out/windows, roll_interval: 300ms }}]\n    dead_letter: {{ type: ndjson, path: out/dead }}\n",
        source_at(
            &format!("mqtt://127.0.0.1:{}", broker.port),
            prefix,
            ", broker_keeps_queued: true"
        )
    )
}

/// Checks the windows written against what was sent: each (device, window) with its
/// full count; `exactly_once` also refuses a repeated row. Returns the repeats.
fn check_windows(
    got: &HashMap<(String, i64), Vec<i64>>,
    want: &HashMap<(String, i64), i64>,
    exactly_once: bool,
    output: &str,
) -> usize {
    let mut problems = Vec::new();
    let mut repeats = 0;
    for (k, n) in want {
        match got.get(k) {
            None => problems.push(format!("{k:?}: missing (want {n})")),
            Some(rows) => {
                if rows.iter().any(|r| r != n) {
                    problems.push(format!("{k:?}: rows {rows:?}, want {n}"));
                }
                repeats += rows.len() - 1;
                if exactly_once && rows.len() > 1 {
                    problems.push(format!("{k:?}: {} rows", rows.len()));
                }
            }
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(k)) {
        problems.push(format!("{k:?}: a window nothing was sent to"));
    }
    problems.sort();
    assert!(
        problems.is_empty(),
        "{} of {} windows wrong: {:?}\n{output}",
        problems.len(),
        want.len(),
        &problems[..problems.len().min(10)]
    );
    repeats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_windowed_worker_counts_every_window_in_full() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-k9win-{}", std::process::id());
    let broker = PrivateBroker::start("max_queued_messages 0\n");
    scratch.write("s.yaml", windowed_yaml(&broker, &prefix));
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml"]);
    let admin = up.url("control plane");
    streams_started(&up, 1).await;
    let log = scratch.path("sent.log");
    let publisher = publish_to(broker.port, &prefix, 6000, 1000, &log);
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let victim = up_workers(&admin, 1).await[0].clone();
    signal(victim.1, Signal::SIGKILL);
    paho_done(publisher);
    let want = window_counts(&sent_log(&log), 1000);
    let got = eventually(Duration::from_secs(40), || {
        let g = window_rows(&scratch.path("out/windows"));
        (want.keys().all(|k| g.contains_key(k)), g)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = window_rows(&scratch.path("out/windows"))
        .into_iter()
        .chain(got)
        .collect();
    let repeats = check_windows(&got, &want, false, &up.output());
    eprintln!(
        "windows after kill -9: {} windows, {repeats} written twice (whole)",
        want.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_window_then_a_restart_writes_every_window_once_in_full() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-termwin-{}", std::process::id());
    let broker = PrivateBroker::start("max_queued_messages 0\n");
    scratch.write("s.yaml", windowed_yaml(&broker, &prefix));
    let mut worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    let log = scratch.path("sent.log");
    let publisher = publish_to(broker.port, &prefix, 5000, 1000, &log);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Drain (as a scale-down or a rolling update does), then come back.
    worker.signal(Signal::SIGTERM);
    worker.exit_within(Duration::from_secs(20)).await;
    let first = worker.output();
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    paho_done(publisher);
    let want = window_counts(&sent_log(&log), 1000);
    eventually(Duration::from_secs(40), || {
        let g = window_rows(&scratch.path("out/windows"));
        (want.keys().all(|k| g.contains_key(k)), ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = window_rows(&scratch.path("out/windows"));
    let output = format!("{first}\n--- restarted ---\n{}", worker.output());
    assert!(
        first.contains("stopping with the messages of open windows unacknowledged"),
        "the drain left the open windows to the broker:\n{first}"
    );
    check_windows(&got, &want, true, &output);
    assert!(
        common::read_ndjson_dir(&scratch.path("out/dead")).is_empty(),
        "nothing late or dead-lettered:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_stream_worker_and_loses_nothing() {
    if !ready() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let id = std::process::id();
    let prefix = format!("etlmesh-test-drain-{id}");
    let table = format!("stream_drain_{id}");
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
    scratch.write("s.yaml", stream_yaml(&prefix, pg::MACHINE_URL, &table, ""));
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml", "--workers", "2"]);
    let admin = up.url("control plane");
    streams_started(&up, 2).await;
    let log = scratch.path("sent.log");
    let publisher = publish(&prefix, 10_000, 1000, &log);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let victim = up_workers(&admin, 2).await[0].clone();
    signal(victim.1, Signal::SIGTERM);
    let sent = paho_done(publisher);
    let rows = wait_rows(&db, &table, sent.good as i64, Duration::from_secs(60)).await;
    let distinct = pg::count(
        &db,
        &format!("SELECT count(DISTINCT (device_id, seq)) FROM {table}"),
    )
    .await;
    assert_eq!(
        (distinct, rows),
        (sent.good as i64, sent.good as i64),
        "{}",
        up.output()
    );
    let out = up.output();
    assert!(
        out.contains("stream draining") && out.contains("leave=true"),
        "the drained worker left the group:\n{out}"
    );
    let started = Instant::now();
    while up.output().matches("stream started").count() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            up.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
}
