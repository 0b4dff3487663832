//! The query of a tap (`GET /v1/tap/{pipeline}` on a worker, and the control plane's
//! relay `GET /api/v1/tap/{pipeline}`): one set of defaults and bounds for both.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Records a tap takes at most.
pub const MAX_LIMIT: usize = 10_000;
/// How long a tap stays open at most.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// `?stage=&limit=&timeout_ms=`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TapQuery {
    /// `input`, `output` (the default) or `dead_letter`.
    pub stage: Option<String>,
    /// Records to take (10 by default, at most [`MAX_LIMIT`]).
    pub limit: Option<usize>,
    /// How long to wait for them (60 s by default, at most [`MAX_WAIT`]).
    pub timeout_ms: Option<u64>,
}

impl TapQuery {
    /// The stage asked for.
    pub fn stage(&self) -> &str {
        self.stage.as_deref().unwrap_or("output")
    }

    /// The records to take, within bounds.
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(10).clamp(1, MAX_LIMIT)
    }

    /// How long to wait, within bounds.
    pub fn wait(&self) -> Duration {
        self.timeout_ms
            .map_or(Duration::from_secs(60), Duration::from_millis)
            .min(MAX_WAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let q = TapQuery::default();
        assert_eq!(
            (q.stage(), q.limit(), q.wait()),
            ("output", 10, Duration::from_secs(60))
        );
        let q = TapQuery {
            stage: Some("input".into()),
            limit: Some(1_000_000),
            timeout_ms: Some(u64::MAX),
        };
        assert_eq!(
            (q.stage(), q.limit(), q.wait()),
            ("input", MAX_LIMIT, MAX_WAIT)
        );
        assert_eq!(
            TapQuery {
                limit: Some(0),
                ..q
            }
            .limit(),
            1
        );
    }
}
