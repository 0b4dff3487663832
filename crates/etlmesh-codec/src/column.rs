//! Column accumulators for the text decoders: typed vectors that can be cut back to a
//! row boundary, so that a record found bad halfway through leaves no trace.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float32Array, Float64Array, Int32Array, Int64Array,
    StringArray, TimestampMicrosecondArray, TimestampMillisecondArray, TimestampNanosecondArray,
    TimestampSecondArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, TimeUnit};
use arrow::error::ArrowError;

use crate::parse;

/// Why a value did not fit its column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueError {
    /// The text is not a value of the column's type.
    Invalid,
    /// The text is not valid UTF-8.
    Utf8,
    /// A required value is missing.
    Missing,
}

#[derive(Debug)]
enum Values {
    Utf8 { offsets: Vec<i32>, data: Vec<u8> },
    Bool(Vec<bool>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Date(Vec<i32>),
    Ts(Vec<i64>, TimeUnit),
}

/// One column under construction.
#[derive(Debug)]
pub struct ColumnBuilder {
    values: Values,
    valid: Vec<bool>,
    nullable: bool,
}

impl ColumnBuilder {
    /// A builder for `field`'s type.
    pub fn new(field: &Field, capacity: usize) -> Result<Self, ArrowError> {
        let values = match field.data_type() {
            DataType::Utf8 => Values::Utf8 {
                offsets: {
                    let mut o = Vec::with_capacity(capacity + 1);
                    o.push(0);
                    o
                },
                data: Vec::with_capacity(capacity * 8),
            },
            DataType::Boolean => Values::Bool(Vec::with_capacity(capacity)),
            DataType::Int32 => Values::I32(Vec::with_capacity(capacity)),
            DataType::Int64 => Values::I64(Vec::with_capacity(capacity)),
            DataType::Float32 => Values::F32(Vec::with_capacity(capacity)),
            DataType::Float64 => Values::F64(Vec::with_capacity(capacity)),
            DataType::Date32 => Values::Date(Vec::with_capacity(capacity)),
            DataType::Timestamp(unit, _) => Values::Ts(Vec::with_capacity(capacity), *unit),
            other => {
                return Err(ArrowError::NotYetImplemented(format!(
                    "text decoding into {other} (field `{}`)",
                    field.name()
                )));
            }
        };
        Ok(Self {
            values,
            valid: Vec::with_capacity(capacity),
            nullable: field.is_nullable(),
        })
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.valid.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.valid.is_empty()
    }

    /// Whether this is a text column (which keeps any value as its text).
    pub fn is_text(&self) -> bool {
        matches!(self.values, Values::Utf8 { .. })
    }

    /// Cuts back to `len` rows.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.valid.len() {
            return;
        }
        self.valid.truncate(len);
        match &mut self.values {
            Values::Utf8 { offsets, data } => {
                offsets.truncate(len + 1);
                data.truncate(offsets[len] as usize);
            }
            Values::Bool(v) => v.truncate(len),
            Values::I32(v) | Values::Date(v) => v.truncate(len),
            Values::I64(v) | Values::Ts(v, _) => v.truncate(len),
            Values::F32(v) => v.truncate(len),
            Values::F64(v) => v.truncate(len),
        }
    }

    /// Appends a null (an error for a required field).
    pub fn push_null(&mut self) -> Result<(), ValueError> {
        if !self.nullable {
            return Err(ValueError::Missing);
        }
        self.valid.push(false);
        match &mut self.values {
            Values::Utf8 { offsets, data } => offsets.push(data.len() as i32),
            Values::Bool(v) => v.push(false),
            Values::I32(v) | Values::Date(v) => v.push(0),
            Values::I64(v) | Values::Ts(v, _) => v.push(0),
            Values::F32(v) => v.push(0.0),
            Values::F64(v) => v.push(0.0),
        }
        Ok(())
    }

    /// Appends a value given as text. `utf8_checked` says the bytes are known to be UTF-8.
    pub fn push_text(&mut self, b: &[u8], utf8_checked: bool) -> Result<(), ValueError> {
        match &mut self.values {
            Values::Utf8 { offsets, data } => {
                if !utf8_checked && std::str::from_utf8(b).is_err() {
                    return Err(ValueError::Utf8);
                }
                data.extend_from_slice(b);
                offsets.push(data.len() as i32);
            }
            Values::Bool(v) => v.push(parse::parse_bool(b).ok_or(ValueError::Invalid)?),
            Values::I32(v) => v.push(
                parse::parse_i64(b)
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or(ValueError::Invalid)?,
            ),
            Values::I64(v) => v.push(parse::parse_i64(b).ok_or(ValueError::Invalid)?),
            Values::F32(v) => v.push(parse::parse_f64(b).ok_or(ValueError::Invalid)? as f32),
            Values::F64(v) => v.push(parse::parse_f64(b).ok_or(ValueError::Invalid)?),
            Values::Date(v) => v.push(parse::parse_date(b).ok_or(ValueError::Invalid)?),
            Values::Ts(v, unit) => {
                let nanos = parse::parse_timestamp_nanos(b).ok_or(ValueError::Invalid)?;
                v.push(from_nanos(nanos, *unit));
            }
        }
        self.valid.push(true);
        Ok(())
    }

    /// Appends a JSON number given by its text; integers into timestamps are epoch ms.
    pub fn push_number(&mut self, b: &[u8]) -> Result<(), ValueError> {
        match &mut self.values {
            Values::I32(_)
            | Values::I64(_)
            | Values::F32(_)
            | Values::F64(_)
            | Values::Utf8 { .. } => self.push_text(b, true),
            Values::Ts(v, unit) => {
                let ms = match parse::parse_i64(b) {
                    Some(ms) => ms,
                    None => parse::parse_f64(b)
                        .filter(|f| f.is_finite())
                        .ok_or(ValueError::Invalid)? as i64,
                };
                v.push(from_nanos(
                    ms.checked_mul(1_000_000).ok_or(ValueError::Invalid)?,
                    *unit,
                ));
                self.valid.push(true);
                Ok(())
            }
            Values::Bool(_) | Values::Date(_) => Err(ValueError::Invalid),
        }
    }

    /// Appends a JSON boolean.
    pub fn push_bool(&mut self, value: bool) -> Result<(), ValueError> {
        match &mut self.values {
            Values::Bool(v) => v.push(value),
            Values::Utf8 { offsets, data } => {
                data.extend_from_slice(if value { b"true" } else { b"false" });
                offsets.push(data.len() as i32);
            }
            _ => return Err(ValueError::Invalid),
        }
        self.valid.push(true);
        Ok(())
    }

    /// Bytes of text held (to bound a batch's size).
    pub fn text_bytes(&self) -> usize {
        match &self.values {
            Values::Utf8 { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// Builds the array and empties the builder.
    pub fn finish(&mut self) -> Result<ArrayRef, ArrowError> {
        let valid = std::mem::take(&mut self.valid);
        let nulls = if valid.iter().all(|v| *v) {
            None
        } else {
            Some(NullBuffer::from(valid))
        };
        Ok(match &mut self.values {
            Values::Utf8 { offsets, data } => {
                let offsets = std::mem::replace(offsets, vec![0]);
                let data = std::mem::take(data);
                Arc::new(StringArray::try_new(
                    OffsetBuffer::new(ScalarBuffer::from(offsets)),
                    data.into(),
                    nulls,
                )?)
            }
            Values::Bool(v) => Arc::new(BooleanArray::new(std::mem::take(v).into(), nulls)),
            Values::I32(v) => Arc::new(Int32Array::new(std::mem::take(v).into(), nulls)),
            Values::I64(v) => Arc::new(Int64Array::new(std::mem::take(v).into(), nulls)),
            Values::F32(v) => Arc::new(Float32Array::new(std::mem::take(v).into(), nulls)),
            Values::F64(v) => Arc::new(Float64Array::new(std::mem::take(v).into(), nulls)),
            Values::Date(v) => Arc::new(Date32Array::new(std::mem::take(v).into(), nulls)),
            Values::Ts(v, unit) => {
                let v = ScalarBuffer::from(std::mem::take(v));
                let utc: Option<Arc<str>> = Some("UTC".into());
                match unit {
                    TimeUnit::Second => {
                        Arc::new(TimestampSecondArray::new(v, nulls).with_timezone_opt(utc))
                    }
                    TimeUnit::Millisecond => {
                        Arc::new(TimestampMillisecondArray::new(v, nulls).with_timezone_opt(utc))
                    }
                    TimeUnit::Microsecond => {
                        Arc::new(TimestampMicrosecondArray::new(v, nulls).with_timezone_opt(utc))
                    }
                    TimeUnit::Nanosecond => {
                        Arc::new(TimestampNanosecondArray::new(v, nulls).with_timezone_opt(utc))
                    }
                }
            }
        })
    }
}

fn from_nanos(nanos: i64, unit: TimeUnit) -> i64 {
    match unit {
        TimeUnit::Second => nanos.div_euclid(1_000_000_000),
        TimeUnit::Millisecond => nanos.div_euclid(1_000_000),
        TimeUnit::Microsecond => nanos.div_euclid(1_000),
        TimeUnit::Nanosecond => nanos,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Array;

    #[test]
    fn truncate_drops_a_half_built_row() {
        let mut c = ColumnBuilder::new(&Field::new("s", DataType::Utf8, true), 4).expect("builder");
        c.push_text(b"one", false).expect("push");
        c.push_text(b"two", false).expect("push");
        c.truncate(1);
        c.push_null().expect("null");
        let a = c.finish().expect("finish");
        let s = a.as_any().downcast_ref::<StringArray>().expect("strings");
        assert_eq!(s.len(), 2);
        assert_eq!(s.value(0), "one");
        assert!(s.is_null(1));
    }

    #[test]
    fn typed_errors() {
        let mut f =
            ColumnBuilder::new(&Field::new("f", DataType::Float64, false), 4).expect("builder");
        assert_eq!(f.push_text(b"abc", false), Err(ValueError::Invalid));
        assert_eq!(f.push_null(), Err(ValueError::Missing));
        let mut s = ColumnBuilder::new(&Field::new("s", DataType::Utf8, true), 4).expect("builder");
        assert_eq!(s.push_text(&[0xff, 0xfe], false), Err(ValueError::Utf8));
    }

    #[test]
    fn timestamps_from_text_and_epoch_numbers() {
        let field = Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        );
        let mut t = ColumnBuilder::new(&field, 2).expect("builder");
        t.push_text(b"1970-01-01T00:00:01Z", true).expect("rfc3339");
        t.push_number(b"2500").expect("epoch ms");
        let a = t.finish().expect("finish");
        let a = a
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .expect("ts");
        assert_eq!(a.values().to_vec(), vec![1000, 2500]);
    }
}
