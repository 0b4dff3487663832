//! `platform.query`: the limits of the analytics service (`POST /v1/query`), which runs
//! read-only SQL over the datasets the pipelines' sinks wrote.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::diag::Diagnostic;
use crate::units::{ByteSize, Span};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuery {
    pub timeout: Option<Span>,
    pub memory_limit: Option<ByteSize>,
    pub max_rows: Option<usize>,
    pub max_result_bytes: Option<ByteSize>,
    pub concurrency: Option<usize>,
    pub process_memory: Option<ByteSize>,
}

/// Limits of read-only queries.
#[derive(Debug, Clone, PartialEq)]
pub struct QuerySpec {
    /// The longest a query may run (a request may ask for less).
    pub timeout: Duration,
    /// Memory one query may hold; past it the query fails (no spilling).
    pub memory_limit: u64,
    /// Rows of an answer at most; more are cut and the answer says so.
    pub max_rows: usize,
    /// Bytes of an answer's batches at most; more are cut and the answer says so.
    pub max_result_bytes: u64,
    /// Queries running at once; more wait, and past twice this are refused with 503.
    pub concurrency: usize,
    /// Under `etlmesh up` analytics run in a process of their own with at most this much
    /// address space: a query that takes it past is that process's end (it restarts),
    /// never the gateway's. Default: 4 × `memory_limit`, at least 2 GiB.
    pub process_memory: u64,
}

impl Default for QuerySpec {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            memory_limit: 512 << 20,
            max_rows: 100_000,
            max_result_bytes: 64 << 20,
            concurrency: 2,
            process_memory: 2 << 30,
        }
    }
}

pub(crate) fn resolve_query(
    raw: Option<RawQuery>,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> QuerySpec {
    let d = QuerySpec::default();
    let Some(r) = raw else { return d };
    let s = QuerySpec {
        timeout: r.timeout.map_or(d.timeout, |s| s.0),
        memory_limit: r.memory_limit.map_or(d.memory_limit, |s| s.0),
        max_rows: r.max_rows.unwrap_or(d.max_rows),
        max_result_bytes: r.max_result_bytes.map_or(d.max_result_bytes, |s| s.0),
        concurrency: r.concurrency.unwrap_or(d.concurrency),
        process_memory: 0,
    };
    let s = QuerySpec {
        process_memory: r
            .process_memory
            .map_or_else(|| (s.memory_limit * 4).max(d.process_memory), |b| b.0),
        ..s
    };
    let f = "platform.query";
    let mut zero = |field: &str, is_zero: bool, help: &str| {
        if is_zero {
            out.push(
                Diagnostic::new(file, format!("{f}.{field}"), "is 0").with_help(help.to_string()),
            );
        }
    };
    zero(
        "timeout",
        s.timeout.is_zero(),
        "give a duration such as 30s",
    );
    zero(
        "memory_limit",
        s.memory_limit < (1 << 20),
        "give at least 1MiB, for example 512MiB",
    );
    zero("max_rows", s.max_rows == 0, "give at least 1 row");
    zero(
        "process_memory",
        s.process_memory < 2 * s.memory_limit.max(256 << 20),
        "give at least twice memory_limit (and 512MiB): the process needs room beside the queries",
    );
    zero(
        "max_result_bytes",
        s.max_result_bytes == 0,
        "give a size such as 64MiB",
    );
    zero(
        "concurrency",
        s.concurrency == 0,
        "give at least 1 query at once",
    );
    s
}

#[cfg(test)]
mod tests {
    use crate::PipelineFile;

    #[test]
    fn defaults_overrides_and_errors() {
        let f = PipelineFile::parse(
            "q.yaml",
            "pipelines:\n  a:\n    sinks: [{ type: stdout }]\n",
        )
        .expect("valid");
        assert_eq!(f.spec.platform.query.max_rows, 100_000);
        let f = PipelineFile::parse(
            "q.yaml",
            "platform:\n  query: { timeout: 5s, memory_limit: 64MiB, max_rows: 10, concurrency: 1 }\npipelines:\n  a:\n    sinks: [{ type: stdout }]\n",
        )
        .expect("valid");
        let q = &f.spec.platform.query;
        assert_eq!(q.timeout, std::time::Duration::from_secs(5));
        assert_eq!(q.memory_limit, 64 << 20);
        assert_eq!((q.max_rows, q.concurrency), (10, 1));
        let e = PipelineFile::parse(
            "q.yaml",
            "platform:\n  query:\n    max_rows: 0\npipelines:\n  a:\n    sinks: [{ type: stdout }]\n",
        )
        .expect_err("zero rows");
        assert!(
            e.to_string()
                .contains("q.yaml:3:5: platform.query.max_rows"),
            "{e}"
        );
    }
}
