//! JSON into Arrow: NDJSON (an object per line) and JSON arrays (an object per
//! element, located by the chunker). A small scanner reads each flat object straight
//! into the column builders; nested objects and arrays are kept as JSON text in text
//! columns. A record with a syntax error or a value that does not fit becomes a
//! [`Reject`] and the rest go on.

use std::borrow::Cow;

use arrow::datatypes::SchemaRef;

use crate::CodecError;
use crate::chunk::Chunk;
use crate::column::ValueError;
use crate::decode::{BatchAssembler, DecodeOutput, Limits, show};
use crate::record::{Reject, Stage};

/// Decodes a chunk of NDJSON lines, or of JSON array elements when the chunk has spans.
pub fn decode_json(
    chunk: &Chunk,
    schema: &SchemaRef,
    limits: &Limits,
) -> Result<DecodeOutput, CodecError> {
    let mut asm = BatchAssembler::new(schema.clone(), chunk, limits)?;
    let names: Vec<&[u8]> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_bytes())
        .collect();
    let plain_names = names
        .iter()
        .map(|n| !n.iter().any(|c| matches!(c, b'"' | b'\\')))
        .collect();
    let mut rd = RecordDecoder {
        names,
        plain_names,
        seen: vec![false; schema.fields().len()],
        scratch: Vec::new(),
        schema,
        utf8_ok: std::str::from_utf8(&chunk.data).is_ok(),
    };
    let data = &chunk.data[..];
    let mut handle = |asm: &mut BatchAssembler<'_>, start: usize, end: usize, line: u64| {
        if (end - start) as u64 > limits.max_record_bytes {
            asm.reject(
                Reject::new(
                    &chunk.source,
                    Stage::Limit,
                    format!(
                        "record is {} bytes, over max_record_bytes = {}",
                        end - start,
                        limits.max_record_bytes
                    ),
                    chunk.data.slice(start..end),
                )
                .at_line(line),
            );
            return;
        }
        match rd.decode(&data[start..end], asm) {
            Ok(()) => asm.commit(start, end, line),
            Err((stage, field, reason)) => asm.fail_row(stage, field, reason, start, end, line),
        }
    };
    match &chunk.spans {
        Some(spans) => {
            for s in spans {
                handle(
                    &mut asm,
                    s.start as usize,
                    (s.start + s.len) as usize,
                    s.line,
                );
            }
        }
        None => {
            let mut line = chunk.first_line;
            let mut pos = 0;
            while pos < data.len() {
                let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i);
                let mut rec_end = end;
                if rec_end > pos && data[rec_end - 1] == b'\r' {
                    rec_end -= 1;
                }
                if !data[pos..rec_end].iter().all(u8::is_ascii_whitespace) {
                    handle(&mut asm, pos, rec_end, line);
                }
                line += 1;
                pos = end + 1;
            }
        }
    }
    asm.finish()
}

type Failure = (Stage, Option<String>, String);

struct RecordDecoder<'s> {
    names: Vec<&'s [u8]>,
    /// Whether each name can be matched byte for byte (no quote or backslash in it).
    plain_names: Vec<bool>,
    seen: Vec<bool>,
    scratch: Vec<u8>,
    schema: &'s SchemaRef,
    utf8_ok: bool,
}

/// A JSON value's kind and text, as found by the scanner.
enum Value<'a> {
    Null,
    Bool(bool),
    Number(&'a [u8]),
    Str(Cow<'a, [u8]>),
    Nested(&'a [u8]),
}

impl RecordDecoder<'_> {
    /// The length of column `hint`'s name when the key quoted at `at` is exactly that
    /// name (names with quotes or backslashes are always read in full).
    fn expected_key(&self, rec: &[u8], at: usize, hint: usize) -> Option<usize> {
        let name = *self.names.get(hint)?;
        let after = at + 1 + name.len();
        (self.plain_names[hint]
            && rec.get(after) == Some(&b'"')
            && same_bytes(&rec[at + 1..after], name))
        .then_some(name.len())
    }

    fn column(&self, key: &[u8], hint: usize) -> Option<usize> {
        if self.names.get(hint) == Some(&key) {
            return Some(hint);
        }
        self.names.iter().position(|n| *n == key)
    }

    fn decode(&mut self, rec: &[u8], asm: &mut BatchAssembler<'_>) -> Result<(), Failure> {
        let syntax = |at: usize, what: &str| {
            (
                Stage::Decode,
                None,
                format!("invalid JSON at column {}: {what}", at + 1),
            )
        };
        self.seen.iter_mut().for_each(|s| *s = false);
        let mut sc = Scanner { b: rec, i: 0 };
        sc.ws();
        if sc.peek() != Some(b'{') {
            return Err((
                Stage::Decode,
                None,
                match sc.peek() {
                    Some(c) => format!("expected a JSON object, found {}", show(&[c])),
                    None => "empty record".into(),
                },
            ));
        }
        sc.i += 1;
        sc.ws();
        let mut hint = 0;
        if sc.peek() == Some(b'}') {
            sc.i += 1;
        } else {
            loop {
                sc.ws();
                if sc.peek() != Some(b'"') {
                    return Err(syntax(sc.i, "expected a key in double quotes"));
                }
                let col = match self.expected_key(rec, sc.i, hint) {
                    // The usual case: the next column's name, in the file's order.
                    Some(len) => {
                        sc.i += len + 2;
                        Some(hint)
                    }
                    None => {
                        let key = sc
                            .string(&mut self.scratch)
                            .map_err(|at| syntax(at, "unterminated or malformed key"))?;
                        self.column(&key, hint)
                    }
                };
                sc.ws();
                if sc.peek() != Some(b':') {
                    return Err(syntax(sc.i, "expected `:` after a key"));
                }
                sc.i += 1;
                sc.ws();
                let at = sc.i;
                let value = sc
                    .value(&mut self.scratch)
                    .map_err(|(at, what)| syntax(at, what))?;
                if let Some(col) = col {
                    hint = col + 1;
                    if self.seen[col] {
                        return Err((
                            Stage::Decode,
                            Some(field_name(self.schema, col)),
                            "the key appears twice".into(),
                        ));
                    }
                    self.seen[col] = true;
                    self.push(col, value, &rec[at..sc.i], asm)?;
                }
                sc.ws();
                match sc.peek() {
                    Some(b',') => sc.i += 1,
                    Some(b'}') => {
                        sc.i += 1;
                        break;
                    }
                    Some(_) => return Err(syntax(sc.i, "expected `,` or `}` after a value")),
                    None => {
                        return Err(syntax(sc.i, "the object is not closed (a truncated line?)"));
                    }
                }
            }
        }
        sc.ws();
        if sc.i < rec.len() {
            return Err(syntax(sc.i, "text after the end of the object"));
        }
        for col in 0..self.seen.len() {
            if !self.seen[col] && asm.column(col).push_null().is_err() {
                return Err((
                    Stage::Cast,
                    Some(field_name(self.schema, col)),
                    "is required but missing".into(),
                ));
            }
        }
        Ok(())
    }

    fn push(
        &self,
        col: usize,
        value: Value<'_>,
        text: &[u8],
        asm: &mut BatchAssembler<'_>,
    ) -> Result<(), Failure> {
        let b = asm.column(col);
        let res = match &value {
            Value::Null => b.push_null(),
            Value::Bool(v) => b.push_bool(*v),
            Value::Number(n) => b.push_number(n),
            Value::Str(s) => b.push_text(s, self.utf8_ok && matches!(s, Cow::Borrowed(_))),
            Value::Nested(raw) if b.is_text() => b.push_text(raw, self.utf8_ok),
            Value::Nested(_) => Err(ValueError::Invalid),
        };
        res.map_err(|e| {
            let field = self.schema.field(col);
            let reason = match e {
                ValueError::Invalid => format!(
                    "cannot read {} as {}",
                    show(text),
                    crate::schema::type_name(field.data_type())
                ),
                ValueError::Utf8 => "invalid UTF-8".into(),
                ValueError::Missing => "is required but null".into(),
            };
            let stage = if e == ValueError::Utf8 {
                Stage::Decode
            } else {
                Stage::Cast
            };
            (stage, Some(field.name().clone()), reason)
        })
    }
}

/// Whether two slices of the same length hold the same bytes, compared eight at a
/// time in line: a call to `memcmp` for every key of every record cost 6 % of a run.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        let mut wx = [0u8; 8];
        let mut wy = [0u8; 8];
        wx.copy_from_slice(x);
        wy.copy_from_slice(y);
        if u64::from_ne_bytes(wx) != u64::from_ne_bytes(wy) {
            return false;
        }
    }
    ca.remainder()
        .iter()
        .zip(cb.remainder())
        .all(|(x, y)| x == y)
}

fn field_name(schema: &SchemaRef, col: usize) -> String {
    schema.field(col).name().clone()
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, scratch: &mut Vec<u8>) -> Result<Value<'a>, (usize, &'static str)> {
        let at = self.i;
        match self.peek() {
            Some(b'"') => self
                .string(scratch)
                .map(|s| {
                    Value::Str(match s {
                        Cow::Borrowed(b) => Cow::Borrowed(b),
                        Cow::Owned(o) => Cow::Owned(o),
                    })
                })
                .map_err(|at| (at, "unterminated or malformed string")),
            Some(b'-' | b'0'..=b'9') => {
                while matches!(
                    self.peek(),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    self.i += 1;
                }
                Ok(Value::Number(&self.b[at..self.i]))
            }
            Some(b't') if self.literal(b"true") => Ok(Value::Bool(true)),
            Some(b'f') if self.literal(b"false") => Ok(Value::Bool(false)),
            Some(b'n') if self.literal(b"null") => Ok(Value::Null),
            Some(b'{' | b'[') => {
                self.skip_nested()
                    .map_err(|at| (at, "unterminated object or array"))?;
                Ok(Value::Nested(&self.b[at..self.i]))
            }
            Some(_) => Err((at, "expected a value")),
            None => Err((
                at,
                "the record ends where a value was expected (a truncated line?)",
            )),
        }
    }

    fn skip_nested(&mut self) -> Result<(), usize> {
        let mut depth = 0u32;
        while let Some(c) = self.peek() {
            match c {
                b'"' => {
                    let mut scratch = Vec::new();
                    self.string(&mut scratch)?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        self.i += 1;
                        return Ok(());
                    }
                }
                _ => {}
            }
            self.i += 1;
        }
        Err(self.i)
    }

    /// A string at `self.i` (on its opening quote): borrowed when it has no escapes.
    fn string<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Result<Cow<'a, [u8]>, usize> {
        let start = self.i + 1;
        let mut i = start;
        let b = self.b;
        // Most strings are short: look at their first bytes in line before memchr.
        let head = &b[start..b.len().min(start + 32)];
        if let Some(off) = quote_or_backslash(head)
            && head[off] == b'"'
        {
            self.i = start + off + 1;
            return Ok(Cow::Borrowed(&b[start..start + off]));
        }
        match memchr::memchr2(b'"', b'\\', &b[i..]) {
            None => return Err(self.i),
            Some(off) if b[i + off] == b'"' => {
                self.i = i + off + 1;
                return Ok(Cow::Borrowed(&b[start..i + off]));
            }
            Some(_) => {}
        }
        scratch.clear();
        loop {
            let Some(off) = memchr::memchr2(b'"', b'\\', &b[i..]) else {
                return Err(self.i);
            };
            scratch.extend_from_slice(&b[i..i + off]);
            i += off;
            if b[i] == b'"' {
                self.i = i + 1;
                return Ok(Cow::Owned(scratch.clone()));
            }
            let esc = *b.get(i + 1).ok_or(i)?;
            i += 2;
            let c = match esc {
                b'"' => b'"',
                b'\\' => b'\\',
                b'/' => b'/',
                b'b' => 8,
                b'f' => 12,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'u' => {
                    let mut cp = hex4(b.get(i..i + 4).ok_or(i)?).ok_or(i)?;
                    i += 4;
                    if (0xD800..0xDC00).contains(&cp) {
                        if b.get(i..i + 2) != Some(b"\\u") {
                            return Err(i);
                        }
                        let lo = hex4(b.get(i + 2..i + 6).ok_or(i)?).ok_or(i)?;
                        if !(0xDC00..0xE000).contains(&lo) {
                            return Err(i);
                        }
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        i += 6;
                    }
                    let ch = char::from_u32(cp).ok_or(i)?;
                    let mut buf = [0u8; 4];
                    scratch.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    continue;
                }
                _ => return Err(i - 1),
            };
            scratch.push(c);
        }
    }
}

/// The first `"` or `\\` in `b`, eight bytes at a time (SWAR: a byte equal to the
/// one looked for becomes zero, and the borrow of subtracting one sets its top bit).
fn quote_or_backslash(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_bytes = |w: u64| w.wrapping_sub(ONES) & !w & HIGHS;
    let mut words = b.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let w = u64::from_le_bytes(bytes);
        // Bits above the first match may be wrong; the lowest set bit is not.
        let hits =
            zero_bytes(w ^ (ONES * u64::from(b'"'))) | zero_bytes(w ^ (ONES * u64::from(b'\\')));
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|c| matches!(c, b'"' | b'\\'))
        .map(|i| at + i)
}

fn hex4(b: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(b).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Infers column names (in order of first appearance) and types from the first
/// `max_rows` records of a chunk.
pub fn infer_json(chunk: &Chunk, max_rows: usize) -> Vec<(String, crate::schema::Inferred)> {
    use crate::schema::Inferred;
    let mut cols: Vec<(String, Inferred)> = Vec::new();
    let mut scratch = Vec::new();
    let data = &chunk.data[..];
    let records: Vec<(usize, usize)> = match &chunk.spans {
        Some(spans) => spans
            .iter()
            .map(|s| (s.start as usize, (s.start + s.len) as usize))
            .collect(),
        None => {
            let mut v = Vec::new();
            let mut pos = 0;
            while pos < data.len() && v.len() < max_rows {
                let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i);
                v.push((pos, end));
                pos = end + 1;
            }
            v
        }
    };
    for (start, end) in records.into_iter().take(max_rows) {
        let mut sc = Scanner {
            b: &data[start..end],
            i: 0,
        };
        sc.ws();
        if sc.peek() != Some(b'{') {
            continue;
        }
        sc.i += 1;
        loop {
            sc.ws();
            if sc.peek() != Some(b'"') {
                break;
            }
            let Ok(key) = sc.string(&mut scratch) else {
                break;
            };
            let key = String::from_utf8_lossy(&key).into_owned();
            sc.ws();
            if sc.peek() != Some(b':') {
                break;
            }
            sc.i += 1;
            sc.ws();
            let Ok(value) = sc.value(&mut scratch) else {
                break;
            };
            let t = match value {
                Value::Null => Inferred::Unknown,
                Value::Bool(_) => Inferred::Bool,
                Value::Number(n) if n.iter().any(|c| matches!(c, b'.' | b'e' | b'E')) => {
                    Inferred::Float
                }
                Value::Number(_) => Inferred::Int,
                Value::Str(s) => match Inferred::of_text(&s) {
                    t @ (Inferred::Timestamp | Inferred::Date) => t,
                    _ => Inferred::Text,
                },
                Value::Nested(_) => Inferred::Text,
            };
            match cols.iter_mut().find(|(n, _)| *n == key) {
                Some((_, ty)) => *ty = ty.merge(t),
                None => cols.push((key, t)),
            }
            sc.ws();
            if sc.peek() == Some(b',') {
                sc.i += 1;
            } else {
                break;
            }
        }
    }
    cols
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{
        DataType, Field, Float64Type, Schema, TimeUnit, TimestampMillisecondType,
    };
    use bytes::Bytes;

    use crate::chunk::{Chunker, Framing};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                true,
            ),
            Field::new("temperature_c", DataType::Float64, true),
            Field::new("meta", DataType::Utf8, true),
        ]))
    }

    fn ndjson(text: &str) -> DecodeOutput {
        let chunk = Chunk {
            source: Arc::from("t.ndjson"),
            data: Bytes::from(text.to_string()),
            first_line: 1,
            ..Chunk::default()
        };
        decode_json(&chunk, &schema(), &Limits::default()).expect("decode")
    }

    #[test]
    fn objects_with_any_key_order_escapes_and_nesting() {
        let out = ndjson(concat!(
            r#"{"device_id":"d1","ts":"2026-01-01T00:00:00Z","temperature_c":21.5}"#,
            "\n",
            r#"{"temperature_c": -3, "device_id": "d\"2\u00e9", "ts": 1000, "meta": {"a": [1, "}"]}, "extra": true}"#,
            "\n\n"
        ));
        assert!(out.rejects.is_empty(), "{:?}", out.rejects);
        let b = &out.batches[0].batch;
        assert_eq!(b.num_rows(), 2);
        assert_eq!(b.column(0).as_string::<i32>().value(1), "d\"2é");
        assert_eq!(
            b.column(1)
                .as_primitive::<TimestampMillisecondType>()
                .value(1),
            1000
        );
        assert_eq!(b.column(2).as_primitive::<Float64Type>().value(1), -3.0);
        assert_eq!(
            b.column(3).as_string::<i32>().value(1),
            r#"{"a": [1, "}"]}"#
        );
        assert!(b.column(3).is_null(0));
    }

    #[test]
    fn bad_lines_are_rejected_alone() {
        let out = ndjson(concat!(
            r#"{"device_id":"d1","temperature_c":1}"#,
            "\n",
            r#"{"device_id":"d2","temperature_c":}"#,
            "\n",
            r#"{"device_id":"d3","temperature_c":"hot"}"#,
            "\n",
            r#"{"temperature_c":4}"#,
            "\n",
            r#"["not", "an", "object"]"#,
            "\n",
            r#"{"device_id":"d6","temperature_c":6"#,
            "\n",
            r#"{"device_id":"d7","temperature_c":7}"#,
            "\n",
        ));
        let got: Vec<_> = out
            .rejects
            .iter()
            .map(|r| (r.line, r.stage, r.field.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(2), Stage::Decode, None),
                (Some(3), Stage::Cast, Some("temperature_c".into())),
                (Some(4), Stage::Cast, Some("device_id".into())),
                (Some(5), Stage::Decode, None),
                (Some(6), Stage::Decode, None),
            ]
        );
        assert!(
            out.rejects[1]
                .reason
                .contains(r#"cannot read "\"hot\"" as float64"#),
            "{}",
            out.rejects[1].reason
        );
        assert_eq!(out.batches[0].batch.num_rows(), 2);
        assert_eq!(out.records, 7);
    }

    #[test]
    fn keys_that_only_look_like_the_next_column() {
        let out = ndjson(concat!(
            // A prefix of the next name, then the name with an escape, then a longer key.
            r#"{"device":"x","\u0064evice_id":"d1","tsx":5,"ts":1000}"#,
            "\n",
            // The same key twice through the fast path and the escaped path.
            r#"{"device_id":"d2","\u0064evice_id":"d3"}"#,
            "\n",
            // A key cut short at the end of the record.
            r#"{"device_id"#,
            "\n",
        ));
        let b = &out.batches[0].batch;
        assert_eq!(b.num_rows(), 1);
        assert_eq!(b.column(0).as_string::<i32>().value(0), "d1");
        assert_eq!(
            b.column(1)
                .as_primitive::<TimestampMillisecondType>()
                .value(0),
            1000
        );
        let got: Vec<_> = out
            .rejects
            .iter()
            .map(|r| (r.line, r.field.clone(), r.reason.clone()))
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, Some(2));
        assert_eq!(got[0].1.as_deref(), Some("device_id"));
        assert!(got[0].2.contains("twice"), "{got:?}");
        assert_eq!(got[1].0, Some(3));
        assert!(got[1].2.contains("key"), "{got:?}");
    }

    #[test]
    fn a_name_with_a_quote_is_matched_through_its_escape() {
        let schema: SchemaRef =
            Arc::new(Schema::new(vec![Field::new("a\"b", DataType::Int64, true)]));
        let chunk = Chunk {
            source: Arc::from("t.ndjson"),
            data: Bytes::from_static(b"{\"a\\\"b\":7}\n{\"a\":8}\n"),
            first_line: 1,
            ..Chunk::default()
        };
        let out = decode_json(&chunk, &schema, &Limits::default()).expect("decode");
        let col = out.batches[0]
            .batch
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .clone();
        assert_eq!(col.value(0), 7);
        assert!(col.is_null(1));
    }

    #[test]
    fn quotes_and_backslashes_are_found_at_every_offset() {
        // Fillers one bit away from `"` (0x22) and `\\` (0x5c), and a high byte.
        let fillers = [0x23u8, 0x20, 0x5d, 0x5e, 0xe2, b'a'];
        for len in 0..40 {
            for at in 0..=len {
                for c in [b'"', b'\\'] {
                    let mut v: Vec<u8> = (0..len).map(|i| fillers[i % fillers.len()]).collect();
                    if at < len {
                        v[at] = c;
                        v.extend_from_slice(b"\"\\");
                    }
                    let naive = v.iter().position(|x| matches!(x, b'"' | b'\\'));
                    assert_eq!(quote_or_backslash(&v), naive, "len {len}, at {at}");
                    if at < len {
                        assert_eq!(naive, Some(at));
                    }
                }
            }
        }
    }

    #[test]
    fn json_array_elements_via_the_chunker() {
        let text = "[\n  {\"device_id\": \"a\", \"temperature_c\": 1},\n  {\"device_id\": \"b\",\n   \"temperature_c\": \"x\"},\n  {\"device_id\": \"c\"}\n]\n";
        let mut ch = Chunker::new(
            text.as_bytes(),
            Arc::from("a.json"),
            Framing::JsonArray,
            4096,
            1 << 20,
        );
        let chunk = ch.next_chunk().expect("read").expect("a chunk");
        assert!(ch.next_chunk().expect("read").is_none());
        let out = decode_json(&chunk, &schema(), &Limits::default()).expect("decode");
        assert_eq!(out.batches[0].batch.num_rows(), 2);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].line, Some(3));
    }
}
