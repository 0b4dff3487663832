//! CPU time and resident memory of this process, from `/proc/self`, and the CPU time
//! of a future's polls ([`cpu_timed`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Clock ticks per second of `/proc/<pid>/stat` times (the Linux default on every
/// mainstream architecture).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds (user + system) used by process `pid` (`None`: this process, to the
/// nanosecond; another process to the clock tick).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let Some(p) = pid else {
        use nix::time::{ClockId, clock_gettime};
        let t = clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID).ok()?;
        return Some(t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9);
    };
    let path = format!("/proc/{p}/stat");
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

/// Resident memory of this process, in bytes.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// CPU use between two samples, in percent of one core.
#[derive(Debug)]
pub struct CpuMeter {
    last: Option<(std::time::Instant, f64)>,
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuMeter {
    /// Starts measuring.
    pub fn new() -> Self {
        Self {
            last: cpu_seconds(None).map(|c| (std::time::Instant::now(), c)),
        }
    }

    /// Percent of one core used since the last call.
    pub fn sample(&mut self) -> f64 {
        let now = std::time::Instant::now();
        let Some(cpu) = cpu_seconds(None) else {
            return 0.0;
        };
        let pct = match self.last {
            Some((t, c)) => {
                let wall = now.duration_since(t).as_secs_f64();
                if wall > 0.0 {
                    100.0 * (cpu - c) / wall
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, cpu));
        pct.max(0.0)
    }
}

/// CPU time of the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Runs `inner`, adding the CPU time of each of its polls to `counter` (nanoseconds):
/// the work done inline for it, on whichever thread polls it. Tasks it spawns are not
/// counted. The future is pinned in place (no allocation).
pub async fn cpu_timed<F: Future>(inner: F, counter: Arc<AtomicU64>) -> F::Output {
    let mut inner = std::pin::pin!(inner);
    std::future::poll_fn(|cx| {
        let start = thread_cpu_ns();
        let out = inner.as_mut().poll(cx);
        counter.fetch_add(thread_cpu_ns().saturating_sub(start), Ordering::Relaxed);
        out
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_bytes().is_some_and(|r| r > 0));
        let mut m = CpuMeter::new();
        // Busy for 200 ms of wall time: the meter must see this thread's work (a
        // sleeping process reads about 0; a loaded 2-core machine still gives it a share).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(200) {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        assert!(x != 1);
        let busy = m.sample();
        assert!(busy > 5.0, "a busy thread read as {busy} % of a core");
    }

    #[tokio::test]
    async fn cpu_timed_counts_the_work_of_its_polls() {
        let counter = Arc::new(AtomicU64::new(0));
        let work = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut x = 0u64;
            for i in 0..20_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            x
        };
        let x = cpu_timed(work, counter.clone()).await;
        assert!(x != 1);
        let ns = counter.load(Ordering::Relaxed);
        // The loop takes milliseconds of CPU; the sleep takes none.
        assert!(ns > 1_000_000, "{ns}");
        assert!(ns < 40_000_000_000, "{ns}");
    }
}
