//! `etlmesh subscribe --kafka BROKERS --topic T`: a bare Kafka consumer — a member of a
//! consumer group with the same client (librdkafka) and assignment as a stream's
//! source, that only counts each record and commits the offsets it read — the ceiling
//! a pipeline is measured against (`bench/kafka.py`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::CliError;
use crate::simulate_nats::Counted;

/// Records between two commits.
const COMMIT_EVERY: u64 = 10_000;

fn commit(
    fail: &impl Fn(String) -> CliError,
    c: &StreamConsumer,
    topic: &str,
    next: &HashMap<i32, i64>,
    mode: CommitMode,
) -> Result<(), CliError> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .map_err(|e| fail(e.to_string()))?;
    }
    if tpl.count() > 0 {
        c.commit(&tpl, mode)
            .map_err(|e| fail(format!("cannot commit: {e}")))?;
    }
    Ok(())
}

/// Reads `topic` from the group's commit (the earliest offset for a new group) until
/// `count` records came or none came for `idle`; commits every 10,000 and at the end.
pub(crate) async fn count(
    brokers: &str,
    topic: &str,
    group: &str,
    count: Option<u64>,
    idle: Duration,
    subscribed: impl FnOnce(),
) -> Result<Counted, CliError> {
    let fail = CliError::client("Kafka", brokers);
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .map_err(|e| fail(format!("cannot make a consumer: {e}")))?;
    consumer
        .subscribe(&[topic])
        .map_err(|e| fail(format!("cannot subscribe to {topic}: {e}")))?;
    subscribed();
    let mut got = Counted {
        messages: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
    };
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut start: Option<Instant> = None;
    let mut last = Instant::now();
    while count.is_none_or(|c| got.messages < c) {
        match tokio::time::timeout(idle, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(e)) => tracing::warn!(error = %e, "Kafka: {e}"),
            Ok(Ok(m)) => {
                start.get_or_insert_with(Instant::now);
                got.messages += 1;
                got.bytes += m.payload().map_or(0, |p| p.len() as u64);
                next.insert(m.partition(), m.offset() + 1);
                last = Instant::now();
                if got.messages.is_multiple_of(COMMIT_EVERY) {
                    commit(&fail, &consumer, topic, &next, CommitMode::Async)?;
                }
            }
        }
    }
    commit(&fail, &consumer, topic, &next, CommitMode::Sync)?;
    got.elapsed = start.map_or(Duration::ZERO, |s| last.duration_since(s));
    Ok(got)
}
