//! Engine tests: planning errors, per-batch isolation of bad rows, whole-input
//! aggregation with spilling.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use bytes::Bytes;
use etlmesh_codec::{DecodedBatch, Provenance, RecordSpan};
use futures::StreamExt;

use super::*;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("temperature_c", DataType::Float64, true),
        Field::new("raw", DataType::Utf8, true),
    ]))
}

fn batch(rows: &[(&str, f64, &str)]) -> DecodedBatch {
    let b = RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )) as ArrayRef,
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
        ],
    )
    .expect("batch");
    let spans: Vec<RecordSpan> = (0..rows.len())
        .map(|i| RecordSpan {
            start: i as u32,
            len: 1,
            line: i as u64 + 2,
        })
        .collect();
    DecodedBatch {
        batch: b,
        provenance: Provenance::Text {
            source: Arc::from("t.csv"),
            data: Bytes::from(vec![b'x'; rows.len()]),
            spans: Arc::from(spans),
            offset: 0,
        },
    }
}

fn engine() -> Engine {
    Engine::new(EngineConfig {
        memory_limit: 64 << 20,
        batch_size: 8192,
        ..Default::default()
    })
    .expect("engine")
}

#[tokio::test]
async fn row_wise_sql_filters_and_projects() {
    let t = engine()
        .compile(
            "p",
            "SELECT device_id, temperature_c * 9 / 5 + 32 AS f FROM input WHERE temperature_c > 0",
            schema(),
        )
        .await
        .expect("plans");
    assert_eq!(t.kind(), Kind::RowWise);
    let r = t
        .apply(&batch(&[
            ("a", 10.0, "1"),
            ("b", -5.0, "2"),
            ("c", 100.0, "3"),
        ]))
        .await
        .expect("runs");
    assert_eq!((r.rows_in, r.rows_out, r.filtered()), (3, 2, 1));
    assert_eq!(
        r.batches[0]
            .column(1)
            .as_primitive::<arrow::datatypes::Float64Type>()
            .value(1),
        212.0
    );
}

/// Metrics held by every node of a plan.
fn plan_metrics(plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>) -> usize {
    plan.metrics().map_or(0, |m| m.iter().count())
        + plan
            .children()
            .iter()
            .map(|c| plan_metrics(c))
            .sum::<usize>()
}

#[tokio::test]
async fn a_transform_run_many_times_keeps_nothing_per_run() {
    let t = engine()
        .compile(
            "p",
            "SELECT device_id, temperature_c * 9 / 5 + 32 AS f FROM input WHERE temperature_c > 0",
            schema(),
        )
        .await
        .expect("plans");
    let before = plan_metrics(&t.row_plan);
    for _ in 0..50 {
        let r = t
            .apply(&batch(&[("a", 10.0, "1"), ("b", -5.0, "2")]))
            .await
            .expect("runs");
        assert_eq!(r.rows_out, 1);
    }
    // DataFusion adds each execution's metrics to the nodes it ran: a plan executed
    // for every request grew by ~5 KB a request.
    assert_eq!(plan_metrics(&t.row_plan), before);
}

#[tokio::test]
async fn rows_the_sql_cannot_evaluate_are_rejected_alone() {
    let t = engine()
        .compile(
            "p",
            "SELECT device_id, CAST(raw AS INT) AS n FROM input",
            schema(),
        )
        .await
        .expect("plans");
    let rows: Vec<(&str, f64, &str)> = (0..100)
        .map(|i| ("d", 0.0, if i == 37 || i == 80 { "x" } else { "7" }))
        .collect();
    let r = t.apply(&batch(&rows)).await.expect("runs");
    assert_eq!(r.rows_out, 98);
    assert_eq!(r.rejects.len(), 2);
    assert_eq!(r.rejects[0].line, Some(39));
    assert_eq!(r.rejects[1].line, Some(82));
    assert!(
        r.rejects[0].reason.to_lowercase().contains("cast"),
        "{}",
        r.rejects[0].reason
    );
    assert_eq!(r.filtered(), 0);
}

#[tokio::test]
async fn planning_errors_point_into_the_sql() {
    let err = engine()
        .compile("p", "SELECT device_id,\n  temperatur FROM input", schema())
        .await
        .expect_err("unknown column");
    match err {
        EngineError::Plan { position, help, .. } => {
            let pos = position.expect("a position");
            assert_eq!((pos.line, pos.column), (2, 3));
            assert!(help.unwrap_or_default().contains("temperature_c"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = engine()
        .compile("p", "SELEC 1", schema())
        .await
        .expect_err("syntax");
    assert!(matches!(err, EngineError::Plan { .. }), "{err}");
    let err = engine()
        .compile("p", "CREATE TABLE x (a INT)", schema())
        .await
        .expect_err("ddl");
    assert!(matches!(err, EngineError::Plan { .. }), "{err}");
}

#[tokio::test]
async fn aggregates_are_whole_input() {
    let t = engine()
        .compile(
            "p",
            "SELECT device_id, count(*) AS n FROM input GROUP BY device_id",
            schema(),
        )
        .await
        .expect("plans");
    assert_eq!(t.kind(), Kind::WholeInput);
}

#[tokio::test]
async fn a_group_by_larger_than_memory_spills_and_completes() {
    let engine = Engine::new(EngineConfig {
        memory_limit: 24 << 20,
        batch_size: 8192,
        partitions: 2,
        ..Default::default()
    })
    .expect("engine");
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let t = engine
        .compile(
            "agg",
            "SELECT k, sum(v) AS s, count(*) AS n FROM input GROUP BY k",
            schema.clone(),
        )
        .await
        .expect("plans");
    let mut job = t.start_whole_input().await.expect("starts");
    let input = job.input.take().expect("input");
    let outputs = std::mem::take(&mut job.outputs);
    let keys: i64 = 1_500_000;
    let feeder = tokio::spawn(async move {
        for chunk in 0..(2 * keys / 50_000) {
            let ks: Vec<i64> = (0..50_000).map(|i| (chunk * 50_000 + i) % keys).collect();
            let b = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(ks.clone())) as ArrayRef,
                    Arc::new(Int64Array::from(ks)),
                ],
            )
            .expect("batch");
            if input.send(b).await.is_err() {
                break;
            }
        }
    });
    let mut groups = 0usize;
    let mut total = 0i64;
    let mut tasks = Vec::new();
    for mut s in outputs {
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            let mut sum = 0i64;
            while let Some(b) = s.next().await {
                let b = b.expect("no error: the aggregate spills instead");
                n += b.num_rows();
                sum += b
                    .column(2)
                    .as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| v.unwrap_or(0))
                    .sum::<i64>();
            }
            (n, sum)
        }));
    }
    feeder.await.expect("fed");
    for t in tasks {
        let (n, s) = t.await.expect("drained");
        groups += n;
        total += s;
    }
    assert_eq!(groups as i64, keys);
    assert_eq!(total, 2 * keys);
    assert!(
        job.spilled_bytes() > 0,
        "the aggregate should have spilled:\n{}",
        job.plan_display()
    );
    assert_eq!(job.rows_into_state(), Some(2 * keys as u64));
}
