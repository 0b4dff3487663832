//! Following the control plane's endpoint set (`GET /v1/endpoints/watch`, NDJSON
//! events) and keeping every pipeline's route in step. While the control plane is
//! unreachable the last known set stays in use, and the gateway reconnects with backoff.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use etlmesh_proto::{Endpoint as EndpointInfo, EndpointEvent, PipelineInfo, WorkerState};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::accrual::OnEject;
use crate::endpoint::{Endpoint, H2Client};
use crate::metrics::{GatewayMetrics, PipelineLabels, WorkerLabels};
use crate::route::{Route, RouteOptions};

/// A line must arrive this often (the control plane sends keepalives every 3 s).
const SILENCE: Duration = Duration::from_secs(10);

/// How long an endpoint missing from the snapshot of a control plane followed again
/// keeps serving: a control plane that restarted knows no worker until each registers
/// again (within a heartbeat or two), and its first snapshot must not empty the routes.
const RESYNC_GRACE: Duration = Duration::from_secs(5);

/// Every pipeline's route, and the endpoints behind them.
pub struct Routes {
    inner: Mutex<Inner>,
    client: H2Client,
    options: RouteOptions,
    metrics: GatewayMetrics,
}

#[derive(Default)]
struct Inner {
    routes: HashMap<String, Arc<Route>>,
    endpoints: HashMap<String, EndpointInfo>,
    /// What the control plane says of the pipelines it scales.
    infos: HashMap<String, PipelineInfo>,
    /// Pipelines it scaled and no longer declares (a reload removed them): their
    /// routes go when their last worker has.
    retired: std::collections::HashSet<String>,
    /// Endpoints the snapshot of a resync did not list, since when: removed past
    /// [`RESYNC_GRACE`] unless the control plane lists them again.
    unconfirmed: HashMap<String, Instant>,
}

impl Routes {
    /// No route yet.
    pub fn new(client: H2Client, options: RouteOptions, metrics: GatewayMetrics) -> Self {
        Self {
            inner: Mutex::default(),
            client,
            options,
            metrics,
        }
    }

    /// The route of a pipeline, if any worker ever served it.
    pub fn get(&self, pipeline: &str) -> Option<Arc<Route>> {
        self.inner.lock().routes.get(pipeline).cloned()
    }

    /// Pipelines known, with what workers say about them and their ready workers.
    pub fn pipelines(&self) -> Vec<(PipelineInfo, usize)> {
        let inner = self.inner.lock();
        let mut out: Vec<(PipelineInfo, usize)> = Vec::new();
        let mut names: Vec<&String> = inner.routes.keys().collect();
        names.sort();
        for name in names {
            let info = inner
                .endpoints
                .values()
                .flat_map(|e| e.pipelines.iter())
                .find(|p| &p.name == name)
                .or_else(|| inner.infos.get(name))
                .cloned()
                .unwrap_or_else(|| PipelineInfo {
                    name: name.clone(),
                    ..Default::default()
                });
            out.push((info, inner.routes.get(name).map_or(0, |r| r.ready())));
        }
        out
    }

    fn on_eject(&self) -> OnEject {
        let m = self.metrics.ejections.clone();
        Arc::new(move |worker: &str, _| {
            m.get_or_create(&WorkerLabels {
                worker: worker.to_string(),
            })
            .inc();
        })
    }

    fn publish_gauges(&self, inner: &Inner) {
        for (name, r) in &inner.routes {
            self.metrics
                .endpoints
                .get_or_create(&PipelineLabels {
                    pipeline: name.clone(),
                })
                .set(r.ready() as i64);
        }
    }

    /// Applies an event.
    pub fn apply(&self, ev: EndpointEvent) {
        self.apply_after(ev, false);
    }

    /// Applies an event; `resync`: it came on a stream that follows the control plane
    /// again after losing it, so that a snapshot's missing endpoints are kept for
    /// [`RESYNC_GRACE`] (the control plane may have restarted and not know them yet).
    pub fn apply_after(&self, ev: EndpointEvent, resync: bool) {
        self.expire_unconfirmed(Instant::now());
        match ev {
            EndpointEvent::Snapshot { endpoints } => {
                let known: Vec<String> = self.inner.lock().endpoints.keys().cloned().collect();
                for id in known {
                    if endpoints.iter().any(|e| e.id == id) {
                        continue;
                    }
                    if resync {
                        tracing::info!(worker = %id, grace = ?RESYNC_GRACE, "endpoint not in the control plane's snapshot: kept while it registers again");
                        self.inner.lock().unconfirmed.insert(id, Instant::now());
                    } else {
                        self.remove(&id);
                    }
                }
                for e in endpoints {
                    self.upsert(e);
                }
            }
            EndpointEvent::Upsert { endpoint } => self.upsert(endpoint),
            EndpointEvent::Remove { id } => self.remove(&id),
            EndpointEvent::Pipelines { pipelines } => self.scaled(pipelines),
            EndpointEvent::Keepalive => {}
        }
    }

    /// Removes the endpoints a resync did not confirm within [`RESYNC_GRACE`].
    pub fn expire_unconfirmed(&self, now: Instant) {
        let expired: Vec<String> = {
            let inner = self.inner.lock();
            inner
                .unconfirmed
                .iter()
                .filter(|(_, since)| now.saturating_duration_since(**since) >= RESYNC_GRACE)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in expired {
            tracing::info!(worker = %id, "endpoint not registered again after a resync: removed");
            self.remove(&id);
        }
    }

    /// Pipelines the control plane scales (the whole set): their routes exist with no
    /// worker. One it scaled and no longer lists is retired.
    fn scaled(&self, pipelines: Vec<PipelineInfo>) {
        let mut inner = self.inner.lock();
        let gone: Vec<String> = inner
            .infos
            .keys()
            .filter(|n| !pipelines.iter().any(|p| &p.name == *n))
            .cloned()
            .collect();
        for name in gone {
            inner.infos.remove(&name);
            if let Some(r) = inner.routes.get(&name) {
                r.scalable
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::info!(pipeline = %name, "the pipeline is no longer declared: its route goes with its last worker");
            inner.retired.insert(name);
        }
        for p in pipelines {
            let route = inner
                .routes
                .entry(p.name.clone())
                .or_insert_with(|| Arc::new(Route::new(&p.name, self.options)))
                .clone();
            route
                .scalable
                .store(true, std::sync::atomic::Ordering::Relaxed);
            inner.retired.remove(&p.name);
            inner.infos.insert(p.name.clone(), p);
        }
        Self::drop_retired(&mut inner);
    }

    /// Removes the routes of retired pipelines that have no worker left.
    fn drop_retired(inner: &mut Inner) {
        let empty: Vec<String> = inner
            .retired
            .iter()
            .filter(|n| inner.routes.get(*n).is_none_or(|r| r.ready() == 0))
            .cloned()
            .collect();
        for name in empty {
            inner.routes.remove(&name);
            inner.retired.remove(&name);
            tracing::info!(pipeline = %name, "route removed: the pipeline is no longer declared");
        }
    }

    /// Every route, for load reports.
    pub fn all(&self) -> Vec<Arc<Route>> {
        self.inner.lock().routes.values().cloned().collect()
    }

    fn upsert(&self, e: EndpointInfo) {
        let mut inner = self.inner.lock();
        inner.unconfirmed.remove(&e.id);
        if let Some(old) = inner.endpoints.get(&e.id)
            && old.address != e.address
        {
            for r in inner.routes.values() {
                r.remove(&e.id);
            }
        }
        // A route is made by a ready worker (or the control plane's pipelines): a
        // draining worker of a removed pipeline must not bring its route back.
        for p in e.pipelines.iter().filter(|_| e.state == WorkerState::Ready) {
            if !inner.routes.contains_key(&p.name) {
                inner
                    .routes
                    .insert(p.name.clone(), Arc::new(Route::new(&p.name, self.options)));
            }
        }
        for r in inner.routes.values() {
            let serves = e.pipelines.iter().any(|p| *p.name == *r.pipeline);
            if serves && e.state == WorkerState::Ready {
                if !r.contains(&e.id) {
                    let ok = self
                        .metrics
                        .endpoint_requests
                        .get_or_create(&crate::metrics::EndpointLabels {
                            pipeline: r.pipeline.to_string(),
                            worker: e.id.clone(),
                            code: 200,
                        })
                        .clone();
                    r.insert(
                        Endpoint::new(&e.id, &e.address, self.client.clone(), ok),
                        self.on_eject(),
                    );
                    tracing::info!(pipeline = %r.pipeline, worker = %e.id, address = %e.address, "endpoint added");
                }
            } else if r.contains(&e.id) {
                r.remove(&e.id);
                tracing::info!(pipeline = %r.pipeline, worker = %e.id, state = ?e.state, "endpoint removed");
            }
        }
        inner.endpoints.insert(e.id.clone(), e);
        Self::drop_retired(&mut inner);
        self.publish_gauges(&inner);
    }

    fn remove(&self, id: &str) {
        let mut inner = self.inner.lock();
        inner.unconfirmed.remove(id);
        inner.endpoints.remove(id);
        for r in inner.routes.values() {
            if r.contains(id) {
                r.remove(id);
                tracing::info!(pipeline = %r.pipeline, worker = %id, "endpoint removed");
            }
        }
        Self::drop_retired(&mut inner);
        self.publish_gauges(&inner);
    }
}

/// The gateway's link to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlLink {
    /// No endpoint set yet: nothing to serve from.
    Never,
    /// Following the endpoint stream.
    Up,
    /// The stream is down: serving from the last endpoint set while it reconnects.
    Lost,
}

/// Follows the control plane forever; `connected` says how the stream is.
pub async fn follow(
    control_plane: String,
    routes: Arc<Routes>,
    connected: watch::Sender<ControlLink>,
) {
    // `https://`: mTLS with this process's mesh identity.
    let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(TokioExecutor::new())
            .build(etlmesh_tls::connector(Duration::from_secs(2), false));
    let url = format!("{}/v1/endpoints/watch", control_plane.trim_end_matches('/'));
    let mut backoff = Duration::from_millis(100);
    loop {
        match watch_once(&client, &url, &routes, &connected).await {
            Ok(()) => tracing::warn!(url = %url, "the endpoint stream ended; reconnecting"),
            Err(e) => {
                tracing::warn!(url = %url, error = %e, "cannot follow the control plane; retrying in {backoff:?} with the last known endpoints")
            }
        }
        connected.send_modify(|l| {
            if *l == ControlLink::Up {
                *l = ControlLink::Lost;
            }
        });
        routes.metrics.control_plane.set(0);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn watch_once(
    client: &Client<etlmesh_tls::MeshConnector, http_body_util::Empty<bytes::Bytes>>,
    url: &str,
    routes: &Routes,
    connected: &watch::Sender<ControlLink>,
) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("bad control plane URL: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(3), client.get(uri))
        .await
        .map_err(|_| "no answer within 3s".to_string())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        let frame = tokio::time::timeout(SILENCE, body.frame())
            .await
            .map_err(|_| format!("no event for {SILENCE:?}"))?;
        let Some(frame) = frame else { return Ok(()) };
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(nl + 1);
            buf.advance(0);
            match serde_json::from_slice::<EndpointEvent>(&line[..nl]) {
                Ok(ev) => {
                    let mut resync = false;
                    if matches!(ev, EndpointEvent::Snapshot { .. }) {
                        resync = connected.send_replace(ControlLink::Up) == ControlLink::Lost;
                        routes.metrics.control_plane.set(1);
                    }
                    routes.apply_after(ev, resync);
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed endpoint event"),
            }
        }
        if buf.len() > 16 << 20 {
            return Err("an endpoint event is over 16 MiB".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        let registry = etlmesh_telemetry::metrics::registry();
        Routes::new(
            crate::endpoint::h2_client(),
            RouteOptions::default(),
            GatewayMetrics::register(&registry),
        )
    }

    fn worker(id: &str) -> EndpointInfo {
        EndpointInfo {
            id: id.into(),
            address: "http://127.0.0.1:9".into(),
            pipelines: vec![PipelineInfo {
                name: "clean".into(),
                ..PipelineInfo::default()
            }],
            state: WorkerState::Ready,
        }
    }

    fn ready(r: &Routes) -> usize {
        r.get("clean").map_or(0, |r| r.ready())
    }

    fn snapshot(ids: &[&str]) -> EndpointEvent {
        EndpointEvent::Snapshot {
            endpoints: ids.iter().map(|id| worker(id)).collect(),
        }
    }

    #[tokio::test]
    async fn a_first_snapshot_is_the_whole_truth() {
        let r = routes();
        r.apply(snapshot(&["w1", "w2"]));
        assert_eq!(ready(&r), 2);
        r.apply(snapshot(&["w2"]));
        assert_eq!(ready(&r), 1, "a snapshot on a live stream removes at once");
    }

    #[tokio::test]
    async fn a_resync_keeps_the_endpoints_it_misses_until_they_register_again_or_the_grace_ends() {
        let r = routes();
        r.apply(snapshot(&["w1", "w2"]));
        // A restarted control plane knows no worker yet.
        r.apply_after(snapshot(&[]), true);
        assert_eq!(ready(&r), 2, "kept while they register again");
        // w1 registers again; w2 never does (it died meanwhile).
        r.apply(EndpointEvent::Upsert {
            endpoint: worker("w1"),
        });
        r.expire_unconfirmed(Instant::now() + RESYNC_GRACE);
        assert_eq!(ready(&r), 1);
        assert!(r.get("clean").is_some_and(|route| route.contains("w1")));
    }
}
