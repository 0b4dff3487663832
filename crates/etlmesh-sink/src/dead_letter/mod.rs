//! Dead letters: every record that was not loaded, as one NDJSON line with the
//! pipeline, where it came from (input, line or record number), the stage that
//! refused it, the reason and its original bytes.
//!
//! [`route`] is the one way bad records leave a pipeline — batch runs, requests and
//! streams alike; [`DeadLetterSink`] (a batch run's file, committed with the run) and
//! [`DeadLetterLog`] (a service's log, fsynced per write) are where they land. With
//! `path: s3://…` both stage locally: the batch file is uploaded at its commit, a
//! service's files as they rotate (the open file stays on the local disk until then).

mod route;

pub use route::{DeadLetterRoute, DeadLetterWrite, Routed, first};

use parking_lot::Mutex;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use etlmesh_codec::Reject;
use etlmesh_config::DeadLetterSpec;
use serde::Serialize;

use crate::file::{Pending, commit_files, sync_dir, tmp_name};
use crate::object::Bucket;
use crate::{Committed, SinkError, io_error};

/// One dead letter, as written.
#[derive(Debug, Serialize)]
pub struct DeadLetter<'a> {
    /// When it was written (RFC 3339).
    pub time: String,
    /// The pipeline.
    pub pipeline: &'a str,
    /// The input.
    pub source: &'a str,
    /// 1-based line, for text inputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// 1-based record number, for typed inputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row: Option<u64>,
    /// decode, cast, transform, limit, late, future or load.
    pub stage: &'a str,
    /// The field at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'a str>,
    /// Why.
    pub reason: &'a str,
    /// The original bytes, when they are UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<&'a str>,
    /// The original bytes in base64, when they are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_base64: Option<String>,
    /// Whether the bytes were cut.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub raw_truncated: bool,
}

impl<'a> DeadLetter<'a> {
    /// The dead letter of a reject.
    pub fn of(pipeline: &'a str, r: &'a Reject) -> Self {
        let text = std::str::from_utf8(&r.raw).ok();
        Self {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            pipeline,
            source: &r.source,
            line: r.line,
            row: r.row,
            stage: r.stage.as_str(),
            field: r.field.as_deref(),
            reason: &r.reason,
            raw: text,
            raw_base64: text
                .is_none()
                .then(|| base64::engine::general_purpose::STANDARD.encode(&r.raw)),
            raw_truncated: r.raw_truncated,
        }
    }
}

/// NDJSON dead letters in a directory, one file per run, renamed into place at commit.
pub struct DeadLetterSink {
    pipeline: String,
    describe: String,
    dir: PathBuf,
    bucket: Option<Arc<Bucket>>,
    target: PathBuf,
    file: Mutex<Option<BufWriter<File>>>,
    count: AtomicU64,
}

impl DeadLetterSink {
    /// Creates the directory; the file itself appears with the first dead letter.
    pub fn create(spec: &DeadLetterSpec, pipeline: &str, run_id: &str) -> Result<Self, SinkError> {
        let describe = format!("dead_letter:{}", spec.location());
        let bucket = match &spec.object {
            Some(t) => Some(Bucket::open(t, &describe)?),
            None => None,
        };
        std::fs::create_dir_all(&spec.path).map_err(|e| io_error(&describe, &spec.path, e))?;
        let probe = spec.path.join(format!(".etlmesh-probe-{run_id}"));
        File::create(&probe).map_err(|e| io_error(&describe, &spec.path, e))?;
        let _ = std::fs::remove_file(&probe);
        Ok(Self {
            pipeline: pipeline.to_string(),
            describe,
            dir: spec.path.clone(),
            bucket,
            target: spec.path.join(format!("dead-{pipeline}-{run_id}.ndjson")),
            file: Mutex::new(None),
            count: AtomicU64::new(0),
        })
    }

    /// Dead letters written.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The file they go to, once committed.
    pub fn path(&self) -> &PathBuf {
        &self.target
    }

    /// Writes rejects.
    pub fn write(&self, rejects: &[Reject]) -> Result<(), SinkError> {
        if rejects.is_empty() {
            return Ok(());
        }
        let tmp = tmp_name(&self.target);
        let mut guard = self.file.lock();
        if guard.is_none() {
            let f = File::create(&tmp).map_err(|e| io_error(&self.describe, &tmp, e))?;
            *guard = Some(BufWriter::new(f));
        }
        let Some(w) = guard.as_mut() else {
            return Ok(());
        };
        for r in rejects {
            serde_json::to_writer(&mut *w, &DeadLetter::of(&self.pipeline, r))
                .map_err(|e| io_error(&self.describe, &tmp, e.into()))?;
            w.write_all(b"\n")
                .map_err(|e| io_error(&self.describe, &tmp, e))?;
        }
        self.count
            .fetch_add(rejects.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the dead letters visible.
    pub fn commit(&self) -> Result<Committed, SinkError> {
        let Some(mut w) = self.file.lock().take() else {
            return Ok(Committed::default());
        };
        let tmp = tmp_name(&self.target);
        w.flush().map_err(|e| io_error(&self.describe, &tmp, e))?;
        drop(w);
        let pending = vec![Pending {
            tmp,
            target: self.target.clone(),
        }];
        match &self.bucket {
            None => commit_files(&self.describe, pending),
            Some(b) => b
                .upload_pending(&self.describe, &self.dir, pending)
                .map_err(|(error, _)| error),
        }
    }

    /// Removes what was written.
    pub fn abort(&self) {
        if self.file.lock().take().is_some() {
            let _ = std::fs::remove_file(tmp_name(&self.target));
        }
    }
}

/// Dead letters of a long-running service (a worker): appended to one NDJSON file per
/// pipeline and instance, flushed and fsynced after every write, so they survive a
/// crash of the process or of the machine.
///
/// Bounded: past `max_size` the file is rotated (`dead-<p>-<w>.<n>.ndjson`), and past
/// `max_files` rotated files the oldest is removed — counted in [`DeadLetterLog::stats`]
/// and logged as an error (`error_kind=dead_letters_dropped`), never filling the disk.
pub struct DeadLetterLog {
    pipeline: String,
    describe: String,
    dir: PathBuf,
    /// `dead-<pipeline>-<instance>`.
    stem: String,
    path: PathBuf,
    max_size: u64,
    max_files: usize,
    file: Mutex<Option<Current>>,
    /// With an object target: where rotated files go, and those already there.
    bucket: Option<Arc<Bucket>>,
    uploaded: Arc<Mutex<HashSet<PathBuf>>>,
    /// Rotated files whose upload is under way: kept past `max_files` until it ends.
    uploading: Arc<Mutex<HashSet<PathBuf>>>,
    count: AtomicU64,
    rotations: AtomicU64,
    dropped_files: AtomicU64,
    dropped_bytes: AtomicU64,
}

struct Current {
    writer: BufWriter<File>,
    bytes: u64,
}

/// What a dead-letter log did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadLetterStats {
    /// Dead letters written.
    pub written: u64,
    /// Files rotated.
    pub rotations: u64,
    /// Rotated files removed past `max_files`.
    pub dropped_files: u64,
    /// Their bytes.
    pub dropped_bytes: u64,
}

impl DeadLetterLog {
    /// Creates the directory; the file appears with the first dead letter.
    pub fn open(spec: &DeadLetterSpec, pipeline: &str, instance: &str) -> Result<Self, SinkError> {
        let describe = format!("dead_letter:{}", spec.location());
        let bucket = match &spec.object {
            Some(t) => Some(Bucket::unchecked(t, &describe)?),
            None => None,
        };
        std::fs::create_dir_all(&spec.path).map_err(|e| io_error(&describe, &spec.path, e))?;
        let stem = format!("dead-{pipeline}-{instance}");
        Ok(Self {
            pipeline: pipeline.to_string(),
            describe,
            dir: spec.path.clone(),
            path: spec.path.join(format!("{stem}.ndjson")),
            stem,
            max_size: spec.max_size,
            max_files: spec.max_files,
            file: Mutex::new(None),
            bucket,
            uploaded: Arc::default(),
            uploading: Arc::default(),
            count: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            dropped_files: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
        })
    }

    /// The file.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }

    /// Dead letters written.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts for metrics.
    pub fn stats(&self) -> DeadLetterStats {
        DeadLetterStats {
            written: self.count(),
            rotations: self.rotations.load(Ordering::Relaxed),
            dropped_files: self.dropped_files.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
        }
    }

    /// Appends rejects, flushes and fsyncs; rotates first when the file would pass
    /// `max_size`, and after, when the write filled it.
    pub fn write(&self, rejects: &[Reject]) -> Result<(), SinkError> {
        if rejects.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in rejects {
            serde_json::to_writer(&mut buf, &DeadLetter::of(&self.pipeline, r))
                .map_err(|e| io_error(&self.describe, &self.path, e.into()))?;
            buf.push(b'\n');
        }
        let mut guard = self.file.lock();
        if guard.is_none() {
            *guard = Some(self.open_current()?);
        }
        if guard
            .as_ref()
            .is_some_and(|c| c.bytes > 0 && c.bytes + buf.len() as u64 > self.max_size)
        {
            *guard = None;
            self.rotate()?;
            *guard = Some(self.open_current()?);
        }
        let Some(c) = guard.as_mut() else {
            return Ok(());
        };
        // On the disk before the messages they came from are acknowledged.
        c.writer
            .write_all(&buf)
            .and_then(|()| c.writer.flush())
            .and_then(|()| {
                if crate::file::fsync_on() {
                    c.writer.get_ref().sync_data()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| io_error(&self.describe, &self.path, e))?;
        c.bytes += buf.len() as u64;
        self.count
            .fetch_add(rejects.len() as u64, Ordering::Relaxed);
        if c.bytes >= self.max_size {
            // Full now (one batch can be larger than the bound): rotated at once, so its
            // letters reach the bucket without waiting for the next reject.
            *guard = None;
            if let Err(e) = self.rotate() {
                tracing::warn!(pipeline = %self.pipeline, error_kind = "dead_letters_not_rotated", error = %e, "a full dead-letter file was not rotated; tried again at the next write");
            }
        }
        Ok(())
    }

    /// Opens (or creates, durably) the current file for appending.
    fn open_current(&self) -> Result<Current, SinkError> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| io_error(&self.describe, &self.path, e))?;
        let bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
        sync_dir(&self.dir).map_err(|e| io_error(&self.describe, &self.dir, e))?;
        Ok(Current {
            writer: BufWriter::new(f),
            bytes,
        })
    }

    /// Renames the current file to the next number and removes the oldest rotated
    /// files past `max_files`.
    fn rotate(&self) -> Result<(), SinkError> {
        let mut rotated = self.rotated_files();
        let next = rotated.last().map_or(1, |(n, _)| n + 1);
        let to = self.dir.join(format!("{}.{next}.ndjson", self.stem));
        std::fs::rename(&self.path, &to).map_err(|e| io_error(&self.describe, &to, e))?;
        sync_dir(&self.dir).map_err(|e| io_error(&self.describe, &self.dir, e))?;
        self.rotations.fetch_add(1, Ordering::Relaxed);
        rotated.push((next, to));
        tracing::info!(pipeline = %self.pipeline, file = %self.path.display(), max_size = self.max_size, "dead letters rotated");
        self.upload_rotated(&rotated);
        let excess = rotated.len().saturating_sub(self.max_files);
        for (_, oldest) in rotated.drain(..excess) {
            if self.uploaded.lock().remove(&oldest) {
                // In the bucket already: the local copy goes, nothing is lost.
                let _ = std::fs::remove_file(&oldest);
                continue;
            }
            if self.uploading.lock().contains(&oldest) {
                // On its way to the bucket: removed at a later rotation, once there.
                continue;
            }
            let bytes = std::fs::metadata(&oldest).map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(&oldest).is_ok() {
                self.dropped_files.fetch_add(1, Ordering::Relaxed);
                self.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
                tracing::error!(pipeline = %self.pipeline, error_kind = "dead_letters_dropped", file = %oldest.display(), bytes, max_files = self.max_files, max_size = self.max_size, "dead letters dropped: the oldest rotated file was removed to bound their disk use; raise dead_letter.max_files or max_size, or replay and clear them sooner");
            }
        }
        Ok(())
    }

    /// With an object target, uploads in the background every rotated file not in the
    /// bucket yet (a file that failed is tried again at the next rotation). A rotated
    /// file never changes, so uploading one twice (after a restart) writes the same.
    fn upload_rotated(&self, rotated: &[(u64, PathBuf)]) {
        let Some(bucket) = &self.bucket else {
            return;
        };
        for (_, path) in rotated {
            if self.uploaded.lock().contains(path) || !self.uploading.lock().insert(path.clone()) {
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let key = bucket
                .target()
                .key(std::path::Path::new(&name.unwrap_or_default()));
            let (uploaded, uploading, file, pipeline) = (
                self.uploaded.clone(),
                self.uploading.clone(),
                path.clone(),
                self.pipeline.clone(),
            );
            bucket.spawn_upload(path.clone(), key.clone(), move |outcome| match outcome {
                Ok(bytes) => {
                    tracing::info!(pipeline, key, bytes, "dead letters uploaded");
                    uploaded.lock().insert(file.clone());
                    uploading.lock().remove(&file);
                }
                Err(e) => {
                    uploading.lock().remove(&file);
                    tracing::warn!(pipeline, key, error_kind = "dead_letters_not_uploaded", error = %e, "dead letters not uploaded yet: kept on the local disk and tried again at the next rotation");
                }
            });
        }
    }

    /// Rotated files of this log, by number.
    fn rotated_files(&self) -> Vec<(u64, PathBuf)> {
        let prefix = format!("{}.", self.stem);
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().into_string().ok()?;
                        let n = name
                            .strip_prefix(&prefix)?
                            .strip_suffix(".ndjson")?
                            .parse::<u64>()
                            .ok()?;
                        Some((n, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use etlmesh_codec::Stage;

    #[test]
    fn a_worker_s_dead_letters_rotate_and_never_pass_their_bound() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = DeadLetterSpec {
            max_size: 4096,
            max_files: 2,
            ..DeadLetterSpec::new(dir.path().join("dl"))
        };
        let log = DeadLetterLog::open(&spec, "p", "w1").expect("log");
        let src: Arc<str> = Arc::from("mqtt:t");
        let one = vec![Reject::new(
            &src,
            Stage::Decode,
            "bad",
            Bytes::from(vec![b'x'; 500]),
        )];
        for _ in 0..100 {
            log.write(&one).expect("write");
        }
        let st = log.stats();
        assert_eq!(st.written, 100);
        assert!(st.rotations >= 10, "{st:?}");
        assert_eq!(st.dropped_files, st.rotations - 2);
        let total: u64 = std::fs::read_dir(dir.path().join("dl"))
            .expect("dir")
            .flatten()
            .map(|e| e.metadata().expect("meta").len())
            .sum();
        assert!(total <= 3 * 4096, "{total} bytes on disk");
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("dl"))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains(&"dead-p-w1.ndjson".to_string()));
        // A new log (a restarted worker) goes on numbering and bounding.
        let again = DeadLetterLog::open(&spec, "p", "w1").expect("log");
        for _ in 0..20 {
            again.write(&one).expect("write");
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("dl"))
                .expect("dir")
                .count(),
            3
        );
    }

    #[test]
    fn one_write_past_the_bound_is_rotated_at_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = DeadLetterSpec {
            max_size: 4096,
            ..DeadLetterSpec::new(dir.path().join("dl"))
        };
        let log = DeadLetterLog::open(&spec, "p", "w1").expect("log");
        let src: Arc<str> = Arc::from("mqtt:t");
        let many: Vec<Reject> = (0..40)
            .map(|i| {
                Reject::new(
                    &src,
                    Stage::Decode,
                    "bad",
                    Bytes::from(format!("not json {i} {}", "x".repeat(100))),
                )
            })
            .collect();
        log.write(&many).expect("write");
        assert_eq!(log.stats().rotations, 1, "{:?}", log.stats());
        let rotated = dir.path().join("dl").join("dead-p-w1.1.ndjson");
        let text = std::fs::read_to_string(&rotated).expect("the rotated file");
        assert_eq!(text.lines().count(), 40);
        assert!(!dir.path().join("dl").join("dead-p-w1.ndjson").exists());
        // The next letter opens a new current file.
        log.write(&many[..1]).expect("write");
        assert!(dir.path().join("dl").join("dead-p-w1.ndjson").exists());
        assert_eq!(log.stats().written, 41);
    }

    #[test]
    fn writes_origin_reason_and_bytes() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = DeadLetterSpec::new(dir.path().join("dl"));
        let sink = DeadLetterSink::create(&spec, "clean", "r1").expect("sink");
        let src: Arc<str> = Arc::from("in.csv");
        let rejects = vec![
            Reject::new(
                &src,
                Stage::Cast,
                "cannot read \"abc\" as float64",
                Bytes::from_static(b"d1,abc"),
            )
            .at_line(7)
            .in_field("temperature_c"),
            Reject::new(
                &src,
                Stage::Decode,
                "invalid UTF-8",
                Bytes::from_static(b"d\xff"),
            )
            .at_line(9),
        ];
        sink.write(&rejects).expect("write");
        assert!(!sink.path().exists());
        sink.commit().expect("commit");
        let text = std::fs::read_to_string(sink.path()).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines[0]["pipeline"], "clean");
        assert_eq!(lines[0]["line"], 7);
        assert_eq!(lines[0]["field"], "temperature_c");
        assert_eq!(lines[0]["raw"], "d1,abc");
        assert_eq!(lines[1]["raw_base64"], "ZP8=");
        assert_eq!(sink.count(), 2);
    }
}
