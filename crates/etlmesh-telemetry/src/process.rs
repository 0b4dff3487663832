//! CPU time and resident memory of this process, from `/proc/self`.

/// Clock ticks per second of `/proc/<pid>/stat` times (the Linux default on every
/// mainstream architecture).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds (user + system) used by process `pid` (`None`: this process).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_bytes().is_some_and(|r| r > 0));
        let mut m = CpuMeter::new();
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(m.sample() >= 0.0);
    }
}
