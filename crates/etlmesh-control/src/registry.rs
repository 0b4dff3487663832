//! The registry of workers, and the stream of endpoint changes it publishes.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use etlmesh_proto::{
    Endpoint, EndpointEvent, Heartbeat, Load, PipelineInfo, Registration, WorkerState,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for slow watchers; one that falls further behind gets a new snapshot.
const EVENT_BUFFER: usize = 1024;

#[derive(Debug, Clone)]
struct Entry {
    registration: Registration,
    state: WorkerState,
    last_seen: Instant,
    registered_at: SystemTime,
    load: Load,
}

impl Entry {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            id: self.registration.id.clone(),
            address: self.registration.address.clone(),
            pipelines: self.registration.pipelines.clone(),
            state: self.state,
        }
    }
}

/// A worker as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    /// Its id.
    pub id: String,
    /// Its address.
    pub address: String,
    /// Its state.
    pub state: WorkerState,
    /// Its pipelines.
    pub pipelines: Vec<String>,
    /// Its process id.
    pub pid: u32,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms: u64,
    /// Seconds since it registered.
    pub uptime_secs: u64,
    /// Its last reported load.
    pub load: Load,
}

/// A pipeline as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineView {
    /// What the workers say about it.
    #[serde(flatten)]
    pub info: PipelineInfo,
    /// Workers that serve it.
    pub workers: Vec<String>,
    /// How many of them are ready.
    pub ready: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The registry.
pub struct Registry {
    workers: Mutex<BTreeMap<String, Entry>>,
    events: broadcast::Sender<EndpointEvent>,
    timeout: Duration,
    /// Metrics, rendered at `/metrics`.
    pub metrics: etlmesh_telemetry::metrics::SharedRegistry,
    removals: Family<ReasonLabels, Counter>,
    registrations: Counter,
    workers_gauge: Family<StateLabels, Gauge>,
    /// Gateways following the endpoint set.
    pub watchers: Gauge,
}

impl Registry {
    /// An empty registry that removes workers silent for `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let metrics = etlmesh_telemetry::metrics::registry();
        let (removals, registrations, workers_gauge, watchers) = (
            Family::default(),
            Counter::default(),
            Family::default(),
            Gauge::default(),
        );
        {
            let mut r = metrics.lock();
            r.register(
                "control_worker_removals",
                "Workers removed, by reason",
                Family::clone(&removals),
            );
            r.register(
                "control_worker_registrations",
                "Worker registrations",
                Counter::clone(&registrations),
            );
            r.register(
                "control_workers",
                "Workers by state",
                Family::clone(&workers_gauge),
            );
            r.register(
                "control_watchers",
                "Gateways following the endpoint set",
                Gauge::clone(&watchers),
            );
        }
        Self {
            workers: Mutex::default(),
            events: broadcast::channel(EVENT_BUFFER).0,
            timeout,
            metrics,
            removals,
            registrations,
            workers_gauge,
            watchers,
        }
    }

    fn publish(&self, ev: EndpointEvent) {
        // No receiver is fine: no gateway yet.
        let _ = self.events.send(ev);
    }

    fn update_gauges(&self, workers: &BTreeMap<String, Entry>) {
        for (state, name) in [
            (WorkerState::Starting, "starting"),
            (WorkerState::Ready, "ready"),
            (WorkerState::Draining, "draining"),
        ] {
            let n = workers.values().filter(|e| e.state == state).count();
            self.workers_gauge
                .get_or_create(&StateLabels { state: name })
                .set(n as i64);
        }
    }

    /// Adds (or replaces) a worker; it is ready from now on.
    pub fn register(&self, registration: Registration) {
        let id = registration.id.clone();
        let entry = Entry {
            registration,
            state: WorkerState::Ready,
            last_seen: Instant::now(),
            registered_at: SystemTime::now(),
            load: Load::default(),
        };
        let endpoint = entry.endpoint();
        let mut workers = self.workers.lock();
        workers.insert(id.clone(), entry);
        self.update_gauges(&workers);
        self.publish(EndpointEvent::Upsert {
            endpoint: endpoint.clone(),
        });
        drop(workers);
        self.registrations.inc();
        tracing::info!(worker = %id, address = %endpoint.address, pipelines = endpoint.pipelines.len(), "worker registered");
    }

    /// Records a heartbeat; `false` when the worker is unknown (it must register again).
    pub fn heartbeat(&self, id: &str, beat: Heartbeat) -> bool {
        let mut workers = self.workers.lock();
        let Some(e) = workers.get_mut(id) else {
            return false;
        };
        e.last_seen = Instant::now();
        e.load = beat.load;
        if e.state != beat.state {
            e.state = beat.state;
            let endpoint = e.endpoint();
            self.update_gauges(&workers);
            self.publish(EndpointEvent::Upsert { endpoint });
            tracing::info!(worker = %id, state = ?beat.state, "worker changed state");
        }
        true
    }

    /// Removes a worker.
    pub fn remove(&self, id: &str, reason: &'static str) -> bool {
        let mut workers = self.workers.lock();
        let removed = workers.remove(id).is_some();
        if removed {
            self.update_gauges(&workers);
            self.publish(EndpointEvent::Remove { id: id.to_string() });
            self.removals.get_or_create(&ReasonLabels { reason }).inc();
        }
        removed
    }

    /// Removes workers silent for longer than the timeout.
    pub fn reap(&self) {
        let now = Instant::now();
        let silent: Vec<(String, Duration)> = self
            .workers
            .lock()
            .iter()
            .map(|(id, e)| (id.clone(), now.duration_since(e.last_seen)))
            .filter(|(_, d)| *d > self.timeout)
            .collect();
        for (id, d) in silent {
            if self.remove(&id, "heartbeat_timeout") {
                tracing::warn!(worker = %id, silent_ms = d.as_millis() as u64, "worker removed: no heartbeat for {d:.1?}");
            }
        }
    }

    /// The endpoint set and a subscription to its changes, taken together.
    pub fn subscribe(&self) -> (Vec<Endpoint>, broadcast::Receiver<EndpointEvent>) {
        let workers = self.workers.lock();
        let rx = self.events.subscribe();
        (workers.values().map(Entry::endpoint).collect(), rx)
    }

    /// Tells every gateway following the endpoint set (the pipelines after a reload).
    pub fn announce(&self, event: EndpointEvent) {
        let _held = self.workers.lock();
        let _ = self.events.send(event);
    }

    /// The endpoint set.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.workers.lock().values().map(Entry::endpoint).collect()
    }

    /// The workers, for the admin API.
    pub fn workers(&self) -> Vec<WorkerView> {
        let now = Instant::now();
        self.workers
            .lock()
            .values()
            .map(|e| WorkerView {
                id: e.registration.id.clone(),
                address: e.registration.address.clone(),
                state: e.state,
                pipelines: e
                    .registration
                    .pipelines
                    .iter()
                    .map(|p| p.name.clone())
                    .collect(),
                pid: e.registration.pid,
                last_heartbeat_ms: now.duration_since(e.last_seen).as_millis() as u64,
                uptime_secs: e.registered_at.elapsed().map_or(0, |d| d.as_secs()),
                load: e.load.clone(),
            })
            .collect()
    }

    /// The pipelines the workers serve, for the admin API.
    pub fn pipelines(&self) -> Vec<PipelineView> {
        let mut out: BTreeMap<String, PipelineView> = BTreeMap::new();
        for e in self.workers.lock().values() {
            for p in &e.registration.pipelines {
                let v = out.entry(p.name.clone()).or_insert_with(|| PipelineView {
                    info: p.clone(),
                    workers: Vec::new(),
                    ready: 0,
                });
                v.workers.push(e.registration.id.clone());
                if e.state == WorkerState::Ready {
                    v.ready += 1;
                }
            }
        }
        out.into_values().collect()
    }
}

/// Reaps silent workers four times a second.
pub async fn reap_forever(registry: std::sync::Arc<Registry>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        registry.reap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str) -> Registration {
        Registration {
            id: id.into(),
            address: format!("http://127.0.0.1:1/{id}"),
            pipelines: vec![PipelineInfo {
                name: "p".into(),
                ..Default::default()
            }],
            pid: 1,
            version: "0".into(),
        }
    }

    #[tokio::test]
    async fn events_follow_registrations_heartbeats_and_timeouts() {
        let r = Registry::new(Duration::from_millis(50));
        let (snapshot, mut rx) = r.subscribe();
        assert!(snapshot.is_empty());
        r.register(reg("w1"));
        assert!(matches!(rx.recv().await, Ok(EndpointEvent::Upsert { .. })));
        assert!(r.heartbeat(
            "w1",
            Heartbeat {
                state: WorkerState::Draining,
                load: Load::default()
            }
        ));
        match rx.recv().await {
            Ok(EndpointEvent::Upsert { endpoint }) => {
                assert_eq!(endpoint.state, WorkerState::Draining)
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!r.heartbeat(
            "nope",
            Heartbeat {
                state: WorkerState::Ready,
                load: Load::default()
            }
        ));
        tokio::time::sleep(Duration::from_millis(80)).await;
        r.reap();
        assert_eq!(
            rx.recv().await.ok(),
            Some(EndpointEvent::Remove { id: "w1".into() })
        );
        assert!(r.endpoints().is_empty());
    }

    #[test]
    fn pipelines_list_their_workers() {
        let r = Registry::new(Duration::from_secs(5));
        r.register(reg("w1"));
        r.register(reg("w2"));
        let p = r.pipelines();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].workers, vec!["w1".to_string(), "w2".to_string()]);
        assert_eq!(p[0].ready, 2);
    }
}
