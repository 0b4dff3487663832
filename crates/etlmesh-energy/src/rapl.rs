//! Intel RAPL energy counters through Linux powercap.
//!
//! Each zone (`/sys/class/powercap/intel-rapl:N`) has a counter of microjoules,
//! `energy_uj`, that wraps around at `max_energy_range_uj`. The machine's energy is the
//! sum of the packages (`intel-rapl:N`) and of their DRAM subzones (`intel-rapl:N:M`
//! named `dram`, which the package does not include); other subzones (`core`, `uncore`)
//! are parts of their package and `psys` covers the packages again, so they are skipped.

use std::path::{Path, PathBuf};

/// The default powercap directory.
pub const POWERCAP_DIR: &str = "/sys/class/powercap";

#[derive(Debug)]
struct Zone {
    name: String,
    energy: PathBuf,
    max_uj: u64,
    last_uj: u64,
}

/// Readable RAPL zones and their last readings.
#[derive(Debug)]
pub struct Rapl {
    zones: Vec<Zone>,
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Rapl {
    /// The zones of `dir` whose counters this process can read; `None` when there is
    /// none (no RAPL, or counters readable by root only).
    pub fn discover(dir: &Path) -> Option<Self> {
        let mut zones = Vec::new();
        let entries = std::fs::read_dir(dir).ok()?;
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
                continue;
            };
            let Some(rest) = file.strip_prefix("intel-rapl:") else {
                continue;
            };
            let name = std::fs::read_to_string(path.join("name"))
                .map(|n| n.trim().to_string())
                .unwrap_or_default();
            let top = !rest.contains(':');
            let counted = if top { name != "psys" } else { name == "dram" };
            if !counted {
                continue;
            }
            let energy = path.join("energy_uj");
            let (Some(last_uj), Some(max_uj)) = (
                read_u64(&energy),
                read_u64(&path.join("max_energy_range_uj")),
            ) else {
                continue;
            };
            zones.push(Zone {
                name: format!("{file} ({name})"),
                energy,
                max_uj,
                last_uj,
            });
        }
        (!zones.is_empty()).then_some(Self { zones })
    }

    /// The zones read, for logs.
    pub fn zone_names(&self) -> Vec<String> {
        self.zones.iter().map(|z| z.name.clone()).collect()
    }

    /// Joules used since the previous call (or since [`Rapl::discover`]); `None` when a
    /// counter stopped being readable.
    pub fn joules(&mut self) -> Option<f64> {
        let mut uj = 0u64;
        for z in &mut self.zones {
            let now = read_u64(&z.energy)?;
            uj += delta_uj(z.last_uj, now, z.max_uj);
            z.last_uj = now;
        }
        Some(uj as f64 / 1e6)
    }
}

/// Microjoules between two readings of a counter that wraps at `max`.
pub fn delta_uj(before: u64, after: u64, max: u64) -> u64 {
    if after >= before {
        after - before
    } else {
        // The counter passed `max` and started again at 0.
        max.saturating_sub(before) + after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(dir: &Path, file: &str, name: &str, uj: u64, max: u64) {
        let z = dir.join(file);
        std::fs::create_dir_all(&z).expect("mkdir");
        std::fs::write(z.join("name"), format!("{name}\n")).expect("name");
        std::fs::write(z.join("energy_uj"), format!("{uj}\n")).expect("energy");
        std::fs::write(z.join("max_energy_range_uj"), format!("{max}\n")).expect("max");
    }

    fn set(dir: &Path, file: &str, uj: u64) {
        std::fs::write(dir.join(file).join("energy_uj"), format!("{uj}\n")).expect("energy");
    }

    #[test]
    fn sums_packages_and_dram_and_handles_wraparound() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path();
        zone(p, "intel-rapl:0", "package-0", 1_000_000, 262_143_328_850);
        zone(p, "intel-rapl:0:0", "core", 500_000, 262_143_328_850);
        zone(p, "intel-rapl:0:1", "dram", 2_000_000, 65_712_999_613);
        zone(
            p,
            "intel-rapl:1",
            "package-1",
            262_143_000_000,
            262_143_328_850,
        );
        zone(p, "intel-rapl:2", "psys", 9, 262_143_328_850);
        std::fs::create_dir_all(p.join("intel-rapl-mmio:0")).expect("mmio");
        let mut r = Rapl::discover(p).expect("zones");
        assert_eq!(r.zone_names().len(), 3, "{:?}", r.zone_names());
        set(p, "intel-rapl:0", 3_500_000); // +2.5 J
        set(p, "intel-rapl:0:0", 9_000_000); // a part of the package: not counted
        set(p, "intel-rapl:0:1", 2_250_000); // +0.25 J
        set(p, "intel-rapl:1", 671_150); // wrapped: 328_850 to the top, then 671_150: +1 J
        set(p, "intel-rapl:2", 99_000_000); // psys: not counted
        let j = r.joules().expect("readable");
        assert!((j - 3.75).abs() < 1e-9, "{j}");
        assert_eq!(r.joules(), Some(0.0));
    }

    #[test]
    fn nothing_readable_is_none() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(Rapl::discover(d.path()).is_none());
        assert!(Rapl::discover(&d.path().join("missing")).is_none());
        let z = d.path().join("intel-rapl:0");
        std::fs::create_dir_all(&z).expect("mkdir");
        std::fs::write(z.join("name"), "package-0").expect("name");
        assert!(Rapl::discover(d.path()).is_none(), "no energy_uj");
    }

    #[test]
    fn wraparound_arithmetic() {
        assert_eq!(delta_uj(10, 25, 100), 15);
        assert_eq!(delta_uj(90, 5, 100), 15);
        assert_eq!(delta_uj(7, 7, 100), 0);
    }
}
