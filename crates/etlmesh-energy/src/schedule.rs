//! Carbon-aware placement: when a deferrable job should start.
//!
//! A job of `duration` that must end by `deadline` may start anywhere in
//! `[now, deadline − duration]`. The intensity is a step function, so the mean over a
//! window of fixed length changes slope only when the window's start or end crosses a
//! breakpoint: the best start is `now`, the latest start, or one that puts the start or
//! the end on a breakpoint. [`place`] tries exactly those and keeps the lowest mean
//! (the earliest on a tie).

use crate::carbon::Intensity;

/// Where a job goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// When it should start (Unix milliseconds).
    pub start_ms: i64,
    /// The mean intensity over its run from there (gCO2e/kWh).
    pub average: f64,
    /// The mean intensity had it started at once.
    pub at_once: f64,
    /// Why there: for the job's status.
    pub reason: String,
}

/// Places a job submitted at `now_ms`.
pub fn place(
    intensity: &Intensity,
    now_ms: i64,
    deadline_ms: Option<i64>,
    duration_ms: i64,
    deferrable: bool,
) -> Placement {
    let duration_ms = duration_ms.max(1);
    let at_once = intensity.average(now_ms, now_ms + duration_ms);
    let now = |reason: &str| Placement {
        start_ms: now_ms,
        average: at_once,
        at_once,
        reason: reason.to_string(),
    };
    if !deferrable {
        return now("not deferrable: runs at once");
    }
    let Some(deadline) = deadline_ms else {
        return now("no deadline: runs at once");
    };
    let latest = deadline - duration_ms;
    if latest <= now_ms {
        return now("the deadline leaves no room to defer: runs at once");
    }
    let Some(forecast) = intensity.forecast() else {
        return now("a fixed intensity: no cleaner window, runs at once");
    };
    let candidates = forecast
        .breakpoints()
        .flat_map(|b| [b, b - duration_ms])
        .filter(|&s| s > now_ms && s <= latest)
        .chain([now_ms, latest]);
    let mut best = (now_ms, at_once);
    for s in candidates {
        let avg = forecast.average(s, s + duration_ms);
        if avg < best.1 - 1e-9 || ((avg - best.1).abs() <= 1e-9 && s < best.0) {
            best = (s, avg);
        }
    }
    let reason = if best.0 == now_ms {
        "runs at once: no cleaner window before the deadline".to_string()
    } else {
        format!(
            "deferred to the cleanest window before the deadline: {:.0} gCO2e/kWh instead of {:.0}",
            best.1, at_once
        )
    };
    Placement {
        start_ms: best.0,
        average: best.1,
        at_once,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carbon::{Forecast, Point};

    const MIN: i64 = 60_000;
    const H: i64 = 60 * MIN;

    /// The reference: every start on the minute, the mean from one sample per minute.
    fn brute_force(f: &Forecast, now: i64, deadline: i64, duration: i64) -> (i64, f64) {
        let mut best = (now, f64::INFINITY);
        let mut s = now;
        while s + duration <= deadline {
            let minutes = duration / MIN;
            let sum: f64 = (0..minutes).map(|m| f.at(s + m * MIN + MIN / 2)).sum();
            let avg = sum / minutes as f64;
            if avg < best.1 - 1e-9 {
                best = (s, avg);
            }
            s += MIN;
        }
        best
    }

    /// Day-shaped test forecast: 30-minute points, dirty at night, a clean window at
    /// midday, with a few bumps.
    fn test_forecast(t0: i64) -> Forecast {
        let values = [
            420, 410, 405, 400, 395, 390, 380, 385, 370, 360, 340, 320, 300, 280, 250, 220, 190,
            170, 150, 140, 135, 150, 130, 128, 140, 160, 200, 240, 290, 330, 360, 390, 410, 430,
            440, 445, 450, 440, 430, 425, 420, 415, 410, 405, 400, 395, 390, 385,
        ];
        Forecast::new(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| Point {
                    start_ms: t0 + i as i64 * 30 * MIN,
                    value: *v as f64,
                })
                .collect(),
        )
        .expect("points")
    }

    #[test]
    fn a_job_due_in_12_hours_goes_to_the_cleanest_window() {
        let t0 = 1_795_000_000_000 / H * H;
        let f = test_forecast(t0);
        let i = Intensity::Forecast(f.clone(), "test".into());
        let now = t0 + 17 * MIN; // not on a point's boundary
        let deadline = now + 12 * H;
        for duration in [30 * MIN, 45 * MIN, 2 * H, 3 * H + 10 * MIN] {
            let p = place(&i, now, Some(deadline), duration, true);
            let (start, avg) = brute_force(&f, now, deadline, duration);
            assert!((p.average - avg).abs() < 1e-6, "{duration}: {p:?} vs {avg}");
            assert_eq!(p.start_ms, start, "{duration}: {p:?}");
            assert!(p.start_ms + duration <= deadline);
            assert!(p.average < p.at_once, "{p:?}");
        }
        let p = place(&i, now, Some(deadline), 2 * H, true);
        // The 2 h of lowest mean start at 10:00 (135, 150, 130, 128).
        assert_eq!(p.start_ms, t0 + 10 * H);
        assert!(p.reason.contains("deferred"), "{p:?}");
    }

    #[test]
    fn random_forecasts_agree_with_brute_force() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..50 {
            let t0 = 1_795_000_000_000 / H * H;
            let points = (0..30)
                .map(|i| Point {
                    start_ms: t0 + i * 20 * MIN + (next() % 3) as i64 * MIN,
                    value: (next() % 500) as f64,
                })
                .collect();
            let f = Forecast::new(points).expect("points");
            let i = Intensity::Forecast(f.clone(), "r".into());
            let now = t0 + (next() % 60) as i64 * MIN;
            let duration = (1 + next() % 180) as i64 * MIN;
            let deadline = now + duration + (next() % 600) as i64 * MIN;
            let p = place(&i, now, Some(deadline), duration, true);
            let (_, avg) = brute_force(&f, now, deadline, duration);
            assert!((p.average - avg).abs() < 1e-6, "{p:?} vs {avg}");
        }
    }

    #[test]
    fn runs_at_once_when_it_cannot_or_need_not_wait() {
        let t0 = 1_795_000_000_000;
        let f = test_forecast(t0);
        let i = Intensity::Forecast(f, "t".into());
        assert_eq!(place(&i, t0, Some(t0 + 12 * H), H, false).start_ms, t0);
        assert_eq!(place(&i, t0, None, H, true).start_ms, t0);
        assert_eq!(place(&i, t0, Some(t0 + H / 2), H, true).start_ms, t0);
        let fixed = Intensity::Fixed(300.0);
        let p = place(&fixed, t0, Some(t0 + 12 * H), H, true);
        assert_eq!((p.start_ms, p.average), (t0, 300.0));
    }
}
