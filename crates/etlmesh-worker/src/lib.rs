//! The ETL worker: `etlmesh worker`.
//!
//! It serves `POST /v1/transform/{pipeline}` for every pipeline of its file — the body
//! in any supported format, the answer in the format asked for (`Accept`), the counts in
//! response headers — and `/metrics`, `/healthz`. It registers with the control plane,
//! reports its load every second, and on shutdown drains: it tells the control plane
//! it is draining (gateways stop sending to it), keeps serving what arrives for a grace
//! period, finishes what it holds, deregisters and exits.
//!
//! For each of its pipelines whose source is MQTT it also runs the stream ([`streams`]):
//! subscribed while the worker runs, finished and acknowledged when it drains. A stream
//! that fails stops the worker, so that its supervisor restarts it on the same session.

mod handler;
mod load;
mod metrics;
mod pipelines;
mod register;
mod streams;
mod tap;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use etlmesh_config::PipelineFile;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use load::LoadTracker;

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// It cannot listen.
    #[error("worker: cannot listen on {addr}: {error}\n  help: choose a free port with --listen")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
    /// A pipeline does not compile.
    #[error("{0}")]
    Pipeline(String),
    /// Serving failed.
    #[error("worker: {0}")]
    Serve(String),
    /// A stream stopped with an error.
    #[error("worker: {0}")]
    Stream(String),
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Its id in the mesh.
    pub id: String,
    /// Where it listens (port 0: any free port).
    pub listen: SocketAddr,
    /// The address gateways use (`http://host:port`, `https://` with `mesh`); from
    /// `listen` when absent.
    pub advertise: Option<String>,
    /// Its mesh identity: it then serves mTLS only, to peers with a certificate from
    /// the same control plane.
    pub mesh: Option<Arc<etlmesh_tls::Identity>>,
    /// The control plane (`http://host:port`); standalone when absent.
    pub control_plane: Option<String>,
    /// Requests served at once; more get 503 with Retry-After.
    pub max_in_flight: usize,
    /// The largest request body.
    pub max_body_bytes: usize,
    /// Deadline when a request brings none.
    pub default_deadline: Duration,
    /// How long it keeps serving after it said it is draining, so that gateways learn it.
    pub drain_grace: Duration,
    /// How long it waits for in-flight requests when draining.
    pub drain_timeout: Duration,
    /// Fault injection: extra latency added to every transform.
    pub inject_latency: Option<Duration>,
    /// The pipelines served (every pipeline of the file when empty).
    pub pipelines: Vec<String>,
    /// Per-request metrics and trace spans (off only to measure what they cost).
    pub telemetry: bool,
    /// Where streams keep their state between runs; in memory only when absent.
    pub state_dir: Option<std::path::PathBuf>,
    /// Set (before `shutdown` completes) when the worker leaves its pool for good: its
    /// streams then give up their shared subscriptions.
    pub leave_on_stop: Arc<std::sync::atomic::AtomicBool>,
}

impl WorkerOptions {
    /// Defaults for a worker listening on `listen`.
    pub fn new(id: impl Into<String>, listen: SocketAddr) -> Self {
        Self {
            id: id.into(),
            listen,
            advertise: None,
            mesh: None,
            control_plane: None,
            max_in_flight: 64,
            max_body_bytes: 64 << 20,
            default_deadline: Duration::from_secs(10),
            drain_grace: Duration::from_millis(1500),
            drain_timeout: Duration::from_secs(30),
            inject_latency: None,
            pipelines: Vec::new(),
            telemetry: true,
            state_dir: None,
            leave_on_stop: Arc::default(),
        }
    }
}

/// What the request handlers share.
pub(crate) struct App {
    pub id: String,
    pub options: WorkerOptions,
    pub pipelines: pipelines::Pipelines,
    pub load: Arc<LoadTracker>,
    pub metrics: metrics::WorkerMetrics,
    pub registry: etlmesh_telemetry::metrics::SharedRegistry,
    pub draining: watch::Receiver<bool>,
    /// Open taps (`etlmesh tap`).
    pub taps: Arc<etlmesh_sink::tap::TapHub>,
}

/// Runs a worker until `shutdown` completes, then drains and returns.
pub async fn run(
    file: PipelineFile,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let listener =
        TcpListener::bind(options.listen)
            .await
            .map_err(|error| WorkerError::Listen {
                addr: options.listen,
                error,
            })?;
    let local = listener
        .local_addr()
        .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let scheme = if options.mesh.is_some() {
        "https"
    } else {
        "http"
    };
    let address = options
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"));
    let registry = etlmesh_telemetry::metrics::registry();
    let mut metrics = metrics::WorkerMetrics::register(&registry);
    metrics.enabled = options.telemetry;
    let pipelines = pipelines::Pipelines::compile(&file, &options.id, &options.pipelines).await?;
    let load = Arc::new(LoadTracker::default());
    load.track(pipelines.usage());
    let taps = Arc::new(etlmesh_sink::tap::TapHub::default());
    let (drain_tx, drain_rx) = watch::channel(false);
    let streams = streams::start(
        &file,
        &options.id,
        &pipelines,
        &registry,
        streams::Shared {
            taps: taps.clone(),
            state_dir: options.state_dir.clone(),
            leaving: options.leave_on_stop.clone(),
            linger: options.drain_grace,
        },
        drain_rx.clone(),
    );
    let app = Arc::new(App {
        id: options.id.clone(),
        options: options.clone(),
        pipelines,
        load: load.clone(),
        metrics,
        registry,
        draining: drain_rx.clone(),
        taps,
    });
    let router = Router::new()
        .route("/v1/transform/{pipeline}", post(handler::transform))
        .route("/v1/tap/{pipeline}", get(tap::tap))
        .route("/healthz", get(handler::healthz))
        .route("/metrics", get(handler::metrics))
        .with_state(app.clone());

    let registration = etlmesh_proto::Registration {
        id: options.id.clone(),
        address: address.clone(),
        pipelines: app.pipelines.infos(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    // The reporter has a thread and runtime of its own: request handlers busy on the
    // CPU never delay a heartbeat.
    let (reporter_stop, reporter_stopped) = tokio::sync::oneshot::channel::<()>();
    let reporter = match options.control_plane.clone() {
        Some(cp) => {
            let (load, drain) = (load.clone(), drain_rx.clone());
            Some(
                std::thread::Builder::new()
                    .name("etlmesh-heartbeat".into())
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build();
                        if let Ok(rt) = rt {
                            let source = registration.id.clone();
                            rt.block_on(async {
                                tokio::select! {
                                    _ = register::report(cp.clone(), registration, load, drain) => {}
                                    _ = etlmesh_http::logship::ship_logs(cp, source) => {}
                                    _ = reporter_stopped => {}
                                }
                            });
                        }
                    })
                    .map_err(|e| {
                        WorkerError::Serve(format!("cannot start the heartbeat thread: {e}"))
                    })?,
            )
        }
        None => None,
    };
    tracing::info!(worker = %options.id, %address, pipelines = app.pipelines.len(), "worker listening on {address}");

    // Shutdown: say we drain, keep serving for the grace period, then stop taking
    // connections and finish in-flight requests.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = options.drain_grace;
    let worker_id = options.id.clone();
    let in_flight = load.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(worker = %worker_id, in_flight = in_flight.in_flight(), "draining: no new work; finishing what is held");
        let _ = drain_tx.send(true);
        tokio::time::sleep(grace).await;
        let _ = stop_tx.send(());
    });
    let stopped = async {
        let _ = stop_rx.await;
    };
    let serve: futures::future::BoxFuture<'static, std::io::Result<()>> = match &options.mesh {
        Some(identity) => {
            let config = identity
                .server_config(etlmesh_tls::ClientAuth::Required)
                .map_err(|e| WorkerError::Serve(e.to_string()))?;
            let listener =
                etlmesh_tls::listener::TlsListener::new(listener, config, Some("worker"))
                    .map_err(|e| WorkerError::Serve(e.to_string()))?;
            Box::pin(
                axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .into_future(),
            )
        }
        None => Box::pin(
            axum::serve(listener.tap_io(etlmesh_http::no_delay), router)
                .with_graceful_shutdown(stopped)
                .into_future(),
        ),
    };
    let drain_timeout = options.drain_timeout;
    let (stream_failed_tx, mut stream_failed) = tokio::sync::mpsc::channel::<WorkerError>(1);
    let mut stream_tasks = Vec::new();
    for (name, task) in streams {
        let tx = stream_failed_tx.clone();
        stream_tasks.push(tokio::spawn(async move {
            if let Ok(Err(e)) = task.await {
                let _ = tx
                    .send(WorkerError::Stream(format!("pipeline `{name}`: {e}")))
                    .await;
            }
        }));
    }
    drop(stream_failed_tx);
    let served = async {
        serve.await.map_err(|e| WorkerError::Serve(e.to_string()))?;
        Ok::<(), WorkerError>(())
    };
    // The server returns once its connections are done; bound the wait.
    let mut drained = std::pin::pin!(served);
    let mut draining = drain_rx.clone();
    let mut failure = None;
    tokio::select! {
        r = &mut drained => r?,
        Some(e) = stream_failed.recv() => {
            tracing::error!(worker = %options.id, error = %e, "a stream failed: the worker stops (its unacknowledged messages come again)");
            failure = Some(e);
        }
        _ = async {
            let _ = draining.wait_for(|d| *d).await;
            tokio::time::sleep(grace + drain_timeout).await;
        } => {
            tracing::warn!(worker = %options.id, in_flight = load.in_flight(), "drain timeout: exiting with requests in flight");
        }
    }
    if let Some(r) = reporter {
        let _ = reporter_stop.send(());
        let _ = tokio::task::spawn_blocking(move || r.join()).await;
        if let Some(cp) = &options.control_plane {
            register::deregister(cp, &options.id).await;
        }
    }
    for t in stream_tasks {
        if failure.is_some() {
            t.abort();
        } else {
            let _ = t.await;
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    tracing::info!(worker = %options.id, "worker stopped");
    Ok(())
}
