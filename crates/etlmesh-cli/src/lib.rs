//! The `etlmesh` command line: argument types and one module per subcommand. The
//! binary only parses arguments, sets up logging and calls [`execute`].

mod analytics;
mod broker;
mod deadletters;
mod demo;
mod energy;
mod error;
mod generate;
mod job;
mod logs;
mod mesh;
mod query;
mod run;
mod simulate;
mod simulate_nats;
mod sql_diag;
mod subscribe_kafka;
mod tap;
mod test;
mod token;
mod top;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

pub use error::{BoxError, CliError, Peer};

/// etlmesh: an ETL platform with its own service mesh.
#[derive(Debug, Parser)]
#[command(name = "etlmesh", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr: text on a terminal and JSON otherwise, unless set.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto, env = "ETLMESH_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a pipeline file: keys, values, the SQL against the schema, the sinks.
    Validate(validate::ValidateArgs),
    /// Run a pipeline as a batch job over files (or stdin), on this machine.
    Run(run::RunArgs),
    /// Run the pipeline file's tests: records through its pipelines, without a server,
    /// against the rows and dead letters they expect.
    Test(test::TestArgs),
    /// Write realistic IoT readings (with some bad rows) to a file or stdout.
    Generate(generate::GenerateArgs),
    /// Try it: generate readings and run the example pipelines over them as batch jobs.
    Demo(demo::DemoArgs),
    /// The embedded default: control plane and gateway here, workers as child processes.
    Up(mesh::UpArgs),
    /// An ETL worker: serves transforms, registers with the control plane.
    Worker(mesh::WorkerArgs),
    /// The analytics service in a process of its own, capped in memory (etlmesh up
    /// starts it; the gateway passes /v1/query to it).
    Analytics(analytics::AnalyticsArgs),
    /// The control plane: registry of workers, endpoint streams, admin API.
    ControlPlane(mesh::ControlArgs),
    /// Virtual IoT devices publishing readings to an MQTT broker.
    Simulate(simulate::SimulateArgs),
    /// The embedded MQTT broker on its own (MQTT 3.1.1 and 5, persistent sessions,
    /// shared subscriptions); `etlmesh up` runs it itself with `platform.broker`.
    Broker(broker::BrokerArgs),
    /// Count the messages of an MQTT topic (a bare subscriber).
    Subscribe(simulate::SubscribeArgs),
    /// The gateway: the front door, routing requests to workers.
    Gateway(mesh::GatewayArgs),
    /// A pipeline's dead letters: list them by reason, show them, replay them through
    /// the pipeline as it is now.
    Deadletters(deadletters::DeadLettersArgs),
    /// Recent log lines of every process, collected by the control plane.
    Logs(logs::LogsArgs),
    /// Errors of every process, grouped by kind and pipeline.
    Errors(logs::ErrorsArgs),
    /// A live view of the mesh in the terminal: pipelines, workers, rates, errors.
    Top(top::TopArgs),
    /// Live records of a pipeline (input, output or dead letters) from its workers.
    Tap(tap::TapArgs),
    /// Energy, carbon and SCI of each pipeline, from the control plane.
    Energy(energy::EnergyArgs),
    /// Carbon-aware batch jobs: submit, status, list, cancel (through the gateway).
    Job(job::JobArgs),
    /// Read-only SQL over the datasets the pipelines wrote (through the gateway).
    Query(query::QueryArgs),
    /// API tokens for the gateway (`platform.access.tokens`).
    Token(token::TokenArgs),
}

/// Runs a mesh process, exporting its spans over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (flushed when it returns), sampled as
/// `OTEL_TRACES_SAMPLER` says.
fn with_otlp(service: &str, run: impl FnOnce() -> Result<(), CliError>) -> Result<(), CliError> {
    let _flush_at_end =
        etlmesh_telemetry::otlp::init_from_env(service).map_err(CliError::Telemetry)?;
    run()
}

/// Runs a parsed command line.
pub fn execute(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Validate(a) => validate::validate(&a),
        Command::Run(a) => run::run(&a),
        Command::Test(a) => test::test(&a),
        Command::Generate(a) => generate::generate(&a),
        Command::Demo(a) => demo::demo(&a),
        Command::Up(a) => with_otlp("etlmesh-up", || mesh::up(&a)),
        Command::Worker(a) => with_otlp("etlmesh-worker", || mesh::worker(&a)),
        Command::Analytics(a) => analytics::analytics(&a),
        Command::ControlPlane(a) => with_otlp("etlmesh-control-plane", || mesh::control_plane(&a)),
        Command::Gateway(a) => with_otlp("etlmesh-gateway", || mesh::gateway(&a)),
        Command::Simulate(a) => simulate::simulate(&a),
        Command::Subscribe(a) => simulate::subscribe(&a),
        Command::Deadletters(a) => deadletters::deadletters(&a),
        Command::Logs(a) => logs::logs(&a),
        Command::Errors(a) => logs::errors(&a),
        Command::Top(a) => top::top(&a),
        Command::Tap(a) => tap::tap(&a),
        Command::Energy(a) => energy::energy(&a),
        Command::Job(a) => job::job(&a),
        Command::Query(a) => query::query(&a),
        Command::Token(a) => token::token(&a),
        Command::Broker(a) => broker::broker(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A runtime for async work, with `threads` workers.
pub(crate) fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("etlmesh")
        .enable_all()
        .build()
        .map_err(CliError::io("start the async runtime"))
}

/// A client for the gateway's public side at `gateway`, with its API token; an
/// `https://` gateway is verified against `ca_cert` (the certificate it serves, or its CA).
pub(crate) fn gateway_client(
    timeout: std::time::Duration,
    gateway: &str,
    token: Option<String>,
    ca_cert: Option<&std::path::Path>,
) -> Result<etlmesh_http::JsonClient, CliError> {
    let client = match ca_cert {
        Some(ca) => etlmesh_http::JsonClient::trusting(timeout, ca)
            .map_err(|e| CliError::argument("--ca-cert", e.to_string()))?,
        None if gateway.starts_with("https://") => {
            return Err(CliError::argument(
                gateway,
                "it speaks TLS, and no certificate to trust was given\n  help: pass the PEM certificate the gateway serves (or its CA) with --ca-cert FILE or ETLMESH_CA_CERT",
            ));
        }
        None => etlmesh_http::JsonClient::new(timeout),
    };
    Ok(client.with_bearer(token))
}

/// The pipeline file argument, shared by subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The pipeline file.
    #[arg(short, long = "config", value_name = "FILE")]
    pub config: PathBuf,
}
