//! `etlmesh up`: the embedded default. The control plane (with its autoscaler) and the
//! gateway run in this process; workers run as child processes (`etlmesh worker`), one
//! pool per pipeline, started, scaled with the load (down to zero where the pipeline
//! allows it), restarted when they crash, and drained on shutdown — the `process`
//! scaler. The control plane meters energy and runs batch jobs (`/v1/jobs` on the
//! gateway), kept in the state directory.
//!
//! The pipeline file is reloaded on SIGHUP, on `PUT /api/v1/pipelines` and, with
//! `--watch-config`, when it changes (see `etlmesh_control::reload`).
//!
//! With `platform.broker` (or `up --demo` on a machine where nothing answers on 1883)
//! the MQTT broker runs here too (`etlmesh_broker`): bound before the workers start,
//! stopped after they drained, so that their last acknowledgements reach it.
//!
//! The mesh speaks mTLS by default: the control plane is its certificate authority,
//! the gateway (in this process) shares the control plane's identity, and workers
//! join with the join token, passed in their environment (`ETLMESH_JOIN_TOKEN`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use etlmesh_config::PipelineFile;
use etlmesh_gateway::GatewayOptions;
use etlmesh_scale::process::{ProcessScaler, WorkerCommand};

/// Errors of `up`.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The control plane.
    #[error("{0}")]
    Control(#[from] etlmesh_control::ControlError),
    /// The gateway.
    #[error("{0}")]
    Gateway(#[from] etlmesh_gateway::GatewayError),
    /// The embedded MQTT broker.
    #[error("{0}")]
    Broker(#[from] etlmesh_broker::BrokerError),
}

/// How `up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The pipeline file the workers serve.
    pub config: PathBuf,
    /// Workers per pipeline, fixed (no autoscaling); the file's `scaling` otherwise.
    pub fixed_workers: Option<u32>,
    /// The control plane's address (admin API, worker protocol).
    pub admin: SocketAddr,
    /// The `etlmesh` executable that runs workers.
    pub exe: PathBuf,
    /// Extra arguments for every worker.
    pub worker_args: Vec<String>,
    /// Gateway settings (its `control_plane` is set by `up`).
    pub gateway: GatewayOptions,
    /// Where the batch jobs (and the mesh's trust anchor) are kept.
    pub state_dir: PathBuf,
    /// mTLS in the mesh (`None`: plain HTTP inside the mesh, `--insecure`).
    pub mesh: Option<etlmesh_config::MeshSpec>,
    /// Reload the pipeline file when it changes (SIGHUP and the API always do).
    pub watch_config: bool,
    /// The MQTT broker to run in this process, if any.
    pub broker: Option<etlmesh_config::BrokerSpec>,
}

/// The addresses `up` serves on.
#[derive(Debug, Clone)]
pub struct Urls {
    /// The gateway.
    pub gateway: String,
    /// The control plane.
    pub admin: String,
    /// Arrow Flight, when on.
    pub flight: Option<String>,
    /// The control plane's mesh listener (mTLS), when the mesh has one.
    pub mesh: Option<String>,
    /// The trust anchor's file, when the control plane made it.
    pub anchor: Option<PathBuf>,
    /// The embedded MQTT broker (`mqtt://` or `mqtts://`), when it runs.
    pub broker: Option<String>,
}

/// Starts everything, calls `ready` with the URLs, and runs until `shutdown`.
pub async fn run(
    options: UpOptions,
    file: &PipelineFile,
    ready: impl FnOnce(&Urls),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), UpError> {
    let mut cp_opts = etlmesh_control::ControlOptions::new(options.admin);
    // The gateway runs here too: the control plane collects its lines itself.
    cp_opts.log_source = "up".into();
    cp_opts.energy = file.spec.platform.energy.clone();
    cp_opts.carbon = file.spec.platform.carbon.clone();
    cp_opts.jobs = Some(etlmesh_control::jobs::JobsOptions::new(
        options.state_dir.clone(),
        options.config.clone(),
        options.exe.clone(),
    ));
    cp_opts.mesh = options.mesh.as_ref().map(|spec| {
        etlmesh_control::mesh::MeshOptions::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &options.state_dir,
            spec,
        )
    });
    cp_opts.reload = Some(etlmesh_control::reload::ReloadOptions {
        path: options.config.clone(),
        state_dir: options.state_dir.clone(),
        fixed_workers: options.fixed_workers,
        watch: options.watch_config,
        initial: file.spec.clone(),
        validate_with: Some(options.exe.clone()),
    });
    // The broker first: workers of stream pipelines connect to it as they start.
    let broker = match &options.broker {
        Some(spec) => Some(etlmesh_broker::bind(spec).await?),
        None => None,
    };
    let control = etlmesh_control::bind(&cp_opts).await?;
    if let Some(b) = &broker {
        b.metrics().register(&mut control.registry.metrics.lock());
    }
    let admin = format!("http://{}", control.addr);
    // Processes of the mesh talk to the control plane on its mesh listener when it
    // has one.
    let members_url = control
        .mesh_addr
        .map_or_else(|| admin.clone(), |a| format!("https://{a}"));
    let mut gw_opts = options.gateway.clone();
    gw_opts.control_plane = members_url.clone();
    gw_opts.ship_logs = false;
    let gateway = etlmesh_gateway::bind(gw_opts).await?;
    // The public listeners speak TLS when the file gives them a certificate.
    let tls = options.gateway.access.tls.is_some();
    let urls = Urls {
        gateway: format!("{}://{}", if tls { "https" } else { "http" }, gateway.addr),
        admin: admin.clone(),
        flight: gateway
            .flight_addr
            .map(|a| format!("{}://{a}", if tls { "grpc+tls" } else { "grpc" })),
        mesh: control.mesh_addr.map(|a| format!("https://{a}")),
        anchor: match (&control.authority, &options.mesh) {
            (Some(_), Some(spec)) => Some(spec.ca.as_ref().map_or_else(
                || options.state_dir.join("mesh").join("ca.pem"),
                |c| c.cert.clone(),
            )),
            _ => None,
        },
        broker: broker.as_ref().map(|b| {
            let tls = options.broker.as_ref().is_some_and(|s| s.tls.is_some());
            format!("{}://{}", if tls { "mqtts" } else { "mqtt" }, b.addr())
        }),
    };
    let mut env = Vec::new();
    let join_token = etlmesh_control::worker_join_tokens(control.authority.clone());
    env.push((
        "ETLMESH_STATE_DIR".to_string(),
        options.state_dir.display().to_string(),
    ));
    let scaler = Arc::new(ProcessScaler::new(WorkerCommand {
        exe: options.exe.clone(),
        config: options.config.clone(),
        control_plane: members_url,
        extra: options.worker_args.clone(),
        env,
        join_token,
    }));
    let autoscale = etlmesh_control::AutoscaleConfig {
        pools: etlmesh_control::pools(file, options.fixed_workers),
        scaler,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (broker_stop_tx, broker_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let broker_task = broker.map(|b| {
        tokio::spawn(b.serve(async {
            let _ = broker_stop_rx.await;
        }))
    });
    // The control plane drains the workers first; the gateway stops after it.
    let cp_task = tokio::spawn(control.serve(Some(autoscale), stopped(stop_rx.clone())));
    let (gw_stop_tx, gw_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gw_task = tokio::spawn(gateway.serve(async {
        let _ = gw_stop_rx.await;
    }));
    ready(&urls);
    shutdown.await;
    tracing::info!("shutting down: draining workers");
    let _ = stop_tx.send(true);
    let cp = cp_task.await;
    let _ = gw_stop_tx.send(());
    let _ = broker_stop_tx.send(());
    if let Some(t) = broker_task {
        let _ = t.await;
    }
    if let Ok(r) = gw_task.await {
        r?;
    }
    if let Ok(r) = cp {
        r?;
    }
    Ok(())
}
