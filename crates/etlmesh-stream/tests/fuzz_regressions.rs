//! The MQTT message decoder on the inputs that made a fuzz target crash (the codec's
//! `tests/fuzz/`, every target's, since any byte string is a possible payload) and on
//! the `decode_mqtt` seeds, split into messages as `fuzz/fuzz_targets/decode_mqtt.rs`
//! splits them. Beyond "no panic", nothing may be lost: every record seen becomes a
//! row or a reject, and every row is traced to a message of the micro-batch.

use std::path::Path;

use etlmesh_codec::Limits;
use etlmesh_config::{CsvOptions, PipelineFile};
use etlmesh_stream::decode::MessageDecoder;
use etlmesh_stream::source::detached_delivery;

fn decoder(format: &str) -> MessageDecoder {
    let f = PipelineFile::parse(
        "fuzz.yaml",
        format!("pipelines:\n  p:\n    source: {{ type: mqtt, broker: mqtt://h, topic: 's/{{device_id}}/r', format: {format} }}\n    schema: {{ seq: int64, t: float64, ts: timestamp_ms, ok: bool, note: utf8 }}\n    sinks: [{{ type: ndjson, path: o }}]\n    dead_letter: {{ type: ndjson, path: d }}\n"),
    )
    .expect("the test's pipeline file is valid");
    let p = &f.spec.pipelines[0];
    let schema = etlmesh_codec::schema::arrow_schema(p.schema.as_ref().expect("schema"));
    let limits = Limits {
        batch_size: 7,
        max_record_bytes: 512,
    };
    MessageDecoder::new(
        p.stream_source().expect("an MQTT source"),
        &schema,
        &CsvOptions::default(),
        limits,
    )
}

fn inputs() -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut out = Vec::new();
    for dir in ["crates/etlmesh-codec/tests/fuzz", "fuzz/seeds/decode_mqtt"] {
        let dir = root.join(dir);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            let data = std::fs::read(&path).expect("read");
            out.push((path.display().to_string(), data));
        }
    }
    out
}

#[test]
fn crash_inputs_leave_every_message_accounted_for() {
    let inputs = inputs();
    assert!(
        inputs.iter().any(|(p, _)| p.contains("decode_mqtt-")),
        "the MQTT decoder's own crash input is missing"
    );
    let (json, csv) = (decoder("json"), decoder("csv"));
    for (path, data) in &inputs {
        // The first byte is the fuzz target's choice of format; both run here.
        let Some((_, rest)) = data.split_first() else {
            continue;
        };
        for d in [&json, &csv] {
            let messages: Vec<_> = rest
                .split(|b| *b == 0xFF)
                .enumerate()
                .map(|(i, payload)| detached_delivery(i as u64, "s/dev-1/r", payload))
                .collect();
            let out = d.decode(&messages);
            let mut rows = 0;
            for b in &out.batches {
                let seqs = out.lines.row_seqs(b);
                assert_eq!(seqs.len(), b.batch.num_rows(), "{path}");
                assert!(
                    seqs.iter().all(|&s| (s as usize) < messages.len()),
                    "{path}: a row traced to no message: {seqs:?}"
                );
                rows += b.batch.num_rows() as u64;
            }
            assert_eq!(
                rows + out.rejects.len() as u64,
                out.records,
                "{path}: records seen are neither rows nor rejects"
            );
        }
    }
}
