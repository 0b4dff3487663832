//! Shipping this process's recent log lines to the control plane, once a second:
//! `POST /v1/logs/{source}` with what is new in the ring since the last shipment.

use std::time::Duration;

use etlmesh_telemetry::logs::{LogBatch, global};
use http::Method;

use crate::JsonClient;

/// The shipping period.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Lines per shipment at most (the rest go in the next).
const MAX_LINES: usize = 500;

/// Ships until aborted. Failures are retried on the next tick; lines that the ring
/// drops meanwhile are counted as lost.
pub async fn ship_logs(control_plane: String, source: String) {
    let ring = global();
    let client = JsonClient::new(Duration::from_secs(2));
    let url = format!("{}/v1/logs/{}", control_plane.trim_end_matches('/'), source);
    let mut after = 0;
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (lines, lost) = ring.since(after, MAX_LINES);
        let Some(last) = lines.last().map(|l| l.seq) else {
            continue;
        };
        let batch = LogBatch { lines, lost };
        match client
            .call::<_, serde_json::Value>(Method::POST, &url, Some(&batch))
            .await
        {
            Ok(_) => after = last,
            // Not a warning: it would be shipped, fail, and warn again.
            Err(e) => tracing::debug!(error = %e, "log shipment failed; retrying"),
        }
    }
}
