//! The worker's load: in-flight requests, an EWMA of latency, records per second, and
//! the records and CPU time of each pipeline's work.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use etlmesh_proto::{Load, PartitionLag, PipelineUsage};
use etlmesh_telemetry::process::CpuMeter;

/// Weight of the newest latency in the EWMA.
const EWMA_ALPHA: f64 = 0.2;

/// One pipeline's work in this worker: records (requests and streams) and the CPU time
/// of polling its requests and its stream (see `etlmesh_telemetry::process::cpu_timed`).
#[derive(Debug)]
pub struct Usage {
    /// Records handled.
    pub records: Arc<AtomicU64>,
    /// CPU nanoseconds.
    pub cpu_ns: Arc<AtomicU64>,
    /// The stream source's pending messages (the consumer lag); negative when unknown.
    pub source_pending: Arc<std::sync::atomic::AtomicI64>,
    /// The lag of each Kafka partition the stream owns.
    pub partitions: etlmesh_stream::PartitionLags,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            records: Arc::default(),
            cpu_ns: Arc::default(),
            source_pending: Arc::new(std::sync::atomic::AtomicI64::new(-1)),
            partitions: Default::default(),
        }
    }
}

/// Load counters, updated by requests and read by the reporter.
#[derive(Debug, Default)]
pub struct LoadTracker {
    in_flight: AtomicU32,
    requests: AtomicU64,
    usage: OnceLock<Vec<(String, Arc<Usage>)>>,
    ewma_ms: Mutex<f64>,
    window: Mutex<Option<(Instant, u64, CpuMeter)>>,
}

/// Marks a request in flight until dropped.
pub struct InFlight<'a>(&'a LoadTracker, Instant);

impl LoadTracker {
    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Starts a request, unless `max` are in flight already.
    pub fn try_start(&self, max: usize) -> Option<InFlight<'_>> {
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev as usize >= max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlight(self, Instant::now()))
    }

    /// Reports the usage of these pipelines (set once, when they are compiled).
    pub fn track(&self, usage: Vec<(String, Arc<Usage>)>) {
        let _ = self.usage.set(usage);
    }

    /// The latency EWMA, in milliseconds.
    pub fn ewma_ms(&self) -> f64 {
        *self.ewma_ms.lock()
    }

    /// The load since the last call.
    pub fn snapshot(&self) -> Load {
        let now = Instant::now();
        let pipelines: BTreeMap<String, PipelineUsage> = self
            .usage
            .get()
            .map(|u| {
                u.iter()
                    .map(|(name, u)| {
                        let usage = PipelineUsage {
                            records_total: u.records.load(Ordering::Relaxed),
                            cpu_seconds_total: u.cpu_ns.load(Ordering::Relaxed) as f64 / 1e9,
                            source_pending: u64::try_from(u.source_pending.load(Ordering::Relaxed))
                                .ok(),
                            partitions: u
                                .partitions
                                .lock()
                                .iter()
                                .map(|((topic, partition), lag)| PartitionLag {
                                    topic: topic.clone(),
                                    partition: *partition,
                                    lag: u64::try_from(*lag).unwrap_or(0),
                                })
                                .collect(),
                        };
                        (name.clone(), usage)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let records: u64 = pipelines.values().map(|u| u.records_total).sum();
        let mut window = self.window.lock();
        let (rps, cpu) = match window.as_mut() {
            Some((t, r, meter)) => {
                let secs = now
                    .duration_since(*t)
                    .max(Duration::from_millis(1))
                    .as_secs_f64();
                let rps = (records - *r) as f64 / secs;
                let cpu = meter.sample();
                *t = now;
                *r = records;
                (rps, cpu)
            }
            None => {
                *window = Some((now, records, CpuMeter::new()));
                (0.0, 0.0)
            }
        };
        Load {
            in_flight: self.in_flight(),
            ewma_latency_ms: *self.ewma_ms.lock(),
            records_per_sec: rps,
            cpu_percent: cpu,
            rss_bytes: etlmesh_telemetry::process::rss_bytes().unwrap_or(0),
            requests_total: self.requests.load(Ordering::Relaxed),
            cpu_seconds_total: etlmesh_telemetry::process::cpu_seconds(None).unwrap_or(0.0),
            pipelines,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let ms = self.1.elapsed().as_secs_f64() * 1000.0;
        let mut e = self.0.ewma_ms.lock();
        *e = if *e == 0.0 {
            ms
        } else {
            EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * *e
        };
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_in_flight() {
        let l = LoadTracker::default();
        let a = l.try_start(2).expect("first");
        let _b = l.try_start(2).expect("second");
        assert!(l.try_start(2).is_none());
        drop(a);
        assert!(l.try_start(2).is_some());
        assert_eq!(l.snapshot().requests_total, 2);
    }
}
