//! The Kafka source: one consumer per worker in the pipeline's consumer group, which
//! the group's coordinator balances cooperatively (`cooperative-sticky`: a worker
//! that joins or leaves moves only the partitions that must move).
//!
//! Offsets are committed behind the acknowledgement frontier: the runner acknowledges
//! in order of arrival, so per partition the highest acknowledged offset + 1 is where
//! the group resumes, and only that is committed (asynchronously, after each
//! acknowledgement). When a partition is revoked, what was acknowledged is committed
//! synchronously before it is given up; acknowledgements that arrive later for it
//! belong to an earlier assignment (its *generation*) and are dropped — the partition's
//! new owner reads those records again (at least once, never lost).
//!
//! In an exactly-once pipeline (a Kafka sink with `exactly_once`) the consumer commits
//! nothing itself: each write of the sink is a transaction that also commits the
//! offsets after its records ([`Source::offsets_of`]), so that output and progress
//! are one atomic step.
//!
//! Each partition in one assignment is a shard ([`super::Shard`]): a windowed pipeline
//! keeps its windows apart and drops them when the partition is revoked
//! ([`crate::window::Shards`]). A record handed out twice in one assignment (the client
//! fetched again from an earlier position) is skipped.
//!
//! What the worker holds is bounded by a count (`max_pending`) and a byte budget. Past
//! either, the source pauses its partitions and keeps polling (so that the group does
//! not think it dead and rebalances are served), and resumes when the runner caught up.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etlmesh_config::KafkaSourceSpec;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::{Delivery, Meta, Outcome, Source};
use crate::{StreamError, StreamMetrics};

mod end;
mod resume;

/// Bytes of payload held unacknowledged, at most.
const HELD_BYTES: usize = 256 << 20;
/// Records read while paused (already fetched) kept for the runner, at most.
const EARLY_MAX: usize = 10_000;
/// How long a partition whose end the statistics have not said since its last record
/// counts as behind ([`Owned::behind`]): a few statistics intervals.
const UNKNOWN_END: Duration = Duration::from_secs(30);

/// A record's position.
pub struct Ack {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    /// `topic/partition`: the shard of a windowed pipeline.
    shard: Arc<str>,
    /// The assignment of the partition it was read in.
    generation: u64,
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// A partition this worker owns.
#[derive(Debug, Default)]
struct Owned {
    generation: u64,
    /// Where the group resumes once committed: the highest acknowledged offset + 1.
    acked: Option<i64>,
    /// What was last sent to the coordinator.
    committed: Option<i64>,
    /// The offset after the newest record read in this assignment: a record below it
    /// was read already (the client fetched again from an earlier position) and is
    /// skipped, so that no record is handed out twice in one assignment.
    next: Option<i64>,
    /// The partition's end as the broker last said it (librdkafka's statistics: the
    /// end of the last fetch answered, which a fetch the broker is slow to answer
    /// leaves stale — it can say that there are more records, never that there are none).
    high: Option<i64>,
    /// The end the broker answered when asked directly ([`end::check`]), and when the
    /// question was sent.
    end: Option<(i64, Instant)>,
    /// When a record of it last came in this assignment (handed out or skipped), or
    /// when it was assigned: statistics older than this do not say where it ends.
    read_at: Option<Instant>,
    /// Records fetched and not yet handed out (librdkafka's queue).
    queued: bool,
    /// The first record of the assignment was checked against the group's commit
    /// ([`resume`]).
    checked: bool,
    /// Read again from before the commit ([`resume`]).
    rewind: Option<resume::Rewind>,
    /// When it was assigned (or last probed): a partition quiet since is probed
    /// ([`resume::probe`]).
    since: Option<std::time::Instant>,
}

impl Owned {
    /// The broker has (or may have) records of it that this worker has not handed out
    /// yet: records fetched and queued, a read back to the commit not finished, or an
    /// end past the next record. It is caught up only when the broker, asked after the
    /// last record came, says it ends there ([`end::check`]): statistics say the end of
    /// the last fetch answered, stale while the broker is slow to answer the next.
    /// Past [`UNKNOWN_END`] without an answer it counts as caught up, so that a broker
    /// that never says its end cannot hold windows open for ever.
    fn behind(&self, now: Instant) -> bool {
        if self.queued || self.rewind.is_some_and(|r| !r.found) {
            return true;
        }
        if let (Some(h), Some(n)) = (self.high, self.next)
            && h > n
        {
            return true;
        }
        match (self.end, self.next, self.read_at) {
            (Some((end, asked)), Some(n), Some(r)) if asked > r => end > n,
            _ => self
                .read_at
                .is_none_or(|r| now.saturating_duration_since(r) < UNKNOWN_END),
        }
    }
}

/// The partitions this worker owns and how far each is acknowledged.
#[derive(Debug, Default)]
struct Offsets {
    parts: HashMap<(Arc<str>, i32), Owned>,
    /// Each owned partition by its shard name (`topic/partition`).
    by_name: HashMap<Arc<str>, (Arc<str>, i32)>,
    generation: u64,
    /// The sink commits the offsets in its transactions (exactly once): the consumer
    /// commits none itself.
    in_transactions: bool,
    /// Fetching is paused because the worker holds all it may.
    paused: bool,
}

impl Offsets {
    /// The owned partitions `pick` takes something from, with their generation; none
    /// while fetching is paused (the runner holds all it may: nothing is quiet).
    fn select<T>(&self, pick: impl Fn(&Owned) -> Option<T>) -> Vec<(Arc<str>, i32, u64, T)> {
        if self.paused {
            return Vec::new();
        }
        self.parts
            .iter()
            .filter_map(|((t, p), w)| pick(w).map(|x| (t.clone(), *p, w.generation, x)))
            .collect()
    }

    /// What to commit: every owned partition acknowledged past its last commit (only
    /// `only`'s partitions when given); marks them committed. Nothing when the sink
    /// commits the offsets in its transactions.
    fn take_commit(&mut self, only: Option<&TopicPartitionList>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        if self.in_transactions {
            return tpl;
        }
        for ((topic, partition), o) in &mut self.parts {
            if let Some(only) = only
                && only.find_partition(topic, *partition).is_none()
            {
                continue;
            }
            if let Some(next) = o.acked
                && o.committed.is_none_or(|c| c < next)
                && tpl
                    .add_partition_offset(topic, *partition, Offset::Offset(next))
                    .is_ok()
            {
                o.committed = Some(next);
            }
        }
        tpl
    }
}

impl Offsets {
    /// The partition a shard name stands for, if owned.
    fn by_name(&self, name: &str) -> Option<&Owned> {
        self.parts.get(self.by_name.get(name)?)
    }

    /// A commit of `tpl` failed: its partitions are committed again with the next
    /// acknowledgement.
    fn uncommit(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let Some(p) = self.parts.get_mut(&(Arc::from(e.topic()), e.partition())) {
                p.committed = None;
            }
        }
    }
}

/// librdkafka's callbacks: logs, statistics (the lag), rebalances and commits.
struct Ctx {
    pipeline: String,
    offsets: Arc<Mutex<Offsets>>,
    metrics: StreamMetrics,
    /// The last error librdkafka reported (for the error at start).
    last_error: Mutex<Option<String>>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(pipeline = %self.pipeline, ?level, fac, "librdkafka: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(pipeline = %self.pipeline, %error, "librdkafka: {reason}");
        *self.last_error.lock() = Some(reason.to_string());
    }

    /// Per owned partition: its lag (high watermark − committed offset); their sum is
    /// the backlog the autoscaler reads. And whether the worker is behind the partition's
    /// end ([`Source::behind`]).
    fn stats(&self, statistics: Statistics) {
        let mut total = 0i64;
        let mut o = self.offsets.lock();
        for (topic, t) in &statistics.topics {
            for (id, p) in &t.partitions {
                if *id < 0 {
                    continue;
                }
                let owned = o.parts.get_mut(&(Arc::from(topic.as_str()), *id));
                let mine = owned.is_some();
                if let Some(owned) = owned {
                    owned.high = (p.hi_offset >= 0).then_some(p.hi_offset);
                    owned.queued = p.fetchq_cnt > 0;
                }
                if mine && let Some(lag) = lag(p) {
                    total += lag;
                    self.metrics
                        .partition_lag(&self.pipeline, topic, *id, Some(lag));
                } else if !mine {
                    self.metrics.partition_lag(&self.pipeline, topic, *id, None);
                }
            }
        }
        self.metrics
            .source_backlog(&self.pipeline, u64::try_from(total).unwrap_or(0), 0);
    }
}

/// A partition's lag: librdkafka's (the end minus the committed offset), or, before the
/// group committed anything, the end minus where reading starts (the low watermark).
fn lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.consumer_lag >= 0 {
        return Some(p.consumer_lag);
    }
    (p.hi_offset >= 0 && p.committed_offset < 0).then(|| p.hi_offset - p.lo_offset.max(0))
}

impl ConsumerContext for Ctx {
    /// A revoked partition's acknowledged offsets are committed before it is given up.
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let commit = self.offsets.lock().take_commit(Some(tpl));
                let committed = describe(&commit);
                if commit.count() > 0
                    && let Err(e) = base.commit(&commit, CommitMode::Sync)
                {
                    tracing::warn!(pipeline = %self.pipeline, error = %e, offsets = %committed, "cannot commit the offsets of revoked partitions: their next owner reads from the last commit (records repeated, none lost)");
                }
                let mut o = self.offsets.lock();
                for e in tpl.elements() {
                    o.parts.remove(&(Arc::from(e.topic()), e.partition()));
                    o.by_name
                        .remove(shard_name(e.topic(), e.partition()).as_str());
                }
                tracing::info!(pipeline = %self.pipeline, revoked = %describe(tpl), committed = %committed, owned = o.parts.len(), "Kafka partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(pipeline = %self.pipeline, error = %e, "Kafka rebalance failed; the group tries again");
            }
        }
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut o = self.offsets.lock();
            for e in tpl.elements() {
                o.generation += 1;
                let generation = o.generation;
                o.parts.insert(
                    (Arc::from(e.topic()), e.partition()),
                    Owned {
                        generation,
                        since: Some(Instant::now()),
                        read_at: Some(Instant::now()),
                        ..Owned::default()
                    },
                );
                o.by_name.insert(
                    Arc::from(shard_name(e.topic(), e.partition())),
                    (Arc::from(e.topic()), e.partition()),
                );
            }
            tracing::info!(pipeline = %self.pipeline, assigned = %describe(tpl), owned = o.parts.len(), "Kafka partitions assigned");
        }
    }

    /// A failed commit is sent again with the next acknowledgement.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            tracing::warn!(pipeline = %self.pipeline, error = %e, offsets = %describe(offsets), "cannot commit offsets; committing again with the next acknowledgement");
            self.offsets.lock().uncommit(offsets);
        }
    }
}

/// A partition's shard name.
fn shard_name(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// `topic[partition]@offset, …`.
fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => format!("{}[{}]@{o}", e.topic(), e.partition()),
            _ => format!("{}[{}]", e.topic(), e.partition()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A worker's member of the pipeline's consumer group.
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<Ctx>>,
    window: usize,
    pump: tokio::task::AbortHandle,
}

impl KafkaSource {
    fn commit(&self, mode: CommitMode) {
        let tpl = self.consumer.context().offsets.lock().take_commit(None);
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::warn!(pipeline = %self.consumer.context().pipeline, error = %e, offsets = %describe(&tpl), "cannot commit offsets; committing again with the next acknowledgement");
            self.consumer.context().offsets.lock().uncommit(&tpl);
        }
    }
}

impl Source for KafkaSource {
    type Ack = Ack;

    fn window(&self) -> usize {
        self.window
    }

    /// Moves each partition's frontier and commits it (asynchronously). A record of
    /// a partition given up since is dropped: its new owner reads it again.
    async fn ack(&self, acks: Vec<(Ack, Outcome)>) -> Result<u64, StreamError> {
        let mut n = 0;
        {
            let mut o = self.consumer.context().offsets.lock();
            for (a, _) in &acks {
                if let Some(p) = o.parts.get_mut(&(a.topic.clone(), a.partition))
                    && p.generation == a.generation
                {
                    p.acked = Some(p.acked.map_or(a.offset + 1, |x| x.max(a.offset + 1)));
                    n += 1;
                }
            }
        }
        self.commit(CommitMode::Async);
        Ok(n)
    }

    fn shard(&self, ack: &Ack) -> Option<super::Shard> {
        Some(super::Shard {
            name: ack.shard.clone(),
            generation: ack.generation,
        })
    }

    /// Per partition owned, the offset after the newest record of `acks`.
    fn offsets_of(&self, acks: &[&Ack]) -> Option<crate::sinks::SourceOffsets> {
        let mut next: HashMap<(&Arc<str>, i32), i64> = HashMap::new();
        {
            let o = self.consumer.context().offsets.lock();
            for a in acks {
                if o.parts
                    .get(&(a.topic.clone(), a.partition))
                    .is_some_and(|p| p.generation == a.generation)
                {
                    let n = next.entry((&a.topic, a.partition)).or_insert(0);
                    *n = (*n).max(a.offset + 1);
                }
            }
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), n) in next {
            offsets
                .add_partition_offset(topic, partition, Offset::Offset(n))
                .ok()?;
        }
        Some(crate::sinks::SourceOffsets {
            offsets,
            group: self.consumer.group_metadata()?,
        })
    }

    fn owns(&self, shard: &super::Shard) -> bool {
        self.consumer
            .context()
            .offsets
            .lock()
            .by_name(&shard.name)
            .is_some_and(|p| p.generation == shard.generation)
    }

    /// The partition's end (as the broker last said it, every 2 s) is past the newest
    /// record handed out, or librdkafka holds fetched records of it — unless fetching
    /// is paused because the worker holds all it may.
    fn behind(&self, shard: Option<&super::Shard>) -> bool {
        let o = self.consumer.context().offsets.lock();
        !o.paused
            && shard.is_some_and(|s| {
                o.by_name(&s.name)
                    .is_some_and(|p| p.generation == s.generation && p.behind(Instant::now()))
            })
    }

    /// Kafka never sends a record again on its own: nothing to say.
    async fn hold<'a>(&'a self, _held: Vec<&'a Ack>) {}

    fn stop(&self) {
        self.pump.abort();
    }

    /// What is not acknowledged is not committed: the partition's next owner (or this
    /// worker's next run) reads it again from the last commit.
    async fn release(&self, _unacked: Vec<Ack>) {}

    /// Stops fetching (the runner finishes what it holds; `close` commits it and
    /// leaves the group, which gives the partitions to the others).
    async fn leave(&self) {
        if let Ok(a) = self.consumer.assignment()
            && let Err(e) = self.consumer.pause(&a)
        {
            tracing::debug!(error = %e, "cannot pause the partitions");
        }
    }

    /// Commits what was acknowledged (synchronously), then leaves the group.
    async fn close(&self) {
        self.pump.abort();
        let this = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let tpl = this.context().offsets.lock().take_commit(None);
            if tpl.count() > 0
                && let Err(e) = this.commit(&tpl, CommitMode::Sync)
            {
                tracing::warn!(pipeline = %this.context().pipeline, error = %e, "cannot commit the last offsets: their records are read again");
            }
            this.unsubscribe();
        })
        .await;
    }
}

/// The consumer's librdkafka settings.
fn config(spec: &KafkaSourceSpec, pipeline: &str, worker: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &spec.options {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &spec.brokers)
        .set("group.id", &spec.group)
        .set("client.id", format!("etlmesh-{pipeline}-{worker}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &spec.start)
        .set(
            "isolation.level",
            if spec.read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("statistics.interval.ms", "2000")
        // What librdkafka fetches ahead, per partition; the runner's bound is the rest.
        .set("queued.max.messages.kbytes", "16384");
    if !spec.options.contains_key("session.timeout.ms") {
        // A worker killed is noticed in 10 s (librdkafka's default is 45 s).
        c.set("session.timeout.ms", "10000");
    }
    c
}

/// Checks that the brokers answer and the topics exist (a pattern may match none
/// yet), with a clear error naming what is wrong.
async fn check(
    consumer: &Arc<StreamConsumer<Ctx>>,
    spec: &KafkaSourceSpec,
) -> Result<(), StreamError> {
    let err = |message: String| StreamError::Kafka {
        brokers: spec.brokers.clone(),
        message,
    };
    let c = consumer.clone();
    let md = tokio::task::spawn_blocking(move || {
        c.fetch_metadata(None, Duration::from_secs(10)).map(|m| {
            m.topics()
                .iter()
                .filter(|t| t.error().is_none())
                .map(|t| (t.name().to_string(), t.partitions().len()))
                .collect::<HashMap<String, usize>>()
        })
    })
    .await
    .map_err(|e| err(e.to_string()))?;
    let topics = md.map_err(|e| {
        let last = consumer
            .context()
            .last_error
            .lock()
            .clone();
        err(format!(
            "cannot reach the brokers within 10 s: {}; check `brokers` and that Kafka runs (and `options` for TLS/SASL)",
            last.unwrap_or_else(|| e.to_string())
        ))
    })?;
    if !spec.pattern {
        for t in &spec.topics {
            if !topics.contains_key(t) {
                return Err(err(format!(
                    "topic `{t}` does not exist; create it (`kafka-topics.sh --create --topic {t} --partitions 8`) or check the name"
                )));
            }
        }
    }
    Ok(())
}

/// A record read, before its share of the bounds is taken.
struct Pending {
    /// The assignment of its partition when it was read.
    generation: u64,
    topic: Arc<str>,
    shard: Arc<str>,
    place: Arc<str>,
    payload: Bytes,
    meta: Meta,
    /// To be checked against where its partition resumes ([`resume::admit`]).
    first: bool,
    /// It came past this offset, where its partition was read to: the records between
    /// are asked for again ([`resume::gap`]).
    gap: Option<i64>,
}

/// Names kept for the records read: topics and shards, made once each.
#[derive(Default)]
struct Names {
    topics: HashMap<String, Arc<str>>,
    shards: HashMap<(Arc<str>, i32), Arc<str>>,
}

/// The record as the runner gets it; `None` when it was read already in this
/// assignment (counted, `outcome="repeated"`).
fn read(
    m: &BorrowedMessage<'_>,
    names: &mut Names,
    offsets: &Mutex<Offsets>,
    metrics: &StreamMetrics,
    pipeline: &str,
) -> Option<Pending> {
    let topic = match names.topics.get(m.topic()) {
        Some(t) => t.clone(),
        None => {
            let t: Arc<str> = Arc::from(m.topic());
            names.topics.insert(m.topic().to_string(), t.clone());
            t
        }
    };
    let shard = names
        .shards
        .entry((topic.clone(), m.partition()))
        .or_insert_with(|| Arc::from(shard_name(m.topic(), m.partition())))
        .clone();
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|x| (Arc::from(x.key), x.value.map(Bytes::copy_from_slice)))
                .collect()
        })
        .unwrap_or_default();
    let (generation, first, gap) = {
        let mut o = offsets.lock();
        match o.parts.get_mut(&(topic.clone(), m.partition())) {
            Some(owned) => {
                owned.read_at = Some(Instant::now());
                if owned.next.is_some_and(|n| m.offset() < n) {
                    if let Some(r) = &mut owned.rewind {
                        // Read back from before the commit: skipped quietly.
                        r.found = true;
                        return None;
                    }
                    drop(o);
                    tracing::debug!(pipeline, topic = %topic, partition = m.partition(), offset = m.offset(), "a record read again in the same assignment: skipped");
                    metrics.messages(pipeline, "repeated", 1);
                    return None;
                }
                let gap = owned
                    .next
                    .filter(|&n| owned.rewind.is_none() && m.offset() > n);
                owned.next = Some(m.offset() + 1);
                (
                    owned.generation,
                    !owned.checked || owned.rewind.is_some(),
                    gap,
                )
            }
            None => (0, false, None),
        }
    };
    Some(Pending {
        generation,
        shard,
        place: Arc::from(format!("{topic}/{}@{}", m.partition(), m.offset())),
        payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        meta: Meta {
            key: m.key().map(Bytes::copy_from_slice),
            topic: Some(topic.clone()),
            partition: Some(m.partition()),
            offset: Some(m.offset()),
            timestamp_ms: m.timestamp().to_millis(),
            headers,
        },
        topic,
        first,
        gap,
    })
}

/// Pauses or resumes every partition owned.
fn set_paused(consumer: &StreamConsumer<Ctx>, pause: bool) {
    consumer.context().offsets.lock().paused = pause;
    tracing::debug!(pipeline = %consumer.context().pipeline, pause, "Kafka partitions paused or resumed");
    let Ok(a) = consumer.assignment() else {
        return;
    };
    let r = if pause {
        consumer.pause(&a)
    } else {
        consumer.resume(&a)
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, pause, "cannot pause or resume the partitions");
    }
}

/// Joins the group, checks the brokers and topics, and starts reading. Records arrive
/// on the returned channel; the lag goes to `metrics`. With `in_transactions` the
/// consumer commits no offsets: the exactly-once sink commits them in its transactions.
pub async fn open(
    spec: &KafkaSourceSpec,
    pipeline: &str,
    worker: &str,
    metrics: StreamMetrics,
    in_transactions: bool,
) -> Result<(KafkaSource, mpsc::Receiver<Delivery<Ack>>, JoinHandle<()>), StreamError> {
    let ctx = Ctx {
        pipeline: pipeline.to_string(),
        offsets: Arc::new(Mutex::new(Offsets {
            in_transactions,
            ..Offsets::default()
        })),
        metrics,
        last_error: Mutex::new(None),
    };
    let consumer: StreamConsumer<Ctx> = config(spec, pipeline, worker)
        .create_with_context(ctx)
        .map_err(|e| StreamError::Kafka {
            brokers: spec.brokers.clone(),
            message: format!("cannot make a consumer: {e}; check `options`"),
        })?;
    let consumer = Arc::new(consumer);
    check(&consumer, spec).await?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| StreamError::Kafka {
            brokers: spec.brokers.clone(),
            message: format!("cannot subscribe to {}: {e}", spec.topics.join(", ")),
        })?;
    tracing::info!(pipeline, brokers = %spec.brokers, topics = %spec.topics.join(","), group = %spec.group, max_pending = spec.max_pending, "Kafka consumer joined its group");
    let window = spec.max_pending.max(2);
    let (tx, rx) = mpsc::channel(window);
    let count = Arc::new(Semaphore::new(window));
    let budget = Arc::new(Semaphore::new(HELD_BYTES >> 10));
    let c = consumer.clone();
    let pipeline = pipeline.to_string();
    let task = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut names = Names::default();
        let mut early: VecDeque<Pending> = VecDeque::new();
        let mut paused = false;
        let mut backoff = Duration::from_millis(100);
        let mut quiet = tokio::time::interval(resume::QUIET);
        quiet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let p = match early.pop_front() {
                Some(p) => p,
                None => {
                    if paused {
                        set_paused(&c, false);
                        paused = false;
                    }
                    let got = tokio::select! {
                        got = c.recv() => got,
                        _ = quiet.tick() => {
                            resume::probe(&c).await;
                            end::check(&c).await;
                            continue;
                        }
                    };
                    match got {
                        Ok(m) => {
                            backoff = Duration::from_millis(100);
                            let ctx = c.context();
                            match read(&m, &mut names, &ctx.offsets, &ctx.metrics, &pipeline) {
                                Some(p) => p,
                                None => continue,
                            }
                        }
                        Err(e) => {
                            if tx.is_closed() {
                                return;
                            }
                            tracing::warn!(pipeline = %pipeline, error = %e, retry_in_ms = backoff.as_millis() as u64, "Kafka consumer: {e}; going on (what was not committed is read again)");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            };
            let key = (p.topic.clone(), p.meta.partition);
            let checked = match p.gap {
                Some(expected) => resume::gap(&c, p, expected).await,
                None if p.first => resume::admit(&c, p).await,
                None => Some(p),
            };
            let Some(p) = checked else {
                // Read again from further back: what was read after it comes again.
                early.retain(|q| (&q.topic, q.meta.partition) != (&key.0, key.1));
                continue;
            };
            let kib = (p.payload.len() >> 10).clamp(1, HELD_BYTES >> 10) as u32;
            // Its share of the bounds; while the runner catches up, the partitions are
            // paused and the consumer kept polled (heartbeats, rebalances).
            let (one, bytes) = loop {
                let permits = async {
                    let one = count.clone().acquire_owned().await.ok()?;
                    let bytes = budget.clone().acquire_many_owned(kib).await.ok()?;
                    Some((one, bytes))
                };
                tokio::select! {
                    biased;
                    got = permits => match got {
                        Some(p) => break p,
                        None => return,
                    },
                    () = tokio::time::sleep(Duration::from_millis(50)), if !paused => {
                        set_paused(&c, true);
                        paused = true;
                    }
                    r = c.recv(), if paused && early.len() < EARLY_MAX => {
                        let ctx = c.context();
                        if let Ok(m) = r
                            && let Some(p) = read(&m, &mut names, &ctx.offsets, &ctx.metrics, &pipeline)
                        {
                            early.push_back(p);
                        }
                    }
                }
            };
            seq += 1;
            let d = Delivery {
                seq,
                redelivered: false,
                topic: p.place,
                payload: p.payload,
                ack: Ack {
                    topic: p.topic,
                    partition: p.meta.partition.unwrap_or(-1),
                    offset: p.meta.offset.unwrap_or(-1),
                    shard: p.shard,
                    generation: p.generation,
                    _count: one,
                    _bytes: bytes,
                },
                meta: p.meta,
            };
            if tx.send(d).await.is_err() {
                return;
            }
        }
    });
    Ok((
        KafkaSource {
            consumer,
            window,
            pump: task.abort_handle(),
        },
        rx,
        task,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_partitions_acknowledged_past_their_commit_are_committed() {
        let mut o = Offsets::default();
        let t: Arc<str> = Arc::from("r");
        for (p, acked, committed) in [
            (0, Some(10), Some(5)),
            (1, Some(7), Some(7)),
            (2, None, None),
        ] {
            o.parts.insert(
                (t.clone(), p),
                Owned {
                    generation: 1,
                    acked,
                    committed,
                    ..Owned::default()
                },
            );
        }
        let tpl = o.take_commit(None);
        assert_eq!(tpl.count(), 1);
        let e = tpl.find_partition("r", 0).expect("partition 0");
        assert_eq!(e.offset(), Offset::Offset(10));
        assert_eq!(o.parts[&(t.clone(), 0)].committed, Some(10));
        // Nothing new: nothing to commit.
        assert_eq!(o.take_commit(None).count(), 0);
        // Only the partitions asked for (a revoke).
        o.parts.get_mut(&(t.clone(), 0)).expect("p0").acked = Some(12);
        o.parts.get_mut(&(t.clone(), 1)).expect("p1").acked = Some(9);
        let mut only = TopicPartitionList::new();
        only.add_partition("r", 1);
        let tpl = o.take_commit(Some(&only));
        assert_eq!(tpl.count(), 1);
        assert_eq!(
            tpl.find_partition("r", 1).expect("p1").offset(),
            Offset::Offset(9)
        );
    }

    #[test]
    fn a_partition_is_behind_while_the_broker_has_records_not_handed_out() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = Owned {
            generation: 1,
            read_at: Some(at(0)),
            ..Owned::default()
        };
        // Just assigned, its end not said yet: it may have records.
        assert!(p.behind(at(10)));
        p.next = Some(10);
        p.read_at = Some(at(100));
        // Statistics saying the end is the next record do not say the broker has no more
        // (a fetch slow to answer leaves them stale).
        p.high = Some(10);
        assert!(p.behind(at(200)));
        // The broker, asked before the last record came: stale too.
        p.end = Some((10, at(50)));
        assert!(p.behind(at(200)));
        // Asked since: caught up.
        p.end = Some((10, at(150)));
        assert!(!p.behind(at(200)));
        // The broker has more, said by either.
        p.end = Some((12, at(150)));
        assert!(p.behind(at(200)));
        p.end = Some((10, at(150)));
        p.high = Some(12);
        assert!(p.behind(at(200)));
        p.high = Some(10);
        p.queued = true;
        assert!(p.behind(at(200)));
        p.queued = false;
        // Reading back to the commit, nothing before it came yet.
        p.rewind = Some(resume::Rewind {
            commit: 10,
            attempt: 0,
            found: false,
        });
        assert!(p.behind(at(200)));
        p.rewind = None;
        // A broker that never says the end holds it behind only for a while.
        p.high = None;
        p.end = None;
        assert!(p.behind(at(200)));
        assert!(!p.behind(at(100) + UNKNOWN_END));
    }
}
