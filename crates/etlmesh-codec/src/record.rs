//! Records that did not make it ([`Reject`]) and where decoded rows came from
//! ([`Provenance`]), so that a row the SQL cannot evaluate can still be dead-lettered
//! with its file, line and original bytes.

use std::fmt;
use std::sync::Arc;

use arrow::array::RecordBatch;
use bytes::Bytes;

/// Largest piece of a record kept in a dead letter (the rest is cut, and flagged).
pub const MAX_RAW_BYTES: usize = 64 << 10;

/// Where a record was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// It is not valid in its format (a JSON syntax error, a wrong field count).
    Decode,
    /// A value does not fit the schema (text in a numeric column, a missing required field).
    Cast,
    /// The SQL could not evaluate it.
    Transform,
    /// It is over a size limit.
    Limit,
    /// Its event-time window had closed (streams).
    Late,
    /// Its event time is further ahead of the wall clock than `max_future` (streams):
    /// kept out of the windows so that it cannot move the watermark.
    Future,
    /// A sink refused it (a constraint, a value the destination cannot hold).
    Load,
}

impl Stage {
    /// Its name in dead letters and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Cast => "cast",
            Stage::Transform => "transform",
            Stage::Limit => "limit",
            Stage::Late => "late",
            Stage::Future => "future",
            Stage::Load => "load",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that was not loaded, with where it came from and why.
#[derive(Debug, Clone)]
pub struct Reject {
    /// The input (file path, `stdin`, `request`).
    pub source: Arc<str>,
    /// 1-based line, for text formats.
    pub line: Option<u64>,
    /// 1-based record number, for Parquet and Arrow inputs.
    pub row: Option<u64>,
    /// What failed.
    pub stage: Stage,
    /// The field at fault, when one is.
    pub field: Option<String>,
    /// Why.
    pub reason: String,
    /// The original bytes (for Parquet and Arrow inputs: the row as JSON).
    pub raw: Bytes,
    /// Whether `raw` was cut at [`MAX_RAW_BYTES`].
    pub raw_truncated: bool,
}

impl Reject {
    /// A reject with its raw bytes cut to [`MAX_RAW_BYTES`].
    pub fn new(source: &Arc<str>, stage: Stage, reason: impl Into<String>, raw: Bytes) -> Self {
        let raw_truncated = raw.len() > MAX_RAW_BYTES;
        Self {
            source: source.clone(),
            line: None,
            row: None,
            stage,
            field: None,
            reason: reason.into(),
            raw: if raw_truncated {
                raw.slice(..MAX_RAW_BYTES)
            } else {
                raw
            },
            raw_truncated,
        }
    }

    /// Sets the line.
    pub fn at_line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
    }

    /// Sets the record number.
    pub fn at_row(mut self, row: u64) -> Self {
        self.row = Some(row);
        self
    }

    /// Sets the field.
    pub fn in_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// `file:line` or `file#row`.
    pub fn position(&self) -> String {
        match (self.line, self.row) {
            (Some(l), _) => format!("{}:{l}", self.source),
            (None, Some(r)) => format!("{} record {r}", self.source),
            (None, None) => self.source.to_string(),
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.position())?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        write!(f, "{}", self.reason)
    }
}

/// The span of one text record inside a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSpan {
    /// Byte offset in the chunk.
    pub start: u32,
    /// Length in bytes (without the line terminator).
    pub len: u32,
    /// 1-based line where the record starts.
    pub line: u64,
}

/// Where each row of a decoded batch came from.
#[derive(Debug, Clone)]
pub enum Provenance {
    /// Rows decoded from text: row `i` is `spans[i]` in `data`.
    Text {
        /// The input.
        source: Arc<str>,
        /// The chunk the rows were read from.
        data: Bytes,
        /// One span per row.
        spans: Arc<[RecordSpan]>,
        /// First row of this batch in `spans` (batches are slices of one decode).
        offset: usize,
    },
    /// Rows read from a typed format: row `i` is record `first_row + i` of the input.
    Rows {
        /// The input.
        source: Arc<str>,
        /// 1-based number of the batch's first record.
        first_row: u64,
    },
    /// Rows picked out of a typed batch: row `i` is record `rows[offset + i]`.
    Picked {
        /// The input.
        source: Arc<str>,
        /// 1-based record numbers.
        rows: Arc<[u64]>,
        /// First row of this batch in `rows`.
        offset: usize,
    },
}

impl Provenance {
    /// The provenance of rows `offset..` of this one (matching `RecordBatch::slice`).
    pub fn slice(&self, offset: usize) -> Provenance {
        match self {
            Provenance::Text {
                source,
                data,
                spans,
                offset: o,
            } => Provenance::Text {
                source: source.clone(),
                data: data.clone(),
                spans: spans.clone(),
                offset: o + offset,
            },
            Provenance::Rows { source, first_row } => Provenance::Rows {
                source: source.clone(),
                first_row: first_row + offset as u64,
            },
            Provenance::Picked {
                source,
                rows,
                offset: o,
            } => Provenance::Picked {
                source: source.clone(),
                rows: rows.clone(),
                offset: o + offset,
            },
        }
    }

    /// The provenance of the rows `picked` (indices into this batch, ascending), for a
    /// batch filtered down to them.
    pub fn pick(&self, picked: &[usize]) -> Provenance {
        match self {
            Provenance::Text {
                source,
                data,
                spans,
                offset,
            } => Provenance::Text {
                source: source.clone(),
                data: data.clone(),
                spans: picked
                    .iter()
                    .filter_map(|&i| spans.get(offset + i).copied())
                    .collect(),
                offset: 0,
            },
            Provenance::Rows { source, first_row } => Provenance::Picked {
                source: source.clone(),
                rows: picked.iter().map(|&i| first_row + i as u64).collect(),
                offset: 0,
            },
            Provenance::Picked {
                source,
                rows,
                offset,
            } => Provenance::Picked {
                source: source.clone(),
                rows: picked
                    .iter()
                    .filter_map(|&i| rows.get(offset + i).copied())
                    .collect(),
                offset: 0,
            },
        }
    }

    /// A reject for row `i` of `batch` (the batch these rows are in).
    pub fn reject(
        &self,
        batch: &RecordBatch,
        i: usize,
        stage: Stage,
        reason: impl Into<String>,
    ) -> Reject {
        match self {
            Provenance::Text {
                source,
                data,
                spans,
                offset,
            } => match spans.get(offset + i) {
                Some(s) => {
                    let raw = data.slice(s.start as usize..(s.start + s.len) as usize);
                    Reject::new(source, stage, reason, raw).at_line(s.line)
                }
                None => Reject::new(source, stage, reason, Bytes::new()),
            },
            Provenance::Rows { source, first_row } => {
                let raw = row_as_json(batch, i);
                Reject::new(source, stage, reason, raw).at_row(first_row + i as u64)
            }
            Provenance::Picked {
                source,
                rows,
                offset,
            } => {
                let raw = row_as_json(batch, i);
                let r = Reject::new(source, stage, reason, raw);
                match rows.get(offset + i) {
                    Some(n) => r.at_row(*n),
                    None => r,
                }
            }
        }
    }
}

/// Row `i` of `batch` as one JSON object (the "original bytes" of a typed record).
pub fn row_as_json(batch: &RecordBatch, i: usize) -> Bytes {
    if i >= batch.num_rows() {
        return Bytes::new();
    }
    let mut out = Vec::new();
    let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
    if w.write(&batch.slice(i, 1))
        .and_then(|_| w.finish())
        .is_err()
    {
        return Bytes::from_static(b"{}");
    }
    while out.last() == Some(&b'\n') {
        out.pop();
    }
    Bytes::from(out)
}

/// A decoded batch with the origin of its rows.
#[derive(Debug, Clone)]
pub struct DecodedBatch {
    /// The rows, in the pipeline's schema.
    pub batch: RecordBatch,
    /// Where they came from.
    pub provenance: Provenance,
}
