//! The autoscaling policy of one pipeline, as a pure function of what it observes, so
//! that it can be tested without processes or clocks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use etlmesh_config::ScalingSpec;

/// The panic window: load averaged over it decides panic mode.
pub const PANIC_WINDOW: Duration = Duration::from_secs(6);
/// Changes within this fraction of the current replicas are ignored.
pub const TOLERANCE: f64 = 0.10;

/// What the autoscaler sees at one tick.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    /// When.
    pub at: Instant,
    /// Requests in flight or held for the pipeline, over every worker and gateway.
    pub in_flight: f64,
    /// CPU of its workers, summed, in percent of a core.
    pub cpu_percent: f64,
    /// Messages waiting in its stream source (the consumer lag; 0 when unknown).
    pub lag: f64,
    /// Records per second the pool processed lately (0 when unknown): with the lag, the
    /// time the backlog takes to drain.
    pub rate: f64,
    /// Whether any request arrived since the last tick.
    pub active: bool,
}

/// A change of replicas, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas before.
    pub from: u32,
    /// Replicas after.
    pub to: u32,
    /// Why, for logs, metrics and the admin API: `2 → 5: in-flight 38, target 8`.
    pub reason: String,
    /// Whether panic mode decided it.
    pub panic: bool,
    /// The rule that decided, as a metric label: `load`, `lag`, `panic`, `window`, `idle`.
    pub cause: &'static str,
}

/// The autoscaler of one pipeline.
#[derive(Debug)]
pub struct Autoscaler {
    spec: ScalingSpec,
    current: u32,
    /// (when, replicas the load asked for, in-flight), over the longest window.
    history: VecDeque<(Instant, u32, f64)>,
    started: Instant,
    last_active: Instant,
}

impl Autoscaler {
    /// Starts at `min_replicas`.
    pub fn new(spec: ScalingSpec, now: Instant) -> Self {
        Self {
            current: spec.min_replicas,
            spec,
            history: VecDeque::new(),
            started: now,
            last_active: now,
        }
    }

    /// The replicas it wants now.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// Takes the replicas a pool runs already (a control plane started again beside
    /// running workers), within its bounds; the replicas to run now.
    pub fn adopt(&mut self, running: u32) -> u32 {
        self.current = running.clamp(
            self.spec.min_replicas,
            self.spec.max_replicas.max(self.spec.min_replicas),
        );
        self.current
    }

    /// Takes a new policy (a reload), keeping the replicas it runs when they are within
    /// the new bounds; the replicas to run now.
    pub fn set_spec(&mut self, spec: ScalingSpec) -> u32 {
        self.current = self
            .current
            .clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
        self.spec = spec;
        self.history.clear();
        self.current
    }

    /// The policy.
    pub fn spec(&self) -> &ScalingSpec {
        &self.spec
    }

    /// Whether `in_flight` requests would make it add workers: more than the current
    /// replicas carry, past the tolerance, while below `max_replicas`. Lets a caller
    /// act on a load report at once instead of at the next tick.
    pub fn wants_more(&self, in_flight: f64) -> bool {
        let capacity = f64::from(self.current) * self.spec.target_in_flight;
        self.current < self.spec.max_replicas && in_flight > capacity * (1.0 + TOLERANCE)
    }

    /// Replicas the load asks for, before bounds.
    fn wanted(&self, o: &Observation) -> u32 {
        let by_requests = (o.in_flight / self.spec.target_in_flight).ceil();
        let by_cpu = self
            .spec
            .target_cpu_percent
            .map_or(0.0, |t| (o.cpu_percent / t).ceil());
        let by_lag = self
            .spec
            .target_lag
            .map_or(0.0, |t| (o.lag / t as f64).ceil());
        by_requests
            .max(by_cpu)
            .max(by_lag)
            .max(self.by_drain(o))
            .max(0.0) as u32
    }

    /// Replicas that drain the backlog within `target_drain`, each at the rate a worker
    /// is measured to process now (0 while the rate or the lag is unknown).
    fn by_drain(&self, o: &Observation) -> f64 {
        match self.spec.target_drain {
            Some(t) if o.rate > 0.0 && o.lag > 0.0 && self.current > 0 => {
                let per_worker = o.rate / f64::from(self.current);
                (o.lag / (per_worker * t.as_secs_f64().max(0.001))).ceil()
            }
            _ => 0.0,
        }
    }

    /// Looks at the load and decides; `None` keeps the replicas as they are.
    pub fn observe(&mut self, o: Observation) -> Option<Decision> {
        let wanted = self.wanted(&o);
        if o.active || o.in_flight > 0.0 || o.lag > 0.0 {
            self.last_active = o.at;
        }
        self.history.push_back((o.at, wanted, o.in_flight));
        let keep = self.spec.scale_down_window.max(PANIC_WINDOW);
        while self
            .history
            .front()
            .is_some_and(|(t, _, _)| o.at.duration_since(*t) > keep)
        {
            self.history.pop_front();
        }
        let (min, max) = (self.spec.min_replicas, self.spec.max_replicas);
        let from = self.current;

        // Panic: the last 6 s carried at least twice what the replicas are meant to carry.
        let recent: Vec<&(Instant, u32, f64)> = self
            .history
            .iter()
            .filter(|(t, _, _)| o.at.duration_since(*t) <= PANIC_WINDOW)
            .collect();
        let avg = recent.iter().map(|(_, _, f)| f).sum::<f64>() / recent.len().max(1) as f64;
        let capacity = f64::from(from.max(1)) * self.spec.target_in_flight;
        let panic = from > 0 && avg >= 2.0 * capacity;

        let mut to = from;
        let peak_recent = recent.iter().map(|(_, w, _)| *w).max().unwrap_or(0);
        if panic {
            to = to.max(peak_recent.max(wanted));
        } else if wanted > from {
            let outside = from == 0 || f64::from(wanted - from) > TOLERANCE * f64::from(from);
            if outside {
                to = wanted;
            }
        } else {
            // Down only to the highest demand seen over the whole window, and only once
            // the window has been observed.
            let covered = o.at.duration_since(self.started) >= self.spec.scale_down_window;
            let window_peak = self
                .history
                .iter()
                .filter(|(t, _, _)| o.at.duration_since(*t) < self.spec.scale_down_window)
                .map(|(_, w, _)| *w)
                .max()
                .unwrap_or(0);
            let outside = f64::from(from - window_peak.min(from)) > TOLERANCE * f64::from(from);
            if covered && window_peak < from && outside {
                to = window_peak;
            }
        }
        let idle = o.at.duration_since(self.last_active);
        let floor = if min == 0 && idle < self.spec.idle_before_zero && from > 0 {
            1
        } else {
            min
        };
        to = to.clamp(floor, max);
        if to == from {
            return None;
        }
        self.current = to;
        let mut reason = format!(
            "{from} → {to}: in-flight {}, target {}",
            o.in_flight.round(),
            self.spec.target_in_flight
        );
        if let Some(t) = self.spec.target_cpu_percent {
            reason.push_str(&format!(", cpu {:.0} %, target {t} %", o.cpu_percent));
        }
        let drain_decided = to > from && self.by_drain(&o) >= f64::from(to);
        let lag_decided = drain_decided
            || self
                .spec
                .target_lag
                .is_some_and(|t| to > from && (o.lag / t as f64).ceil() as u32 >= to);
        if let Some(t) = self.spec.target_lag {
            reason.push_str(&format!(", lag {}, target {t}", o.lag.round()));
        }
        if let Some(t) = self.spec.target_drain {
            if o.rate > 0.0 {
                reason.push_str(&format!(
                    ", drains in {:.0} s at {:.0}/s, target {:?}",
                    o.lag / o.rate,
                    o.rate,
                    t
                ));
            } else {
                reason.push_str(&format!(", lag {}, rate unknown", o.lag.round()));
            }
        }
        if panic {
            reason.push_str(", panic: load at least twice the capacity over 6 s");
        } else if to == 0 {
            reason.push_str(&format!(", idle for {:.0?}", idle));
        } else if to < from {
            reason.push_str(&format!(
                ", lower for the {:?} window",
                self.spec.scale_down_window
            ));
        }
        let cause = if panic {
            "panic"
        } else if lag_decided {
            "lag"
        } else if to > from {
            "load"
        } else if to == 0 {
            "idle"
        } else {
            "window"
        };
        Some(Decision {
            from,
            to,
            reason,
            panic,
            cause,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScalingSpec {
        ScalingSpec {
            min_replicas: 0,
            max_replicas: 8,
            target_in_flight: 8.0,
            target_cpu_percent: None,
            target_lag: None,
            target_drain: None,
            scale_down_window: Duration::from_secs(30),
            idle_before_zero: Duration::from_secs(60),
        }
    }

    struct Clock {
        start: Instant,
        secs: u64,
    }

    impl Clock {
        fn obs(&mut self, in_flight: f64) -> Observation {
            self.secs += 1;
            Observation {
                at: self.start + Duration::from_secs(self.secs),
                in_flight,
                cpu_percent: 0.0,
                lag: 0.0,
                rate: 0.0,
                active: in_flight > 0.0,
            }
        }
    }

    #[test]
    fn a_reloaded_policy_keeps_the_replicas_within_its_new_bounds() {
        let start = Instant::now();
        let mut a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 3,
                ..spec()
            },
            start,
        );
        assert_eq!(
            a.set_spec(ScalingSpec {
                min_replicas: 1,
                ..spec()
            }),
            3,
            "3 is within 1..=8"
        );
        assert_eq!(
            a.set_spec(ScalingSpec {
                min_replicas: 1,
                max_replicas: 2,
                ..spec()
            }),
            2
        );
        assert_eq!(
            a.set_spec(ScalingSpec {
                min_replicas: 4,
                ..spec()
            }),
            4
        );
        assert_eq!(a.spec().min_replicas, 4);
    }

    #[test]
    fn scales_up_at_once_with_a_reason() {
        let start = Instant::now();
        let mut a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 2,
                ..spec()
            },
            start,
        );
        let mut c = Clock { start, secs: 0 };
        let d = a.observe(c.obs(38.0)).expect("up");
        assert_eq!((d.from, d.to), (2, 5));
        assert!(
            d.reason.starts_with("2 → 5: in-flight 38, target 8"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn small_changes_stay_inside_the_tolerance() {
        let start = Instant::now();
        let mut a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 8,
                max_replicas: 20,
                ..spec()
            },
            start,
        );
        let mut c = Clock { start, secs: 0 };
        // 9 wanted against 8: 12.5 % off, so it moves; 8.4 rounds up to 9 as well.
        assert!(a.observe(c.obs(70.0)).is_some());
        let mut a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 10,
                max_replicas: 20,
                ..spec()
            },
            start,
        );
        // 11 against 10 is exactly the 10 % tolerance: no change.
        assert!(a.observe(c.obs(88.0)).is_none());
    }

    #[test]
    fn panic_jumps_to_the_peak_and_the_max_bounds_it() {
        let start = Instant::now();
        let mut a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 1,
                ..spec()
            },
            start,
        );
        let mut c = Clock { start, secs: 0 };
        let d = a.observe(c.obs(200.0)).expect("up");
        assert_eq!(d.to, 8, "capped at max_replicas");
        assert!(d.panic);
    }

    #[test]
    fn scales_down_only_after_the_window_and_to_zero_after_idle() {
        let start = Instant::now();
        let mut a = Autoscaler::new(spec(), start);
        let mut c = Clock { start, secs: 0 };
        assert_eq!(a.observe(c.obs(40.0)).map(|d| d.to), Some(5));
        // The load stops: nothing changes inside the 30 s window.
        for _ in 0..29 {
            assert_eq!(a.observe(c.obs(0.0)), None, "at {} s", c.secs);
        }
        let d = a.observe(c.obs(0.0)).expect("down after the window");
        assert_eq!(d.to, 1, "not to zero before the idle period");
        for _ in 0..29 {
            assert_eq!(a.observe(c.obs(0.0)), None, "at {} s", c.secs);
        }
        let d = a.observe(c.obs(0.0)).expect("to zero");
        assert_eq!(d.to, 0);
        assert!(d.reason.contains("idle"), "{}", d.reason);
        // From zero, one held request brings a worker back at once.
        assert_eq!(a.observe(c.obs(1.0)).map(|d| d.to), Some(1));
    }

    #[test]
    fn wants_more_only_past_capacity_and_below_the_max() {
        let start = Instant::now();
        let a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 2,
                max_replicas: 3,
                ..spec()
            },
            start,
        );
        assert!(!a.wants_more(17.0), "16 carried, 10 % tolerance");
        assert!(a.wants_more(18.0));
        let full = Autoscaler::new(
            ScalingSpec {
                min_replicas: 3,
                max_replicas: 3,
                ..spec()
            },
            start,
        );
        assert!(!full.wants_more(1000.0), "already at max_replicas");
    }

    #[test]
    fn cpu_targets_scale_too() {
        let start = Instant::now();
        let mut a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 1,
                target_cpu_percent: Some(50.0),
                ..spec()
            },
            start,
        );
        let o = Observation {
            at: start + Duration::from_secs(1),
            in_flight: 1.0,
            cpu_percent: 180.0,
            lag: 0.0,
            rate: 0.0,
            active: true,
        };
        assert_eq!(a.observe(o).map(|d| d.to), Some(4));
    }

    #[test]
    fn a_stream_backlog_scales_by_its_lag_and_keeps_the_workers_while_it_lasts() {
        let start = Instant::now();
        let mut a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 1,
                max_replicas: 4,
                target_lag: Some(10_000),
                ..spec()
            },
            start,
        );
        let at = |s: u64, lag: f64| Observation {
            at: start + Duration::from_secs(s),
            in_flight: 0.0,
            cpu_percent: 0.0,
            lag,
            rate: 0.0,
            active: false,
        };
        let d = a.observe(at(1, 25_000.0)).expect("up");
        assert_eq!((d.from, d.to, d.cause), (1, 3, "lag"));
        assert!(d.reason.contains("lag 25000, target 10000"), "{}", d.reason);
        // Past max_replicas: capped.
        assert_eq!(a.observe(at(2, 90_000.0)).map(|d| d.to), Some(4));
        // The backlog drains: down only after the window, and never below min_replicas.
        for s in 3..32 {
            assert_eq!(a.observe(at(s, 0.0)), None, "at {s} s");
        }
        assert_eq!(a.observe(at(32, 0.0)).map(|d| d.to), Some(1));
        assert_eq!(a.observe(at(200, 0.0)), None, "a stream keeps min_replicas");
    }

    #[test]
    fn a_backlog_that_would_drain_too_slowly_at_the_measured_rate_adds_workers() {
        let start = Instant::now();
        let mut a = Autoscaler::new(
            ScalingSpec {
                min_replicas: 1,
                max_replicas: 8,
                target_drain: Some(Duration::from_secs(30)),
                ..spec()
            },
            start,
        );
        let at = |s: u64, lag: f64, rate: f64| Observation {
            at: start + Duration::from_secs(s),
            in_flight: 0.0,
            cpu_percent: 0.0,
            lag,
            rate,
            active: false,
        };
        // 1 worker at 1,000/s: 30 s drain 30,000; 100,000 needs 4 workers.
        let d = a.observe(at(1, 100_000.0, 1_000.0)).expect("up");
        assert_eq!((d.from, d.to, d.cause), (1, 4, "lag"));
        assert!(
            d.reason.contains("drains in 100 s at 1000/s, target 30s"),
            "{}",
            d.reason
        );
        // Four workers at 4,000/s drain 60,000 in 15 s: enough, nothing changes.
        assert_eq!(a.observe(at(2, 60_000.0, 4_000.0)), None);
        // The rate unknown (a worker just started): the lag alone does not decide.
        assert_eq!(a.observe(at(3, 60_000.0, 0.0)), None);
    }
}
