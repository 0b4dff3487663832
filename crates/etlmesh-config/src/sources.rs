//! Sources in the pipeline file: [`RawSource`] is the one list of source kinds, each
//! with the keys it takes (closed to unknown ones) — files and standard input here,
//! MQTT in [`crate::stream`], JetStream in [`crate::nats`], Kafka in [`crate::kafka`]. A key of another kind is an
//! unknown key with a "did you mean"; a new kind is its module plus one variant and one
//! arm of [`resolve`].

use std::path::Path;

use serde::Deserialize;

use crate::diag::Diagnostic;
use crate::raw::RawCsv;
use crate::spec::{SourceKind, SourceSpec, resolve_csv};
use crate::types::Format;

/// A source as written.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum RawSource {
    File(RawFileSource),
    Stdin(RawStdinSource),
    Mqtt(crate::stream::RawMqttSource),
    Nats(crate::nats::RawNatsSource),
    Kafka(crate::kafka::RawKafkaSource),
}

/// `{ type: file, path, format, csv, infer_rows }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFileSource {
    path: Option<String>,
    format: Option<Format>,
    csv: Option<RawCsv>,
    infer_rows: Option<usize>,
}

/// `{ type: stdin, format, csv, infer_rows }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStdinSource {
    format: Option<Format>,
    csv: Option<RawCsv>,
    infer_rows: Option<usize>,
}

/// Checks a source and builds its spec.
pub(crate) fn resolve(
    s: RawSource,
    pipeline: &str,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> SourceSpec {
    let csv = |c: Option<RawCsv>, out: &mut Vec<Diagnostic>| {
        resolve_csv(c.unwrap_or_default(), &format!("{base}.csv"), file, out)
    };
    match s {
        RawSource::File(f) => SourceSpec {
            kind: SourceKind::File { path: f.path },
            format: f.format,
            csv: csv(f.csv, out),
            infer_rows: f.infer_rows.unwrap_or(1000).max(1),
        },
        RawSource::Stdin(f) => {
            if f.format.is_none() {
                out.push(
                    Diagnostic::new(
                        file,
                        format!("{base}.format"),
                        "is required for a stdin source",
                    )
                    .with_help("add `format: csv` (or ndjson, json, parquet, arrow)"),
                );
            }
            SourceSpec {
                kind: SourceKind::Stdin,
                format: f.format,
                csv: csv(f.csv, out),
                infer_rows: f.infer_rows.unwrap_or(1000).max(1),
            }
        }
        RawSource::Mqtt(m) => {
            no_header(m.csv.as_ref(), "MQTT", base, file, out);
            let spec = crate::stream::resolve_mqtt(&m, pipeline, base, file, out);
            stream_source(m.format, csv(m.csv, out), SourceKind::Mqtt(Box::new(spec)))
        }
        RawSource::Nats(n) => {
            no_header(n.csv.as_ref(), "NATS", base, file, out);
            let spec = crate::nats::resolve_source(&n, pipeline, base, file, out);
            stream_source(n.format, csv(n.csv, out), SourceKind::Nats(Box::new(spec)))
        }
        RawSource::Kafka(k) => {
            no_header(k.csv.as_ref(), "Kafka", base, file, out);
            let spec = crate::kafka::resolve_source(&k, pipeline, base, file, out);
            stream_source(k.format, csv(k.csv, out), SourceKind::Kafka(Box::new(spec)))
        }
    }
}

/// The source spec of a stream (messages, not files: no schema inference).
fn stream_source(
    format: Option<Format>,
    csv: crate::spec::CsvOptions,
    kind: SourceKind,
) -> SourceSpec {
    SourceSpec {
        format,
        csv,
        kind,
        infer_rows: 1000,
    }
}

/// Stream payloads are CSV lines in the schema's order: a header cannot be.
fn no_header(csv: Option<&RawCsv>, kind: &str, base: &str, file: &Path, out: &mut Vec<Diagnostic>) {
    if csv.and_then(|c| c.header) == Some(true) {
        out.push(
            Diagnostic::new(
                file,
                format!("{base}.csv.header"),
                format!("{kind} CSV payloads carry no header"),
            )
            .with_help("remove it: the fields are read in the schema's order"),
        );
    }
}
