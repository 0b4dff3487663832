//! CSV into Arrow, record by record: a record that does not fit (a wrong field count,
//! text in a numeric column, invalid UTF-8) becomes a [`Reject`] and the rest go on.
//!
//! Chunks without a quote character take a fast path that splits lines and fields
//! with `memchr`; chunks with quotes go through `csv-core`, which handles quoting,
//! escapes and newlines inside quoted fields.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use bytes::Bytes;
use etlmesh_config::CsvOptions;

use crate::CodecError;
use crate::chunk::Chunk;
use crate::column::ValueError;
use crate::decode::{BatchAssembler, DecodeOutput, Limits};
use crate::record::{Reject, Stage};

/// How the fields of one CSV input map to the schema's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvLayout {
    /// For each field of a record, the schema column it fills (None: ignored).
    pub map: Vec<Option<usize>>,
}

impl CsvLayout {
    /// Fields in schema order, no header.
    pub fn positional(schema: &Schema) -> Self {
        Self {
            map: (0..schema.fields().len()).map(Some).collect(),
        }
    }

    /// Maps a header's names to the schema. Every schema column must be in the header.
    pub fn from_header(
        header: &[String],
        schema: &Schema,
        source: &str,
    ) -> Result<Self, CodecError> {
        let map: Vec<Option<usize>> = header
            .iter()
            .map(|h| schema.index_of(h.trim()).ok())
            .collect();
        for (i, f) in schema.fields().iter().enumerate() {
            if !map.contains(&Some(i)) {
                return Err(CodecError::Input {
                    input: source.to_string(),
                    message: format!(
                        "the CSV header has no column `{}` (header: {})",
                        f.name(),
                        header.join(",")
                    ),
                    help: "declare the schema with the header's names, or set `csv: { header: false }` to read fields by position".into(),
                });
            }
        }
        Ok(Self { map })
    }

    fn fields(&self) -> usize {
        self.map.len()
    }
}

/// Splits one CSV record (a header line) into its fields.
pub fn parse_record(line: &[u8], opts: &CsvOptions) -> Vec<String> {
    let mut recs = Records::new(line, opts, 8);
    if recs.next().is_none() {
        return Vec::new();
    }
    recs.fields()
        .map(|f| {
            String::from_utf8_lossy(f)
                .trim_start_matches('\u{feff}')
                .to_string()
        })
        .collect()
}

/// Records of a buffer of whole records, read with `csv-core` (quoting, escapes,
/// newlines inside quotes). The end of the buffer ends the last record.
struct Records<'a> {
    reader: csv_core::Reader,
    data: &'a [u8],
    pos: usize,
    out: Vec<u8>,
    ends: Vec<usize>,
    fields: usize,
    /// The last record was ended by the end of the buffer, not by a newline.
    ended_by_eof: bool,
}

impl<'a> Records<'a> {
    fn new(data: &'a [u8], opts: &CsvOptions, fields: usize) -> Self {
        let mut b = csv_core::ReaderBuilder::new();
        b.delimiter(opts.delimiter)
            .quote(opts.quote)
            .double_quote(true);
        if let Some(esc) = opts.escape {
            b.escape(Some(esc));
        }
        Self {
            reader: b.build(),
            data,
            pos: 0,
            out: vec![0; 4096],
            ends: vec![0; fields.max(1) + 8],
            fields: 0,
            ended_by_eof: false,
        }
    }

    /// Reads the next record: `(start, end)` of its bytes in the buffer (terminator
    /// included), or `None` at the end.
    fn next(&mut self) -> Option<(usize, usize)> {
        let start = self.pos;
        let (mut o, mut e) = (0, 0);
        let mut eof = false;
        loop {
            let input = if eof { &[][..] } else { &self.data[self.pos..] };
            let (res, nin, nout, nend) =
                self.reader
                    .read_record(input, &mut self.out[o..], &mut self.ends[e..]);
            self.pos += nin;
            o += nout;
            e += nend;
            match res {
                csv_core::ReadRecordResult::Record => {
                    self.fields = e;
                    self.ended_by_eof = eof;
                    self.reader.reset();
                    return Some((start, self.pos));
                }
                csv_core::ReadRecordResult::End => return None,
                csv_core::ReadRecordResult::InputEmpty => eof = true,
                csv_core::ReadRecordResult::OutputFull => {
                    let len = self.out.len() * 2;
                    self.out.resize(len, 0);
                }
                csv_core::ReadRecordResult::OutputEndsFull => {
                    let len = self.ends.len() * 2;
                    self.ends.resize(len, 0);
                }
            }
        }
    }

    /// Reads on from `pos` (the start of a record).
    fn restart(&mut self, pos: usize) {
        self.pos = pos;
        self.reader.reset();
    }

    /// The fields of the last record, unquoted.
    fn fields(&self) -> impl Iterator<Item = &[u8]> {
        let ends = &self.ends[..self.fields];
        ends.iter().enumerate().map(|(i, &end)| {
            let start = if i == 0 { 0 } else { ends[i - 1] };
            &self.out[start..end]
        })
    }
}

/// Decodes a chunk of CSV records (the header already removed).
pub fn decode_csv(
    chunk: &Chunk,
    layout: &CsvLayout,
    schema: &SchemaRef,
    opts: &CsvOptions,
    limits: &Limits,
) -> Result<DecodeOutput, CodecError> {
    let mut asm = BatchAssembler::new(schema.clone(), chunk, limits)?;
    let mut ctx = RecordCtx {
        layout,
        opts,
        schema,
        utf8_ok: std::str::from_utf8(&chunk.data).is_ok(),
        fields: Vec::with_capacity(layout.fields() + 1),
    };
    if memchr::memchr(opts.quote, &chunk.data).is_none() && opts.escape.is_none() {
        fast_path(chunk, &mut asm, &mut ctx, limits);
    } else {
        quoted_path(chunk, &mut asm, &mut ctx, limits);
    }
    asm.finish()
}

struct RecordCtx<'a> {
    layout: &'a CsvLayout,
    opts: &'a CsvOptions,
    schema: &'a SchemaRef,
    utf8_ok: bool,
    fields: Vec<(usize, usize)>,
}

impl RecordCtx<'_> {
    /// Pushes the fields in `buf` (ranges in `self.fields`) into the columns.
    fn push(
        &self,
        buf: &[u8],
        asm: &mut BatchAssembler<'_>,
    ) -> Result<(), (Stage, Option<String>, String)> {
        let n = self.fields.len();
        if n != self.layout.fields() {
            let hint = if n < self.layout.fields() {
                " (a truncated line?)"
            } else {
                ""
            };
            return Err((
                Stage::Decode,
                None,
                format!("expected {} fields, found {n}{hint}", self.layout.fields()),
            ));
        }
        for (fi, &(s, e)) in self.fields.iter().enumerate() {
            let Some(col) = self.layout.map[fi] else {
                continue;
            };
            let v = &buf[s..e];
            let builder = asm.column(col);
            let res = if v.is_empty() || self.opts.null_values.iter().any(|nv| nv.as_bytes() == v) {
                builder.push_null()
            } else {
                builder.push_text(v, self.utf8_ok)
            };
            if let Err(err) = res {
                let field = self.schema.field(col);
                let reason = match err {
                    ValueError::Invalid => {
                        format!(
                            "cannot read {} as {}",
                            crate::decode::show(v),
                            crate::schema::type_name(field.data_type())
                        )
                    }
                    ValueError::Utf8 => "invalid UTF-8".to_string(),
                    ValueError::Missing => "is required but empty".to_string(),
                };
                let stage = if err == ValueError::Utf8 {
                    Stage::Decode
                } else {
                    Stage::Cast
                };
                return Err((stage, Some(field.name().clone()), reason));
            }
        }
        Ok(())
    }
}

fn fast_path(
    chunk: &Chunk,
    asm: &mut BatchAssembler<'_>,
    ctx: &mut RecordCtx<'_>,
    limits: &Limits,
) {
    let data = &chunk.data[..];
    let delim = ctx.opts.delimiter;
    let mut line = chunk.first_line;
    let mut pos = 0;
    while pos < data.len() {
        let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i);
        let mut rec_end = end;
        if rec_end > pos && data[rec_end - 1] == b'\r' {
            rec_end -= 1;
        }
        let rec = &data[pos..rec_end];
        if !rec.is_empty() {
            if rec.len() as u64 > limits.max_record_bytes {
                asm.reject(over_limit(chunk, pos, rec_end, line, limits));
            } else {
                ctx.fields.clear();
                let mut s = 0;
                for i in memchr::memchr_iter(delim, rec) {
                    ctx.fields.push((pos + s, pos + i));
                    s = i + 1;
                }
                ctx.fields.push((pos + s, pos + rec.len()));
                match ctx.push(data, asm) {
                    Ok(()) => asm.commit(pos, rec_end, line),
                    Err((stage, field, reason)) => {
                        asm.fail_row(stage, field, reason, pos, rec_end, line)
                    }
                }
            }
        }
        line += 1;
        pos = end + 1;
    }
}

fn quoted_path(
    chunk: &Chunk,
    asm: &mut BatchAssembler<'_>,
    ctx: &mut RecordCtx<'_>,
    limits: &Limits,
) {
    let data = &chunk.data[..];
    let mut recs = Records::new(data, ctx.opts, ctx.layout.fields());
    let mut line = chunk.first_line;
    while let Some((mut start, pos)) = recs.next() {
        // Blank lines before a record are not records.
        while start < pos && matches!(data[start], b'\n' | b'\r') {
            line += u64::from(data[start] == b'\n');
            start += 1;
        }
        let mut rec_end = pos;
        while rec_end > start && matches!(data[rec_end - 1], b'\n' | b'\r') {
            rec_end -= 1;
        }
        if start == rec_end {
            continue;
        }
        if let Some(nl) = memchr::memchr(b'\n', &data[start..rec_end])
            && !quoted_newlines_allowed(&data[start..rec_end], ctx.opts)
        {
            // A quote spanning lines that does not close as a field ends never closed:
            // its line alone is the record, and reading goes on after it.
            let nl = start + nl;
            let end = if nl > start && data[nl - 1] == b'\r' {
                nl - 1
            } else {
                nl
            };
            asm.fail_row(
                Stage::Decode,
                None,
                "unterminated quoted field: its quote does not close on this line (if values hold line breaks, set `newlines_in_values: true` on the source's csv)".into(),
                start,
                end,
                line,
            );
            recs.restart(nl + 1);
            line += 1;
            continue;
        }
        let lines_in_record = memchr::memchr_iter(b'\n', &data[start..pos]).count() as u64;
        if (rec_end - start) as u64 > limits.max_record_bytes {
            asm.reject(over_limit(chunk, start, rec_end, line, limits));
        } else if recs.ended_by_eof && unterminated_quote(&data[start..rec_end], ctx.opts.quote) {
            asm.fail_row(
                Stage::Decode,
                None,
                "unterminated quoted field (a truncated record?)".into(),
                start,
                rec_end,
                line,
            );
        } else {
            ctx.fields.clear();
            let ends = &recs.ends[..recs.fields];
            for (i, &end) in ends.iter().enumerate() {
                ctx.fields.push((if i == 0 { 0 } else { ends[i - 1] }, end));
            }
            match ctx.push(&recs.out, asm) {
                Ok(()) => asm.commit(start, rec_end, line),
                Err((stage, field, reason)) => {
                    asm.fail_row(stage, field, reason, start, rec_end, line)
                }
            }
        }
        line += lines_in_record.max(1);
    }
}

/// Whether a record that spans lines may: with `newlines_in_values` unset, when every
/// quote opened at a field's start closes as a field ends (followed by the delimiter,
/// a line end or the end); always with `true`; never with `false`.
fn quoted_newlines_allowed(rec: &[u8], opts: &CsvOptions) -> bool {
    match opts.newlines_in_values {
        Some(allowed) => allowed,
        None => quotes_close_at_field_ends(rec, opts),
    }
}

fn quotes_close_at_field_ends(rec: &[u8], opts: &CsvOptions) -> bool {
    let (quote, delim) = (opts.quote, opts.delimiter);
    let mut in_quote = false;
    let mut i = 0;
    while i < rec.len() {
        let c = rec[i];
        if in_quote {
            if Some(c) == opts.escape && c != quote {
                i += 2;
                continue;
            }
            if c == quote {
                match rec.get(i + 1) {
                    Some(&q) if q == quote => i += 1,
                    None | Some(b'\n' | b'\r') => in_quote = false,
                    Some(&d) if d == delim => in_quote = false,
                    Some(_) => return false,
                }
            }
        } else if c == quote
            && (i == 0 || matches!(rec[i - 1], b'\n' | b'\r') || rec[i - 1] == delim)
        {
            in_quote = true;
        }
        i += 1;
    }
    !in_quote
}

fn unterminated_quote(rec: &[u8], quote: u8) -> bool {
    memchr::memchr_iter(quote, rec).count() % 2 == 1
}

fn over_limit(chunk: &Chunk, start: usize, end: usize, line: u64, limits: &Limits) -> Reject {
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
    .at_line(line)
}

/// A chunk with one record per string, for tests.
#[doc(hidden)]
pub fn test_chunk(text: &str) -> Chunk {
    Chunk {
        source: Arc::from("test.csv"),
        data: Bytes::from(text.to_string()),
        first_line: 1,
        ..Chunk::default()
    }
}

/// Infers column names and types from the first `max_rows` records of `data`.
pub fn infer_csv(
    data: &[u8],
    opts: &CsvOptions,
    max_rows: usize,
) -> Vec<(String, crate::schema::Inferred)> {
    use crate::schema::Inferred;
    let mut recs = Records::new(data, opts, 64);
    let mut names: Vec<String> = Vec::new();
    let mut types: Vec<Inferred> = Vec::new();
    let mut rows = 0;
    while rows <= max_rows {
        let Some((start, end)) = recs.next() else {
            break;
        };
        if data[start..end].iter().all(|b| matches!(b, b'\n' | b'\r')) {
            continue;
        }
        let fields: Vec<&[u8]> = recs.fields().collect();
        take_record(&fields, opts, &mut names, &mut types, rows == 0);
        rows += 1;
    }
    if !opts.header {
        names = (1..=types.len()).map(|i| format!("column_{i}")).collect();
    }
    names
        .into_iter()
        .zip(
            types
                .into_iter()
                .chain(std::iter::repeat(Inferred::Unknown)),
        )
        .collect()
}

fn take_record(
    fields: &[&[u8]],
    opts: &CsvOptions,
    names: &mut Vec<String>,
    types: &mut Vec<crate::schema::Inferred>,
    first: bool,
) {
    use crate::schema::Inferred;
    if first && opts.header {
        *names = fields
            .iter()
            .map(|f| {
                String::from_utf8_lossy(f)
                    .trim_start_matches('\u{feff}')
                    .trim()
                    .to_string()
            })
            .collect();
        types.resize(names.len(), Inferred::Unknown);
        return;
    }
    if types.len() < fields.len() {
        if opts.header {
            return; // a record with too many fields: not evidence
        }
        types.resize(fields.len(), Inferred::Unknown);
    }
    for (i, f) in fields.iter().enumerate() {
        if f.is_empty() || opts.null_values.iter().any(|n| n.as_bytes() == *f) {
            continue;
        }
        types[i] = types[i].merge(Inferred::of_text(f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Field, Float64Type};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("temperature_c", DataType::Float64, true),
        ]))
    }

    fn decode(text: &str) -> DecodeOutput {
        let s = schema();
        decode_csv(
            &test_chunk(text),
            &CsvLayout::positional(&s),
            &s,
            &CsvOptions::default(),
            &Limits::default(),
        )
        .expect("decode")
    }

    #[test]
    fn good_rows() {
        let out = decode("d1,21.5\nd2,\r\nd3,-4\n");
        assert!(out.rejects.is_empty());
        let b = &out.batches[0].batch;
        assert_eq!(b.num_rows(), 3);
        let t = b.column(1).as_primitive::<Float64Type>();
        assert_eq!(t.value(0), 21.5);
        assert!(t.is_null(1));
        assert_eq!(out.records, 3);
    }

    #[test]
    fn bad_rows_are_rejected_with_lines() {
        let out = decode("d1,21.5\nd2\nd3,abc\n,1\nd5,1,2\nd6,7\n");
        let lines: Vec<_> = out
            .rejects
            .iter()
            .map(|r| (r.line, r.stage, r.field.clone()))
            .collect();
        assert_eq!(
            lines,
            vec![
                (Some(2), Stage::Decode, None),
                (Some(3), Stage::Cast, Some("temperature_c".to_string())),
                (Some(4), Stage::Cast, Some("device_id".to_string())),
                (Some(5), Stage::Decode, None),
            ]
        );
        assert!(out.rejects[0].reason.contains("expected 2 fields, found 1"));
        assert!(
            out.rejects[1]
                .reason
                .contains("cannot read \"abc\" as float64")
        );
        assert_eq!(&out.rejects[1].raw[..], b"d3,abc");
        assert_eq!(out.batches[0].batch.num_rows(), 2);
        assert_eq!(out.records, 6);
    }

    #[test]
    fn quoted_fields_and_embedded_newlines() {
        let out = decode("\"d,1\",\"2\"\n\"multi\nline\",3\nd4,\"x\"\"y\"\n");
        let b = &out.batches[0].batch;
        assert_eq!(b.num_rows(), 2, "{:?}", out.rejects);
        assert_eq!(b.column(0).as_string::<i32>().value(0), "d,1");
        assert_eq!(b.column(0).as_string::<i32>().value(1), "multi\nline");
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].line, Some(4));
    }

    #[test]
    fn blank_lines_between_quoted_records_are_skipped() {
        let out = decode("\"a\",1\n\n\"b\",2\n\r\n\"c\",x\n");
        assert_eq!(out.batches[0].batch.num_rows(), 2);
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].line, Some(5));
        assert_eq!(out.records, 3);
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let mut text = b"d1,1\n".to_vec();
        text.extend_from_slice(b"d\xff\xfe,2\nd3,3\n");
        let chunk = Chunk {
            source: Arc::from("x.csv"),
            data: Bytes::from(text),
            first_line: 1,
            ..Chunk::default()
        };
        let s = schema();
        let out = decode_csv(
            &chunk,
            &CsvLayout::positional(&s),
            &s,
            &CsvOptions::default(),
            &Limits::default(),
        )
        .expect("decode");
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].reason, "invalid UTF-8");
        assert_eq!(out.rejects[0].line, Some(2));
        assert_eq!(out.batches[0].batch.num_rows(), 2);
    }

    #[test]
    fn unterminated_quote_at_the_end() {
        let out = decode("d1,1\n\"d2,2\n");
        assert_eq!(out.rejects.len(), 1);
        assert!(
            out.rejects[0].reason.contains("unterminated"),
            "{}",
            out.rejects[0].reason
        );
    }

    #[test]
    fn header_maps_by_name() {
        let s = schema();
        let header = parse_record(b"temperature_c,extra,device_id", &CsvOptions::default());
        let layout = CsvLayout::from_header(&header, &s, "x.csv").expect("layout");
        assert_eq!(layout.map, vec![Some(1), None, Some(0)]);
        let err =
            CsvLayout::from_header(&["device_id".into()], &s, "x.csv").expect_err("missing column");
        assert!(err.to_string().contains("no column `temperature_c`"));
    }
}
