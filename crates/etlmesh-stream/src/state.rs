//! What a stream keeps on its worker's disk between runs of a slot
//! (`<state_dir>/streams/<pipeline>-<worker>.json`):
//!
//! - the broker session it used, so that when the source changes (another broker, topic
//!   or sharing) the old session — and what it queued — is removed instead of being
//!   read by the new pipeline;
//! - the watermark of the windows whose rows every sink committed: after a restart the
//!   broker sends again the messages that were not acknowledged, and those whose rows
//!   only fall in windows at or below it were loaded already.
//!
//! The file is replaced atomically (written, fsynced, renamed, its directory fsynced).
//! A missing or unreadable file is a first run.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The state of one slot.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// The session's client id.
    pub client_id: String,
    /// What it subscribed to.
    pub subscription: String,
    /// Where (`mqtt://host:port`).
    pub broker: String,
    /// Every window ending at or before this (epoch milliseconds) is loaded and
    /// committed by every sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<i64>,
}

/// The file of one slot's state.
#[derive(Debug)]
pub struct StateFile {
    path: Option<PathBuf>,
    /// What it holds.
    pub state: SlotState,
}

impl StateFile {
    /// Reads the state of `worker`'s slot of `pipeline` under `dir`; without a
    /// directory the state lives in memory only.
    pub fn open(dir: Option<&Path>, pipeline: &str, worker: &str) -> Self {
        let path = dir.map(|d| {
            let name = crate::source::mqtt::plain_name(&format!("{pipeline}-{worker}"));
            d.join("streams").join(format!("{name}.json"))
        });
        let state = path
            .as_ref()
            .and_then(|p| match std::fs::read(p) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "the stream's state file cannot be read: starting without it");
                        None
                    }
                },
                Err(_) => None,
            })
            .unwrap_or_default();
        Self { path, state }
    }

    /// Where it is kept.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Writes the state durably.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&self.state).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_missing_file_is_a_first_run() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut f = StateFile::open(Some(dir.path()), "live", "w/1");
        assert_eq!(f.state, SlotState::default());
        f.state.client_id = "etlmesh-live-w1-0badc0de".into();
        f.state.watermark = Some(42);
        f.save().expect("save");
        assert!(
            f.path()
                .is_some_and(|p| p.ends_with("streams/live-w_1.json"))
        );
        let again = StateFile::open(Some(dir.path()), "live", "w/1");
        assert_eq!(again.state, f.state);
        std::fs::write(f.path().expect("path"), b"{not json").expect("write");
        assert_eq!(
            StateFile::open(Some(dir.path()), "live", "w/1").state,
            SlotState::default()
        );
    }
}
