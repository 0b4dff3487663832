//! Files in a directory, one set per worker thread, renamed into place at commit.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_codec::encode::{BatchWriter, EncodeOptions, writer};
use etlmesh_config::FileSinkSpec;

use crate::object::Bucket;
use crate::partition::Partitioner;
use crate::{Committed, Sink, SinkError, SinkWriter, io_error};

/// A finished temporary file and the name it gets at commit.
#[derive(Debug)]
pub(crate) struct Pending {
    pub tmp: PathBuf,
    pub target: PathBuf,
}

/// Makes pending files durable and renames them into place; returns what is now
/// visible. Each file's data reaches the disk (fsync) before its rename, and each
/// directory's entries after the renames, so that a file that is visible — and the
/// messages acknowledged because of it — survives a crash of the machine.
pub(crate) fn commit_files(sink: &str, pending: Vec<Pending>) -> Result<Committed, SinkError> {
    let mut done = Committed::default();
    for p in &pending {
        sync_file(&p.tmp).map_err(|e| io_error(sink, &p.tmp, e))?;
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in pending {
        std::fs::rename(&p.tmp, &p.target).map_err(|e| io_error(sink, &p.target, e))?;
        done.bytes += std::fs::metadata(&p.target).map(|m| m.len()).unwrap_or(0);
        if let Some(dir) = p.target.parent()
            && !dirs.iter().any(|d| d == dir)
        {
            dirs.push(dir.to_path_buf());
        }
        done.files.push(p.target);
    }
    for dir in &dirs {
        sync_dir(dir).map_err(|e| io_error(sink, dir, e))?;
    }
    Ok(done)
}

/// Whether commits fsync: always, but for `ETLMESH_UNSAFE_NO_FSYNC=1`, which exists to
/// measure what durability costs (`bench/stream.py`) and loses acknowledged rows when
/// the machine crashes.
pub(crate) fn fsync_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ETLMESH_UNSAFE_NO_FSYNC").as_deref() != Ok("1"))
}

/// fsync of a file's data and metadata.
pub(crate) fn sync_file(path: &Path) -> std::io::Result<()> {
    if !fsync_on() {
        return Ok(());
    }
    File::open(path)?.sync_all()
}

/// fsync of a directory: its entries (a file created or renamed in it) are durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    if !fsync_on() {
        return Ok(());
    }
    File::open(dir)?.sync_all()
}

/// The hidden temporary name of a final path: `dir/.name.tmp`.
pub(crate) fn tmp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.tmp"))
}

/// A directory of files (or a bucket's prefix, staged in a local directory).
pub struct FileSink {
    spec: FileSinkSpec,
    bucket: Option<Arc<Bucket>>,
    describe: String,
    options: EncodeOptions,
    partitioner: Option<Partitioner>,
    schema: SchemaRef,
    run_id: String,
    writers: AtomicUsize,
    pending: Arc<Mutex<Vec<Pending>>>,
    open_tmp: Arc<Mutex<Vec<PathBuf>>>,
}

impl FileSink {
    /// Creates the directory (and checks it is writable) for rows of `schema`; with an
    /// object target, the staging directory, and checks that the bucket answers.
    pub fn create(spec: FileSinkSpec, schema: SchemaRef, run_id: &str) -> Result<Self, SinkError> {
        let describe = format!("{}:{}", spec.format, spec.location());
        let bucket = match &spec.object {
            Some(target) => Some(Bucket::open(target, &describe)?),
            None => None,
        };
        std::fs::create_dir_all(&spec.path).map_err(|e| io_error(&describe, &spec.path, e))?;
        let probe = spec.path.join(format!(".etlmesh-probe-{run_id}"));
        File::create(&probe).map_err(|e| io_error(&describe, &spec.path, e))?;
        let _ = std::fs::remove_file(&probe);
        let partitioner = if spec.partition_by.is_empty() {
            None
        } else {
            Some(
                Partitioner::new(&schema, &spec.partition_by).map_err(|message| {
                    SinkError::Config {
                        sink: describe.clone(),
                        message,
                    }
                })?,
            )
        };
        let options = EncodeOptions {
            format: spec.format,
            compression: spec.compression,
            row_group_rows: spec.row_group_rows,
            header: spec.header,
            delimiter: spec.delimiter,
            ipc_file: true,
        };
        Ok(Self {
            spec,
            bucket,
            describe,
            options,
            partitioner,
            schema,
            run_id: run_id.to_string(),
            writers: AtomicUsize::new(0),
            pending: Arc::default(),
            open_tmp: Arc::default(),
        })
    }

    /// The schema of the files (without partition columns).
    pub fn file_schema(&self) -> &SchemaRef {
        self.partitioner
            .as_ref()
            .map_or(&self.schema, |p| p.file_schema())
    }
}

impl Sink for FileSink {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn writer(&self) -> Result<Box<dyn SinkWriter>, SinkError> {
        let id = self.writers.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(FileSinkWriter {
            sink: self.describe.clone(),
            dir: self.spec.path.clone(),
            prefix: format!("part-{}-{id:02}", self.run_id),
            ext: self.spec.format.extension(),
            options: self.options.clone(),
            schema: self.file_schema().clone(),
            partitioner: self.partitioner.clone(),
            max_open: self.spec.max_open_files,
            open: HashMap::new(),
            seq: 0,
            tick: 0,
            pending: self.pending.clone(),
            open_tmp: self.open_tmp.clone(),
        }))
    }

    fn commit(&self) -> Result<Committed, SinkError> {
        let pending = std::mem::take(&mut *self.pending.lock());
        match &self.bucket {
            None => commit_files(&self.describe, pending),
            // What is not uploaded stays pending: the next commit goes on from there.
            Some(bucket) => bucket
                .upload_pending(&self.describe, &self.spec.path, pending)
                .map_err(|(error, left)| {
                    self.pending.lock().extend(left);
                    error
                }),
        }
    }

    fn abort(&self) {
        for p in std::mem::take(&mut *self.pending.lock()) {
            let _ = std::fs::remove_file(p.tmp);
        }
        for p in std::mem::take(&mut *self.open_tmp.lock()) {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct OpenFile {
    writer: Box<dyn BatchWriter>,
    tmp: PathBuf,
    target: PathBuf,
    last_used: u64,
}

/// One worker's files in a [`FileSink`].
struct FileSinkWriter {
    sink: String,
    dir: PathBuf,
    prefix: String,
    ext: &'static str,
    options: EncodeOptions,
    schema: SchemaRef,
    partitioner: Option<Partitioner>,
    max_open: usize,
    /// Partition directory ("" without partitions) → its open file.
    open: HashMap<String, OpenFile>,
    seq: usize,
    tick: u64,
    pending: Arc<Mutex<Vec<Pending>>>,
    open_tmp: Arc<Mutex<Vec<PathBuf>>>,
}

impl FileSinkWriter {
    fn file_for(&mut self, part: &str) -> Result<&mut OpenFile, SinkError> {
        self.tick += 1;
        if !self.open.contains_key(part) {
            if self.open.len() >= self.max_open {
                self.close_least_recent()?;
            }
            let dir = if part.is_empty() {
                self.dir.clone()
            } else {
                self.dir.join(part)
            };
            std::fs::create_dir_all(&dir).map_err(|e| io_error(&self.sink, &dir, e))?;
            let target = dir.join(format!("{}-{:04}.{}", self.prefix, self.seq, self.ext));
            self.seq += 1;
            let tmp = tmp_name(&target);
            let file = File::create(&tmp).map_err(|e| io_error(&self.sink, &tmp, e))?;
            self.open_tmp.lock().push(tmp.clone());
            let w = writer(
                BufWriter::with_capacity(1 << 20, file),
                &self.schema,
                &self.options,
            )
            .map_err(|error| SinkError::Encode {
                sink: self.sink.clone(),
                error,
            })?;
            self.open.insert(
                part.to_string(),
                OpenFile {
                    writer: w,
                    tmp,
                    target,
                    last_used: 0,
                },
            );
        }
        let f = self.open.get_mut(part).ok_or_else(|| SinkError::Config {
            sink: self.sink.clone(),
            message: "internal: partition file vanished".into(),
        })?;
        f.last_used = self.tick;
        Ok(f)
    }

    fn close_least_recent(&mut self) -> Result<(), SinkError> {
        let Some(key) = self
            .open
            .iter()
            .min_by_key(|(_, f)| f.last_used)
            .map(|(k, _)| k.clone())
        else {
            return Ok(());
        };
        if let Some(f) = self.open.remove(&key) {
            self.finish_file(f)?;
        }
        Ok(())
    }

    fn finish_file(&self, f: OpenFile) -> Result<(), SinkError> {
        f.writer.finish().map_err(|error| SinkError::Encode {
            sink: self.sink.clone(),
            error,
        })?;
        self.open_tmp.lock().retain(|p| *p != f.tmp);
        self.pending.lock().push(Pending {
            tmp: f.tmp,
            target: f.target,
        });
        Ok(())
    }
}

impl SinkWriter for FileSinkWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let encode = |sink: &str, error| SinkError::Encode {
            sink: sink.to_string(),
            error,
        };
        match self.partitioner.clone() {
            None => {
                let sink = self.sink.clone();
                let f = self.file_for("")?;
                f.writer.write(batch).map_err(|e| encode(&sink, e))
            }
            Some(p) => {
                let parts = p
                    .split(batch)
                    .map_err(|e| encode(&self.sink, etlmesh_codec::CodecError::Arrow(e)))?;
                for (dir, rows) in parts {
                    let sink = self.sink.clone();
                    let f = self.file_for(&dir)?;
                    f.writer.write(&rows).map_err(|e| encode(&sink, e))?;
                }
                Ok(())
            }
        }
    }

    fn close(mut self: Box<Self>) -> Result<(), SinkError> {
        let files: Vec<OpenFile> = self.open.drain().map(|(_, f)| f).collect();
        for f in files {
            self.finish_file(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use etlmesh_config::{Compression, Format};

    fn spec(dir: &Path, format: Format, partition_by: Vec<String>) -> FileSinkSpec {
        FileSinkSpec {
            path: dir.to_path_buf(),
            format,
            partition_by,
            compression: Compression::Zstd(1),
            row_group_rows: 1024,
            header: true,
            delimiter: b',',
            max_open_files: 2,
            rolling: etlmesh_config::Rolling::default(),
            object: None,
        }
    }

    fn batch() -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            (
                "d",
                Arc::new(StringArray::from(vec!["a", "b", "c", "a"])) as ArrayRef,
            ),
            (
                "v",
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])) as ArrayRef,
            ),
        ])
        .expect("batch")
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in walk(dir) {
            out.push(e.strip_prefix(dir).expect("inside").display().to_string());
        }
        out.sort();
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p))
            } else {
                out.push(p)
            }
        }
        out
    }

    #[test]
    fn nothing_is_visible_before_commit_and_everything_after() {
        let dir = tempfile::tempdir().expect("tmp");
        let b = batch();
        let sink = FileSink::create(spec(dir.path(), Format::Csv, vec![]), b.schema(), "run1")
            .expect("sink");
        let mut w = sink.writer().expect("writer");
        w.write(&b).expect("write");
        w.close().expect("close");
        assert!(
            files(dir.path()).iter().all(|f| f.starts_with('.')),
            "{:?}",
            files(dir.path())
        );
        let done = sink.commit().expect("commit");
        assert_eq!(done.files.len(), 1);
        let text = std::fs::read_to_string(&done.files[0]).expect("read");
        assert_eq!(text, "d,v\na,1\nb,2\nc,3\na,4\n");
        assert!(files(dir.path()).iter().all(|f| !f.contains(".tmp")));
    }

    #[test]
    fn abort_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let b = batch();
        let sink = FileSink::create(
            spec(dir.path(), Format::Parquet, vec![]),
            b.schema(),
            "run1",
        )
        .expect("sink");
        let mut w = sink.writer().expect("writer");
        w.write(&b).expect("write");
        // One writer closed, one still open: both are removed.
        let mut w2 = sink.writer().expect("writer");
        w2.write(&b).expect("write");
        w.close().expect("close");
        sink.abort();
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }

    #[test]
    fn hive_partitions_with_a_bound_on_open_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let b = batch();
        let sink = FileSink::create(
            spec(dir.path(), Format::Ndjson, vec!["d".into()]),
            b.schema(),
            "r",
        )
        .expect("sink");
        let mut w = sink.writer().expect("writer");
        w.write(&b).expect("write");
        w.write(&b).expect("write");
        w.close().expect("close");
        sink.commit().expect("commit");
        let got = files(dir.path());
        assert!(
            got.iter().any(|f| f.starts_with("d=a/part-r-00-")),
            "{got:?}"
        );
        assert!(got.iter().any(|f| f.starts_with("d=c/")), "{got:?}");
        let rows: usize = walk(dir.path())
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("read").lines().count())
            .sum();
        assert_eq!(rows, 8);
        let a = walk(&dir.path().join("d=a"));
        let text = std::fs::read_to_string(&a[0]).expect("read");
        assert!(!text.contains("\"d\""), "partition column left out: {text}");
    }

    #[test]
    fn an_unwritable_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").expect("write");
        let err = FileSink::create(
            spec(&file.join("out"), Format::Csv, vec![]),
            batch().schema(),
            "r",
        )
        .err()
        .expect("cannot create a directory under a file");
        let msg = err.to_string();
        assert!(
            msg.contains("cannot write to") && msg.contains("help:"),
            "{msg}"
        );
    }
}
