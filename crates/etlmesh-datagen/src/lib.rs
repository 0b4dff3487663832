//! Realistic IoT readings for trying etlmesh and for benchmarks: `device_id, ts,
//! temperature_c, humidity, battery_v, status`, from many devices, with slowly drifting
//! values, a few out-of-range temperatures, a few `err` statuses, and a configurable
//! fraction of bad rows (truncated lines, text in numeric columns, wrong field counts,
//! invalid UTF-8, JSON syntax errors).

use std::io::{self, Write};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenFormat {
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Ndjson,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Readings.
    pub rows: u64,
    /// Distinct devices.
    pub devices: u32,
    /// Fraction of rows that are malformed (0.0 to 1.0).
    pub bad_fraction: f64,
    /// Random seed (the same seed gives the same file).
    pub seed: u64,
    /// Format.
    pub format: GenFormat,
    /// Epoch milliseconds of the first reading.
    pub start_ms: i64,
    /// Milliseconds between two readings of one device.
    pub interval_ms: i64,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            rows: 100_000,
            devices: 1000,
            bad_fraction: 0.001,
            seed: 42,
            format: GenFormat::Csv,
            start_ms: 1_795_680_000_000, // 2026-11-26T05:20:00Z
            interval_ms: 10_000,
        }
    }
}

/// What was generated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenStats {
    /// Rows written (good and bad).
    pub rows: u64,
    /// Bad rows among them.
    pub bad_rows: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// One device's slowly drifting state.
#[derive(Debug, Clone)]
pub struct Device {
    temp: f64,
    humidity: f64,
    battery: f64,
}

/// One reading's values.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// Degrees Celsius; 0.5 % are outliers (999.9 or -273.1).
    pub temperature_c: f64,
    /// Percent.
    pub humidity: f64,
    /// Volts.
    pub battery_v: f64,
    /// `ok`, `warn` (3 %) or `err` (2 %).
    pub status: &'static str,
}

impl Device {
    /// A device with plausible starting values.
    pub fn new(rng: &mut impl Rng) -> Self {
        Self {
            temp: rng.random_range(12.0..28.0),
            humidity: rng.random_range(30.0..70.0),
            battery: rng.random_range(3.7..4.2),
        }
    }

    /// The next reading: values drift a little from the last ones.
    pub fn next(&mut self, rng: &mut impl Rng) -> Reading {
        self.temp += rng.random_range(-0.3..0.3);
        self.humidity = (self.humidity + rng.random_range(-0.5..0.5)).clamp(5.0, 99.0);
        self.battery = (self.battery - rng.random_range(0.0..0.0002)).max(3.0);
        let outlier = rng.random_bool(0.005);
        let temperature_c = if outlier {
            if rng.random_bool(0.5) { 999.9 } else { -273.1 }
        } else {
            self.temp
        };
        let roll: f64 = rng.random();
        let status = if roll < 0.02 {
            "err"
        } else if roll < 0.05 {
            "warn"
        } else {
            "ok"
        };
        Reading {
            temperature_c,
            humidity: self.humidity,
            battery_v: self.battery,
            status,
        }
    }
}

/// Writes readings to `w`.
pub fn generate<W: Write>(w: W, opts: &GenOptions) -> io::Result<GenStats> {
    let mut out = io::BufWriter::with_capacity(1 << 20, Counting { inner: w, bytes: 0 });
    let mut rng = SmallRng::seed_from_u64(opts.seed);
    let devices = opts.devices.max(1);
    let mut state: Vec<Device> = (0..devices).map(|_| Device::new(&mut rng)).collect();
    let mut stats = GenStats::default();
    if opts.format == GenFormat::Csv {
        out.write_all(b"device_id,ts,temperature_c,humidity,battery_v,status\n")?;
    }
    let step = (opts.interval_ms / i64::from(devices)).max(1);
    let mut line = Vec::with_capacity(160);
    let mut ts_buf = String::with_capacity(32);
    for i in 0..opts.rows {
        let dev = (i % u64::from(devices)) as usize;
        let jitter = rng.random_range(-step / 4..=step / 4);
        let ts = opts.start_ms + i as i64 * step + jitter;
        let Reading {
            temperature_c: temp,
            humidity,
            battery_v,
            status,
        } = state[dev].next(&mut rng);
        rfc3339_ms(ts, &mut ts_buf);
        line.clear();
        match opts.format {
            GenFormat::Csv => {
                write!(
                    line,
                    "dev-{dev:05},{ts_buf},{temp:.2},{humidity:.1},{battery_v:.3},{status}"
                )?;
            }
            GenFormat::Ndjson => {
                write!(
                    line,
                    r#"{{"device_id":"dev-{dev:05}","ts":"{ts_buf}","temperature_c":{temp:.2},"humidity":{humidity:.1},"battery_v":{battery_v:.3},"status":"{status}"}}"#
                )?;
            }
        }
        if opts.bad_fraction > 0.0 && rng.random_bool(opts.bad_fraction.clamp(0.0, 1.0)) {
            corrupt(&mut line, opts.format, &mut rng);
            stats.bad_rows += 1;
        }
        line.push(b'\n');
        out.write_all(&line)?;
        stats.rows += 1;
    }
    out.flush()?;
    stats.bytes = out.get_ref().bytes;
    Ok(stats)
}

/// Makes a good row bad, in one of the ways real feeds go wrong.
pub fn corrupt(line: &mut Vec<u8>, format: GenFormat, rng: &mut SmallRng) {
    match (format, rng.random_range(0..4)) {
        // A truncated line.
        (_, 0) => {
            let keep = line.len() / 3;
            line.truncate(keep);
        }
        // Text in a numeric column.
        (GenFormat::Csv, 1) => {
            let fields: Vec<&[u8]> = line.split(|&b| b == b',').collect();
            let mut out = Vec::new();
            for (i, f) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(if i == 2 { b"n/a" } else { f });
            }
            *line = out;
        }
        (GenFormat::Ndjson, 1) => {
            let text = String::from_utf8_lossy(line).into_owned();
            if let Some(start) = text.find("\"temperature_c\":") {
                let from = start + "\"temperature_c\":".len();
                let end = text[from..].find(',').map_or(text.len(), |e| from + e);
                *line = format!("{}\"hot\"{}", &text[..from], &text[end..]).into_bytes();
            }
        }
        // A wrong field count / a syntax error.
        (GenFormat::Csv, 2) => line.extend_from_slice(b",extra"),
        (GenFormat::Ndjson, 2) => {
            line.pop(); // drops the closing brace
        }
        // Invalid UTF-8 in the device id.
        _ => {
            if line.len() > 12 {
                let at = line.iter().position(|&b| b == b'-').map_or(2, |p| p + 1);
                line[at] = 0xff;
                line[at + 1] = 0xfe;
            }
        }
    }
}

/// Formats epoch milliseconds as `2026-11-26T10:00:00.123Z`.
pub fn rfc3339_ms(ms: i64, out: &mut String) {
    use std::fmt::Write as _;
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let t = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    out.clear();
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    );
}

struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let mut s = String::new();
        rfc3339_ms(0, &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        rfc3339_ms(1_795_687_200_123, &mut s);
        assert_eq!(s, "2026-11-26T10:00:00.123Z");
    }

    #[test]
    fn deterministic_with_the_requested_bad_fraction() {
        let opts = GenOptions {
            rows: 20_000,
            bad_fraction: 0.05,
            ..Default::default()
        };
        let mut a = Vec::new();
        let stats = generate(&mut a, &opts).expect("generate");
        let mut b = Vec::new();
        generate(&mut b, &opts).expect("generate");
        assert_eq!(a, b);
        assert_eq!(stats.rows, 20_000);
        assert!((700..1300).contains(&stats.bad_rows), "{}", stats.bad_rows);
        assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), 20_001);
        assert_eq!(stats.bytes, a.len() as u64);
    }

    #[test]
    fn clean_ndjson_is_valid_json() {
        let opts = GenOptions {
            rows: 500,
            bad_fraction: 0.0,
            format: GenFormat::Ndjson,
            ..Default::default()
        };
        let mut out = Vec::new();
        generate(&mut out, &opts).expect("generate");
        for line in String::from_utf8(out).expect("utf8").lines() {
            assert!(
                line.starts_with("{\"device_id\":\"dev-") && line.ends_with('}'),
                "{line}"
            );
        }
    }
}
