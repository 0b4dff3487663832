//! End-to-end batch jobs with the real binary: formats, dead letters, counts, atomic
//! output, spilling, and every kind of bad input the foundation must survive.

mod common;

use common::*;

const CLEAN: &str = "SELECT device_id, ts, temperature_c * 9 / 5 + 32 AS temperature_f, humidity, status\nFROM input\nWHERE status <> 'err' AND temperature_c BETWEEN -50 AND 150";

fn generate(s: &Scratch, rows: u64, bad: f64, out: &str) {
    let o = s.etlmesh(&[
        "generate",
        "--rows",
        &rows.to_string(),
        "--bad-fraction",
        &bad.to_string(),
        "-o",
        out,
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn csv_and_ndjson_runs_account_for_every_record() {
    let s = Scratch::new();
    generate(&s, 30_000, 0.01, "in.csv");
    generate(&s, 30_000, 0.01, "in.ndjson");
    s.write(
        "p.yaml",
        readings_yaml(
            CLEAN,
            "{ type: parquet, path: out }",
            "    dead_letter: { type: ndjson, path: dead }\n",
        ),
    );
    for input in ["in.csv", "in.ndjson"] {
        let _ = std::fs::remove_dir_all(s.path("out"));
        let _ = std::fs::remove_dir_all(s.path("dead"));
        let sum = s.run_ok("p.yaml", "p", &[input]);
        assert_eq!(n(&sum["records_in"]), 30_000, "{input}: {sum}");
        let dead = n(&sum["dead_lettered"]);
        assert!(
            (150..500).contains(&dead),
            "{input}: about 1% bad rows, got {dead}"
        );
        assert!(
            n(&sum["filtered"]) > 500,
            "{input}: errors and outliers are filtered"
        );
        let written = read_parquet_dir(&s.path("out"));
        assert_eq!(rows(&written) as u64, n(&sum["records_out"]), "{input}");
        let letters = read_ndjson_dir(&s.path("dead"));
        assert_eq!(letters.len() as u64, dead, "{input}");
        for l in &letters {
            assert_eq!(l["pipeline"], "p");
            assert_eq!(l["source"], input);
            assert!(l["line"].as_u64().is_some_and(|n| n >= 1), "{l}");
            assert!(l["reason"].as_str().is_some_and(|r| !r.is_empty()), "{l}");
            assert!(
                l.get("raw").is_some() || l.get("raw_base64").is_some(),
                "{l}"
            );
        }
    }
}

#[test]
fn each_kind_of_bad_record_is_dead_lettered_with_line_and_reason() {
    let s = Scratch::new();
    let mut csv = b"device_id,ts,temperature_c,humidity,battery_v,status\n".to_vec();
    csv.extend_from_slice(b"d1,2026-01-01T00:00:00Z,20.5,50,3.9,ok\n"); // 2 good
    csv.extend_from_slice(b"d2,2026-01-01T00:00:01Z,21\n"); // 3 truncated
    csv.extend_from_slice(b"d3,2026-01-01T00:00:02Z,22,50,3.9,ok,extra\n"); // 4 wrong count
    csv.extend_from_slice(b"d4,2026-01-01T00:00:03Z,hot,50,3.9,ok\n"); // 5 text in numeric
    csv.extend_from_slice(b"d\xff5,2026-01-01T00:00:04Z,23,50,3.9,ok\n"); // 6 invalid UTF-8
    csv.extend_from_slice(b"d6,yesterday,23,50,3.9,ok\n"); // 7 bad timestamp
    csv.extend_from_slice(b"d7,1767225605000,24,50,3.9,ok\n"); // 8 good, epoch ms
    s.write("in.csv", &csv);
    s.write(
        "in.ndjson",
        concat!(
            "{\"device_id\":\"d1\",\"ts\":\"2026-01-01T00:00:00Z\",\"temperature_c\":20.5}\n",
            "{\"device_id\":\"d2\",\"ts\":\"2026-01-01T00:00:01Z\",\"temperature_c\":21.5,\n",
            "{\"device_id\":\"d3\",\"ts\":1767225602000,\"temperature_c\":22.5}\n",
        ),
    );
    s.write(
        "p.yaml",
        readings_yaml(
            "SELECT * FROM input",
            "{ type: ndjson, path: out }",
            "    dead_letter: { type: ndjson, path: dead }\n",
        ),
    );
    let sum = s.run_ok("p.yaml", "p", &["in.csv"]);
    assert_eq!(
        (
            n(&sum["records_in"]),
            n(&sum["records_out"]),
            n(&sum["dead_lettered"])
        ),
        (7, 2, 5)
    );
    let mut letters = read_ndjson_dir(&s.path("dead"));
    letters.sort_by_key(|l| l["line"].as_u64());
    let got: Vec<(u64, String)> = letters
        .iter()
        .map(|l| {
            (
                l["line"].as_u64().unwrap_or(0),
                l["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        got[0].0 == 3 && got[0].1.contains("expected 6 fields, found 3"),
        "{got:?}"
    );
    assert!(got[1].0 == 4 && got[1].1.contains("found 7"), "{got:?}");
    assert!(
        got[2].0 == 5 && got[2].1.contains("cannot read \"hot\" as float64"),
        "{got:?}"
    );
    assert!(
        got[3].0 == 6 && got[3].1.contains("invalid UTF-8"),
        "{got:?}"
    );
    assert!(
        letters[3]["raw_base64"].as_str().is_some(),
        "{}",
        letters[3]
    );
    assert!(
        got[4].0 == 7 && got[4].1.contains("as timestamp_ms"),
        "{got:?}"
    );
    assert_eq!(letters[2]["field"], "temperature_c");
    assert_eq!(letters[2]["raw"], "d4,2026-01-01T00:00:03Z,hot,50,3.9,ok");

    let _ = std::fs::remove_dir_all(s.path("dead"));
    let sum = s.run_ok("p.yaml", "p", &["in.ndjson"]);
    assert_eq!(
        (
            n(&sum["records_in"]),
            n(&sum["records_out"]),
            n(&sum["dead_lettered"])
        ),
        (3, 2, 1)
    );
    let letters = read_ndjson_dir(&s.path("dead"));
    assert_eq!(letters[0]["line"], 2);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("invalid JSON"),
        "{}",
        letters[0]
    );
}

#[test]
fn on_error_fail_names_the_line_and_leaves_no_output() {
    let s = Scratch::new();
    generate(&s, 20_000, 0.0, "good.csv");
    let mut data = std::fs::read(s.path("good.csv")).expect("read");
    data.extend_from_slice(b"dev-1,2026-11-26T10:00:00Z,warm,1,1,ok\n");
    generate(&s, 20_000, 0.0, "more.csv");
    let more = std::fs::read(s.path("more.csv")).expect("read");
    data.extend_from_slice(&more[more.iter().position(|&b| b == b'\n').expect("header") + 1..]);
    s.write("in.csv", &data);
    s.write(
        "p.yaml",
        readings_yaml(
            CLEAN,
            "{ type: parquet, path: out }",
            "    on_error: fail\n",
        ),
    );
    let out = s.etlmesh(&[
        "run",
        "-c",
        "p.yaml",
        "--pipeline",
        "p",
        "--progress",
        "off",
        "in.csv",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("in.csv:20002: field `temperature_c`: cannot read \"warm\" as float64"),
        "{err}"
    );
    assert!(err.contains("on_error: fail"), "{err}");
    assert!(
        files(&s.path("out")).is_empty(),
        "no partial output: {:?}",
        files(&s.path("out"))
    );
}

#[test]
fn whole_input_aggregates_match_the_golden_file() {
    let s = Scratch::new();
    s.write(
        "in.csv",
        "device_id,ts,temperature_c,humidity,battery_v,status\n\
         a,2026-01-01T00:00:05Z,10,40,4,ok\n\
         a,2026-01-01T00:00:55Z,20,45,4,ok\n\
         a,2026-01-01T00:01:10Z,30,50,4,ok\n\
         b,2026-01-01T00:00:30Z,0,60,4,ok\n\
         b,2026-01-01T00:00:31Z,999,70,4,ok\n\
         b,2026-01-01T00:00:32Z,5,80,4,err\n\
         c,bad-time,1,1,1,ok\n",
    );
    let sql = "SELECT device_id, date_trunc('minute', ts) AS minute,\n  avg(temperature_c * 9 / 5 + 32) AS avg_f, max(humidity) AS max_h, count(*) AS n\nFROM input\nWHERE status <> 'err' AND temperature_c BETWEEN -50 AND 150\nGROUP BY 1, 2\nORDER BY 1, 2";
    s.write(
        "p.yaml",
        readings_yaml(
            sql,
            "{ type: ndjson, path: out }",
            "    dead_letter: { type: ndjson, path: dead }\n",
        ),
    );
    let sum = s.run_ok("p.yaml", "p", &["in.csv"]);
    assert_eq!(sum["mode"], "whole-input");
    assert_eq!(
        (
            n(&sum["records_in"]),
            n(&sum["records_out"]),
            n(&sum["filtered"]),
            n(&sum["dead_lettered"])
        ),
        (7, 4, 2, 1)
    );
    let got: Vec<String> = read_ndjson_dir(&s.path("out"))
        .iter()
        .map(|v| v.to_string())
        .collect();
    let golden = include_str!("golden/agg.ndjson");
    assert_eq!(
        got.join("\n"),
        golden.trim_end(),
        "output differs from tests/golden/agg.ndjson"
    );
}

#[test]
fn group_by_over_more_than_the_memory_limit_spills() {
    let s = Scratch::new();
    let o = s.etlmesh(&[
        "generate",
        "--rows",
        "600000",
        "--devices",
        "300000",
        "--bad-fraction",
        "0",
        "-o",
        "in.csv",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let yaml = readings_yaml(
        "SELECT device_id, count(*) AS n, avg(temperature_c) AS t FROM input GROUP BY device_id",
        "{ type: parquet, path: out }",
        "",
    )
    .replace("memory_limit: 256MiB", "memory_limit: 20MiB");
    s.write("p.yaml", yaml);
    let sum = s.run_ok("p.yaml", "p", &["in.csv"]);
    assert!(
        n(&sum["spilled_bytes"]) > 0,
        "the aggregate should spill under a 20MiB limit: {sum}"
    );
    let out = read_parquet_dir(&s.path("out"));
    assert_eq!(rows(&out), 300_000);
}

#[test]
fn partitioned_parquet_then_parquet_input_with_an_inferred_schema() {
    let s = Scratch::new();
    generate(&s, 5_000, 0.0, "in.csv");
    s.write(
        "p.yaml",
        readings_yaml(
            CLEAN,
            "{ type: parquet, path: out, partition_by: [status] }",
            "",
        ),
    );
    let sum = s.run_ok("p.yaml", "p", &["in.csv"]);
    let f = files(&s.path("out"));
    assert!(
        f.iter().any(|p| p.starts_with("status=ok/"))
            && f.iter().any(|p| p.starts_with("status=warn/")),
        "{f:?}"
    );
    assert!(!f.iter().any(|p| p.starts_with("status=err/")), "{f:?}");
    // Read the partition back, with no declared schema.
    s.write(
        "q.yaml",
        "pipelines:\n  q:\n    transform: SELECT count(*) AS n, min(temperature_f) AS lo FROM input\n    sinks: [{ type: ndjson, path: q }]\n",
    );
    let ok: Vec<String> = f
        .iter()
        .filter(|p| p.starts_with("status=ok/"))
        .map(|p| format!("out/{p}"))
        .collect();
    let refs: Vec<&str> = ok.iter().map(String::as_str).collect();
    let q = s.run_ok("q.yaml", "q", &refs);
    assert!(n(&q["records_in"]) > 0 && n(&q["records_in"]) < n(&sum["records_out"]));
}

#[test]
fn stdin_to_stdout_and_json_arrays() {
    let s = Scratch::new();
    s.write(
        "p.yaml",
        "pipelines:\n  p:\n    source: { type: stdin, format: json }\n    transform: SELECT upper(name) AS name, n * 2 AS n2 FROM input WHERE n > 1\n    sinks: [{ type: stdout, format: csv }, { type: stdout, format: ndjson }]\n",
    );
    let body = br#"[ {"name": "a", "n": 1}, {"name": "b", "n": 2},
      {"name": "c", "n": 3} ]"#;
    let out = s.etlmesh_stdin(
        &[
            "run",
            "-c",
            "p.yaml",
            "--pipeline",
            "p",
            "--progress",
            "off",
        ],
        Some(body),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "name,n2\nB,4\nC,6\n{\"name\":\"B\",\"n2\":4}\n{\"name\":\"C\",\"n2\":6}\n"
    );
}

#[test]
fn an_empty_file_gives_an_empty_run() {
    let s = Scratch::new();
    s.write("empty.csv", "");
    s.write(
        "p.yaml",
        readings_yaml(CLEAN, "{ type: parquet, path: out }", ""),
    );
    let sum = s.run_ok("p.yaml", "p", &["empty.csv"]);
    assert_eq!(n(&sum["records_in"]), 0);
    assert!(files(&s.path("out")).is_empty());
}

#[test]
fn an_enormous_line_is_rejected_without_being_read_whole() {
    let s = Scratch::new();
    let mut data =
        b"{\"device_id\":\"a\",\"ts\":0,\"temperature_c\":1}\n{\"device_id\":\"".to_vec();
    data.extend(std::iter::repeat_n(b'x', 64 << 20));
    data.extend_from_slice(b"\",\"ts\":0}\n{\"device_id\":\"c\",\"ts\":0,\"temperature_c\":2}\n");
    s.write("big.ndjson", &data);
    let yaml = readings_yaml(
        "SELECT * FROM input",
        "{ type: ndjson, path: out }",
        "    dead_letter: { type: ndjson, path: dead }\n",
    )
    .replace(
        "batch_size: 4096",
        "batch_size: 4096\n  max_record_bytes: 1MiB\n  read_chunk: 1MiB",
    );
    s.write("p.yaml", yaml);
    let sum = s.run_ok("p.yaml", "p", &["big.ndjson"]);
    assert_eq!(
        (
            n(&sum["records_in"]),
            n(&sum["records_out"]),
            n(&sum["dead_lettered"])
        ),
        (3, 2, 1)
    );
    let letters = read_ndjson_dir(&s.path("dead"));
    assert_eq!(letters[0]["line"], 2);
    assert_eq!(letters[0]["stage"], "limit");
    assert_eq!(letters[0]["raw_truncated"], true);
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("max_record_bytes"),
        "{}",
        letters[0]
    );
}

#[test]
fn sql_that_does_not_plan_points_into_the_file() {
    let s = Scratch::new();
    generate(&s, 10, 0.0, "in.csv");
    s.write(
        "p.yaml",
        readings_yaml(
            "SELECT device_id,\n  temperatur * 2 AS t\nFROM input",
            "{ type: parquet, path: out }",
            "",
        ),
    );
    for args in [
        vec!["validate", "p.yaml"],
        vec!["run", "-c", "p.yaml", "--pipeline", "p", "in.csv"],
    ] {
        let out = s.etlmesh(&args);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("p.yaml:15:9: pipelines.p.transform: the SQL does not plan"),
            "{err}"
        );
        assert!(
            err.contains("   15 |         temperatur * 2 AS t\n                ^^^^^^^^^^"),
            "{err}"
        );
    }
}

#[test]
fn an_unwritable_output_directory_is_a_clear_error() {
    let s = Scratch::new();
    generate(&s, 10, 0.0, "in.csv");
    s.write("blocker", "a file where a directory should be");
    s.write(
        "p.yaml",
        readings_yaml(CLEAN, "{ type: parquet, path: blocker/out }", ""),
    );
    let out = s.etlmesh(&["validate", "p.yaml"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("p.yaml:18:26: pipelines.p.sinks[0].path"),
        "{}",
        text(&out.stderr)
    );
    let out = s.etlmesh(&["run", "-c", "p.yaml", "--pipeline", "p", "in.csv"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot write to blocker/out") && err.contains("help:"),
        "{err}"
    );
}

#[test]
fn a_typo_in_a_key_is_named_with_its_line() {
    let s = Scratch::new();
    s.write(
        "p.yaml",
        readings_yaml(
            CLEAN,
            "{ type: parquet, path: out, partiton_by: [status] }",
            "",
        ),
    );
    let out = s.etlmesh(&["validate", "p.yaml"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("p.yaml:18:37: pipelines.p.sinks[0].partiton_by"),
        "{err}"
    );
    assert!(
        err.contains("unknown key `partiton_by`") && err.contains("did you mean `partition_by`?"),
        "{err}"
    );
}

#[test]
fn the_example_file_validates_and_the_demo_runs() {
    let s = Scratch::new();
    let out = s.etlmesh(&["demo", "--rows", "20000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("pipeline readings_per_minute"),
        "{}",
        text(&out.stderr)
    );
    assert!(rows(&read_parquet_dir(&s.path("data/out/clean"))) > 15_000);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/iot.yaml");
    let out = s.etlmesh(&["validate", example]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}
