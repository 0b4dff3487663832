//! The ETL worker: `etlmesh worker`.
//!
//! It serves `POST /v1/pipelines/{pipeline}` (the gateway's path for the same thing)
//! for every pipeline of its file — the body in any supported format, the answer in
//! the format asked for (`Accept`), the counts in response headers — and `/metrics`,
//! `/healthz`. It registers with the control plane, reports its load every second,
//! and on shutdown drains: it tells the control plane it is draining (gateways stop
//! sending to it), keeps serving what arrives for a grace
//! period, finishes what it holds, deregisters and exits.
//!
//! For each of its pipelines whose source is MQTT it also runs the stream ([`streams`]):
//! subscribed while the worker runs, finished and acknowledged when it drains. A stream
//! that fails stops the worker, so that its supervisor restarts it on the same session.

mod handler;
mod load;
mod metrics;
mod pipelines;
mod refusal;
mod register;
mod streams;
mod tap;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use etlmesh_config::PipelineFile;
use etlmesh_http::serve::Listen;
use etlmesh_http::shutdown::Shutdown;
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
pub async fn serve(
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
    let address = advertised(&listener, &options)?;
    let (drain_tx, drain_rx) = watch::channel(false);
    let app = Arc::new(App::start(&file, &options, drain_rx.clone()).await?);
    let streams = streams::start(
        &file,
        &options.id,
        &app.pipelines,
        &app.registry,
        streams::Shared {
            taps: app.taps.clone(),
            state_dir: options.state_dir.clone(),
            leaving: options.leave_on_stop.clone(),
            linger: options.drain_grace,
        },
        drain_rx.clone(),
    );
    let heartbeat = match &options.control_plane {
        Some(cp) => Some(register::Reporter::start(
            cp.clone(),
            app.registration(&address),
            app.load.clone(),
            drain_rx.clone(),
        )?),
        None => None,
    };
    let listen = match &options.mesh {
        Some(identity) => {
            let config = identity
                .server_config(etlmesh_tls::ClientAuth::Required)
                .map_err(|e| WorkerError::Serve(e.to_string()))?;
            Listen::tls(listener, config, Some("worker"))
                .map_err(|e| WorkerError::Serve(e.to_string()))?
        }
        None => Listen::Plain(listener),
    };
    tracing::info!(worker = %options.id, %address, pipelines = app.pipelines.len(), "worker listening on {address}");
    let stop = drain_on(shutdown, drain_tx, &options, app.load.clone());
    let serving = etlmesh_http::serve::serve(listen, router(app.clone()), stop.fired());
    let (failure, streams) =
        serve_until_drained(serving, streams, &options, drain_rx, &app.load).await;
    if let Some(h) = heartbeat {
        h.stop(&options.id).await;
    }
    for t in streams {
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

/// The address gateways reach it at: `--advertise`, or the socket's own.
fn advertised(listener: &TcpListener, options: &WorkerOptions) -> Result<String, WorkerError> {
    let local = listener
        .local_addr()
        .map_err(|e| WorkerError::Serve(e.to_string()))?;
    let scheme = if options.mesh.is_some() {
        "https"
    } else {
        "http"
    };
    Ok(options
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}")))
}

impl App {
    /// Compiles the pipelines and registers the metrics.
    async fn start(
        file: &PipelineFile,
        options: &WorkerOptions,
        draining: watch::Receiver<bool>,
    ) -> Result<Self, WorkerError> {
        let registry = etlmesh_telemetry::metrics::registry();
        let mut metrics = metrics::WorkerMetrics::register(&registry);
        metrics.enabled = options.telemetry;
        let pipelines =
            pipelines::Pipelines::compile(file, &options.id, &options.pipelines).await?;
        let load = Arc::new(LoadTracker::default());
        load.track(pipelines.usage());
        Ok(Self {
            id: options.id.clone(),
            options: options.clone(),
            pipelines,
            load,
            metrics,
            registry,
            draining,
            taps: Arc::default(),
        })
    }

    /// What it tells the control plane when it registers.
    fn registration(&self, address: &str) -> etlmesh_proto::Registration {
        etlmesh_proto::Registration {
            id: self.id.clone(),
            address: address.to_string(),
            pipelines: self.pipelines.infos(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/pipelines/{pipeline}", post(handler::transform))
        // The path earlier gateways call: kept so that a mesh can be upgraded in place.
        .route("/v1/transform/{pipeline}", post(handler::transform))
        .route("/v1/tap/{pipeline}", get(tap::tap))
        .route("/healthz", get(handler::healthz))
        .route("/metrics", get(handler::metrics))
        .with_state(app)
}

/// Once `shutdown` completes: says it drains (gateways stop sending), keeps serving for
/// the grace period, then stops taking connections — the signal returned.
fn drain_on(
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: watch::Sender<bool>,
    options: &WorkerOptions,
    load: Arc<LoadTracker>,
) -> Shutdown {
    let (trigger, stop) = etlmesh_http::shutdown::channel();
    let grace = options.drain_grace;
    let worker = options.id.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(%worker, in_flight = load.in_flight(), "draining: no new work; finishing what is held");
        let _ = drain.send(true);
        tokio::time::sleep(grace).await;
        trigger.fire();
    });
    stop
}

/// Serves until the server has drained (bounded by the drain timeout) or a stream
/// fails (the error returned), with the streams' tasks to finish.
async fn serve_until_drained(
    serving: impl Future<Output = ()>,
    streams: Vec<streams::Running>,
    options: &WorkerOptions,
    mut draining: watch::Receiver<bool>,
    load: &LoadTracker,
) -> (Option<WorkerError>, Vec<tokio::task::JoinHandle<()>>) {
    let (failed_tx, mut failed) = tokio::sync::mpsc::channel::<WorkerError>(1);
    let mut tasks = Vec::new();
    for (name, task) in streams {
        let tx = failed_tx.clone();
        tasks.push(tokio::spawn(async move {
            if let Ok(Err(e)) = task.await {
                let _ = tx
                    .send(WorkerError::Stream(format!("pipeline `{name}`: {e}")))
                    .await;
            }
        }));
    }
    drop(failed_tx);
    let limit = options.drain_grace + options.drain_timeout;
    let mut failure = None;
    tokio::select! {
        () = serving => {}
        Some(e) = failed.recv() => {
            tracing::error!(worker = %options.id, error = %e, "a stream failed: the worker stops (its unacknowledged messages come again)");
            failure = Some(e);
        }
        _ = async {
            let _ = draining.wait_for(|d| *d).await;
            tokio::time::sleep(limit).await;
        } => {
            tracing::warn!(worker = %options.id, in_flight = load.in_flight(), "drain timeout: exiting with requests in flight");
        }
    }
    (failure, tasks)
}
