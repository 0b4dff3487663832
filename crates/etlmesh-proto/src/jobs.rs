//! Batch jobs (`/v1/jobs` on the gateway, kept by the control plane).

use serde::{Deserialize, Serialize};

/// A batch run to submit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The pipeline to run.
    pub pipeline: String,
    /// Input files or globs, as `etlmesh run` takes them.
    pub inputs: Vec<String>,
    /// When it must be done (RFC 3339); none: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// How long it is expected to run, in seconds.
    #[serde(default = "default_duration")]
    pub expected_duration_secs: f64,
    /// May it wait for a cleaner window (default: yes when it has a deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferrable: Option<bool>,
}

fn default_duration() -> f64 {
    600.0
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its window.
    Scheduled,
    /// Running.
    Running,
    /// Done.
    Succeeded,
    /// Failed (see `error`).
    Failed,
    /// Cancelled.
    Cancelled,
}

impl JobState {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Scheduled,
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    /// Succeeded, failed or cancelled.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Its id.
    pub id: String,
    /// The pipeline.
    pub pipeline: String,
    /// The inputs.
    pub inputs: Vec<String>,
    /// Its state.
    pub state: JobState,
    /// May it wait.
    pub deferrable: bool,
    /// When it was submitted (RFC 3339).
    pub submitted_at: String,
    /// Its deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Expected run time, seconds.
    pub expected_duration_secs: f64,
    /// When it starts (or started).
    pub scheduled_at: String,
    /// Why then.
    pub placement: String,
    /// Expected mean intensity of its window, gCO2e/kWh.
    pub expected_intensity: f64,
    /// Had it run at once.
    pub at_once_intensity: f64,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Runs begun (a run cut short by a restart of the control plane is run again).
    pub attempts: u32,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The run's summary (`etlmesh run --summary-json`), when it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
    /// CPU seconds of its runs.
    pub cpu_seconds: f64,
    /// Joules of its runs, above idle.
    pub joules: f64,
    /// gCO2e of its runs.
    pub carbon_g: f64,
    /// Its log file.
    pub log: String,
}
