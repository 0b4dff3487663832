//! `etlmesh broker`: the embedded MQTT broker on its own — at the edge beside
//! `etlmesh worker`s, or for tests. Its settings come from a pipeline file's
//! `platform.broker`, or from the flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use etlmesh_config::{BrokerSpec, PipelineFile};

use crate::{CliError, runtime};

/// Arguments of `broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// A pipeline file whose `platform.broker` gives the settings.
    #[arg(short, long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where to listen (instead of the file's `listen`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

pub(crate) fn broker(args: &BrokerArgs) -> Result<(), CliError> {
    let mut spec = match &args.config {
        Some(path) => {
            let file = PipelineFile::load(path)?;
            file.spec.platform.broker.clone().ok_or_else(|| {
                CliError::Missing {
                    file: path.display().to_string(),
                    missing: "no `platform.broker`".into(),
                    help: "add `platform: { broker: { listen: 127.0.0.1:1883 } }` or give --listen without -c".into(),
                }
            })?
        }
        None => BrokerSpec::new(SocketAddr::from(([127, 0, 0, 1], 1883))),
    };
    if let Some(l) = args.listen {
        spec.listen = l;
    }
    let rt = runtime(2)?;
    rt.block_on(async {
        let server = etlmesh_broker::bind(&spec).await.map_err(CliError::from)?;
        if let Some(addr) = args.metrics {
            let registry = etlmesh_telemetry::metrics::registry();
            server.metrics().register(&mut registry.lock());
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(CliError::io(format!("listen on --metrics {addr}")))?;
            tokio::spawn(etlmesh_http::serve::serve(
                etlmesh_http::serve::Listen::Plain(listener),
                etlmesh_http::metrics_router(registry),
                std::future::pending(),
            ));
        }
        eprintln!(
            "MQTT broker on {}://{} (MQTT 3.1.1 and 5){}; Ctrl-C stops it",
            if spec.tls.is_some() { "mqtts" } else { "mqtt" },
            server.addr(),
            if spec.users.is_empty() {
                ", anyone may connect"
            } else {
                ", logins required"
            }
        );
        server.serve(crate::mesh::shutdown_signal()).await;
        Ok(())
    })
}
