//! Codecs: bytes in any supported format to Arrow record batches, and back.
//!
//! Decoding is record by record: a record that fails (a syntax error, a wrong field
//! count, a value that does not fit the schema, invalid UTF-8, over the size limit)
//! becomes a [`Reject`] naming the input, line and field, with its original bytes, and
//! the other records go on. Accepted rows carry their [`Provenance`] so that a later
//! stage (the SQL) can still dead-letter a row with its origin.
//!
//! - Text formats (CSV, NDJSON, JSON array) are read in [`Chunk`]s that end on record
//!   boundaries ([`chunk`]), so chunks decode in parallel; [`Decoder::decode_text`].
//! - Parquet and Arrow IPC are typed; [`binary::conform`] casts them to the declared
//!   schema, rejecting rows that do not fit.
//! - [`encode`] writes CSV, NDJSON, JSON arrays, Parquet and Arrow IPC.
//! - [`decode_body`] decodes a whole in-memory body (what a request brings).

pub mod binary;
pub mod chunk;
mod column;
pub mod csv;
pub mod decode;
pub mod encode;
mod ipc_check;
pub mod json;
mod parquet_check;
pub mod parse;
pub mod record;
pub mod schema;

use std::io::Cursor;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use etlmesh_config::{CsvOptions, Format};

pub use chunk::{Chunk, Chunker, Framing};
pub use csv::CsvLayout;
pub use decode::{DecodeOutput, Limits};
pub use record::{DecodedBatch, Provenance, RecordSpan, Reject, Stage};

/// Errors that stop a whole input (as opposed to one record).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input as a whole is unusable.
    #[error("{input}: {message}\n  help: {help}")]
    Input {
        /// The input.
        input: String,
        /// What is wrong.
        message: String,
        /// What to do.
        help: String,
    },
    /// Reading failed.
    #[error("{input}: {error}")]
    Io {
        /// The input.
        input: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Arrow refused a batch.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// Writing failed.
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// Decodes records of one format into one schema.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The format.
    pub format: Format,
    /// The schema of the rows produced.
    pub schema: SchemaRef,
    /// CSV settings.
    pub csv: CsvOptions,
    /// Size limits.
    pub limits: Limits,
}

impl Decoder {
    /// How the chunker must frame this format's records (`None`: not a text format).
    pub fn framing(&self) -> Option<Framing> {
        framing(self.format, &self.csv)
    }

    /// For CSV: the layout of an input, from the header at the start of its first
    /// chunk (which is removed) or by position.
    pub fn layout(&self, first: &mut Chunk) -> Result<CsvLayout, CodecError> {
        if self.format != Format::Csv || !self.csv.header {
            return Ok(CsvLayout::positional(&self.schema));
        }
        let header = take_first_line(first);
        let names = csv::parse_record(&header, &self.csv);
        CsvLayout::from_header(&names, &self.schema, &first.source)
    }

    /// Decodes a text chunk.
    pub fn decode_text(
        &self,
        chunk: &Chunk,
        layout: &CsvLayout,
    ) -> Result<DecodeOutput, CodecError> {
        let mut out = match self.format {
            Format::Csv => csv::decode_csv(chunk, layout, &self.schema, &self.csv, &self.limits)?,
            Format::Ndjson | Format::Json => json::decode_json(chunk, &self.schema, &self.limits)?,
            Format::Parquet | Format::Arrow => {
                return Err(CodecError::Encode(format!(
                    "{} is not a text format",
                    self.format
                )));
            }
        };
        if !chunk.skipped.is_empty() {
            out.records += chunk.skipped.len() as u64;
            out.rejects.extend(chunk.skipped.iter().cloned());
        }
        Ok(out)
    }

    /// Conforms a typed batch (Parquet, Arrow) to the schema.
    pub fn decode_typed(
        &self,
        batch: &arrow::array::RecordBatch,
        prov: &Provenance,
    ) -> DecodeOutput {
        let (kept, rejects) = binary::conform(batch, &self.schema, prov);
        DecodeOutput {
            records: batch.num_rows() as u64,
            batches: kept.into_iter().collect(),
            rejects,
        }
    }
}

/// The framing of a text format.
pub fn framing(format: Format, csv: &CsvOptions) -> Option<Framing> {
    match format {
        Format::Csv => Some(Framing::Csv {
            quote: csv.quote,
            escape: csv.escape,
            delimiter: csv.delimiter,
            newlines: csv.newlines_in_values,
        }),
        Format::Ndjson => Some(Framing::Lines),
        Format::Json => Some(Framing::JsonArray),
        Format::Parquet | Format::Arrow => None,
    }
}

/// Removes the first line of a chunk (a CSV header) and returns it.
fn take_first_line(chunk: &mut Chunk) -> Vec<u8> {
    let end = memchr::memchr(b'\n', &chunk.data).unwrap_or(chunk.data.len());
    let mut line = chunk.data[..end].to_vec();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    chunk.data = chunk.data.slice((end + 1).min(chunk.data.len())..);
    chunk.first_line += 1;
    line
}

/// Infers a schema from the first chunk of a text input.
pub fn infer_schema(
    format: Format,
    first: &Chunk,
    csv: &CsvOptions,
    rows: usize,
) -> Result<SchemaRef, CodecError> {
    let cols = match format {
        Format::Csv => csv::infer_csv(&first.data, csv, rows),
        Format::Ndjson | Format::Json => json::infer_json(first, rows),
        Format::Parquet | Format::Arrow => Vec::new(),
    };
    if cols.is_empty() {
        return Err(CodecError::Input {
            input: first.source.to_string(),
            message: format!(
                "cannot infer a schema: no {format} record in the first {} bytes",
                first.data.len()
            ),
            help: "declare the pipeline's `schema`, or check the input's format".into(),
        });
    }
    Ok(schema::inferred_schema(cols))
}

/// Decodes a whole in-memory body. With no schema, the schema is inferred from the
/// body (text) or taken from it (Parquet, Arrow).
pub fn decode_body(
    body: Bytes,
    source: &str,
    format: Format,
    schema: Option<&SchemaRef>,
    csv: &CsvOptions,
    limits: &Limits,
    infer_rows: usize,
) -> Result<(SchemaRef, DecodeOutput), CodecError> {
    let name: Arc<str> = Arc::from(source);
    match framing(format, csv) {
        Some(fr) => {
            let len = body.len();
            let mut chunker = Chunker::new(
                Cursor::new(body),
                name,
                fr,
                len.max(4096),
                limits.max_record_bytes as usize,
            );
            let mut chunks = Vec::new();
            while let Some(c) = chunker.next_chunk()? {
                chunks.push(c);
            }
            let Some(first) = chunks.first() else {
                let schema = schema
                    .cloned()
                    .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
                return Ok((schema, DecodeOutput::default()));
            };
            let schema = match schema {
                Some(s) => s.clone(),
                None => infer_schema(format, first, csv, infer_rows)?,
            };
            let dec = Decoder {
                format,
                schema: schema.clone(),
                csv: csv.clone(),
                limits: *limits,
            };
            let layout = dec.layout(&mut chunks[0])?;
            let mut out = DecodeOutput::default();
            for c in &chunks {
                let o = dec.decode_text(c, &layout)?;
                out.records += o.records;
                out.batches.extend(o.batches);
                out.rejects.extend(o.rejects);
            }
            Ok((schema, out))
        }
        None => {
            let (file_schema, batches): (
                SchemaRef,
                Box<dyn Iterator<Item = Result<_, CodecError>>>,
            ) = match format {
                Format::Parquet => {
                    let (s, r) = binary::parquet_body(body, source, limits.batch_size)?;
                    let src = source.to_string();
                    (
                        s,
                        Box::new(r.map(move |b| {
                            b.map_err(|e| CodecError::Input {
                                input: src.clone(),
                                message: format!("bad Parquet data: {e}"),
                                help: "send a complete Parquet file".into(),
                            })
                        })),
                    )
                }
                _ => {
                    let (s, it) = binary::ipc_batches(Cursor::new(body), source)?;
                    (s, it)
                }
            };
            let schema = schema.cloned().unwrap_or(file_schema);
            let dec = Decoder {
                format,
                schema: schema.clone(),
                csv: csv.clone(),
                limits: *limits,
            };
            let mut out = DecodeOutput::default();
            let mut row = 1u64;
            for b in batches {
                let b = b?;
                let o = dec.decode_typed(
                    &b,
                    &Provenance::Rows {
                        source: name.clone(),
                        first_row: row,
                    },
                );
                row += b.num_rows() as u64;
                out.records += o.records;
                out.batches.extend(o.batches);
                out.rejects.extend(o.rejects);
            }
            Ok((schema, out))
        }
    }
}

#[cfg(test)]
mod tests;
