//! `etlmesh up`: the embedded default. The control plane and the gateway run in this
//! process; N workers run as child processes (`etlmesh worker`), restarted with
//! backoff when they exit, their log lines interleaved with a `[worker-N]` prefix. On
//! shutdown the workers get SIGTERM and drain.

mod supervisor;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use etlmesh_gateway::GatewayOptions;

pub use supervisor::Supervisor;

/// Errors of `up`.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The control plane.
    #[error("{0}")]
    Control(#[from] etlmesh_control::ControlError),
    /// The gateway.
    #[error("{0}")]
    Gateway(#[from] etlmesh_gateway::GatewayError),
}

/// How `up` runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The pipeline file the workers serve.
    pub config: PathBuf,
    /// Workers.
    pub workers: usize,
    /// The gateway's HTTP address.
    pub http: SocketAddr,
    /// The control plane's address (admin API, worker protocol).
    pub admin: SocketAddr,
    /// The `etlmesh` executable that runs workers.
    pub exe: PathBuf,
    /// Extra arguments for every worker.
    pub worker_args: Vec<String>,
    /// Gateway settings (its `listen` and `control_plane` are set by `up`).
    pub gateway: Option<GatewayOptions>,
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
}

/// Starts everything, calls `ready` with the URLs, and runs until `shutdown`.
pub async fn run(
    options: UpOptions,
    ready: impl FnOnce(&Urls),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), UpError> {
    let control =
        etlmesh_control::bind(&etlmesh_control::ControlOptions::new(options.admin)).await?;
    let admin = format!("http://{}", control.addr);
    let mut gw_opts = options
        .gateway
        .clone()
        .unwrap_or_else(|| GatewayOptions::new(options.http, admin.clone()));
    gw_opts.listen = options.http;
    gw_opts.control_plane = admin.clone();
    let gateway = etlmesh_gateway::bind(gw_opts).await?;
    let urls = Urls {
        gateway: format!("http://{}", gateway.addr),
        admin: admin.clone(),
        flight: gateway.flight_addr.map(|a| format!("grpc://{a}")),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let cp_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let gw_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let cp_task = tokio::spawn(control.serve(cp_stop));
    let gw_task = tokio::spawn(gateway.serve(gw_stop));
    let supervisor = Supervisor::start(
        options.exe.clone(),
        options.config.clone(),
        admin.clone(),
        options.workers,
        options.worker_args.clone(),
    );
    ready(&urls);
    shutdown.await;
    tracing::info!("shutting down: draining workers");
    supervisor.stop(Duration::from_secs(35)).await;
    let _ = stop_tx.send(true);
    if let Ok(r) = gw_task.await {
        r?;
    }
    if let Ok(r) = cp_task.await {
        r?;
    }
    Ok(())
}
