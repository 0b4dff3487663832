//! Where a partition resumes: the first record of an assignment must be the one at the
//! group's commit.
//!
//! Kafka answers a fetch from an offset inside a record batch with that whole batch,
//! and the client drops the records before the offset. A broker that answers with the
//! batches *after* the offset instead (tansu 0.6 does) would make a new owner resuming
//! from a commit inside a batch skip the rest of that batch — records lost, although
//! never committed. So the first record of each assignment is checked against the
//! group's committed offset: when it lies past the commit, the source seeks back
//! (10,000 records, then 100,000, then 1,000,000) until the fetch starts at or before
//! the commit, and skips what lies before the commit. When the commit lies inside the
//! partition's *last* batch, such a broker answers nothing at all: a partition that
//! gives no record for [`QUIET`] after its assignment is probed ([`probe`]) — unless
//! the broker says its end is at the commit, it is read again from before the commit
//! in the same way. The same holds inside an assignment: a record that comes past
//! where its partition was read to (a fetch from inside a batch: after a pause, or a
//! rebalance) is read again the same way ([`gap`]). On a broker that answers as Kafka
//! does this costs one lookup of the committed offset per assignment; a gap the broker
//! really has (compaction, transaction markers, retention) costs one read back.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{Ctx, Pending};

/// How long an assigned partition may give no record before it is probed.
pub(super) const QUIET: Duration = Duration::from_secs(2);

/// How far back to seek, in turn.
const SPANS: [i64; 3] = [10_000, 100_000, 1_000_000];

/// A partition read again from before its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rewind {
    /// The group's committed offset: where the partition must resume.
    pub commit: i64,
    /// Which of [`SPANS`] the seek went back by.
    pub attempt: usize,
    /// A record before the commit came since: the fetch starts at or before it.
    pub found: bool,
}

/// Whether `p` — the first record of its partition's assignment, or the first at or
/// past the commit after a seek back ([`Pending::first`]) — may be handed out; `None`
/// when the source sought back and it comes again in order.
pub(super) async fn admit(c: &Arc<StreamConsumer<Ctx>>, p: Pending) -> Option<Pending> {
    let (topic, partition) = (p.topic.clone(), p.meta.partition.unwrap_or(-1));
    let offset = p.meta.offset.unwrap_or(-1);
    let rewind = {
        let o = c.context().offsets.lock();
        match o.parts.get(&(topic.clone(), partition)) {
            // Checked already (read before the check was done, then held).
            Some(owned) if owned.checked && owned.rewind.is_none() => return Some(p),
            Some(owned) if owned.generation == p.generation => owned.rewind,
            // Given up since it was read: the runner drops it.
            _ => return Some(p),
        }
    };
    let (commit, attempt) = match rewind {
        // The fetch started at or before the commit: in order from here.
        Some(r) if r.found || offset <= r.commit => {
            settle(c, &p, None);
            return Some(p);
        }
        Some(r) => (r.commit, r.attempt + 1),
        None => match committed(c, &topic, partition).await {
            Ok(Some(commit)) if offset > commit => (commit, 0),
            Ok(_) => {
                settle(c, &p, None);
                return Some(p);
            }
            // Not knowing the commit, the partition is read again from a span before
            // its first record with nothing skipped: records repeated, none lost.
            Err(e) => {
                let from = offset.saturating_sub(SPANS[0]).max(0);
                tracing::warn!(pipeline = %c.context().pipeline, %topic, partition, first = offset, from, error = %e, "the group's committed offset is not known: reading the partition again from further back, nothing skipped (records may repeat)");
                let last = SPANS.len() - 1;
                return read_back(c, p, from, from, last).await;
            }
        },
    };
    let Some(span) = SPANS.get(attempt) else {
        tracing::warn!(pipeline = %c.context().pipeline, %topic, partition, commit, first = offset, "Kafka partition resumes past its commit even read back {} records: the broker has no records between (compacted, or deleted by retention)", SPANS[SPANS.len() - 1]);
        settle(c, &p, None);
        return Some(p);
    };
    let from = commit.saturating_sub(*span).max(0);
    tracing::info!(pipeline = %c.context().pipeline, %topic, partition, commit, first = offset, from, "the broker answered past the group's commit: reading the partition again from further back (records before the commit skipped)");
    read_back(c, p, commit, from, attempt).await
}

/// `p` came past `expected`, where its partition was read to: the client fetched
/// from inside a record batch (after a pause it fetches again from the application's
/// position; librdkafka on some brokers also after a rebalance) and a broker that
/// answers such a fetch with the batches after it skipped the rest of the batch. The
/// partition is read again from further back, the records read already skipped, as on
/// a resume from a commit ([`admit`] widens the read back while it comes past again).
/// A gap the broker really has (transaction markers, compaction) costs one read back.
pub(super) async fn gap(
    c: &Arc<StreamConsumer<Ctx>>,
    p: Pending,
    expected: i64,
) -> Option<Pending> {
    let (topic, partition, first) = (
        p.topic.clone(),
        p.meta.partition.unwrap_or(-1),
        p.meta.offset.unwrap_or(-1),
    );
    let pipeline = &c.context().pipeline;
    let from = expected.saturating_sub(SPANS[0]).max(0);
    tracing::info!(%pipeline, %topic, partition, expected, first, from, "a gap in the partition's offsets: reading it again from further back (records read already skipped)");
    read_back(c, p, expected, from, 0).await
}

/// Seeks `p`'s partition back to `from`, to hand out its records from `commit` on;
/// `None` when the seek was made (the records come again), else `p` to hand out.
async fn read_back(
    c: &Arc<StreamConsumer<Ctx>>,
    p: Pending,
    commit: i64,
    from: i64,
    attempt: usize,
) -> Option<Pending> {
    let partition = p.meta.partition.unwrap_or(-1);
    match seek(c, &p.topic, partition, from).await {
        Ok(Ok(())) => {
            settle(
                c,
                &p,
                Some(Rewind {
                    commit,
                    attempt,
                    found: from == commit,
                }),
            );
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(pipeline = %c.context().pipeline, topic = %p.topic, partition, error = %e, "cannot seek back to the group's commit: records between it and the first one read may be missing");
            settle(c, &p, None);
            Some(p)
        }
        Err(_) => Some(p),
    }
}

/// Probes every partition that gave no record since it was assigned [`QUIET`] ago and
/// was not checked: when the group committed past its start and the broker does not say
/// its end is at the commit, the partition is read again from before the commit (the
/// records before the commit skipped), as when its first record lies past the commit.
pub(super) async fn probe(c: &Arc<StreamConsumer<Ctx>>) {
    let quiet = c.context().offsets.lock().select(|w| {
        (!w.checked
            && w.rewind.is_none()
            && w.next.is_none()
            && w.since.is_some_and(|t| t.elapsed() >= QUIET))
        .then_some(w.high)
    });
    let pipeline = c.context().pipeline.clone();
    for (topic, partition, generation, high) in quiet {
        let commit = match committed(c, &topic, partition).await {
            Ok(commit) => commit,
            // Probed again after another quiet spell.
            Err(e) => {
                tracing::debug!(%pipeline, %topic, partition, error = %e, "cannot read the quiet partition's commit yet; probing it again");
                let mut o = c.context().offsets.lock();
                if let Some(w) = o.parts.get_mut(&(topic.clone(), partition))
                    && w.generation == generation
                {
                    w.since = Some(std::time::Instant::now());
                }
                continue;
            }
        };
        let mark = |rewind: Option<Rewind>, checked: bool| {
            let mut o = c.context().offsets.lock();
            if let Some(w) = o.parts.get_mut(&(topic.clone(), partition))
                && w.generation == generation
                && w.next.is_none()
            {
                w.checked = checked;
                w.since = Some(std::time::Instant::now());
                if let Some(r) = rewind {
                    w.rewind = Some(r);
                    w.next = Some(r.commit);
                }
            }
        };
        let Some(commit) = commit.filter(|&k| k > 0 && high.is_none_or(|h| h > k)) else {
            mark(None, true);
            continue;
        };
        let from = commit.saturating_sub(SPANS[0]).max(0);
        tracing::info!(%pipeline, %topic, partition, commit, ?high, from, "Kafka partition gave no record since its assignment although the group committed past its start: reading it again from before the commit (records before the commit skipped)");
        let seek = seek(c, &topic, partition, from).await;
        match seek {
            Ok(Ok(())) => mark(
                Some(Rewind {
                    commit,
                    attempt: 0,
                    found: from == commit,
                }),
                true,
            ),
            // Not fetching yet: probed again after another quiet spell.
            Ok(Err(e)) => {
                tracing::debug!(%pipeline, %topic, partition, error = %e, "cannot seek the quiet partition yet; probing it again");
                mark(None, false);
            }
            Err(_) => mark(None, false),
        }
    }
}

/// Seeks `topic[partition]` to `from`, off the async threads (librdkafka blocks).
async fn seek(
    c: &Arc<StreamConsumer<Ctx>>,
    topic: &str,
    partition: i32,
    from: i64,
) -> Result<rdkafka::error::KafkaResult<()>, tokio::task::JoinError> {
    let (c, topic) = (c.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        c.seek(
            &topic,
            partition,
            Offset::Offset(from),
            Duration::from_secs(5),
        )
    })
    .await
}

/// Notes the partition's state after the check: reading again from before the commit
/// (the records before it skipped), or in order.
fn settle(c: &StreamConsumer<Ctx>, p: &Pending, rewind: Option<Rewind>) {
    let mut o = c.context().offsets.lock();
    let key = (p.topic.clone(), p.meta.partition.unwrap_or(-1));
    if let Some(owned) = o.parts.get_mut(&key)
        && owned.generation == p.generation
    {
        owned.checked = true;
        owned.rewind = rewind;
        if let Some(r) = rewind {
            owned.next = Some(r.commit);
        }
    }
}

/// The group's committed offset of a partition: `Ok(None)` when it has none (the
/// partition starts where `auto.offset.reset` says); an error when the coordinator did
/// not say, asked three times (a rebalance in progress, the coordinator moving).
async fn committed(
    c: &Arc<StreamConsumer<Ctx>>,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, String> {
    let mut last = String::new();
    for attempt in 1..=3u32 {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let c2 = c.clone();
        let answer =
            tokio::task::spawn_blocking(move || c2.committed_offsets(tpl, Duration::from_secs(5)))
                .await
                .map_err(|e| e.to_string())?;
        match answer {
            Ok(tpl) => {
                return Ok(tpl
                    .find_partition(topic, partition)
                    .and_then(|p| match p.offset() {
                        Offset::Offset(o) if o >= 0 => Some(o),
                        _ => None,
                    }));
            }
            Err(e) => {
                tracing::debug!(pipeline = %c.context().pipeline, topic, partition, attempt, error = %e, "cannot read the group's committed offset yet");
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(250) * attempt).await;
            }
        }
    }
    Err(last)
}
