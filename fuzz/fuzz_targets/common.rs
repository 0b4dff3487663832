//! What the decoder targets share: the readings schema, and one decode of a body in
//! a format, with and without a declared schema (the first byte chooses). A decoder
//! may reject anything; it must not panic, hang or lose a record.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use etlmesh_codec::{Limits, decode_body};
use etlmesh_config::{CsvOptions, Format};

pub fn readings() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        Field::new("temperature_c", DataType::Float64, true),
        Field::new("humidity", DataType::Float64, true),
        Field::new("n", DataType::Int64, true),
        Field::new("ok", DataType::Boolean, true),
    ]))
}

/// libfuzzer-sys aborts on any panic, even one the code catches on purpose (arrow's
/// and parquet's readers panic on some malformed inputs; the codec turns that into an
/// error). A quiet hook lets caught panics pass; one that escapes the target still
/// aborts (libfuzzer-sys catches it and aborts), so it is still found.
pub fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

pub fn decode(data: &[u8], format: Format) {
    quiet_panics();
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let schema = readings();
    let declared = (choice & 1 == 1).then_some(&schema);
    let limits = Limits {
        batch_size: 1 + (choice as usize >> 1) % 64,
        max_record_bytes: 4096,
    };
    let csv = CsvOptions::default();
    if let Ok((_, out)) = decode_body(
        bytes::Bytes::copy_from_slice(body),
        "fuzz",
        format,
        declared,
        &csv,
        &limits,
        16,
    ) {
        // Every batch has the schema it claims, within the batch size.
        for b in &out.batches {
            assert!(b.batch.num_rows() <= limits.batch_size.max(1) || !format.is_text());
        }
    }
}
