//! The dead letters of rows the windows did not take: late, too far in the future,
//! or without an event time — each placed at its message, in the time field.

use std::time::Duration;

use etlmesh_codec::{DecodedBatch, Reject, Stage};

use super::Added;
use crate::decode::LineMap;

/// The rejects of what adding `b` to the windows refused (`added`), at `now_ms`.
pub fn refused(
    added: &Added,
    b: &DecodedBatch,
    lines: &LineMap,
    time_field: &str,
    max_future: Duration,
    now_ms: i64,
) -> Vec<Reject> {
    let mut rejects = Vec::new();
    for i in &added.future {
        let r = b.provenance.reject(
            &b.batch,
            *i,
            Stage::Future,
            format!(
                "event time is more than max_future = {} ahead of the clock ({}): kept out of the windows so that it cannot move the watermark",
                humantime_secs(max_future),
                fmt_ms(now_ms)
            ),
        );
        rejects.push(lines.place(r).in_field(time_field));
    }
    for (i, mark) in added.late.iter().zip(&added.late_watermark) {
        let r = b.provenance.reject(
            &b.batch,
            *i,
            Stage::Late,
            format!("late: its window closed (watermark {})", fmt_ms(*mark)),
        );
        rejects.push(lines.place(r).in_field(time_field));
    }
    for i in &added.untimed {
        let r = b
            .provenance
            .reject(&b.batch, *i, Stage::Cast, "no event time".to_string());
        rejects.push(lines.place(r));
    }
    rejects
}

/// `300s` → `5m`, for messages.
fn humantime_secs(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Epoch milliseconds as RFC 3339 (UTC, milliseconds).
pub fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}
