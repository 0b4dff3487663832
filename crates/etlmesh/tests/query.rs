//! End to end: the analytics service. A batch job writes readings as Parquet
//! partitioned by status; a gateway started with the pipeline file answers
//! `POST /v1/query` as DuckDB does on the same files, prunes partitions, refuses
//! anything but a query and any file outside the datasets, reads a PostgreSQL table
//! read-only, and `etlmesh query` prints the answers.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::mesh::{Http, Proc};
use common::{Scratch, text};
use http::{Method, StatusCode};

const YAML: &str = r#"
platform:
  batch_size: 4096
  query: { max_rows: 5000, timeout: 20s }
pipelines:
  clean:
    schema:
      device_id: { type: utf8, nullable: false }
      ts: { type: timestamp_ms, nullable: false }
      temperature_c: float64
      humidity: float64
      battery_v: float64
      status: utf8
    transform: |
      SELECT device_id, ts, temperature_c, humidity, battery_v, status
      FROM input WHERE temperature_c BETWEEN -50 AND 150
    sinks:
      - { type: parquet, path: out/clean, partition_by: [status] }
    dead_letter: { type: ndjson, path: out/dead }
  live:
    source: { type: mqtt, broker: "mqtt://127.0.0.1:1883", topic: "q/{device_id}" }
    schema: { device_id: utf8, n: int64 }
    sinks:
      - { type: postgres, url: "postgres://postgres@127.0.0.1:5432/test", table: TABLE }
    dead_letter: { type: ndjson, path: out/dead }
"#;

/// The queries compared with DuckDB: aggregates, filters on data and partition
/// columns, a CTE, ORDER BY with LIMIT.
const QUERIES: &[&str] = &[
    "SELECT status, count(*) AS n, sum(temperature_c) AS s, min(humidity) AS lo, max(battery_v) AS hi FROM clean GROUP BY status ORDER BY status",
    "SELECT device_id, count(*) AS n, avg(temperature_c) AS t FROM clean WHERE status = 'ok' AND humidity > 50 GROUP BY device_id ORDER BY n DESC, device_id LIMIT 20",
    "SELECT date_part('hour', ts) AS hour, count(*) AS n, avg(humidity) AS h FROM clean GROUP BY 1 ORDER BY 1",
    "WITH d AS (SELECT device_id, max(temperature_c) AS m FROM clean GROUP BY device_id) SELECT count(*) AS devices, min(m) AS lo, max(m) AS hi FROM d",
    "SELECT device_id, status, temperature_c FROM clean WHERE humidity > 0 ORDER BY temperature_c DESC, device_id, status LIMIT 10",
    "SELECT count(*) AS n, count(DISTINCT device_id) AS devices FROM clean WHERE status IN ('warn', 'ok') AND battery_v < 3.5",
];

fn duckdb_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import duckdb"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "DuckDB (pip install duckdb) is required in CI: .ci/run installs it"
        );
        eprintln!(
            "skipped the DuckDB comparison: python3 cannot import duckdb (pip install duckdb)"
        );
    }
    ok
}

/// DuckDB's rows for each query.
fn duckdb(dir: &std::path::Path, queries: &[&str]) -> Vec<Vec<Vec<serde_json::Value>>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/duckdb_query.py");
    let req = serde_json::json!({
        "views": { "clean": dir.join("out/clean").display().to_string() },
        "queries": queries,
    });
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(req.to_string().as_bytes()).expect("write");
    }
    let out = child.wait_with_output().expect("duckdb runs");
    assert!(out.status.success(), "duckdb: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("duckdb json")
}

/// CSV cells as they come.
fn csv_rows(body: &[u8]) -> Vec<Vec<String>> {
    text(body)
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn same(ours: &str, theirs: &serde_json::Value) -> bool {
    match theirs {
        serde_json::Value::Null => ours.is_empty(),
        serde_json::Value::Number(n) => {
            let (a, b) = (
                ours.parse::<f64>().unwrap_or(f64::NAN),
                n.as_f64().unwrap_or(f64::NAN),
            );
            a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
        }
        serde_json::Value::String(s) => ours == s,
        other => *other == serde_json::Value::String(ours.to_string()),
    }
}

async fn query(
    http: &Http,
    gw: &str,
    body: serde_json::Value,
    accept: &str,
) -> common::mesh::Answer {
    http.send(
        Method::POST,
        &format!("{gw}/v1/query"),
        &[("content-type", "application/json"), ("accept", accept)],
        Bytes::from(body.to_string()),
    )
    .await
    .expect("query answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_as_duckdb_and_read_only_the_datasets() {
    let s = Scratch::new();
    let table = format!("etlmesh_query_{}", std::process::id());
    s.write("p.yaml", YAML.replace("TABLE", &table));
    let out = s.etlmesh(&[
        "generate",
        "--rows",
        "20000",
        "--seed",
        "7",
        "-o",
        "readings.csv",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = s.run_ok("p.yaml", "clean", &["readings.csv"]);
    let written = common::n(&summary["records_out"]);
    assert!(written > 19_000, "{summary}");

    let gw = Proc::start(
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
    );
    let url = gw.url("gateway");
    let http = Http::new();

    // The datasets: the Parquet sink and the PostgreSQL sink.
    let ds = http.get(&format!("{url}/v1/datasets")).await.json();
    let names: Vec<&str> = ds
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, vec!["clean", table.as_str()], "{ds}");
    assert_eq!(ds[0]["partition_by"], serde_json::json!(["status"]));

    // Every row written is there.
    let a = query(
        &http,
        &url,
        serde_json::json!({ "sql": "SELECT count(*) AS n FROM clean" }),
        "application/json",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", text(&a.body));
    assert_eq!(a.json()[0]["n"].as_u64(), Some(written));
    assert_eq!(a.header("etlmesh-truncated"), "false");
    assert_eq!(a.header("etlmesh-trace-id").len(), 32);

    // The same answers as DuckDB on the same files.
    if duckdb_available() {
        let theirs = duckdb(s.dir.path(), QUERIES);
        for (q, expected) in QUERIES.iter().zip(&theirs) {
            let a = query(&http, &url, serde_json::json!({ "sql": q }), "text/csv").await;
            assert_eq!(a.status, StatusCode::OK, "{q}: {}", text(&a.body));
            let ours = csv_rows(&a.body);
            assert_eq!(
                ours.len(),
                expected.len(),
                "{q}\nours: {ours:?}\nduckdb: {expected:?}"
            );
            assert!(!ours.is_empty(), "{q}: no rows");
            for (r, (mine, theirs)) in ours.iter().zip(expected).enumerate() {
                assert_eq!(mine.len(), theirs.len(), "{q} row {r}");
                for (c, (m, t)) in mine.iter().zip(theirs).enumerate() {
                    assert!(
                        same(m, t),
                        "{q}\nrow {r} column {c}: etlmesh {m:?}, DuckDB {t}"
                    );
                }
            }
        }
    }

    // The row cap cuts the answer, and says so.
    let a = query(
        &http,
        &url,
        serde_json::json!({ "sql": "SELECT * FROM clean", "limit": 7 }),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(text(&a.body).lines().count(), 7);
    assert_eq!(
        (
            a.header("etlmesh-rows").as_str(),
            a.header("etlmesh-truncated").as_str()
        ),
        ("7", "true")
    );
    let a = query(
        &http,
        &url,
        serde_json::json!({ "sql": "SELECT * FROM clean" }),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(a.header("etlmesh-rows"), "5000", "platform.query.max_rows");

    // Nothing but the datasets: no other file, no statement but a query.
    for (sql, status, code) in [
        (
            "SELECT * FROM '/etc/passwd'",
            StatusCode::BAD_REQUEST,
            "query_invalid",
        ),
        (
            "SELECT * FROM read_csv('/etc/passwd')",
            StatusCode::BAD_REQUEST,
            "query_invalid",
        ),
        (
            "CREATE EXTERNAL TABLE pw (line VARCHAR) STORED AS CSV LOCATION '/etc/passwd'",
            StatusCode::FORBIDDEN,
            "query_refused",
        ),
        (
            "COPY (SELECT * FROM clean) TO 'stolen.csv'",
            StatusCode::FORBIDDEN,
            "query_refused",
        ),
        ("DROP TABLE clean", StatusCode::FORBIDDEN, "query_refused"),
        (
            "SELECT 1; SELECT 2",
            StatusCode::BAD_REQUEST,
            "query_invalid",
        ),
    ] {
        let a = query(
            &http,
            &url,
            serde_json::json!({ "sql": sql }),
            "application/json",
        )
        .await;
        assert_eq!(a.status, status, "{sql}: {}", text(&a.body));
        assert_eq!(a.json()["code"], code, "{sql}");
        assert!(!text(&a.body).contains("root:"), "{sql} read /etc/passwd");
    }
    assert!(!s.path("stolen.csv").exists());

    // Partition pruning: a file that is not Parquet in status=err/ is never opened by a
    // query that filters on another status; a query over every partition meets it.
    s.write("out/clean/status=err/part-x.parquet", b"not parquet");
    let a = query(
        &http,
        &url,
        serde_json::json!({ "sql": "SELECT count(*) AS n FROM clean WHERE status = 'ok'" }),
        "application/json",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", text(&a.body));
    assert!(a.json()[0]["n"].as_u64().unwrap_or(0) > 15_000);
    let a = query(
        &http,
        &url,
        serde_json::json!({ "sql": "SELECT count(*) FROM clean" }),
        "application/json",
    )
    .await;
    assert!(a.status.is_server_error(), "{}", text(&a.body));
    assert!(
        text(&a.body).contains("reading dataset clean"),
        "{}",
        text(&a.body)
    );
    std::fs::remove_file(s.path("out/clean/status=err/part-x.parquet")).expect("rm");

    // A PostgreSQL table, read through a read-only session.
    if common::service("PostgreSQL", "127.0.0.1:5432") {
        let pg = common::pg::connect(common::pg::MACHINE_URL).await;
        pg.batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (device_id text, n bigint, t double precision, at timestamptz, price numeric, tags jsonb);
             INSERT INTO {table} VALUES ('d1', 1, 20.5, '2026-01-01T00:00:00Z', 1.25, '[1]'), ('d2', 2, NULL, NULL, 2.5, NULL), ('d1', 3, 22.5, '2026-01-01T00:01:00Z', NULL, '{{}}');"
        ))
        .await
        .expect("table");
        let a = query(&http, &url, serde_json::json!({ "sql": format!("SELECT device_id, count(*) AS rows, sum(n) AS n, avg(t) AS t, sum(price) AS price, max(at) AS last FROM {table} GROUP BY device_id ORDER BY device_id") }), "application/json").await;
        assert_eq!(a.status, StatusCode::OK, "{}", text(&a.body));
        let v = a.json();
        assert_eq!(v[0]["device_id"], "d1");
        assert_eq!(
            (
                v[0]["rows"].as_u64(),
                v[0]["n"].as_u64(),
                v[0]["t"].as_f64(),
                v[0]["price"].as_f64()
            ),
            (Some(2), Some(4), Some(21.5), Some(1.25))
        );
        assert!(
            v[0]["last"]
                .as_str()
                .unwrap_or("")
                .starts_with("2026-01-01T00:01:00"),
            "{v}"
        );
        assert_eq!(
            (v[1]["device_id"].as_str(), v[1]["n"].as_u64()),
            (Some("d2"), Some(2))
        );
        // A join of PostgreSQL and Parquet, with the jsonb column read as text.
        let a = query(&http, &url, serde_json::json!({ "sql": format!("SELECT p.tags, count(c.device_id) AS readings FROM {table} p LEFT JOIN clean c ON c.device_id = p.device_id GROUP BY p.tags ORDER BY p.tags") }), "text/csv").await;
        assert_eq!(a.status, StatusCode::OK, "{}", text(&a.body));
        assert!(text(&a.body).contains("[1]"), "{}", text(&a.body));
        pg.batch_execute(&format!("DROP TABLE {table}"))
            .await
            .expect("drop");
        // A table that does not exist (yet) is a clear error.
        let a = query(
            &http,
            &url,
            serde_json::json!({ "sql": format!("SELECT * FROM {table}") }),
            "application/json",
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", text(&a.body));
        assert!(
            text(&a.body).contains("does not exist yet"),
            "{}",
            text(&a.body)
        );
    }

    // The command line: a table, a format, the datasets, and errors.
    let gwflag = format!("--gateway={url}");
    let out = s.etlmesh(&[
        "query",
        &gwflag,
        "SELECT status, count(*) AS n FROM clean GROUP BY status ORDER BY status",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.starts_with("status  n"), "{shown}");
    assert!(shown.lines().any(|l| l.starts_with("ok ")), "{shown}");
    assert!(
        text(&out.stderr).contains("rows in"),
        "{}",
        text(&out.stderr)
    );
    let out = s.etlmesh(&[
        "query",
        &gwflag,
        "--format",
        "ndjson",
        "--limit",
        "3",
        "SELECT device_id FROM clean",
    ]);
    assert_eq!(
        text(&out.stdout).lines().count(),
        3,
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("cut at the row limit"),
        "{}",
        text(&out.stderr)
    );
    let out = s.etlmesh(&["query", &gwflag, "--datasets"]);
    assert!(
        text(&out.stdout).contains("out/clean"),
        "{}",
        text(&out.stdout)
    );
    let out = s.etlmesh(&["query", &gwflag, "DELETE FROM clean"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("query_refused"),
        "{}",
        text(&out.stderr)
    );

    // Metrics count queries by outcome.
    let m = text(&http.get(&format!("{url}/metrics")).await.body);
    assert!(m.contains("etlmesh_queries_total{outcome=\"ok\"}"), "{m}");
    assert!(
        m.contains("etlmesh_queries_total{outcome=\"query_refused\"}"),
        "{m}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}
