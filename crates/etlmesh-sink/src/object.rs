//! Object storage behind a file sink (`path: s3://bucket/prefix`).
//!
//! A file sink with an object target writes its hidden files in a local staging
//! directory exactly as a local sink does; its commit uploads each finished file to its
//! key — one PUT below [`PART_SIZE`], a multipart upload above it, completed only once
//! every part is stored and aborted on any failure — so that an object is either
//! whole or absent, whatever happens to the process. The staged file is removed once
//! its object exists. A commit that fails keeps the files not yet uploaded for the next
//! try: for a stream, a bucket that refuses writes is an outage that holds messages,
//! not a loss.
//!
//! Uploads run on one small runtime of their own ([`Bucket::blocking`]), so that a
//! batch job's threads and a worker's blocking tasks can wait for them alike.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etlmesh_config::ObjectTarget;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;

use crate::file::Pending;
use crate::{Committed, SinkError};

/// Files from this size up are uploaded in parts of this size (S3's parts are 5 MiB
/// at least, but the last).
pub const PART_SIZE: usize = 8 << 20;

/// A bucket and the client that reaches it.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    target: ObjectTarget,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("url", &self.target.url)
            .finish()
    }
}

/// The S3 client for a target: its settings, the environment for those left out.
/// Transient failures (5xx, a connection refused) are retried three times within 30 s;
/// past that the caller decides (a stream holds its messages and tries again).
pub fn s3_store(target: &ObjectTarget) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
    let o = &target.s3;
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&target.bucket);
    if let Some(v) = &o.endpoint {
        b = b.with_endpoint(v);
    }
    if let Some(v) = &o.region {
        b = b.with_region(v);
    }
    if let Some(v) = &o.access_key_id {
        b = b.with_access_key_id(v);
    }
    if let Some(v) = &o.secret_access_key {
        b = b.with_secret_access_key(v);
    }
    if let Some(v) = o.allow_http {
        b = b.with_allow_http(v);
    }
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    };
    Ok(Arc::new(b.with_retry(retry).build()?))
}

impl Bucket {
    /// The bucket of `target`, sharing the client of every sink of the process that
    /// writes to the same bucket (one connection pool). The first open lists the prefix
    /// once, so that a wrong endpoint, bucket or credential is said when the sink
    /// starts, not at its commit.
    pub fn open(target: &ObjectTarget, sink: &str) -> Result<Arc<Self>, SinkError> {
        Self::get(target, sink, true)
    }

    /// As [`Bucket::open`], without the check (for a log that opens inside a task).
    pub fn unchecked(target: &ObjectTarget, sink: &str) -> Result<Arc<Self>, SinkError> {
        Self::get(target, sink, false)
    }

    fn get(target: &ObjectTarget, sink: &str, check: bool) -> Result<Arc<Self>, SinkError> {
        static OPEN: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
        let id = format!("{}|{:?}", target.bucket, target.s3);
        let open = OPEN.get_or_init(Mutex::default);
        if let Some(store) = open.lock().get(&id) {
            return Ok(Arc::new(Bucket {
                store: store.clone(),
                target: target.clone(),
            }));
        }
        let store = s3_store(target).map_err(|e| store_error(sink, &target.url, e))?;
        let bucket = Arc::new(Bucket {
            store: store.clone(),
            target: target.clone(),
        });
        if !check {
            return Ok(bucket);
        }
        let probe = bucket.clone();
        let prefix = Key::from(target.prefix.as_str());
        Self::blocking(async move {
            probe
                .store
                .list_with_delimiter(Some(&prefix))
                .await
                .map(|_| ())
        })
        .map_err(|e| store_error(sink, &target.url, e))?;
        open.lock().insert(id, store);
        Ok(bucket)
    }

    /// The target.
    pub fn target(&self) -> &ObjectTarget {
        &self.target
    }

    /// Uploads the local file `local` to `key`; the object exists whole once this
    /// returns `Ok` (its size), and not at all otherwise.
    pub async fn upload(&self, local: &Path, key: &str) -> Result<u64, object_store::Error> {
        let key = Key::from(key);
        let io = |e: std::io::Error| object_store::Error::Generic {
            store: "local staging",
            source: Box::new(e),
        };
        let size = tokio::fs::metadata(local).await.map_err(io)?.len();
        if size < PART_SIZE as u64 {
            let data = tokio::fs::read(local).await.map_err(io)?;
            self.store.put(&key, PutPayload::from(data)).await?;
            return Ok(size);
        }
        let mut upload = self.store.put_multipart(&key).await?;
        let mut file = tokio::fs::File::open(local).await.map_err(io)?;
        let parts = async {
            loop {
                let mut part = Vec::with_capacity(PART_SIZE);
                (&mut file)
                    .take(PART_SIZE as u64)
                    .read_to_end(&mut part)
                    .await
                    .map_err(io)?;
                if part.is_empty() {
                    return Ok(());
                }
                upload.put_part(PutPayload::from(part)).await?;
            }
        }
        .await;
        match parts {
            Ok(()) => match upload.complete().await {
                Ok(_) => Ok(size),
                Err(e) => {
                    let _ = upload.abort().await;
                    Err(e)
                }
            },
            Err(e) => {
                if let Err(abort) = upload.abort().await {
                    tracing::warn!(key = %key, error = %abort, "an unfinished upload could not be aborted: the bucket keeps its parts until its lifecycle rule removes them");
                }
                Err(e)
            }
        }
    }

    /// Uploads pending files one by one, each to the key of its path under `base`; a
    /// file is removed from the staging directory once its object exists. On a failure,
    /// the error and the files not uploaded (the failed one first).
    pub(crate) fn upload_pending(
        self: &Arc<Self>,
        sink: &str,
        base: &Path,
        pending: Vec<Pending>,
    ) -> Result<Committed, (SinkError, Vec<Pending>)> {
        let mut done = Committed::default();
        let mut rest = pending.into_iter();
        while let Some(p) = rest.next() {
            let key = self
                .target
                .key(p.target.strip_prefix(base).unwrap_or(&p.target));
            let (b, tmp, k) = (self.clone(), p.tmp.clone(), key.clone());
            let started = std::time::Instant::now();
            match Bucket::blocking(async move { b.upload(&tmp, &k).await }) {
                Ok(bytes) => {
                    let _ = std::fs::remove_file(&p.tmp);
                    tracing::debug!(
                        sink,
                        key,
                        bytes,
                        took_ms = started.elapsed().as_millis() as u64,
                        "uploaded"
                    );
                    done.bytes += bytes;
                    done.files
                        .push(PathBuf::from(format!("s3://{}/{key}", self.target.bucket)));
                }
                Err(e) => {
                    let mut left = vec![p];
                    left.extend(rest);
                    return Err((store_error(sink, &self.target.url, e), left));
                }
            }
        }
        Ok(done)
    }

    /// Uploads `local` to `key` in the background (on the upload runtime); `then` gets
    /// the outcome.
    pub fn spawn_upload(
        self: &Arc<Self>,
        local: PathBuf,
        key: String,
        then: impl FnOnce(Result<u64, object_store::Error>) + Send + 'static,
    ) {
        let b = self.clone();
        match runtime() {
            Ok(rt) => {
                rt.spawn(async move { then(b.upload(&local, &key).await) });
            }
            Err(e) => then(Err(object_store::Error::Generic {
                store: "upload runtime",
                source: e.clone().into(),
            })),
        }
    }

    /// Runs `work` on the upload runtime and waits for it: callable from any thread
    /// that may block (not from inside an async task: use `spawn_blocking` there).
    pub fn blocking<T: Send + 'static>(
        work: impl Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Result<T, object_store::Error> {
        let unavailable = |why: String| object_store::Error::Generic {
            store: "upload runtime",
            source: why.into(),
        };
        let runtime = runtime().map_err(|e| unavailable(e.clone()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv()
            .map_err(|_| unavailable("the upload task ended without an answer".into()))?
    }
}

fn runtime() -> Result<&'static tokio::runtime::Runtime, &'static String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("etlmesh-upload")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the upload runtime: {e}"))
        })
        .as_ref()
}

/// An object-storage failure as a sink error, with what to do about it.
pub(crate) fn store_error(sink: &str, url: &str, error: object_store::Error) -> SinkError {
    let help = match &error {
        object_store::Error::NotFound { .. } => {
            "create the bucket, or correct the bucket name in `path`".to_string()
        }
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or `s3:` in the sink) and the bucket's policy".to_string()
        }
        _ => "check that the endpoint answers (`s3.endpoint` or AWS_ENDPOINT_URL) and the bucket exists; a stream holds its messages and tries again".to_string(),
    };
    SinkError::Store {
        sink: sink.to_string(),
        url: url.to_string(),
        error: Box::new(error),
        help,
    }
}
