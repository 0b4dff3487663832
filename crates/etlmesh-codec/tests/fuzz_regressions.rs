//! Inputs that made a fuzz target crash (`fuzz/`), kept so that the crash stays fixed:
//! every file in `tests/fuzz/` goes through every decoder, with and without a declared
//! schema. A decoder may reject the input; it must not panic. A new crash from
//! `fuzz/run.sh` goes here as `TARGET-HASH` (the first byte is the target's choice
//! byte, as in the fuzz targets).

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use etlmesh_codec::{Limits, decode_body};
use etlmesh_config::{CsvOptions, Format};

#[test]
fn crash_inputs_are_decoded_or_rejected_without_a_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let schema = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("temperature_c", DataType::Float64, true),
        Field::new("humidity", DataType::Float64, true),
        Field::new("n", DataType::Int64, true),
        Field::new("ok", DataType::Boolean, true),
    ]));
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/fuzz") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("read");
        files += 1;
        let body = bytes::Bytes::from(data.get(1..).unwrap_or_default().to_vec());
        for format in [
            Format::Csv,
            Format::Ndjson,
            Format::Json,
            Format::Parquet,
            Format::Arrow,
        ] {
            for declared in [None, Some(&schema)] {
                let limits = Limits {
                    batch_size: 7,
                    max_record_bytes: 4096,
                };
                // Ok or Err: both are fine; a panic fails the test.
                let _ = decode_body(
                    body.clone(),
                    &path.display().to_string(),
                    format,
                    declared,
                    &CsvOptions::default(),
                    &limits,
                    16,
                );
            }
        }
    }
    assert!(
        files >= 6,
        "the crash inputs are missing from {}",
        dir.display()
    );
}
