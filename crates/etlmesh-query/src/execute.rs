//! Running one query: admission (a bounded number at once), a fresh session over the
//! datasets it names, the time limit, and the answer's caps.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::config::Dialect;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use etlmesh_config::QuerySpec;
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::catalog::{Catalog, Dataset, DatasetSource};
use crate::{QueryError, guard, message, postgres};

/// One query.
#[derive(Debug, Clone)]
pub struct QueryRequest {
    /// The SQL.
    pub sql: String,
    /// Rows at most (the service's cap when larger or absent).
    pub max_rows: Option<usize>,
    /// Time at most (the service's limit when longer or absent).
    pub timeout: Option<Duration>,
    /// The pipelines whose datasets it may read (`*`: all); `None`: all.
    pub pipelines: Option<Vec<String>>,
}

/// A query's answer.
#[derive(Debug)]
pub struct Answer {
    /// Its columns.
    pub schema: SchemaRef,
    /// Its rows.
    pub batches: Vec<RecordBatch>,
    /// How many rows.
    pub rows: usize,
    /// More rows were there, past the row or byte cap.
    pub truncated: bool,
    /// How long it ran.
    pub elapsed: Duration,
    /// The datasets it read.
    pub datasets: Vec<String>,
}

/// The analytics service.
pub struct Analytics {
    catalog: Arc<Catalog>,
    spec: QuerySpec,
    handle: tokio::runtime::Handle,
    running: Arc<Semaphore>,
    admitted: Arc<AtomicUsize>,
    /// Dropped with the service: the runtime's thread then shuts it down.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics")
            .field("datasets", &self.catalog.names())
            .field("spec", &self.spec)
            .finish()
    }
}

/// Decrements the admitted count when a query leaves.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Aborts a spawned query when its caller goes away (a client that disconnected).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Analytics {
    /// The service over `catalog`, with its own runtime of `spec.concurrency` threads.
    pub fn new(catalog: Catalog, spec: QuerySpec) -> Result<Self, QueryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(spec.concurrency.clamp(1, 8))
            .thread_name("etlmesh-query")
            .enable_all()
            .build()
            .map_err(|e| QueryError::Failed(format!("cannot start the query runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("etlmesh-query-rt".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| QueryError::Failed(format!("cannot start the query runtime: {e}")))?;
        Ok(Self {
            catalog: Arc::new(catalog),
            running: Arc::new(Semaphore::new(spec.concurrency)),
            admitted: Arc::new(AtomicUsize::new(0)),
            spec,
            handle,
            _stop: stop,
        })
    }

    /// The datasets.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Runs one query within the limits.
    pub async fn run(&self, request: QueryRequest) -> Result<Answer, QueryError> {
        let waiting = self.admitted.fetch_add(1, Ordering::AcqRel);
        let _admitted = Admitted(self.admitted.clone());
        if waiting >= 2 * self.spec.concurrency {
            return Err(QueryError::Busy(waiting));
        }
        let _permit = self
            .running
            .acquire()
            .await
            .map_err(|e| QueryError::Failed(e.to_string()))?;
        let limit = request
            .timeout
            .map_or(self.spec.timeout, |t| t.min(self.spec.timeout));
        let max_rows = request
            .max_rows
            .map_or(self.spec.max_rows, |m| m.min(self.spec.max_rows));
        let mut task = AbortOnDrop(self.handle.spawn(execute(
            self.catalog.clone(),
            self.spec.clone(),
            request.sql,
            max_rows,
            request.pipelines,
        )));
        match tokio::time::timeout(limit, &mut task.0).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => Err(QueryError::Failed(format!("the query stopped: {e}"))),
            Err(_) => Err(QueryError::Timeout(limit)),
        }
    }
}

/// A DataFusion error as the error a user can act on.
fn classify(e: DataFusionError, spec: &QuerySpec) -> QueryError {
    let root = e.find_root();
    match root {
        DataFusionError::ResourcesExhausted(m) => QueryError::Memory {
            limit: spec.memory_limit,
            message: m.clone(),
        },
        DataFusionError::SQL(..)
        | DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_) => QueryError::Invalid(message(&e)),
        DataFusionError::External(_)
        | DataFusionError::IoError(_)
        | DataFusionError::ParquetError(_)
        | DataFusionError::ObjectStore(_) => QueryError::Unavailable(message(&e)),
        _ => QueryError::Failed(message(&e)),
    }
}

/// One query, from its SQL to its capped answer: a session of its own, the datasets
/// it names (checked against the token's pipelines), the plan (checked against the
/// guard), then its rows up to the caps.
async fn execute(
    catalog: Arc<Catalog>,
    spec: QuerySpec,
    sql: String,
    max_rows: usize,
    pipelines: Option<Vec<String>>,
) -> Result<Answer, QueryError> {
    let start = Instant::now();
    let ctx = session(&spec)?;
    let state = ctx.state();
    let statement = state
        .sql_to_statement(&sql, &Dialect::Generic)
        .map_err(|e| QueryError::Invalid(format!("the SQL does not parse: {}", message(&e))))?;
    guard::check_statement(&statement)?;
    let datasets = register_named(&ctx, &statement, &catalog, &spec, pipelines.as_deref()).await?;
    let plan = state
        .statement_to_plan(statement)
        .await
        .map_err(|e| classify(e, &spec))?;
    guard::check_plan(&plan)?;
    let df = ctx
        .execute_logical_plan(plan)
        .await
        .map_err(|e| classify(e, &spec))?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let read = datasets.join(", ");
    let running = |e: DataFusionError| match classify(e, &spec) {
        QueryError::Unavailable(m) => {
            QueryError::Unavailable(format!("reading dataset {read}: {m}"))
        }
        other => other,
    };
    let stream = df.execute_stream().await.map_err(running)?;
    let capped = collect_capped(stream, max_rows, spec.max_result_bytes as usize, running).await?;
    Ok(Answer {
        schema,
        batches: capped.batches,
        rows: capped.rows,
        truncated: capped.truncated,
        elapsed: start.elapsed(),
        datasets,
    })
}

/// A session of the query's own: its memory pool, no spill to disk, and table
/// functions that may build at most a quarter of the pool.
fn session(spec: &QuerySpec) -> Result<SessionContext, QueryError> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(GreedyMemoryPool::new(spec.memory_limit as usize)))
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(|e| QueryError::Failed(message(&e)))?;
    let config = SessionConfig::new()
        .with_target_partitions(spec.concurrency.max(2))
        .with_parquet_pruning(true);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    crate::bounded::install(&ctx, (spec.memory_limit as usize / 4).max(1 << 20));
    Ok(ctx)
}

/// Registers each dataset the statement names (table functions read no file) and
/// returns their names; a name that is no dataset, or a dataset of a pipeline outside
/// `pipelines`, refuses the query.
async fn register_named(
    ctx: &SessionContext,
    statement: &datafusion::sql::parser::Statement,
    catalog: &Catalog,
    spec: &QuerySpec,
    pipelines: Option<&[String]>,
) -> Result<Vec<String>, QueryError> {
    let state = ctx.state();
    let references = state
        .resolve_table_references(statement)
        .map_err(|e| classify(e, spec))?;
    let mut datasets = Vec::new();
    for r in references {
        if r.schema().is_none() && state.table_functions().contains_key(r.table()) {
            continue; // generate_series, range: they read no file
        }
        let in_default_schema = matches!(r.schema(), None | Some("public"))
            && matches!(r.catalog(), None | Some("datafusion"));
        let dataset = in_default_schema
            .then(|| catalog.get(r.table()))
            .flatten()
            .ok_or_else(|| {
                QueryError::Invalid(format!(
                    "`{r}` is not a dataset; the datasets are: {} (GET /v1/datasets describes them)",
                    catalog.names()
                ))
            })?;
        if let Some(allowed) = pipelines
            && !allowed.iter().any(|p| p == "*" || *p == dataset.pipeline)
        {
            return Err(QueryError::Forbidden(format!(
                "dataset `{}` belongs to pipeline `{}`, which this token may not use",
                dataset.name, dataset.pipeline
            )));
        }
        if !datasets.contains(&dataset.name) {
            register(ctx, dataset, spec).await?;
            datasets.push(dataset.name.clone());
        }
    }
    Ok(datasets)
}

/// An answer's rows, cut at the caps.
struct Capped {
    batches: Vec<RecordBatch>,
    rows: usize,
    truncated: bool,
}

/// Reads `stream` until `max_rows` rows or about `max_bytes` bytes (by the mean row
/// size of the batch that crosses it), saying whether more were there.
async fn collect_capped(
    mut stream: datafusion::physical_plan::SendableRecordBatchStream,
    max_rows: usize,
    max_bytes: usize,
    running: impl Fn(DataFusionError) -> QueryError,
) -> Result<Capped, QueryError> {
    let mut out = Capped {
        batches: Vec::new(),
        rows: 0,
        truncated: false,
    };
    let mut bytes = 0usize;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(&running)?;
        if batch.num_rows() == 0 {
            continue;
        }
        if out.rows == max_rows {
            out.truncated = true;
            break;
        }
        let size: usize = batch
            .columns()
            .iter()
            .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
            .sum();
        let mut take = batch.num_rows().min(max_rows - out.rows);
        if bytes + size > max_bytes {
            // Keep the rows that fit, by their mean size.
            let per_row = size.div_ceil(batch.num_rows()).max(1);
            take = take.min(max_bytes.saturating_sub(bytes) / per_row);
        }
        if take < batch.num_rows() {
            out.truncated = true;
        }
        if take > 0 {
            bytes += size * take / batch.num_rows();
            out.rows += take;
            out.batches.push(batch.slice(0, take));
        }
        if take < batch.num_rows() {
            break;
        }
    }
    Ok(out)
}

async fn register(
    ctx: &SessionContext,
    dataset: &Dataset,
    spec: &QuerySpec,
) -> Result<(), QueryError> {
    let name = &dataset.name;
    match &dataset.source {
        DatasetSource::Parquet {
            path,
            partition_by,
            object,
        } => {
            // The schema of one file, so that planning opens no other file: a filter
            // on partition columns then reads only the directories it keeps.
            let (schema, url) = match object {
                Some(target) => crate::object::locate(ctx, target, name).await?,
                None => (first_parquet_schema(path), local_url(name, path)?),
            };
            let Some(schema) = schema else {
                return Err(QueryError::Invalid(format!(
                    "dataset `{name}` has no Parquet files in {} yet; its pipeline `{}` writes them (etlmesh run -c FILE --pipeline {} INPUTS)",
                    path.display(),
                    dataset.pipeline,
                    dataset.pipeline
                )));
            };
            let options = ParquetReadOptions::default()
                .schema(&schema)
                .table_partition_cols(
                    partition_by
                        .iter()
                        .map(|c| (c.clone(), DataType::Utf8))
                        .collect(),
                );
            ctx.register_parquet(name.as_str(), &url, options)
                .await
                .map_err(|e| match classify(e, spec) {
                    QueryError::Invalid(m) | QueryError::Failed(m) | QueryError::Unavailable(m) => {
                        QueryError::Unavailable(format!(
                            "dataset `{name}` ({}): {m}",
                            path.display()
                        ))
                    }
                    other => other,
                })?;
        }
        DatasetSource::Postgres { url, table } => {
            let provider = postgres::PgTable::open(name, url, table).await?;
            ctx.register_table(name.as_str(), Arc::new(provider))
                .map_err(|e| classify(e, spec))?;
        }
    }
    Ok(())
}

/// A local directory as the URL of a listing table (absolute, ending in `/`).
fn local_url(name: &str, path: &Path) -> Result<String, QueryError> {
    let dir = std::path::absolute(path).map_err(|e| {
        QueryError::Unavailable(format!("dataset `{name}`: {}: {e}", path.display()))
    })?;
    let mut url = dir.to_string_lossy().into_owned();
    if !url.ends_with('/') {
        url.push('/');
    }
    Ok(url)
}

/// The schema of the first readable Parquet file in `dir` (looked for depth first,
/// hidden entries skipped, at most 10,000 entries seen), from its footer.
fn first_parquet_schema(dir: &Path) -> Option<SchemaRef> {
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            seen += 1;
            if seen > 10_000 {
                return None;
            }
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) if name.ends_with(".parquet") => {
                    if let Ok(f) = etlmesh_codec::binary::ParquetFile::open(&e.path()) {
                        return Some(f.schema);
                    }
                }
                _ => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::parquet::arrow::ArrowWriter;

    fn write_parquet(path: &Path, devices: &[&str], values: &[f64]) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("value", DataType::Float64, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(devices.to_vec())),
                Arc::new(Float64Array::from(values.to_vec())),
                Arc::new(Int64Array::from_iter_values(0..devices.len() as i64)),
            ],
        )
        .expect("batch");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        let mut w = ArrowWriter::try_new(std::fs::File::create(path).expect("file"), schema, None)
            .expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
    }

    /// A dataset `readings` partitioned by status: ok (3 rows), warn (1 row), and a
    /// `bad` partition holding a file that is not Parquet.
    fn service(dir: &Path, spec: QuerySpec) -> Analytics {
        let root = dir.join("readings");
        write_parquet(
            &root.join("status=ok/part-0.parquet"),
            &["a", "b", "a"],
            &[1.0, 2.0, 4.0],
        );
        write_parquet(&root.join("status=warn/part-0.parquet"), &["c"], &[8.0]);
        std::fs::create_dir_all(root.join("status=bad")).expect("dir");
        std::fs::write(root.join("status=bad/part-0.parquet"), b"not parquet").expect("file");
        let mut catalog = Catalog::default();
        catalog.add(Dataset {
            name: "readings".into(),
            pipeline: "clean".into(),
            source: DatasetSource::Parquet {
                path: root,
                partition_by: vec!["status".into()],
                object: None,
            },
        });
        catalog.add(Dataset {
            name: "empty".into(),
            pipeline: "later".into(),
            source: DatasetSource::Parquet {
                path: dir.join("nothing"),
                partition_by: vec![],
                object: None,
            },
        });
        Analytics::new(catalog, spec).expect("service")
    }

    fn q(sql: &str) -> QueryRequest {
        QueryRequest {
            sql: sql.into(),
            max_rows: None,
            timeout: None,
            pipelines: None,
        }
    }

    fn column_f64(a: &Answer, i: usize) -> Vec<f64> {
        a.batches
            .iter()
            .flat_map(|b| {
                b.column(i)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .expect("f64")
                    .values()
                    .to_vec()
            })
            .collect()
    }

    #[tokio::test]
    async fn partitions_are_pruned_by_a_filter_on_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = service(dir.path(), QuerySpec::default());
        // Only status=ok and status=warn are read: the bad file is never opened.
        let a = s
            .run(q("SELECT status, sum(value) AS total FROM readings WHERE status IN ('ok', 'warn') GROUP BY status ORDER BY status"))
            .await
            .expect("answers");
        assert_eq!(a.rows, 2);
        assert_eq!(column_f64(&a, 1), vec![7.0, 8.0]);
        assert_eq!(a.datasets, vec!["readings".to_string()]);
        // Without the filter the unreadable file is read, and the error names it.
        let e = s
            .run(q("SELECT count(*) FROM readings"))
            .await
            .expect_err("bad file");
        assert_eq!(e.code(), "dataset_unavailable", "{e}");
        assert!(e.to_string().contains("reading dataset readings"), "{e}");
    }

    #[tokio::test]
    async fn only_datasets_are_tables() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = service(dir.path(), QuerySpec::default());
        for (sql, code, says) in [
            (
                "SELECT * FROM '/etc/passwd'",
                "query_invalid",
                "is not a dataset",
            ),
            (
                "SELECT * FROM passwd",
                "query_invalid",
                "the datasets are: empty, readings",
            ),
            (
                "SELECT * FROM read_csv('/etc/passwd')",
                "query_invalid",
                "read_csv",
            ),
            (
                "CREATE EXTERNAL TABLE p (line TEXT) STORED AS CSV LOCATION '/etc/passwd'",
                "query_refused",
                "CREATE EXTERNAL TABLE",
            ),
            (
                "COPY (SELECT 1) TO '/tmp/etlmesh-copy.csv'",
                "query_refused",
                "COPY",
            ),
            (
                "SELECT * FROM empty",
                "query_invalid",
                "has no Parquet files",
            ),
            ("SELEC 1", "query_invalid", "does not parse"),
        ] {
            let e = s.run(q(sql)).await.expect_err(sql);
            assert_eq!(e.code(), code, "{sql}: {e}");
            assert!(e.to_string().contains(says), "{sql}: {e}");
        }
        assert!(!Path::new("/tmp/etlmesh-copy.csv").exists());
    }

    #[tokio::test]
    async fn limits_cut_rows_and_stop_long_and_large_queries() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = QuerySpec {
            max_rows: 1000,
            memory_limit: 4 << 20,
            timeout: Duration::from_secs(20),
            ..QuerySpec::default()
        };
        let s = service(dir.path(), spec);
        let a = s
            .run(q("SELECT value FROM generate_series(1, 5000) AS t(value)"))
            .await
            .expect("answers");
        assert_eq!((a.rows, a.truncated), (1000, true));
        let a = s
            .run(QueryRequest {
                max_rows: Some(10),
                ..q("SELECT value FROM generate_series(1, 10) AS t(value)")
            })
            .await
            .expect("answers");
        assert_eq!((a.rows, a.truncated), (10, false));
        let e = s
            .run(q("SELECT (value * 7919) % 3000017 AS k, count(*) FROM generate_series(1, 3000000) AS t(value) GROUP BY k ORDER BY k"))
            .await
            .expect_err("memory");
        assert_eq!(e.code(), "query_memory", "{e}");
        // The timeout on a pool of the default size: under load, 4 MiB can run out in
        // the partitions' buffers of a scan before 300 ms have passed.
        let s = service(dir.path(), QuerySpec::default());
        let started = Instant::now();
        let e = s
            .run(QueryRequest {
                timeout: Some(Duration::from_millis(300)),
                ..q("SELECT count(*) FROM generate_series(1, 100000000000) AS t(v) WHERE v % 7 = 3")
            })
            .await
            .expect_err("timeout");
        assert_eq!(e.code(), "query_timeout", "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn queries_past_twice_the_concurrency_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = QuerySpec {
            concurrency: 1,
            ..QuerySpec::default()
        };
        let s = Arc::new(service(dir.path(), spec));
        let slow = "SELECT count(*) FROM generate_series(1, 100000000000) AS t(v) WHERE v % 7 = 3";
        let mut held = Vec::new();
        for _ in 0..2 {
            let s = s.clone();
            held.push(tokio::spawn(async move {
                s.run(QueryRequest {
                    timeout: Some(Duration::from_secs(2)),
                    ..q(slow)
                })
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let e = s.run(q("SELECT 1")).await.expect_err("busy");
        assert_eq!(e.code(), "query_busy", "{e}");
        for h in held {
            let _ = h.await;
        }
        s.run(q("SELECT 1")).await.expect("free again");
    }
}
