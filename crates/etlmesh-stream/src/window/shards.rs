//! The windows of a stream, kept apart per shard of its source.
//!
//! A key lives in one shard (a Kafka partition: the producer partitions by key), so a
//! window of a key sees every record of that key in the shard alone. Each shard has
//! its own [`Windows`] — its own watermark and idle timeout — so that a partition that
//! lags does not hold back, or make late, the others. A shard given up (a rebalance)
//! is dropped whole: its messages are not acknowledged, so their offsets were never
//! committed, and the partition's next owner reads them again and rebuilds the same
//! windows. A stream with no shards is one shard, `None`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use etlmesh_config::WindowSpec;

use super::{Added, Closed, Windows};
use crate::source::Shard;

/// One shard's windows and the assignment they belong to.
struct Part {
    generation: u64,
    windows: Windows,
}

/// A shard dropped because it was given up.
#[derive(Debug, PartialEq, Eq)]
pub struct Dropped {
    /// Its name.
    pub name: Arc<str>,
    /// Windows it had open.
    pub windows: usize,
    /// Rows they held.
    pub rows: usize,
}

/// The open windows of one pipeline, per shard.
pub struct Shards {
    spec: WindowSpec,
    input: SchemaRef,
    parts: HashMap<Option<Arc<str>>, Part>,
    /// The watermark the unsharded stream resumes from ([`Windows::resume`]).
    resume: Option<i64>,
}

impl Shards {
    /// Windows over rows of `input` (which holds the time column).
    pub fn new(spec: WindowSpec, input: &SchemaRef) -> Result<Self, String> {
        // Checks the spec against the input once, before any record.
        Windows::new(spec.clone(), input)?;
        Ok(Self {
            spec,
            input: input.clone(),
            parts: HashMap::new(),
            resume: None,
        })
    }

    /// Resumes the unsharded stream from the watermark of an earlier run of the slot.
    /// A shard's windows do not resume: a partition comes back from its commit, which
    /// is behind every window not loaded.
    pub fn resume(&mut self, watermark: i64) {
        self.resume = Some(watermark);
        if let Some(p) = self.parts.get_mut(&None) {
            p.windows.resume(watermark);
        }
    }

    fn part(&mut self, shard: Option<&Shard>) -> Result<&mut Windows, String> {
        let key = shard.map(|s| s.name.clone());
        let generation = shard.map_or(0, |s| s.generation);
        let fresh = self
            .parts
            .get(&key)
            .is_none_or(|p| p.generation != generation);
        if fresh {
            let mut windows = Windows::new(self.spec.clone(), &self.input)?;
            if let (None, Some(wm)) = (&key, self.resume) {
                windows.resume(wm);
            }
            self.parts.insert(
                key.clone(),
                Part {
                    generation,
                    windows,
                },
            );
        }
        self.parts
            .get_mut(&key)
            .map(|p| &mut p.windows)
            .ok_or_else(|| "window: a shard vanished".to_string())
    }

    /// Adds rows; `shards[i]` is the shard of row `i` (empty: one shard), the rest as
    /// [`Windows::add`]. Rows of a shard that `owns` says was given up are not added
    /// ([`Added::revoked`]). Indices in the answer are the batch's.
    pub fn add(
        &mut self,
        batch: &RecordBatch,
        seqs: &[u64],
        redelivered: &[bool],
        shards: &[Option<Shard>],
        owns: &dyn Fn(&Shard) -> bool,
        now_ms: i64,
    ) -> Result<Added, String> {
        let first = shards.first().cloned().flatten();
        if shards.iter().all(|s| *s == first) {
            if first.as_ref().is_some_and(|s| !owns(s)) {
                return Ok(Added {
                    revoked: (0..batch.num_rows()).collect(),
                    ..Added::default()
                });
            }
            return self
                .part(first.as_ref())?
                .add(batch, seqs, redelivered, now_ms);
        }
        let mut groups: Vec<(Option<Shard>, Vec<u32>)> = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            match groups.iter_mut().find(|(g, _)| g == s) {
                Some((_, rows)) => rows.push(i as u32),
                None => groups.push((s.clone(), vec![i as u32])),
            }
        }
        let mut all = Added::default();
        for (shard, rows) in groups {
            if shard.as_ref().is_some_and(|s| !owns(s)) {
                all.revoked.extend(rows.iter().map(|r| *r as usize));
                continue;
            }
            let part = take_record_batch(batch, &UInt32Array::from(rows.clone()))
                .map_err(|e| e.to_string())?;
            let pick = |v: &[u64]| -> Vec<u64> {
                rows.iter()
                    .map(|r| v.get(*r as usize).copied().unwrap_or(0))
                    .collect()
            };
            let seqs = pick(seqs);
            let again: Vec<bool> = rows
                .iter()
                .map(|r| redelivered.get(*r as usize).copied().unwrap_or(false))
                .collect();
            let added = self
                .part(shard.as_ref())?
                .add(&part, &seqs, &again, now_ms)?;
            let back = |v: Vec<usize>| v.into_iter().map(|i| rows[i] as usize);
            all.late.extend(back(added.late));
            all.late_watermark.extend(added.late_watermark);
            all.untimed.extend(back(added.untimed));
            all.future.extend(back(added.future));
            all.replayed.extend(back(added.replayed));
        }
        Ok(all)
    }

    /// Drops the shards this worker no longer owns, with their open windows.
    pub fn drop_unowned(&mut self, owns: impl Fn(&Shard) -> bool) -> Vec<Dropped> {
        let gone: Vec<Option<Arc<str>>> = self
            .parts
            .iter()
            .filter_map(|(k, p)| {
                let name = k.clone()?;
                (!owns(&Shard {
                    name,
                    generation: p.generation,
                }))
                .then(|| k.clone())
            })
            .collect();
        gone.into_iter()
            .filter_map(|k| {
                let p = self.parts.remove(&k)?;
                Some(Dropped {
                    name: k?,
                    windows: p.windows.open_count(),
                    rows: p.windows.held_rows(),
                })
            })
            .collect()
    }

    /// Windows that closed, in every shard (see [`Windows::due`]); `behind` says which
    /// shards (`None`: the unsharded stream) the source has records of that it has not
    /// handed out yet: their windows do not close on the idle timeout.
    pub fn due(
        &mut self,
        now: Instant,
        all: bool,
        behind: &dyn Fn(Option<&Shard>) -> bool,
    ) -> Result<Vec<Closed>, String> {
        let mut out = Vec::new();
        for (shard, p) in &mut self.parts {
            let s = shard.as_ref().map(|name| Shard {
                name: name.clone(),
                generation: p.generation,
            });
            let behind = behind(s.as_ref());
            out.extend(p.windows.due(now, all, behind)?.into_iter().map(|mut c| {
                c.shard.clone_from(shard);
                c
            }));
        }
        Ok(out)
    }

    /// How far ahead of the clock an event time may be.
    pub fn max_future(&self) -> std::time::Duration {
        self.spec.max_future
    }

    /// The newest watermark of any shard (the unsharded stream's when there are none).
    pub fn watermark(&self) -> Option<i64> {
        self.parts
            .values()
            .filter_map(|p| p.windows.watermark())
            .max()
    }

    /// Windows open, in every shard.
    pub fn open_count(&self) -> usize {
        self.parts.values().map(|p| p.windows.open_count()).sum()
    }

    /// The oldest message an open window holds, in any shard.
    pub fn min_open_seq(&self) -> Option<u64> {
        self.parts
            .values()
            .filter_map(|p| p.windows.min_open_seq())
            .min()
    }

    /// Per shard with open windows, the oldest message they hold.
    pub fn min_open_seqs(&self) -> HashMap<Option<Arc<str>>, u64> {
        self.parts
            .iter()
            .filter_map(|(k, p)| Some((k.clone(), p.windows.min_open_seq()?)))
            .collect()
    }

    /// Shards with windows.
    pub fn shards(&self) -> usize {
        self.parts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::tests::{NOW, input, rows};

    fn spec() -> WindowSpec {
        crate::window::tests::spec(1000, 1000, 0)
    }

    fn shard(name: &str, generation: u64) -> Option<Shard> {
        Some(Shard {
            name: Arc::from(name),
            generation,
        })
    }

    #[test]
    fn each_shard_has_its_own_watermark() {
        let mut w = Shards::new(spec(), &input()).expect("shards");
        // Partition 0 is far ahead; partition 1's record is not late for it.
        let a = w
            .add(
                &rows(&[5_500, 1_200, 1_300]),
                &[1, 2, 3],
                &[],
                &[shard("t/0", 1), shard("t/1", 1), shard("t/1", 1)],
                &|_| true,
                NOW,
            )
            .expect("add");
        assert!(a.late.is_empty(), "{a:?}");
        assert_eq!(w.shards(), 2);
        assert_eq!(w.open_count(), 2);
        assert_eq!(w.min_open_seq(), Some(1));
        // In partition 0 a record of [1000, 2000) is late now; in partition 1 it is not.
        let a = w
            .add(
                &rows(&[1_500, 1_500]),
                &[4, 5],
                &[],
                &[shard("t/0", 1), shard("t/1", 1)],
                &|_| true,
                NOW,
            )
            .expect("add");
        assert_eq!(a.late, vec![0]);
        assert_eq!(a.late_watermark, vec![5_500]);
    }

    #[test]
    fn a_shard_given_up_is_dropped_with_its_windows_and_a_new_assignment_starts_clean() {
        let mut w = Shards::new(spec(), &input()).expect("shards");
        w.add(
            &rows(&[100, 200, 300]),
            &[1, 2, 3],
            &[],
            &[shard("t/0", 1), shard("t/1", 2), shard("t/1", 2)],
            &|_| true,
            NOW,
        )
        .expect("add");
        let dropped = w.drop_unowned(|s| s.name.as_ref() == "t/0");
        assert_eq!(
            dropped,
            vec![Dropped {
                name: Arc::from("t/1"),
                windows: 1,
                rows: 2
            }]
        );
        assert_eq!(w.min_open_seq(), Some(1));
        // Partition 0 assigned again (generation 3): what generation 1 held is gone.
        w.add(&rows(&[400]), &[9], &[], &[shard("t/0", 3)], &|_| true, NOW)
            .expect("add");
        assert_eq!(w.min_open_seq(), Some(9));
        // A record of a partition given up since it was read is not windowed.
        let a = w
            .add(
                &rows(&[450, 460]),
                &[10, 11],
                &[],
                &[shard("t/0", 3), shard("t/1", 2)],
                &|s| s.name.as_ref() == "t/0",
                NOW,
            )
            .expect("add");
        assert_eq!(a.revoked, vec![1]);
        let closed = w.due(Instant::now(), true, &|_| false).expect("due");
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].batch.num_rows(), 2);
    }

    #[test]
    fn a_shard_whose_source_is_behind_is_not_idle() {
        let mut s = spec();
        s.idle_timeout = std::time::Duration::from_millis(10);
        let mut w = Shards::new(s, &input()).expect("shards");
        w.add(
            &rows(&[100, 200]),
            &[1, 2],
            &[],
            &[shard("t/0", 1), shard("t/1", 1)],
            &|_| true,
            NOW,
        )
        .expect("add");
        let later = Instant::now() + std::time::Duration::from_millis(20);
        // Partition 1 has records its owner has not read yet: its window stays open.
        let behind = |s: Option<&Shard>| s.is_some_and(|s| s.name.as_ref() == "t/1");
        let closed = w.due(later, false, &behind).expect("due");
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].shard.as_deref(), Some("t/0"));
        assert_eq!(w.open_count(), 1);
        // Caught up, it is idle like the other.
        assert_eq!(w.due(later, false, &|_| false).expect("due").len(), 1);
    }

    #[test]
    fn an_unsharded_stream_resumes_from_its_watermark() {
        let mut w = Shards::new(spec(), &input()).expect("shards");
        w.resume(2_000);
        let a = w
            .add(
                &rows(&[1_500, 2_500]),
                &[1, 2],
                &[true, true],
                &[],
                &|_| true,
                NOW,
            )
            .expect("add");
        assert_eq!(a.replayed, vec![0]);
        // Nothing is ever dropped: the unsharded stream is owned for good.
        assert!(w.drop_unowned(|_| false).is_empty());
        assert_eq!(w.open_count(), 1);
    }
}
