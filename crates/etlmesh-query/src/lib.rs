//! The analytics service: read-only SQL (Apache DataFusion) over the datasets that the
//! pipelines' sinks wrote.
//!
//! The [`Catalog`] is built from the pipeline file: every Parquet file sink is a table
//! (a [`ListingTable`](datafusion::datasource::listing::ListingTable) over its
//! directory or its `s3://` prefix ([`object`]), with its `partition_by` columns as
//! Hive partitions, so a filter on them skips whole directories), every PostgreSQL sink a table read through a read-only
//! transaction ([`postgres`]). Nothing else is a table: URL tables are off, and
//! `CREATE EXTERNAL TABLE`, `COPY`, DDL, DML and `SET` are refused ([`guard`]), so a
//! query cannot read a file outside the datasets' directories.
//!
//! [`Analytics::run`] plans and runs one query in a fresh session on the service's own
//! runtime (so that analytics never take the threads that route requests), under the
//! limits of `platform.query`: a time limit, a memory pool without spilling, a cap on
//! the rows and bytes of the answer (cut, and said so), and a bounded number of
//! queries at once.

mod bounded;
mod catalog;
mod execute;
mod guard;
mod object;
mod postgres;

use std::time::Duration;

pub use catalog::{Catalog, Dataset, DatasetSource};
pub use execute::{Analytics, Answer, QueryRequest};

/// Why a query did not answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Not a query (DDL, DML, COPY, SET, …).
    #[error("{0}")]
    Refused(String),
    /// It does not parse or plan, or names a table that is not a dataset.
    #[error("{0}")]
    Invalid(String),
    /// The client's token may not read a dataset it names.
    #[error("{0}")]
    Forbidden(String),
    /// It ran past its time limit.
    #[error(
        "the query ran past its time limit of {0:?}; narrow it (a WHERE on partition columns, a LIMIT) or ask for more with timeout_ms"
    )]
    Timeout(Duration),
    /// It needed more memory than a query may hold.
    #[error(
        "the query needs more memory than platform.query.memory_limit ({limit} bytes) allows: {message}; aggregate or filter more, or raise the limit"
    )]
    Memory {
        /// The limit.
        limit: u64,
        /// DataFusion's message.
        message: String,
    },
    /// Too many queries at once.
    #[error("{0} queries are running or waiting already; try again shortly")]
    Busy(usize),
    /// A dataset could not be read (PostgreSQL down, a file unreadable).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("the query failed: {0}")]
    Failed(String),
}

impl QueryError {
    /// Every code [`QueryError::code`] gives: a closed set, so that a process relaying
    /// another's answer keeps metric labels bounded.
    pub const CODES: [&'static str; 8] = [
        "query_refused",
        "query_invalid",
        "forbidden",
        "query_timeout",
        "query_memory",
        "query_busy",
        "dataset_unavailable",
        "query_failed",
    ];

    /// A short, stable code for error bodies and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            QueryError::Refused(_) => "query_refused",
            QueryError::Invalid(_) => "query_invalid",
            QueryError::Forbidden(_) => "forbidden",
            QueryError::Timeout(_) => "query_timeout",
            QueryError::Memory { .. } => "query_memory",
            QueryError::Busy(_) => "query_busy",
            QueryError::Unavailable(_) => "dataset_unavailable",
            QueryError::Failed(_) => "query_failed",
        }
    }
}

/// DataFusion's message without its nesting prefixes.
pub(crate) fn message(e: &datafusion::error::DataFusionError) -> String {
    e.find_root().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_in_the_closed_set() {
        let all = [
            QueryError::Refused(String::new()),
            QueryError::Invalid(String::new()),
            QueryError::Forbidden(String::new()),
            QueryError::Timeout(Default::default()),
            QueryError::Memory {
                limit: 0,
                message: String::new(),
            },
            QueryError::Busy(0),
            QueryError::Unavailable(String::new()),
            QueryError::Failed(String::new()),
        ];
        for e in &all {
            assert!(QueryError::CODES.contains(&e.code()), "{}", e.code());
        }
    }
}
