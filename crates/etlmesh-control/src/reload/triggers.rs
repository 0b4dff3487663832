//! What starts a reload besides the API: SIGHUP, and (with `--watch-config`) a change
//! of the file's content, checked every second. A file caught half written is read
//! again once it has stopped changing.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{Reloader, Trigger};

/// How often the watched file is read.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// A changed file must stay the same this long before it is reloaded.
const SETTLE: Duration = Duration::from_millis(300);
/// A pipeline file larger than this is not a pipeline file.
const MAX_FILE: u64 = 16 << 20;

/// Starts the SIGHUP handler and, with `--watch-config`, the file watch.
pub(crate) fn spawn(reloader: Arc<Reloader>) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(on_hangup(reloader.clone()))];
    if reloader.watches() {
        tracing::info!(path = %reloader.path().display(), "watching the pipeline file: a change reloads it");
        tasks.push(tokio::spawn(watch_file(reloader)));
    }
    tasks
}

async fn on_hangup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP: reload with PUT /api/v1/pipelines instead");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!(path = %reloader.path().display(), "SIGHUP: reloading the pipeline file");
        reloader.reload(Trigger::Signal, None).await;
    }
}

async fn watch_file(reloader: Arc<Reloader>) {
    let path = reloader.path().to_path_buf();
    let mut seen = fingerprint(&path);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        if fingerprint(&path) != now {
            continue;
        }
        seen = now;
        if now.is_some() {
            tracing::info!(path = %path.display(), "the pipeline file changed: reloading it");
            reloader.reload(Trigger::Watch, None).await;
        }
    }
}

/// A hash of the file's content (`None`: unreadable, or too large to be one).
fn fingerprint(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > MAX_FILE {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}
