//! Sinks in the pipeline file: one module per kind, each with the keys it takes (a
//! struct closed to unknown keys) and its checks. [`RawSink`] is the one list of sink
//! kinds: `type:` picks the variant, so a key of another kind is an unknown key with a
//! "did you mean", and a new kind is its module plus one variant and one arm below —
//! the compiler names every match that must learn it.

mod file;
pub(crate) mod kafka;
mod mqtt;
mod postgres;
mod stdout;

use std::path::Path;

use serde::Deserialize;

use crate::diag::Diagnostic;
use crate::spec::SinkSpec;
use crate::types::Format;

/// A sink as written.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum RawSink {
    Parquet(file::RawFileSink),
    Csv(file::RawFileSink),
    Ndjson(file::RawFileSink),
    Arrow(file::RawFileSink),
    Stdout(stdout::RawStdoutSink),
    Postgres(postgres::RawPostgresSink),
    Mqtt(mqtt::RawMqttSink),
    Nats(crate::nats::RawNatsSink),
    Kafka(kafka::RawKafkaSink),
}

/// Checks a sink and builds its spec; `None` when it cannot be built (the diagnostics
/// say why).
pub(crate) fn resolve(
    s: RawSink,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> Option<SinkSpec> {
    let at = Place { base, file };
    match s {
        RawSink::Parquet(f) => file::resolve(f, Format::Parquet, &at, out),
        RawSink::Csv(f) => file::resolve(f, Format::Csv, &at, out),
        RawSink::Ndjson(f) => file::resolve(f, Format::Ndjson, &at, out),
        RawSink::Arrow(f) => file::resolve(f, Format::Arrow, &at, out),
        RawSink::Stdout(s) => Some(stdout::resolve(s, &at, out)),
        RawSink::Postgres(p) => Some(postgres::resolve(p, &at, out)),
        RawSink::Mqtt(m) => Some(mqtt::resolve(m, &at, out)),
        RawSink::Nats(n) => Some(SinkSpec::Nats(crate::nats::resolve_sink(
            &n, base, file, out,
        ))),
        RawSink::Kafka(k) => Some(kafka::resolve(k, &at, out)),
    }
}

/// Where a sink is in the file: diagnostics name its keys.
pub(crate) struct Place<'a> {
    pub base: &'a str,
    pub file: &'a Path,
}

impl Place<'_> {
    /// A diagnostic on key `field` of the sink.
    pub fn diag(&self, field: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(self.file, format!("{}.{field}", self.base), message)
    }

    /// "`field` is not a setting of a `kind` sink".
    pub fn not_for(&self, field: &str, kind: &str) -> Diagnostic {
        self.diag(field, format!("is not a setting of a `{kind}` sink"))
            .with_help("remove it")
    }
}
