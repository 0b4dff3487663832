//! End to end: file sinks on object storage, against a real S3-API server (moto's,
//! from PyPI) and read back with a client that is not ours (boto3, DuckDB).
//!
//! - A batch job writes Hive-partitioned Parquet to `s3://…` with the credentials from
//!   the environment; every row is in the bucket, nothing hidden or half-written is,
//!   the staging directory is left empty, and `/v1/query` reads the dataset from the
//!   bucket with the same answers as DuckDB on the downloaded objects.
//! - A kill -9 in the middle of a multipart upload leaves no object; the run again
//!   writes it whole.
//! - A stream whose bucket goes away holds its messages (nothing acknowledged, nothing
//!   dead-lettered) and loads every one once the bucket is back.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::mesh::{Http, Proc};
use common::s3::{self, Moto};
use common::stream::{have_paho, paho, paho_done, streams_started};
use common::{Scratch, text};
use http::{Method, StatusCode};

const SCHEMA: &str = r#"
    schema:
      device_id: { type: utf8, nullable: false }
      ts: { type: timestamp_ms, nullable: false }
      temperature_c: float64
      humidity: float64
      battery_v: float64
      status: utf8"#;

/// The credentials as AWS's tools take them, for a process that reads them from its
/// environment (moto takes any).
fn aws_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
    ]
}

/// `etlmesh run` with the credentials in the environment.
fn run(s: &Scratch, config: &str, input: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args([
            "run",
            "-c",
            config,
            "--pipeline",
            "clean",
            "--progress",
            "off",
            "--summary-json",
            "summary.json",
            input,
        ])
        .envs(aws_env())
        .env("ETLMESH_LOG_FORMAT", "text")
        .current_dir(s.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("etlmesh runs")
}

fn generate(s: &Scratch, rows: u64, file: &str) {
    let out = s.etlmesh(&[
        "generate",
        "--rows",
        &rows.to_string(),
        "--seed",
        "11",
        "-o",
        file,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    if !dir.exists() {
        return Vec::new();
    }
    common::files(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_job_loads_the_bucket_and_queries_read_it_from_there() {
    if !s3::available() {
        return;
    }
    let moto = Moto::start();
    moto.bucket("lake");
    let s = Scratch::new();
    // Endpoint and staging from the file, credentials from the environment.
    s.write(
        "p.yaml",
        format!(
            r#"
platform:
  query: {{ max_rows: 5000, timeout: 20s }}
pipelines:
  clean:{SCHEMA}
    transform: SELECT * FROM input WHERE temperature_c BETWEEN -50 AND 150
    sinks:
      - type: parquet
        path: s3://lake/readings/clean
        partition_by: [status]
        s3: {{ endpoint: "{e}", allow_http: true, staging: stage }}
    dead_letter: {{ type: ndjson, path: s3://lake/dead, s3: {{ endpoint: "{e}", allow_http: true, staging: stage-dead }} }}
"#,
            e = moto.endpoint()
        ),
    );
    generate(&s, 20_000, "readings.csv");
    let out = run(&s, "p.yaml", "readings.csv")
        .wait_with_output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.path("summary.json")).expect("summary"))
            .expect("json");
    let written = common::n(&summary["records_out"]);
    assert!(written > 19_000, "{summary}");

    // What a stranger sees in the bucket: Hive partitions, only finished Parquet files.
    let keys = moto.keys("lake", "readings/clean/");
    assert!(!keys.is_empty(), "nothing uploaded");
    for k in &keys {
        let name = k.rsplit('/').next().unwrap_or_default();
        assert!(
            k.starts_with("readings/clean/status=")
                && name.starts_with("part-")
                && name.ends_with(".parquet"),
            "{k} is not a finished partition file: {keys:?}"
        );
    }
    let theirs = moto.client(&["rows", "lake", "readings/clean"]);
    assert_eq!(theirs["rows"].as_u64(), Some(written), "{theirs}");
    let warn = moto.client(&["rows", "lake", "readings/clean/status=warn"]);
    assert!(warn["rows"].as_u64().unwrap_or(0) > 0, "{warn}");
    assert_eq!(
        files_under(&s.path("stage")),
        Vec::<String>::new(),
        "the staging directory keeps nothing after the commit"
    );
    // The run's dead letters: one object, a line per bad record.
    let dead = moto.client(&["lines", "lake", "dead/"]);
    assert_eq!(dead["files"], 1, "{dead}");
    assert_eq!(dead["lines"], summary["dead_lettered"], "{dead} {summary}");
    assert!(common::n(&summary["dead_lettered"]) > 0, "{summary}");

    // The analytics service reads the same dataset from the bucket.
    let gw = Proc::start_env(
        s.dir.path(),
        &[
            "gateway",
            "-c",
            "p.yaml",
            "--listen",
            "127.0.0.1:0",
            "--flight",
            "off",
            "--control-plane",
            "http://127.0.0.1:9",
        ],
        &aws_env(),
    );
    let url = gw.url("gateway");
    let http = Http::new();
    let ds = http.get(&format!("{url}/v1/datasets")).await.json();
    assert_eq!(ds[0]["name"], "clean", "{ds}");
    assert_eq!(ds[0]["path"], "s3://lake/readings/clean", "{ds}");
    let ask = |sql: &str| {
        let body = Bytes::from(serde_json::json!({ "sql": sql }).to_string());
        let http = &http;
        let url = &url;
        async move {
            http.send(
                Method::POST,
                &format!("{url}/v1/query"),
                &[
                    ("content-type", "application/json"),
                    ("accept", "application/json"),
                ],
                body,
            )
            .await
            .expect("query answers")
        }
    };
    let all = ask("SELECT count(*) AS n FROM clean").await;
    assert_eq!(all.status, StatusCode::OK, "{}", text(&all.body));
    assert_eq!(all.json()[0]["n"].as_u64(), Some(written));
    // A filter on the partition column: the rows of that prefix, as DuckDB counts them.
    let w =
        ask("SELECT count(*) AS n, count(DISTINCT status) AS s FROM clean WHERE status = 'warn'")
            .await;
    assert_eq!(w.status, StatusCode::OK, "{}", text(&w.body));
    assert_eq!(
        w.json()[0]["n"].as_u64(),
        warn["rows"].as_u64(),
        "{}",
        text(&w.body)
    );
    assert_eq!(w.json()[0]["s"].as_u64(), Some(1));

    // Pruning: a partition holding an object that is not Parquet breaks any query that
    // reads it; one filtered to another partition never lists it.
    moto.client(&[
        "put",
        "lake",
        "readings/clean/status=zzz/part-bad.parquet",
        "not parquet",
    ]);
    let pruned = ask("SELECT count(*) AS n FROM clean WHERE status = 'warn'").await;
    assert_eq!(pruned.status, StatusCode::OK, "{}", text(&pruned.body));
    assert_eq!(pruned.json()[0]["n"].as_u64(), warn["rows"].as_u64());
    let unpruned = ask("SELECT count(*) AS n FROM clean").await;
    assert_ne!(
        unpruned.status,
        StatusCode::OK,
        "reading every partition reads the bad object: {}",
        text(&unpruned.body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_an_upload_leaves_no_object_and_the_run_again_writes_it_whole() {
    if !s3::available() {
        return;
    }
    let moto = Moto::start();
    moto.bucket("lake");
    let s = Scratch::new();
    // One CSV file of ~100 MB: uploaded in parts of 8 MiB.
    s.write(
        "p.yaml",
        format!(
            r#"
pipelines:
  clean:{SCHEMA}
    sinks:
      - {{ type: csv, path: s3://lake/big, s3: {} }}
    dead_letter: {{ type: ndjson, path: out/dead }}
"#,
            moto.sink_settings()
        ),
    );
    generate(&s, 1_200_000, "readings.csv");
    let child = run(&s, "p.yaml", "readings.csv");
    // boto3 watches the bucket's unfinished uploads and kills the run (-9) as soon as
    // one exists: in the middle of the commit's multipart upload.
    let watched = moto.client(&["kill-during-upload", "lake", &child.id().to_string(), "600"]);
    let out = child.wait_with_output().expect("run ends");
    assert_eq!(
        watched["killed"],
        true,
        "no upload began: {watched}\n{}",
        text(&out.stderr)
    );
    assert!(!out.status.success(), "the run was killed");
    let keys = moto.keys("lake", "big/");
    assert!(
        keys.is_empty(),
        "an upload killed half-way is never visible: {keys:?} ({watched})"
    );
    let unfinished = moto.client(&["uploads", "lake"]);
    assert!(
        unfinished.as_array().is_some_and(|u| !u.is_empty()),
        "the kill came after the upload completed; nothing was proven: {unfinished}"
    );

    // The job again: whole objects (one per writer thread) with every row.
    let out = run(&s, "p.yaml", "readings.csv")
        .wait_with_output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.path("summary.json")).expect("summary"))
            .expect("json");
    let keys = moto.keys("lake", "big/");
    assert!(
        !keys.is_empty()
            && keys
                .iter()
                .all(|k| k.starts_with("big/part-") && k.ends_with(".csv")),
        "{keys:?}"
    );
    let theirs = moto.client(&["rows", "lake", "big"]);
    assert_eq!(theirs["rows"], summary["records_out"], "{theirs} {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_messages_while_the_bucket_is_away() {
    if !s3::available() || !common::service("Mosquitto", "127.0.0.1:1883") || !have_paho() {
        return;
    }
    let mut moto = Moto::start();
    moto.bucket("lake");
    let s = Scratch::new();
    let id = std::process::id();
    let prefix = format!("etlmesh-test-s3-{id}");
    s.write(
        "s.yaml",
        format!(
            r#"
pipelines:
  live:
    source:
      type: mqtt
      broker: mqtt://127.0.0.1:1883
      topic: {prefix}/+/reading
      batch: {{ records: 2000, wait: 100ms }}
    schema:
      device_id: {{ type: utf8, nullable: false }}
      seq: {{ type: int64, nullable: false }}
      ts: {{ type: timestamp_ms, nullable: false }}
      temperature_c: float64
      status: utf8
    sinks:
      - {{ type: parquet, path: s3://lake/live, roll_interval: 1s, s3: {s} }}
    dead_letter: {{ type: ndjson, path: s3://lake/dead, max_size: 4KiB, s3: {s} }}
"#,
            s = moto.sink_settings()
        ),
    );
    let worker = common::stream::start_worker(&s);
    streams_started(&worker, 1).await;
    let publish = |client: &str| {
        paho_done(paho(&[
            "--prefix",
            &prefix,
            "--count",
            "3000",
            "--rate",
            "3000",
            "--devices",
            "20",
            "--client-id",
            client,
        ]))
    };
    let distinct = |moto: &Moto| -> usize {
        moto.client(&["rows", "lake", "live", "device_id,seq"])["keys"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let until = |what: &str, within: Duration, mut ok: Box<dyn FnMut() -> bool + '_>| {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < within,
                "{what} within {within:?}:\n{}",
                worker.output()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };

    let first = publish(&format!("paho-s3a-{id}"));
    assert_eq!(first.good, 3000, "{first:?}");
    until(
        "the first 3,000 readings in the bucket",
        Duration::from_secs(60),
        Box::new(|| distinct(&moto) == 3000),
    );

    // Messages that are not readings: dead letters, whose log rotates past 4 KiB and
    // whose rotated files go to the bucket.
    for i in 0..40 {
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-q",
                "1",
                "-t",
                &format!("{prefix}/bad/reading"),
                "-m",
            ])
            .arg(format!("not json {i} {}", "x".repeat(100)))
            .output()
            .expect("mosquitto_pub runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    until(
        "rotated dead letters in the bucket",
        Duration::from_secs(60),
        Box::new(|| !moto.keys("lake", "dead/").is_empty()),
    );
    let dead = moto.keys("lake", "dead/");
    assert!(
        dead.iter()
            .all(|k| k.starts_with("dead/dead-live-w1.") && k.ends_with(".ndjson")),
        "{dead:?}"
    );

    // The bucket goes away (its server killed): the next readings are held.
    moto.down();
    let second = publish(&format!("paho-s3b-{id}"));
    assert_eq!(second.good, 3000, "{second:?}");
    until(
        "the worker holding its messages",
        Duration::from_secs(60),
        Box::new(|| {
            let out = worker.output();
            out.contains("sink unavailable: holding the batch") || out.contains("sink flush failed")
        }),
    );
    std::thread::sleep(Duration::from_secs(3));

    // Back (empty: moto keeps buckets in memory): every held reading is loaded.
    moto.up();
    moto.bucket("lake");
    until(
        "the 3,000 held readings in the bucket",
        Duration::from_secs(90),
        Box::new(|| distinct(&moto) == 3000),
    );
    // Only the 40 messages that were not readings were dead-lettered: none of the held.
    let page = Http::new()
        .get(&format!("{}/metrics", worker.url("worker")))
        .await
        .body;
    let page = String::from_utf8_lossy(&page).into_owned();
    let dead_lettered = page
        .lines()
        .find(|l| {
            l.starts_with("etlmesh_stream_records_total")
                && l.contains(r#"outcome="dead_lettered""#)
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(dead_lettered, Some(40.0), "{page}");
    let dead_letters = worker.output().matches("dead letters rotated").count();
    assert!(dead_letters >= 1, "{}", worker.output());
    assert!(
        !worker.output().contains("dead_letters_dropped"),
        "nothing was dropped"
    );
    let keys = moto.keys("lake", "live/");
    assert!(
        keys.iter()
            .all(|k| k.ends_with(".parquet") && !k.contains("/.")),
        "{keys:?}"
    );
}
