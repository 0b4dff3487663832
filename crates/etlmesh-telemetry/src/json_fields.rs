//! A lean JSON field formatter for the `fmt` layer's JSON output.
//!
//! `tracing-subscriber` formats a span's fields when the span is created and keeps the
//! text, whether or not a line is ever logged in the span. Its `JsonFields` goes
//! through a `BTreeMap` and `serde_json` for that; with a span per request that cost
//! showed in the gateway's and workers' profiles. [`LeanJsonFields`] writes the same
//! JSON object directly (strings escaped, numbers and booleans as they are), so that
//! `Format<Json>` still reads it when a line is logged.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::Writer;

/// Formats fields as one JSON object, without intermediate maps.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeanJsonFields;

/// Writes `s` as a JSON string body (without the quotes).
pub(crate) fn escape(out: &mut impl Write, s: &str) -> fmt::Result {
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let esc = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 => "",
            _ => continue,
        };
        out.write_str(&s[start..i])?;
        if esc.is_empty() {
            write!(out, "\\u{:04x}", c as u32)?;
        } else {
            out.write_str(esc)?;
        }
        start = i + c.len_utf8();
    }
    out.write_str(&s[start..])
}

/// Adapts `fmt::Write` so that `Debug` output is escaped as it is written.
struct Escaping<'a, W: Write>(&'a mut W);

impl<W: Write> Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape(self.0, s)
    }
}

struct Visitor<'a, W: Write> {
    out: &'a mut W,
    first: bool,
    result: fmt::Result,
}

impl<W: Write> Visitor<'_, W> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        if !self.first {
            self.out.write_char(',')?;
        }
        self.first = false;
        self.out.write_char('"')?;
        escape(self.out, field.name())?;
        self.out.write_str("\":")
    }

    fn raw(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| self.out.write_fmt(value));
        }
    }
}

impl<W: Write> Visit for Visitor<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| {
                self.out.write_char('"')?;
                escape(self.out, value)?;
                self.out.write_char('"')
            });
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| {
                self.out.write_char('"')?;
                write!(Escaping(self.out), "{value:?}")?;
                self.out.write_char('"')
            });
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.raw(field, format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }
}

fn write_fields<W: Write, R: RecordFields>(out: &mut W, fields: R, first: bool) -> fmt::Result {
    let mut v = Visitor {
        out,
        first,
        result: Ok(()),
    };
    fields.record(&mut v);
    v.result
}

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for LeanJsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        writer.write_char('{')?;
        write_fields(&mut writer, fields, true)?;
        writer.write_char('}')
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if current.fields.is_empty() {
            return self.format_fields(current.as_writer(), fields);
        }
        // `{…}` becomes `{…,new}`.
        let had_fields = current.fields.len() > 2;
        current.fields.pop();
        write_fields(&mut current.fields, fields, !had_fields)?;
        current.fields.push('}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_buf::Buf;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn json_lines_carry_span_fields_escaped() {
        let buf = Buf::default();
        let out = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || out.clone())
            .json()
            .flatten_event(true)
            .fmt_fields(LeanJsonFields);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", pipeline = %"cl\"ean", n = 3u64, ok = true);
            span.record("n", 4u64);
            span.in_scope(|| tracing::info!(x = 1.5, text = "a\nb", "served"));
        });
        let lines = buf.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line: serde_json::Value = serde_json::from_str(&lines[0]).expect("one JSON line");
        assert_eq!(line["message"], "served");
        assert_eq!(line["text"], "a\nb");
        assert_eq!(line["span"]["pipeline"], "cl\"ean");
        assert_eq!(line["span"]["ok"], true);
        assert_eq!(line["span"]["name"], "request");
    }
}
