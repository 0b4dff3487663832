//! `etlmesh test`: the example pipelines' own tests pass, run by the real binary
//! without any server; a test that differs fails with a diff and a non-zero exit, and
//! a test that cannot run says why.

mod common;

use common::Scratch;

fn examples(file: &str) -> String {
    format!("{}/../../examples/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_example_pipelines_pass_their_tests() {
    let scratch = Scratch::new();
    for (file, n) in [("iot.yaml", 3), ("iot-stream.yaml", 2)] {
        let out = scratch.etlmesh(&["test", "-c", &examples(file)]);
        let said = text(&out);
        assert!(out.status.success(), "{file}:\n{said}");
        assert!(
            said.contains(&format!("{n} tests: {n} passed, 0 failed")),
            "{file}:\n{said}"
        );
    }
}

#[test]
fn a_test_that_differs_fails_with_what_differed() {
    let scratch = Scratch::new();
    scratch.write(
        "p.yaml",
        r#"pipelines:
  c:
    source: { type: file, path: in.csv, format: csv }
    schema: { device_id: utf8, temperature_c: float64 }
    transform: SELECT device_id, temperature_c * 9 / 5 + 32 AS temperature_f FROM input WHERE temperature_c > 0
    sinks: [{ type: ndjson, path: out }]
    dead_letter: { type: ndjson, path: dead }
"#,
    );
    scratch.write(
        "p.tests.yaml",
        r#"tests:
  - name: right
    pipeline: c
    input: { text: "device_id,temperature_c\na,20\nb,-5\n" }
    expect: { rows: [{ device_id: a, temperature_f: 68 }], dead_letters: [] }
  - name: wrong
    pipeline: c
    input: { text: "device_id,temperature_c\na,20\nb,hot\nc,30\n" }
    expect:
      rows: [{ device_id: a, temperature_f: 70 }, { device_id: c, temperature_f: 86 }]
      conditions: [temperature_f < 80]
      dead_letters: [{ line: 3, stage: decode }]
  - name: nowhere
    pipeline: missing
    input: { text: "device_id,temperature_c\n" }
"#,
    );
    let out = scratch.etlmesh(&["test", "-c", "p.yaml"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    for want in [
        "right (pipeline c) ... ok",
        "wrong (pipeline c) ... FAILED",
        "- missing row      {\"device_id\":\"a\",\"temperature_f\":70}",
        "+ unexpected row   {\"device_id\":\"a\",\"temperature_f\":68.0}",
        "condition `temperature_f < 80` is false for 1 of 2 rows",
        "- missing dead letter      line 3, stage decode",
        "+ unexpected dead letter   line 3, cast `temperature_c`",
        "nowhere (pipeline missing) ... ERROR",
        "3 tests: 1 passed, 2 failed",
    ] {
        assert!(said.contains(want), "{want:?} in:\n{said}");
    }
}

#[test]
fn a_pipeline_file_without_tests_says_where_they_go() {
    let scratch = Scratch::new();
    scratch.write(
        "p.yaml",
        "pipelines:\n  c:\n    source: { type: stdin, format: csv }\n    sinks: [{ type: stdout }]\n",
    );
    let out = scratch.etlmesh(&["test", "-c", "p.yaml"]);
    let said = text(&out);
    assert!(!out.status.success());
    assert!(
        said.contains("no tests for p.yaml: write p.tests.yaml"),
        "{said}"
    );
}
