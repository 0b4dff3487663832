//! Running one job: `etlmesh run` as a child process, its log and summary in the state
//! directory, its CPU time charged to its pipeline every second.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use etlmesh_proto::jobs::JobState;

use super::store::Row;
use super::{Jobs, JobsError, now_ms};

/// How long a run past its timeout has to stop after SIGTERM before it is killed.
const TIMEOUT_GRACE: Duration = Duration::from_secs(10);

/// What a watcher waits on.
pub(super) enum Handle {
    /// A child this process started.
    Child(tokio::process::Child),
    /// A child a previous control plane started (watched by pid).
    Adopted(u32),
}

/// Whether `pid` is a run writing `summary` (so that a reused pid is not taken for it).
pub(super) fn is_our_child(pid: u32, summary: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = summary.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

/// The summary a finished run wrote.
pub(super) fn read_summary(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?;
    Some(text)
}

/// Asks a run to stop.
pub(super) fn terminate(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Ok(p) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
    }
}

/// The last lines of a log, for the error of a failed run.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts a due job.
pub(super) fn start(jobs: &Arc<Jobs>, mut row: Row) -> Result<(), JobsError> {
    let summary = jobs.summary_path(&row.id);
    let _ = std::fs::remove_file(&summary);
    let log_path = jobs.log_path(&row.id);
    let open = |what: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| JobsError::Open {
                path: format!("{} ({what})", log_path.display()),
                error: e.to_string(),
            })
    };
    let (out, err) = (open("stdout")?, open("stderr")?);
    let mut cmd = tokio::process::Command::new(&jobs.opts.exe);
    cmd.arg("run")
        .arg("--config")
        .arg(&jobs.opts.config)
        .arg("--pipeline")
        .arg(&row.pipeline)
        .arg("--progress")
        .arg("log")
        .arg("--summary-json")
        .arg(&summary);
    for dir in jobs.input_dirs(&row.pipeline) {
        cmd.arg("--inputs-under").arg(dir);
    }
    // After `--`, an input is never taken for an option.
    cmd.arg("--")
        .args(&row.inputs)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    row.attempts += 1;
    row.started_ms = Some(now_ms());
    row.state = JobState::Running;
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            row.state = JobState::Failed;
            row.finished_ms = Some(now_ms());
            row.error = Some(format!("cannot start {}: {e}", jobs.opts.exe.display()));
            jobs.store().save(&row)?;
            return Err(JobsError::Conflict(row.error.unwrap_or_default()));
        }
    };
    row.pid = child.id();
    jobs.store().save(&row)?;
    if let Some(pid) = row.pid {
        jobs.running.lock().insert(row.id.clone(), pid);
    }
    tracing::info!(job = %row.id, pipeline = %row.pipeline, pid = ?row.pid, attempt = row.attempts, "job started");
    tokio::spawn(watch(jobs.clone(), row, Handle::Child(child)));
    Ok(())
}

/// Waits for a run to end, charging its CPU time every second, and records the end.
pub(super) async fn watch(jobs: Arc<Jobs>, mut row: Row, handle: Handle) {
    let pid = match &handle {
        Handle::Child(c) => c.id(),
        Handle::Adopted(p) => Some(*p),
    };
    // A new child starts from zero; an adopted one from what was charged before.
    let mut cpu_seen = match handle {
        Handle::Child(_) => 0.0,
        Handle::Adopted(_) => row.cpu_seconds,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // A run past its timeout is stopped (SIGTERM, then SIGKILL after a grace period).
    let limit = jobs.timeout(&row);
    let ran = Duration::from_millis(
        u64::try_from(now_ms() - row.started_ms.unwrap_or_else(now_ms)).unwrap_or(0),
    );
    let deadline = tokio::time::Instant::now() + limit.saturating_sub(ran);
    let mut timed_out = false;
    let status = match handle {
        Handle::Child(mut child) => loop {
            tokio::select! {
                s = child.wait() => break s.ok().map(|s| s.success()),
                _ = tick.tick() => {
                    charge(&jobs, &mut row, pid, &mut cpu_seen);
                    if tokio::time::Instant::now() >= deadline {
                        if !timed_out {
                            timed_out = true;
                            tracing::warn!(job = %row.id, timeout_s = limit.as_secs(), "job ran past its timeout: stopping it");
                            if let Some(p) = pid {
                                terminate(p);
                            }
                        } else if tokio::time::Instant::now() >= deadline + TIMEOUT_GRACE {
                            let _ = child.start_kill();
                        }
                    }
                }
            }
        },
        Handle::Adopted(p) => loop {
            tick.tick().await;
            if !is_our_child(p, &jobs.summary_path(&row.id)) {
                break None;
            }
            charge(&jobs, &mut row, pid, &mut cpu_seen);
            if tokio::time::Instant::now() >= deadline && !timed_out {
                timed_out = true;
                tracing::warn!(job = %row.id, timeout_s = limit.as_secs(), "job ran past its timeout: stopping it");
                terminate(p);
            }
        },
    };
    jobs.running.lock().remove(&row.id);
    let cancelled = jobs.cancelling.lock().remove(&row.id);
    let summary = read_summary(&jobs.summary_path(&row.id));
    row.finished_ms = Some(now_ms());
    row.pid = None;
    let log = jobs.log_path(&row.id);
    match (cancelled, status, summary) {
        (true, _, _) => {
            row.state = JobState::Cancelled;
            tracing::info!(job = %row.id, "job cancelled while running");
        }
        _ if timed_out => {
            row.state = JobState::Failed;
            row.error = Some(format!(
                "stopped: it ran past its timeout of {} s (set the pipeline's `jobs: {{ timeout: ... }}`, or a longer expected_duration_secs)",
                limit.as_secs()
            ));
            tracing::error!(job = %row.id, pipeline = %row.pipeline, error_kind = "job_timeout", timeout_s = limit.as_secs(), "job failed: past its timeout");
        }
        // An adopted child's exit status is not ours to read: its summary tells.
        (_, Some(true) | None, Some(s)) => {
            // What the last poll missed (a run shorter than a second, say), from the
            // CPU time the run wrote in its summary; its records count for the SCI.
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            if let Some(total) = v["cpu_seconds"].as_f64()
                && total > cpu_seen
            {
                charge_cpu(&jobs, &mut row, total - cpu_seen);
            }
            if let Some(n) = v["records_in"].as_u64() {
                jobs.meter.add_records(&row.pipeline, n);
            }
            row.state = JobState::Succeeded;
            row.summary = Some(s);
            tracing::info!(job = %row.id, pipeline = %row.pipeline, cpu_seconds = row.cpu_seconds, joules = row.joules, "job succeeded");
        }
        (_, None, None) if row.attempts < jobs.opts.max_attempts => {
            row.state = JobState::Scheduled;
            row.scheduled_ms = now_ms();
            row.finished_ms = None;
            row.placement = format!(
                "run again: attempt {} ended without a summary",
                row.attempts
            );
            tracing::warn!(job = %row.id, "an adopted run ended without a summary: running it again");
        }
        _ => {
            row.state = JobState::Failed;
            row.error = Some(format!(
                "`etlmesh run` failed (see {}): {}",
                log.display(),
                tail(&log, 3)
            ));
            tracing::error!(job = %row.id, pipeline = %row.pipeline, error_kind = "job_failed", error = row.error.as_deref().unwrap_or(""), "job failed");
        }
    }
    if let Err(e) = jobs.store().save(&row) {
        tracing::error!(job = %row.id, error = %e, "jobs: cannot record the end of a job");
    }
    jobs.wake.notify_one();
}

/// Charges the CPU time the run used since the last call.
fn charge(jobs: &Jobs, row: &mut Row, pid: Option<u32>, seen: &mut f64) {
    let Some(cpu) = pid.and_then(|p| etlmesh_telemetry::process::cpu_seconds(Some(p))) else {
        return;
    };
    let delta = (cpu - *seen).max(0.0);
    *seen = cpu;
    charge_cpu(jobs, row, delta);
}

/// Charges `delta` CPU seconds to the job and its pipeline.
fn charge_cpu(jobs: &Jobs, row: &mut Row, delta: f64) {
    if delta <= 0.0 {
        return;
    }
    let (joules, carbon) = jobs.meter.charge_job(&row.id, &row.pipeline, delta);
    row.cpu_seconds += delta;
    row.joules += joules;
    row.carbon_g += carbon;
    if let Err(e) = jobs.store().save(row) {
        tracing::warn!(job = %row.id, error = %e, "jobs: cannot record a job's energy");
    }
}
