//! Whole-body decoding across formats, inference, and encode → decode round trips.

use super::*;
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Float64Type;
use encode::{EncodeOptions, encode_to_vec};

fn limits() -> Limits {
    Limits {
        batch_size: 1024,
        max_record_bytes: 1 << 16,
    }
}

#[test]
fn infers_csv_schema_and_decodes() {
    let body = Bytes::from_static(b"device_id,ts,temperature_c,ok\nd1,2026-01-01T00:00:00Z,21.5,true\nd2,2026-01-01T00:00:01Z,22,false\n");
    let (schema, out) = decode_body(
        body,
        "req",
        Format::Csv,
        None,
        &CsvOptions::default(),
        &limits(),
        100,
    )
    .expect("decode");
    assert_eq!(
        schema::describe(&schema),
        "device_id: utf8, ts: timestamp_ms, temperature_c: float64, ok: bool"
    );
    assert_eq!(out.rows(), 2);
    assert!(out.rejects.is_empty());
}

#[test]
fn infers_ndjson_schema() {
    let body = Bytes::from_static(b"{\"a\":1,\"b\":\"x\"}\n{\"a\":2.5,\"c\":null,\"b\":\"y\"}\n");
    let (schema, out) = decode_body(
        body,
        "req",
        Format::Ndjson,
        None,
        &CsvOptions::default(),
        &limits(),
        100,
    )
    .expect("decode");
    assert_eq!(schema::describe(&schema), "a: float64, b: utf8, c: utf8");
    assert_eq!(out.rows(), 2);
}

#[test]
fn an_empty_body_has_no_rows() {
    let (_, out) = decode_body(
        Bytes::new(),
        "req",
        Format::Csv,
        None,
        &CsvOptions::default(),
        &limits(),
        100,
    )
    .expect("decode");
    assert_eq!(out.records, 0);
}

fn sample() -> RecordBatch {
    let body = Bytes::from_static(b"{\"id\":\"a\",\"t\":1.5,\"ts\":\"2026-01-01T00:00:00.250Z\"}\n{\"id\":\"b\",\"t\":null,\"ts\":0}\n");
    let (_, out) = decode_body(
        body,
        "s",
        Format::Ndjson,
        None,
        &CsvOptions::default(),
        &limits(),
        10,
    )
    .expect("decode");
    out.batches[0].batch.clone()
}

#[test]
fn round_trips_through_every_format() {
    let batch = sample();
    let schema = batch.schema();
    for format in [
        Format::Csv,
        Format::Ndjson,
        Format::Json,
        Format::Parquet,
        Format::Arrow,
    ] {
        let bytes = encode_to_vec(
            std::slice::from_ref(&batch),
            &schema,
            &EncodeOptions::new(format),
        )
        .expect("encode");
        let (_, out) = decode_body(
            Bytes::from(bytes),
            "rt",
            format,
            Some(&schema),
            &CsvOptions::default(),
            &limits(),
            10,
        )
        .unwrap_or_else(|e| panic!("{format}: {e}"));
        assert!(out.rejects.is_empty(), "{format}: {:?}", out.rejects);
        let got = &out.batches[0].batch;
        assert_eq!(got.num_rows(), 2, "{format}");
        assert_eq!(
            got.column(1).as_primitive::<Float64Type>().value(0),
            1.5,
            "{format}"
        );
        assert_eq!(
            got.column(2),
            batch.column(2),
            "{format}: timestamps survive"
        );
    }
}

#[test]
fn oversized_lines_are_skipped_without_reading_them_whole() {
    let mut text = b"{\"id\":\"a\"}\n{\"id\":\"".to_vec();
    text.extend(std::iter::repeat_n(b'x', 200_000));
    text.extend_from_slice(b"\"}\n{\"id\":\"c\"}\n");
    let schema = arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "id",
        arrow::datatypes::DataType::Utf8,
        true,
    )]);
    let schema = Arc::new(schema);
    // A chunker with a small read size, so the long line spans many reads.
    let mut ch = Chunker::new(
        &text[..],
        Arc::from("big.ndjson"),
        Framing::Lines,
        4096,
        1000,
    );
    let dec = Decoder {
        format: Format::Ndjson,
        schema,
        csv: CsvOptions::default(),
        limits: limits(),
    };
    let layout = CsvLayout { map: vec![] };
    let (mut rows, mut rejects) = (0, Vec::new());
    while let Some(c) = ch.next_chunk().expect("read") {
        assert!(c.data.len() < 10_000, "the long line is never held whole");
        let out = dec.decode_text(&c, &layout).expect("decode");
        rows += out.rows();
        rejects.extend(out.rejects);
    }
    assert_eq!(rows, 2);
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0].line, Some(2));
    assert_eq!(rejects[0].stage, Stage::Limit);
    assert!(rejects[0].raw_truncated);
}

#[test]
fn chunks_end_on_record_boundaries_and_count_lines() {
    let mut text = String::from("id,v\n");
    for i in 0..5000 {
        if i % 1000 == 7 {
            text.push_str(&format!("\"multi\nline {i}\",{i}\n"));
        } else {
            text.push_str(&format!("r{i},{i}\n"));
        }
    }
    text.push_str("last,1"); // no final newline
    let csv = CsvOptions::default();
    let mut ch = Chunker::new(
        text.as_bytes(),
        Arc::from("x.csv"),
        framing(Format::Csv, &csv).expect("text"),
        4096,
        1 << 16,
    );
    let mut chunks = Vec::new();
    while let Some(c) = ch.next_chunk().expect("read") {
        chunks.push(c);
    }
    assert!(chunks.len() > 5);
    let schema = infer_schema(Format::Csv, &chunks[0], &csv, 100).expect("schema");
    let dec = Decoder {
        format: Format::Csv,
        schema,
        csv,
        limits: limits(),
    };
    let layout = dec.layout(&mut chunks[0]).expect("layout");
    let mut rows = 0;
    let mut last_line = 0;
    for c in &chunks {
        let out = dec.decode_text(c, &layout).expect("decode");
        assert!(out.rejects.is_empty(), "{:?}", out.rejects.first());
        rows += out.rows();
        for b in &out.batches {
            if let Provenance::Text { spans, .. } = &b.provenance {
                last_line = spans.last().map_or(last_line, |s| s.line);
            }
        }
    }
    assert_eq!(rows, 5001);
    assert_eq!(
        last_line,
        1 + 5000 + 5 + 1,
        "header, 5000 rows with 5 embedded newlines, then the last row"
    );
}

#[test]
fn long_digit_runs_parse_without_overflow() {
    // Found by fuzzing: 20 digits overflowed the fast path's u64 in debug builds.
    assert_eq!(
        crate::parse::parse_f64(b"00000000000000000000001.5"),
        Some(1.5)
    );
    assert_eq!(
        crate::parse::parse_f64(b"123456789012345678901234"),
        Some(123456789012345678901234.0)
    );
}

#[test]
fn a_panicking_reader_becomes_an_error_naming_its_input() {
    let e = crate::binary::guarded::<()>("upload.arrow", "Arrow IPC stream", || {
        panic!("Type Int256 not supported")
    })
    .expect_err("panic caught");
    let s = e.to_string();
    assert!(s.contains("upload.arrow") && s.contains("Int256"), "{s}");
}

/// Decodes `body` as CSV with a declared two-column schema, through chunks of at
/// least 4 KiB (a small read size, so that records cross reads).
fn csv_through_chunks(body: &str, newlines: Option<bool>) -> (usize, Vec<Reject>) {
    let csv = CsvOptions {
        newlines_in_values: newlines,
        ..CsvOptions::default()
    };
    let schema: SchemaRef = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("id", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Int64, true),
    ]));
    let mut ch = Chunker::new(
        body.as_bytes(),
        Arc::from("q.csv"),
        framing(Format::Csv, &csv).expect("text"),
        4096,
        1 << 16,
    );
    let mut chunks = Vec::new();
    while let Some(c) = ch.next_chunk().expect("read") {
        chunks.push(c);
    }
    let dec = Decoder {
        format: Format::Csv,
        schema,
        csv,
        limits: limits(),
    };
    let layout = dec.layout(&mut chunks[0]).expect("layout");
    let (mut rows, mut rejects) = (0, Vec::new());
    for c in &chunks {
        let out = dec.decode_text(c, &layout).expect("decode");
        rows += out.rows();
        rejects.extend(out.rejects);
    }
    (rows, rejects)
}

fn lines_with(bad: &[(usize, &str)], n: usize) -> String {
    let mut text = String::from("id,v\n");
    for i in 0..n {
        match bad.iter().find(|(at, _)| *at == i) {
            Some((_, line)) => text.push_str(line),
            None => text.push_str(&format!("r{i},{i}")),
        }
        text.push('\n');
    }
    text
}

#[test]
fn an_unterminated_quote_costs_its_own_line_only() {
    // Line 5 (record 3) opens a quote that never closes; 2,000 good lines follow, so
    // the rest of the input crosses many reads.
    let body = lines_with(&[(3, "r3,\"oops,3")], 2000);
    let (rows, rejects) = csv_through_chunks(&body, None);
    assert_eq!(rows, 1999, "{rejects:?}");
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0].line, Some(5));
    assert_eq!(&rejects[0].raw[..], b"r3,\"oops,3");
    assert!(rejects[0].reason.contains("unterminated quoted field"));
}

#[test]
fn two_bad_quotes_do_not_swallow_the_lines_between_them() {
    // The second bad quote could pair with the first; it must not.
    let body = lines_with(
        &[(10, "r10,\"a,1"), (500, "\"r500,2"), (900, "r900,\"x\"y")],
        1000,
    );
    let (rows, rejects) = csv_through_chunks(&body, None);
    let lines: Vec<Option<u64>> = rejects.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![Some(12), Some(502), Some(902)], "{rejects:?}");
    assert_eq!(rows, 997);
}

#[test]
fn quoted_newlines_that_close_stay_one_record_and_can_be_refused() {
    let body = lines_with(
        &[
            (7, "\"two\nlines\",7"),
            (8, "\"a \"\"quoted\"\"\nvalue\",8"),
        ],
        50,
    );
    let (rows, rejects) = csv_through_chunks(&body, None);
    assert_eq!((rows, rejects.len()), (50, 0), "{rejects:?}");
    let (rows, rejects) = csv_through_chunks(&body, Some(true));
    assert_eq!((rows, rejects.len()), (50, 0), "{rejects:?}");
    // Never: the line that opens the quote is a bad record of its own; the next line
    // reads as a record (its quote is not at a field's start).
    let (rows, rejects) = csv_through_chunks(&body, Some(false));
    assert_eq!(rows, 50);
    assert_eq!(
        rejects.iter().map(|r| r.line).collect::<Vec<_>>(),
        vec![Some(9), Some(11)],
        "{rejects:?}"
    );
}

#[test]
fn with_newlines_in_values_an_open_quote_takes_what_follows() {
    // The old reading, when the source asks for it: up to max_record_bytes.
    let body = lines_with(&[(3, "r3,\"oops,3")], 100);
    let (rows, rejects) = csv_through_chunks(&body, Some(true));
    assert_eq!(rows, 3);
    assert_eq!(rejects.len(), 1);
}

#[test]
fn a_quote_inside_an_unquoted_field_is_a_character() {
    let body = lines_with(&[(4, "r4 5\" screen,4")], 20);
    let (rows, rejects) = csv_through_chunks(&body, None);
    assert_eq!((rows, rejects.len()), (20, 0), "{rejects:?}");
}

#[test]
fn a_bad_ndjson_line_is_one_dead_letter() {
    let mut body = String::new();
    for i in 0..500 {
        if i == 40 {
            body.push_str("{\"id\":\"r40\",\"v\":\"unterminated\n");
        } else {
            body.push_str(&format!("{{\"id\":\"r{i}\",\"v\":{i}}}\n"));
        }
    }
    let schema: SchemaRef = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("id", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Int64, true),
    ]));
    let (_, out) = decode_body(
        Bytes::from(body),
        "req",
        Format::Ndjson,
        Some(&schema),
        &CsvOptions::default(),
        &limits(),
        100,
    )
    .expect("decode");
    assert_eq!(out.rows(), 499);
    assert_eq!(out.rejects.len(), 1);
    assert_eq!(out.rejects[0].line, Some(41));
}
