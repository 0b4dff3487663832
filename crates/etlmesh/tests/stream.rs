//! End-to-end tests of streams against the machine's Mosquitto and PostgreSQL:
//! at-least-once through a kill -9, a database that goes away for 10 s, and event-time
//! windows with late readings checked against SQL run by PostgreSQL itself.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::Scratch;
use common::mesh::{Http, Proc};
use common::pg::{self, TempPostgres};
use common::stream::*;

/// These tests publish to the same broker and time themselves; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_messages_through_two_workers_survive_a_kill_9() {
    if !services() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-kill-{}", std::process::id());
    let table = format!("stream_kill_{}", std::process::id());
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
    scratch.write("s.yaml", stream_yaml(&prefix, pg::MACHINE_URL, &table, ""));
    let up = Proc::up(scratch.dir.path(), &["-c", "s.yaml", "--workers", "2"]);
    let admin = up.url("control plane");
    let http = Http::new();
    // Both workers subscribed before the first message.
    streams_started(&up, 2).await;

    const COUNT: u64 = 100_000;
    let sim = simulate(
        scratch.dir.path(),
        &prefix,
        COUNT,
        2500,
        &["--malformed", "0.001", "--late", "0", "--seed", "5"],
    );
    // Kill one worker in the middle: past the scaler's healthy run (10 s), so that it
    // comes back at once.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let workers = http.get(&format!("{admin}/api/v1/workers")).await.json();
    let victim = workers
        .as_array()
        .and_then(|a| a.first())
        .map(|w| {
            (
                w["id"].as_str().unwrap_or("").to_string(),
                w["pid"].as_u64().unwrap_or(0),
            )
        })
        .expect("a worker");
    assert!(victim.1 > 0, "{workers}");
    let before = pg::count(&db, &format!("SELECT count(*) FROM {table}")).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.1 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    eprintln!(
        "killed {} (pid {}) with {before} rows loaded",
        victim.0, victim.1
    );
    let summary = finish(sim);
    let malformed = figure(&summary, "malformed");
    let want = (COUNT - malformed) as i64;
    let rows = wait_rows(&db, &table, want, Duration::from_secs(60)).await;
    let distinct = pg::count(
        &db,
        &format!("SELECT count(DISTINCT (device_id, seq)) FROM {table}"),
    )
    .await;
    let dead = dead_letters(&scratch);
    let bad = distinct_raw(&dead, &["decode", "cast"]);
    eprintln!(
        "{summary}\nrows {rows}, distinct keys {distinct}, malformed {malformed}, dead letters {} ({bad} distinct)",
        dead.len()
    );
    assert!(
        before > 0 && before < want,
        "the kill came in the middle: {before} of {want}"
    );
    assert_eq!(
        distinct,
        want,
        "every well-formed message is in the table once its key:\n{}",
        up.output()
    );
    assert_eq!(rows, want, "with dedup, each key once");
    assert_eq!(
        bad as u64, malformed,
        "every malformed message is a dead letter"
    );
    assert_eq!(distinct as u64 + bad as u64, COUNT, "the counts add up");
    assert!(
        up.output().contains(&format!("worker={}", victim.0)) && up.output().contains("restarting"),
        "the killed worker was restarted:\n{}",
        up.output()
    );
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_ten_seconds_loses_nothing() {
    if !services() {
        return;
    }
    let Some(db_server) = TempPostgres::start() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-pgdown-{}", std::process::id());
    scratch.write(
        "s.yaml",
        stream_yaml(&prefix, &db_server.url(), "readings", ""),
    );
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    const COUNT: u64 = 20_000;
    let sim = simulate(
        scratch.dir.path(),
        &prefix,
        COUNT,
        1000,
        &["--malformed", "0", "--late", "0"],
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    db_server.down();
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    db_server.up();
    eprintln!("PostgreSQL was down {:?}", down_at.elapsed());
    let summary = finish(sim);
    let db = pg::connect(&db_server.url()).await;
    let rows = wait_rows(&db, "readings", COUNT as i64, Duration::from_secs(60)).await;
    let distinct = pg::count(&db, "SELECT count(DISTINCT (device_id, seq)) FROM readings").await;
    assert_eq!(
        (rows, distinct),
        (COUNT as i64, COUNT as i64),
        "{summary}\n{}",
        worker.output()
    );
    let out = worker.output();
    assert!(
        out.contains("sink unavailable: holding the batch"),
        "the outage was seen:\n{out}"
    );
    assert!(
        dead_letters(&scratch).is_empty(),
        "nothing was dead-lettered"
    );
}

/// Per device and 2-second window: count, sum and max, from the worker's windows and
/// from PostgreSQL over the raw rows less the late ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_readings_are_dead_lettered_and_windows_match_sql_over_the_raw_rows() {
    if !services() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let id = std::process::id();
    let prefix = format!("etlmesh-test-window-{id}");
    let (raw, agg) = (format!("window_raw_{id}"), format!("window_agg_{id}"));
    let db = pg::connect(pg::MACHINE_URL).await;
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {raw}; DROP TABLE IF EXISTS {agg}"
    ))
    .await
    .expect("drop");
    let windowed = format!(
        r#"  per_device:
    source:
      type: mqtt
      broker: {BROKER}
      topic: {prefix}/+/reading
      batch: {{ records: 1000, wait: 100ms }}
    schema: *readings
    window: {{ time: ts, size: 2s, allowed_lateness: 1s, idle_timeout: 3s }}
    scaling: {{ max_replicas: 1 }}
    transform: |
      SELECT device_id, window_start, window_end,
             count(*) AS readings, sum(temperature_c) AS sum_t, max(humidity) AS max_h
      FROM input GROUP BY device_id, window_start, window_end
    sinks:
      - {{ type: postgres, url: "{url}", table: {agg}, create: true, key: [device_id, window_start] }}
    dead_letter: {{ type: ndjson, path: out/dead_windows }}
"#,
        url = pg::MACHINE_URL
    );
    scratch.write(
        "s.yaml",
        stream_yaml(&prefix, pg::MACHINE_URL, &raw, &windowed),
    );
    let worker = start_worker(&scratch);
    let metrics_url = format!("{}/metrics", worker.url("worker"));
    streams_started(&worker, 2).await;
    const COUNT: u64 = 8000;
    let sim = simulate(
        scratch.dir.path(),
        &prefix,
        COUNT,
        1000,
        &[
            "--malformed",
            "0",
            "--late",
            "0.02",
            "--late-by",
            "20s",
            "--out-of-order",
            "0.05",
            "--disorder",
            "800ms",
        ],
    );
    let summary = finish(sim);
    let late_sent = figure(&summary, "late");
    assert_eq!(
        wait_rows(&db, &raw, COUNT as i64, Duration::from_secs(60)).await,
        COUNT as i64
    );
    // The idle timeout closes the last windows.
    let http = Http::new();
    let start = Instant::now();
    let metrics = loop {
        let m = http.get(&metrics_url).await.body;
        let text = String::from_utf8_lossy(&m).into_owned();
        if text.contains(r#"etlmesh_stream_open_windows{pipeline="per_device"} 0"#)
            && text.contains(r#"etlmesh_stream_held_messages{pipeline="per_device"} 0"#)
        {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "windows stay open:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Late readings: dead letters, counted, none in the aggregates.
    let late: Vec<(String, i64)> = common::read_ndjson_dir(&scratch.path("out/dead_windows"))
        .iter()
        .filter(|d| d["stage"] == "late")
        .filter_map(|d| {
            let raw: serde_json::Value = serde_json::from_str(d["raw"].as_str()?).ok()?;
            Some((raw["device_id"].as_str()?.to_string(), raw["seq"].as_i64()?))
        })
        .collect();
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with(r#"etlmesh_stream_records_total{pipeline="per_device",outcome="late"}"#)
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    eprintln!(
        "{summary}\nlate: {} dead letters, {counted} counted, {late_sent} sent 20 s late",
        late.len()
    );
    // The simulator's own count bounds the worker's from both sides: a few readings
    // sent late still find their window open (lower slack), but no reading sent on
    // time is ever called late — so the reference below, which leaves out the keys the
    // worker called late, leaves out only readings that were sent late.
    assert!(
        late.len() as u64 >= late_sent.saturating_sub(5)
            && late.len() as u64 <= late_sent
            && !late.is_empty(),
        "{} called late of {late_sent} sent late\n{summary}",
        late.len()
    );
    assert_eq!(counted, late.len() as u64);

    db.batch_execute("CREATE TEMP TABLE late_keys (device_id text, seq bigint)")
        .await
        .expect("temp");
    for (d, s) in &late {
        db.execute("INSERT INTO late_keys VALUES ($1, $2)", &[d, s])
            .await
            .expect("insert");
    }
    let reference = db
        .query(
            &format!(
                "SELECT device_id, to_timestamp(floor(extract(epoch FROM ts) / 2) * 2) AS w,
                        count(*), sum(temperature_c), max(humidity)
                 FROM {raw} r
                 WHERE NOT EXISTS (SELECT 1 FROM late_keys l WHERE l.device_id = r.device_id AND l.seq = r.seq)
                 GROUP BY 1, 2"
            ),
            &[],
        )
        .await
        .expect("reference");
    let got = db
        .query(
            &format!("SELECT device_id, window_start, readings, sum_t, max_h FROM {agg}"),
            &[],
        )
        .await
        .expect("aggregates");
    type Key = (String, i64);
    let rows = |rs: &[tokio_postgres::Row]| -> HashMap<Key, (i64, f64, f64)> {
        rs.iter()
            .map(|r| {
                let w: chrono::DateTime<chrono::Utc> = r.get(1);
                (
                    (r.get(0), w.timestamp_millis()),
                    (r.get(2), r.get(3), r.get(4)),
                )
            })
            .collect()
    };
    let (want, have) = (rows(&reference), rows(&got));
    assert_eq!(
        want.len(),
        have.len(),
        "windows: {} by SQL, {} by the stream",
        want.len(),
        have.len()
    );
    for (k, (n, s, m)) in &want {
        let (gn, gs, gm) = have
            .get(k)
            .unwrap_or_else(|| panic!("window {k:?} missing"));
        assert_eq!(n, gn, "{k:?}");
        assert!(
            (s - gs).abs() < 1e-6 * s.abs().max(1.0) && (m - gm).abs() < 1e-9,
            "{k:?}: {s} {m} vs {gs} {gm}"
        );
    }
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {raw}; DROP TABLE IF EXISTS {agg}"
    ))
    .await
    .expect("drop");
}

/// Rows published back to MQTT: one JSON object per row, on a topic built from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_published_to_an_mqtt_topic_built_from_each_row() {
    if !common::service("Mosquitto", "127.0.0.1:1883") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let scratch = Scratch::new();
    let prefix = format!("etlmesh-test-out-{}", std::process::id());
    scratch.write(
        "s.yaml",
        format!(
            r#"
pipelines:
  fahrenheit:
    source: {{ type: mqtt, broker: "{BROKER}", topic: "{prefix}/in/{{device_id}}" }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms, temperature_c: float64 }}
    transform: SELECT device_id, seq, temperature_c * 9 / 5 + 32 AS temperature_f FROM input
    sinks:
      - {{ type: mqtt, broker: "{BROKER}", topic: "{prefix}/out/{{device_id}}" }}
    dead_letter: {{ type: ndjson, path: out/dead }}
"#
        ),
    );
    // Listen on the output topic first.
    let mut o = rumqttc::MqttOptions::new(
        format!("etlmesh-test-out-{}", std::process::id()),
        "127.0.0.1",
        1883,
    );
    o.set_keep_alive(Duration::from_secs(15));
    let (client, mut ev) = rumqttc::AsyncClient::new(o, 1024);
    client
        .subscribe(format!("{prefix}/out/+"), rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = std::sync::Arc::new(std::sync::Mutex::new(
        Vec::<(String, serde_json::Value)>::new(),
    ));
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = e
                && let Ok(v) = serde_json::from_slice(&p.payload)
            {
                sink.lock().expect("lock").push((p.topic.clone(), v));
            }
        }
    });
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    let topic = format!("{prefix}/in/{{device_id}}");
    let sim = std::process::Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args([
            "simulate",
            "--broker",
            BROKER,
            "--topic",
            &topic,
            "--count",
            "500",
            "--rate",
            "1000",
            "--malformed",
            "0",
        ])
        .output()
        .expect("simulate");
    assert!(sim.status.success());
    let start = Instant::now();
    while got.lock().expect("lock").len() < 500 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = got.lock().expect("lock").clone();
    assert_eq!(got.len(), 500, "{}", worker.output());
    for (topic, v) in &got {
        let device = v["device_id"].as_str().expect("device_id");
        assert_eq!(topic, &format!("{prefix}/out/{device}"));
        assert!(v["temperature_f"].is_number(), "{v}");
    }
    let keys: HashSet<(String, i64)> = got
        .iter()
        .map(|(_, v)| {
            (
                v["device_id"].as_str().unwrap_or("").to_string(),
                v["seq"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(keys.len(), 500);
}

/// A private Mosquitto with a TLS listener, its certificate signed by a CA made here.
struct TlsBroker {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl TlsBroker {
    fn start() -> Option<Self> {
        if !common::have_programs(&[
            ("openssl", "version"),
            ("mosquitto", "-h"),
            ("mosquitto_pub", "--help"),
        ]) {
            return None;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=etlmesh test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!("user root\nlistener {port} 127.0.0.1\nallow_anonymous true\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n"),
        )
        .expect("conf");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(dir.path().join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto (TLS) did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self { dir, port, child })
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_subscribes_over_tls_with_mqtt_3_1_1() {
    let Some(broker) = TlsBroker::start() else {
        return;
    };
    let scratch = Scratch::new();
    let ca = broker.dir.path().join("ca.pem");
    scratch.write(
        "s.yaml",
        format!(
            r#"
pipelines:
  secure:
    source: {{ type: mqtt, broker: "mqtts://127.0.0.1:{port}", ca_file: "{ca}", topic: "tls/+", protocol: 3.1.1 }}
    schema: {{ device_id: utf8, seq: int64 }}
    sinks: [{{ type: ndjson, path: out/rows, roll_interval: 200ms }}]
    dead_letter: {{ type: ndjson, path: out/dead }}
"#,
            port = broker.port,
            ca = ca.display()
        ),
    );
    let worker = start_worker(&scratch);
    streams_started(&worker, 1).await;
    let lines: String = (1..=100)
        .map(|i| format!("{{\"device_id\":\"d1\",\"seq\":{i}}}\n"))
        .collect();
    let mut publish = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "--cafile",
        ])
        .arg(&ca)
        .args(["-t", "tls/d1", "-q", "1", "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    use std::io::Write as _;
    publish
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write");
    assert!(publish.wait().expect("wait").success());
    let start = Instant::now();
    let mut rows = Vec::new();
    while rows.len() < 100 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rows = common::read_ndjson_dir(&scratch.path("out/rows"));
    }
    assert_eq!(rows.len(), 100, "{}", worker.output());
}
