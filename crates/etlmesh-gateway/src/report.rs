//! Telling the control plane what the gateway carries: every pipeline's in-flight and
//! held requests five times a second (the control plane acts on a report at once when
//! it asks for more workers), and at once when a request is held for a pipeline with
//! no worker (activation).

use std::sync::Arc;
use std::time::Duration;

use etlmesh_http::JsonClient;
use etlmesh_proto::GatewayLoad;
use http::Method;
use tokio::sync::mpsc;

use crate::discovery::Routes;

/// The report period.
pub const PERIOD: Duration = Duration::from_millis(200);

/// Reports until aborted.
pub async fn report(
    control_plane: String,
    id: String,
    routes: Arc<Routes>,
    mut activations: mpsc::Receiver<String>,
) {
    let client = JsonClient::new(Duration::from_secs(2));
    let base = control_plane.trim_end_matches('/').to_string();
    let url = format!("{base}/v1/gateways/{id}/load");
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let activate = tokio::select! {
            _ = tick.tick() => None,
            a = activations.recv() => a,
        };
        let load = GatewayLoad {
            pipelines: routes
                .all()
                .iter()
                .map(|r| (r.pipeline.to_string(), r.load()))
                .collect(),
        };
        match client
            .call::<_, serde_json::Value>(Method::PUT, &url, Some(&load))
            .await
        {
            // The certificates to refuse come with the answer.
            Ok(answer) => {
                if let Some(list) = answer["revoked"].as_array() {
                    etlmesh_tls::set_revoked(
                        list.iter().filter_map(|s| s.as_str().map(String::from)),
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "load report failed"),
        }
        if let Some(pipeline) = activate {
            let url = format!("{base}/v1/pools/{pipeline}/activate");
            match client
                .call::<(), serde_json::Value>(Method::POST, &url, None)
                .await
            {
                Ok(_) => {
                    tracing::info!(pipeline = %pipeline, "no worker ready: asked the control plane for one")
                }
                Err(e) => {
                    tracing::warn!(pipeline = %pipeline, error = %e, "activation request failed")
                }
            }
            // Many held requests ask at once: one call is enough.
            while activations.try_recv().is_ok() {}
        }
    }
}
