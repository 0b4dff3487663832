//! Which letters a command works on: `--since` (a time, or a duration ago),
//! `--where KEY~TEXT` (contains, ignoring case) or `KEY=TEXT` (equals) on `reason`,
//! `stage`, `field` or `source`, and `--id` — all must hold.

use chrono::{DateTime, Utc};

use crate::DeadLetterError;
use crate::letter::{Letter, Stored};

/// The letters a command works on.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    since: Option<DateTime<Utc>>,
    conditions: Vec<Condition>,
    ids: Vec<String>,
}

#[derive(Debug, Clone)]
struct Condition {
    key: Key,
    text: String,
    contains: bool,
}

#[derive(Debug, Clone, Copy)]
enum Key {
    Reason,
    Stage,
    Field,
    Source,
}

impl Selection {
    /// Reads the filters; `now` anchors a `--since` given as a duration.
    pub fn parse(
        since: Option<&str>,
        wheres: &[String],
        ids: &[String],
        now: DateTime<Utc>,
    ) -> Result<Self, DeadLetterError> {
        let since = since.map(|s| parse_since(s, now)).transpose()?;
        let conditions = wheres
            .iter()
            .map(|w| parse_where(w))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            since,
            conditions,
            ids: ids.to_vec(),
        })
    }

    /// Whether a letter is selected.
    pub fn matches(&self, s: &Stored) -> bool {
        let l = &s.letter;
        if let Some(since) = self.since {
            // Letters are written with RFC 3339 times; one that does not parse is kept.
            if DateTime::parse_from_rfc3339(&l.time).is_ok_and(|t| t < since) {
                return false;
            }
        }
        if !self.ids.is_empty() && !self.ids.iter().any(|i| s.id.starts_with(i.as_str())) {
            return false;
        }
        self.conditions.iter().all(|c| c.holds(l))
    }
}

impl Condition {
    fn holds(&self, l: &Letter) -> bool {
        let value = match self.key {
            Key::Reason => l.reason.as_str(),
            Key::Stage => l.stage.as_str(),
            Key::Field => l.field.as_deref().unwrap_or(""),
            Key::Source => l.source.as_str(),
        };
        if self.contains {
            value.to_lowercase().contains(&self.text.to_lowercase())
        } else {
            value == self.text
        }
    }
}

fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, DeadLetterError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = etlmesh_config::units::parse_duration(s).map_err(|e| {
        DeadLetterError::Select(format!(
            "--since {s}: neither a time nor a duration ({e})\n  help: give an RFC 3339 time (2026-12-01T09:00:00Z) or a duration ago (30m, 2h, 7d)"
        ))
    })?;
    let d = chrono::Duration::from_std(d)
        .map_err(|_| DeadLetterError::Select(format!("--since {s}: too long ago")))?;
    Ok(now - d)
}

fn parse_where(w: &str) -> Result<Condition, DeadLetterError> {
    let (at, contains) = match (w.find('~'), w.find('=')) {
        (Some(t), Some(e)) => (t.min(e), t < e),
        (Some(t), None) => (t, true),
        (None, Some(e)) => (e, false),
        (None, None) => {
            return Err(DeadLetterError::Select(format!(
                "--where {w}: no `~` or `=`\n  help: write KEY~TEXT (contains, ignoring case) or KEY=TEXT (equals), KEY one of reason, stage, field, source"
            )));
        }
    };
    let key = match w[..at].trim() {
        "reason" => Key::Reason,
        "stage" => Key::Stage,
        "field" => Key::Field,
        "source" => Key::Source,
        other => {
            return Err(DeadLetterError::Select(format!(
                "--where {w}: `{other}` is not a key of a dead letter\n  help: use reason, stage, field or source"
            )));
        }
    };
    Ok(Condition {
        key,
        text: w[at + 1..].to_string(),
        contains,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(time: &str, stage: &str, reason: &str) -> Stored {
        Stored {
            id: "abcdef0123456789".into(),
            file: "f".into(),
            line: 1,
            letter: Letter {
                time: time.into(),
                pipeline: "p".into(),
                source: "mqtt:sensors/d1".into(),
                line: None,
                row: None,
                stage: stage.into(),
                field: Some("temperature_c".into()),
                reason: reason.into(),
                raw: Some("x".into()),
                raw_base64: None,
                raw_truncated: false,
            },
        }
    }

    #[test]
    fn every_condition_must_hold() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .expect("test")
            .with_timezone(&Utc);
        let s = Selection::parse(
            Some("1h"),
            &["reason~NUMBER".into(), "stage=cast".into()],
            &[],
            now,
        )
        .expect("test");
        assert!(s.matches(&stored("2026-12-01T11:30:00.000Z", "cast", "not a number")));
        assert!(!s.matches(&stored("2026-12-01T10:30:00.000Z", "cast", "not a number")));
        assert!(!s.matches(&stored(
            "2026-12-01T11:30:00.000Z",
            "decode",
            "not a number"
        )));
        assert!(!s.matches(&stored("2026-12-01T11:30:00.000Z", "cast", "too long")));
        let by_id = Selection::parse(None, &[], &["abcdef".into()], now).expect("test");
        assert!(by_id.matches(&stored("t", "cast", "r")));
        let other = Selection::parse(None, &[], &["0123".into()], now).expect("test");
        assert!(!other.matches(&stored("t", "cast", "r")));
    }

    #[test]
    fn bad_filters_say_what_to_write() {
        let now = Utc::now();
        let e = Selection::parse(None, &["colour~red".into()], &[], now).expect_err("must fail");
        assert!(
            e.to_string().contains("use reason, stage, field or source"),
            "{e}"
        );
        let e = Selection::parse(Some("yesterday"), &[], &[], now).expect_err("must fail");
        assert!(e.to_string().contains("RFC 3339"), "{e}");
    }
}
