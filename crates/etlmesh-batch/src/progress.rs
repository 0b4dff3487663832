//! Counters shared by the job's threads, and the progress display: a bar on a
//! terminal, periodic log lines otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Live counts of a job.
#[derive(Debug, Default)]
pub struct Counters {
    /// Input bytes read.
    pub bytes_in: AtomicU64,
    /// Records read (accepted or rejected).
    pub records_in: AtomicU64,
    /// Rows that left the SQL (per-batch mode).
    pub records_out: AtomicU64,
    /// Rows the SQL filtered (per-batch mode).
    pub filtered: AtomicU64,
    /// Records sent to the dead-letter sink.
    pub dead_lettered: AtomicU64,
    /// Rows decoded and handed to the SQL.
    pub decoded: AtomicU64,
    /// Rows written to the sinks.
    pub rows_written: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// Log lines.
    Log,
    /// Nothing.
    Off,
}

/// Shows progress until dropped.
pub struct Reporter {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Reporter {
    /// Starts showing progress of `counters`; `total` is the input size when known.
    pub fn start(
        pipeline: &str,
        counters: Arc<Counters>,
        total: Option<u64>,
        mode: ProgressMode,
        interval: Duration,
    ) -> Self {
        if mode == ProgressMode::Off {
            return Self {
                stop: None,
                task: None,
            };
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let bar = (mode == ProgressMode::Auto && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr_with_hz(4));
            let template = if total.is_some() {
                "{spinner} {prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} · {msg} · ETA {eta}"
            } else {
                "{spinner} {prefix} {bytes} {bytes_per_sec} · {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(pipeline.to_string());
            bar
        });
        let pipeline = pipeline.to_string();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let tick = if bar.is_some() {
                Duration::from_millis(250)
            } else {
                interval
            };
            let mut last_log = Instant::now();
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tokio::time::sleep(tick) => {}
                }
                let bytes = Counters::get(&counters.bytes_in);
                let records = Counters::get(&counters.records_in);
                let secs = start.elapsed().as_secs_f64().max(1e-3);
                let dead = Counters::get(&counters.dead_lettered);
                match &bar {
                    Some(bar) => {
                        bar.set_position(bytes);
                        bar.set_message(format!(
                            "{} records ({}/s) · {dead} dead-lettered",
                            human_count(records),
                            human_count((records as f64 / secs) as u64)
                        ));
                    }
                    None if last_log.elapsed() >= interval => {
                        last_log = Instant::now();
                        let pct = total
                            .filter(|t| *t > 0)
                            .map(|t| format!(" ({:.0}%)", 100.0 * bytes as f64 / t as f64));
                        tracing::info!(
                            pipeline = %pipeline,
                            bytes_in = bytes,
                            records_in = records,
                            dead_lettered = dead,
                            "progress: {} read{}, {} records ({}/s), {dead} dead-lettered",
                            human_bytes(bytes),
                            pct.unwrap_or_default(),
                            human_count(records),
                            human_count((records as f64 / secs) as u64),
                        );
                    }
                    None => {}
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops and clears the display.
    pub async fn finish(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// `1.2M`, `340k`, `12`.
pub fn human_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}G", n as f64 / 1e9),
    }
}

/// `1.2 GB`, `340 kB`.
pub fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}
