//! The control plane: `etlmesh control-plane`.
//!
//! It keeps the registry of workers ([`registry::Registry`]): what each serves, its
//! state (ready, draining) and load, and when it last reported. A worker whose
//! heartbeats stop is removed after `heartbeat_timeout` (2.5 s by default). Gateways
//! follow the endpoint set through `GET /v1/endpoints/watch`, one long-lived response
//! of NDJSON events: never polling. The admin API serves the workers, the pipelines
//! and health as JSON; `/metrics` serves Prometheus metrics.
//!
//! It is also where the mesh is observed: it collects the log lines of every process
//! and groups their errors ([`logs`]), samples the mesh once a second ([`timeline`])
//! for `/api/v1/overview`, `etlmesh top` and the dashboard at `/ui`.
//!
//! It meters energy and carbon ([`energy`]): the machine's energy (RAPL or a CPU-time
//! model) charged to pipelines by the CPU time of their work, for `/api/v1/energy`,
//! `etlmesh energy` and the dashboard; and it runs carbon-aware batch jobs ([`jobs`]),
//! kept in SQLite so that they survive its restarts.

mod api;
pub mod autoscale;
pub mod energy;
pub mod jobs;
pub mod logs;
mod overview;
pub mod registry;
pub mod timeline;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

pub use api::{ControlState, router};
pub use autoscale::{AutoscaleConfig, Autoscaling, pools};
pub use registry::Registry;

/// Errors that stop the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// It cannot listen.
    #[error(
        "control plane: cannot listen on {addr}: {error}\n  help: choose a free port with --listen"
    )]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
    /// Serving failed.
    #[error("control plane: {0}")]
    Serve(String),
    /// The energy meter cannot start.
    #[error("control plane: {0}")]
    Energy(#[from] energy::EnergyError),
    /// The job store cannot open.
    #[error("control plane: {0}")]
    Jobs(#[from] jobs::JobsError),
}

/// How the control plane runs.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Where it listens.
    pub listen: SocketAddr,
    /// A worker silent for this long is removed.
    pub heartbeat_timeout: Duration,
    /// The name this process's own log lines are collected under.
    pub log_source: String,
    /// How energy is measured or modelled.
    pub energy: etlmesh_config::EnergySpec,
    /// The grid's carbon intensity.
    pub carbon: etlmesh_config::CarbonSpec,
    /// Batch jobs, when the control plane has a pipeline file to run them with.
    pub jobs: Option<jobs::JobsOptions>,
}

impl ControlOptions {
    /// Defaults for `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            heartbeat_timeout: Duration::from_millis(2500),
            log_source: "control-plane".into(),
            energy: Default::default(),
            carbon: Default::default(),
            jobs: None,
        }
    }
}

/// A control plane listening on a socket: its address and registry.
pub struct Bound {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its registry.
    pub registry: Arc<Registry>,
    /// Its collected logs.
    pub logs: Arc<logs::LogStore>,
    /// Its energy meter.
    pub meter: Arc<energy::Meter>,
    /// Its batch jobs.
    pub jobs: Option<Arc<jobs::Jobs>>,
    listener: TcpListener,
    log_source: String,
}

/// Binds the control plane's socket (so that callers learn the port before serving).
pub async fn bind(options: &ControlOptions) -> Result<Bound, ControlError> {
    let listener =
        TcpListener::bind(options.listen)
            .await
            .map_err(|error| ControlError::Listen {
                addr: options.listen,
                error,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ControlError::Serve(e.to_string()))?;
    let registry = Arc::new(Registry::new(options.heartbeat_timeout));
    let logs = Arc::new(logs::LogStore::new(&registry.metrics));
    let meter = Arc::new(energy::Meter::new(
        &options.energy,
        &options.carbon,
        &format!("mesh:{}", options.log_source),
    )?);
    let jobs = options
        .jobs
        .clone()
        .map(|o| jobs::Jobs::open(o, meter.clone()))
        .transpose()?;
    {
        let mut m = registry.metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.register_collector(Box::new(energy::EnergyCollector(meter.clone())));
        if let Some(j) = &jobs {
            m.register_collector(Box::new(jobs::JobsCollector(j.clone())));
        }
    }
    Ok(Bound {
        addr,
        registry,
        logs,
        meter,
        jobs,
        listener,
        log_source: options.log_source.clone(),
    })
}

impl Bound {
    /// Serves until `shutdown` completes; with `autoscale`, also scales the pools, and
    /// drains their workers before returning.
    pub async fn serve(
        self,
        autoscale: Option<AutoscaleConfig>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ControlError> {
        let reaper = tokio::spawn(registry::reap_forever(self.registry.clone()));
        let collector = tokio::spawn(logs::collect_local(self.logs.clone(), self.log_source));
        let timeline = Arc::new(timeline::Timeline::default());
        let autoscaling = autoscale.map(|c| Arc::new(Autoscaling::new(c, &self.registry)));
        let scaler_loop = autoscaling
            .clone()
            .map(|a| tokio::spawn(a.run(self.registry.clone())));
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let state = Arc::new(ControlState {
            registry: self.registry.clone(),
            autoscaling: autoscaling.clone(),
            closing,
            logs: self.logs.clone(),
            timeline: timeline.clone(),
            meter: self.meter.clone(),
            jobs: self.jobs.clone(),
        });
        let meter = tokio::spawn(energy::meter_forever(
            self.meter.clone(),
            self.registry.clone(),
            autoscaling.clone(),
        ));
        let job_loop = self.jobs.clone().map(|j| tokio::spawn(j.run_forever()));
        let sampler = tokio::spawn(timeline::sample_forever(
            timeline,
            self.registry.clone(),
            autoscaling.clone(),
        ));
        tracing::info!(addr = %self.addr, "control plane listening on http://{}", self.addr);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let scaling = autoscaling.clone();
        let loop_task = scaler_loop;
        tokio::spawn(async move {
            shutdown.await;
            // Workers drain while the control plane still answers them.
            if let Some(t) = loop_task {
                t.abort();
            }
            if let Some(a) = scaling {
                a.shutdown().await;
            }
            let _ = closing_tx.send(true);
            let _ = stop_tx.send(());
        });
        let result = axum::serve(self.listener.tap_io(etlmesh_http::no_delay), router(state))
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
            .map_err(|e| ControlError::Serve(e.to_string()));
        reaper.abort();
        collector.abort();
        sampler.abort();
        meter.abort();
        if let Some(j) = job_loop {
            j.abort();
        }
        result
    }
}
