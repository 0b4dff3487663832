//! The mesh's processes: `etlmesh worker`, `control-plane`, `gateway` and `up`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etlmesh_config::PipelineFile;
use etlmesh_scale::kubernetes::{KubernetesOptions, KubernetesScaler, WorkloadKind};
use etlmesh_scale::process::{ProcessScaler, WorkerCommand};

use crate::{CliError, runtime};

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
    stop_signal().await;
}

/// Which signal asked a process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// SIGTERM: a scale-down or an orchestrator moving the process; a worker leaves
    /// its pool for good.
    Terminate,
    /// SIGINT (Ctrl-C; the process scaler stopping the whole mesh): the process will
    /// be back; a worker keeps its stream subscriptions.
    Interrupt,
}

/// Completes on SIGTERM or SIGINT, saying which.
pub(crate) async fn stop_signal() -> Stop {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {
            tracing::info!("SIGTERM received");
            Stop::Terminate
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupt received");
            Stop::Interrupt
        }
    }
}

/// A listening address, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct Listen(pub Option<SocketAddr>);

fn listen_or_off(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("`{s}` is not host:port or `off`: {e}"))
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    etlmesh_config::units::parse_duration(s)
}

/// Arguments of `worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The pipeline file.
    #[arg(short, long = "config", value_name = "FILE")]
    pub config: PathBuf,
    /// Where to listen (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The control plane to register with: its mesh address (`https://host:port`,
    /// mTLS, with --join-token) or `http://host:port` in a mesh without mTLS;
    /// standalone without.
    #[arg(long, env = "ETLMESH_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    #[command(flatten)]
    pub join: JoinArg,
    /// The worker's id (default: worker-<pid>). A stream's broker session is named after
    /// it: give a stream worker a stable id so that a restart finds its session.
    #[arg(long)]
    pub id: Option<String>,
    /// Where streams keep their state between runs (sessions, window watermarks).
    #[arg(long, env = "ETLMESH_STATE_DIR", default_value = ".etlmesh")]
    pub state_dir: PathBuf,
    /// The address gateways use (default: from --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Requests served at once; more get 503.
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: usize,
    /// Worker threads (default: the file's platform.threads, else one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Fault injection: latency added to every transform (`50ms`).
    #[arg(long, value_parser = duration)]
    pub inject_latency: Option<Duration>,
    /// Serve only this pipeline (repeatable; every pipeline of the file by default).
    #[arg(long = "pipeline", value_name = "NAME")]
    pub pipelines: Vec<String>,
    /// No per-request metrics or trace spans (to measure what they cost).
    #[arg(long, env = "ETLMESH_NO_TELEMETRY")]
    pub no_telemetry: bool,
}

/// The join token of a mesh with mTLS.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArg {
    /// The control plane's join token (its state directory's `mesh/join-token`):
    /// needed to join a mesh whose control plane URL is `https://`.
    #[arg(long, env = "ETLMESH_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
}

/// Joins the mesh when `control_plane` is a mesh listener (`https://`): a certificate
/// for `name`, installed as this process's identity and renewed until exit.
async fn join_mesh(
    control_plane: &str,
    join: &JoinArg,
    name: &str,
    role: etlmesh_tls::Role,
    listen: SocketAddr,
) -> Result<Option<Arc<etlmesh_tls::Identity>>, CliError> {
    if !control_plane.starts_with("https://") {
        return Ok(None);
    }
    let token: etlmesh_tls::JoinToken = join
        .join_token
        .as_deref()
        .ok_or_else(|| {
            CliError::argument(
                "--join-token",
                format!("the control plane {control_plane} speaks mTLS: give its join token with --join-token or ETLMESH_JOIN_TOKEN (its state directory's mesh/join-token)"),
            )
        })?
        .parse()
        .map_err(CliError::from)?;
    let hosts: Vec<String> = if listen.ip().is_unspecified() {
        Vec::new()
    } else {
        vec![listen.ip().to_string()]
    };
    let identity = etlmesh_tls::join(
        control_plane,
        &token,
        name,
        role,
        &hosts,
        Duration::from_secs(30),
    )
    .await
    .map_err(|source| CliError::Join {
        name: name.to_string(),
        source,
    })?;
    etlmesh_tls::install(identity.clone());
    tokio::spawn(etlmesh_tls::renew_forever(
        identity.clone(),
        control_plane.to_string(),
    ));
    Ok(Some(identity))
}

pub(crate) fn worker(args: &WorkerArgs) -> Result<(), CliError> {
    let file = PipelineFile::load(&args.config)?;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let mut opts = etlmesh_worker::WorkerOptions::new(id, args.listen);
    opts.control_plane = args.control_plane.clone();
    opts.advertise = args.advertise.clone();
    opts.max_in_flight = args.max_in_flight.max(1);
    opts.inject_latency = args.inject_latency;
    opts.pipelines = args.pipelines.clone();
    opts.telemetry = !args.no_telemetry;
    let threads = args
        .threads
        .unwrap_or_else(|| file.spec.platform.effective_threads());
    let rt = runtime(threads)?;
    opts.state_dir = Some(args.state_dir.clone());
    let leave = opts.leave_on_stop.clone();
    let stop = async move {
        tokio::select! {
            stop = stop_signal() => {
                leave.store(stop == Stop::Terminate, std::sync::atomic::Ordering::Release);
            }
            () = etlmesh_scale::process::supervisor_gone() => {}
        }
    };
    rt.block_on(async {
        if let Some(cp) = &args.control_plane {
            opts.mesh = join_mesh(
                cp,
                &args.join,
                &opts.id,
                etlmesh_tls::Role::Worker,
                args.listen,
            )
            .await?;
        }
        etlmesh_worker::serve(file, opts, stop)
            .await
            .map_err(CliError::from)
    })
}

/// Arguments of `control-plane`.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// A worker silent for this long is removed.
    #[arg(long, default_value = "2500ms", value_parser = duration)]
    pub heartbeat_timeout: Duration,
    /// The pipeline file: with it, the control plane scales each pipeline's workers.
    #[arg(short, long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Who runs the workers when scaling.
    #[arg(long, value_enum, default_value_t = ScalerKind::Process)]
    pub scaler: ScalerKind,
    /// Reload the pipeline file (-c) when it changes (SIGHUP and
    /// `PUT /api/v1/pipelines` reload it too).
    #[arg(long, requires = "config")]
    pub watch_config: bool,
    /// Require mTLS in the mesh: the control plane becomes its certificate authority
    /// (the anchor and join token in the state directory's `mesh/`) and serves the
    /// worker protocol on this address only, to processes with its certificates.
    #[arg(long, value_name = "ADDR")]
    pub mesh_listen: Option<SocketAddr>,
    /// The mesh's trust anchor (PEM certificate) instead of one made on first start or
    /// the file's `platform.mesh.ca` (with --mesh-ca-key; the Helm chart's Secret).
    #[arg(long, value_name = "FILE", requires_all = ["mesh_ca_key", "mesh_listen"])]
    pub mesh_ca_cert: Option<PathBuf>,
    /// The trust anchor's private key (PEM), with --mesh-ca-cert.
    #[arg(long, value_name = "FILE", requires = "mesh_ca_cert")]
    pub mesh_ca_key: Option<PathBuf>,
    /// Kubernetes: the namespace of the worker workloads (the client's default).
    #[arg(long, value_name = "NS")]
    pub k8s_namespace: Option<String>,
    /// Kubernetes: the workload of each pipeline; `{pipeline}` is its name, `_` as `-`.
    #[arg(long, value_name = "NAME", default_value = "etlmesh-worker-{pipeline}")]
    pub k8s_deployment: String,
    /// Kubernetes: the kind of those workloads (a StatefulSet keeps a pod's name, and
    /// so its stream sessions, with its slot).
    #[arg(long, value_enum, default_value_t = WorkloadArg::Deployment)]
    pub k8s_kind: WorkloadArg,
    #[command(flatten)]
    pub state: StateDirArg,
}

/// Where the control plane keeps what must survive it (the batch jobs).
#[derive(Debug, Clone, clap::Args)]
pub struct StateDirArg {
    /// The state directory: the jobs database, job logs and summaries.
    #[arg(long, env = "ETLMESH_STATE_DIR", default_value = ".etlmesh")]
    pub state_dir: PathBuf,
}

fn current_exe() -> Result<PathBuf, CliError> {
    std::env::current_exe().map_err(CliError::io("find the etlmesh executable"))
}

/// The control plane's energy, carbon and jobs settings from the pipeline file.
fn green_options(
    opts: &mut etlmesh_control::ControlOptions,
    file: &PipelineFile,
    config: &std::path::Path,
    state: &StateDirArg,
) -> Result<(), CliError> {
    opts.energy = file.spec.platform.energy.clone();
    opts.carbon = file.spec.platform.carbon.clone();
    opts.jobs = Some(etlmesh_control::jobs::JobsOptions::new(
        state.state_dir.clone(),
        config.to_path_buf(),
        current_exe()?,
    ));
    Ok(())
}

/// Kubernetes workload kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadArg {
    /// Deployments.
    Deployment,
    /// StatefulSets.
    Statefulset,
}

/// Scalers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScalerKind {
    /// Workers as child processes of the control plane.
    Process,
    /// Each pipeline's worker Deployment, through its scale subresource.
    Kubernetes,
}

pub(crate) fn control_plane(args: &ControlArgs) -> Result<(), CliError> {
    // With a pipeline file, the control plane scales each pipeline's pool.
    let file = args.config.as_ref().map(PipelineFile::load).transpose()?;
    let scaled = match (&args.config, &file) {
        (Some(path), Some(f)) => Some((path, etlmesh_control::pools(f, None))),
        _ => None,
    };
    let rt = runtime(2)?;
    rt.block_on(async {
        let mut opts = etlmesh_control::ControlOptions::new(args.listen);
        opts.heartbeat_timeout = args.heartbeat_timeout;
        if let (Some(path), Some(f)) = (&args.config, &file) {
            green_options(&mut opts, f, path, &args.state)?;
            opts.reload = Some(etlmesh_control::reload::ReloadOptions {
                path: path.clone(),
                state_dir: args.state.state_dir.clone(),
                fixed_workers: None,
                watch: args.watch_config,
                initial: f.spec.clone(),
                validate_with: Some(current_exe()?),
            });
        }
        let mut mesh_spec = file
            .as_ref()
            .map(|f| f.spec.platform.mesh.clone())
            .unwrap_or_default();
        if let (Some(cert), Some(key)) = (&args.mesh_ca_cert, &args.mesh_ca_key) {
            mesh_spec.ca = Some(etlmesh_config::TlsSpec {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        opts.mesh = args.mesh_listen.map(|listen| {
            etlmesh_control::mesh::MeshOptions::new(listen, &args.state.state_dir, &mesh_spec)
        });
        let bound = etlmesh_control::bind(&opts).await?;
        let members_url = match bound.mesh_addr {
            Some(a) => {
                eprintln!(
                    "mesh (mTLS): https://{a}; workers and gateways join with the token in {}",
                    args.state.state_dir.join("mesh").join("join-token").display()
                );
                format!("https://{a}")
            }
            None => {
                tracing::warn!("the worker protocol is not authenticated: give --mesh-listen ADDR to require mTLS inside the mesh");
                format!("http://{}", bound.addr)
            }
        };
        let mut env = Vec::new();
        let join_token = etlmesh_control::worker_join_tokens(bound.authority.clone());
        env.push((
            "ETLMESH_STATE_DIR".to_string(),
            args.state.state_dir.display().to_string(),
        ));
        let mut autoscale = None;
        if let Some((path, pools)) = scaled {
            let scaler: Arc<dyn etlmesh_scale::Scaler> = match args.scaler {
                ScalerKind::Process => Arc::new(ProcessScaler::new(WorkerCommand {
                    exe: current_exe()?,
                    config: path.clone(),
                    control_plane: members_url.clone(),
                    extra: Vec::new(),
                    env: env.clone(),
                    join_token: join_token.clone(),
                })),
                ScalerKind::Kubernetes => Arc::new(
                    KubernetesScaler::connect(KubernetesOptions {
                        namespace: args.k8s_namespace.clone(),
                        deployment: args.k8s_deployment.clone(),
                        kind: match args.k8s_kind {
                            WorkloadArg::Deployment => WorkloadKind::Deployment,
                            WorkloadArg::Statefulset => WorkloadKind::StatefulSet,
                        },
                    })?,
                ),
            };
            autoscale = Some(etlmesh_control::AutoscaleConfig { pools, scaler });
        }
        bound
            .serve(autoscale, shutdown_signal())
            .await
            .map_err(CliError::from)
    })
}

/// Arguments of `gateway`.
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Where to listen for HTTP.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where to listen for Arrow Flight (`off` to disable).
    #[arg(long, default_value = "127.0.0.1:8815", value_parser = listen_or_off)]
    pub flight: Listen,
    /// The control plane: its mesh address (`https://host:port`, mTLS, with
    /// --join-token) or `http://host:port` in a mesh without mTLS.
    #[arg(
        long,
        env = "ETLMESH_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7070"
    )]
    pub control_plane: String,
    #[command(flatten)]
    pub join: JoinArg,
    /// Threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A pipeline file: its Parquet and PostgreSQL sinks become the datasets of
    /// `POST /v1/query` (limits in its `platform.query`).
    #[arg(short, long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: GatewayTuning,
}

/// Gateway settings shared by `gateway` and `up`.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayTuning {
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Bodies up to this size are kept for a retry, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub retry_buffer_bytes: usize,
    /// Deadline of requests that ask for none.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub default_deadline: Duration,
    /// Requests held for a worker before new ones get 503.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Requests in flight to one worker at most.
    #[arg(long, default_value_t = 64)]
    pub endpoint_concurrency: usize,
    /// Requests held per pipeline while its first worker starts (scale from zero).
    #[arg(long, default_value_t = 256)]
    pub activation_queue: usize,
    /// How long a held request waits for a worker before a 503.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub activation_wait: Duration,
    /// No per-request metrics or trace spans (to measure what they cost).
    #[arg(long, env = "ETLMESH_NO_TELEMETRY")]
    pub no_telemetry: bool,
}

impl GatewayTuning {
    fn apply(&self, o: &mut etlmesh_gateway::GatewayOptions) {
        o.max_body_bytes = self.max_body_bytes;
        o.retry_buffer_bytes = self.retry_buffer_bytes.min(self.max_body_bytes);
        o.default_deadline = self.default_deadline;
        o.route.queue = self.queue.max(1);
        o.route.endpoint_concurrency = self.endpoint_concurrency.max(1);
        o.activation_queue = self.activation_queue;
        o.activation_wait = self.activation_wait;
        o.telemetry = !self.no_telemetry;
    }
}

fn threads_default() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The analytics service over a pipeline file's datasets.
pub(crate) fn analytics(
    file: &PipelineFile,
) -> Result<std::sync::Arc<etlmesh_query::Analytics>, CliError> {
    let catalog = etlmesh_query::Catalog::from_spec(&file.spec);
    etlmesh_query::Analytics::new(catalog, file.spec.platform.query.clone())
        .map(std::sync::Arc::new)
        .map_err(CliError::from)
}

pub(crate) fn gateway(args: &GatewayArgs) -> Result<(), CliError> {
    let mut opts = etlmesh_gateway::GatewayOptions::new(args.listen, args.control_plane.clone());
    opts.flight = args.flight.0;
    args.tuning.apply(&mut opts);
    let file = match &args.config {
        Some(path) => Some((path, PipelineFile::load(path)?)),
        None => None,
    };
    if let Some((_, f)) = &file {
        opts.analytics = Some(analytics(f)?);
        opts.access = f.spec.platform.access.clone();
    }
    let rt = runtime(args.threads.unwrap_or_else(threads_default))?;
    if let Some((path, f)) = &file {
        // Queries run in a process of their own, as under `up`: the worst one ends
        // that process (capped at `platform.query.process_memory`), not the gateway.
        opts.analytics_process = Some(crate::analytics::start(&rt, &current_exe()?, path, f)?);
    }
    rt.block_on(async {
        join_mesh(
            &args.control_plane,
            &args.join,
            &opts.id,
            etlmesh_tls::Role::Gateway,
            args.listen,
        )
        .await?;
        let bound = etlmesh_gateway::bind(opts).await.map_err(CliError::from)?;
        bound.serve(shutdown_signal()).await.map_err(CliError::from)
    })
}

/// Arguments of `up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The pipeline file (or --demo).
    #[arg(
        short,
        long = "config",
        value_name = "FILE",
        required_unless_present = "demo"
    )]
    pub config: Option<PathBuf>,
    /// Run the demo pipelines built into the binary, with a sample to send.
    #[arg(long)]
    pub demo: bool,
    /// Workers per pipeline, fixed; without it each pipeline scales with its load
    /// within its `scaling` policy.
    #[arg(long)]
    pub workers: Option<u32>,
    /// The gateway's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// The gateway's Arrow Flight address (`off` to disable).
    #[arg(long, default_value = "127.0.0.1:8815", value_parser = listen_or_off)]
    pub flight: Listen,
    /// The control plane's address (admin API).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub admin: SocketAddr,
    /// Extra arguments for every worker (for example `--inject-latency=5ms`).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// Plain HTTP inside the mesh: no certificates, and any process that reaches the
    /// control plane or a worker is trusted. For debugging only.
    #[arg(long)]
    pub insecure: bool,
    /// Reload the pipeline file when it changes (SIGHUP and `PUT /api/v1/pipelines`
    /// reload it too).
    #[arg(long)]
    pub watch_config: bool,
    #[command(flatten)]
    pub tuning: GatewayTuning,
    #[command(flatten)]
    pub state: StateDirArg,
}

pub(crate) fn up(args: &UpArgs) -> Result<(), CliError> {
    let (config, stream) = match (&args.config, args.demo) {
        (Some(c), _) => (c.clone(), crate::demo::DemoStream::default()),
        (None, _) => crate::demo::prepare_mesh_demo()?,
    };
    // Fail early, with line numbers, if the file is wrong.
    let file = PipelineFile::load(&config)?;
    let exe = current_exe()?;
    let mut gw = etlmesh_gateway::GatewayOptions::new(args.http, String::new());
    gw.flight = args.flight.0;
    args.tuning.apply(&mut gw);
    gw.analytics = Some(analytics(&file)?);
    gw.access = file.spec.platform.access.clone();
    let rt = runtime(threads_default())?;
    // Queries run in a process of their own: the worst one ends it, not this one.
    gw.analytics_process = Some(crate::analytics::start(&rt, &exe, &config, &file)?);
    let options = etlmesh_up::UpOptions {
        config,
        fixed_workers: args.workers,
        admin: args.admin,
        exe,
        worker_args: args.worker_args.clone(),
        gateway: gw,
        state_dir: args.state.state_dir.clone(),
        mesh: (!args.insecure).then(|| file.spec.platform.mesh.clone()),
        watch_config: args.watch_config,
        broker: file.spec.platform.broker.clone().or_else(|| {
            stream.embedded.then(|| {
                etlmesh_config::BrokerSpec::new(std::net::SocketAddr::from(([127, 0, 0, 1], 1883)))
            })
        }),
    };
    if args.insecure {
        eprintln!(
            "WARNING: --insecure: the mesh runs WITHOUT mTLS; any process that can reach the control plane or a worker can register, read the endpoints or send work. Do not use it outside a test."
        );
        tracing::warn!("mesh without mTLS (--insecure)");
    }
    let demo = args.demo;
    let policies: Vec<String> = etlmesh_control::pools(&file, args.workers)
        .iter()
        .map(|(info, s)| {
            let mut line = format!(
                "  {:<14} {}–{} workers, {} in flight each",
                info.name, s.min_replicas, s.max_replicas, s.target_in_flight
            );
            if s.min_replicas == 0 {
                line.push_str(&format!(
                    "; none after {:?} idle, started by the next request",
                    s.idle_before_zero
                ));
            }
            line
        })
        .collect();
    if stream.broker {
        // Simulated devices feed the stream pipelines until etlmesh stops.
        let broker =
            etlmesh_mqtt::Broker::parse(crate::demo::DEMO_BROKER).map_err(CliError::from)?;
        let mut sim = etlmesh_mqtt::simulate::SimulateOptions::new(broker);
        sim.topic = "demo/{device_id}/reading".into();
        sim.devices = 20;
        sim.rate = 50.0;
        sim.malformed = 0.005;
        sim.late = 0.002;
        sim.client_id = format!("etlmesh-demo-devices-{}", std::process::id());
        rt.spawn(async move {
            // Let the workers subscribe first.
            tokio::time::sleep(Duration::from_secs(3)).await;
            if let Err(e) = etlmesh_mqtt::simulate::simulate(&sim, std::future::pending()).await {
                tracing::warn!(error = %e, "demo devices stopped");
            }
        });
    }
    rt.block_on(etlmesh_up::run(
        options,
        &file,
        move |urls| {
            eprintln!("etlmesh is up");
            eprintln!("  gateway        {}/v1/pipelines", urls.gateway);
            if let Some(f) = &urls.flight {
                eprintln!("  Arrow Flight   {f}");
            }
            eprintln!("  control plane  {}/api/v1/workers", urls.admin);
            match (&urls.mesh, &urls.anchor) {
                (Some(m), Some(a)) => eprintln!("  mesh (mTLS)    {m}   (trust anchor {})", a.display()),
                _ => eprintln!("  mesh           plain HTTP (--insecure): no mTLS"),
            }
            if let Some(b) = &urls.broker {
                eprintln!("  MQTT broker    {b}   (embedded: MQTT 3.1.1 and 5; metrics etlmesh_broker_*)");
            }
            eprintln!("  metrics        {}/metrics  {}/metrics", urls.gateway, urls.admin);
            eprintln!("  scaling        {}/api/v1/scaling", urls.admin);
            eprintln!(
                "  dashboard      {}/ui   (or: etlmesh top, etlmesh logs -f, etlmesh errors, etlmesh tap PIPELINE)",
                urls.admin
            );
            eprintln!("  energy         {}/api/v1/energy   (or: etlmesh energy)", urls.admin);
            eprintln!("  batch jobs     {}/v1/jobs   (or: etlmesh job submit|status|list|cancel)", urls.gateway);
            eprintln!("  analytics      {}/v1/query   (or: etlmesh query \"SELECT …\"; datasets: {}/v1/datasets)", urls.gateway, urls.gateway);
            for p in &policies {
                eprintln!("{p}");
            }
            if stream.broker {
                eprintln!("streaming: 20 simulated devices → mqtt://{} demo/+/reading → data/out/live, data/out/live_per_minute (Parquet){}", crate::demo::DEMO_BROKER, if stream.postgres { ", PostgreSQL table demo_readings" } else { "" });
            }
            if demo {
                eprintln!("try:");
                eprintln!(
                    "  curl -s -H 'Content-Type: text/csv' -H 'Accept: application/x-ndjson' --data-binary @data/sample.csv {}/v1/pipelines/clean_readings | head -3",
                    urls.gateway
                );
                eprintln!(
                    "  etlmesh job submit --pipeline clean_readings --deadline 12h --duration 1m data/sample.csv"
                );
            }
            eprintln!("Ctrl-C stops it (workers drain first).");
        },
        shutdown_signal(),
    ))
    .map_err(CliError::from)
}
