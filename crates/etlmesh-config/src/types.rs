//! Data formats and field types, as named in pipeline files.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A data format, for sources, sinks, request and response bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Comma-separated values (RFC 4180), with or without a header.
    Csv,
    /// One JSON object per line.
    #[serde(alias = "jsonl", alias = "json_lines")]
    Ndjson,
    /// One JSON array of objects.
    Json,
    /// Apache Parquet.
    Parquet,
    /// Arrow IPC (file or stream).
    #[serde(alias = "ipc", alias = "arrow_ipc", alias = "feather")]
    Arrow,
}

impl Format {
    /// Every format, for messages.
    pub const ALL: [Format; 5] = [
        Format::Csv,
        Format::Ndjson,
        Format::Json,
        Format::Parquet,
        Format::Arrow,
    ];

    /// The format a file name suggests.
    pub fn from_path(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let name = name.strip_suffix(".tmp").unwrap_or(&name);
        let ext = name.rsplit('.').next()?;
        Some(match ext {
            "csv" | "tsv" => Format::Csv,
            "ndjson" | "jsonl" => Format::Ndjson,
            "json" => Format::Json,
            "parquet" | "pq" => Format::Parquet,
            "arrow" | "ipc" | "feather" | "arrows" => Format::Arrow,
            _ => return None,
        })
    }

    /// Parses a name as written in files and on the command line.
    pub fn from_name(name: &str) -> Option<Format> {
        Some(match name.to_ascii_lowercase().as_str() {
            "csv" => Format::Csv,
            "ndjson" | "jsonl" | "json_lines" => Format::Ndjson,
            "json" => Format::Json,
            "parquet" => Format::Parquet,
            "arrow" | "ipc" | "arrow_ipc" | "feather" => Format::Arrow,
            _ => return None,
        })
    }

    /// The file extension written by sinks.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
            Format::Json => "json",
            Format::Parquet => "parquet",
            Format::Arrow => "arrow",
        }
    }

    /// The HTTP content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv",
            Format::Ndjson => "application/x-ndjson",
            Format::Json => "application/json",
            Format::Parquet => "application/vnd.apache.parquet",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }

    /// The content types of every format, for messages that say what to send.
    pub const CONTENT_TYPES: &'static str = "text/csv, application/x-ndjson, application/json, application/vnd.apache.parquet or application/vnd.apache.arrow.stream";

    /// The format of an HTTP content type (parameters such as `; charset=utf-8` are ignored).
    pub fn from_content_type(ct: &str) -> Option<Format> {
        let base = ct.split(';').next()?.trim().to_ascii_lowercase();
        Some(match base.as_str() {
            "text/csv" | "application/csv" => Format::Csv,
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/json-lines" => Format::Ndjson,
            "application/json" => Format::Json,
            "application/vnd.apache.parquet" | "application/parquet" | "application/x-parquet" => {
                Format::Parquet
            }
            "application/vnd.apache.arrow.stream"
            | "application/vnd.apache.arrow.file"
            | "application/x-arrow" => Format::Arrow,
            _ => return None,
        })
    }

    /// The format an HTTP `Accept` header asks for: the first it names, `default` when
    /// it is absent or accepts anything (`*/*`); `Err` with the header when it names
    /// none that can be written.
    pub fn from_accept(accept: Option<&str>, default: Format) -> Result<Format, String> {
        let Some(accept) = accept else {
            return Ok(default);
        };
        let mut any = false;
        for part in accept.split(',') {
            let mime = part.split(';').next().unwrap_or("").trim();
            if mime == "*/*" || mime.is_empty() {
                any = true;
                continue;
            }
            if let Some(f) = Format::from_content_type(mime) {
                return Ok(f);
            }
        }
        if any {
            Ok(default)
        } else {
            Err(accept.to_string())
        }
    }

    /// Whether records are text lines (so that positions are line numbers).
    pub fn is_text(self) -> bool {
        matches!(self, Format::Csv | Format::Ndjson | Format::Json)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
            Format::Json => "json",
            Format::Parquet => "parquet",
            Format::Arrow => "arrow",
        })
    }
}

/// The type of a field in a declared schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    /// UTF-8 text.
    Utf8,
    /// true / false.
    Bool,
    /// 32-bit signed integer.
    Int32,
    /// 64-bit signed integer.
    Int64,
    /// 32-bit float.
    Float32,
    /// 64-bit float.
    Float64,
    /// A calendar date.
    Date,
    /// A UTC instant with second precision.
    TimestampS,
    /// A UTC instant with millisecond precision.
    TimestampMs,
    /// A UTC instant with microsecond precision.
    TimestampUs,
    /// A UTC instant with nanosecond precision.
    TimestampNs,
}

impl FieldType {
    /// The names accepted in files, for messages.
    pub const NAMES: &'static [&'static str] = &[
        "utf8",
        "bool",
        "int32",
        "int64",
        "float32",
        "float64",
        "date",
        "timestamp_s",
        "timestamp_ms",
        "timestamp_us",
        "timestamp_ns",
    ];

    /// Parses a type name (with the usual aliases: string, int, double, timestamp...).
    pub fn from_name(name: &str) -> Option<FieldType> {
        Some(match name.trim().to_ascii_lowercase().as_str() {
            "utf8" | "string" | "str" | "text" | "varchar" => FieldType::Utf8,
            "bool" | "boolean" => FieldType::Bool,
            "int32" | "int" | "integer" | "i32" => FieldType::Int32,
            "int64" | "bigint" | "long" | "i64" => FieldType::Int64,
            "float32" | "float" | "real" | "f32" => FieldType::Float32,
            "float64" | "double" | "f64" => FieldType::Float64,
            "date" | "date32" => FieldType::Date,
            "timestamp_s" => FieldType::TimestampS,
            "timestamp_ms" | "timestamp" => FieldType::TimestampMs,
            "timestamp_us" => FieldType::TimestampUs,
            "timestamp_ns" => FieldType::TimestampNs,
            _ => return None,
        })
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Utf8 => "utf8",
            FieldType::Bool => "bool",
            FieldType::Int32 => "int32",
            FieldType::Int64 => "int64",
            FieldType::Float32 => "float32",
            FieldType::Float64 => "float64",
            FieldType::Date => "date",
            FieldType::TimestampS => "timestamp_s",
            FieldType::TimestampMs => "timestamp_ms",
            FieldType::TimestampUs => "timestamp_us",
            FieldType::TimestampNs => "timestamp_ns",
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One field of a declared schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    /// Column name.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
    /// Whether a record may leave it empty (default true). A record missing a
    /// non-nullable field is dead-lettered.
    pub nullable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_names_every_format_that_reads_back() {
        for f in [
            Format::Csv,
            Format::Ndjson,
            Format::Json,
            Format::Parquet,
            Format::Arrow,
        ] {
            assert!(Format::CONTENT_TYPES.contains(f.content_type()), "{f:?}");
            assert_eq!(Format::from_content_type(f.content_type()), Some(f));
        }
    }

    #[test]
    fn formats_from_paths_and_content_types() {
        assert_eq!(Format::from_path(Path::new("a/b.CSV")), Some(Format::Csv));
        assert_eq!(
            Format::from_path(Path::new("x.jsonl")),
            Some(Format::Ndjson)
        );
        assert_eq!(Format::from_path(Path::new("x.bin")), None);
        assert_eq!(
            Format::from_content_type("text/csv; charset=utf-8"),
            Some(Format::Csv)
        );
        assert_eq!(
            Format::from_content_type("application/vnd.apache.arrow.stream"),
            Some(Format::Arrow)
        );
    }

    #[test]
    fn type_aliases() {
        assert_eq!(FieldType::from_name("string"), Some(FieldType::Utf8));
        assert_eq!(
            FieldType::from_name("timestamp"),
            Some(FieldType::TimestampMs)
        );
        assert_eq!(FieldType::from_name("flaot64"), None);
    }
}
