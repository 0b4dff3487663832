//! Arrow batches to bytes: CSV, NDJSON, JSON arrays, Parquet (zstd by default) and
//! Arrow IPC, behind one [`BatchWriter`] trait.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::ipc::writer::{FileWriter, StreamWriter};
use etlmesh_config::{Compression, Format};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as PqCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::CodecError;

/// How to encode.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// The format.
    pub format: Format,
    /// Parquet compression.
    pub compression: Compression,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// CSV header line.
    pub header: bool,
    /// CSV delimiter.
    pub delimiter: u8,
    /// Arrow: the IPC file format (seekable, for files) rather than the stream format.
    pub ipc_file: bool,
}

impl EncodeOptions {
    /// Defaults for a format.
    pub fn new(format: Format) -> Self {
        Self {
            format,
            compression: Compression::Zstd(1),
            row_group_rows: 1 << 20,
            header: true,
            delimiter: b',',
            ipc_file: false,
        }
    }
}

/// Writes batches in one format.
pub trait BatchWriter: Send {
    /// Encodes one batch.
    fn write(&mut self, batch: &RecordBatch) -> Result<(), CodecError>;
    /// Writes any footer and flushes.
    fn finish(self: Box<Self>) -> Result<(), CodecError>;
}

fn enc(e: impl std::fmt::Display) -> CodecError {
    CodecError::Encode(e.to_string())
}

struct Csv<W: Write>(arrow::csv::Writer<W>);
struct Ndjson<W: Write>(arrow::json::LineDelimitedWriter<W>);
struct JsonArray<W: Write>(arrow::json::ArrayWriter<W>);
struct Parquet<W: Write + Send>(ArrowWriter<W>);
struct IpcFile<W: Write>(FileWriter<W>);
struct IpcStream<W: Write>(StreamWriter<W>);

impl<W: Write + Send> BatchWriter for Csv<W> {
    fn write(&mut self, b: &RecordBatch) -> Result<(), CodecError> {
        self.0.write(b).map_err(enc)
    }
    fn finish(self: Box<Self>) -> Result<(), CodecError> {
        let mut w = self.0.into_inner();
        w.flush().map_err(enc)
    }
}

impl<W: Write + Send> BatchWriter for Ndjson<W> {
    fn write(&mut self, b: &RecordBatch) -> Result<(), CodecError> {
        self.0.write(b).map_err(enc)
    }
    fn finish(mut self: Box<Self>) -> Result<(), CodecError> {
        self.0.finish().map_err(enc)?;
        self.0.into_inner().flush().map_err(enc)
    }
}

impl<W: Write + Send> BatchWriter for JsonArray<W> {
    fn write(&mut self, b: &RecordBatch) -> Result<(), CodecError> {
        self.0.write(b).map_err(enc)
    }
    fn finish(mut self: Box<Self>) -> Result<(), CodecError> {
        self.0.finish().map_err(enc)?;
        self.0.into_inner().flush().map_err(enc)
    }
}

impl<W: Write + Send> BatchWriter for Parquet<W> {
    fn write(&mut self, b: &RecordBatch) -> Result<(), CodecError> {
        self.0.write(b).map_err(enc)
    }
    fn finish(self: Box<Self>) -> Result<(), CodecError> {
        let mut w = self.0.into_inner().map_err(enc)?;
        w.flush().map_err(enc)
    }
}

impl<W: Write + Send> BatchWriter for IpcFile<W> {
    fn write(&mut self, b: &RecordBatch) -> Result<(), CodecError> {
        self.0.write(b).map_err(enc)
    }
    fn finish(mut self: Box<Self>) -> Result<(), CodecError> {
        self.0.finish().map_err(enc)?;
        self.0.into_inner().map_err(enc)?.flush().map_err(enc)
    }
}

impl<W: Write + Send> BatchWriter for IpcStream<W> {
    fn write(&mut self, b: &RecordBatch) -> Result<(), CodecError> {
        self.0.write(b).map_err(enc)
    }
    fn finish(mut self: Box<Self>) -> Result<(), CodecError> {
        self.0.finish().map_err(enc)?;
        self.0.into_inner().map_err(enc)?.flush().map_err(enc)
    }
}

/// Parquet writer properties for a compression setting. Dictionary encoding is kept
/// for text and integers and left out for floats and timestamps, whose values rarely
/// repeat: building a dictionary only to drop it costs time.
pub fn parquet_properties(
    schema: &SchemaRef,
    compression: Compression,
    row_group_rows: usize,
) -> WriterProperties {
    let c = match compression {
        Compression::Zstd(level) => {
            PqCompression::ZSTD(ZstdLevel::try_new(level).unwrap_or_default())
        }
        Compression::Snappy => PqCompression::SNAPPY,
        Compression::Lz4 => PqCompression::LZ4_RAW,
        Compression::None => PqCompression::UNCOMPRESSED,
    };
    let mut b = WriterProperties::builder()
        .set_compression(c)
        .set_max_row_group_row_count(Some(row_group_rows));
    for f in schema.fields() {
        if matches!(
            f.data_type(),
            DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Timestamp(..)
        ) {
            b = b.set_column_dictionary_enabled(ColumnPath::from(f.name().as_str()), false);
        }
    }
    b.build()
}

/// A writer of `schema`'s batches into `w`.
pub fn writer<W: Write + Send + 'static>(
    w: W,
    schema: &SchemaRef,
    opts: &EncodeOptions,
) -> Result<Box<dyn BatchWriter>, CodecError> {
    Ok(match opts.format {
        Format::Csv => Box::new(Csv(arrow::csv::WriterBuilder::new()
            .with_header(opts.header)
            .with_delimiter(opts.delimiter)
            .build(w))),
        Format::Ndjson => Box::new(Ndjson(arrow::json::LineDelimitedWriter::new(w))),
        Format::Json => Box::new(JsonArray(arrow::json::ArrayWriter::new(w))),
        Format::Parquet => {
            let props = parquet_properties(schema, opts.compression, opts.row_group_rows);
            Box::new(Parquet(
                ArrowWriter::try_new(w, schema.clone(), Some(props)).map_err(enc)?,
            ))
        }
        Format::Arrow if opts.ipc_file => {
            Box::new(IpcFile(FileWriter::try_new(w, schema).map_err(enc)?))
        }
        Format::Arrow => Box::new(IpcStream(StreamWriter::try_new(w, schema).map_err(enc)?)),
    })
}

/// Encodes batches into a byte vector (a response body).
pub fn encode_to_vec(
    batches: &[RecordBatch],
    schema: &SchemaRef,
    opts: &EncodeOptions,
) -> Result<Vec<u8>, CodecError> {
    let buf = SharedBuf::default();
    let mut w = writer(buf.clone(), schema, opts)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    Ok(buf.take())
}

/// A `Write` into a shared vector, so that a boxed writer can be finished and its bytes kept.
#[derive(Clone, Default)]
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuf {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("buffer lock poisoned"))?
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
