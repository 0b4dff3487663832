//! Exception tracking: error lines grouped by kind and pipeline, with counts, first
//! and last seen, the processes that reported them and example trace ids.

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::Serialize;

use crate::logs::LogLine;

/// Groups kept; past this the group seen longest ago goes.
const MAX_GROUPS: usize = 500;
/// Example trace ids kept per group (the newest).
const EXAMPLES: usize = 5;
/// Sources named per group.
const MAX_SOURCES: usize = 16;

/// One kind of error in one pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorGroup {
    /// The `error_kind` of its lines, or their message with numbers masked.
    pub kind: String,
    /// The pipeline (none: not tied to one).
    pub pipeline: Option<String>,
    /// The worst level seen.
    pub level: String,
    /// How many times.
    pub count: u64,
    /// The first time (RFC 3339).
    pub first_seen: String,
    /// The last time (RFC 3339).
    pub last_seen: String,
    /// The newest message.
    pub last_message: String,
    /// The newest trace ids.
    pub trace_ids: VecDeque<String>,
    /// The processes that reported it.
    pub sources: BTreeSet<String>,
}

/// Error groups, bounded.
#[derive(Debug, Default)]
pub struct ErrorGroups {
    groups: HashMap<(String, Option<String>), ErrorGroup>,
}

/// A message as a group key: digit runs become `#` and it is cut at 120 bytes, so that
/// "worker w-3 timed out after 512 ms" and "… w-7 … 498 ms" group together.
pub fn fingerprint(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(120));
    let mut in_digits = false;
    for c in message.chars() {
        if out.len() >= 120 {
            break;
        }
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('#');
            }
            in_digits = true;
        } else {
            in_digits = false;
            out.push(c);
        }
    }
    out
}

impl ErrorGroups {
    /// Counts `line` if it reports an error; returns its kind then.
    pub fn record(&mut self, line: &LogLine) -> Option<String> {
        if !line.is_error() {
            return None;
        }
        let kind = line
            .error_kind
            .clone()
            .unwrap_or_else(|| fingerprint(&line.message));
        let key = (kind.clone(), line.pipeline.clone());
        if !self.groups.contains_key(&key) && self.groups.len() >= MAX_GROUPS {
            self.evict_oldest();
        }
        let g = self
            .groups
            .entry(key)
            .or_insert_with_key(|(kind, p)| ErrorGroup {
                kind: kind.clone(),
                pipeline: p.clone(),
                level: line.level.clone(),
                count: 0,
                first_seen: line.time.clone(),
                last_seen: line.time.clone(),
                last_message: String::new(),
                trace_ids: VecDeque::new(),
                sources: BTreeSet::new(),
            });
        g.count += 1;
        g.last_seen.clone_from(&line.time);
        g.last_message.clone_from(&line.message);
        if line.level() < crate::logs::parse_level(&g.level).unwrap_or(tracing::Level::TRACE) {
            g.level.clone_from(&line.level);
        }
        if let Some(t) = &line.trace_id
            && !g.trace_ids.contains(t)
        {
            if g.trace_ids.len() == EXAMPLES {
                g.trace_ids.pop_front();
            }
            g.trace_ids.push_back(t.clone());
        }
        if let Some(s) = &line.source
            && g.sources.len() < MAX_SOURCES
        {
            g.sources.insert(s.clone());
        }
        Some(kind)
    }

    fn evict_oldest(&mut self) {
        if let Some(k) = self
            .groups
            .iter()
            .min_by(|a, b| a.1.last_seen.cmp(&b.1.last_seen))
            .map(|(k, _)| k.clone())
        {
            self.groups.remove(&k);
        }
    }

    /// The groups, most recently seen first.
    pub fn list(&self) -> Vec<ErrorGroup> {
        let mut v: Vec<ErrorGroup> = self.groups.values().cloned().collect();
        v.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(b.count.cmp(&a.count)));
        v
    }

    /// Errors counted so far, in all groups.
    pub fn total(&self) -> u64 {
        self.groups.values().map(|g| g.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(level: &str, kind: Option<&str>, msg: &str, trace: &str, time: &str) -> LogLine {
        LogLine {
            seq: 0,
            time: time.into(),
            level: level.into(),
            target: "t".into(),
            message: msg.into(),
            trace_id: Some(trace.into()),
            pipeline: Some("p".into()),
            error_kind: kind.map(Into::into),
            source: Some("w1".into()),
            fields: Default::default(),
        }
    }

    #[test]
    fn groups_by_kind_and_pipeline() {
        let mut g = ErrorGroups::default();
        g.record(&line("INFO", None, "fine", "t0", "1"));
        g.record(&line("INFO", Some("bad_body"), "x", "t1", "2"));
        g.record(&line("WARN", Some("bad_body"), "y", "t2", "3"));
        g.record(&line("WARN", None, "worker w-3 took 512 ms", "t3", "4"));
        g.record(&line("ERROR", None, "worker w-7 took 98 ms", "t4", "5"));
        let list = g.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].kind, "worker w-# took # ms");
        assert_eq!(list[0].count, 2);
        assert_eq!(list[0].level, "ERROR");
        assert_eq!(list[1].kind, "bad_body");
        assert_eq!(
            (list[1].first_seen.as_str(), list[1].last_seen.as_str()),
            ("2", "3")
        );
        assert_eq!(list[1].trace_ids, ["t1", "t2"]);
        assert_eq!(list[1].level, "WARN");
        assert_eq!(g.total(), 4);
    }
}
