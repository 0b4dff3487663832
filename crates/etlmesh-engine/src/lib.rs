//! The transform engine: a pipeline's SQL, run by Apache DataFusion over a table named
//! `input`.
//!
//! A [`Transform`] is compiled once per pipeline and input schema
//! ([`Engine::compile`]). It runs in one of two modes:
//!
//! - **per batch** ([`Transform::apply`]), for row-wise SQL (projections and filters):
//!   each batch is transformed on its own, which is what requests and streams need. A
//!   row the SQL cannot evaluate (a failed cast, a division by zero) is isolated by
//!   bisection and returned as a [`Reject`] with its origin; the other rows go on.
//! - **whole input** ([`Transform::start_whole_input`]), for SQL that needs to see every row
//!   (GROUP BY, ORDER BY, DISTINCT, window functions, LIMIT): batches are fed into one
//!   streaming table with one partition per thread; DataFusion spills to disk past the
//!   memory limit, so a GROUP BY over an input larger than memory still completes.
//!
//! [`Transform::kind`] tells which one the SQL needs.

mod diagnostics;
mod input;
mod transform;
mod whole_input;

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};

pub use datafusion::execution::SendableRecordBatchStream;
pub use diagnostics::SqlPosition;
pub use etlmesh_codec::{DecodedBatch, Reject};
pub use transform::{BatchResult, Kind, Transform};
pub use whole_input::WholeInputRun;

/// Errors at the engine's boundary.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The SQL does not parse or plan against the input schema.
    #[error("pipeline `{pipeline}`: the transform SQL does not plan: {message}")]
    Plan {
        /// The pipeline.
        pipeline: String,
        /// DataFusion's message.
        message: String,
        /// Where in the SQL, when known.
        position: Option<SqlPosition>,
        /// How to fix it.
        help: Option<String>,
    },
    /// Running the SQL failed for a reason that no single record explains.
    #[error("pipeline `{pipeline}`: the transform failed: {message}")]
    Execution {
        /// The pipeline.
        pipeline: String,
        /// What happened.
        message: String,
    },
    /// The engine could not be set up.
    #[error("the SQL engine could not start: {0}")]
    Setup(String),
}

/// An error met while running SQL, as an [`EngineError`] naming the pipeline.
pub fn execution_error(pipeline: &str, e: &datafusion::error::DataFusionError) -> EngineError {
    EngineError::Execution {
        pipeline: pipeline.to_string(),
        message: transform::message(e),
    }
}

/// Settings shared by every transform.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Memory the engine may hold before it spills.
    pub memory_limit: u64,
    /// Where it spills (the system temporary directory when `None`).
    pub spill_dir: Option<PathBuf>,
    /// Partitions for whole-input SQL (one per thread).
    pub partitions: usize,
    /// Rows per batch.
    pub batch_size: usize,
    /// DataFusion settings (`datafusion.execution.…`) set on every session.
    pub options: Vec<(String, String)>,
}

impl EngineConfig {
    /// The engine a pipeline file's `platform` asks for, with `partitions` for
    /// whole-input SQL (1 for per-batch transforms, the threads for a batch job).
    pub fn for_platform(platform: &etlmesh_config::Platform, partitions: usize) -> Self {
        Self {
            memory_limit: platform.memory_limit,
            spill_dir: platform.spill_dir.clone(),
            partitions: partitions.max(1),
            batch_size: platform.batch_size,
            options: platform.sql_options.clone(),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            memory_limit: 1 << 30,
            spill_dir: None,
            partitions: 2,
            batch_size: 65_536,
            options: Vec::new(),
        }
    }
}

/// The runtime (memory pool, spill directory) shared by the transforms of a process.
#[derive(Debug, Clone)]
pub struct Engine {
    runtime: Arc<RuntimeEnv>,
    config: EngineConfig,
}

impl Engine {
    /// Creates the runtime.
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        let mode = match &config.spill_dir {
            Some(dir) => DiskManagerMode::Directories(vec![dir.clone()]),
            None => DiskManagerMode::OsTmpDirectory,
        };
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(config.memory_limit as usize)))
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(mode))
            .build_arc()
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        let mut probe = datafusion::prelude::SessionConfig::new();
        for (k, v) in &config.options {
            probe.options_mut().set(k, v).map_err(|e| {
                EngineError::Setup(format!(
                    "platform.sql_options: `{k}: {v}` is not a DataFusion setting: {}",
                    transform::message(&e)
                ))
            })?;
        }
        Ok(Self { runtime, config })
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Bytes the engine holds right now.
    pub fn memory_used(&self) -> usize {
        self.runtime.memory_pool.reserved()
    }
}

#[cfg(test)]
mod tests;
