//! The PostgreSQL sink (tokio-postgres). Appends go through binary COPY; with a key
//! (the sink's `key`, or the pipeline's `dedup`) rows are copied into a temporary
//! table and merged with `INSERT … ON CONFLICT` — `DO UPDATE` for a key, `DO NOTHING`
//! for dedup — so a message delivered twice is loaded once. Each write is one
//! transaction: it commits whole or not at all.
//!
//! When the database is unreachable the write fails with [`SinkFailure::Retry`]: the
//! runner keeps the rows, acknowledges nothing and tries again with backoff, on a new
//! connection.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Array, Float32Array, Float64Array, Int32Array,
    Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int32Type, Int64Type, SchemaRef, TimeUnit,
};
use bytes::BytesMut;
use etlmesh_config::PostgresSinkSpec;
use futures::future::BoxFuture;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls};

use super::{RefusedRow, SinkFailure, StreamSink};

/// How each column is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Text,
    Bool,
    Int4,
    Int8,
    Float4,
    Float8,
    Date,
    Timestamptz,
}

impl Col {
    fn of(dt: &DataType) -> Option<(Col, DataType)> {
        Some(match dt {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                (Col::Text, DataType::Utf8)
            }
            DataType::Boolean => (Col::Bool, DataType::Boolean),
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::UInt8
            | DataType::UInt16 => (Col::Int4, DataType::Int32),
            DataType::Int64 | DataType::UInt32 | DataType::UInt64 => (Col::Int8, DataType::Int64),
            DataType::Float16 | DataType::Float32 => (Col::Float4, DataType::Float32),
            DataType::Float64 | DataType::Decimal128(..) | DataType::Decimal256(..) => {
                (Col::Float8, DataType::Float64)
            }
            DataType::Date32 | DataType::Date64 => (Col::Date, DataType::Date32),
            DataType::Timestamp(..) => (
                Col::Timestamptz,
                DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from("UTC"))),
            ),
            _ => return None,
        })
    }

    fn pg_type(self) -> Type {
        match self {
            Col::Text => Type::TEXT,
            Col::Bool => Type::BOOL,
            Col::Int4 => Type::INT4,
            Col::Int8 => Type::INT8,
            Col::Float4 => Type::FLOAT4,
            Col::Float8 => Type::FLOAT8,
            Col::Date => Type::DATE,
            Col::Timestamptz => Type::TIMESTAMPTZ,
        }
    }

    fn sql_name(self) -> &'static str {
        match self {
            Col::Text => "text",
            Col::Bool => "boolean",
            Col::Int4 => "integer",
            Col::Int8 => "bigint",
            Col::Float4 => "real",
            Col::Float8 => "double precision",
            Col::Date => "date",
            Col::Timestamptz => "timestamptz",
        }
    }
}

/// One value on its way to COPY.
#[derive(Debug)]
enum Cell<'a> {
    Null,
    Text(&'a str),
    Bool(bool),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    Date(chrono::NaiveDate),
    Timestamptz(chrono::DateTime<chrono::Utc>),
}

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Text(v) => v.to_sql(ty, out),
            Cell::Bool(v) => v.to_sql(ty, out),
            Cell::Int4(v) => v.to_sql(ty, out),
            Cell::Int8(v) => v.to_sql(ty, out),
            Cell::Float4(v) => v.to_sql(ty, out),
            Cell::Float8(v) => v.to_sql(ty, out),
            Cell::Date(v) => v.to_sql(ty, out),
            Cell::Timestamptz(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Rows into one table.
pub struct PostgresSink {
    spec: PostgresSinkSpec,
    columns: Vec<(String, Col, DataType)>,
    /// `DO UPDATE` on the sink's key, or `DO NOTHING` on the pipeline's dedup columns.
    conflict: Option<(Vec<String>, bool)>,
    plan: Plan,
    client: Option<Client>,
    prepared: bool,
    committed: u64,
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn quote_table(table: &str) -> String {
    table.split('.').map(quote).collect::<Vec<_>>().join(".")
}

impl PostgresSink {
    /// A sink for rows of `schema`.
    pub fn new(
        spec: PostgresSinkSpec,
        schema: &SchemaRef,
        dedup: &[String],
    ) -> Result<Self, String> {
        let mut columns = Vec::new();
        for f in schema.fields() {
            let (col, dt) = Col::of(f.data_type()).ok_or_else(|| {
                format!(
                    "sink postgres:{}: column `{}` is {}, which PostgreSQL cannot take; cast it in the SQL",
                    spec.table,
                    f.name(),
                    f.data_type()
                )
            })?;
            columns.push((f.name().clone(), col, dt));
        }
        let has = |cols: &[String]| cols.iter().all(|c| columns.iter().any(|(n, ..)| n == c));
        let conflict = if !spec.key.is_empty() {
            if !has(&spec.key) {
                return Err(format!(
                    "sink postgres:{}: key {:?} names columns the SQL does not produce",
                    spec.table, spec.key
                ));
            }
            Some((spec.key.clone(), true))
        } else if !dedup.is_empty() && has(dedup) {
            Some((dedup.to_vec(), false))
        } else {
            None
        };
        let mut sink = Self {
            spec,
            columns,
            conflict,
            plan: Plan {
                copy: String::new(),
                merge: None,
                types: Vec::new(),
                cols: Vec::new(),
            },
            client: None,
            prepared: false,
            committed: 0,
        };
        let merge = sink.merge_sql("etlmesh_stage");
        let target = if merge.is_some() {
            "etlmesh_stage".to_string()
        } else {
            sink.table()
        };
        sink.plan = Plan {
            copy: format!(
                "COPY {target} ({}) FROM STDIN (FORMAT binary)",
                sink.column_list()
            ),
            merge,
            types: sink.columns.iter().map(|(_, c, _)| c.pg_type()).collect(),
            cols: sink.columns.iter().map(|(_, c, _)| *c).collect(),
        };
        Ok(sink)
    }

    /// For final rows (a closed window's): a key loaded once keeps its first row
    /// (`DO NOTHING`). A partition that moved to another worker mid-window is read
    /// again from its commit, and a window already loaded may then be seen in part;
    /// that part must not replace the whole.
    pub fn keep_first(mut self) -> Self {
        if let Some((_, update)) = &mut self.conflict {
            *update = false;
        }
        self.plan.merge = self.merge_sql("etlmesh_stage");
        self
    }

    fn table(&self) -> String {
        quote_table(&self.spec.table)
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(n, ..)| quote(n))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn create_sql(&self) -> String {
        let mut cols: Vec<String> = self
            .columns
            .iter()
            .map(|(n, c, _)| format!("{} {}", quote(n), c.sql_name()))
            .collect();
        if let Some((key, update)) = &self.conflict {
            let list = key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
            cols.push(if *update {
                format!("PRIMARY KEY ({list})")
            } else {
                format!("UNIQUE ({list})")
            });
        }
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            self.table(),
            cols.join(", ")
        )
    }

    fn merge_sql(&self, stage: &str) -> Option<String> {
        let (key, update) = self.conflict.as_ref()?;
        let cols = self.column_list();
        let keys = key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
        let action = if *update {
            let sets: Vec<String> = self
                .columns
                .iter()
                .filter(|(n, ..)| !key.contains(n))
                .map(|(n, ..)| format!("{0} = EXCLUDED.{0}", quote(n)))
                .collect();
            if sets.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", sets.join(", "))
            }
        } else {
            "DO NOTHING".to_string()
        };
        // The newest row of a key wins inside one write.
        Some(format!(
            "INSERT INTO {} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM {stage} ORDER BY {keys}, ctid DESC ON CONFLICT ({keys}) {action}",
            self.table()
        ))
    }

    /// An error that is not about particular rows: the connection is dropped when it
    /// was the connection's, and the table set up again before the next try (it may
    /// have been dropped; with `create: true` it comes back).
    fn failure(&mut self, e: &tokio_postgres::Error) -> SinkFailure {
        let msg = format!("postgres:{}: {}", self.spec.table, db_message(e));
        if e.code().is_none() {
            self.client = None;
        }
        self.prepared = false;
        SinkFailure::Retry(msg)
    }

    async fn connect(&mut self) -> Result<(), SinkFailure> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        let (client, conn) = tokio_postgres::connect(&self.spec.url, NoTls)
            .await
            .map_err(|e| {
                SinkFailure::Retry(format!(
                    "postgres:{}: cannot connect: {}",
                    self.spec.table,
                    db_message(&e)
                ))
            })?;
        let table = self.spec.table.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(table, error = %e, "PostgreSQL connection ended");
            }
        });
        self.client = Some(client);
        self.prepared = false;
        Ok(())
    }

    async fn prepare(&mut self) -> Result<(), SinkFailure> {
        if self.prepared {
            return Ok(());
        }
        let mut sql = String::new();
        if self.spec.create {
            // Workers starting together would race on CREATE TABLE IF NOT EXISTS (it is
            // not atomic in PostgreSQL): one creates, the others wait and see it.
            sql.push_str(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(hashtext({})); {}; COMMIT;",
                literal(&format!("etlmesh:{}", self.spec.table)),
                self.create_sql()
            ));
        }
        if self.conflict.is_some() {
            sql.push_str(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS etlmesh_stage (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;",
                self.table()
            ));
        }
        if !sql.is_empty() {
            let Some(client) = self.client.as_ref() else {
                return Err(SinkFailure::Retry("postgres: not connected".into()));
            };
            if let Err(e) = client.batch_execute(&sql).await {
                return Err(self.failure(&e));
            }
        }
        self.prepared = true;
        Ok(())
    }

    /// Loads the rows in one transaction. When PostgreSQL refuses some of them (a
    /// data exception or a constraint, SQLSTATE class 22 or 23), the transaction is
    /// done again with the rows bisected under savepoints: the refused rows are found
    /// and returned with PostgreSQL's message, and every other row commits. Any other
    /// error is an outage ([`SinkFailure::Retry`]).
    async fn load(&mut self, batches: &[RecordBatch]) -> Result<Vec<RefusedRow>, SinkFailure> {
        self.connect().await?;
        self.prepare().await?;
        let mut refused = Vec::new();
        let mut casted: Vec<(usize, Vec<ArrayRef>)> = Vec::with_capacity(batches.len());
        for (bi, b) in batches.iter().enumerate() {
            let cols: Result<Vec<ArrayRef>, _> = self
                .columns
                .iter()
                .enumerate()
                .map(|(i, (_, _, dt))| cast(b.column(i), dt))
                .collect();
            match cols {
                Ok(cols) => casted.push((bi, cols)),
                Err(e) => refused.extend((0..b.num_rows()).map(|row| RefusedRow {
                    batch: bi,
                    row,
                    reason: format!("postgres:{}: {e}", self.spec.table),
                })),
            }
        }
        let rows: Vec<(usize, usize)> = casted
            .iter()
            .enumerate()
            .flat_map(|(ci, (_, cols))| {
                (0..cols.first().map_or(0, |a| a.len())).map(move |r| (ci, r))
            })
            .collect();
        if rows.is_empty() {
            return Ok(refused);
        }
        let Some(client) = self.client.as_mut() else {
            return Err(SinkFailure::Retry("postgres: not connected".into()));
        };
        let plan = &self.plan;
        let whole = async {
            let tx = client.transaction().await?;
            copy_rows(&tx, plan, &casted, &rows, false).await?;
            tx.commit().await
        }
        .await;
        let first = match whole {
            Ok(()) => return Ok(refused),
            Err(e) if refuses_rows(&e) => e,
            Err(e) => return Err(self.failure(&e)),
        };
        tracing::debug!(table = %self.spec.table, rows = rows.len(), error = %db_message(&first), "PostgreSQL refused rows: bisecting the write");
        let bisected = bisect(client, plan, &casted, &rows).await;
        match bisected {
            Ok(found) => {
                refused.extend(found.into_iter().map(|((ci, row), e)| RefusedRow {
                    batch: casted[ci].0,
                    row,
                    reason: format!("postgres:{}: {e}", self.spec.table),
                }));
                Ok(refused)
            }
            Err(e) => Err(self.failure(&e)),
        }
    }
}

/// The statements of one sink's writes.
struct Plan {
    /// `COPY … FROM STDIN (FORMAT binary)` into the table or the stage.
    copy: String,
    /// The merge from the stage into the table (keys and dedup).
    merge: Option<String>,
    types: Vec<Type>,
    cols: Vec<Col>,
}

/// Whether PostgreSQL refused the rows themselves — a data exception (class 22) or an
/// integrity constraint (class 23) — rather than the write: those rows will not go in
/// however often they are sent. `22P03` (binary data in the wrong format) means the
/// table's column types differ from the rows': every row would fail, so it is an
/// outage to fix, not bad rows.
fn refuses_rows(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let c = c.code();
        c != "22P03" && (c.starts_with("22") || c.starts_with("23"))
    })
}

/// COPYs `rows` (index into `casted`, row) and merges them when the sink has a key.
async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    plan: &Plan,
    casted: &[(usize, Vec<ArrayRef>)],
    rows: &[(usize, usize)],
    clear_stage: bool,
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(&plan.copy).await?;
    let writer = BinaryCopyInWriter::new(sink, &plan.types);
    let mut writer = std::pin::pin!(writer);
    let mut row: Vec<Cell<'_>> = Vec::with_capacity(plan.cols.len());
    for &(ci, r) in rows {
        row.clear();
        for (a, c) in casted[ci].1.iter().zip(&plan.cols) {
            row.push(cell(a.as_ref(), *c, r));
        }
        let refs: Vec<&(dyn ToSql + Sync)> = row.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        writer.as_mut().write(&refs).await?;
    }
    writer.finish().await?;
    if let Some(m) = &plan.merge {
        tx.execute(m.as_str(), &[]).await?;
        if clear_stage {
            tx.execute("DELETE FROM etlmesh_stage", &[]).await?;
        }
    }
    Ok(())
}

/// Finds the rows PostgreSQL refuses: halves of the write under savepoints of one
/// transaction, down to single rows, so that what goes in commits once and together.
/// A write with k bad rows of n costs about 2·k·log2(n) statements.
async fn bisect(
    client: &mut Client,
    plan: &Plan,
    casted: &[(usize, Vec<ArrayRef>)],
    rows: &[(usize, usize)],
) -> Result<Vec<((usize, usize), String)>, tokio_postgres::Error> {
    let mut tx = client.transaction().await?;
    let mut refused = Vec::new();
    let mut ranges = vec![(0, rows.len())];
    while let Some((lo, hi)) = ranges.pop() {
        let sp = tx.savepoint("etlmesh_rows").await?;
        match copy_rows(&sp, plan, casted, &rows[lo..hi], true).await {
            Ok(()) => sp.commit().await?,
            Err(e) if refuses_rows(&e) => {
                sp.rollback().await?;
                if hi - lo == 1 {
                    refused.push((rows[lo], db_message(&e)));
                } else {
                    let mid = lo + (hi - lo) / 2;
                    ranges.push((mid, hi));
                    ranges.push((lo, mid));
                }
            }
            Err(e) => return Err(e),
        }
    }
    tx.commit().await?;
    Ok(refused)
}

fn cell(a: &dyn Array, c: Col, r: usize) -> Cell<'_> {
    if a.is_null(r) {
        return Cell::Null;
    }
    match c {
        Col::Text => a
            .as_any()
            .downcast_ref::<StringArray>()
            .map_or(Cell::Null, |s| Cell::Text(s.value(r))),
        Col::Bool => a
            .as_any()
            .downcast_ref::<BooleanArray>()
            .map_or(Cell::Null, |s| Cell::Bool(s.value(r))),
        Col::Int4 => a
            .as_primitive_opt::<Int32Type>()
            .map_or(Cell::Null, |s: &Int32Array| Cell::Int4(s.value(r))),
        Col::Int8 => a
            .as_primitive_opt::<Int64Type>()
            .map_or(Cell::Null, |s: &Int64Array| Cell::Int8(s.value(r))),
        Col::Float4 => a
            .as_primitive_opt::<Float32Type>()
            .map_or(Cell::Null, |s: &Float32Array| Cell::Float4(s.value(r))),
        Col::Float8 => a
            .as_primitive_opt::<Float64Type>()
            .map_or(Cell::Null, |s: &Float64Array| Cell::Float8(s.value(r))),
        Col::Date => a
            .as_any()
            .downcast_ref::<Date32Array>()
            .and_then(|s| s.value_as_date(r))
            .map_or(Cell::Null, Cell::Date),
        Col::Timestamptz => a
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .and_then(|s| chrono::DateTime::from_timestamp_micros(s.value(r)))
            .map_or(Cell::Null, Cell::Timestamptz),
    }
}

/// The database's own message when there is one (tokio-postgres says only "db error").
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{} ({})", db.message(), db.code().code());
            if let Some(h) = db.hint() {
                m.push_str(&format!("; hint: {h}"));
            }
            if db.code().code() == "42P01" {
                m.push_str("; create the table, or set `create: true` on the sink");
            }
            m
        }
        None => e.to_string(),
    }
}

impl StreamSink for PostgresSink {
    fn describe(&self) -> String {
        format!("postgres:{}", self.spec.table)
    }

    fn write<'a>(
        &'a mut self,
        batches: &'a [RecordBatch],
        write: u64,
    ) -> BoxFuture<'a, Result<Vec<RefusedRow>, SinkFailure>> {
        Box::pin(async move {
            let refused = if batches.iter().any(|b| b.num_rows() > 0) {
                self.load(batches).await?
            } else {
                Vec::new()
            };
            self.committed = write;
            Ok(refused)
        })
    }

    fn committed(&self) -> u64 {
        self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn sql_for_keys_and_dedup() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("seq", DataType::Int64, false),
            Field::new("t", DataType::Float64, true),
        ]));
        let spec = PostgresSinkSpec {
            url: "postgres://x".into(),
            table: "iot.readings".into(),
            create: true,
            key: vec![],
        };
        let s = PostgresSink::new(spec.clone(), &schema, &["device_id".into(), "seq".into()])
            .expect("sink");
        assert_eq!(
            s.create_sql(),
            "CREATE TABLE IF NOT EXISTS \"iot\".\"readings\" (\"device_id\" text, \"seq\" bigint, \"t\" double precision, UNIQUE (\"device_id\", \"seq\"))"
        );
        assert!(
            s.merge_sql("st")
                .expect("merge")
                .ends_with("ON CONFLICT (\"device_id\", \"seq\") DO NOTHING")
        );
        let keyed = PostgresSink::new(
            PostgresSinkSpec {
                key: vec!["device_id".into()],
                ..spec.clone()
            },
            &schema,
            &[],
        )
        .expect("sink");
        assert!(
            keyed
                .merge_sql("st")
                .expect("merge")
                .contains("DO UPDATE SET \"seq\" = EXCLUDED.\"seq\"")
        );
        let plain = PostgresSink::new(spec.clone(), &schema, &[]).expect("sink");
        let windowed = PostgresSink::new(
            PostgresSinkSpec {
                key: vec!["device_id".into()],
                ..spec.clone()
            },
            &schema,
            &[],
        )
        .expect("sink")
        .keep_first();
        assert!(
            windowed
                .plan
                .merge
                .as_deref()
                .is_some_and(|m| m.ends_with("ON CONFLICT (\"device_id\") DO NOTHING")),
            "{:?}",
            windowed.plan.merge
        );
        assert!(plain.merge_sql("st").is_none());
        assert!(
            PostgresSink::new(
                PostgresSinkSpec {
                    key: vec!["nope".into()],
                    ..spec
                },
                &schema,
                &[]
            )
            .is_err()
        );
    }
}
