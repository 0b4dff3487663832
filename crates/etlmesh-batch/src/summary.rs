//! The end-of-run summary: counts, bytes, time and throughput.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::progress::{Counters, human_bytes, human_count};

/// What a job did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The pipeline.
    pub pipeline: String,
    /// `per-batch` or `whole-input`.
    pub mode: String,
    /// Inputs read.
    pub inputs: usize,
    /// Records read.
    pub records_in: u64,
    /// Records the SQL passed on (for aggregates: the rows that reached it).
    pub records_out: u64,
    /// Records the SQL filtered out.
    pub filtered: u64,
    /// Records sent to the dead-letter sink.
    pub dead_lettered: u64,
    /// Rows written to each sink.
    pub rows_written: u64,
    /// Input bytes.
    pub bytes_in: u64,
    /// Bytes in the files written.
    pub bytes_out: u64,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// The dead-letter file, when there were dead letters.
    pub dead_letter_file: Option<PathBuf>,
    /// Bytes the SQL spilled to disk.
    pub spilled_bytes: u64,
    /// Wall time, in seconds.
    pub elapsed_secs: f64,
    /// Records read per second.
    pub records_per_sec: f64,
    /// Input megabytes per second.
    pub mb_per_sec: f64,
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pipeline: &str,
        mode: &str,
        inputs: usize,
        c: &Counters,
        rows_into_state: Option<u64>,
        bytes_out: u64,
        files: Vec<PathBuf>,
        dead_letter_file: Option<PathBuf>,
        spilled: usize,
        elapsed: Duration,
    ) -> Self {
        let records_in = Counters::get(&c.records_in);
        let dead_lettered = Counters::get(&c.dead_lettered);
        let (records_out, filtered) = if mode == "whole-input" {
            // Rows decoded but not passed on by the SQL were filtered (or cut by a LIMIT).
            let decoded = Counters::get(&c.decoded);
            let out = rows_into_state.unwrap_or(decoded).min(decoded);
            (out, decoded - out)
        } else {
            (Counters::get(&c.records_out), Counters::get(&c.filtered))
        };
        let secs = elapsed.as_secs_f64().max(1e-6);
        let bytes_in = Counters::get(&c.bytes_in);
        Self {
            pipeline: pipeline.to_string(),
            mode: mode.to_string(),
            inputs,
            records_in,
            records_out,
            filtered,
            dead_lettered,
            rows_written: Counters::get(&c.rows_written),
            bytes_in,
            bytes_out,
            files,
            dead_letter_file,
            spilled_bytes: spilled as u64,
            elapsed_secs: secs,
            records_per_sec: records_in as f64 / secs,
            mb_per_sec: bytes_in as f64 / 1e6 / secs,
        }
    }

    /// Whether every record is accounted for.
    pub fn balanced(&self) -> bool {
        self.records_in == self.records_out + self.filtered + self.dead_lettered
    }

    pub(crate) fn check_invariant(&self) {
        if !self.balanced() {
            tracing::error!(
                pipeline = %self.pipeline,
                records_in = self.records_in,
                records_out = self.records_out,
                filtered = self.filtered,
                dead_lettered = self.dead_lettered,
                "records do not add up: in != out + filtered + dead-lettered; please report this bug"
            );
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pipeline {} ({} SQL), {} input(s)",
            self.pipeline, self.mode, self.inputs
        )?;
        writeln!(
            f,
            "  records  in {}  out {}  filtered {}  dead-lettered {}",
            self.records_in, self.records_out, self.filtered, self.dead_lettered
        )?;
        writeln!(
            f,
            "  written  {} rows, {} in {} file(s)",
            self.rows_written,
            human_bytes(self.bytes_out),
            self.files.len()
        )?;
        writeln!(
            f,
            "  read     {} in {:.2}s: {} records/s, {:.1} MB/s",
            human_bytes(self.bytes_in),
            self.elapsed_secs,
            human_count(self.records_per_sec as u64),
            self.mb_per_sec
        )?;
        if self.spilled_bytes > 0 {
            writeln!(
                f,
                "  spilled  {} to disk (over the memory limit)",
                human_bytes(self.spilled_bytes)
            )?;
        }
        if let Some(d) = &self.dead_letter_file {
            writeln!(f, "  dead letters: {}", d.display())?;
        }
        Ok(())
    }
}
