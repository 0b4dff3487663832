//! `etlmesh job submit|status|list|cancel`: batch jobs through the gateway's `/v1/jobs`.

use std::path::PathBuf;
use std::time::Duration;

use etlmesh_http::JsonClient;
use etlmesh_proto::jobs::{Job, JobRequest};
use http::Method;

use crate::{CliError, Peer};

/// Where the gateway answers.
#[derive(Debug, clap::Args)]
pub struct GatewayArg {
    /// The gateway's address.
    #[arg(long, env = "ETLMESH_GATEWAY", default_value = "http://127.0.0.1:8080")]
    pub gateway: String,
    /// The gateway's API token, when it asks for one.
    #[arg(long, env = "ETLMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// For an `https://` gateway: the PEM certificate it serves, or its CA.
    #[arg(long, env = "ETLMESH_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Print answers as JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `etlmesh job`.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub gw: GatewayArg,
    #[command(subcommand)]
    pub command: JobCommand,
}

/// What to do with jobs.
#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Submit a batch run; a deferrable one waits for the cleanest window before its deadline.
    Submit {
        /// The pipeline.
        #[arg(short, long)]
        pipeline: String,
        /// When it must be done: an RFC 3339 time, or a duration from now (`12h`).
        #[arg(long)]
        deadline: Option<String>,
        /// How long it should run (`10m`).
        #[arg(long, default_value = "10m", value_parser = crate::mesh::duration)]
        duration: Duration,
        /// Run at once, even with a deadline.
        #[arg(long)]
        now: bool,
        /// Input files or patterns (as the control plane's machine sees them).
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// Show a job; with --wait, until it has ended.
    Status {
        /// The job's id.
        id: String,
        /// Wait until it succeeded, failed or was cancelled.
        #[arg(long)]
        wait: bool,
    },
    /// List the newest jobs.
    List {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Cancel a waiting job, or stop a running one.
    Cancel {
        /// The job's id.
        id: String,
    },
}

/// A deadline: RFC 3339 as it is, a duration from now as RFC 3339.
fn deadline(s: &str) -> Result<String, CliError> {
    if chrono::DateTime::parse_from_rfc3339(s).is_ok() {
        return Ok(s.to_string());
    }
    let d = crate::mesh::duration(s).map_err(|e| {
        CliError::argument(
            "--deadline",
            format!("`{s}`: {e}\n  help: give an RFC 3339 time (2026-11-27T08:00:00Z) or a duration from now (12h)"),
        )
    })?;
    let at = chrono::Utc::now()
        + chrono::Duration::from_std(d)
            .map_err(|e| CliError::argument("--deadline", format!("`{s}` is too far away: {e}")))?;
    Ok(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Inputs as absolute paths, so that the control plane finds them whatever its directory.
fn absolute(inputs: &[String]) -> Vec<String> {
    inputs
        .iter()
        .map(|i| {
            let p = PathBuf::from(i);
            if p.is_absolute() {
                i.clone()
            } else {
                std::env::current_dir()
                    .map(|d| d.join(&p).display().to_string())
                    .unwrap_or_else(|_| i.clone())
            }
        })
        .collect()
}

async fn call(
    client: &JsonClient,
    method: Method,
    url: &str,
    body: Option<&JobRequest>,
) -> Result<serde_json::Value, CliError> {
    let bytes = body
        .map(serde_json::to_vec)
        .transpose()
        .map_err(CliError::from)?
        .unwrap_or_default();
    let (status, body) = client
        .send(method, url, bytes.into())
        .await
        .map_err(|e| CliError::unreachable(Peer::Gateway, url, e))?;
    if !status.is_success() {
        return Err(CliError::refused(Peer::Gateway, status, &body));
    }
    serde_json::from_slice(&body).map_err(|e| CliError::unreadable(Peer::Gateway, e))
}

/// One job in a few lines.
pub(crate) fn describe(j: &Job) -> String {
    let mut s = format!(
        "{}  {}  {}  inputs {}\n  scheduled {}  ({}; {:.0} gCO2e/kWh expected, {:.0} at once)\n",
        j.id,
        j.state.as_str(),
        j.pipeline,
        j.inputs.join(" "),
        j.scheduled_at,
        j.placement,
        j.expected_intensity,
        j.at_once_intensity,
    );
    if let Some(d) = &j.deadline {
        s.push_str(&format!("  deadline {d}\n"));
    }
    if let Some(t) = &j.started_at {
        s.push_str(&format!("  started {t} (attempt {})\n", j.attempts));
    }
    if let Some(t) = &j.finished_at {
        s.push_str(&format!(
            "  finished {t}: {:.2} CPU s, {:.2} J, {:.4} gCO2e\n",
            j.cpu_seconds, j.joules, j.carbon_g
        ));
    }
    if let Some(e) = &j.error {
        s.push_str(&format!("  error: {e}\n"));
    }
    if let Some(summary) = &j.summary {
        s.push_str(&format!("  summary: {summary}\n"));
    }
    s.push_str(&format!("  log: {}\n", j.log));
    s
}

fn print(v: &serde_json::Value, json: bool) -> Result<(), CliError> {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return Ok(());
    }
    let jobs: Vec<Job> = match v.get("jobs") {
        Some(list) => serde_json::from_value(list.clone()),
        None => serde_json::from_value(v.clone()).map(|j| vec![j]),
    }
    .map_err(|e| CliError::unreadable(Peer::Gateway, e))?;
    if jobs.is_empty() {
        println!("no jobs");
    }
    for j in &jobs {
        print!("{}", describe(j));
    }
    Ok(())
}

pub(crate) fn job(args: &JobArgs) -> Result<(), CliError> {
    let base = crate::logs::base_url(&args.gw.gateway);
    let json = args.gw.json;
    let rt = crate::runtime(1)?;
    let client = crate::gateway_client(
        Duration::from_secs(10),
        &args.gw.gateway,
        args.gw.token.clone(),
        args.gw.ca_cert.as_deref(),
    )?;
    rt.block_on(async {
        match &args.command {
            JobCommand::Submit {
                pipeline,
                deadline: d,
                duration,
                now,
                inputs,
            } => {
                let req = JobRequest {
                    pipeline: pipeline.clone(),
                    inputs: absolute(inputs),
                    deadline: d.as_deref().map(deadline).transpose()?,
                    expected_duration_secs: duration.as_secs_f64(),
                    deferrable: now.then_some(false),
                };
                let v = call(
                    &client,
                    Method::POST,
                    &format!("{base}/v1/jobs"),
                    Some(&req),
                )
                .await?;
                print(&v, json)
            }
            JobCommand::Status { id, wait } => loop {
                let url = format!("{base}/v1/jobs/{}", etlmesh_http::encode_component(id));
                let v = call(&client, Method::GET, &url, None).await?;
                let done = serde_json::from_value::<Job>(v.clone())
                    .map(|j| j.state.is_final())
                    .unwrap_or(true);
                if !wait || done {
                    return print(&v, json);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            },
            JobCommand::List { state, limit } => {
                let mut url = format!("{base}/v1/jobs?limit={limit}");
                if let Some(s) = state {
                    url.push_str(&format!("&state={}", etlmesh_http::encode_component(s)));
                }
                let v = call(&client, Method::GET, &url, None).await?;
                print(&v, json)
            }
            JobCommand::Cancel { id } => {
                let url = format!("{base}/v1/jobs/{}", etlmesh_http::encode_component(id));
                let v = call(&client, Method::DELETE, &url, None).await?;
                print(&v, json)
            }
        }
    })
}
