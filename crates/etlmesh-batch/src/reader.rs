//! The reader thread: opens the inputs one after another and hands out work in
//! bounded amounts (text chunks, Parquet row groups, Arrow batches), so that the
//! workers decode in parallel and memory stays bounded.

use std::fs::File;
use std::io::{Read, Seek};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_codec::binary::{ParquetFile, ipc_batches};
use etlmesh_codec::{Chunk, Chunker, CsvLayout, Decoder, Limits, Provenance};
use etlmesh_config::{CsvOptions, Format};
use tokio::sync::mpsc;

use crate::JobError;
use crate::inputs::Input;
use crate::progress::Counters;

/// Largest Parquet or Arrow input read from standard input (it must be held whole).
const MAX_STDIN_BINARY: u64 = 2 << 30;

/// A unit of work for a worker.
pub(crate) enum Work {
    /// Text records.
    Text {
        chunk: Chunk,
        layout: Arc<CsvLayout>,
        decoder: Arc<Decoder>,
    },
    /// A Parquet row group.
    ParquetGroup {
        file: Arc<ParquetFile>,
        group: usize,
        decoder: Arc<Decoder>,
    },
    /// Typed rows (Arrow IPC).
    Typed {
        batch: RecordBatch,
        provenance: Provenance,
        decoder: Arc<Decoder>,
    },
}

pub(crate) type ChunkSource = Chunker<Box<dyn Read + Send>>;

/// The first chunk of the first input, read early to infer the schema.
pub(crate) struct Prefetched {
    pub chunker: ChunkSource,
    pub first: Option<Chunk>,
}

/// What the reader needs.
pub(crate) struct ReaderSetup {
    pub inputs: Vec<Input>,
    pub schema: SchemaRef,
    pub csv: CsvOptions,
    pub limits: Limits,
    pub read_chunk: usize,
    pub prefetched: Option<Prefetched>,
    pub counters: Arc<Counters>,
    pub cancel: Arc<AtomicBool>,
}

pub(crate) fn open_text(
    input: &Input,
    csv: &CsvOptions,
    limits: &Limits,
    read_chunk: usize,
) -> Result<ChunkSource, JobError> {
    let framing = etlmesh_codec::framing(input.format(), csv)
        .ok_or_else(|| JobError::Input(format!("{}: not a text format", input.name())))?;
    let reader: Box<dyn Read + Send> = match input {
        Input::File { path, .. } => Box::new(
            File::open(path).map_err(|e| JobError::Input(format!("{}: {e}", path.display())))?,
        ),
        Input::Stdin { .. } => Box::new(std::io::stdin()),
    };
    Ok(Chunker::new(
        reader,
        Arc::from(input.name()),
        framing,
        read_chunk,
        limits.max_record_bytes as usize,
    ))
}

fn codec(e: etlmesh_codec::CodecError) -> JobError {
    JobError::Input(e.to_string())
}

/// Reads every input; stops early when `cancel` is set or the workers are gone.
pub(crate) fn read_all(mut setup: ReaderSetup, tx: mpsc::Sender<Result<Work, JobError>>) {
    let inputs = std::mem::take(&mut setup.inputs);
    for (i, input) in inputs.iter().enumerate() {
        if setup.cancel.load(Ordering::Relaxed) {
            return;
        }
        let decoder = Arc::new(Decoder {
            format: input.format(),
            schema: setup.schema.clone(),
            csv: setup.csv.clone(),
            limits: setup.limits,
        });
        let prefetched = if i == 0 {
            setup.prefetched.take()
        } else {
            None
        };
        let result = match input.format() {
            Format::Csv | Format::Ndjson | Format::Json => {
                read_text(input, &setup, decoder, prefetched, &tx)
            }
            Format::Parquet => read_parquet(input, &setup, decoder, &tx),
            Format::Arrow => read_arrow(input, &setup, decoder, &tx),
        };
        match result {
            Ok(true) => {}
            Ok(false) => return, // the workers are gone
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

fn read_text(
    input: &Input,
    setup: &ReaderSetup,
    decoder: Arc<Decoder>,
    prefetched: Option<Prefetched>,
    tx: &mpsc::Sender<Result<Work, JobError>>,
) -> Result<bool, JobError> {
    let (mut chunker, first) = match prefetched {
        Some(p) => (p.chunker, p.first),
        None => {
            let mut c = open_text(input, &setup.csv, &setup.limits, setup.read_chunk)?;
            let first = c.next_chunk().map_err(codec)?;
            (c, first)
        }
    };
    let Some(mut chunk) = first else {
        tracing::warn!(input = %input.name(), "the input is empty: no records");
        return Ok(true);
    };
    let layout = Arc::new(decoder.layout(&mut chunk).map_err(codec)?);
    let mut read_so_far = 0;
    loop {
        let n = chunker.bytes_read();
        Counters::add(&setup.counters.bytes_in, n - read_so_far);
        read_so_far = n;
        let work = Work::Text {
            chunk,
            layout: layout.clone(),
            decoder: decoder.clone(),
        };
        if tx.blocking_send(Ok(work)).is_err() {
            return Ok(false);
        }
        if setup.cancel.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match chunker.next_chunk().map_err(codec)? {
            Some(c) => chunk = c,
            None => break,
        }
    }
    Counters::add(&setup.counters.bytes_in, chunker.bytes_read() - read_so_far);
    Ok(true)
}

fn read_parquet(
    input: &Input,
    setup: &ReaderSetup,
    decoder: Arc<Decoder>,
    tx: &mpsc::Sender<Result<Work, JobError>>,
) -> Result<bool, JobError> {
    let Input::File { path, size, .. } = input else {
        let bytes = read_stdin()?;
        Counters::add(&setup.counters.bytes_in, bytes.len() as u64);
        let (_, reader) =
            etlmesh_codec::binary::parquet_body(bytes.into(), "stdin", setup.limits.batch_size)
                .map_err(codec)?;
        let batches =
            reader.map(|b| b.map_err(|e| JobError::Input(format!("stdin: bad Parquet data: {e}"))));
        return send_batches(input, setup, decoder, tx, batches);
    };
    let file = Arc::new(ParquetFile::open(path).map_err(codec)?);
    let total_rows: u64 = file.row_group_rows.iter().sum::<u64>().max(1);
    for group in 0..file.row_group_rows.len() {
        Counters::add(
            &setup.counters.bytes_in,
            size * file.row_group_rows[group] / total_rows,
        );
        let work = Work::ParquetGroup {
            file: file.clone(),
            group,
            decoder: decoder.clone(),
        };
        if tx.blocking_send(Ok(work)).is_err() || setup.cancel.load(Ordering::Relaxed) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn read_stdin() -> Result<Vec<u8>, JobError> {
    let mut buf = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN_BINARY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| JobError::Input(format!("stdin: {e}")))?;
    if buf.len() as u64 > MAX_STDIN_BINARY {
        return Err(JobError::Input(
            "stdin: Parquet and Arrow input on stdin is limited to 2 GiB\n  help: pass the file's path instead".into(),
        ));
    }
    Ok(buf)
}

fn read_arrow(
    input: &Input,
    setup: &ReaderSetup,
    decoder: Arc<Decoder>,
    tx: &mpsc::Sender<Result<Work, JobError>>,
) -> Result<bool, JobError> {
    fn open<R: Read + Seek + Send + 'static>(
        r: R,
        name: &str,
    ) -> Result<Box<dyn Iterator<Item = Result<RecordBatch, JobError>> + Send>, JobError> {
        let (_, it) = ipc_batches(r, name).map_err(codec)?;
        Ok(Box::new(it.map(|b| b.map_err(codec))))
    }
    let batches = match input {
        Input::File { path, size, .. } => {
            Counters::add(&setup.counters.bytes_in, *size);
            open(
                File::open(path)
                    .map_err(|e| JobError::Input(format!("{}: {e}", path.display())))?,
                &input.name(),
            )?
        }
        Input::Stdin { .. } => {
            let bytes = read_stdin()?;
            Counters::add(&setup.counters.bytes_in, bytes.len() as u64);
            open(std::io::Cursor::new(bytes), "stdin")?
        }
    };
    send_batches(input, setup, decoder, tx, batches)
}

fn send_batches(
    input: &Input,
    setup: &ReaderSetup,
    decoder: Arc<Decoder>,
    tx: &mpsc::Sender<Result<Work, JobError>>,
    batches: impl Iterator<Item = Result<RecordBatch, JobError>>,
) -> Result<bool, JobError> {
    let source: Arc<str> = Arc::from(input.name());
    let mut row = 1u64;
    for b in batches {
        let batch = b?;
        let provenance = Provenance::Rows {
            source: source.clone(),
            first_row: row,
        };
        row += batch.num_rows() as u64;
        if tx
            .blocking_send(Ok(Work::Typed {
                batch,
                provenance,
                decoder: decoder.clone(),
            }))
            .is_err()
            || setup.cancel.load(Ordering::Relaxed)
        {
            return Ok(false);
        }
    }
    Ok(true)
}
