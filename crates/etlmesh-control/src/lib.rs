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
//!
//! With a mesh ([`mesh::MeshOptions`]) it is the mesh's certificate authority and
//! speaks the worker protocol over mTLS only, on a listener of its own ([`mesh`]).
//!
//! With a pipeline file it reloads it while running ([`reload`]): on SIGHUP, a change
//! of the file, or `PUT /api/v1/pipelines`, changed pipelines get new workers and
//! unchanged ones are not touched.

mod api;
pub mod autoscale;
mod deadletters;
pub mod energy;
pub mod jobs;
pub mod logs;
pub mod mesh;
mod overview;
mod refusal;
pub mod registry;
pub mod reload;
mod tap;
pub mod timeline;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etlmesh_http::serve::{Listen, serve};
use etlmesh_http::shutdown::{self, Tasks};
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
    /// The mesh's authority cannot start.
    #[error("control plane: {0}")]
    Mesh(#[from] etlmesh_tls::TlsError),
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
    /// mTLS in the mesh: the authority and the mesh listener.
    pub mesh: Option<mesh::MeshOptions>,
    /// Reloading the pipeline file (with `autoscale` given to [`Bound::serve`]).
    pub reload: Option<reload::ReloadOptions>,
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
            mesh: None,
            reload: None,
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
    /// The mesh listener's address, with mTLS.
    pub mesh_addr: Option<SocketAddr>,
    /// The mesh's authority, with mTLS.
    pub authority: Option<Arc<etlmesh_tls::Authority>>,
    listener: TcpListener,
    mesh: Option<BoundMesh>,
    log_source: String,
    reload: Option<reload::ReloadOptions>,
}

/// The mesh listener, bound, and the control plane's own identity on it.
struct BoundMesh {
    listener: etlmesh_tls::listener::TlsListener,
    state: Arc<mesh::Mesh>,
    identity: Arc<etlmesh_tls::Identity>,
}

/// Opens the authority, binds the mesh listener and gives this process its identity
/// (installed: the control plane's clients, and a gateway in the same process, use it).
async fn bind_mesh(o: &mesh::MeshOptions, registry: &Registry) -> Result<BoundMesh, ControlError> {
    let authority = Arc::new(
        etlmesh_tls::Authority::open(&o.dir, o.ca.as_ref(), o.certificate_lifetime)?
            .with_host_suffixes(o.host_suffixes.clone()),
    );
    // This process refuses revoked certificates too (the list is read again when its
    // file changes).
    let watched = authority.clone();
    tokio::spawn(async move {
        loop {
            etlmesh_tls::set_revoked(watched.revoked().iter().cloned());
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    let tcp = TcpListener::bind(o.listen)
        .await
        .map_err(|error| ControlError::Listen {
            addr: o.listen,
            error,
        })?;
    let mut hosts = vec!["localhost".to_string()];
    if !o.listen.ip().is_unspecified() {
        hosts.push(o.listen.ip().to_string());
    }
    let identity =
        authority.local_identity("control-plane", etlmesh_tls::Role::ControlPlane, &hosts)?;
    if !etlmesh_tls::install(identity.clone()) {
        tracing::warn!(
            "this process already has a mesh identity: it stays the one its clients show; the control plane's own serves the mesh listener"
        );
    }
    let config = identity.server_config(etlmesh_tls::ClientAuth::Optional)?;
    let listener = etlmesh_tls::listener::TlsListener::new(tcp, config, Some("control plane"))
        .map_err(|e| ControlError::Serve(e.to_string()))?;
    let state = Arc::new(mesh::Mesh::new(
        authority,
        &registry.metrics,
        listener.refused(),
    ));
    Ok(BoundMesh {
        listener,
        state,
        identity,
    })
}

/// Join tokens for the workers a scaler of this control plane starts: one each, good
/// for one join within ten minutes (never the authority's own, long-lived token).
pub fn worker_join_tokens(
    authority: Option<Arc<etlmesh_tls::Authority>>,
) -> Option<Arc<dyn Fn() -> Option<String> + Send + Sync>> {
    authority.map(|a| {
        Arc::new(move || {
            a.mint("worker start", std::time::Duration::from_secs(600), Some(1))
                .map(|t| t.to_string())
                .map_err(|e| tracing::error!(error = %e, "cannot mint a join token for a worker"))
                .ok()
        }) as Arc<dyn Fn() -> Option<String> + Send + Sync>
    })
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
        let mut m = registry.metrics.lock();
        m.register_collector(Box::new(energy::EnergyCollector(meter.clone())));
        if let Some(j) = &jobs {
            m.register_collector(Box::new(jobs::JobsCollector(j.clone())));
        }
    }
    let mesh = match &options.mesh {
        Some(o) => Some(bind_mesh(o, &registry).await?),
        None => None,
    };
    Ok(Bound {
        addr,
        registry,
        logs,
        meter,
        jobs,
        mesh_addr: mesh
            .as_ref()
            .and_then(|m| axum::serve::Listener::local_addr(&m.listener).ok()),
        authority: mesh.as_ref().map(|m| m.state.authority.clone()),
        listener,
        mesh,
        log_source: options.log_source.clone(),
        reload: options.reload.clone(),
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
        let mut tasks = Tasks::default();
        tasks.spawn("reaper", registry::reap_forever(self.registry.clone()));
        tasks.spawn(
            "log collector",
            logs::collect_local(self.logs.clone(), self.log_source),
        );
        let timeline = Arc::new(timeline::Timeline::default());
        let autoscaling = autoscale.map(|c| Arc::new(Autoscaling::new(c, &self.registry)));
        let scaler_loop = autoscaling
            .clone()
            .map(|a| tokio::spawn(a.run(self.registry.clone())));
        let reloader = match (self.reload, &autoscaling) {
            (Some(o), Some(a)) => Some(Arc::new(reload::Reloader::new(
                o,
                a.clone(),
                self.registry.clone(),
            ))),
            _ => None,
        };
        for t in reloader
            .as_ref()
            .map(|r| reload::spawn_triggers(r.clone()))
            .unwrap_or_default()
        {
            tasks.adopt("reload trigger", t);
        }
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let state = Arc::new(ControlState {
            registry: self.registry.clone(),
            autoscaling: autoscaling.clone(),
            closing,
            logs: self.logs.clone(),
            timeline: timeline.clone(),
            meter: self.meter.clone(),
            jobs: self.jobs.clone(),
            mesh: self.mesh.as_ref().map(|m| m.state.clone()),
            reloader,
            replaying: tokio::sync::Mutex::new(()),
        });
        tasks.spawn(
            "energy meter",
            energy::meter_forever(
                self.meter.clone(),
                self.registry.clone(),
                autoscaling.clone(),
            ),
        );
        if let Some(j) = self.jobs.clone() {
            tasks.spawn("job runner", j.run_forever());
        }
        tasks.spawn(
            "timeline",
            timeline::sample_forever(timeline, self.registry.clone(), autoscaling.clone()),
        );
        let (trigger, stop) = shutdown::channel();
        tokio::spawn(async move {
            shutdown.await;
            // Workers drain while the control plane still answers them.
            if let Some(t) = scaler_loop {
                t.abort();
            }
            if let Some(a) = autoscaling {
                a.shutdown().await;
            }
            let _ = closing_tx.send(true);
            trigger.fire();
        });
        let mut admin = router(state.clone());
        if let Some(m) = self.mesh {
            admin = admin.layer(axum::middleware::from_fn(mesh::admin_only));
            let members = router(state).layer(axum::middleware::from_fn(mesh::members_only));
            tracing::info!(addr = ?self.mesh_addr, "control plane mesh listening on https://{} (mTLS)", self.mesh_addr.map(|a| a.to_string()).unwrap_or_default());
            tasks.spawn(
                "mesh listener",
                serve(Listen::Tls(m.listener), members, stop.clone().fired()),
            );
            tasks.spawn(
                "certificate renewal",
                m.state.authority.clone().renew_local_forever(m.identity),
            );
        }
        tracing::info!(addr = %self.addr, "control plane listening on http://{}", self.addr);
        serve(Listen::Plain(self.listener), admin, stop.fired()).await;
        tasks.stop().await;
        Ok(())
    }
}
