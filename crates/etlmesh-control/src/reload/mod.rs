//! Reloading the pipeline file while the mesh runs: on SIGHUP, when the file changes
//! (`--watch-config`), or with the file in `PUT /api/v1/pipelines`.
//!
//! A reload is checked first — parsed, then `etlmesh validate` (SQL planned against
//! the schemas, sinks writable) in a child process: a file with mistakes is refused
//! with the same file:line diagnostics as at start, and nothing changes. Otherwise the new file is
//! kept as a snapshot in the state directory (workers read the snapshot, so a later
//! edit of the file cannot reach a worker that restarts), and the [`diff::Diff`] is
//! carried out: added pipelines get pools, removed ones drain and leave the gateways'
//! routes, changed ones get new workers ([`rollout`]), rescaled ones a new policy,
//! unchanged ones are not touched. A changed pipeline whose new workers do not become
//! ready keeps its old ones (the outcome says `partial`). Reloads run one at a time;
//! each is logged, counted and kept for `GET /api/v1/reloads` and the dashboard.

pub(crate) mod api;
pub mod diff;
pub mod rollout;
mod triggers;

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use etlmesh_config::{PipelineFile, Spec};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

use crate::{Autoscaling, Registry};
pub use diff::Diff;
pub(crate) use triggers::spawn as spawn_triggers;

/// Reloads kept for the admin API.
const RECORDS: usize = 50;
/// Snapshots kept in the state directory (workers of the newest generations read them).
const SNAPSHOTS: u64 = 4;
/// `etlmesh validate` of a new file takes at most this long.
const VALIDATE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How the running file is reloaded.
#[derive(Debug, Clone)]
pub struct ReloadOptions {
    /// The pipeline file (`-c`): read again on SIGHUP, watched, written by the API.
    pub path: PathBuf,
    /// Where snapshots of the accepted files are kept.
    pub state_dir: PathBuf,
    /// `up --workers N`: every pool's fixed size, as at start.
    pub fixed_workers: Option<u32>,
    /// Reload when the file changes (`--watch-config`).
    pub watch: bool,
    /// The file running now.
    pub initial: Spec,
    /// The `etlmesh` executable: a new file must pass `etlmesh validate` (its SQL
    /// planned against its schemas, its sinks writable) before anything moves.
    pub validate_with: Option<PathBuf>,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// The file changed (`--watch-config`).
    Watch,
    /// `PUT /api/v1/pipelines`.
    Api,
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every change took effect.
    Applied,
    /// Some changed pipelines kept their old workers (see `pipelines`).
    Partial,
    /// The file was refused (see `error`); nothing changed.
    Refused,
    /// The file declares what runs already.
    Unchanged,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Partial => "partial",
            Outcome::Refused => "refused",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// One reload, as the API and the dashboard show it.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadRecord {
    /// When it started (RFC 3339).
    pub time: String,
    /// What asked for it.
    pub trigger: Trigger,
    /// How it ended.
    pub outcome: Outcome,
    /// The file's generation after it (0: the file etlmesh started with).
    pub generation: u64,
    /// What it changed.
    pub diff: Diff,
    /// For each changed pipeline, how its workers were replaced (or why not).
    pub pipelines: BTreeMap<String, String>,
    /// Why the file was refused (its diagnostics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The file running now.
struct Current {
    spec: Spec,
    generation: u64,
    /// The file each pool's workers start with.
    configs: HashMap<String, PathBuf>,
}

/// Reloads the pipeline file of a control plane that scales pools.
pub struct Reloader {
    options: ReloadOptions,
    current: tokio::sync::Mutex<Current>,
    records: Mutex<VecDeque<ReloadRecord>>,
    autoscaling: Arc<Autoscaling>,
    registry: Arc<Registry>,
    outcomes: Family<OutcomeLabels, Counter>,
    generation: Gauge,
}

impl Reloader {
    /// A reloader for the pools of `autoscaling`; metrics go to the registry's.
    pub fn new(
        options: ReloadOptions,
        autoscaling: Arc<Autoscaling>,
        registry: Arc<Registry>,
    ) -> Self {
        let (outcomes, generation) = (Family::default(), Gauge::default());
        {
            let mut m = registry.metrics.lock();
            m.register(
                "control_reloads",
                "Reloads of the pipeline file, by outcome (applied, partial, refused, unchanged)",
                Family::clone(&outcomes),
            );
            m.register(
                "control_config_generation",
                "Reloads applied since the start (0: the file etlmesh started with)",
                Gauge::clone(&generation),
            );
        }
        let configs = options
            .initial
            .pipelines
            .iter()
            .map(|p| (p.name.clone(), options.path.clone()))
            .collect();
        Self {
            current: tokio::sync::Mutex::new(Current {
                spec: options.initial.clone(),
                generation: 0,
                configs,
            }),
            options,
            records: Mutex::default(),
            autoscaling,
            registry,
            outcomes,
            generation,
        }
    }

    /// The file reloads read and write.
    pub fn path(&self) -> &Path {
        &self.options.path
    }

    /// Whether a change of the file reloads it.
    pub fn watches(&self) -> bool {
        self.options.watch
    }

    /// Recent reloads, newest last.
    pub fn records(&self) -> Vec<ReloadRecord> {
        self.records.lock().iter().cloned().collect()
    }

    /// Reloads: the file's text when given (the API; it is written to the file once
    /// accepted), the file on disk otherwise.
    pub async fn reload(&self, trigger: Trigger, text: Option<String>) -> ReloadRecord {
        let started = Instant::now();
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut current = self.current.lock().await;
        let mut record = ReloadRecord {
            time,
            trigger,
            outcome: Outcome::Refused,
            generation: current.generation,
            diff: Diff::default(),
            pipelines: BTreeMap::new(),
            error: None,
            took_ms: 0,
        };
        match self.accept(&mut current, trigger, text).await {
            Ok(None) => record.outcome = Outcome::Unchanged,
            Ok(Some((diff, results))) => {
                let partial = results.iter().any(|(_, r)| r.starts_with("partial: "));
                record.outcome = if partial {
                    Outcome::Partial
                } else {
                    Outcome::Applied
                };
                record.pipelines = results.into_iter().collect();
                record.diff = diff;
            }
            Err(e) => record.error = Some(e),
        }
        record.generation = current.generation;
        record.took_ms = started.elapsed().as_millis() as u64;
        drop(current);
        self.finish(record)
    }

    /// Checks and applies a file; `None` when it changes nothing, else the diff and
    /// what happened to each changed pipeline (`partial: …` when its old workers
    /// stayed).
    async fn accept(
        &self,
        current: &mut Current,
        trigger: Trigger,
        text: Option<String>,
    ) -> Result<Option<(Diff, Vec<(String, String)>)>, String> {
        let path = &self.options.path;
        let text = match text {
            Some(t) => t,
            None => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        };
        let file = PipelineFile::parse(path, text).map_err(|e| e.to_string())?;
        let diff = Diff::between(&current.spec, &file.spec);
        if diff.is_empty() {
            return Ok(None);
        }
        if let Some(exe) = &self.options.validate_with {
            self.validate(exe, &file.text).await?;
        }
        if trigger == Trigger::Api {
            write_atomically(path, &file.text)
                .map_err(|e| format!("cannot write {}: {e}; nothing changed", path.display()))?;
        }
        let generation = current.generation + 1;
        let snapshot = self.snapshot(generation, &file.text)?;
        current.generation = generation;
        self.generation.set(generation as i64);
        tracing::info!(?trigger, generation, changes = %diff.summary(), snapshot = %snapshot.display(), "reload: applying the pipeline file");
        let rollouts = self.autoscaling.scaler().rollouts();
        if let Some(r) = rollouts {
            for p in &file.spec.pipelines {
                r.use_config(&p.name, &snapshot);
            }
        }
        self.autoscaling
            .reconfigure(
                crate::pools(&file, self.options.fixed_workers),
                &self.registry,
            )
            .await;
        let mut results = Vec::new();
        let mut spec = file.spec.clone();
        for name in &diff.changed {
            let Some(p) = file.spec.pipelines.iter().find(|p| &p.name == name) else {
                continue;
            };
            // A stream worker restarts under its id: its broker session (and the
            // messages queued for it) stays its own, instead of being left behind
            // under an id no worker will use again.
            let way = if p.one_worker() || p.stream_source().is_some() {
                rollout::Way::InPlace
            } else {
                rollout::Way::Beside
            };
            let outcome = match rollouts {
                Some(r) => rollout::replace(r, &self.registry, name, way).await,
                None => Err(format!(
                    "the {} scaler does not replace workers: restart them to take the new file",
                    self.autoscaling.scaler_name()
                )),
            };
            match outcome {
                Ok(done) => {
                    tracing::info!(pipeline = %name, "reload: {done}");
                    current.configs.insert(name.clone(), snapshot.clone());
                    results.push((name.clone(), done));
                }
                Err(why) => {
                    tracing::warn!(pipeline = %name, "reload: {why}");
                    // The old workers run on: the old file stays theirs, and a worker
                    // restarted in place with the new one goes back to it.
                    if let (Some(r), Some(old)) = (rollouts, current.configs.get(name)) {
                        r.use_config(name, old);
                        if way == rollout::Way::InPlace {
                            for (id, _) in r.workers(name) {
                                r.restart(name, &id);
                            }
                        }
                    }
                    if let (Some(old), Some(new)) = (
                        current.spec.pipelines.iter().find(|o| &o.name == name),
                        spec.pipelines.iter_mut().find(|n| &n.name == name),
                    ) {
                        *new = old.clone();
                    }
                    results.push((name.clone(), format!("partial: {why}")));
                }
            }
        }
        for p in &file.spec.pipelines {
            if !diff.changed.contains(&p.name) {
                current.configs.insert(p.name.clone(), snapshot.clone());
            }
        }
        current
            .configs
            .retain(|k, _| file.spec.pipelines.iter().any(|p| &p.name == k));
        current.spec = spec;
        Ok(Some((diff, results)))
    }

    /// Runs `etlmesh validate` on the new file (as a candidate in the state directory,
    /// its diagnostics then naming the pipeline file).
    async fn validate(&self, exe: &Path, text: &str) -> Result<(), String> {
        let dir = self.options.state_dir.join("reload");
        let candidate = dir.join("candidate.yaml");
        std::fs::create_dir_all(&dir)
            .and_then(|()| write_atomically(&candidate, text))
            .map_err(|e| {
                format!(
                    "cannot check the file in {}: {e}; nothing changed",
                    dir.display()
                )
            })?;
        let run = tokio::process::Command::new(exe)
            .arg("validate")
            .arg(&candidate)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(VALIDATE_LIMIT, run).await;
        let _ = std::fs::remove_file(&candidate);
        let out = match out {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot run {} validate: {e}; nothing changed",
                    exe.display()
                ));
            }
            Err(_) => {
                return Err(format!(
                    "etlmesh validate took more than {VALIDATE_LIMIT:?}; nothing changed"
                ));
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stderr).replace(
            &candidate.display().to_string(),
            &self.options.path.display().to_string(),
        );
        Err(said.trim().to_string())
    }

    /// Keeps the accepted file in the state directory; older snapshots go.
    fn snapshot(&self, generation: u64, text: &str) -> Result<PathBuf, String> {
        let dir = self.options.state_dir.join("reload");
        let path = dir.join(format!("pipelines-{generation}.yaml"));
        std::fs::create_dir_all(&dir)
            .and_then(|()| write_atomically(&path, text))
            .map_err(|e| {
                format!(
                    "cannot keep the file in {}: {e}; nothing changed",
                    dir.display()
                )
            })?;
        if let Some(old) = generation.checked_sub(SNAPSHOTS) {
            let _ = std::fs::remove_file(dir.join(format!("pipelines-{old}.yaml")));
        }
        Ok(path)
    }

    fn finish(&self, record: ReloadRecord) -> ReloadRecord {
        if record.outcome == Outcome::Unchanged && record.trigger == Trigger::Watch {
            // The watch seeing a file that was applied already (written by the API, or
            // reloaded by a signal first) is not an event.
            tracing::debug!("reload: the changed file declares what runs already");
            return record;
        }
        self.outcomes
            .get_or_create(&OutcomeLabels {
                outcome: record.outcome.label(),
            })
            .inc();
        match record.outcome {
            Outcome::Refused => {
                tracing::warn!(trigger = ?record.trigger, "reload refused; the running pipelines keep running: {}", record.error.as_deref().unwrap_or_default())
            }
            Outcome::Unchanged => {
                tracing::info!(trigger = ?record.trigger, "reload: the file declares what runs already")
            }
            Outcome::Applied | Outcome::Partial => {
                tracing::info!(trigger = ?record.trigger, outcome = record.outcome.label(), generation = record.generation, took_ms = record.took_ms, changes = %record.diff.summary(), "reload {}", record.outcome.label())
            }
        }
        let mut records = self.records.lock();
        if records.len() >= RECORDS {
            records.pop_front();
        }
        records.push_back(record.clone());
        record
    }
}

/// Writes a file whole or not at all (a temporary file beside it, renamed).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.reload-{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
