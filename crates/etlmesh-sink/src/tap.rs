//! Taps: live samples of a pipeline's records for whoever listens (`etlmesh tap`).
//!
//! A [`TapHub`] holds the open taps of a process. Pipelines offer their input rows,
//! output rows and dead letters to it; with no tap open, an offer is one atomic load
//! and nothing else. An open tap takes rows as JSON until its limit, through a bounded
//! channel: when the listener is slower than the pipeline, rows are skipped, never
//! queued without bound and never slowing the pipeline down.

use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arrow::array::RecordBatch;
use etlmesh_codec::Reject;
use tokio::sync::mpsc;

use crate::dead_letter::DeadLetter;

/// Rows waiting for a slow listener at most; past this they are skipped.
const CHANNEL: usize = 256;

/// Where in a pipeline a tap listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapStage {
    /// Decoded records, before the SQL.
    Input,
    /// Rows the SQL produced, as the sinks get them.
    Output,
    /// Rejected records with their reason.
    DeadLetter,
}

impl TapStage {
    /// `input`, `output`, `dead_letter`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
            Self::DeadLetter => "dead_letter",
        }
    }

    /// Reads a stage name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "input" => Some(Self::Input),
            "output" => Some(Self::Output),
            "dead_letter" | "dead-letter" | "dead_letters" => Some(Self::DeadLetter),
            _ => None,
        }
    }
}

struct Tap {
    id: u64,
    pipeline: String,
    stage: TapStage,
    remaining: AtomicUsize,
    tx: mpsc::Sender<String>,
}

/// The open taps of a process.
#[derive(Default)]
pub struct TapHub {
    open: AtomicUsize,
    next_id: AtomicU64,
    taps: Mutex<Vec<Arc<Tap>>>,
}

impl std::fmt::Debug for TapHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapHub")
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish()
    }
}

/// An open tap: rows arrive on [`TapReceiver::recv`] as JSON text; it closes when
/// dropped or when its limit is reached.
pub struct TapReceiver {
    rx: mpsc::Receiver<String>,
    hub: Arc<TapHub>,
    id: u64,
}

impl std::fmt::Debug for TapReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapReceiver").field("id", &self.id).finish()
    }
}

impl TapReceiver {
    /// The next row; `None` once the limit was reached and every row was read.
    pub async fn recv(&mut self) -> Option<String> {
        self.rx.recv().await
    }
}

impl Drop for TapReceiver {
    fn drop(&mut self) {
        self.hub.close(self.id);
    }
}

impl TapHub {
    /// Whether any tap is open (the only cost of an offer when none is).
    pub fn is_tapped(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }

    /// Opens a tap on `pipeline` at `stage` for `limit` rows.
    pub fn open(self: &Arc<Self>, pipeline: &str, stage: TapStage, limit: usize) -> TapReceiver {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.taps.lock().push(Arc::new(Tap {
            id,
            pipeline: pipeline.to_string(),
            stage,
            remaining: AtomicUsize::new(limit.max(1)),
            tx,
        }));
        self.open.fetch_add(1, Ordering::Relaxed);
        tracing::info!(pipeline, stage = stage.as_str(), limit, "tap opened");
        TapReceiver {
            rx,
            hub: self.clone(),
            id,
        }
    }

    fn close(&self, id: u64) {
        let mut taps = self.taps.lock();
        let before = taps.len();
        taps.retain(|t| t.id != id);
        if taps.len() < before {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The taps listening to `pipeline` at `stage`.
    fn listeners(&self, pipeline: &str, stage: TapStage) -> Vec<Arc<Tap>> {
        self.taps
            .lock()
            .iter()
            .filter(|t| t.stage == stage && t.pipeline == pipeline)
            .cloned()
            .collect()
    }

    /// Sends up to `n` rows (made by `row(i)`) to each listener; a listener whose limit
    /// is reached is closed.
    fn send(&self, taps: Vec<Arc<Tap>>, n: usize, row: impl Fn(usize) -> Option<String>) {
        for t in taps {
            let mut i = 0;
            while i < n {
                let left = t.remaining.load(Ordering::Relaxed);
                if left == 0 || t.tx.is_closed() {
                    break;
                }
                let Some(line) = row(i) else { break };
                match t.tx.try_send(line) {
                    Ok(()) => {
                        if t.remaining.fetch_sub(1, Ordering::Relaxed) == 1 {
                            break;
                        }
                    }
                    // A slow listener skips rows.
                    Err(mpsc::error::TrySendError::Full(_)) => break,
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
                i += 1;
            }
            if t.remaining.load(Ordering::Relaxed) == 0 {
                // Dropping the hub's sender ends the listener's stream.
                self.close(t.id);
            }
        }
    }

    /// Offers rows of `pipeline` at `stage` (input or output).
    pub fn offer_batch(&self, pipeline: &str, stage: TapStage, batch: &RecordBatch) {
        if !self.is_tapped() || batch.num_rows() == 0 {
            return;
        }
        let taps = self.listeners(pipeline, stage);
        let Some(want) = taps
            .iter()
            .map(|t| t.remaining.load(Ordering::Relaxed))
            .max()
        else {
            return;
        };
        let n = want.min(batch.num_rows());
        let rows = rows_as_json(&batch.slice(0, n));
        self.send(taps, rows.len(), |i| rows.get(i).cloned());
    }

    /// Offers dead letters of `pipeline`.
    pub fn offer_rejects(&self, pipeline: &str, rejects: &[Reject]) {
        if !self.is_tapped() || rejects.is_empty() {
            return;
        }
        let taps = self.listeners(pipeline, TapStage::DeadLetter);
        if taps.is_empty() {
            return;
        }
        self.send(taps, rejects.len(), |i| {
            serde_json::to_string(&DeadLetter::of(pipeline, &rejects[i])).ok()
        });
    }
}

/// Each row as a JSON object.
fn rows_as_json(batch: &RecordBatch) -> Vec<String> {
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
        if w.write(batch).and_then(|_| w.finish()).is_err() {
            return Vec::new();
        }
    }
    String::from_utf8_lossy(&buf)
        .lines()
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..n)),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("n{i}")),
                )),
            ],
        )
        .expect("batch")
    }

    #[tokio::test]
    async fn a_tap_takes_its_limit_then_ends() {
        let hub = Arc::new(TapHub::default());
        assert!(!hub.is_tapped());
        hub.offer_batch("p", TapStage::Output, &batch(5));
        let mut rx = hub.open("p", TapStage::Output, 3);
        let mut other = hub.open("q", TapStage::Output, 3);
        assert!(hub.is_tapped());
        hub.offer_batch("p", TapStage::Input, &batch(5));
        hub.offer_batch("p", TapStage::Output, &batch(2));
        hub.offer_batch("p", TapStage::Output, &batch(5));
        let mut got = Vec::new();
        while let Some(r) = rx.recv().await {
            got.push(r);
        }
        assert_eq!(
            got,
            [
                r#"{"id":0,"name":"n0"}"#,
                r#"{"id":1,"name":"n1"}"#,
                r#"{"id":0,"name":"n0"}"#
            ]
        );
        // The finished tap is gone; the other one is still open until dropped.
        assert!(hub.is_tapped());
        assert!(other.rx.try_recv().is_err());
        drop(other);
        assert!(!hub.is_tapped());
    }
}
