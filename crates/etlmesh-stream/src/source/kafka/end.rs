//! Where a quiet partition ends, asked of the broker.
//!
//! A windowed pipeline closes a partition's windows on the idle timeout only when the
//! partition is caught up ([`super::Owned::behind`]). librdkafka's statistics say the
//! end of the last fetch answered; while a loaded broker is slow to answer the next
//! one they keep saying that end, and a partition whose records are waiting would look
//! caught up. So a partition that gave no record for [`QUIET`] is asked directly (a
//! `ListOffsets` for its high watermark); only that answer, asked after its last
//! record, says that it has no more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, StreamConsumer};

use super::Ctx;
use super::resume::QUIET;

/// How long the broker has to answer.
const ANSWER: Duration = Duration::from_secs(2);

/// Asks the broker where each owned partition ends that gave no record for [`QUIET`]
/// and was not asked since its last record.
pub(super) async fn check(c: &Arc<StreamConsumer<Ctx>>) {
    let quiet = c.context().offsets.lock().select(|w| {
        let read = w.read_at?;
        (w.next.is_some()
            && read.elapsed() >= QUIET
            && w.end.is_none_or(|(_, asked)| asked <= read))
        .then_some(())
    });
    for (topic, partition, generation, ()) in quiet {
        let asked = Instant::now();
        let c2 = c.clone();
        let t2 = topic.clone();
        let answer =
            tokio::task::spawn_blocking(move || c2.fetch_watermarks(&t2, partition, ANSWER)).await;
        match answer {
            Ok(Ok((_, high))) if high >= 0 => {
                let mut o = c.context().offsets.lock();
                if let Some(w) = o.parts.get_mut(&(topic.clone(), partition))
                    && w.generation == generation
                {
                    w.end = Some((high, asked));
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(pipeline = %c.context().pipeline, %topic, partition, error = %e, "cannot ask where the partition ends; it counts as behind until asked again");
            }
            Err(e) => {
                tracing::debug!(pipeline = %c.context().pipeline, %topic, partition, error = %e, "asking where the partition ends did not finish");
            }
        }
    }
}
