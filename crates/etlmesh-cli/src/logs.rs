//! `etlmesh logs` and `etlmesh errors`: what the control plane collected from every
//! process of the mesh.

use std::time::Duration;

use etlmesh_http::JsonClient;
use etlmesh_telemetry::logs::LogLine;

use crate::CliError;

/// Where the control plane answers (`etlmesh up` puts it on 127.0.0.1:7070).
#[derive(Debug, clap::Args)]
pub struct ControlPlaneArg {
    /// The control plane's address.
    #[arg(
        long,
        env = "ETLMESH_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7070"
    )]
    pub control_plane: String,
}

impl ControlPlaneArg {
    pub(crate) fn base(&self) -> String {
        base_url(&self.control_plane)
    }
}

/// An address as a base URL: `host:port` gets `http://`, a trailing `/` goes.
pub(crate) fn base_url(addr: &str) -> String {
    let s = addr.trim_end_matches('/');
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

/// `etlmesh logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub cp: ControlPlaneArg,
    /// Only this process (a worker id, a gateway id, `up` or `control-plane`).
    #[arg(long)]
    pub worker: Option<String>,
    /// This level or worse: error, warn, info, debug.
    #[arg(long)]
    pub level: Option<String>,
    /// Keep printing new lines as they arrive.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Lines to show first (the newest).
    #[arg(long, short = 'n', default_value_t = 100)]
    pub lines: usize,
    /// Print each line as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Deserialize)]
struct Page {
    lines: Vec<LogLine>,
    next: u64,
}

pub(crate) fn unreachable(base: &str, e: impl Into<crate::BoxError>) -> CliError {
    CliError::unreachable(crate::Peer::ControlPlane, base, e)
}

pub(crate) fn logs(args: &LogsArgs) -> Result<(), CliError> {
    let base = args.cp.base();
    let rt = crate::runtime(1)?;
    rt.block_on(async {
        let client = JsonClient::new(Duration::from_secs(5));
        let mut after = 0;
        let mut limit = args.lines;
        loop {
            let mut url = format!("{base}/api/v1/logs?after={after}&limit={limit}");
            if let Some(w) = &args.worker {
                url.push_str(&format!("&worker={}", etlmesh_http::encode_component(w)));
            }
            if let Some(l) = &args.level {
                url.push_str(&format!("&level={}", etlmesh_http::encode_component(l)));
            }
            let page: Page = client.get(&url).await.map_err(|e| unreachable(&base, e))?;
            for l in &page.lines {
                if args.json {
                    println!("{}", serde_json::to_string(l).unwrap_or_default());
                } else {
                    println!("{}", l.to_text());
                }
            }
            if !args.follow {
                return Ok(());
            }
            after = page.next;
            limit = 4000;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}

/// `etlmesh errors`.
#[derive(Debug, clap::Args)]
pub struct ErrorsArgs {
    #[command(flatten)]
    pub cp: ControlPlaneArg,
    /// Print the JSON the control plane answers.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn errors(args: &ErrorsArgs) -> Result<(), CliError> {
    let base = args.cp.base();
    let rt = crate::runtime(1)?;
    let v: serde_json::Value = rt.block_on(async {
        JsonClient::new(Duration::from_secs(5))
            .get(&format!("{base}/api/v1/errors"))
            .await
            .map_err(|e| unreachable(&base, e))
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let groups = v["groups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        println!("no errors");
        return Ok(());
    }
    println!(
        "{:>7}  {:<5}  {:<24}  {:<16}  {:<24}  example trace / message",
        "count", "level", "kind", "pipeline", "last seen"
    );
    for g in groups {
        let s = |k: &str| g[k].as_str().unwrap_or("-").to_string();
        let trace = g["trace_ids"]
            .as_array()
            .and_then(|t| t.last())
            .and_then(|t| t.as_str())
            .unwrap_or("-")
            .to_string();
        println!(
            "{:>7}  {:<5}  {:<24}  {:<16}  {:<24}  {trace}  {}",
            g["count"].as_u64().unwrap_or(0),
            s("level"),
            s("kind"),
            s("pipeline"),
            s("last_seen"),
            s("last_message")
        );
    }
    Ok(())
}
