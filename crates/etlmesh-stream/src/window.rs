//! Event-time windows, tumbling and hopping.
//!
//! Each row goes to every window its event time falls in (one for tumbling windows,
//! `size / slide` for hopping ones). The watermark trails the newest event time seen by
//! the allowed lateness and never goes back; a window `[start, end)` closes once the
//! watermark reaches `end`, or when no record came for the idle timeout. A row whose
//! windows are all closed is late: it goes to the dead letters, counted.
//!
//! A window keeps its rows until it closes, and with them the arrival number of the
//! oldest message it holds: messages are acknowledged only up to there, so a worker
//! that dies with open windows loses nothing — the broker sends their messages again.
//!
//! A source partitioned by key (Kafka) keeps the windows of each partition apart
//! ([`Shards`]): each its own watermark, dropped when the partition moves to another
//! worker, which rebuilds them from the records not yet committed.

mod refused;
mod shards;

pub use refused::{fmt_ms, refused};
pub use shards::Shards;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, RecordBatch, TimestampMillisecondArray, UInt32Array};
use arrow::compute::{cast, concat_batches, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use etlmesh_config::WindowSpec;

/// The columns a window adds to `input`.
pub const WINDOW_START: &str = "window_start";
/// See [`WINDOW_START`].
pub const WINDOW_END: &str = "window_end";

/// The schema of `input` as the SQL sees it: with the window's bounds when windowed.
pub fn sql_schema(input: &SchemaRef, windowed: bool) -> SchemaRef {
    if windowed {
        windowed_schema(input)
    } else {
        input.clone()
    }
}

/// The input schema with `window_start` and `window_end`.
pub fn windowed_schema(input: &SchemaRef) -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some(Arc::from("UTC")));
    let mut fields: Vec<Field> = input.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(WINDOW_START, ts.clone(), false));
    fields.push(Field::new(WINDOW_END, ts, false));
    Arc::new(Schema::new(fields))
}

struct Open {
    batches: Vec<RecordBatch>,
    min_seq: u64,
    rows: usize,
}

/// A window that closed, with its rows (input schema plus the window's bounds).
pub struct Closed {
    /// Start, epoch milliseconds.
    pub start: i64,
    /// The oldest message it held.
    pub min_seq: u64,
    /// The shard it is of ([`Shards`]); `None` for a stream that is one.
    pub shard: Option<Arc<str>>,
    /// End (exclusive).
    pub end: i64,
    /// Its rows.
    pub batch: RecordBatch,
    /// The idle timeout closed it (the watermark had not reached its end).
    pub on_idle: bool,
}

/// What adding rows gave.
#[derive(Debug, Default)]
pub struct Added {
    /// Rows (indices into the batch) whose windows had all closed.
    pub late: Vec<usize>,
    /// The watermark each late row was behind (beside `late`).
    pub late_watermark: Vec<i64>,
    /// Rows without an event time.
    pub untimed: Vec<usize>,
    /// Rows whose event time is more than `max_future` ahead of the clock: they are in
    /// no window and do not move the watermark.
    pub future: Vec<usize>,
    /// Rows of messages the broker sent again whose windows had all been loaded before
    /// the stream resumed: counted already, skipped.
    pub replayed: Vec<usize>,
    /// Rows of a shard given up since they were read: its next owner reads them again.
    pub revoked: Vec<usize>,
}

/// The open windows of one pipeline.
pub struct Windows {
    spec: WindowSpec,
    time: usize,
    schema: SchemaRef,
    open: BTreeMap<i64, Open>,
    /// Epoch milliseconds; `i64::MIN` before the first record.
    watermark: i64,
    newest: i64,
    last_arrival: Instant,
    /// The watermark the stream resumed from: every window ending at or before it was
    /// loaded by an earlier run of the slot.
    resumed: Option<i64>,
}

impl Windows {
    /// Windows over rows of `input` (which holds the time column).
    pub fn new(spec: WindowSpec, input: &SchemaRef) -> Result<Self, String> {
        let time = input
            .index_of(&spec.time)
            .map_err(|_| format!("window: no column `{}` in the input", spec.time))?;
        Ok(Self {
            spec,
            time,
            schema: windowed_schema(input),
            open: BTreeMap::new(),
            watermark: i64::MIN,
            newest: i64::MIN,
            last_arrival: Instant::now(),
            resumed: None,
        })
    }

    fn size(&self) -> i64 {
        self.spec.size.as_millis() as i64
    }

    fn slide(&self) -> i64 {
        self.spec.slide.as_millis() as i64
    }

    /// Resumes from the watermark of an earlier run of the slot (see [`Added::replayed`]).
    pub fn resume(&mut self, watermark: i64) {
        self.watermark = self.watermark.max(watermark);
        self.resumed = Some(watermark);
    }

    /// How far ahead of the clock an event time may be.
    pub fn max_future(&self) -> Duration {
        self.spec.max_future
    }

    /// The watermark (epoch milliseconds), once a record came.
    pub fn watermark(&self) -> Option<i64> {
        (self.watermark != i64::MIN).then_some(self.watermark)
    }

    /// Windows open.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// The oldest message an open window holds.
    pub fn min_open_seq(&self) -> Option<u64> {
        self.open.values().map(|o| o.min_seq).min()
    }

    /// Rows held in open windows.
    pub fn held_rows(&self) -> usize {
        self.open.values().map(|o| o.rows).sum()
    }

    /// Adds rows; `seqs[i]` is the arrival number of row `i`'s message,
    /// `redelivered[i]` whether the broker sent that message again, `now_ms` the wall
    /// clock (epoch milliseconds).
    pub fn add(
        &mut self,
        batch: &RecordBatch,
        seqs: &[u64],
        redelivered: &[bool],
        now_ms: i64,
    ) -> Result<Added, String> {
        let mut added = Added::default();
        if batch.num_rows() == 0 {
            return Ok(added);
        }
        self.last_arrival = Instant::now();
        let ms = event_millis(batch.column(self.time))?;
        let (size, slide) = (self.size(), self.slide());
        let horizon = now_ms.saturating_add(self.spec.max_future.as_millis() as i64);
        let mut per_window: BTreeMap<i64, (Vec<u32>, u64)> = BTreeMap::new();
        let mut newest = self.newest;
        for (i, t) in ms.iter().enumerate() {
            let Some(t) = *t else {
                added.untimed.push(i);
                continue;
            };
            if t > horizon {
                added.future.push(i);
                continue;
            }
            let last = t.div_euclid(slide).saturating_mul(slide);
            let mut any = false;
            let mut start = last;
            // Saturating: an event time near the ends of i64 must not overflow.
            while start > t.saturating_sub(size) {
                if start.saturating_add(size) > self.watermark {
                    let e = per_window.entry(start).or_insert((Vec::new(), u64::MAX));
                    e.0.push(i as u32);
                    e.1 = e.1.min(seqs.get(i).copied().unwrap_or(0));
                    any = true;
                }
                start = start.saturating_sub(slide);
                if start == i64::MIN {
                    break;
                }
            }
            if any {
                newest = newest.max(t);
            } else if redelivered.get(i).copied().unwrap_or(false)
                && self.resumed.is_some_and(|r| last.saturating_add(size) <= r)
            {
                added.replayed.push(i);
            } else {
                added.late.push(i);
                added.late_watermark.push(self.watermark);
            }
        }
        for (start, (rows, min_seq)) in per_window {
            let idx = UInt32Array::from(rows);
            let part = take_record_batch(batch, &idx).map_err(|e| e.to_string())?;
            let w = self.open.entry(start).or_insert(Open {
                batches: Vec::new(),
                min_seq,
                rows: 0,
            });
            w.min_seq = w.min_seq.min(min_seq);
            w.rows += part.num_rows();
            w.batches.push(part);
        }
        self.newest = newest;
        if newest != i64::MIN {
            let lateness = self.spec.allowed_lateness.as_millis() as i64;
            self.watermark = self.watermark.max(newest.saturating_sub(lateness));
        }
        Ok(added)
    }

    /// Windows the watermark closed, and every open window after the idle timeout (or
    /// when `all`: on shutdown, or to release held messages). A stream `behind` (its
    /// source has records it has not handed out yet) is slow, not idle: the idle
    /// timeout does not close its windows.
    pub fn due(&mut self, now: Instant, all: bool, behind: bool) -> Result<Vec<Closed>, String> {
        let idle = !behind && now.duration_since(self.last_arrival) >= self.spec.idle_timeout;
        let size = self.size();
        let watermark = self.watermark;
        let closing: Vec<i64> = self
            .open
            .keys()
            .copied()
            .filter(|s| all || idle || s.saturating_add(size) <= watermark)
            .collect();
        let mut out = Vec::with_capacity(closing.len());
        for start in closing {
            let Some(w) = self.open.remove(&start) else {
                continue;
            };
            let end = start.saturating_add(size);
            // Records for a closed window are late from now on.
            self.watermark = self.watermark.max(end);
            out.push(Closed {
                start,
                min_seq: w.min_seq,
                shard: None,
                end,
                batch: self.with_bounds(w, start, end)?,
                on_idle: !all && end > watermark,
            });
        }
        Ok(out)
    }

    fn with_bounds(&self, w: Open, start: i64, end: i64) -> Result<RecordBatch, String> {
        let input = Arc::new(Schema::new(
            self.schema.fields()[..self.schema.fields().len() - 2].to_vec(),
        ));
        let rows = concat_batches(&input, &w.batches).map_err(|e| e.to_string())?;
        let n = rows.num_rows();
        let mut cols: Vec<ArrayRef> = rows.columns().to_vec();
        for v in [start, end] {
            cols.push(Arc::new(
                TimestampMillisecondArray::from(vec![v; n]).with_timezone("UTC"),
            ));
        }
        RecordBatch::try_new(self.schema.clone(), cols).map_err(|e| e.to_string())
    }
}

/// Event times in epoch milliseconds.
fn event_millis(col: &ArrayRef) -> Result<Vec<Option<i64>>, String> {
    let ms = cast(
        col,
        &DataType::Timestamp(TimeUnit::Millisecond, Some(Arc::from("UTC"))),
    )
    .map_err(|e| format!("window: the time column is not a timestamp: {e}"))?;
    let ms = ms
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .ok_or("window: the time column is not a timestamp")?;
    Ok((0..ms.len())
        .map(|i| (!ms.is_null(i)).then(|| ms.value(i)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;

    pub(super) fn spec(size: u64, slide: u64, lateness: u64) -> WindowSpec {
        WindowSpec {
            time: "ts".into(),
            size: Duration::from_millis(size),
            slide: Duration::from_millis(slide),
            allowed_lateness: Duration::from_millis(lateness),
            idle_timeout: Duration::from_secs(3600),
            max_future: Duration::from_secs(300),
        }
    }

    /// The wall clock of the tests: far after every event time they use.
    pub(super) const NOW: i64 = 1_000_000_000;

    pub(super) fn input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some(Arc::from("UTC"))),
                true,
            ),
        ]))
    }

    pub(super) fn rows(ts: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            input(),
            vec![
                Arc::new(StringArray::from(vec!["a"; ts.len()])),
                Arc::new(TimestampMillisecondArray::from(ts.to_vec()).with_timezone("UTC")),
            ],
        )
        .expect("batch")
    }

    #[test]
    fn tumbling_windows_close_on_the_watermark_and_late_rows_are_found() {
        let mut w = Windows::new(spec(1000, 1000, 500), &input()).expect("windows");
        let a = w
            .add(&rows(&[100, 900, 1200]), &[1, 2, 3], &[], NOW)
            .expect("add");
        assert!(a.late.is_empty());
        // watermark = 1200 - 500 = 700: nothing closes yet.
        assert!(w.due(Instant::now(), false, false).expect("due").is_empty());
        assert_eq!(w.min_open_seq(), Some(1));
        w.add(&rows(&[1600]), &[4], &[], NOW).expect("add");
        // watermark 1100: [0, 1000) closes with two rows.
        let closed = w.due(Instant::now(), false, false).expect("due");
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].start, closed[0].end, closed[0].batch.num_rows()),
            (0, 1000, 2)
        );
        assert_eq!(closed[0].batch.num_columns(), 4);
        assert_eq!(w.min_open_seq(), Some(3));
        // A row for the closed window is late; one for the open window is not.
        let a = w.add(&rows(&[999, 1001]), &[5, 6], &[], NOW).expect("add");
        assert_eq!(a.late, vec![0]);
        let rest = w.due(Instant::now(), true, false).expect("all");
        assert_eq!(rest.iter().map(|c| c.batch.num_rows()).sum::<usize>(), 3);
        assert_eq!(w.min_open_seq(), None);
    }

    #[test]
    fn hopping_windows_take_each_row_several_times() {
        let mut w = Windows::new(spec(1000, 250, 0), &input()).expect("windows");
        w.add(&rows(&[1100]), &[1], &[], NOW).expect("add");
        let mut starts: Vec<i64> = w.open.keys().copied().collect();
        starts.sort_unstable();
        assert_eq!(starts, vec![250, 500, 750, 1000]);
        // watermark 1100 closes nothing; 2300 closes all four.
        w.add(&rows(&[2300]), &[2], &[], NOW).expect("add");
        let closed = w.due(Instant::now(), false, false).expect("due");
        assert_eq!(
            closed.iter().map(|c| c.start).collect::<Vec<_>>(),
            vec![250, 500, 750, 1000]
        );
    }

    #[test]
    fn extreme_event_times_do_not_overflow() {
        let mut w = Windows::new(spec(1000, 250, 0), &input()).expect("windows");
        w.add(&rows(&[i64::MIN, i64::MAX, 0]), &[1, 2, 3], &[], i64::MAX)
            .expect("add");
        assert!(w.open_count() > 0);
        let _ = w.due(Instant::now(), true, false).expect("due");
    }

    #[test]
    fn a_record_from_the_future_is_set_apart_and_does_not_move_the_watermark() {
        let mut w = Windows::new(spec(1000, 1000, 500), &input()).expect("windows");
        w.add(&rows(&[NOW - 5000]), &[1], &[], NOW).expect("add");
        let before = w.watermark();
        // A clock a year ahead: past max_future (300 s).
        let a = w
            .add(
                &rows(&[NOW + 365 * 86_400_000, NOW - 4000]),
                &[2, 3],
                &[],
                NOW,
            )
            .expect("add");
        assert_eq!(a.future, vec![0]);
        assert!(a.late.is_empty());
        assert_eq!(w.watermark(), before.map(|b| b.max(NOW - 4000 - 500)));
        // Later records are still on time; one just inside the horizon is taken.
        let a = w
            .add(&rows(&[NOW - 3000, NOW + 299_000]), &[4, 5], &[], NOW)
            .expect("add");
        assert!(a.late.is_empty() && a.future.is_empty(), "{a:?}");
    }

    #[test]
    fn after_a_restart_redelivered_rows_of_loaded_windows_are_replays_not_late() {
        let mut w = Windows::new(spec(1000, 1000, 0), &input()).expect("windows");
        // The earlier run loaded every window up to 2000.
        w.resume(2000);
        let a = w
            .add(
                &rows(&[1500, 1600, 2500, 1700]),
                &[1, 2, 3, 4],
                &[true, true, true, false],
                NOW,
            )
            .expect("add");
        // Sent again, in a loaded window: replays. The same time in a message that is
        // new: late. The open window [2000, 3000) is rebuilt.
        assert_eq!((a.replayed, a.late), (vec![0, 1], vec![3]));
        assert_eq!(w.held_rows(), 1);
    }

    #[test]
    fn the_idle_timeout_closes_open_windows() {
        let mut s = spec(60_000, 60_000, 1000);
        s.idle_timeout = Duration::from_millis(10);
        let mut w = Windows::new(s, &input()).expect("windows");
        w.add(&rows(&[5]), &[1], &[], NOW).expect("add");
        assert!(w.due(Instant::now(), false, false).expect("due").is_empty());
        let later = Instant::now() + Duration::from_millis(20);
        // A stream whose source has records not handed out yet is slow, not idle.
        assert!(w.due(later, false, true).expect("due").is_empty());
        assert_eq!(w.due(later, false, false).expect("due").len(), 1);
        // The window closed: its records are late now.
        assert_eq!(
            w.add(&rows(&[6]), &[2], &[], NOW).expect("add").late,
            vec![0]
        );
    }
}
