//! Loading tests: good files, and every kind of mistake with its line.

use super::*;

const GOOD: &str = r#"
platform:
  memory_limit: 256MiB
  batch_size: 8192
pipelines:
  clean:
    source: { type: file, path: "data/*.csv", format: csv, csv: { delimiter: ";" } }
    schema:
      device_id: { type: utf8, nullable: false }
      ts: timestamp_ms
      temperature_c: float64
    transform: |
      SELECT device_id, ts,
             temperature_c * 9 / 5 + 32 AS temperature_f
      FROM input
    sinks:
      - { type: parquet, path: out/clean, partition_by: [device_id], compression: zstd(3) }
      - { type: stdout, format: csv }
    dead_letter: { type: ndjson, path: out/dead }
"#;

fn err(text: &str) -> ConfigError {
    PipelineFile::parse("etl.yaml", text).expect_err("the file should be rejected")
}

#[test]
fn loads_a_good_file() {
    let f = PipelineFile::parse("etl.yaml", GOOD).expect("valid file");
    assert_eq!(f.spec.platform.memory_limit, 256 << 20);
    let p = f.pipeline("clean").expect("pipeline");
    assert_eq!(p.on_error, OnError::DeadLetter);
    assert_eq!(p.source.csv.delimiter, b';');
    let schema = p.schema.as_ref().expect("schema");
    assert_eq!(schema[0].name, "device_id");
    assert!(!schema[0].nullable);
    assert_eq!(schema[1].ty, FieldType::TimestampMs);
    match &p.sinks[0] {
        SinkSpec::File(s) => {
            assert_eq!(s.compression, Compression::Zstd(3));
            assert_eq!(s.partition_by, vec!["device_id".to_string()]);
        }
        other => panic!("unexpected sink {other:?}"),
    }
}

#[test]
fn a_typo_in_a_key_names_line_and_suggests() {
    let text = GOOD.replace("    transform: |", "    tranform: |");
    let e = err(&text);
    let d = &e.diagnostics[0];
    assert_eq!(d.line, Some(12), "{e}");
    assert_eq!(d.field, "pipelines.clean.tranform", "{e}");
    assert_eq!(d.help.as_deref(), Some("did you mean `transform`?"), "{e}");
}

#[test]
fn a_typo_in_a_nested_key() {
    let text = GOOD.replace("partition_by: [device_id]", "partiton_by: [device_id]");
    let e = err(&text);
    assert_eq!(e.diagnostics[0].line, Some(17), "{e}");
    assert!(
        e.to_string().contains("did you mean `partition_by`?"),
        "{e}"
    );
}

#[test]
fn an_unknown_type_names_its_line() {
    let text = GOOD.replace("temperature_c: float64", "temperature_c: flaot64");
    let e = err(&text);
    assert_eq!(e.diagnostics[0].line, Some(11), "{e}");
    assert!(e.to_string().contains("did you mean `float64`?"), "{e}");
}

#[test]
fn semantic_mistakes_are_all_reported_with_lines() {
    let text = GOOD
        .replace("{ type: parquet, path: out/clean,", "{ type: parquet,")
        .replace(
            "{ type: stdout, format: csv }",
            "{ type: stdout, format: csv, path: x }",
        );
    let e = err(&text);
    assert_eq!(e.diagnostics.len(), 2, "{e}");
    assert_eq!(e.diagnostics[0].field, "pipelines.clean.sinks[0].path");
    assert_eq!(e.diagnostics[0].line, Some(17));
    assert_eq!(e.diagnostics[1].field, "pipelines.clean.sinks[1].path");
    assert_eq!(e.diagnostics[1].line, Some(18));
}

#[test]
fn dead_letter_policy_needs_a_sink() {
    let text = GOOD.replace(
        "    dead_letter: { type: ndjson, path: out/dead }\n",
        "    on_error: dead_letter\n",
    );
    let e = err(&text);
    assert!(e.to_string().contains("no dead_letter sink"), "{e}");
}

#[test]
fn duplicate_keys_are_errors() {
    let text = GOOD.replace(
        "      ts: timestamp_ms\n",
        "      ts: timestamp_ms\n      ts: utf8\n",
    );
    let e = err(&text);
    assert!(e.to_string().contains("given twice"), "{e}");
}

#[test]
fn yaml_syntax_errors_have_a_line() {
    let e = err("pipelines:\n  a:\n    sinks: [\n");
    assert!(e.diagnostics[0].line.is_some(), "{e}");
}

#[test]
fn unknown_pipeline_suggests() {
    let f = PipelineFile::parse("etl.yaml", GOOD).expect("valid");
    let e = f.pipeline("claen").expect_err("no such pipeline");
    assert!(e.to_string().contains("did you mean `clean`"), "{e}");
}

#[test]
fn sql_positions_map_into_the_file() {
    let f = PipelineFile::parse("etl.yaml", GOOD).expect("valid");
    // Line 2, column 8 of the SQL: "temperature_c" after seven spaces.
    let (line, col, text) = f.sql_position("clean", 2, 8).expect("position");
    assert_eq!(line, 14);
    assert_eq!(
        &text[col - 1..col - 1 + "temperature_c".len()],
        "temperature_c"
    );
}

#[test]
fn a_key_of_another_sink_kind_is_named_exactly_with_what_this_kind_takes() {
    // Sinks are one struct per kind, picked by `type:`: `table` is a postgres key.
    let text = GOOD.replace(
        "{ type: stdout, format: csv }",
        "{ type: stdout, table: t }",
    );
    let e = err(&text);
    let d = &e.diagnostics[0];
    assert_eq!(d.field, "pipelines.clean.sinks[1].table", "{e}");
    assert_eq!((d.line, d.column), (Some(18), Some(25)), "{e}");
    assert!(d.message.contains("unknown key `table`"), "{e}");
    let text = GOOD.replace("partition_by: [device_id]", "subject: x");
    let e = err(&text);
    assert_eq!(
        e.diagnostics[0].field, "pipelines.clean.sinks[0].subject",
        "{e}"
    );
    assert!(
        e.diagnostics[0]
            .help
            .as_deref()
            .is_some_and(|h| h.contains("partition_by")),
        "{e}"
    );
}

#[test]
fn an_unknown_sink_type_lists_the_kinds() {
    let text = GOOD.replace("{ type: stdout, format: csv }", "{ type: pulsar }");
    let e = err(&text);
    assert_eq!(e.diagnostics[0].line, Some(18), "{e}");
    for kind in ["parquet", "stdout", "postgres", "mqtt", "nats", "kafka"] {
        assert!(e.to_string().contains(kind), "{e}");
    }
}

#[test]
fn a_key_of_another_source_kind_is_placed_at_its_line() {
    // `topic` is an MQTT key; this source is a file.
    let text = GOOD.replace("format: csv, csv:", "topic: x, csv:");
    let e = err(&text);
    let d = &e.diagnostics[0];
    assert_eq!(d.field, "pipelines.clean.source.topic", "{e}");
    assert_eq!(d.line, Some(7), "{e}");
    assert!(d.message.contains("unknown key `topic`"), "{e}");
}

#[test]
fn a_value_of_the_wrong_type_names_its_field_and_line() {
    let e = err(&GOOD.replace("batch_size: 8192", "batch_size: many"));
    let d = &e.diagnostics[0];
    assert_eq!(d.field, "platform.batch_size", "{e}");
    assert_eq!(d.line, Some(4), "{e}");
    assert!(d.message.contains("many"), "{e}");
}

#[test]
fn a_missing_key_is_named() {
    let e = err(&GOOD.replace("{ type: ndjson, path: out/dead }", "{ path: out/dead }"));
    assert!(e.to_string().contains("type"), "{e}");
    let d = &e.diagnostics[0];
    assert_eq!(d.field, "pipelines.clean.dead_letter", "{e}");
    assert_eq!(d.line, Some(19), "{e}");
}

#[test]
fn yes_is_not_a_boolean() {
    // YAML 1.2: `yes` is a string, so a boolean key refuses it rather than guessing.
    let text = GOOD.replace("nullable: false", "nullable: yes");
    let e = err(&text);
    let d = &e.diagnostics[0];
    assert_eq!(d.field, "pipelines.clean.schema.device_id.nullable", "{e}");
    assert_eq!(d.line, Some(9), "{e}");
}

#[test]
fn an_alias_bomb_is_refused_not_expanded() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    text.push_str("pipelines: *a11\n");
    let e = err(&text);
    assert!(e.diagnostics[0].line.is_some(), "{e}");
}

#[test]
fn object_storage_paths_are_checked_where_they_are_written() {
    let ok = GOOD.replace(
        "{ type: parquet, path: out/clean,",
        "{ type: parquet, path: \"s3://lake/clean\", s3: { region: eu-west-1 },",
    );
    let f = PipelineFile::parse("etl.yaml", &ok).expect("valid");
    let p = f.pipeline("clean").expect("pipeline");
    let crate::SinkSpec::File(sink) = &p.sinks[0] else {
        panic!("a file sink: {:?}", p.sinks[0]);
    };
    let target = sink.object.as_ref().expect("an object target");
    assert_eq!(
        (target.bucket.as_str(), target.prefix.as_str()),
        ("lake", "clean")
    );
    assert_eq!(target.s3.region.as_deref(), Some("eu-west-1"));
    assert_eq!(sink.location(), "s3://lake/clean");
    assert!(
        sink.path.ends_with("etlmesh-staging/lake/clean"),
        "{:?}",
        sink.path
    );

    let e = err(&GOOD.replace("path: out/clean,", "path: \"gs://lake/clean\","));
    assert_eq!(
        e.diagnostics[0].field, "pipelines.clean.sinks[0].path",
        "{e}"
    );
    assert!(e.to_string().contains("`gs://` is not a storage"), "{e}");
    let e = err(&GOOD.replace("path: out/clean,", "path: out/clean, s3: { region: x },"));
    assert_eq!(e.diagnostics[0].field, "pipelines.clean.sinks[0].s3", "{e}");
    let e = err(&GOOD.replace(
        "path: out/clean,",
        "path: \"s3://lake\", s3: { regoin: x },",
    ));
    assert!(e.to_string().contains("regoin"), "{e}");
}
