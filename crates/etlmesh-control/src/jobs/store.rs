//! Jobs on disk: one SQLite table, written before every change of state is acted on,
//! so that a control plane that restarts finds every job where it left it.

use std::path::Path;

use etlmesh_proto::jobs::{Job, JobState};
use rusqlite::{Connection, OptionalExtension, params};

/// A job's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The id.
    pub id: String,
    /// The pipeline.
    pub pipeline: String,
    /// Inputs.
    pub inputs: Vec<String>,
    /// State.
    pub state: JobState,
    /// May wait.
    pub deferrable: bool,
    /// Unix ms.
    pub submitted_ms: i64,
    /// Unix ms.
    pub deadline_ms: Option<i64>,
    /// Seconds.
    pub duration_s: f64,
    /// Unix ms.
    pub scheduled_ms: i64,
    /// Why then.
    pub placement: String,
    /// gCO2e/kWh.
    pub expected_intensity: f64,
    /// gCO2e/kWh.
    pub at_once_intensity: f64,
    /// Unix ms.
    pub started_ms: Option<i64>,
    /// Unix ms.
    pub finished_ms: Option<i64>,
    /// Runs begun.
    pub attempts: u32,
    /// The running child's pid.
    pub pid: Option<u32>,
    /// Why it failed.
    pub error: Option<String>,
    /// The run's summary (JSON text).
    pub summary: Option<String>,
    /// CPU seconds.
    pub cpu_seconds: f64,
    /// Joules.
    pub joules: f64,
    /// gCO2e.
    pub carbon_g: f64,
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Row {
    /// A job just submitted: scheduled at `submitted_ms` until placed, nothing run.
    pub fn fresh(id: String, pipeline: String, inputs: Vec<String>, submitted_ms: i64) -> Self {
        Self {
            id,
            pipeline,
            inputs,
            state: JobState::Scheduled,
            deferrable: false,
            submitted_ms,
            deadline_ms: None,
            duration_s: 0.0,
            scheduled_ms: submitted_ms,
            placement: String::new(),
            expected_intensity: 0.0,
            at_once_intensity: 0.0,
            started_ms: None,
            finished_ms: None,
            attempts: 0,
            pid: None,
            error: None,
            summary: None,
            cpu_seconds: 0.0,
            joules: 0.0,
            carbon_g: 0.0,
        }
    }

    /// As the API shows it; `log` is the job's log file.
    pub fn to_job(&self, log: &Path) -> Job {
        Job {
            id: self.id.clone(),
            pipeline: self.pipeline.clone(),
            inputs: self.inputs.clone(),
            state: self.state,
            deferrable: self.deferrable,
            submitted_at: time(self.submitted_ms),
            deadline: self.deadline_ms.map(time),
            expected_duration_secs: self.duration_s,
            scheduled_at: time(self.scheduled_ms),
            placement: self.placement.clone(),
            expected_intensity: self.expected_intensity,
            at_once_intensity: self.at_once_intensity,
            started_at: self.started_ms.map(time),
            finished_at: self.finished_ms.map(time),
            attempts: self.attempts,
            error: self.error.clone(),
            summary: self
                .summary
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            cpu_seconds: self.cpu_seconds,
            joules: self.joules,
            carbon_g: self.carbon_g,
            log: log.display().to_string(),
        }
    }
}

/// The job table.
pub struct Store {
    db: Connection,
}

const COLUMNS: &str = "id, pipeline, inputs, state, may_defer, submitted_ms, deadline_ms, duration_s, scheduled_ms, placement, expected_intensity, at_once_intensity, started_ms, finished_ms, attempts, pid, error, summary, cpu_seconds, joules, carbon_g";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let inputs: String = r.get(2)?;
    let state: String = r.get(3)?;
    Ok(Row {
        id: r.get(0)?,
        pipeline: r.get(1)?,
        inputs: serde_json::from_str(&inputs).unwrap_or_default(),
        // An unknown state (a newer version's) reads as failed, never as lost.
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        deferrable: r.get(4)?,
        submitted_ms: r.get(5)?,
        deadline_ms: r.get(6)?,
        duration_s: r.get(7)?,
        scheduled_ms: r.get(8)?,
        placement: r.get(9)?,
        expected_intensity: r.get(10)?,
        at_once_intensity: r.get(11)?,
        started_ms: r.get(12)?,
        finished_ms: r.get(13)?,
        attempts: r.get(14)?,
        pid: r.get(15)?,
        error: r.get(16)?,
        summary: r.get(17)?,
        cpu_seconds: r.get(18)?,
        joules: r.get(19)?,
        carbon_g: r.get(20)?,
    })
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                pipeline TEXT NOT NULL,
                inputs TEXT NOT NULL,
                state TEXT NOT NULL,
                may_defer INTEGER NOT NULL,
                submitted_ms INTEGER NOT NULL,
                deadline_ms INTEGER,
                duration_s REAL NOT NULL,
                scheduled_ms INTEGER NOT NULL,
                placement TEXT NOT NULL,
                expected_intensity REAL NOT NULL,
                at_once_intensity REAL NOT NULL,
                started_ms INTEGER,
                finished_ms INTEGER,
                attempts INTEGER NOT NULL DEFAULT 0,
                pid INTEGER,
                error TEXT,
                summary TEXT,
                cpu_seconds REAL NOT NULL DEFAULT 0,
                joules REAL NOT NULL DEFAULT 0,
                carbon_g REAL NOT NULL DEFAULT 0
            );
            CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, scheduled_ms);",
        )?;
        Ok(Self { db })
    }

    /// The next job number.
    pub fn next_seq(&self) -> rusqlite::Result<i64> {
        self.db
            .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs", [], |r| {
                r.get(0)
            })
    }

    /// Writes a job: a new row, or every field of an existing one.
    pub fn save(&self, j: &Row) -> rusqlite::Result<()> {
        let updates: Vec<String> = COLUMNS
            .split(", ")
            .skip(1)
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        self.db.execute(
            &format!(
                "INSERT INTO jobs ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)
                 ON CONFLICT (id) DO UPDATE SET {}",
                updates.join(", ")
            ),
            params![
                j.id,
                j.pipeline,
                serde_json::to_string(&j.inputs).unwrap_or_else(|_| "[]".into()),
                j.state.as_str(),
                j.deferrable,
                j.submitted_ms,
                j.deadline_ms,
                j.duration_s,
                j.scheduled_ms,
                j.placement,
                j.expected_intensity,
                j.at_once_intensity,
                j.started_ms,
                j.finished_ms,
                j.attempts,
                j.pid,
                j.error,
                j.summary,
                j.cpu_seconds,
                j.joules,
                j.carbon_g,
            ],
        )?;
        Ok(())
    }

    /// One job.
    pub fn get(&self, id: &str) -> rusqlite::Result<Option<Row>> {
        self.db
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
                [id],
                read_row,
            )
            .optional()
    }

    /// The newest `limit` jobs, in `state` when given.
    pub fn list(&self, state: Option<JobState>, limit: usize) -> rusqlite::Result<Vec<Row>> {
        let limit = limit as i64;
        match state {
            Some(s) => self
                .db
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM jobs WHERE state = ?1 ORDER BY seq DESC LIMIT ?2"
                ))?
                .query_map(params![s.as_str(), limit], read_row)?
                .collect(),
            None => self
                .db
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?1"
                ))?
                .query_map([limit], read_row)?
                .collect(),
        }
    }

    /// Jobs in `state`, oldest first.
    pub fn in_state(&self, state: JobState) -> rusqlite::Result<Vec<Row>> {
        self.db
            .prepare(&format!(
                "SELECT {COLUMNS} FROM jobs WHERE state = ?1 ORDER BY scheduled_ms, seq"
            ))?
            .query_map([state.as_str()], read_row)?
            .collect()
    }

    /// How many jobs are in `state`.
    pub fn count(&self, state: JobState) -> rusqlite::Result<usize> {
        self.db.query_row(
            "SELECT COUNT(*) FROM jobs WHERE state = ?1",
            [state.as_str()],
            |r| r.get::<_, i64>(0).map(|n| n.max(0) as usize),
        )
    }

    /// Jobs by state.
    pub fn counts(&self) -> rusqlite::Result<Vec<(String, u64)>> {
        self.db
            .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")?
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> Row {
        Row {
            deferrable: true,
            deadline_ms: Some(100),
            duration_s: 60.0,
            scheduled_ms: 50,
            placement: "why".into(),
            expected_intensity: 100.0,
            at_once_intensity: 300.0,
            ..Row::fresh(id.into(), "p".into(), vec!["a.csv".into()], 1)
        }
    }

    #[test]
    fn rows_survive_reopening() {
        let d = tempfile::tempdir().expect("tmp");
        let path = d.path().join("jobs.db");
        {
            let s = Store::open(&path).expect("open");
            assert_eq!(s.next_seq().expect("seq"), 1);
            s.save(&row("j1")).expect("insert");
            let mut r = row("j2");
            s.save(&r).expect("insert");
            r.state = JobState::Running;
            r.pid = Some(42);
            r.attempts = 1;
            s.save(&r).expect("update");
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.next_seq().expect("seq"), 3);
        assert_eq!(s.get("j1").expect("get"), Some(row("j1")));
        let running = s.in_state(JobState::Running).expect("running");
        assert_eq!(running.len(), 1);
        assert_eq!((running[0].pid, running[0].attempts), (Some(42), 1));
        assert_eq!(s.list(None, 10).expect("list").len(), 2);
        assert_eq!(
            s.list(Some(JobState::Scheduled), 10).expect("list")[0].id,
            "j1"
        );
        assert!(s.get("nope").expect("get").is_none());
    }
}
