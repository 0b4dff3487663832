//! Compiling a pipeline's SQL, and running it batch by batch.

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::execution::context::{SQLOptions, SessionState};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use etlmesh_codec::{DecodedBatch, Reject, Stage};

use crate::diagnostics::plan_error;
use crate::input::{BatchSlot, SlotPartition};
use crate::{Engine, EngineError};

/// How a transform must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Every output row depends on one input row (projections and filters): it runs
    /// per batch, and a row it cannot evaluate is dead-lettered alone.
    RowWise,
    /// The SQL needs every row (aggregates, sorts, windows, limits, joins): it runs
    /// over the whole input as one stream.
    WholeInput,
}

/// A pipeline's SQL, planned against an input schema.
#[derive(Debug)]
pub struct Transform {
    pub(crate) pipeline: String,
    pub(crate) sql: String,
    pub(crate) input_schema: SchemaRef,
    output_schema: SchemaRef,
    kind: Kind,
    pub(crate) engine: Engine,
    /// The physical plan of the per-batch mode, copied for every batch (never run itself).
    pub(crate) row_plan: Arc<dyn ExecutionPlan>,
    state: SessionState,
}

/// What transforming one batch gave.
#[derive(Debug, Default)]
pub struct BatchResult {
    /// Output rows.
    pub batches: Vec<RecordBatch>,
    /// Input rows the SQL could not evaluate.
    pub rejects: Vec<Reject>,
    /// Input rows.
    pub rows_in: u64,
    /// Output rows.
    pub rows_out: u64,
}

impl BatchResult {
    /// Input rows the SQL filtered out.
    pub fn filtered(&self) -> u64 {
        self.rows_in
            .saturating_sub(self.rows_out)
            .saturating_sub(self.rejects.len() as u64)
    }
}

pub(crate) fn sql_options() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

impl Engine {
    pub(crate) fn session(&self, partitions: usize) -> SessionContext {
        let mut config = SessionConfig::new()
            .with_target_partitions(partitions.max(1))
            .with_batch_size(self.config.batch_size)
            .with_information_schema(false);
        // Skip the partial phase of an aggregation when it does not shrink the rows at
        // least tenfold: each partial table would hold most groups again.
        config
            .options_mut()
            .execution
            .skip_partial_aggregation_probe_ratio_threshold = 0.1;
        for (k, v) in &self.config.options {
            // Checked in Engine::new.
            let _ = config.options_mut().set(k, v);
        }
        config.options_mut().sql_parser.collect_spans = true;
        SessionContext::new_with_config_rt(config, self.runtime.clone())
    }

    /// Plans `sql` for pipeline `pipeline` over an `input` table of `input_schema`.
    /// Fails with the SQL position of the mistake when it does not plan.
    pub async fn compile(
        &self,
        pipeline: &str,
        sql: &str,
        input_schema: SchemaRef,
    ) -> Result<Transform, EngineError> {
        let ctx = self.session(1);
        let part: Arc<dyn PartitionStream> = Arc::new(SlotPartition {
            schema: input_schema.clone(),
        });
        let table = StreamingTable::try_new(input_schema.clone(), vec![part])
            .map_err(|e| plan_error(pipeline, sql, &input_schema, e))?;
        ctx.register_table("input", Arc::new(table))
            .map_err(|e| plan_error(pipeline, sql, &input_schema, e))?;
        let df = ctx
            .sql_with_options(sql, sql_options())
            .await
            .map_err(|e| plan_error(pipeline, sql, &input_schema, e))?;
        let state = ctx.state();
        let logical = df.logical_plan().clone();
        let optimized = state
            .optimize(&logical)
            .map_err(|e| plan_error(pipeline, sql, &input_schema, e))?;
        let kind = classify(&optimized);
        let row_plan = state
            .create_physical_plan(&logical)
            .await
            .map_err(|e| plan_error(pipeline, sql, &input_schema, e))?;
        let output_schema = row_plan.schema();
        Ok(Transform {
            pipeline: pipeline.to_string(),
            sql: sql.to_string(),
            input_schema,
            output_schema,
            kind,
            engine: self.clone(),
            row_plan,
            state,
        })
    }
}

/// Row-wise when the plan is projections and filters over one scan of `input`.
fn classify(plan: &LogicalPlan) -> Kind {
    let mut row_wise = true;
    let mut scans = 0;
    let _ = plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            }
            LogicalPlan::TableScan(_) => scans += 1,
            _ => {
                row_wise = false;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if row_wise && scans == 1 {
        Kind::RowWise
    } else {
        Kind::WholeInput
    }
}

/// Errors that no single record explains: they fail the run instead of a record.
fn is_fatal(e: &DataFusionError) -> bool {
    matches!(
        e.find_root(),
        DataFusionError::ResourcesExhausted(_)
            | DataFusionError::IoError(_)
            | DataFusionError::ObjectStore(_)
            | DataFusionError::Internal(_)
            | DataFusionError::NotImplemented(_)
    )
}

/// A DataFusion error as one line, without backtraces.
pub(crate) fn message(e: &DataFusionError) -> String {
    e.find_root().strip_backtrace().replace('\n', " ")
}

impl Transform {
    /// The pipeline's name.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The SQL.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The schema of the table `input`.
    pub fn input_schema(&self) -> &SchemaRef {
        &self.input_schema
    }

    /// The schema of the rows the SQL produces.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Which mode the SQL needs.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    async fn run_once(&self, batch: RecordBatch) -> Result<Vec<RecordBatch>, DataFusionError> {
        let slot = Arc::new(BatchSlot(Mutex::new(Some(batch))));
        let config = self.state.config().clone().with_extension(slot);
        let task = Arc::new(TaskContext::from(&self.state).with_session_config(config));
        // A copy of the plan with empty metrics: each execution of a plan adds its own
        // metrics to the plan's nodes, so a plan run for every request grows without
        // end (5 KB a request, seen as a worker at 800 MB after 150,000 requests).
        let plan = reset_plan_states(self.row_plan.clone())?;
        collect(plan, task).await
    }

    /// Transforms one batch (per-batch mode). Rows the SQL cannot evaluate are
    /// isolated by bisection and returned as rejects; only errors that no row explains
    /// (out of memory, I/O) fail the call.
    ///
    /// For [`Kind::WholeInput`] SQL this gives the SQL's answer over this batch alone.
    pub async fn apply(&self, input: &DecodedBatch) -> Result<BatchResult, EngineError> {
        let rows = input.batch.num_rows();
        let mut out = BatchResult {
            rows_in: rows as u64,
            ..Default::default()
        };
        if rows == 0 {
            return Ok(out);
        }
        let mut pending = vec![(0usize, rows)];
        while let Some((offset, len)) = pending.pop() {
            match self.run_once(input.batch.slice(offset, len)).await {
                Ok(batches) => {
                    for b in batches.into_iter().filter(|b| b.num_rows() > 0) {
                        out.rows_out += b.num_rows() as u64;
                        out.batches.push(b);
                    }
                }
                Err(e) if is_fatal(&e) || self.kind == Kind::WholeInput => {
                    return Err(EngineError::Execution {
                        pipeline: self.pipeline.clone(),
                        message: message(&e),
                    });
                }
                Err(e) if len == 1 => {
                    out.rejects.push(input.provenance.reject(
                        &input.batch,
                        offset,
                        Stage::Transform,
                        message(&e),
                    ));
                }
                Err(_) => {
                    let half = len / 2;
                    pending.push((offset + half, len - half));
                    pending.push((offset, half));
                }
            }
        }
        Ok(out)
    }
}
