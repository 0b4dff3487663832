//! The acknowledgement frontier: which held messages may be acknowledged now.
//!
//! Messages are held in order of arrival, each with its sequence number. Up to `upto`
//! (every sink committed their rows, and they were processed) a message may go — unless
//! a window holds it: per shard, a window that is open or loaded but not committed
//! holds back every message of its shard from the oldest it contains on. Without shards
//! (MQTT, JetStream) the frontier is a prefix; with shards (Kafka's partitions) each
//! shard moves on its own, and what is kept stays in order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::source::Outcome;

/// The oldest message a window holds, per shard (`None`: the stream has no shards).
pub(crate) type Holding = HashMap<Option<Arc<str>>, u64>;

/// Takes from `held` (in order of arrival) the messages up to `upto` that no window
/// holds, in order; `shard_of` names a message's shard.
pub(crate) fn take<A>(
    held: &mut VecDeque<(u64, A, Outcome)>,
    upto: u64,
    holding: &Holding,
    shard_of: impl Fn(&A) -> Option<Arc<str>>,
) -> Vec<(A, Outcome)> {
    let limit = |shard: &Option<Arc<str>>| {
        holding
            .get(shard)
            .map_or(upto, |m| upto.min(m.saturating_sub(1)))
    };
    let mut acks = Vec::new();
    if holding.keys().all(Option::is_none) {
        // One shard: a prefix.
        let upto = limit(&None);
        while held.front().is_some_and(|(seq, _, _)| *seq <= upto) {
            if let Some((_, a, o)) = held.pop_front() {
                acks.push((a, o));
            }
        }
        return acks;
    }
    let mut kept = VecDeque::with_capacity(held.len());
    while let Some((seq, a, o)) = held.pop_front() {
        if seq > upto {
            kept.push_back((seq, a, o));
            break;
        }
        if seq <= limit(&shard_of(&a)) {
            acks.push((a, o));
        } else {
            kept.push_back((seq, a, o));
        }
    }
    kept.append(held);
    *held = kept;
    acks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message in a test: its sequence number and shard.
    type Msg = (u64, Option<Arc<str>>);

    /// Messages 1..=n, message i of shard `shards[i % shards.len()]`.
    fn held(n: u64, shards: &[&str]) -> VecDeque<(u64, Msg, Outcome)> {
        (1..=n)
            .map(|i| {
                let shard =
                    (!shards.is_empty()).then(|| Arc::from(shards[(i as usize) % shards.len()]));
                (i, (i, shard), Outcome::Done)
            })
            .collect()
    }

    fn seqs<T>(acks: &[((u64, T), Outcome)]) -> Vec<u64> {
        acks.iter().map(|((s, _), _)| *s).collect()
    }

    fn shard(a: &Msg) -> Option<Arc<str>> {
        a.1.clone()
    }

    #[test]
    fn nothing_goes_past_what_every_sink_committed() {
        let mut h = held(5, &[]);
        let acks = take(&mut h, 3, &Holding::new(), shard);
        assert_eq!(seqs(&acks), [1, 2, 3]);
        assert_eq!(h.front().map(|m| m.0), Some(4), "the rest stays, in order");
        assert!(take(&mut h, 3, &Holding::new(), shard).is_empty());
    }

    #[test]
    fn an_open_window_holds_back_its_oldest_message_and_all_after_it() {
        let mut h = held(6, &[]);
        let holding = Holding::from([(None, 3)]);
        let acks = take(&mut h, 6, &holding, shard);
        assert_eq!(
            seqs(&acks),
            [1, 2],
            "a prefix stops before the window's oldest"
        );
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn with_shards_a_window_holds_back_only_its_own_shard() {
        // Messages alternate between the shards: a has 2, 4, 6; b has 1, 3, 5.
        let mut h = held(6, &["a", "b"]);
        let holding = Holding::from([(Some(Arc::from("a")), 4)]);
        let acks = take(&mut h, 6, &holding, shard);
        assert_eq!(seqs(&acks), [1, 2, 3, 5], "shard b goes on past a's window");
        let kept: Vec<u64> = h.iter().map(|m| m.0).collect();
        assert_eq!(kept, [4, 6], "what a's window holds stays, in order");
        // The window committed: the rest goes.
        let acks = take(
            &mut h,
            6,
            &Holding::from([(Some(Arc::from("a")), u64::MAX)]),
            shard,
        );
        assert_eq!(seqs(&acks), [4, 6]);
        assert!(h.is_empty());
    }

    #[test]
    fn with_shards_nothing_goes_past_the_commit_either() {
        let mut h = held(6, &["a", "b"]);
        let holding = Holding::from([(Some(Arc::from("a")), 2)]);
        let acks = take(&mut h, 4, &holding, shard);
        assert_eq!(seqs(&acks), [1, 3]);
        let kept: Vec<u64> = h.iter().map(|m| m.0).collect();
        assert_eq!(kept, [2, 4, 5, 6]);
    }

    #[test]
    fn the_outcome_goes_with_its_message() {
        let mut h = held(2, &[]);
        h[1].2 = Outcome::DeadLettered;
        let acks = take(&mut h, 2, &Holding::new(), shard);
        assert_eq!(acks[1].1, Outcome::DeadLettered);
    }
}
