//! The autoscaler loop: every second (and at once when a gateway holds requests for a
//! pipeline with no worker), each pipeline's load — what its workers report, and what
//! gateways have in flight or held — goes through its [`Autoscaler`]; a decision is
//! carried out by the [`Scaler`], logged, counted, and kept for the admin API.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etlmesh_config::{PipelineFile, ScalingSpec};
use etlmesh_proto::{EndpointEvent, GatewayLoad, PipelineInfo, ScaleEvent, WorkerState};
use etlmesh_scale::{Autoscaler, Observation, Scaler};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::Notify;

use crate::Registry;

/// Decisions kept for the admin API.
const EVENTS: usize = 200;
/// A gateway report older than this is ignored.
const REPORT_TTL: Duration = Duration::from_secs(3);

/// What to scale, and with what.
#[derive(Clone)]
pub struct AutoscaleConfig {
    /// The pipelines (one pool of workers each) and their policies.
    pub pools: Vec<(PipelineInfo, ScalingSpec)>,
    /// Who runs the workers.
    pub scaler: Arc<dyn Scaler>,
}

/// The pools of a pipeline file: one per pipeline, with its scaling policy; `fixed`
/// (`up --workers N`) sizes every pool but those of pipelines that run on one worker.
pub fn pools(file: &PipelineFile, fixed: Option<u32>) -> Vec<(PipelineInfo, ScalingSpec)> {
    file.spec
        .pipelines
        .iter()
        .map(|p| {
            let mut spec = p.scaling.clone();
            if let Some(n) = fixed {
                // A pipeline that must run on one worker keeps one.
                let n = if p.one_worker() { 1 } else { n.max(1) };
                spec.min_replicas = n;
                spec.max_replicas = n;
            }
            let info = PipelineInfo {
                name: p.name.clone(),
                description: p.description.clone(),
                source: Some(p.describe_source()),
                sinks: p.describe_sinks(),
                ..Default::default()
            };
            (info, spec)
        })
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    pipeline: String,
    direction: &'static str,
    cause: &'static str,
}

struct Pool {
    autoscaler: Autoscaler,
    info: PipelineInfo,
    requests_seen: u64,
    rate: Rate,
    panic: bool,
}

impl Pool {
    fn new(info: PipelineInfo, spec: ScalingSpec, now: Instant) -> Self {
        Self {
            autoscaler: Autoscaler::new(spec, now),
            info,
            requests_seen: 0,
            rate: Rate::default(),
            panic: false,
        }
    }
}

/// The records a pool processes per second, from its workers' counters.
#[derive(Debug, Default)]
struct Rate {
    /// The counters' sum at the last tick.
    last: Option<(Instant, u64)>,
    /// Records per second, smoothed over about 5 s.
    per_second: f64,
}

impl Rate {
    /// Takes the counters' sum at `now`. A sum that went down (a worker went away, with
    /// its counter) starts the measure again.
    fn observe(&mut self, now: Instant, total: u64) -> f64 {
        if let Some((at, last)) = self.last
            && total >= last
        {
            let dt = now.duration_since(at).as_secs_f64();
            if dt > 0.0 {
                let now_rate = (total - last) as f64 / dt;
                self.per_second = if self.per_second == 0.0 {
                    now_rate
                } else {
                    0.8 * self.per_second + 0.2 * now_rate
                };
            }
        }
        self.last = Some((now, total));
        self.per_second
    }
}

/// A pool as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct PoolView {
    /// The pipeline.
    pub pipeline: String,
    /// Replicas the autoscaler wants.
    pub desired: u32,
    /// Workers ready.
    pub ready: usize,
    /// The policy.
    pub min_replicas: u32,
    /// The policy.
    pub max_replicas: u32,
    /// The policy.
    pub target_in_flight: f64,
    /// The policy, for stream pipelines that scale on their lag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_lag: Option<u64>,
    /// Whether the last decision came from panic mode.
    pub panic: bool,
}

/// The autoscaler of every pool.
pub struct Autoscaling {
    pools: Mutex<BTreeMap<String, Pool>>,
    scaler: Arc<dyn Scaler>,
    gateways: Mutex<HashMap<String, (Instant, GatewayLoad)>>,
    events: Mutex<VecDeque<ScaleEvent>>,
    wake: Notify,
    replicas: Family<PoolLabels, Gauge>,
    ready: Family<PoolLabels, Gauge>,
    decisions: Family<DecisionLabels, Counter>,
}

impl Autoscaling {
    /// Sets up the pools (not started yet); metrics go to the registry's.
    pub fn new(config: AutoscaleConfig, registry: &Registry) -> Self {
        let now = Instant::now();
        let pools = config
            .pools
            .into_iter()
            .map(|(info, spec)| (info.name.clone(), Pool::new(info, spec, now)))
            .collect();
        let (replicas, ready, decisions) =
            (Family::default(), Family::default(), Family::default());
        {
            let mut r = registry.metrics.lock();
            r.register(
                "autoscaler_desired_replicas",
                "Workers the autoscaler wants, by pipeline",
                Family::clone(&replicas),
            );
            r.register(
                "autoscaler_ready_replicas",
                "Workers ready, by pipeline",
                Family::clone(&ready),
            );
            r.register(
                "autoscaler_decisions",
                "Scaling decisions, by pipeline, direction (up, down) and cause (load, panic, window, idle)",
                Family::clone(&decisions),
            );
        }
        Self {
            pools: Mutex::new(pools),
            scaler: config.scaler,
            gateways: Mutex::default(),
            events: Mutex::default(),
            wake: Notify::new(),
            replicas,
            ready,
            decisions,
        }
    }

    /// The scaler's name.
    pub fn scaler_name(&self) -> &'static str {
        self.scaler.name()
    }

    /// The scaled pipelines, for gateways.
    pub fn pipelines(&self) -> Vec<PipelineInfo> {
        self.pools.lock().values().map(|p| p.info.clone()).collect()
    }

    /// Records a gateway's load; wakes the loop when requests are held or the load is
    /// over what the pool's workers are meant to carry, so that scaling up does not
    /// wait for the next tick.
    pub fn report(&self, gateway: &str, load: GatewayLoad) {
        let urgent = {
            let pools = self.pools.lock();
            load.pipelines.iter().any(|(name, l)| {
                l.held > 0
                    || pools
                        .get(name)
                        .is_some_and(|p| p.autoscaler.wants_more(f64::from(l.in_flight)))
            })
        };
        self.gateways
            .lock()
            .insert(gateway.to_string(), (Instant::now(), load));
        if urgent {
            self.wake.notify_one();
        }
    }

    /// Asks for an evaluation now (a gateway holds requests for `pipeline`).
    pub fn activate(&self, pipeline: &str) -> bool {
        let known = self.pools.lock().contains_key(pipeline);
        if known {
            self.wake.notify_one();
        }
        known
    }

    /// Recent decisions, newest last.
    pub fn events(&self) -> Vec<ScaleEvent> {
        self.events.lock().iter().cloned().collect()
    }

    /// The pools.
    pub fn view(&self, registry: &Registry) -> Vec<PoolView> {
        let workers = registry.workers();
        self.pools
            .lock()
            .iter()
            .map(|(name, p)| {
                let spec = p.autoscaler.spec();
                PoolView {
                    pipeline: name.clone(),
                    desired: p.autoscaler.current(),
                    ready: workers
                        .iter()
                        .filter(|w| w.state == WorkerState::Ready && w.pipelines.contains(name))
                        .count(),
                    min_replicas: spec.min_replicas,
                    max_replicas: spec.max_replicas,
                    target_in_flight: spec.target_in_flight,
                    target_lag: spec.target_lag,
                    panic: p.panic,
                }
            })
            .collect()
    }

    /// Starts every pool at its minimum, then decides every second, or at once when woken.
    pub async fn run(self: Arc<Self>, registry: Arc<Registry>) {
        let names: Vec<String> = self.pools.lock().keys().cloned().collect();
        for pool in names {
            let n = self.resume(&pool).await;
            self.replicas
                .get_or_create(&PoolLabels {
                    pipeline: pool.clone(),
                })
                .set(i64::from(n));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.wake.notified() => {}
            }
            self.evaluate(&registry).await;
        }
    }

    /// Where a pool starts: the workers it runs already when the scaler can tell
    /// (pods outlive a control plane that restarts: adopted within the pool's bounds,
    /// untouched when within them), else its minimum, started now.
    async fn resume(&self, pool: &str) -> u32 {
        let running = match self.scaler.running(pool).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(pipeline = %pool, error = %e, "cannot read how many workers the pool runs: starting it at its minimum");
                None
            }
        };
        let (n, adopted) = {
            let mut pools = self.pools.lock();
            let Some(p) = pools.get_mut(pool) else {
                return 0;
            };
            match running {
                Some(r) => (p.autoscaler.adopt(r), Some(r)),
                None => (p.autoscaler.current(), None),
            }
        };
        if let Some(r) = adopted {
            tracing::info!(pipeline = %pool, running = r, replicas = n, "resuming the pool from the workers it runs");
        }
        if adopted != Some(n)
            && let Err(e) = self.scaler.set_replicas(pool, n).await
        {
            tracing::error!(pipeline = %pool, error = %e, "cannot start the pool's workers");
        }
        n
    }

    async fn evaluate(&self, registry: &Registry) {
        let now = Instant::now();
        let workers = registry.workers();
        let gateways: Vec<GatewayLoad> = {
            let mut g = self.gateways.lock();
            g.retain(|_, (t, _)| now.duration_since(*t) < REPORT_TTL);
            g.values().map(|(_, l)| l.clone()).collect()
        };
        let mut decisions = Vec::new();
        {
            let mut pools = self.pools.lock();
            for (name, pool) in pools.iter_mut() {
                let mine = workers.iter().filter(|w| w.pipelines.contains(name));
                let (mut w_in_flight, mut cpu, mut w_requests, mut ready) = (0u64, 0.0, 0u64, 0i64);
                // Every worker of a JetStream pipeline reads the same consumer, so each
                // reports the same lag: the largest report is the pipeline's. Kafka
                // workers own partitions: the pipeline's lag is the sum over them.
                let mut lag = 0u64;
                let mut records = 0u64;
                let mut partitions = std::collections::BTreeMap::new();
                for w in mine {
                    if let Some(u) = w.load.pipelines.get(name) {
                        records += u.records_total;
                        lag = lag.max(u.source_pending.unwrap_or(0));
                        for p in &u.partitions {
                            partitions.insert((&p.topic, p.partition), p.lag);
                        }
                    }
                    w_in_flight += u64::from(w.load.in_flight);
                    cpu += w.load.cpu_percent;
                    w_requests += w.load.requests_total;
                    ready += i64::from(w.state == WorkerState::Ready);
                }
                lag = lag.max(partitions.values().sum());
                let (mut g_load, mut g_requests) = (0u64, 0u64);
                for g in &gateways {
                    if let Some(l) = g.pipelines.get(name) {
                        g_load += u64::from(l.in_flight) + u64::from(l.held);
                        g_requests += l.requests_total;
                    }
                }
                let requests = w_requests + g_requests;
                let active = requests != pool.requests_seen;
                pool.requests_seen = requests;
                let obs = Observation {
                    at: now,
                    in_flight: w_in_flight.max(g_load) as f64,
                    cpu_percent: cpu,
                    lag: lag as f64,
                    rate: pool.rate.observe(now, records),
                    active,
                };
                self.ready
                    .get_or_create(&PoolLabels {
                        pipeline: name.clone(),
                    })
                    .set(ready);
                if let Some(d) = pool.autoscaler.observe(obs) {
                    pool.panic = d.panic;
                    decisions.push((name.clone(), d));
                }
            }
        }
        for (pool, d) in decisions {
            tracing::info!(pipeline = %pool, from = d.from, to = d.to, panic = d.panic, "scaling {pool}: {}", d.reason);
            let direction = if d.to > d.from { "up" } else { "down" };
            self.decisions
                .get_or_create(&DecisionLabels {
                    pipeline: pool.clone(),
                    direction,
                    cause: d.cause,
                })
                .inc();
            self.replicas
                .get_or_create(&PoolLabels {
                    pipeline: pool.clone(),
                })
                .set(i64::from(d.to));
            {
                let mut ev = self.events.lock();
                if ev.len() >= EVENTS {
                    ev.pop_front();
                }
                ev.push_back(ScaleEvent {
                    time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    pipeline: pool.clone(),
                    from: d.from,
                    to: d.to,
                    reason: d.reason.clone(),
                });
            }
            if let Err(e) = self.scaler.set_replicas(&pool, d.to).await {
                tracing::error!(pipeline = %pool, error = %e, "the scaler failed");
            }
        }
    }

    /// The scaler.
    pub fn scaler(&self) -> &Arc<dyn Scaler> {
        &self.scaler
    }

    /// Takes the pools of a reloaded file: new pools start at their minimum, pools
    /// no longer declared are drained, the others take their new policy (and what
    /// gateways are told of them); gateways learn the new set at once.
    pub async fn reconfigure(&self, pools: Vec<(PipelineInfo, ScalingSpec)>, registry: &Registry) {
        let now = Instant::now();
        let mut moves = Vec::new();
        {
            let mut current = self.pools.lock();
            let names: Vec<String> = current.keys().cloned().collect();
            for name in names {
                if !pools.iter().any(|(i, _)| i.name == name) {
                    current.remove(&name);
                    moves.push((name, 0));
                }
            }
            for (info, spec) in pools {
                let name = info.name.clone();
                match current.get_mut(&name) {
                    Some(p) => {
                        let before = p.autoscaler.current();
                        let after = p.autoscaler.set_spec(spec);
                        p.info = info;
                        if after != before {
                            moves.push((name, after));
                        }
                    }
                    None => {
                        let pool = Pool::new(info, spec, now);
                        moves.push((name.clone(), pool.autoscaler.current()));
                        current.insert(name, pool);
                    }
                }
            }
        }
        registry.announce(EndpointEvent::Pipelines {
            pipelines: self.pipelines(),
        });
        for (pool, n) in moves {
            tracing::info!(pipeline = %pool, replicas = n, "reload: the pool runs {n} workers");
            self.replicas
                .get_or_create(&PoolLabels {
                    pipeline: pool.clone(),
                })
                .set(i64::from(n));
            if let Err(e) = self.scaler.set_replicas(&pool, n).await {
                tracing::error!(pipeline = %pool, error = %e, "the scaler failed");
            }
        }
    }

    /// Stops every worker (draining them).
    pub async fn shutdown(&self) {
        self.scaler.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;

    /// A scaler that records what it was asked, in order; pools named in `running`
    /// run that many workers already.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, u32)>>, HashMap<String, u32>);

    impl Scaler for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn running<'a>(
            &'a self,
            pool: &'a str,
        ) -> BoxFuture<'a, Result<Option<u32>, etlmesh_scale::ScaleError>> {
            let n = self.1.get(pool).copied();
            Box::pin(async move { Ok(n) })
        }
        fn set_replicas<'a>(
            &'a self,
            pool: &'a str,
            replicas: u32,
        ) -> BoxFuture<'a, Result<(), etlmesh_scale::ScaleError>> {
            self.0.lock().push((pool.to_string(), replicas));
            Box::pin(async { Ok(()) })
        }
        fn shutdown(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn pool(name: &str, min: u32) -> (PipelineInfo, ScalingSpec) {
        let info = PipelineInfo {
            name: name.into(),
            ..Default::default()
        };
        let spec = ScalingSpec {
            min_replicas: min,
            ..Default::default()
        };
        (info, spec)
    }

    fn started(
        pools: Vec<(PipelineInfo, ScalingSpec)>,
    ) -> (Arc<Autoscaling>, Arc<Recorder>, tokio::task::JoinHandle<()>) {
        started_beside(pools, HashMap::new())
    }

    /// With workers running already (`running`: per pool).
    fn started_beside(
        pools: Vec<(PipelineInfo, ScalingSpec)>,
        running: HashMap<String, u32>,
    ) -> (Arc<Autoscaling>, Arc<Recorder>, tokio::task::JoinHandle<()>) {
        let recorder = Arc::new(Recorder(Mutex::default(), running));
        let registry = Arc::new(Registry::new(Duration::from_secs(5)));
        let scaling = Arc::new(Autoscaling::new(
            AutoscaleConfig {
                pools,
                scaler: recorder.clone(),
            },
            &registry,
        ));
        let task = tokio::spawn(scaling.clone().run(registry));
        (scaling, recorder, task)
    }

    /// Lets the loop run until it waits again (time stays where it is).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_pool_starts_at_its_minimum() {
        let (_, recorder, task) = started(vec![pool("a", 2), pool("b", 0)]);
        settle().await;
        assert_eq!(
            *recorder.0.lock(),
            [("a".to_string(), 2), ("b".to_string(), 0)]
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_control_plane_adopts_the_workers_that_run_without_scaling_them() {
        let mut wide = pool("a", 1);
        wide.1.max_replicas = 5;
        let mut narrow = pool("b", 1);
        narrow.1.max_replicas = 2;
        let running = HashMap::from([("a".to_string(), 4), ("b".to_string(), 7)]);
        let (scaling, recorder, task) = started_beside(vec![wide, narrow], running);
        settle().await;
        assert_eq!(
            *recorder.0.lock(),
            [("b".to_string(), 2)],
            "a's 4 are within its bounds and left alone; b's 7 are past its maximum"
        );
        let view = scaling.view(&Registry::new(Duration::from_secs(5)));
        let desired: Vec<u32> = view.iter().map(|p| p.desired).collect();
        assert_eq!(desired, [4, 2]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_scale_a_pool_from_zero_without_waiting_for_the_tick() {
        let (scaling, recorder, task) = started(vec![pool("p", 0)]);
        settle().await;
        let before = tokio::time::Instant::now();
        let mut load = GatewayLoad::default();
        load.pipelines.insert(
            "p".into(),
            etlmesh_proto::PipelineLoad {
                held: 3,
                requests_total: 3,
                ..Default::default()
            },
        );
        scaling.report("gw-1", load);
        settle().await;
        assert_eq!(
            recorder.0.lock().last(),
            Some(&("p".to_string(), 1)),
            "a held request asks for a worker"
        );
        assert_eq!(
            before.elapsed(),
            Duration::ZERO,
            "at once, not at the next tick"
        );
        assert_eq!(
            scaling.view(&Registry::new(Duration::from_secs(5)))[0].desired,
            1
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn only_pools_it_scales_can_be_activated() {
        let (scaling, _, task) = started(vec![pool("p", 0)]);
        assert!(scaling.activate("p"));
        assert!(!scaling.activate("other"));
        task.abort();
    }

    #[test]
    fn the_rate_follows_the_counters_and_starts_again_when_a_worker_goes() {
        let t = Instant::now();
        let s = |n: u64| t + Duration::from_secs(n);
        let mut r = Rate::default();
        assert_eq!(r.observe(s(0), 1_000), 0.0, "unknown before two ticks");
        assert_eq!(r.observe(s(1), 3_000), 2_000.0);
        // Smoothed: one tick at 4,000/s moves it a fifth of the way.
        assert_eq!(r.observe(s(2), 7_000), 2_400.0);
        // A worker left with its counter: no negative rate, the measure restarts.
        assert_eq!(r.observe(s(3), 500), 2_400.0);
        assert_eq!(r.observe(s(4), 2_900), 0.8 * 2_400.0 + 0.2 * 2_400.0);
    }
}
