//! `etlmesh tap PIPELINE`: live records of a pipeline from every worker that serves
//! it, as NDJSON on standard output, through the control plane (which reaches the
//! workers over the mesh's mTLS). Workers pay nothing while no tap is open.

use std::time::Duration;

use bytes::Bytes;
use etlmesh_sink::tap::TapStage;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::logs::ControlPlaneArg;
use crate::{CliError, Peer};

/// `etlmesh tap`.
#[derive(Debug, clap::Args)]
pub struct TapArgs {
    #[command(flatten)]
    pub cp: ControlPlaneArg,
    /// The pipeline.
    pub pipeline: String,
    /// Where to listen: input (decoded records), output (rows for the sinks) or
    /// dead_letter (rejects with their reason).
    #[arg(long, default_value = "output")]
    pub stage: String,
    /// Records to show, from all workers together.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub limit: usize,
    /// Stop waiting after this long.
    #[arg(long, default_value = "60s", value_parser = crate::mesh::duration)]
    pub timeout: Duration,
}

pub(crate) fn tap(args: &TapArgs) -> Result<(), CliError> {
    let Some(stage) = TapStage::parse(&args.stage) else {
        return Err(CliError::argument(
            "--stage",
            format!(
                "no stage `{}`\n  help: tap one of input, output, dead_letter",
                args.stage
            ),
        ));
    };
    let base = args.cp.base();
    let url = format!(
        "{base}/api/v1/tap/{}?stage={}&limit={}&timeout_ms={}",
        etlmesh_http::encode_component(&args.pipeline),
        stage.as_str(),
        args.limit,
        args.timeout.as_millis()
    );
    let rt = crate::runtime(1)?;
    rt.block_on(async {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: http::Uri = url
            .parse()
            .map_err(|e| CliError::argument("--control-plane", format!("{base}: {e}")))?;
        let resp = client
            .get(uri)
            .await
            .map_err(|e| CliError::unreachable(Peer::ControlPlane, &base, e))?;
        let status = resp.status();
        let workers = resp
            .headers()
            .get("etlmesh-tap-workers")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(CliError::refused(Peer::ControlPlane, status, &bytes));
        }
        eprintln!(
            "tapping {} ({}) on worker(s) {workers}",
            args.pipeline,
            stage.as_str()
        );
        let mut shown = 0;
        let mut partial = Vec::new();
        'read: loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = tokio::signal::ctrl_c() => break,
            };
            let Some(frame) = frame else { break };
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Err(e) => {
                    eprintln!("the tap ended: {e}");
                    break;
                }
            };
            partial.extend_from_slice(&data);
            while let Some(at) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=at).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                if let Some(e) = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| {
                        v.get("tap_error")
                            .and_then(|e| e.as_str())
                            .map(str::to_string)
                    })
                {
                    eprintln!("{e}");
                    continue;
                }
                println!("{text}");
                shown += 1;
                if shown >= args.limit {
                    break 'read;
                }
            }
        }
        eprintln!("{shown} record(s)");
        Ok(())
    })
}
