//! Typed inputs: Parquet and Arrow IPC. Their rows are already typed; when a schema is
//! declared, [`conform`] casts each column to it and rejects the rows whose values do
//! not fit, instead of failing the whole batch.
//!
//! Arrow's and Parquet's readers panic on some malformed inputs (an IPC schema naming a
//! type they do not implement, found by fuzzing): every read of untrusted bytes here
//! runs [`guarded`], so that such a panic becomes an error naming the input.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use std::panic::{AssertUnwindSafe, catch_unwind};

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, new_null_array};
use arrow::compute::{CastOptions, cast_with_options, filter_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ipc::reader::{FileReader, StreamReader};
use bytes::Bytes;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::CodecError;
use crate::record::{DecodedBatch, Provenance, Reject, Stage};

/// Casts `batch` to `target` by column name. Rows with a value that does not cast, or
/// a null in a required field, are returned as rejects and left out.
pub fn conform(
    batch: &RecordBatch,
    target: &SchemaRef,
    prov: &Provenance,
) -> (Option<DecodedBatch>, Vec<Reject>) {
    if batch.schema() == *target {
        return (
            Some(DecodedBatch {
                batch: batch.clone(),
                provenance: prov.clone(),
            }),
            Vec::new(),
        );
    }
    let rows = batch.num_rows();
    let mut bad: Vec<Option<(String, String)>> = vec![None; rows];
    let opts = CastOptions {
        safe: true,
        ..Default::default()
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        let col = match batch.schema().index_of(field.name()) {
            Ok(i) => {
                let src = batch.column(i);
                let cast = if src.data_type() == field.data_type() {
                    Ok(src.clone())
                } else {
                    cast_with_options(src, field.data_type(), &opts)
                };
                match cast {
                    Ok(c) => {
                        for (r, slot) in bad.iter_mut().enumerate() {
                            if slot.is_none() && c.is_null(r) && !src.is_null(r) {
                                let value = arrow::util::display::array_value_to_string(src, r)
                                    .unwrap_or_default();
                                *slot = Some((
                                    field.name().clone(),
                                    format!(
                                        "cannot read {} ({}) as {}",
                                        crate::decode::show(value.as_bytes()),
                                        crate::schema::type_name(src.data_type()),
                                        crate::schema::type_name(field.data_type())
                                    ),
                                ));
                            }
                        }
                        c
                    }
                    Err(e) => {
                        let reason = format!(
                            "cannot cast {} to {}: {e}",
                            crate::schema::type_name(src.data_type()),
                            crate::schema::type_name(field.data_type())
                        );
                        for b in bad.iter_mut().filter(|b| b.is_none()) {
                            *b = Some((field.name().clone(), reason.clone()));
                        }
                        new_null_array(field.data_type(), rows)
                    }
                }
            }
            Err(_) => new_null_array(field.data_type(), rows),
        };
        if !field.is_nullable() {
            for (r, b) in bad.iter_mut().enumerate() {
                if b.is_none() && col.is_null(r) {
                    *b = Some((field.name().clone(), "is required but missing".into()));
                }
            }
        }
        columns.push(col);
    }
    let mut rejects = Vec::new();
    for (r, b) in bad.iter().enumerate() {
        if let Some((field, reason)) = b {
            rejects.push(
                prov.reject(batch, r, Stage::Cast, reason.clone())
                    .in_field(field.clone()),
            );
        }
    }
    // Rows about to be rejected may hold nulls in required fields: build with every
    // field nullable, drop them, then check the target schema.
    let loose = Arc::new(arrow::datatypes::Schema::new(
        target
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let reject_all = |e: arrow::error::ArrowError| {
        let reason = format!("does not fit the schema: {e}");
        (0..rows)
            .map(|r| prov.reject(batch, r, Stage::Cast, reason.clone()))
            .collect::<Vec<_>>()
    };
    let cast = match RecordBatch::try_new(loose, columns) {
        Ok(c) => c,
        Err(e) => return (None, reject_all(e)),
    };
    let (kept, provenance) = if rejects.is_empty() {
        (cast, prov.clone())
    } else {
        let keep = BooleanArray::from(bad.iter().map(Option::is_none).collect::<Vec<_>>());
        let kept_rows: Vec<usize> = (0..rows).filter(|r| bad[*r].is_none()).collect();
        match filter_record_batch(&cast, &keep) {
            Ok(b) => (b, prov.pick(&kept_rows)),
            Err(e) => return (None, reject_all(e)),
        }
    };
    if kept.num_rows() == 0 {
        return (None, rejects);
    }
    match RecordBatch::try_new(target.clone(), kept.columns().to_vec()) {
        Ok(batch) => (Some(DecodedBatch { batch, provenance }), rejects),
        Err(e) => (None, reject_all(e)),
    }
}

/// A Parquet file's schema and row groups.
pub struct ParquetFile {
    /// The file.
    pub path: Arc<str>,
    /// Its Arrow schema.
    pub schema: SchemaRef,
    /// Rows in each row group.
    pub row_group_rows: Vec<u64>,
}

impl ParquetFile {
    /// Reads a file's footer.
    pub fn open(path: &Path) -> Result<Self, CodecError> {
        let name: Arc<str> = Arc::from(path.display().to_string());
        let file = File::open(path).map_err(|e| CodecError::Io {
            input: name.to_string(),
            error: e,
        })?;
        let reader = Arc::new(file);
        let builder = guarded(&name, "Parquet file", || {
            let b = ParquetRecordBatchReaderBuilder::try_new(reader.try_clone().map_err(|e| {
                CodecError::Io {
                    input: name.to_string(),
                    error: e,
                }
            })?)
            .map_err(|e| parquet_error(&name, e))?;
            crate::parquet_check::check(&reader, b.metadata())
                .map_err(|why| inflated(&name, &why))?;
            Ok(b)
        })?;
        let row_group_rows = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|rg| rg.num_rows() as u64)
            .collect();
        Ok(Self {
            path: name,
            schema: builder.schema().clone(),
            row_group_rows,
        })
    }

    /// A reader over some row groups.
    pub fn read_groups(
        &self,
        groups: Vec<usize>,
        batch_size: usize,
    ) -> Result<ParquetBatches, CodecError> {
        let file = File::open(&*self.path).map_err(|e| CodecError::Io {
            input: self.path.to_string(),
            error: e,
        })?;
        guarded(&self.path, "Parquet file", || {
            ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| {
                    b.with_row_groups(groups)
                        .with_batch_size(batch_size)
                        .build()
                })
                .map_err(|e| parquet_error(&self.path, e))
        })
        .map(Guarded::parquet)
    }

    /// The 1-based number of the first record of row group `g`.
    pub fn first_row_of(&self, g: usize) -> u64 {
        self.row_group_rows[..g].iter().sum::<u64>() + 1
    }
}

/// A dictionary that claims more values than its bytes hold (see `parquet_check`).
fn inflated(source: &str, why: &str) -> CodecError {
    CodecError::Input {
        input: source.to_string(),
        message: format!("malformed Parquet data: {why}"),
        help: "the file is damaged or was crafted; write it again".into(),
    }
}

fn parquet_error(source: &str, e: parquet::errors::ParquetError) -> CodecError {
    CodecError::Input {
        input: source.to_string(),
        message: format!("not a readable Parquet file: {e}"),
        help: "check that the file is complete Parquet, or set the source's format".into(),
    }
}

fn ipc_error(source: &str, e: arrow::error::ArrowError) -> CodecError {
    CodecError::Input {
        input: source.to_string(),
        message: format!("not a readable Arrow IPC stream or file: {e}"),
        help: "send an Arrow IPC stream (or file), or set the format".into(),
    }
}

/// Batches read one after another.
pub type BatchIter = Box<dyn Iterator<Item = Result<RecordBatch, CodecError>> + Send>;

/// Batches from an Arrow IPC input, file or stream format (told apart by the magic).
pub fn ipc_batches<R: Read + Seek + Send + 'static>(
    mut reader: R,
    source: &str,
) -> Result<(SchemaRef, BatchIter), CodecError> {
    let mut magic = [0u8; 6];
    let n = reader.read(&mut magic).map_err(|e| CodecError::Io {
        input: source.into(),
        error: e,
    })?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| CodecError::Io {
            input: source.into(),
            error: e,
        })?;
    let src = source.to_string();
    crate::ipc_check::check(&mut reader, n == 6 && &magic == b"ARROW1")
        .map_err(|why| ipc_error(source, ArrowError::IpcError(why)))?;
    let on_panic = {
        let src = src.clone();
        move |why: String| {
            Err(ipc_error(
                &src,
                ArrowError::IpcError(format!("the reader stopped: {why}")),
            ))
        }
    };
    if n == 6 && &magic == b"ARROW1" {
        let r = guarded(source, "Arrow IPC file", || {
            FileReader::try_new(reader, None).map_err(|e| ipc_error(source, e))
        })?;
        let schema = r.schema();
        let it = r.map(move |b| b.map_err(|e| ipc_error(&src, e)));
        Ok((schema, Box::new(Guarded::new(it, Box::new(on_panic)))))
    } else {
        let r = guarded(source, "Arrow IPC stream", || {
            StreamReader::try_new(reader, None).map_err(|e| ipc_error(source, e))
        })?;
        let schema = r.schema();
        let it = r.map(move |b| b.map_err(|e| ipc_error(&src, e)));
        Ok((schema, Box::new(Guarded::new(it, Box::new(on_panic)))))
    }
}

/// Batches of a Parquet input, read under [`guarded`].
pub type ParquetBatches = Guarded<ParquetRecordBatchReader>;

/// What a panic said.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs a reader of untrusted bytes; a panic in it becomes an error naming `source`.
pub fn guarded<T>(
    source: &str,
    what: &str,
    read: impl FnOnce() -> Result<T, CodecError>,
) -> Result<T, CodecError> {
    catch_unwind(AssertUnwindSafe(read)).unwrap_or_else(|p| {
        Err(CodecError::Input {
            input: source.to_string(),
            message: format!(
                "malformed {what}: the reader stopped: {}",
                panic_message(&*p)
            ),
            help: "send complete, well-formed data".into(),
        })
    })
}

/// An iterator over untrusted data whose `next` runs under [`guarded`]'s rule: a
/// panic ends it with one error item.
pub struct Guarded<I: Iterator> {
    inner: Option<I>,
    on_panic: Box<dyn Fn(String) -> I::Item + Send>,
}

impl<I: Iterator> Guarded<I> {
    /// Guards `inner`; `on_panic` turns a panic's message into the last item.
    pub fn new(inner: I, on_panic: Box<dyn Fn(String) -> I::Item + Send>) -> Self {
        Self {
            inner: Some(inner),
            on_panic,
        }
    }
}

impl Guarded<ParquetRecordBatchReader> {
    fn parquet(r: ParquetRecordBatchReader) -> Self {
        Self::new(
            r,
            Box::new(|why| {
                Err(ArrowError::ParquetError(format!(
                    "malformed Parquet data: the reader stopped: {why}"
                )))
            }),
        )
    }
}

impl<I: Iterator> Iterator for Guarded<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let inner = self.inner.as_mut()?;
        match catch_unwind(AssertUnwindSafe(|| inner.next())) {
            Ok(item) => item,
            Err(p) => {
                self.inner = None;
                Some((self.on_panic)(panic_message(&*p)))
            }
        }
    }
}

/// Batches from an in-memory Parquet body.
pub fn parquet_body(
    body: Bytes,
    source: &str,
    batch_size: usize,
) -> Result<(SchemaRef, ParquetBatches), CodecError> {
    guarded(source, "Parquet data", || {
        let b = ParquetRecordBatchReaderBuilder::try_new(body.clone())
            .map_err(|e| parquet_error(source, e))?;
        crate::parquet_check::check(&Arc::new(body), b.metadata())
            .map_err(|why| inflated(source, &why))?;
        let schema = b.schema().clone();
        let r = b
            .with_batch_size(batch_size)
            .build()
            .map_err(|e| parquet_error(source, e))?;
        Ok((schema, Guarded::parquet(r)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Float64Type, Schema};

    #[test]
    fn conform_casts_binary_text_and_timestamp_units() {
        use arrow::array::{BinaryArray, TimestampNanosecondArray};
        use arrow::datatypes::TimeUnit;
        let src = RecordBatch::try_from_iter(vec![
            (
                "d",
                Arc::new(BinaryArray::from(vec![&b"a"[..], b"\xff\xfe", b"c"])) as ArrayRef,
            ),
            (
                "ts",
                Arc::new(
                    TimestampNanosecondArray::from(vec![1_000_000, 2_000_000, 3_000_000])
                        .with_timezone("UTC"),
                ) as ArrayRef,
            ),
        ])
        .expect("batch");
        let target = Arc::new(Schema::new(vec![
            Field::new("d", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
        ]));
        let prov = Provenance::Rows {
            source: Arc::from("in"),
            first_row: 1,
        };
        let (kept, rejects) = conform(&src, &target, &prov);
        assert_eq!(rejects.len(), 1, "the row whose text is not UTF-8");
        assert_eq!(rejects[0].row, Some(2));
        let kept = kept.expect("kept");
        assert_eq!(kept.batch.num_rows(), 2);
        assert_eq!(kept.batch.schema(), target);
        // The kept rows keep their record numbers.
        assert_eq!(
            kept.provenance
                .reject(&kept.batch, 1, Stage::Transform, "x")
                .row,
            Some(3)
        );
    }

    #[test]
    fn conform_rejects_only_bad_rows() {
        let src = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
            (
                "t",
                Arc::new(StringArray::from(vec![Some("1.5"), Some("hot"), None])) as ArrayRef,
            ),
        ])
        .expect("batch");
        let target = Arc::new(Schema::new(vec![
            Field::new("t", DataType::Float64, true),
            Field::new("id", DataType::Utf8, false),
        ]));
        let prov = Provenance::Rows {
            source: Arc::from("in.parquet"),
            first_row: 1,
        };
        let (kept, rejects) = conform(&src, &target, &prov);
        let kept = kept.expect("rows kept");
        assert_eq!(kept.batch.num_rows(), 2);
        assert_eq!(
            kept.batch.column(0).as_primitive::<Float64Type>().value(0),
            1.5
        );
        assert_eq!(rejects.len(), 1);
        assert_eq!(rejects[0].row, Some(2));
        assert_eq!(rejects[0].field.as_deref(), Some("t"));
        assert_eq!(&rejects[0].raw[..], br#"{"id":2,"t":"hot"}"#);
    }
}
