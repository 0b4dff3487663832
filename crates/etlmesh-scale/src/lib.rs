//! Elastic scaling.
//!
//! - [`policy::Autoscaler`] decides, from the load of a pipeline's workers, how many it
//!   should have: ceil(in-flight / target) with a 10 % tolerance, up at once, panic
//!   mode when the load is twice the capacity over 6 s, down only after the
//!   stabilization window, to zero after the idle period. Every decision has a reason.
//! - [`Scaler`] carries a decision out: [`process::ProcessScaler`] runs workers as
//!   local child processes (and restarts crashed ones); the Kubernetes scaler sets a
//!   Deployment's replicas.
//! - [`Rollouts`] replaces a pool's workers after a reload of the pipeline file (the
//!   process scaler can; on Kubernetes a new ConfigMap rolls the Deployment).

pub mod kubernetes;
pub mod policy;
pub mod process;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

pub use policy::{Autoscaler, Decision, Observation};

/// Errors of scalers.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// The scaler could not be set up.
    #[error("scaler {scaler}: {message}")]
    Connect {
        /// The scaler.
        scaler: &'static str,
        /// What went wrong and what to do.
        message: String,
    },
    /// The scaler could not act.
    #[error("scaler {scaler}: cannot scale `{pool}` to {replicas}: {message}")]
    Failed {
        /// The scaler.
        scaler: &'static str,
        /// The pipeline's pool.
        pool: String,
        /// The replicas asked for.
        replicas: u32,
        /// Why.
        message: String,
    },
    /// The scaler could not say how many workers a pool runs.
    #[error("scaler {scaler}: cannot read how many workers `{pool}` runs: {message}")]
    Read {
        /// The scaler.
        scaler: &'static str,
        /// The pipeline's pool.
        pool: String,
        /// Why, and what to do.
        message: String,
    },
}

/// A boxed future, for the object-safe [`Scaler`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that runs a pipeline's workers and can change how many there are.
pub trait Scaler: Send + Sync {
    /// Its name, for logs and metrics (`process`, `kubernetes`).
    fn name(&self) -> &'static str;
    /// Runs `replicas` workers for `pool` (one pipeline). Scaling down drains workers.
    fn set_replicas<'a>(
        &'a self,
        pool: &'a str,
        replicas: u32,
    ) -> BoxFuture<'a, Result<(), ScaleError>>;
    /// How many workers `pool` runs now, when the scaler can tell: workers that outlive
    /// the control plane (pods) are adopted by a control plane that starts again, not
    /// scaled back to the minimum. `None` (the default): it runs none until told.
    fn running<'a>(&'a self, _pool: &'a str) -> BoxFuture<'a, Result<Option<u32>, ScaleError>> {
        Box::pin(async { Ok(None) })
    }
    /// Stops everything (draining workers) before the control plane exits.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
    /// How this scaler replaces workers when the pipeline file is reloaded, if it can.
    fn rollouts(&self) -> Option<&dyn Rollouts> {
        None
    }
}

/// Replacing a pool's workers with workers that read another pipeline file (a reload).
/// The caller watches the registry to learn when the new ones are ready.
pub trait Rollouts: Send + Sync {
    /// Workers of `pool` started from now on read `config`.
    fn use_config(&self, pool: &str, config: &Path);
    /// Starts as many workers as `pool` runs, beside them; the new workers' ids.
    fn start_beside(&self, pool: &str) -> Vec<String>;
    /// Ends a rollout: `keep_new` drains the old workers, otherwise the new ones.
    fn finish(&self, pool: &str, keep_new: bool);
    /// Restarts a worker in place with the pool's file: drained with SIGINT, it
    /// comes back under the same id (so with the same stream sessions). `false` when
    /// there is no such worker.
    fn restart(&self, pool: &str, id: &str) -> bool;
    /// The pool's running workers: id and process id.
    fn workers(&self, pool: &str) -> Vec<(String, Option<u32>)>;
}
