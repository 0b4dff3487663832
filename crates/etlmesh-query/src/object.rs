//! Datasets in object storage: a Parquet sink with `path: s3://bucket/prefix` is read
//! from its bucket. The session gets the bucket's store (one client per bucket and
//! settings, kept for the process); the schema comes from one file's footer, so that
//! planning reads no other file and a filter on partition columns lists only the
//! prefixes it keeps.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arrow::datatypes::SchemaRef;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::prelude::SessionContext;
use etlmesh_config::ObjectTarget;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as Key;
use parking_lot::Mutex;

use crate::QueryError;

/// Objects looked at, at most, for the first Parquet file of a dataset.
const LOOK_AT: usize = 10_000;

/// Registers the bucket with the session; returns the schema of the first Parquet
/// object under the prefix (`None`: there is none yet) and the table's URL.
pub(crate) async fn locate(
    ctx: &SessionContext,
    target: &ObjectTarget,
    name: &str,
) -> Result<(Option<SchemaRef>, String), QueryError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        QueryError::Unavailable(format!("dataset `{name}` ({}): {e}", target.url))
    };
    let store = store(target).map_err(|e| unavailable(&e))?;
    let root = url::Url::parse(&format!("s3://{}", target.bucket)).map_err(|e| unavailable(&e))?;
    ctx.register_object_store(&root, store.clone());
    let prefix = (!target.prefix.is_empty()).then(|| Key::from(target.prefix.as_str()));
    let mut listing = store.list(prefix.as_ref());
    let mut first = None;
    let mut seen = 0;
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| unavailable(&e))?;
        seen += 1;
        let hidden = meta.location.parts().any(|p| p.as_ref().starts_with('.'));
        if !hidden && meta.location.as_ref().ends_with(".parquet") {
            first = Some(meta);
            break;
        }
        if seen >= LOOK_AT {
            break;
        }
    }
    let schema = match first {
        None => None,
        Some(meta) => Some(
            ParquetFormat::default()
                .infer_schema(&ctx.state(), &store, &[meta])
                .await
                .map_err(|e| unavailable(&e))?,
        ),
    };
    Ok((schema, format!("{}/", target.url)))
}

/// One client per bucket and settings.
fn store(target: &ObjectTarget) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let id = format!("{}|{:?}", target.bucket, target.s3);
    let stores = STORES.get_or_init(Mutex::default);
    if let Some(s) = stores.lock().get(&id) {
        return Ok(s.clone());
    }
    let s = etlmesh_sink::object::s3_store(target)?;
    stores.lock().insert(id, s.clone());
    Ok(s)
}
