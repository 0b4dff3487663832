//! The MQTT message decoder (topic levels as columns, JSON or CSV payloads, rejects
//! traced to their message) on arbitrary messages: the input is split into messages
//! at 0xFF bytes; the first byte picks the payload format.
#![no_main]

use etlmesh_codec::Limits;
use etlmesh_config::{CsvOptions, PipelineFile};
use etlmesh_stream::decode::MessageDecoder;
use etlmesh_stream::source::detached_delivery;

fn decoder(format: &str) -> MessageDecoder {
    let f = PipelineFile::parse(
        "fuzz.yaml",
        format!("pipelines:\n  p:\n    source: {{ type: mqtt, broker: mqtt://h, topic: 's/{{device_id}}/r', format: {format} }}\n    schema: {{ seq: int64, t: float64, ts: timestamp_ms, ok: bool, note: utf8 }}\n    sinks: [{{ type: ndjson, path: o }}]\n    dead_letter: {{ type: ndjson, path: d }}\n"),
    )
    .expect("the fuzz target's own pipeline file is valid");
    let p = &f.spec.pipelines[0];
    let schema = etlmesh_codec::schema::arrow_schema(p.schema.as_ref().expect("schema"));
    let limits = Limits { batch_size: 7, max_record_bytes: 512 };
    MessageDecoder::new(p.stream_source().expect("mqtt"), &schema, &CsvOptions::default(), limits)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let d = decoder(if choice & 1 == 0 { "json" } else { "csv" });
    let messages: Vec<_> = rest
        .split(|b| *b == 0xFF)
        .enumerate()
        .map(|(i, payload)| detached_delivery(i as u64, "s/dev-1/r", payload))
        .collect();
    let out = d.decode(&messages);
    // Every row of every batch has its message.
    for b in &out.batches {
        assert_eq!(out.lines.row_seqs(b).len(), b.batch.num_rows());
    }
});
