//! Replacing a changed pipeline's workers without a failed request or a lost record.
//!
//! - [`Way::Beside`]: as many new workers start beside the old ones; once every new
//!   one is ready (in the registry, so in every gateway's routes) the old ones drain
//!   (SIGTERM: they finish what they hold and leave); the rollout ends when they have
//!   left the ready set. If the new ones are not ready in time they are stopped and
//!   the old ones keep serving.
//! - [`Way::InPlace`], for stream pipelines (and those that must run on one worker at
//!   a time: windows without Kafka partitions, exactly once): one worker after the
//!   other drains with SIGINT, keeping its broker session, and starts again under the
//!   same id with the new file; the others take the stream meanwhile.

use std::time::{Duration, Instant};

use etlmesh_proto::WorkerState;
use etlmesh_scale::Rollouts;

use crate::Registry;

/// How long new workers may take to be ready.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long old workers may take to say they drain (a heartbeat or two).
const LEAVE_LIMIT: Duration = Duration::from_secs(10);
/// The draining of a worker restarted in place comes on top (the scaler's limit).
const DRAIN_LIMIT: Duration = Duration::from_secs(40);

/// How a pool's workers are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// New workers beside the old, then the old drain.
    Beside,
    /// One worker at a time, stopped and started again under its id.
    InPlace,
}

/// Replaces `pool`'s workers; what happened, or why the old ones still run.
pub(crate) async fn replace(
    rollouts: &dyn Rollouts,
    registry: &Registry,
    pool: &str,
    way: Way,
) -> Result<String, String> {
    match way {
        Way::Beside => beside(rollouts, registry, pool).await,
        Way::InPlace => in_place(rollouts, registry, pool).await,
    }
}

async fn beside(
    rollouts: &dyn Rollouts,
    registry: &Registry,
    pool: &str,
) -> Result<String, String> {
    let old: Vec<String> = rollouts
        .workers(pool)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let ids = rollouts.start_beside(pool);
    if ids.is_empty() {
        return Ok("no worker running: the next one starts with the new file".into());
    }
    tracing::info!(pipeline = %pool, workers = %ids.join(", "), "reload: new workers starting beside the old");
    let deadline = Instant::now() + READY_LIMIT;
    let wanted = |id: &String| (id.clone(), None);
    if !until_ready(
        registry,
        &ids.iter().map(wanted).collect::<Vec<_>>(),
        deadline,
    )
    .await
    {
        rollouts.finish(pool, false);
        return Err(format!(
            "the new workers ({}) were not ready within {READY_LIMIT:?}; they were stopped and the previous workers keep serving (see their log lines)",
            ids.join(", ")
        ));
    }
    rollouts.finish(pool, true);
    // Done when the old workers left the ready set: gateways send them nothing new.
    if !until_not_ready(registry, &old, Instant::now() + LEAVE_LIMIT).await {
        tracing::warn!(pipeline = %pool, workers = %old.join(", "), "reload: old workers still ready {LEAVE_LIMIT:?} after they were asked to drain");
    }
    Ok(format!(
        "{} new worker(s) ready ({}); the previous ones drain",
        ids.len(),
        ids.join(", ")
    ))
}

async fn in_place(
    rollouts: &dyn Rollouts,
    registry: &Registry,
    pool: &str,
) -> Result<String, String> {
    let workers = rollouts.workers(pool);
    if workers.is_empty() {
        return Ok("no worker running: the next one starts with the new file".into());
    }
    for (id, old_pid) in &workers {
        if !rollouts.restart(pool, id) {
            return Err(format!(
                "worker {id} is gone; the pool starts the next with the new file"
            ));
        }
        tracing::info!(pipeline = %pool, worker = %id, "reload: restarting the worker in place");
        let deadline = Instant::now() + DRAIN_LIMIT + READY_LIMIT;
        if !until_ready(registry, &[(id.clone(), *old_pid)], deadline).await {
            return Err(format!(
                "worker {id} was not ready again within {:?} after its restart with the new file (see its log lines)",
                DRAIN_LIMIT + READY_LIMIT
            ));
        }
    }
    Ok(format!("{} worker(s) restarted in place", workers.len()))
}

/// Waits until none of `ids` is ready (draining, or gone).
async fn until_not_ready(registry: &Registry, ids: &[String], deadline: Instant) -> bool {
    until(registry, deadline, 50, |workers| {
        !workers
            .iter()
            .any(|w| ids.contains(&w.id) && w.state == WorkerState::Ready)
    })
    .await
}

/// Waits until every worker is ready, each in a process other than the pid given.
async fn until_ready(
    registry: &Registry,
    wanted: &[(String, Option<u32>)],
    deadline: Instant,
) -> bool {
    until(registry, deadline, 100, |workers| {
        wanted.iter().all(|(id, old)| {
            workers
                .iter()
                .any(|w| &w.id == id && w.state == WorkerState::Ready && Some(w.pid) != *old)
        })
    })
    .await
}

/// Polls the registry's workers every `every_ms` until `holds`; `false` past `deadline`.
async fn until(
    registry: &Registry,
    deadline: Instant,
    every_ms: u64,
    holds: impl Fn(&[crate::registry::WorkerView]) -> bool,
) -> bool {
    loop {
        if holds(&registry.workers()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
}
