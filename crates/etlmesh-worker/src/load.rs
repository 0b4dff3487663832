//! The worker's load: in-flight requests, an EWMA of latency, records per second.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etlmesh_proto::Load;
use etlmesh_telemetry::process::CpuMeter;

/// Weight of the newest latency in the EWMA.
const EWMA_ALPHA: f64 = 0.2;

/// Load counters, updated by requests and read by the reporter.
#[derive(Debug, Default)]
pub struct LoadTracker {
    in_flight: AtomicU32,
    requests: AtomicU64,
    records: AtomicU64,
    stream_records: std::sync::Arc<AtomicU64>,
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

    /// The counter streams add their records to.
    pub fn stream_records(&self) -> std::sync::Arc<AtomicU64> {
        self.stream_records.clone()
    }

    /// The latency EWMA, in milliseconds.
    pub fn ewma_ms(&self) -> f64 {
        *self.ewma_ms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts transformed records.
    pub fn add_records(&self, n: u64) {
        self.records.fetch_add(n, Ordering::Relaxed);
    }

    /// The load since the last call.
    pub fn snapshot(&self) -> Load {
        let now = Instant::now();
        let records =
            self.records.load(Ordering::Relaxed) + self.stream_records.load(Ordering::Relaxed);
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
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
            ewma_latency_ms: *self.ewma_ms.lock().unwrap_or_else(|p| p.into_inner()),
            records_per_sec: rps,
            cpu_percent: cpu,
            rss_bytes: etlmesh_telemetry::process::rss_bytes().unwrap_or(0),
            requests_total: self.requests.load(Ordering::Relaxed),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let ms = self.1.elapsed().as_secs_f64() * 1000.0;
        let mut e = self.0.ewma_ms.lock().unwrap_or_else(|p| p.into_inner());
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
