//! Dead letters: every record that was not loaded, as one NDJSON line with the
//! pipeline, where it came from (input, line or record number), the stage that
//! refused it, the reason and its original bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use etlmesh_codec::Reject;
use etlmesh_config::DeadLetterSpec;
use serde::Serialize;

use crate::file::{Pending, commit_files, tmp_name};
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
    /// decode, cast, transform or limit.
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
    target: PathBuf,
    file: Mutex<Option<BufWriter<File>>>,
    count: AtomicU64,
}

impl DeadLetterSink {
    /// Creates the directory; the file itself appears with the first dead letter.
    pub fn create(spec: &DeadLetterSpec, pipeline: &str, run_id: &str) -> Result<Self, SinkError> {
        let describe = format!("dead_letter:{}", spec.path.display());
        std::fs::create_dir_all(&spec.path).map_err(|e| io_error(&describe, &spec.path, e))?;
        let probe = spec.path.join(format!(".etlmesh-probe-{run_id}"));
        File::create(&probe).map_err(|e| io_error(&describe, &spec.path, e))?;
        let _ = std::fs::remove_file(&probe);
        Ok(Self {
            pipeline: pipeline.to_string(),
            describe,
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
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
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
        let Some(mut w) = self.file.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(Committed::default());
        };
        let tmp = tmp_name(&self.target);
        w.flush().map_err(|e| io_error(&self.describe, &tmp, e))?;
        drop(w);
        commit_files(
            &self.describe,
            vec![Pending {
                tmp,
                target: self.target.clone(),
            }],
        )
    }

    /// Removes what was written.
    pub fn abort(&self) {
        if self
            .file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some()
        {
            let _ = std::fs::remove_file(tmp_name(&self.target));
        }
    }
}

/// Dead letters of a long-running service (a worker): appended to one NDJSON file per
/// pipeline and instance, flushed after every write, so they survive a crash.
pub struct DeadLetterLog {
    pipeline: String,
    describe: String,
    path: PathBuf,
    file: Mutex<Option<BufWriter<File>>>,
    count: AtomicU64,
}

impl DeadLetterLog {
    /// Creates the directory; the file appears with the first dead letter.
    pub fn open(spec: &DeadLetterSpec, pipeline: &str, instance: &str) -> Result<Self, SinkError> {
        let describe = format!("dead_letter:{}", spec.path.display());
        std::fs::create_dir_all(&spec.path).map_err(|e| io_error(&describe, &spec.path, e))?;
        Ok(Self {
            pipeline: pipeline.to_string(),
            describe,
            path: spec.path.join(format!("dead-{pipeline}-{instance}.ndjson")),
            file: Mutex::new(None),
            count: AtomicU64::new(0),
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

    /// Appends rejects and flushes.
    pub fn write(&self, rejects: &[Reject]) -> Result<(), SinkError> {
        if rejects.is_empty() {
            return Ok(());
        }
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| io_error(&self.describe, &self.path, e))?;
            *guard = Some(BufWriter::new(f));
        }
        let Some(w) = guard.as_mut() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        for r in rejects {
            serde_json::to_writer(&mut buf, &DeadLetter::of(&self.pipeline, r))
                .map_err(|e| io_error(&self.describe, &self.path, e.into()))?;
            buf.push(b'\n');
        }
        w.write_all(&buf)
            .and_then(|()| w.flush())
            .map_err(|e| io_error(&self.describe, &self.path, e))?;
        self.count
            .fetch_add(rejects.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use bytes::Bytes;
    use etlmesh_codec::Stage;

    #[test]
    fn writes_origin_reason_and_bytes() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = DeadLetterSpec {
            path: dir.path().join("dl"),
        };
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
