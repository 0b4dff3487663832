//! Stream sources: where a stream's messages come from, and where their
//! acknowledgements go.
//!
//! A source hands the runner [`Delivery`]s in order of arrival, each with an opaque
//! [`Source::Ack`] — its position. The runner ([`crate::runner`]) is generic over the
//! [`Source`] trait and keeps its invariants for every kind:
//!
//! - a message is acknowledged only once every sink committed the rows it produced
//!   (and no open window holds it), in order of arrival;
//! - a message rejected whole is acknowledged as [`Outcome::DeadLettered`] only after
//!   its dead letter is written;
//! - what the worker holds unacknowledged is bounded by [`Source::window`] — the
//!   runner commits before half of it is held — and by the source's channel;
//! - while a sink is down, held messages stay held ([`Source::hold`]); on a stop, what
//!   was not acknowledged is handed back ([`Source::release`]) and comes again.
//!
//! A new kind is a module here with an `open` function; in the config, its spec
//! implementing [`etlmesh_config::StreamSourceKind`] and a variant of
//! [`etlmesh_config::StreamSource`] (one arm in its `spec`); and one arm in
//! [`crate::runner::run`].

pub mod kafka;
pub mod mqtt;
pub mod nats;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use etlmesh_config::StreamSource;

use crate::StreamError;
use crate::state::SlotState;

/// FNV-1a, 64 bits: a digest that stays the same across builds and versions (session
/// ids, message ids for JetStream's duplicate window).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A message, with what acknowledging it needs.
pub struct Delivery<A> {
    /// Order of arrival.
    pub seq: u64,
    /// The source sends it again: an earlier connection, or another worker, received
    /// it and did not acknowledge it.
    pub redelivered: bool,
    /// The topic or subject it was published to.
    pub topic: Arc<str>,
    /// Its payload.
    pub payload: Bytes,
    /// What the source says of it besides (Kafka's key, partition, offset, timestamp
    /// and headers); empty for MQTT and JetStream.
    pub meta: Meta,
    /// Its position, for the acknowledgement.
    pub ack: A,
}

/// What a record carries besides its payload, for the source's metadata columns.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// The record key.
    pub key: Option<Bytes>,
    /// The topic (without the partition and offset that `Delivery::topic` carries).
    pub topic: Option<Arc<str>>,
    /// The partition.
    pub partition: Option<i32>,
    /// The offset in its partition.
    pub offset: Option<i64>,
    /// The record's timestamp, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Its headers, in order.
    pub headers: Vec<(Arc<str>, Option<Bytes>)>,
}

/// A partition of the source's key space as one worker owns it: a Kafka partition in
/// one assignment. A windowed pipeline keeps the windows of each shard apart (each
/// its own watermark), and drops them when the shard is given up: its next owner
/// rebuilds them from the records not yet committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// `topic/partition`.
    pub name: Arc<str>,
    /// The assignment it was read in; a later assignment of the same partition is a
    /// new shard.
    pub generation: u64,
}

/// How a message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its rows are committed (or it had none to give).
    Done,
    /// Nothing of it became a row, and its dead letter is written: it must never come
    /// again (JetStream: `+TERM`).
    DeadLettered,
}

/// The session of a stream with its source, as the runner drives it.
pub trait Source: Send + Sync + 'static {
    /// A message's position.
    type Ack: Send + Sync + 'static;

    /// Messages the source may hand out unacknowledged; the runner commits and
    /// acknowledges before half of them are held.
    fn window(&self) -> usize;

    /// Acknowledges messages, in order of arrival. Returns how many were sent.
    fn ack(
        &self,
        acks: Vec<(Self::Ack, Outcome)>,
    ) -> impl Future<Output = Result<u64, StreamError>> + Send;

    /// How often held messages must be said to be in progress ([`Source::hold`]) so
    /// that the source does not send them again while the worker still holds them (an
    /// open window, a sink that is down); `None` when it never sends them on its own.
    fn keep_alive(&self) -> Option<std::time::Duration> {
        None
    }

    /// The shard a message was read from, for sources partitioned by key (Kafka);
    /// `None` when the whole stream is one.
    fn shard(&self, _ack: &Self::Ack) -> Option<Shard> {
        None
    }

    /// What acknowledging `acks` would commit, for an exactly-once sink that commits it
    /// in its own transaction (Kafka); `None` when the source has no such offsets.
    fn offsets_of(&self, _acks: &[&Self::Ack]) -> Option<crate::sinks::SourceOffsets> {
        None
    }

    /// Whether the source knows of records of `shard` (`None`: the whole stream) that it
    /// has not handed out yet — the broker has them and the worker will get them: the
    /// shard is slow (a rebalance, a slow fetch), not idle, and its windows must not
    /// close on the idle timeout. Not while the worker's own bounds hold the source
    /// back: then the idle timeout is what releases held messages.
    fn behind(&self, _shard: Option<&Shard>) -> bool {
        false
    }

    /// Whether this worker still owns `shard` (it was not revoked since).
    fn owns(&self, _shard: &Shard) -> bool {
        true
    }

    /// Says that held messages are still being worked on (a sink is down, a window is
    /// open), for sources that would otherwise send them again.
    fn hold<'a>(&'a self, held: Vec<&'a Self::Ack>) -> impl Future<Output = ()> + Send + 'a;

    /// Stops receiving: no message is handed out after it (those already on their way
    /// come again). The connection stays for acknowledgements.
    fn stop(&self);

    /// Hands back messages that will not be acknowledged (the stream stops): they
    /// come again, to this worker's next run or to another.
    fn release(&self, unacked: Vec<Self::Ack>) -> impl Future<Output = ()> + Send;

    /// Stops the source sending to this worker (a scale-down): the others take the share.
    fn leave(&self) -> impl Future<Output = ()> + Send;

    /// Closes the connection, after the acknowledgements sent are flushed.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// Who a worker slot is to its source, as its state file keeps it: a slot whose
/// source changed starts clean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotIdentity {
    /// The MQTT client id, or the JetStream consumer.
    pub client_id: String,
    /// The subscription, or `<stream>:<filter>`.
    pub subscription: String,
    /// Where the source is.
    pub broker: String,
}

/// The identity of `worker`'s slot of `pipeline` on `source`; `shared` when several
/// workers may serve it.
pub fn identity(
    source: StreamSource<'_>,
    pipeline: &str,
    worker: &str,
    shared: bool,
) -> SlotIdentity {
    match source {
        StreamSource::Mqtt(m) => {
            let id = mqtt::SessionId::new(m, pipeline, worker, shared);
            SlotIdentity {
                client_id: id.client_id,
                subscription: id.subscription,
                broker: id.broker,
            }
        }
        StreamSource::Nats(n) => SlotIdentity {
            client_id: n.consumer.clone(),
            subscription: format!("{}:{}", n.stream, n.filter),
            broker: n.url.clone(),
        },
        StreamSource::Kafka(k) => SlotIdentity {
            client_id: k.group.clone(),
            subscription: k.topics.join(","),
            broker: k.brokers.clone(),
        },
    }
}

/// Removes what the slot's earlier source keeps for it (an MQTT session and its
/// queue). A JetStream consumer is shared by the pipeline's workers and kept.
pub async fn forget(source: StreamSource<'_>, old: &SlotState, pipeline: &str) {
    match source {
        StreamSource::Mqtt(m) => {
            if let Err(e) = mqtt::discard_session(m, &old.client_id).await {
                tracing::warn!(pipeline, old_client_id = %old.client_id, error = %e, "cannot remove the old session: the broker drops it when it expires");
            }
        }
        StreamSource::Nats(_) => {
            tracing::info!(pipeline, old_consumer = %old.client_id, "the old JetStream consumer is kept: remove it with `nats consumer rm` once no pipeline uses it");
        }
        StreamSource::Kafka(_) => {
            tracing::info!(pipeline, old_group = %old.client_id, "the old Kafka consumer group keeps its offsets: delete it with `kafka-consumer-groups.sh --delete` once no pipeline uses it");
        }
    }
}

/// A delivery received outside any source (tests, fuzzing).
pub fn detached_delivery(seq: u64, topic: &str, payload: &[u8]) -> Delivery<()> {
    Delivery {
        seq,
        redelivered: false,
        topic: Arc::from(topic),
        payload: Bytes::copy_from_slice(payload),
        meta: Meta::default(),
        ack: (),
    }
}
