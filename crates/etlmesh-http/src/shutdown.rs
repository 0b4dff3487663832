//! Stopping in order. A [`Trigger`] fires once; every part of a process waits on a
//! clone of its [`Shutdown`]. [`Tasks`] holds a process's background tasks and ends
//! them in the reverse order of their start, so that none outlives what it uses
//! (mini-redis's `shutdown.rs` is the model).

use std::future::Future;

use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// Fires the shutdown (once; later calls do nothing).
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// The shutdown signal, as each waiter holds it.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and the signal it fires.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Tells every waiter to stop.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// Whether the trigger fired (or was dropped).
    pub fn is_fired(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Completes once the trigger fired, or was dropped without firing.
    pub async fn fired(mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

/// Background tasks, ended last-started first.
#[derive(Debug, Default)]
pub struct Tasks {
    tasks: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    name: &'static str,
    abort: AbortHandle,
    ended: JoinHandle<()>,
}

impl Tasks {
    /// Starts `task`, named for the log line that says it stopped.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.adopt(name, tokio::spawn(task));
    }

    /// Takes a task that was started elsewhere.
    pub fn adopt<T: Send + 'static>(&mut self, name: &'static str, task: JoinHandle<T>) {
        let abort = task.abort_handle();
        let ended = tokio::spawn(async move {
            let _ = task.await;
        });
        self.tasks.push(Held { name, abort, ended });
    }

    /// How many tasks it holds.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Ends every task, the last started first, each aborted and awaited.
    pub async fn stop(mut self) {
        while let Some(held) = self.tasks.pop() {
            held.abort.abort();
            let _ = held.ended.await;
            tracing::debug!(task = held.name, "stopped");
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for held in &self.tasks {
            held.abort.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_trigger_counts_as_fired() {
        let (trigger, shutdown) = channel();
        assert!(!shutdown.is_fired());
        drop(trigger);
        assert!(shutdown.is_fired());
        tokio::time::timeout(Duration::from_secs(1), shutdown.fired())
            .await
            .expect("a dropped trigger ends the wait");
    }

    #[tokio::test]
    async fn every_waiter_sees_one_fire() {
        let (trigger, shutdown) = channel();
        let waiters: Vec<_> = (0..3)
            .map(|_| tokio::spawn(shutdown.clone().fired()))
            .collect();
        trigger.fire();
        trigger.fire();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("each waiter wakes")
                .expect("no panic");
        }
    }

    /// Records the order in which its tasks were ended.
    struct Ended(&'static str, Arc<parking_lot::Mutex<Vec<&'static str>>>);

    impl Drop for Ended {
        fn drop(&mut self) {
            self.1.lock().push(self.0);
        }
    }

    #[tokio::test]
    async fn tasks_end_last_started_first() {
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = Tasks::default();
        for name in ["first", "second", "third"] {
            let guard = Ended(name, order.clone());
            tasks.spawn(name, async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
        }
        tokio::task::yield_now().await;
        assert_eq!(tasks.len(), 3);
        tasks.stop().await;
        assert_eq!(*order.lock(), ["third", "second", "first"]);
    }

    #[tokio::test]
    async fn dropped_tasks_are_aborted() {
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = Tasks::default();
        let guard = Ended("only", order.clone());
        tasks.spawn("only", async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        drop(tasks);
        for _ in 0..100 {
            if !order.lock().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*order.lock(), ["only"]);
    }
}
