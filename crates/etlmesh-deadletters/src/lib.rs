//! Dead letters after the fact: `etlmesh deadletters list|show|replay`.
//!
//! Every record a pipeline did not load is a dead letter — one NDJSON line with where
//! it came from, the stage that refused it, the reason and its original bytes — in the
//! pipeline's `dead_letter` directory, written by batch runs
//! (`dead-<pipeline>-<run>.ndjson`) and by workers (`dead-<pipeline>-<worker>.ndjson`,
//! rotated as `….<n>.ndjson`). This crate reads them back ([`store`]), picks some by
//! time and reason ([`select`]), and replays them ([`replay`]): the original bytes go
//! through the pipeline as it is now (decode, SQL) into its sinks, and the replayed
//! letters are moved aside.
//!
//! Invariants:
//! - a letter is never lost: it leaves the live set only once the replay's sinks
//!   committed its rows and the letters that failed again were written with their new
//!   reason (a crash in between shows a letter twice, never zero times);
//! - "moved aside" is a ledger under `<dead_letter>/replayed/`, never a rewrite of the
//!   live files (a running worker appends to them): a letter in the ledger is hidden
//!   from `list`, `show` and `replay`, so a replay run twice loads nothing twice;
//! - the replay loads through the pipeline's own sinks, with their keys and `dedup`
//!   columns, so a crash after the load and before the ledger is caught by those keys.

pub mod letter;
pub mod replay;
pub mod select;
pub mod store;

pub use letter::{Letter, Stored};
pub use replay::{Outcome, ReplayReport, replay};
pub use select::Selection;
pub use store::Store;

/// Why dead letters could not be read or replayed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The pipeline has no dead-letter directory, or it cannot be read.
    #[error("{0}")]
    Store(String),
    /// A filter could not be read.
    #[error("{0}")]
    Select(String),
    /// The replay could not run (the pipeline, its SQL, a sink); nothing was moved aside.
    #[error("{0}\n  help: nothing was moved aside; fix the cause and replay again")]
    Replay(String),
}
