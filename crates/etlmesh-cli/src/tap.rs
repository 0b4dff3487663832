//! `etlmesh tap PIPELINE`: live records of a pipeline from every worker that serves
//! it, as NDJSON on standard output. Workers pay nothing while no tap is open.

use std::time::Duration;

use bytes::Bytes;
use etlmesh_http::JsonClient;
use etlmesh_sink::tap::TapStage;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::CliError;
use crate::logs::ControlPlaneArg;

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

#[derive(serde::Deserialize)]
struct Worker {
    id: String,
    address: String,
    pipelines: Vec<String>,
}

pub(crate) fn tap(args: &TapArgs) -> Result<(), CliError> {
    let Some(stage) = TapStage::parse(&args.stage) else {
        return Err(CliError::Other(format!(
            "no stage `{}`\n  help: tap one of input, output, dead_letter",
            args.stage
        )));
    };
    let base = args.cp.base();
    let rt = crate::runtime(1)?;
    rt.block_on(async {
        let workers: Vec<Worker> = JsonClient::new(Duration::from_secs(5))
            .get(&format!("{base}/api/v1/workers"))
            .await
            .map_err(|e| {
                CliError::Other(format!(
                    "cannot reach the control plane at {base}: {e}\n  help: start one with `etlmesh up`, or pass --control-plane URL"
                ))
            })?;
        let serving: Vec<Worker> = workers
            .into_iter()
            .filter(|w| w.pipelines.contains(&args.pipeline))
            .collect();
        if serving.is_empty() {
            return Err(CliError::Other(format!(
                "no worker serves `{}` now\n  help: check the name with `curl {base}/api/v1/pipelines`; a pipeline scaled to zero starts on its next request",
                args.pipeline
            )));
        }
        eprintln!(
            "tapping {} ({}) on {} worker(s): {}",
            args.pipeline,
            stage.as_str(),
            serving.len(),
            serving.iter().map(|w| w.id.as_str()).collect::<Vec<_>>().join(", ")
        );
        let (tx, mut rx) = mpsc::channel::<Result<Bytes, String>>(64);
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut tasks = Vec::new();
        for w in serving {
            let url = format!(
                "{}/v1/tap/{}?stage={}&limit={}&timeout_ms={}",
                w.address.trim_end_matches('/'),
                etlmesh_http::encode_component(&args.pipeline),
                stage.as_str(),
                args.limit,
                args.timeout.as_millis()
            );
            let (client, tx) = (client.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let fail = |e: String| format!("worker {}: {e}", w.id);
                let resp = match url.parse::<http::Uri>() {
                    Ok(uri) => client.get(uri).await.map_err(|e| fail(e.to_string())),
                    Err(e) => Err(fail(e.to_string())),
                };
                let resp = match resp {
                    Ok(r) if r.status().is_success() => r,
                    Ok(r) => {
                        let _ = tx.send(Err(fail(format!("answered {}", r.status())))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => {
                            if let Ok(data) = f.into_data()
                                && tx.send(Ok(data)).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(fail(e.to_string()))).await;
                            return;
                        }
                    }
                }
            }));
        }
        drop(tx);
        let mut shown = 0;
        let mut partial = Vec::new();
        let deadline = tokio::time::Instant::now() + args.timeout;
        'read: loop {
            let next = tokio::select! {
                r = rx.recv() => r,
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::signal::ctrl_c() => break,
            };
            match next {
                None => break,
                Some(Err(e)) => eprintln!("{e}"),
                Some(Ok(data)) => {
                    partial.extend_from_slice(&data);
                    while let Some(at) = partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=at).collect();
                        println!("{}", String::from_utf8_lossy(&line[..line.len() - 1]));
                        shown += 1;
                        if shown >= args.limit {
                            break 'read;
                        }
                    }
                }
            }
        }
        for t in tasks {
            t.abort();
        }
        eprintln!("{shown} record(s)");
        Ok(())
    })
}
