//! Power from CPU time, when RAPL cannot be read, and the machine's CPU time and memory.
//!
//! The model is Cloud Carbon Footprint's: a vCPU draws between `idle_watts_per_vcpu`
//! (0.74 W) and `max_watts_per_vcpu` (3.5 W) with its utilisation, memory draws
//! `watts_per_gb` (0.392 W per GB), and the data centre's PUE multiplies it all. So one
//! CPU-second of work costs `PUE × (max − idle)` joules above the idle power, and the
//! idle power is `PUE × (vCPUs × idle + GB × watts_per_gb)`.

/// Coefficients of the CPU-time power model.
#[derive(Debug, Clone, PartialEq)]
pub struct PowerModel {
    /// vCPUs of the machine.
    pub vcpus: f64,
    /// Watts of one idle vCPU.
    pub idle_watts_per_vcpu: f64,
    /// Watts of one vCPU at full load.
    pub max_watts_per_vcpu: f64,
    /// Watts per GB of memory in use.
    pub watts_per_gb: f64,
    /// Power usage effectiveness of the data centre (1.0: none counted).
    pub pue: f64,
}

impl PowerModel {
    /// Joules one CPU-second of work costs above idle.
    pub fn joules_per_cpu_second(&self) -> f64 {
        self.pue * (self.max_watts_per_vcpu - self.idle_watts_per_vcpu).max(0.0)
    }

    /// Watts of the machine doing nothing, with `mem_bytes` of memory in use.
    pub fn idle_watts(&self, mem_bytes: u64) -> f64 {
        self.pue
            * (self.vcpus * self.idle_watts_per_vcpu + mem_bytes as f64 / 1e9 * self.watts_per_gb)
    }

    /// Watts of `mem_bytes` of memory (a process's resident set, say).
    pub fn memory_watts(&self, mem_bytes: u64) -> f64 {
        self.pue * mem_bytes as f64 / 1e9 * self.watts_per_gb
    }
}

/// The machine's CPU time, from the first line of `/proc/stat`, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MachineCpu {
    /// Time the CPUs worked (user, nice, system, irq, softirq, steal).
    pub busy: f64,
    /// All time, idle and iowait included.
    pub total: f64,
}

/// Clock ticks per second of `/proc/stat` (Linux's USER_HZ).
const USER_HZ: f64 = 100.0;

impl MachineCpu {
    /// Reads `/proc/stat`.
    pub fn read() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Parses the text of `/proc/stat`.
    pub fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest is inside user)
        let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
        let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
        let total = busy + get(3) + get(4);
        Some(Self {
            busy: busy / USER_HZ,
            total: total / USER_HZ,
        })
    }
}

/// Memory in use on the machine (`MemTotal − MemAvailable`), in bytes.
pub fn memory_in_use() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let kb = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(kb("MemTotal:")?.saturating_sub(kb("MemAvailable:")?) * 1024)
}

/// vCPUs this process may use.
pub fn vcpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_carbon_footprint_coefficients() {
        let m = PowerModel {
            vcpus: 2.0,
            idle_watts_per_vcpu: 0.74,
            max_watts_per_vcpu: 3.5,
            watts_per_gb: 0.392,
            pue: 1.5,
        };
        assert!((m.joules_per_cpu_second() - 1.5 * 2.76).abs() < 1e-9);
        assert!((m.idle_watts(2_000_000_000) - 1.5 * (1.48 + 0.784)).abs() < 1e-9);
    }

    #[test]
    fn parses_proc_stat_and_meminfo() {
        let c = MachineCpu::parse("cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3\n").expect("cpu");
        assert!((c.busy - 1.61).abs() < 1e-9, "{c:?}");
        assert!((c.total - 11.81).abs() < 1e-9, "{c:?}");
        let m = parse_meminfo("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:  400 kB\n");
        assert_eq!(m, Some(600 * 1024));
        assert!(MachineCpu::read().is_some_and(|c| c.total > 0.0));
        assert!(memory_in_use().is_some_and(|m| m > 0));
    }
}
