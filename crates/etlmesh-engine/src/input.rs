//! The table `input` that a transform's SQL reads, as DataFusion partition streams:
//! one that yields the batch handed to a single execution (per-batch mode), and one
//! that pulls from a channel shared by all partitions (whole-input mode).

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use futures::StreamExt;
use tokio::sync::mpsc;

/// The batch for one execution, carried in its task context.
#[derive(Debug, Default)]
pub(crate) struct BatchSlot(pub Mutex<Option<RecordBatch>>);

/// Yields the batch in the task context's [`BatchSlot`].
#[derive(Debug)]
pub(crate) struct SlotPartition {
    pub schema: SchemaRef,
}

impl PartitionStream for SlotPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = ctx
            .session_config()
            .get_extension::<BatchSlot>()
            .and_then(|slot| slot.0.lock().ok().and_then(|mut b| b.take()));
        let item: Result<RecordBatch, DataFusionError> = batch
            .ok_or_else(|| DataFusionError::Internal("no input batch for this execution".into()));
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter([item]),
        ))
    }
}

/// Pulls batches from a channel that every partition shares, so that whichever
/// partition is free takes the next batch.
#[derive(Debug)]
pub(crate) struct ChannelPartition {
    pub schema: SchemaRef,
    pub rx: Arc<tokio::sync::Mutex<mpsc::Receiver<RecordBatch>>>,
}

impl PartitionStream for ChannelPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let rx = self.rx.clone();
        let stream = futures::stream::unfold(rx, |rx| async move {
            let next = rx.lock().await.recv().await;
            next.map(|b| (Ok(b), rx))
        });
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream.boxed(),
        ))
    }
}
