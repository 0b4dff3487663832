//! The file sinks (`parquet`, `csv`, `ndjson`, `arrow`): files in a directory, written
//! atomically; for streams they roll by time and size.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Place;
use crate::diag::Diagnostic;
use crate::object::{self, S3Options};
use crate::spec::{Compression, FileSinkSpec, SinkSpec, parse_compression, single_byte};
use crate::stream::Rolling;
use crate::types::Format;
use crate::units::{ByteSize, Span};

/// The keys of a file sink; `format` is read only to say that the type sets it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFileSink {
    path: Option<PathBuf>,
    format: Option<Format>,
    partition_by: Option<Vec<String>>,
    compression: Option<String>,
    header: Option<bool>,
    delimiter: Option<String>,
    max_open_files: Option<usize>,
    row_group_rows: Option<usize>,
    roll_interval: Option<Span>,
    roll_size: Option<ByteSize>,
    s3: Option<S3Options>,
}

pub(crate) fn resolve(
    s: RawFileSink,
    format: Format,
    at: &Place<'_>,
    out: &mut Vec<Diagnostic>,
) -> Option<SinkSpec> {
    if s.format.is_some() {
        out.push(
            at.diag("format", "is set by the sink type")
                .with_help("remove it; `type: parquet` already says the format"),
        );
    }
    let kind = format.to_string();
    if format != Format::Parquet {
        if s.compression.is_some() {
            out.push(at.not_for("compression", &kind));
        }
        if s.row_group_rows.is_some() {
            out.push(at.not_for("row_group_rows", &kind));
        }
    }
    if format != Format::Csv {
        if s.header.is_some() {
            out.push(at.not_for("header", &kind));
        }
        if s.delimiter.is_some() {
            out.push(at.not_for("delimiter", &kind));
        }
    }
    let Some(path) = s.path else {
        out.push(
            at.diag("path", "is required for a file sink")
                .with_help(format!(
                    "add `path: out/{}`, the directory the files go into",
                    format.extension()
                )),
        );
        return None;
    };
    let (path, object) = if object::is_object_url(&path) {
        let url = path.to_string_lossy().into_owned();
        match object::parse_url(&url, s.s3.unwrap_or_default()) {
            Ok(target) => (object::staging_dir(&target), Some(target)),
            Err(message) => {
                out.push(at.diag("path", message));
                return None;
            }
        }
    } else {
        if s.s3.is_some() {
            out.push(
                at.diag("s3", "is only for a path in object storage")
                    .with_help("remove it, or write `path: s3://bucket/prefix`"),
            );
        }
        (path, None)
    };
    let partition_by = s.partition_by.unwrap_or_default();
    for (i, col) in partition_by.iter().enumerate() {
        if col.is_empty() || partition_by[..i].contains(col) {
            out.push(at.diag(
                &format!("partition_by[{i}]"),
                format!("`{col}` is empty or repeated"),
            ));
        }
    }
    let compression = match s.compression.as_deref() {
        None => Compression::Zstd(1),
        Some(v) => parse_compression(v).unwrap_or_else(|| {
            out.push(
                at.diag("compression", format!("`{v}` is not a Parquet compression"))
                    .with_help("use zstd, zstd(1..22), snappy, lz4 or none"),
            );
            Compression::Zstd(1)
        }),
    };
    let delimiter = s
        .delimiter
        .and_then(|v| single_byte(&v, format!("{}.delimiter", at.base), at.file, out))
        .unwrap_or(b',');
    Some(SinkSpec::File(FileSinkSpec {
        path,
        format,
        partition_by,
        compression,
        row_group_rows: s.row_group_rows.unwrap_or(1 << 20).max(1),
        header: s.header.unwrap_or(true),
        delimiter,
        max_open_files: s.max_open_files.unwrap_or(256).max(1),
        rolling: Rolling {
            interval: s.roll_interval.map_or(Rolling::default().interval, |d| {
                d.0.max(Duration::from_millis(100))
            }),
            size: s.roll_size.map_or(Rolling::default().size, |b| b.0.max(1)),
        },
        object,
    }))
}
