//! A PostgreSQL table as a DataFusion table: its columns from `information_schema`,
//! its rows streamed from a read-only transaction (projection and LIMIT pushed down;
//! DataFusion applies the filters).

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use futures::{StreamExt, pin_mut};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls, Row};

use crate::QueryError;

/// Rows per batch read from PostgreSQL.
const BATCH_ROWS: usize = 8192;

/// A PostgreSQL table, read-only.
#[derive(Debug)]
pub(crate) struct PgTable {
    url: String,
    table: String,
    schema: SchemaRef,
    /// Per column, the expression selected (`"c"`, or `"c"::text` for types read as text).
    select: Vec<String>,
}

/// A read-only session: every transaction of it is read-only, whatever it asks.
async fn connect(url: &str) -> Result<Client, String> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("the connection string does not parse: {e}"))?;
    config.options("-c default_transaction_read_only=on -c statement_timeout=300000");
    config.application_name("etlmesh-query");
    let (client, conn) = config
        .connect(NoTls)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection of a query ended");
        }
    });
    Ok(client)
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The Arrow type a PostgreSQL column is read as, and whether it is read as text.
fn arrow_type(pg: &str) -> (DataType, &'static str) {
    match pg {
        "boolean" => (DataType::Boolean, ""),
        "smallint" => (DataType::Int16, ""),
        "integer" => (DataType::Int32, ""),
        "bigint" => (DataType::Int64, ""),
        "real" => (DataType::Float32, ""),
        "double precision" => (DataType::Float64, ""),
        "numeric" => (DataType::Float64, "::double precision"),
        "text" | "character varying" | "character" | "name" => (DataType::Utf8, ""),
        "timestamp without time zone" => (DataType::Timestamp(TimeUnit::Microsecond, None), ""),
        "timestamp with time zone" => (
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            "",
        ),
        "date" => (DataType::Date32, ""),
        _ => (DataType::Utf8, "::text"),
    }
}

impl PgTable {
    /// The table's columns, read now; an error when it does not exist.
    pub(crate) async fn open(name: &str, url: &str, table: &str) -> Result<Self, QueryError> {
        let unavailable = |m: String| {
            QueryError::Unavailable(format!("dataset `{name}` (PostgreSQL table {table}): {m}"))
        };
        let client = connect(url).await.map_err(unavailable)?;
        let (schema_name, table_name) = match table.split_once('.') {
            Some((s, t)) => (Some(s.to_string()), t.to_string()),
            None => (None, table.to_string()),
        };
        let rows = client
            .query(
                "SELECT column_name, data_type, is_nullable = 'YES' FROM information_schema.columns \
                 WHERE table_schema = coalesce($1, current_schema()) AND table_name = $2 \
                 ORDER BY ordinal_position",
                &[&schema_name, &table_name],
            )
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if rows.is_empty() {
            return Err(QueryError::Invalid(format!(
                "dataset `{name}`: the PostgreSQL table {table} does not exist yet; it is created when its pipeline first loads rows"
            )));
        }
        let mut fields = Vec::with_capacity(rows.len());
        let mut select = Vec::with_capacity(rows.len());
        for r in rows {
            let column: String = r.get(0);
            let pg_type: String = r.get(1);
            let nullable: bool = r.get(2);
            let (dt, cast) = arrow_type(&pg_type);
            select.push(format!("{}{cast}", quote(&column)));
            fields.push(Field::new(column, dt, nullable));
        }
        Ok(Self {
            url: url.to_string(),
            table: table.split('.').map(quote).collect::<Vec<_>>().join("."),
            schema: Arc::new(Schema::new(fields)),
            select,
        })
    }
}

#[async_trait]
impl TableProvider for PgTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let columns: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&columns)?);
        let select = if columns.is_empty() {
            // count(*) and the like: rows, no columns.
            "NULL".to_string()
        } else {
            columns
                .iter()
                .map(|&i| self.select[i].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut sql = format!("SELECT {select} FROM {}", self.table);
        if let Some(n) = limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        let partition = Arc::new(PgScan {
            url: self.url.clone(),
            sql,
            schema: schema.clone(),
        });
        Ok(Arc::new(StreamingTableExec::try_new(
            schema,
            vec![partition],
            None,
            [],
            false,
            limit,
        )?))
    }
}

/// One SELECT, streamed as batches.
#[derive(Debug)]
struct PgScan {
    url: String,
    sql: String,
    schema: SchemaRef,
}

impl PartitionStream for PgScan {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (tx, rx) = mpsc::channel::<datafusion::error::Result<RecordBatch>>(2);
        let (url, sql, schema) = (self.url.clone(), self.sql.clone(), self.schema.clone());
        tokio::spawn(async move {
            if let Err(e) = read(&url, &sql, &schema, &tx).await {
                let _ = tx.send(Err(DataFusionError::External(e.into()))).await;
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

async fn read(
    url: &str,
    sql: &str,
    schema: &SchemaRef,
    tx: &mpsc::Sender<datafusion::error::Result<RecordBatch>>,
) -> Result<(), String> {
    let mut client = connect(url).await?;
    let txn = client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| e.to_string())?;
    let rows = txn
        .query_raw(sql, std::iter::empty::<i32>())
        .await
        .map_err(|e| format!("PostgreSQL: {e}"))?;
    pin_mut!(rows);
    let mut batch = Builders::new(schema);
    while let Some(row) = rows.next().await {
        let row = row.map_err(|e| format!("PostgreSQL: {e}"))?;
        batch.push(&row)?;
        if batch.rows == BATCH_ROWS && tx.send(batch.finish(schema)).await.is_err() {
            return Ok(()); // the query no longer wants rows
        }
    }
    if batch.rows > 0 {
        let _ = tx.send(batch.finish(schema)).await;
    }
    Ok(())
}

/// Column builders for one batch.
struct Builders {
    columns: Vec<Box<dyn ArrayBuilder>>,
    rows: usize,
}

impl Builders {
    fn new(schema: &SchemaRef) -> Self {
        let columns = schema
            .fields()
            .iter()
            .map(|f| -> Box<dyn ArrayBuilder> {
                match f.data_type() {
                    DataType::Boolean => Box::new(BooleanBuilder::new()),
                    DataType::Int16 => Box::new(Int16Builder::new()),
                    DataType::Int32 => Box::new(Int32Builder::new()),
                    DataType::Int64 => Box::new(Int64Builder::new()),
                    DataType::Float32 => Box::new(Float32Builder::new()),
                    DataType::Float64 => Box::new(Float64Builder::new()),
                    DataType::Date32 => Box::new(Date32Builder::new()),
                    DataType::Timestamp(_, tz) => {
                        Box::new(TimestampMicrosecondBuilder::new().with_timezone_opt(tz.clone()))
                    }
                    _ => Box::new(StringBuilder::new()),
                }
            })
            .collect();
        Self { columns, rows: 0 }
    }

    fn push(&mut self, row: &Row) -> Result<(), String> {
        for (i, b) in self.columns.iter_mut().enumerate() {
            let any = b.as_any_mut();
            let bad = |e: tokio_postgres::Error| format!("column {i}: {e}");
            if let Some(b) = any.downcast_mut::<BooleanBuilder>() {
                b.append_option(row.try_get::<_, Option<bool>>(i).map_err(bad)?);
            } else if let Some(b) = any.downcast_mut::<Int16Builder>() {
                b.append_option(row.try_get::<_, Option<i16>>(i).map_err(bad)?);
            } else if let Some(b) = any.downcast_mut::<Int32Builder>() {
                b.append_option(row.try_get::<_, Option<i32>>(i).map_err(bad)?);
            } else if let Some(b) = any.downcast_mut::<Int64Builder>() {
                b.append_option(row.try_get::<_, Option<i64>>(i).map_err(bad)?);
            } else if let Some(b) = any.downcast_mut::<Float32Builder>() {
                b.append_option(row.try_get::<_, Option<f32>>(i).map_err(bad)?);
            } else if let Some(b) = any.downcast_mut::<Float64Builder>() {
                b.append_option(row.try_get::<_, Option<f64>>(i).map_err(bad)?);
            } else if let Some(b) = any.downcast_mut::<Date32Builder>() {
                let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
                let v = row
                    .try_get::<_, Option<chrono::NaiveDate>>(i)
                    .map_err(bad)?;
                b.append_option(v.map(|d| (d - epoch).num_days() as i32));
            } else if let Some(b) = any.downcast_mut::<TimestampMicrosecondBuilder>() {
                // Both timestamp types: with a zone they decode as UTC instants.
                let v = match row.try_get::<_, Option<chrono::DateTime<chrono::Utc>>>(i) {
                    Ok(v) => v.map(|t| t.timestamp_micros()),
                    Err(_) => row
                        .try_get::<_, Option<chrono::NaiveDateTime>>(i)
                        .map_err(bad)?
                        .map(|t| t.and_utc().timestamp_micros()),
                };
                b.append_option(v);
            } else if let Some(b) = any.downcast_mut::<StringBuilder>() {
                b.append_option(row.try_get::<_, Option<&str>>(i).map_err(bad)?);
            }
        }
        self.rows += 1;
        Ok(())
    }

    fn finish(&mut self, schema: &SchemaRef) -> datafusion::error::Result<RecordBatch> {
        let rows = std::mem::take(&mut self.rows);
        let arrays: Vec<ArrayRef> = self.columns.iter_mut().map(|b| b.finish()).collect();
        let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
        Ok(RecordBatch::try_new_with_options(
            schema.clone(),
            arrays,
            &options,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_map_to_arrow() {
        assert_eq!(arrow_type("bigint"), (DataType::Int64, ""));
        assert_eq!(arrow_type("numeric").1, "::double precision");
        assert_eq!(arrow_type("jsonb"), (DataType::Utf8, "::text"));
        assert!(matches!(
            arrow_type("timestamp with time zone").0,
            DataType::Timestamp(TimeUnit::Microsecond, Some(_))
        ));
    }
}
