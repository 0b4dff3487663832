//! The standard-output sink (batch runs).

use serde::Deserialize;

use super::Place;
use crate::diag::Diagnostic;
use crate::spec::SinkSpec;
use crate::types::Format;

/// `{ type: stdout, format }`. The file sinks' keys are read only to say that they do
/// not apply here, together with every other mistake of the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStdoutSink {
    format: Option<Format>,
    path: Option<serde::de::IgnoredAny>,
    partition_by: Option<serde::de::IgnoredAny>,
    compression: Option<serde::de::IgnoredAny>,
    max_open_files: Option<serde::de::IgnoredAny>,
    row_group_rows: Option<serde::de::IgnoredAny>,
}

pub(crate) fn resolve(s: RawStdoutSink, at: &Place<'_>, out: &mut Vec<Diagnostic>) -> SinkSpec {
    for (set, field) in [
        (s.path.is_some(), "path"),
        (s.partition_by.is_some(), "partition_by"),
        (s.compression.is_some(), "compression"),
        (s.max_open_files.is_some(), "max_open_files"),
        (s.row_group_rows.is_some(), "row_group_rows"),
    ] {
        if set {
            out.push(at.not_for(field, "stdout"));
        }
    }
    let format = s.format.unwrap_or(Format::Ndjson);
    if matches!(format, Format::Parquet | Format::Json) {
        out.push(
            at.diag("format", format!("stdout cannot stream `{format}`"))
                .with_help("use ndjson, csv or arrow on stdout, or a file sink for parquet"),
        );
    }
    SinkSpec::Stdout { format }
}
