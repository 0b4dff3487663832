//! `etlmesh analytics`: the analytics service in a process of its own, capped in
//! address space (`platform.query.process_memory`), which `etlmesh up` starts, watches
//! and restarts — so that a query that allocates past every other bound ends this
//! process, never the gateway, the control plane or the certificate authority.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etlmesh_config::PipelineFile;
use etlmesh_gateway::analytics_process::AnalyticsProcess;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{CliError, runtime};

/// The variable that carries the key the gateway sends.
const KEY_ENV: &str = "ETLMESH_ANALYTICS_KEY";

/// Arguments of `analytics`.
#[derive(Debug, clap::Args)]
pub struct AnalyticsArgs {
    /// The pipeline file (its datasets and `platform.query`).
    #[arg(short, long = "config", value_name = "FILE")]
    pub config: PathBuf,
    /// Where to listen (loopback: only its gateway calls it).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

pub(crate) fn analytics(args: &AnalyticsArgs) -> Result<(), CliError> {
    let key = std::env::var(KEY_ENV).map_err(|_| {
        CliError::argument(
            KEY_ENV,
            "is required: the key its gateway sends (etlmesh up sets it)",
        )
    })?;
    let file = PipelineFile::load(&args.config)?;
    let cap = file.spec.platform.query.process_memory;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, cap, cap)
        .map_err(|e| CliError::io(format!("cap the address space at {cap} bytes"))(e.into()))?;
    let service = crate::mesh::analytics(&file)?;
    let rt = runtime(2)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(CliError::io(format!(
                "listen on {} (analytics)",
                args.listen
            )))?;
        let addr = listener
            .local_addr()
            .map_err(CliError::io("read the analytics listener's address"))?;
        tracing::info!(%addr, process_memory = cap, "analytics listening on http://{addr}");
        let stop = async {
            tokio::select! {
                () = crate::mesh::shutdown_signal() => {}
                () = etlmesh_scale::process::supervisor_gone() => {}
            }
        };
        etlmesh_http::serve::serve(
            etlmesh_http::serve::Listen::Plain(listener),
            etlmesh_gateway::analytics_process::router(service, key),
            stop,
        )
        .await;
        Ok(())
    })
}

/// Starts the analytics process on `rt` ([`spawn`]) and waits (15 s at most) until it
/// answers: a gateway serves queries from its first request on.
pub(crate) fn start(
    rt: &tokio::runtime::Runtime,
    exe: &Path,
    config: &Path,
    file: &PipelineFile,
) -> Result<Arc<AnalyticsProcess>, CliError> {
    let process = {
        let _in_runtime = rt.enter();
        spawn(exe, config, file)?
    };
    if !rt.block_on(process.wait_ready(Duration::from_secs(15))) {
        tracing::warn!("the analytics process is not ready yet: queries answer 503 until it is");
    }
    Ok(process)
}

/// Starts `etlmesh analytics` for `config` and keeps it running (restarted at once
/// when it ends: a query took it past its cap); the gateway's handle to it.
fn spawn(
    exe: &Path,
    config: &Path,
    file: &PipelineFile,
) -> Result<Arc<AnalyticsProcess>, CliError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(CliError::io("find a free port for the analytics process"))?;
    let mut secret = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| CliError::Random)?;
    let key: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let q = &file.spec.platform.query;
    let process = Arc::new(AnalyticsProcess::new(
        format!("http://127.0.0.1:{port}"),
        key.clone(),
        (q.max_result_bytes as usize).saturating_mul(4).max(8 << 20),
        q.timeout + Duration::from_secs(5),
    ));
    let (exe, config) = (exe.to_path_buf(), config.to_path_buf());
    tokio::spawn(async move {
        loop {
            let child = tokio::process::Command::new(&exe)
                .arg("analytics")
                .arg("-c")
                .arg(&config)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .env(KEY_ENV, &key)
                .env(
                    etlmesh_scale::process::SUPERVISOR_ENV,
                    std::process::id().to_string(),
                )
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the analytics process");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            if let Some(err) = child.stderr.take() {
                tokio::spawn(async move {
                    let mut lines = BufReader::new(err).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        eprintln!("[analytics] {line}");
                    }
                });
            }
            let status = child.wait().await;
            tracing::warn!(status = ?status.ok(), error_kind = "analytics_process_died", "the analytics process ended; restarting it");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(process)
}
