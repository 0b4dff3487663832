//! Arrow schemas from declared fields, and inference from a sample of records.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use etlmesh_config::{FieldSpec, FieldType};

use crate::parse;

/// The Arrow type of a declared field type.
pub fn arrow_type(t: FieldType) -> DataType {
    let utc = || Some(Arc::from("UTC"));
    match t {
        FieldType::Utf8 => DataType::Utf8,
        FieldType::Bool => DataType::Boolean,
        FieldType::Int32 => DataType::Int32,
        FieldType::Int64 => DataType::Int64,
        FieldType::Float32 => DataType::Float32,
        FieldType::Float64 => DataType::Float64,
        FieldType::Date => DataType::Date32,
        FieldType::TimestampS => DataType::Timestamp(TimeUnit::Second, utc()),
        FieldType::TimestampMs => DataType::Timestamp(TimeUnit::Millisecond, utc()),
        FieldType::TimestampUs => DataType::Timestamp(TimeUnit::Microsecond, utc()),
        FieldType::TimestampNs => DataType::Timestamp(TimeUnit::Nanosecond, utc()),
    }
}

/// The Arrow schema of declared fields.
pub fn arrow_schema(fields: &[FieldSpec]) -> SchemaRef {
    Arc::new(Schema::new(
        fields
            .iter()
            .map(|f| Field::new(&f.name, arrow_type(f.ty), f.nullable))
            .collect::<Vec<_>>(),
    ))
}

/// A type's name as written in pipeline files, for messages.
pub fn type_name(t: &DataType) -> String {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "utf8".into(),
        DataType::Boolean => "bool".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(TimeUnit::Second, _) => "timestamp_s".into(),
        DataType::Timestamp(TimeUnit::Millisecond, _) => "timestamp_ms".into(),
        DataType::Timestamp(TimeUnit::Microsecond, _) => "timestamp_us".into(),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => "timestamp_ns".into(),
        other => other.to_string().to_lowercase(),
    }
}

/// A schema as `name: type` lines, the way a user would declare it.
pub fn describe(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), type_name(f.data_type())))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The narrowest type seen so far for one column, widened as values arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Inferred {
    /// Only nulls seen.
    #[default]
    Unknown,
    /// Integers.
    Int,
    /// Numbers with fractions.
    Float,
    /// Booleans.
    Bool,
    /// Dates.
    Date,
    /// Timestamps.
    Timestamp,
    /// Anything else.
    Text,
}

impl Inferred {
    /// The type of a text value (a CSV field or a JSON string).
    pub fn of_text(v: &[u8]) -> Inferred {
        if parse::parse_i64(v).is_some() {
            Inferred::Int
        } else if parse::parse_f64(v).is_some() {
            Inferred::Float
        } else if v.eq_ignore_ascii_case(b"true") || v.eq_ignore_ascii_case(b"false") {
            Inferred::Bool
        } else if parse::parse_date(v).is_some() {
            Inferred::Date
        } else if v.len() > 10 && parse::parse_rfc3339_nanos(v).is_some() {
            Inferred::Timestamp
        } else {
            Inferred::Text
        }
    }

    /// The type that holds both.
    pub fn merge(self, other: Inferred) -> Inferred {
        use Inferred::*;
        match (self, other) {
            (a, b) if a == b => a,
            (Unknown, x) | (x, Unknown) => x,
            (Int, Float) | (Float, Int) => Float,
            (Date, Timestamp) | (Timestamp, Date) => Timestamp,
            _ => Text,
        }
    }

    /// The Arrow type.
    pub fn data_type(self) -> DataType {
        match self {
            Inferred::Int => DataType::Int64,
            Inferred::Float => DataType::Float64,
            Inferred::Bool => DataType::Boolean,
            Inferred::Date => DataType::Date32,
            Inferred::Timestamp => arrow_type(FieldType::TimestampMs),
            Inferred::Unknown | Inferred::Text => DataType::Utf8,
        }
    }
}

/// A schema from column names and inferred types (all nullable).
pub fn inferred_schema(columns: Vec<(String, Inferred)>) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .into_iter()
            .map(|(n, t)| Field::new(n, t.data_type(), true))
            .collect::<Vec<_>>(),
    ))
}

/// A schema as base64 of an Arrow IPC stream holding only it, to pass schemas through
/// JSON (the endpoint set) without losing types.
pub fn schema_to_base64(schema: &Schema) -> Option<String> {
    use base64::Engine as _;
    let mut buf = Vec::new();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, schema).ok()?;
    w.finish().ok()?;
    drop(w);
    Some(base64::engine::general_purpose::STANDARD.encode(buf))
}

/// The schema [`schema_to_base64`] encoded.
pub fn schema_from_base64(text: &str) -> Option<SchemaRef> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).ok()?;
    Some(reader.schema())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_survive_base64() {
        let s = arrow_schema(&[
            FieldSpec {
                name: "a".into(),
                ty: FieldType::TimestampMs,
                nullable: false,
            },
            FieldSpec {
                name: "b".into(),
                ty: FieldType::Utf8,
                nullable: true,
            },
        ]);
        let text = schema_to_base64(&s).expect("encodes");
        assert_eq!(schema_from_base64(&text).expect("decodes"), s);
        assert!(schema_from_base64("not base64!").is_none());
    }

    #[test]
    fn widening() {
        assert_eq!(Inferred::of_text(b"12"), Inferred::Int);
        assert_eq!(Inferred::of_text(b"12.5"), Inferred::Float);
        assert_eq!(
            Inferred::of_text(b"2026-01-01T10:00:00Z"),
            Inferred::Timestamp
        );
        assert_eq!(Inferred::of_text(b"2026-01-01"), Inferred::Date);
        assert_eq!(Inferred::of_text(b"ok"), Inferred::Text);
        assert_eq!(Inferred::Int.merge(Inferred::Float), Inferred::Float);
        assert_eq!(Inferred::Int.merge(Inferred::Text), Inferred::Text);
        assert_eq!(Inferred::Unknown.merge(Inferred::Bool), Inferred::Bool);
    }
}
