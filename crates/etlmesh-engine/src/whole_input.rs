//! Whole-input mode: the SQL reads every batch of a job as one streaming table with one
//! partition per thread, and DataFusion spills past the memory limit.

use std::future::Future;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, execute_stream_partitioned};
use tokio::sync::mpsc;

use crate::diagnostics::plan_error;
use crate::input::ChannelPartition;
use crate::transform::{message, sql_options};
use crate::{EngineError, Transform};

/// A running whole-input transform: take `input`, feed batches into it and drop it
/// at the end of the input, and drive every stream of `outputs` at the same time.
pub struct WholeInputRun {
    /// Where input batches go (bounded: sending waits while the engine is busy).
    pub input: Option<mpsc::Sender<RecordBatch>>,
    /// The output partitions.
    pub outputs: Vec<SendableRecordBatchStream>,
    plan: Arc<dyn ExecutionPlan>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<RecordBatch>>>,
}

impl std::fmt::Debug for WholeInputRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WholeInputRun")
            .field("outputs", &self.outputs.len())
            .finish()
    }
}

impl Transform {
    /// Starts the SQL over a stream of batches (whole-input mode).
    pub async fn start_whole_input(&self) -> Result<WholeInputRun, EngineError> {
        let partitions = self.engine.config().partitions.max(1);
        let ctx = self.engine.session(partitions);
        let (tx, rx) = mpsc::channel(partitions * 2);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let parts: Vec<Arc<dyn PartitionStream>> = (0..partitions)
            .map(|_| {
                Arc::new(ChannelPartition {
                    schema: self.input_schema.clone(),
                    rx: rx.clone(),
                }) as _
            })
            .collect();
        let plan_err = |e| plan_error(&self.pipeline, &self.sql, &self.input_schema, e);
        let table = StreamingTable::try_new(self.input_schema.clone(), parts).map_err(plan_err)?;
        ctx.register_table("input", Arc::new(table))
            .map_err(plan_err)?;
        let df = ctx
            .sql_with_options(&self.sql, sql_options())
            .await
            .map_err(plan_err)?;
        let plan = df.create_physical_plan().await.map_err(plan_err)?;
        let outputs = execute_stream_partitioned(plan.clone(), ctx.task_ctx()).map_err(|e| {
            EngineError::Execution {
                pipeline: self.pipeline.clone(),
                message: message(&e),
            }
        })?;
        Ok(WholeInputRun {
            input: Some(tx),
            outputs,
            plan,
            rx,
        })
    }
}

impl Transform {
    /// Runs whole-input SQL over a handful of batches held in memory (a request's
    /// rows) and returns its output, with the rows that reached the SQL's state.
    pub async fn run_all(
        &self,
        batches: Vec<RecordBatch>,
    ) -> Result<(Vec<RecordBatch>, Option<u64>), EngineError> {
        use futures::StreamExt;
        let mut job = self.start_whole_input().await?;
        let input = job.input.take().ok_or_else(|| EngineError::Execution {
            pipeline: self.pipeline.clone(),
            message: "internal: the stream has no input".into(),
        })?;
        let feed = tokio::spawn(async move {
            for b in batches {
                if input.send(b).await.is_err() {
                    break;
                }
            }
        });
        let outputs = std::mem::take(&mut job.outputs);
        let drain = futures::future::try_join_all(outputs.into_iter().map(|mut s| async move {
            let mut out = Vec::new();
            while let Some(b) = s.next().await {
                out.push(b?);
            }
            Ok::<_, datafusion::error::DataFusionError>(out)
        }));
        let drained = drain.await;
        // A SQL that stopped early (a LIMIT) leaves the feeder waiting: release it.
        job.close_input().await;
        let _ = feed.await;
        let drained = drained.map_err(|e| crate::execution_error(&self.pipeline, &e))?;
        Ok((
            drained
                .into_iter()
                .flatten()
                .filter(|b| b.num_rows() > 0)
                .collect(),
            job.rows_into_state(),
        ))
    }
}

/// Operators that pass rows through one by one (or only move them).
const ROW_WISE: &[&str] = &[
    "ProjectionExec",
    "FilterExec",
    "CoalesceBatchesExec",
    "RepartitionExec",
    "CoalescePartitionsExec",
    "StreamingTableExec",
    "CooperativeExec",
];

impl WholeInputRun {
    /// Refuses further input: senders get an error. Call it once the outputs are
    /// drained, so that feeders blocked on a SQL that stopped reading (a LIMIT) are
    /// released.
    pub fn close_input(&self) -> impl Future<Output = ()> + Send + 'static {
        let rx = self.rx.clone();
        async move { rx.lock().await.close() }
    }

    /// After the job: how many input rows reached the first operator that needs all
    /// rows (an aggregate, a sort), that is, the rows the SQL did not filter out.
    pub fn rows_into_state(&self) -> Option<u64> {
        first_stateful_input_rows(&self.plan)
    }

    /// The physical plan, with metrics, for logs.
    pub fn plan_display(&self) -> String {
        datafusion::physical_plan::displayable(self.plan.as_ref())
            .indent(true)
            .to_string()
    }

    /// Bytes spilled to disk so far.
    pub fn spilled_bytes(&self) -> usize {
        fn walk(p: &Arc<dyn ExecutionPlan>) -> usize {
            let own = p.metrics().and_then(|m| m.spilled_bytes()).unwrap_or(0);
            own + p.children().into_iter().map(walk).sum::<usize>()
        }
        walk(&self.plan)
    }
}

fn output_rows(p: &Arc<dyn ExecutionPlan>) -> Option<u64> {
    if let Some(n) = p.metrics().and_then(|m| m.output_rows()) {
        return Some(n as u64);
    }
    // Some operators do not count; look through them.
    let children = p.children();
    if ROW_WISE.contains(&p.name()) && children.len() == 1 {
        return output_rows(children[0]);
    }
    None
}

fn first_stateful_input_rows(p: &Arc<dyn ExecutionPlan>) -> Option<u64> {
    for child in p.children() {
        if let Some(n) = first_stateful_input_rows(child) {
            return Some(n);
        }
    }
    if ROW_WISE.contains(&p.name()) {
        return None;
    }
    p.children().into_iter().map(output_rows).sum()
}
