//! Carbon-aware batch jobs.
//!
//! A job is a batch run of one pipeline over files (`etlmesh run` in a child process).
//! On submission it is placed ([`etlmesh_energy::place`]): a deferrable job with a
//! deadline starts in the window of lowest mean carbon intensity that ends before the
//! deadline; any other starts at once. Every job is a row of a SQLite table
//! ([`store`]) written before the state change is acted on, so that a restart of the
//! control plane finds each one where it was:
//!
//! - scheduled jobs keep their start time;
//! - a running job whose child process still runs is adopted (watched by pid until it
//!   ends, its summary file telling success); one whose child ended while the control
//!   plane was down ends as its summary file says; one whose child died without a
//!   summary is run again (batch outputs are committed atomically, so a cut run left
//!   nothing), up to `max_attempts`, then failed — never forgotten.

pub(crate) mod api;
mod runner;
pub mod store;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etlmesh_config::PipelineFile;
use etlmesh_proto::jobs::{Job, JobRequest, JobState};
use store::{Row, Store};

use crate::energy::Meter;

/// How jobs run.
#[derive(Debug, Clone)]
pub struct JobsOptions {
    /// Where the database, logs and summaries live.
    pub dir: PathBuf,
    /// The pipeline file jobs run.
    pub config: PathBuf,
    /// The `etlmesh` executable.
    pub exe: PathBuf,
    /// Jobs running at once.
    pub max_running: usize,
    /// Jobs waiting at most; more are refused (503).
    pub max_scheduled: usize,
    /// Runs of a job cut short by restarts before it fails.
    pub max_attempts: u32,
}

impl JobsOptions {
    /// Defaults: 2 running, 1,000 waiting, 3 attempts.
    pub fn new(dir: PathBuf, config: PathBuf, exe: PathBuf) -> Self {
        Self {
            dir,
            config,
            exe,
            max_running: 2,
            max_scheduled: 1000,
            max_attempts: 3,
        }
    }
}

/// What can go wrong with jobs.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The state directory or database.
    #[error(
        "jobs: cannot open {path}: {error}\n  help: check that --state-dir is a writable directory"
    )]
    Open {
        /// The path.
        path: String,
        /// Why.
        error: String,
    },
    /// The database failed.
    #[error("jobs: the database failed: {0}\n  help: check the disk holding --state-dir")]
    Db(#[from] rusqlite::Error),
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
    /// No such job.
    #[error("no job `{0}`\n  help: `etlmesh job list` shows the jobs")]
    NotFound(String),
    /// Too many waiting.
    #[error("{0} jobs are waiting already\n  help: retry after some ran, or cancel some")]
    Full(usize),
    /// It cannot be done in its state.
    #[error("{0}")]
    Conflict(String),
}

/// The jobs of this control plane.
pub struct Jobs {
    opts: JobsOptions,
    store: Mutex<Store>,
    pipelines: Vec<String>,
    /// Per pipeline: the directories its jobs may read (absolute), and its timeout.
    limits: HashMap<String, (Vec<PathBuf>, Option<Duration>)>,
    meter: Arc<Meter>,
    wake: tokio::sync::Notify,
    /// Running jobs: id → pid.
    running: Mutex<HashMap<String, u32>>,
    /// Running jobs asked to stop.
    cancelling: Mutex<std::collections::HashSet<String>>,
    /// Children found running at start, to watch.
    adopted: Mutex<Vec<(Row, u32)>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("dir", &self.opts.dir).finish()
    }
}

/// Whether an input (a path or a pattern) lies under one of `dirs` (absolute): its
/// part before any pattern character, made absolute, with no `..` and its symbolic
/// links resolved as far as it exists. `etlmesh run --inputs-under` checks again each
/// file it reads.
fn input_allowed(input: &str, dirs: &[PathBuf]) -> bool {
    let path = Path::new(input);
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return false;
    }
    let fixed: PathBuf = path
        .components()
        .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
        .collect();
    let cwd = std::env::current_dir().unwrap_or_default();
    let abs = cwd.join(fixed);
    // Resolve what exists of it.
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    let resolved = loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            break rest.iter().rev().fold(real, |p: PathBuf, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break abs.clone(),
        }
    };
    dirs.iter().any(|d| resolved.starts_with(d))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Jobs {
    /// The pipeline file jobs run with.
    pub fn config(&self) -> &std::path::Path {
        &self.opts.config
    }

    /// The `etlmesh` executable jobs run.
    pub fn exe(&self) -> &std::path::Path {
        &self.opts.exe
    }

    /// Opens the job database in `opts.dir` and recovers the jobs a previous run left.
    pub fn open(opts: JobsOptions, meter: Arc<Meter>) -> Result<Arc<Self>, JobsError> {
        let open_err = |path: &Path, error: String| JobsError::Open {
            path: path.display().to_string(),
            error,
        };
        std::fs::create_dir_all(&opts.dir).map_err(|e| open_err(&opts.dir, e.to_string()))?;
        let db = opts.dir.join("jobs.db");
        let store = Store::open(&db).map_err(|e| open_err(&db, e.to_string()))?;
        let file =
            PipelineFile::load(&opts.config).map_err(|e| open_err(&opts.config, e.to_string()))?;
        // Allowed directories are written relative to the pipeline file.
        let base = opts
            .config
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        let limits = file
            .spec
            .pipelines
            .iter()
            .map(|p| {
                let dirs = if p.jobs.inputs.is_empty() {
                    vec![base.clone()]
                } else {
                    p.jobs.inputs.iter().map(|d| base.join(d)).collect()
                };
                (p.name.clone(), (dirs, p.jobs.timeout))
            })
            .collect();
        let jobs = Arc::new(Self {
            limits,
            pipelines: file.spec.pipelines.iter().map(|p| p.name.clone()).collect(),
            opts,
            store: Mutex::new(store),
            meter,
            wake: tokio::sync::Notify::new(),
            running: Mutex::default(),
            cancelling: Mutex::default(),
            adopted: Mutex::default(),
        });
        jobs.recover()?;
        Ok(jobs)
    }

    fn store(&self) -> parking_lot::MutexGuard<'_, Store> {
        self.store.lock()
    }

    /// The log file of a job.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.opts.dir.join(format!("{id}.log"))
    }

    fn summary_path(&self, id: &str) -> PathBuf {
        self.opts.dir.join(format!("{id}.summary.json"))
    }

    fn to_job(&self, r: &Row) -> Job {
        r.to_job(&self.log_path(&r.id))
    }

    /// Jobs that were running when the previous control plane stopped.
    fn recover(&self) -> Result<(), JobsError> {
        let rows = self.store().in_state(JobState::Running)?;
        for mut r in rows {
            let alive = r
                .pid
                .filter(|&pid| runner::is_our_child(pid, &self.summary_path(&r.id)));
            if let Some(pid) = alive {
                tracing::info!(job = %r.id, pid, "job still running after a restart: watching it again");
                self.running.lock().insert(r.id.clone(), pid);
                self.adopted.lock().push((r, pid));
                continue;
            }
            if let Some(summary) = runner::read_summary(&self.summary_path(&r.id)) {
                tracing::info!(job = %r.id, "job finished while the control plane was down");
                r.state = JobState::Succeeded;
                r.summary = Some(summary);
                r.finished_ms = Some(now_ms());
                r.pid = None;
            } else if r.attempts < self.opts.max_attempts {
                tracing::warn!(job = %r.id, attempt = r.attempts, "job cut short by a restart: running it again");
                r.state = JobState::Scheduled;
                r.scheduled_ms = now_ms();
                r.placement = format!(
                    "run again: the control plane stopped during attempt {}",
                    r.attempts
                );
                r.pid = None;
            } else {
                tracing::error!(job = %r.id, attempts = r.attempts, error_kind = "job_failed", "job cut short by restarts too often: failed");
                r.state = JobState::Failed;
                r.error = Some(format!(
                    "the control plane stopped during each of {} attempts",
                    r.attempts
                ));
                r.finished_ms = Some(now_ms());
                r.pid = None;
            }
            self.store().save(&r)?;
        }
        Ok(())
    }

    /// Checks and places a new job.
    pub fn submit(&self, req: JobRequest) -> Result<Job, JobsError> {
        if !self.pipelines.contains(&req.pipeline) {
            return Err(JobsError::Invalid(format!(
                "no pipeline `{}` in {}\n  help: the file declares: {}",
                req.pipeline,
                self.opts.config.display(),
                self.pipelines.join(", ")
            )));
        }
        if req.inputs.iter().any(|i| i.trim().is_empty() || i == "-") {
            return Err(JobsError::Invalid(
                "inputs: give file paths or patterns (standard input cannot be read by a job)"
                    .into(),
            ));
        }
        if req.inputs.len() > 1000 || req.inputs.iter().any(|i| i.len() > 4096) {
            return Err(JobsError::Invalid(
                "inputs: at most 1,000 paths or patterns of at most 4,096 bytes".into(),
            ));
        }
        let dirs = self.input_dirs(&req.pipeline);
        for i in &req.inputs {
            if !input_allowed(i, dirs) {
                return Err(JobsError::Invalid(format!(
                    "inputs: `{i}` is not under the directories pipeline `{}` may read ({})\n  help: put the input there, or list its directory in the pipeline's `jobs: {{ inputs: [...] }}`",
                    req.pipeline,
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let d = req.expected_duration_secs;
        if !d.is_finite() || d <= 0.0 || d > 7.0 * 86_400.0 {
            return Err(JobsError::Invalid(format!(
                "expected_duration_secs is {d}; give seconds between 0 and 604800 (7 days)"
            )));
        }
        let now = now_ms();
        let deadline_ms = match &req.deadline {
            None => None,
            Some(s) => {
                let t = chrono::DateTime::parse_from_rfc3339(s)
                    .map_err(|e| {
                        JobsError::Invalid(format!(
                            "deadline `{s}` is not an RFC 3339 time ({e}); for example 2026-11-27T08:00:00Z"
                        ))
                    })?
                    .timestamp_millis();
                if t <= now {
                    return Err(JobsError::Invalid(format!(
                        "deadline `{s}` has passed; give a time in the future"
                    )));
                }
                Some(t)
            }
        };
        let deferrable = req.deferrable.unwrap_or(deadline_ms.is_some());
        let waiting = self.store().count(JobState::Scheduled)?;
        if waiting >= self.opts.max_scheduled {
            return Err(JobsError::Full(waiting));
        }
        let duration_ms = (d * 1000.0) as i64;
        let placement = etlmesh_energy::place(
            &self.meter.intensity(),
            now,
            deadline_ms,
            duration_ms,
            deferrable,
        );
        let store = self.store();
        let id = format!("j{}", store.next_seq()?);
        let row = Row {
            deferrable,
            deadline_ms,
            duration_s: d,
            scheduled_ms: placement.start_ms,
            placement: placement.reason,
            expected_intensity: placement.average,
            at_once_intensity: placement.at_once,
            ..Row::fresh(id, req.pipeline, req.inputs, now)
        };
        store.save(&row)?;
        drop(store);
        tracing::info!(job = %row.id, pipeline = %row.pipeline, scheduled_at = %self.to_job(&row).scheduled_at, placement = %row.placement, "job submitted");
        self.wake.notify_one();
        Ok(self.to_job(&row))
    }

    /// The directories jobs of `pipeline` may read.
    fn input_dirs(&self, pipeline: &str) -> &[PathBuf] {
        self.limits.get(pipeline).map_or(&[], |(d, _)| d.as_slice())
    }

    /// How long a run of `row` may take: the pipeline's `jobs.timeout`, or three times
    /// the expected duration and at least a minute.
    fn timeout(&self, row: &Row) -> Duration {
        self.limits
            .get(&row.pipeline)
            .and_then(|(_, t)| *t)
            .unwrap_or_else(|| Duration::from_secs_f64((row.duration_s * 3.0).max(60.0)))
    }

    /// One job.
    pub fn get(&self, id: &str) -> Result<Job, JobsError> {
        let r = self.store().get(id)?;
        r.map(|r| self.to_job(&r))
            .ok_or_else(|| JobsError::NotFound(id.to_string()))
    }

    /// The newest jobs.
    pub fn list(&self, state: Option<JobState>, limit: usize) -> Result<Vec<Job>, JobsError> {
        Ok(self
            .store()
            .list(state, limit.min(1000))?
            .iter()
            .map(|r| self.to_job(r))
            .collect())
    }

    /// Jobs by state.
    pub fn counts(&self) -> Vec<(String, u64)> {
        self.store().counts().unwrap_or_default()
    }

    /// Cancels a waiting job, or stops a running one.
    pub fn cancel(&self, id: &str) -> Result<Job, JobsError> {
        let mut r = self
            .store()
            .get(id)?
            .ok_or_else(|| JobsError::NotFound(id.to_string()))?;
        match r.state {
            JobState::Scheduled => {
                r.state = JobState::Cancelled;
                r.finished_ms = Some(now_ms());
                self.store().save(&r)?;
                tracing::info!(job = %id, "job cancelled before it ran");
            }
            JobState::Running => {
                self.cancelling.lock().insert(id.to_string());
                if let Some(pid) = r.pid {
                    runner::terminate(pid);
                }
                tracing::info!(job = %id, "stopping a running job");
            }
            s => {
                return Err(JobsError::Conflict(format!(
                    "job `{id}` is {} already; only scheduled or running jobs can be cancelled",
                    s.as_str()
                )));
            }
        }
        Ok(self.to_job(&r))
    }

    /// Starts jobs when their time comes; runs until aborted.
    pub async fn run_forever(self: Arc<Self>) {
        let adopted = std::mem::take(&mut *self.adopted.lock());
        for (row, pid) in adopted {
            tokio::spawn(runner::watch(
                self.clone(),
                row,
                runner::Handle::Adopted(pid),
            ));
        }
        loop {
            let next = self.start_due();
            let wait = next.map_or(Duration::from_secs(1), |ms| {
                Duration::from_millis(ms.clamp(10, 1000) as u64)
            });
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Starts what is due; returns milliseconds until the next scheduled job.
    fn start_due(self: &Arc<Self>) -> Option<i64> {
        let scheduled = match self.store().in_state(JobState::Scheduled) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "jobs: cannot read the database");
                return None;
            }
        };
        let now = now_ms();
        for r in &scheduled {
            if r.scheduled_ms > now {
                return Some(r.scheduled_ms - now);
            }
            if self.running.lock().len() >= self.opts.max_running {
                return Some(1000);
            }
            if let Err(e) = runner::start(self, r.clone()) {
                tracing::error!(job = %r.id, error = %e, error_kind = "job_failed", "job cannot start");
            }
        }
        None
    }
}

/// Renders `etlmesh_jobs{state}` at each scrape of `/metrics`.
#[derive(Debug)]
pub struct JobsCollector(pub Arc<Jobs>);

impl prometheus_client::collector::Collector for JobsCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let mut family = encoder.encode_descriptor(
            "jobs",
            "Batch jobs by state",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (state, n) in self.0.counts() {
            ConstGauge::new(n as i64)
                .encode(family.encode_family(&[("state", state.as_str())])?)?;
        }
        Ok(())
    }
}
