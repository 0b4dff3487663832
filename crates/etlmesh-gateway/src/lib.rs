//! The gateway: `etlmesh gateway`, the front door of the mesh.
//!
//! It follows the control plane's endpoint set ([`discovery`]) and routes each
//! request to a worker that serves its pipeline ([`route`]): power of two choices over
//! peak-EWMA load, a concurrency limit and failure accrual per worker ([`accrual`]), a
//! bounded queue that sheds load with 503 and Retry-After, retries on another worker
//! under a budget when the body was kept, and a deadline on every request. It does not
//! decode: the body streams to the worker, and the answer streams back ([`http`]).
//! Batch-job requests (`/v1/jobs`) pass through to the control plane, which keeps and
//! runs the jobs ([`jobs`]). `POST /v1/query` runs read-only SQL over the datasets the
//! pipelines' sinks wrote, when the gateway was given the pipeline file ([`query`]).

pub mod access;
pub mod accrual;
pub mod analytics_process;
mod api;
pub mod discovery;
mod dispatch;
pub mod endpoint;
mod flight;
mod http;
mod jobs;
mod metrics;
pub mod openapi;
mod query;
mod refusal;
mod report;
pub mod route;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use etlmesh_http::serve::Listen;
use etlmesh_http::shutdown::{self, Shutdown, Tasks};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::retry::budget::TpsBudget;

pub use route::RouteOptions;

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// It cannot listen.
    #[error("gateway: cannot listen on {addr}: {error}\n  help: choose a free port with --listen")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
    /// Serving failed.
    #[error("gateway: {0}")]
    Serve(String),
}

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// The HTTP listener.
    pub listen: SocketAddr,
    /// The Arrow Flight listener, if any.
    pub flight: Option<SocketAddr>,
    /// The control plane (`http://host:port`).
    pub control_plane: String,
    /// The largest request body.
    pub max_body_bytes: usize,
    /// Bodies up to this size are kept, so that a failed request can be retried.
    pub retry_buffer_bytes: usize,
    /// Deadline of a request that asks for none.
    pub default_deadline: Duration,
    /// The longest deadline a request may ask for.
    pub max_deadline: Duration,
    /// Retries of one request at most.
    pub max_retries: u32,
    /// Requests held at most per pipeline while no worker is ready (activation).
    pub activation_queue: usize,
    /// How long a held request waits for a worker to start (its deadline, if shorter).
    pub activation_wait: Duration,
    /// This gateway's id in load reports.
    pub id: String,
    /// Routing settings.
    pub route: RouteOptions,
    /// Ship this process's log lines to the control plane (off when the control plane
    /// runs in the same process and collects them itself).
    pub ship_logs: bool,
    /// Per-request metrics and trace spans (off only to measure what they cost).
    pub telemetry: bool,
    /// The analytics service behind `POST /v1/query` (none without a pipeline file);
    /// it also describes the datasets (`GET /v1/datasets`).
    pub analytics: Option<Arc<etlmesh_query::Analytics>>,
    /// Where queries run when not in this process ([`analytics_process`]).
    pub analytics_process: Option<Arc<analytics_process::AnalyticsProcess>>,
    /// Tokens, CORS and TLS (`platform.access`); open without tokens.
    pub access: etlmesh_config::AccessSpec,
}

impl GatewayOptions {
    /// Defaults for a gateway on `listen` following `control_plane`.
    pub fn new(listen: SocketAddr, control_plane: impl Into<String>) -> Self {
        Self {
            listen,
            flight: None,
            control_plane: control_plane.into(),
            max_body_bytes: 64 << 20,
            retry_buffer_bytes: 4 << 20,
            default_deadline: Duration::from_secs(10),
            max_deadline: Duration::from_secs(300),
            max_retries: 3,
            activation_queue: 256,
            activation_wait: Duration::from_secs(30),
            id: format!("gateway-{}", std::process::id()),
            route: RouteOptions::default(),
            ship_logs: true,
            telemetry: true,
            analytics: None,
            analytics_process: None,
            access: etlmesh_config::AccessSpec::default(),
        }
    }
}

/// What the handlers share.
pub struct Gateway {
    options: GatewayOptions,
    routes: Arc<discovery::Routes>,
    budget: Arc<TpsBudget>,
    metrics: metrics::GatewayMetrics,
    query_metrics: query::QueryMetrics,
    access: access::Access,
    registry: etlmesh_telemetry::metrics::SharedRegistry,
    connected: watch::Receiver<discovery::ControlLink>,
    activations: tokio::sync::mpsc::Sender<String>,
    /// Passes job requests to the control plane.
    control: etlmesh_http::JsonClient,
}

/// A gateway bound to its sockets.
pub struct Bound {
    /// The HTTP address.
    pub addr: SocketAddr,
    /// The Arrow Flight address.
    pub flight_addr: Option<SocketAddr>,
    listener: TcpListener,
    flight: Option<TcpListener>,
    gateway: Arc<Gateway>,
    connected: watch::Sender<discovery::ControlLink>,
    activations: tokio::sync::mpsc::Receiver<String>,
}

/// Binds the gateway's socket.
pub async fn bind(options: GatewayOptions) -> Result<Bound, GatewayError> {
    let listener =
        TcpListener::bind(options.listen)
            .await
            .map_err(|error| GatewayError::Listen {
                addr: options.listen,
                error,
            })?;
    let addr = listener
        .local_addr()
        .map_err(|e| GatewayError::Serve(e.to_string()))?;
    let flight = match options.flight {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|error| GatewayError::Listen { addr: a, error })?,
        ),
        None => None,
    };
    let flight_addr = flight.as_ref().and_then(|l| l.local_addr().ok());
    let registry = etlmesh_telemetry::metrics::registry();
    let metrics = metrics::GatewayMetrics::register(&registry);
    let routes = Arc::new(discovery::Routes::new(
        endpoint::h2_client(),
        options.route,
        metrics.clone(),
    ));
    let (connected, connected_rx) = watch::channel(discovery::ControlLink::Never);
    let (activations_tx, activations) = tokio::sync::mpsc::channel(64);
    let access = access::Access::new(&options.access, &registry);
    let gateway = Arc::new(Gateway {
        options,
        routes,
        budget: route::RetryPolicy::budget(),
        metrics,
        query_metrics: query::QueryMetrics::register(&registry),
        access,
        registry,
        connected: connected_rx,
        activations: activations_tx,
        control: etlmesh_http::JsonClient::new(std::time::Duration::from_secs(10)),
    });
    Ok(Bound {
        addr,
        flight_addr,
        listener,
        flight,
        gateway,
        connected,
        activations,
    })
}

impl Bound {
    /// Follows the control plane and serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        let gw = self.gateway;
        let mut tasks = Tasks::default();
        tasks.spawn(
            "discovery",
            discovery::follow(
                gw.options.control_plane.clone(),
                gw.routes.clone(),
                self.connected,
            ),
        );
        tasks.spawn(
            "load report",
            report::report(
                gw.options.control_plane.clone(),
                gw.options.id.clone(),
                gw.routes.clone(),
                self.activations,
            ),
        );
        if gw.options.ship_logs {
            tasks.spawn(
                "log shipper",
                etlmesh_http::logship::ship_logs(
                    gw.options.control_plane.clone(),
                    gw.options.id.clone(),
                ),
            );
        }
        let router = api::api()
            .router
            .layer(axum::middleware::from_fn_with_state(
                gw.clone(),
                access::layer,
            ))
            // Handlers that take a body read it with their own bound (transform: the
            // max body; query and jobs: 64 KiB); anything else is refused past 64 KiB.
            .layer(DefaultBodyLimit::max(jobs::MAX_JOB_BODY))
            .with_state(gw.clone());
        let (trigger, stop) = shutdown::channel();
        tokio::spawn(async move {
            shutdown.await;
            trigger.fire();
        });
        let flight_task = self
            .flight
            .map(|listener| serve_flight(&gw, listener, self.flight_addr, stop.clone()))
            .transpose()?;
        let listen = match &gw.options.access.tls {
            Some(spec) => {
                let config =
                    tls::server_config(spec, tls::HTTP_ALPN).map_err(GatewayError::Serve)?;
                Listen::tls(self.listener, config, None)
                    .map_err(|e| GatewayError::Serve(e.to_string()))?
            }
            None => Listen::Plain(self.listener),
        };
        tracing::info!(addr = %self.addr, control_plane = %gw.options.control_plane, "gateway listening on {}://{}", listen.scheme(), self.addr);
        etlmesh_http::serve::serve(listen, router, stop.fired()).await;
        if let Some(t) = flight_task
            && let Ok(Err(e)) = t.await
        {
            tracing::warn!(error = %e, "Arrow Flight server stopped with an error");
        }
        tasks.stop().await;
        Ok(())
    }
}

/// Serves Arrow Flight on `listener` (over TLS when the gateway's API has it) until
/// `stop` fires.
fn serve_flight(
    gw: &Arc<Gateway>,
    listener: TcpListener,
    addr: Option<SocketAddr>,
    stop: Shutdown,
) -> Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>, GatewayError> {
    let svc = arrow_flight::flight_service_server::FlightServiceServer::new(
        flight::FlightGateway::new(gw.clone()),
    )
    .max_decoding_message_size(gw.options.max_body_bytes)
    .max_encoding_message_size(gw.options.max_body_bytes);
    let addr = addr.map(|a| a.to_string()).unwrap_or_default();
    let server = tonic::transport::Server::builder().add_service(svc);
    Ok(match &gw.options.access.tls {
        Some(spec) => {
            let incoming = tls::flight_incoming(listener, spec).map_err(GatewayError::Serve)?;
            tracing::info!(%addr, "gateway Arrow Flight listening on grpc+tls://{addr}");
            tokio::spawn(server.serve_with_incoming_shutdown(incoming, stop.fired()))
        }
        None => {
            tracing::info!(%addr, "gateway Arrow Flight listening on grpc://{addr}");
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            tokio::spawn(server.serve_with_incoming_shutdown(incoming, stop.fired()))
        }
    })
}
