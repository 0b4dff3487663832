//! The shared machinery of the text decoders: limits, the decode result, and the
//! [`BatchAssembler`] that turns accepted records into batches and failed ones into
//! rejects.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::CodecError;
use crate::chunk::Chunk;
use crate::column::ColumnBuilder;
use crate::record::{DecodedBatch, Provenance, RecordSpan, Reject, Stage};

/// Size limits that keep decoding bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Rows per batch.
    pub batch_size: usize,
    /// The longest record accepted.
    pub max_record_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            batch_size: 65_536,
            max_record_bytes: 1 << 20,
        }
    }
}

/// What decoding a chunk (or a body) gave.
#[derive(Debug, Default)]
pub struct DecodeOutput {
    /// Accepted rows.
    pub batches: Vec<DecodedBatch>,
    /// Records that were not accepted.
    pub rejects: Vec<Reject>,
    /// Records seen: accepted plus rejected.
    pub records: u64,
}

impl DecodeOutput {
    /// Rows accepted.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.batch.num_rows()).sum()
    }
}

/// A value shown in a message: quoted, cut at 64 bytes.
pub fn show(v: &[u8]) -> String {
    let s = String::from_utf8_lossy(&v[..v.len().min(64)]);
    if v.len() > 64 {
        format!("{:?}…", s)
    } else {
        format!("{:?}", s)
    }
}

/// Text bytes in one batch past which it is cut early (keeps offsets in range).
const MAX_BATCH_TEXT: usize = 512 << 20;

/// Collects rows of a chunk into batches; a failed row is cut back out.
pub struct BatchAssembler<'a> {
    schema: SchemaRef,
    builders: Vec<ColumnBuilder>,
    rows: usize,
    spans: Vec<RecordSpan>,
    chunk: &'a Chunk,
    out: DecodeOutput,
    batch_size: usize,
}

impl<'a> BatchAssembler<'a> {
    /// An assembler for rows of `chunk`.
    pub fn new(schema: SchemaRef, chunk: &'a Chunk, limits: &Limits) -> Result<Self, CodecError> {
        let cap = limits.batch_size.min(chunk.data.len() / 16 + 16);
        let builders = schema
            .fields()
            .iter()
            .map(|f| ColumnBuilder::new(f, cap))
            .collect::<Result<Vec<_>, _>>()
            .map_err(CodecError::Arrow)?;
        Ok(Self {
            schema,
            builders,
            rows: 0,
            spans: Vec::with_capacity(cap),
            chunk,
            out: DecodeOutput::default(),
            batch_size: limits.batch_size.max(1),
        })
    }

    /// The builder of column `i`.
    pub fn column(&mut self, i: usize) -> &mut ColumnBuilder {
        &mut self.builders[i]
    }

    /// The number of columns.
    pub fn width(&self) -> usize {
        self.builders.len()
    }

    /// Accepts the row just pushed, which spans `start..end` of the chunk from `line`.
    pub fn commit(&mut self, start: usize, end: usize, line: u64) {
        self.rows += 1;
        self.out.records += 1;
        self.spans.push(RecordSpan {
            start: start as u32,
            len: (end - start) as u32,
            line,
        });
        if self.rows >= self.batch_size
            || self
                .builders
                .iter()
                .any(|b| b.text_bytes() > MAX_BATCH_TEXT)
        {
            self.flush();
        }
    }

    /// Drops the row being pushed and records why.
    pub fn fail_row(
        &mut self,
        stage: Stage,
        field: Option<String>,
        reason: String,
        start: usize,
        end: usize,
        line: u64,
    ) {
        for b in &mut self.builders {
            b.truncate(self.rows);
        }
        let mut r = Reject::new(
            &self.chunk.source,
            stage,
            reason,
            self.chunk.data.slice(start..end),
        )
        .at_line(line);
        r.field = field;
        self.reject(r);
    }

    /// Records a reject that never reached the builders.
    pub fn reject(&mut self, r: Reject) {
        self.out.records += 1;
        self.out.rejects.push(r);
    }

    fn flush(&mut self) {
        if self.rows == 0 {
            return;
        }
        let columns: Result<Vec<_>, _> = self
            .builders
            .iter_mut()
            .map(ColumnBuilder::finish)
            .collect();
        let batch = columns.and_then(|c| RecordBatch::try_new(self.schema.clone(), c));
        match batch {
            Ok(batch) => self.out.batches.push(DecodedBatch {
                batch,
                provenance: Provenance::Text {
                    source: self.chunk.source.clone(),
                    data: self.chunk.data.clone(),
                    spans: Arc::from(std::mem::take(&mut self.spans)),
                    offset: 0,
                },
            }),
            // Every value was checked on the way in; this would be a decoder bug, and
            // the rows are still accounted for.
            Err(e) => {
                for s in std::mem::take(&mut self.spans) {
                    let raw = self
                        .chunk
                        .data
                        .slice(s.start as usize..(s.start + s.len) as usize);
                    self.out.rejects.push(
                        Reject::new(
                            &self.chunk.source,
                            Stage::Decode,
                            format!("internal decode error: {e}"),
                            raw,
                        )
                        .at_line(s.line),
                    );
                }
            }
        }
        self.rows = 0;
    }

    /// Flushes the last batch and returns everything.
    pub fn finish(mut self) -> Result<DecodeOutput, CodecError> {
        self.flush();
        Ok(self.out)
    }
}
