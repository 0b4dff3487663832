//! Talking to the control plane: register, then a heartbeat with the load every
//! second (re-registering when the control plane forgot us), and deregister at the end.

use std::sync::Arc;
use std::time::Duration;

use etlmesh_http::JsonClient;
use etlmesh_proto::{Heartbeat, Registration, WorkerState};
use http::{Method, StatusCode};
use tokio::sync::watch;

use crate::LoadTracker;

/// Takes the revoked certificates the control plane sent with its answer: the worker
/// refuses them in its handshakes from now on.
pub(crate) fn learn_revoked(answer: &serde_json::Value) {
    if let Some(list) = answer["revoked"].as_array() {
        etlmesh_tls::set_revoked(list.iter().filter_map(|s| s.as_str().map(String::from)));
    }
}

/// The heartbeat period.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Registers and reports until aborted. Runs on its own thread so that busy request
/// handlers never delay a heartbeat.
pub(crate) async fn report(
    control_plane: String,
    registration: Registration,
    load: Arc<LoadTracker>,
    mut draining: watch::Receiver<bool>,
) {
    let client = JsonClient::new(Duration::from_secs(2));
    let base = control_plane.trim_end_matches('/').to_string();
    let beat_url = format!("{base}/v1/workers/{}/heartbeat", registration.id);
    let mut registered = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        if !registered {
            match client
                .call::<_, serde_json::Value>(
                    Method::POST,
                    &format!("{base}/v1/workers"),
                    Some(&registration),
                )
                .await
            {
                Ok(_) => {
                    registered = true;
                    backoff = Duration::from_millis(100);
                    tracing::info!(worker = %registration.id, control_plane = %base, "registered with the control plane");
                }
                Err(e) => {
                    tracing::warn!(worker = %registration.id, error = %e, "cannot register yet; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let state = if *draining.borrow() {
            WorkerState::Draining
        } else {
            WorkerState::Ready
        };
        let beat = Heartbeat {
            state,
            load: load.snapshot(),
        };
        match client
            .call::<_, serde_json::Value>(Method::PUT, &beat_url, Some(&beat))
            .await
        {
            Ok(answer) => learn_revoked(&answer),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                tracing::warn!(worker = %registration.id, "the control plane does not know this worker; registering again");
                registered = false;
                continue;
            }
            Err(e) => tracing::warn!(worker = %registration.id, error = %e, "heartbeat failed"),
        }
        // The next beat comes after the period, or at once when draining starts.
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = draining.changed() => {}
        }
    }
}

/// Tells the control plane this worker is gone.
async fn deregister(control_plane: &str, id: &str) {
    let client = JsonClient::new(Duration::from_secs(2));
    let url = format!("{}/v1/workers/{id}", control_plane.trim_end_matches('/'));
    if let Err(e) = client
        .call::<(), serde_json::Value>(Method::DELETE, &url, None)
        .await
    {
        tracing::warn!(worker = %id, error = %e, "deregistering failed; the control plane will time the worker out");
    }
}

/// The heartbeat and the log shipper, on a thread and runtime of their own: request
/// handlers busy on the CPU never delay a heartbeat.
pub(crate) struct Reporter {
    control_plane: String,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Reporter {
    /// Registers with `control_plane` and reports until stopped.
    pub(crate) fn start(
        control_plane: String,
        registration: Registration,
        load: Arc<LoadTracker>,
        draining: watch::Receiver<bool>,
    ) -> Result<Self, crate::WorkerError> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let cp = control_plane.clone();
        let thread = std::thread::Builder::new()
            .name("etlmesh-heartbeat".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    let source = registration.id.clone();
                    rt.block_on(async {
                        tokio::select! {
                            () = report(cp.clone(), registration, load, draining) => {}
                            () = etlmesh_http::logship::ship_logs(cp, source) => {}
                            _ = stopped => {}
                        }
                    });
                }
            })
            .map_err(|e| {
                crate::WorkerError::Serve(format!("cannot start the heartbeat thread: {e}"))
            })?;
        Ok(Self {
            control_plane,
            stop,
            thread,
        })
    }

    /// Stops reporting and deregisters `id`.
    pub(crate) async fn stop(self, id: &str) {
        let _ = self.stop.send(());
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        deregister(&self.control_plane, id).await;
    }
}
