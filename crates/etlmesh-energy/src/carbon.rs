//! The grid's carbon intensity, in gCO2e per kWh: fixed, or from a forecast file.
//!
//! A forecast is a time series of `(start, value)` points; the intensity is a step
//! function that holds each point's value until the next point starts (and the first
//! value before the series, the last after it). Files are read in two shapes:
//!
//! - JSON as the Carbon Aware SDK writes it: the answer of
//!   `/emissions/forecasts/current` (an array of forecasts, each with `forecastData`
//!   points `{timestamp, duration, value}`; the first forecast is used), one such
//!   forecast, or an array of points (`timestamp` or `time`, `value` or `rating`);
//! - CSV with a header naming `timestamp` (or `time`) and `value` (or `rating`,
//!   `intensity`); other columns are ignored.

use std::path::{Path, PathBuf};

use chrono::DateTime;

/// A forecast file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("carbon forecast {file}: {reason}\n  help: {help}")]
pub struct ForecastError {
    /// The file (with `:line` for CSV).
    pub file: String,
    /// What is wrong.
    pub reason: String,
    /// What to do.
    pub help: String,
}

/// One point of a forecast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// When it starts, in Unix milliseconds.
    pub start_ms: i64,
    /// gCO2e per kWh.
    pub value: f64,
}

/// A carbon-intensity forecast: points sorted by start, at least one.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    points: Vec<Point>,
}

/// Where the intensity comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Intensity {
    /// One figure at all times.
    Fixed(f64),
    /// A forecast, with the file it was read from.
    Forecast(Forecast, PathBuf),
}

impl Intensity {
    /// gCO2e per kWh at `t_ms`.
    pub fn at(&self, t_ms: i64) -> f64 {
        match self {
            Self::Fixed(v) => *v,
            Self::Forecast(f, _) => f.at(t_ms),
        }
    }

    /// The mean intensity over `[from_ms, to_ms)`.
    pub fn average(&self, from_ms: i64, to_ms: i64) -> f64 {
        match self {
            Self::Fixed(v) => *v,
            Self::Forecast(f, _) => f.average(from_ms, to_ms),
        }
    }

    /// `fixed` or `forecast:<file>`, for reports.
    pub fn describe(&self) -> String {
        match self {
            Self::Fixed(_) => "fixed".into(),
            Self::Forecast(_, p) => format!("forecast:{}", p.display()),
        }
    }

    /// The forecast, when there is one.
    pub fn forecast(&self) -> Option<&Forecast> {
        match self {
            Self::Fixed(_) => None,
            Self::Forecast(f, _) => Some(f),
        }
    }
}

impl Forecast {
    /// A forecast from points (sorted here); `None` when there is none.
    pub fn new(mut points: Vec<Point>) -> Option<Self> {
        if points.is_empty() {
            return None;
        }
        points.sort_by_key(|p| p.start_ms);
        points.dedup_by_key(|p| p.start_ms);
        Some(Self { points })
    }

    /// The points.
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    fn index_at(&self, t_ms: i64) -> usize {
        self.points
            .partition_point(|p| p.start_ms <= t_ms)
            .saturating_sub(1)
    }

    /// gCO2e per kWh at `t_ms`.
    pub fn at(&self, t_ms: i64) -> f64 {
        self.points[self.index_at(t_ms)].value
    }

    /// The mean over `[from_ms, to_ms)` (the value at `from_ms` for an empty span).
    pub fn average(&self, from_ms: i64, to_ms: i64) -> f64 {
        if to_ms <= from_ms {
            return self.at(from_ms);
        }
        let mut sum = 0.0;
        let mut t = from_ms;
        while t < to_ms {
            let next = self.points.partition_point(|p| p.start_ms <= t);
            let end = self
                .points
                .get(next)
                .map_or(to_ms, |p| p.start_ms.min(to_ms));
            sum += self.at(t) * (end - t) as f64;
            t = end;
        }
        sum / (to_ms - from_ms) as f64
    }

    /// Every time the intensity may change: the points' starts.
    pub fn breakpoints(&self) -> impl Iterator<Item = i64> + '_ {
        self.points.iter().map(|p| p.start_ms)
    }

    /// Reads a JSON or CSV forecast file.
    pub fn load(path: &Path) -> Result<Self, ForecastError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ForecastError {
            file: file.clone(),
            reason: format!("cannot be read: {e}"),
            help: "check platform.carbon.forecast in the pipeline file".into(),
        })?;
        Self::parse(&file, &text)
    }

    /// Parses a forecast's text; `file` labels errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ForecastError> {
        let points = match text.trim_start().chars().next() {
            Some('[' | '{') => parse_json(file, text)?,
            _ => parse_csv(file, text)?,
        };
        Self::new(points).ok_or_else(|| ForecastError {
            file: file.to_string(),
            reason: "holds no point".into(),
            help: "give at least one timestamp and value".into(),
        })
    }
}

fn timestamp(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.timestamp_millis())
}

fn parse_json(file: &str, text: &str) -> Result<Vec<Point>, ForecastError> {
    use serde_json::Value;
    let err = |reason: String| ForecastError {
        file: file.to_string(),
        reason,
        help: "use the Carbon Aware SDK's forecast JSON, or an array of {\"timestamp\", \"value\"}"
            .into(),
    };
    let v: Value = serde_json::from_str(text).map_err(|e| err(format!("is not JSON: {e}")))?;
    let data = match &v {
        Value::Array(items) => match items.first() {
            Some(first) if first.get("forecastData").is_some() => first["forecastData"].clone(),
            _ => v.clone(),
        },
        Value::Object(o) => o
            .get("forecastData")
            .cloned()
            .ok_or_else(|| err("an object without `forecastData`".into()))?,
        _ => return Err(err("is neither an array nor an object".into())),
    };
    let Value::Array(items) = data else {
        return Err(err("`forecastData` is not an array".into()));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let t = p
                .get("timestamp")
                .or_else(|| p.get("time"))
                .and_then(Value::as_str)
                .and_then(timestamp)
                .ok_or_else(|| err(format!("point {i}: no RFC 3339 `timestamp`")))?;
            let value = p
                .get("value")
                .or_else(|| p.get("rating"))
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| err(format!("point {i}: no `value` (gCO2e/kWh, 0 or more)")))?;
            Ok(Point { start_ms: t, value })
        })
        .collect()
}

fn parse_csv(file: &str, text: &str) -> Result<Vec<Point>, ForecastError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let help = "the header names `timestamp` and `value`; timestamps are RFC 3339";
    let err = |line: usize, reason: String| ForecastError {
        file: format!("{file}:{}", line + 1),
        reason,
        help: help.into(),
    };
    let (hl, header) = lines.next().ok_or_else(|| err(0, "is empty".into()))?;
    let cols: Vec<String> = header
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_ascii_lowercase())
        .collect();
    let find = |names: &[&str]| cols.iter().position(|c| names.contains(&c.as_str()));
    let ti = find(&["timestamp", "time"]).ok_or_else(|| {
        err(
            hl,
            format!("no `timestamp` column in the header `{header}`"),
        )
    })?;
    let vi = find(&["value", "rating", "intensity"])
        .ok_or_else(|| err(hl, format!("no `value` column in the header `{header}`")))?;
    lines
        .map(|(n, line)| {
            let f: Vec<&str> = line
                .split(',')
                .map(|c| c.trim().trim_matches('"'))
                .collect();
            let t = f.get(ti).and_then(|s| timestamp(s)).ok_or_else(|| {
                err(
                    n,
                    format!("`{}` is not an RFC 3339 time", f.get(ti).unwrap_or(&"")),
                )
            })?;
            let value = f
                .get(vi)
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    err(
                        n,
                        format!(
                            "`{}` is not an intensity (a number, 0 or more)",
                            f.get(vi).unwrap_or(&"")
                        ),
                    )
                })?;
            Ok(Point { start_ms: t, value })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn t0() -> i64 {
        timestamp("2026-11-26T00:00:00Z").expect("time")
    }

    #[test]
    fn reads_the_carbon_aware_sdk_forecast() {
        let json = r#"[{"generatedAt":"2026-11-26T00:00:00Z","location":"eastus","windowSize":60,
            "optimalDataPoints":[{"location":"eastus","timestamp":"2026-11-26T01:00:00Z","duration":60,"value":100}],
            "forecastData":[
              {"location":"eastus","timestamp":"2026-11-26T00:00:00Z","duration":60,"value":400},
              {"location":"eastus","timestamp":"2026-11-26T01:00:00+00:00","duration":60,"value":100},
              {"location":"eastus","timestamp":"2026-11-26T02:00:00Z","duration":60,"value":250.5}]}]"#;
        let f = Forecast::parse("f.json", json).expect("parse");
        assert_eq!(f.points().len(), 3);
        assert_eq!(f.at(t0() + H / 2), 400.0);
        assert_eq!(f.at(t0() + H), 100.0);
        assert_eq!(f.at(t0() - H), 400.0, "the first value holds before");
        assert_eq!(f.at(t0() + 10 * H), 250.5, "the last value holds after");
        // Half an hour of 400, then half an hour of 100.
        assert!((f.average(t0() + H / 2, t0() + 3 * H / 2) - 250.0).abs() < 1e-9);
        let emissions = r#"[{"location":"x","time":"2026-11-26T00:00:00Z","rating":300,"duration":"01:00:00"}]"#;
        assert_eq!(
            Forecast::parse("e.json", emissions)
                .expect("parse")
                .at(t0()),
            300.0
        );
    }

    #[test]
    fn reads_csv_and_names_bad_lines() {
        let csv = "timestamp,value\n2026-11-26T01:00:00Z,120\n2026-11-26T00:00:00Z,300\n";
        let f = Forecast::parse("f.csv", csv).expect("parse");
        assert_eq!(f.at(t0()), 300.0, "sorted by time");
        assert!((f.average(t0(), t0() + 2 * H) - 210.0).abs() < 1e-9);
        let e =
            Forecast::parse("f.csv", "time,rating\n2026-11-26T00:00:00Z,abc\n").expect_err("bad");
        assert!(e.to_string().contains("f.csv:2"), "{e}");
        assert!(e.to_string().contains("`abc`"), "{e}");
        let e = Forecast::parse("f.csv", "when,value\n").expect_err("bad header");
        assert!(e.to_string().contains("no `timestamp` column"), "{e}");
        assert!(Forecast::parse("f.json", "[]").is_err());
    }
}
