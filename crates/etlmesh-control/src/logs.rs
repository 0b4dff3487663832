//! Collected logs: a bounded ring of recent lines per process (workers, gateways and
//! the control plane itself), numbered in arrival order so that `etlmesh logs
//! --follow` can ask for what came after the last line it printed; and the error
//! groups built from them (`/api/v1/errors`).

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use etlmesh_telemetry::errors::{ErrorGroup, ErrorGroups};
use etlmesh_telemetry::logs::{LogBatch, LogLine};
use serde::Serialize;
use tracing::Level;

/// Lines kept per process.
pub const LINES_PER_SOURCE: usize = 1000;
/// Processes kept; past this the one heard from longest ago goes.
const MAX_SOURCES: usize = 256;

/// What `GET /api/v1/logs` asks for.
#[derive(Debug, Default, Clone)]
pub struct LogQuery {
    /// Only this process.
    pub source: Option<String>,
    /// This level or worse.
    pub level: Option<Level>,
    /// Lines numbered after this.
    pub after: u64,
    /// At most this many (the newest).
    pub limit: usize,
}

/// The answer: lines oldest first, and the number to ask after next time.
#[derive(Debug, Serialize)]
pub struct LogPage {
    /// The lines.
    pub lines: Vec<LogLine>,
    /// The newest line's number (ask with `after` = this to follow).
    pub next: u64,
}

#[derive(Debug)]
struct Source {
    lines: VecDeque<LogLine>,
    lost: u64,
    heard: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    sources: HashMap<String, Source>,
    next_seq: u64,
    errors: ErrorGroups,
}

/// Labels of the collected-errors counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ErrorLabels {
    pipeline: String,
    kind: String,
}

/// The control plane's collected logs.
#[derive(Debug, Default)]
pub struct LogStore {
    inner: Mutex<Inner>,
    errors_metric: prometheus_client::metrics::family::Family<
        ErrorLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// One process's ring, as `/api/v1/logs/sources` lists it.
#[derive(Debug, Serialize)]
pub struct SourceInfo {
    /// The process.
    pub source: String,
    /// Lines held.
    pub lines: usize,
    /// Lines it lost before shipping them.
    pub lost: u64,
}

impl LogStore {
    /// A store whose error counts are also served as `etlmesh_errors_total{pipeline,kind}`.
    pub fn new(registry: &etlmesh_telemetry::metrics::SharedRegistry) -> Self {
        let store = Self::default();
        registry.lock().register(
            "errors",
            "Errors collected from every process, by pipeline and kind (see /api/v1/errors)",
            store.errors_metric.clone(),
        );
        store
    }

    /// Takes a shipment from `source`.
    pub fn ingest(&self, source: &str, batch: LogBatch) {
        let mut g = self.inner.lock();
        if !g.sources.contains_key(source) && g.sources.len() >= MAX_SOURCES {
            let oldest = g
                .sources
                .iter()
                .min_by_key(|(_, s)| s.heard)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                g.sources.remove(&k);
            }
        }
        let mut numbered = Vec::with_capacity(batch.lines.len());
        for mut line in batch.lines {
            g.next_seq += 1;
            line.seq = g.next_seq;
            line.source = Some(source.to_string());
            if g.errors.record(&line).is_some() {
                // Kinds from free-text messages would make labels without bound: those
                // count under their level.
                let kind = line
                    .error_kind
                    .clone()
                    .unwrap_or_else(|| format!("log_{}", line.level.to_lowercase()));
                self.errors_metric
                    .get_or_create(&ErrorLabels {
                        pipeline: line.pipeline.clone().unwrap_or_default(),
                        kind,
                    })
                    .inc();
            }
            numbered.push(line);
        }
        let s = g
            .sources
            .entry(source.to_string())
            .or_insert_with(|| Source {
                lines: VecDeque::new(),
                lost: 0,
                heard: Instant::now(),
            });
        s.heard = Instant::now();
        s.lost += batch.lost;
        for line in numbered {
            if s.lines.len() == LINES_PER_SOURCE {
                s.lines.pop_front();
            }
            s.lines.push_back(line);
        }
    }

    /// Lines matching `q`, oldest first.
    pub fn query(&self, q: &LogQuery) -> LogPage {
        let g = self.inner.lock();
        let mut lines: Vec<LogLine> = g
            .sources
            .iter()
            .filter(|(name, _)| q.source.as_ref().is_none_or(|s| s == *name))
            .flat_map(|(_, s)| s.lines.iter())
            .filter(|l| l.seq > q.after && q.level.is_none_or(|lv| l.level() <= lv))
            .cloned()
            .collect();
        lines.sort_by_key(|l| l.seq);
        if lines.len() > q.limit {
            lines.drain(..lines.len() - q.limit);
        }
        LogPage {
            lines,
            next: g.next_seq,
        }
    }

    /// The error groups, most recently seen first.
    pub fn errors(&self) -> Vec<ErrorGroup> {
        self.inner.lock().errors.list()
    }

    /// Errors counted so far.
    pub fn errors_total(&self) -> u64 {
        self.inner.lock().errors.total()
    }

    /// The processes heard from.
    pub fn sources(&self) -> Vec<SourceInfo> {
        let g = self.inner.lock();
        let mut v: Vec<SourceInfo> = g
            .sources
            .iter()
            .map(|(k, s)| SourceInfo {
                source: k.clone(),
                lines: s.lines.len(),
                lost: s.lost,
            })
            .collect();
        v.sort_by(|a, b| a.source.cmp(&b.source));
        v
    }
}

/// Moves this process's own lines into `store` every half second, as `source`.
pub async fn collect_local(store: std::sync::Arc<LogStore>, source: String) {
    let ring = etlmesh_telemetry::logs::global();
    let mut after = 0;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        let (lines, lost) = ring.since(after, 2000);
        if let Some(last) = lines.last() {
            after = last.seq;
            store.ingest(&source, LogBatch { lines, lost });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(level: &str, msg: &str) -> LogLine {
        LogLine {
            seq: 0,
            time: "2026-11-26T00:00:00.000Z".into(),
            level: level.into(),
            target: "t".into(),
            message: msg.into(),
            trace_id: None,
            pipeline: None,
            error_kind: None,
            source: None,
            fields: Default::default(),
        }
    }

    #[test]
    fn numbers_filters_and_follows() {
        let store = LogStore::default();
        store.ingest(
            "w1",
            LogBatch {
                lines: vec![line("INFO", "a"), line("WARN", "b")],
                lost: 0,
            },
        );
        store.ingest(
            "w2",
            LogBatch {
                lines: vec![line("ERROR", "c")],
                lost: 3,
            },
        );
        let all = store.query(&LogQuery {
            limit: 100,
            ..Default::default()
        });
        assert_eq!(
            all.lines
                .iter()
                .map(|l| l.message.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(all.next, 3);
        let warn = store.query(&LogQuery {
            level: Some(Level::WARN),
            limit: 100,
            ..Default::default()
        });
        assert_eq!(warn.lines.len(), 2);
        let w1 = store.query(&LogQuery {
            source: Some("w1".into()),
            after: 1,
            limit: 100,
            ..Default::default()
        });
        assert_eq!(w1.lines.len(), 1);
        assert_eq!(w1.lines[0].source.as_deref(), Some("w1"));
        assert_eq!(store.errors_total(), 2);
        assert_eq!(store.sources()[1].lost, 3);
        let last = store.query(&LogQuery {
            limit: 1,
            ..Default::default()
        });
        assert_eq!(last.lines[0].message, "c");
    }
}
