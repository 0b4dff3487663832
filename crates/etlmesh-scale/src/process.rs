//! The `process` scaler: workers as local child processes (`etlmesh worker`), one pool
//! per pipeline. Scaling up starts workers; scaling down sends SIGTERM to the newest,
//! which drain, leave their pool and exit; stopping the whole mesh sends SIGINT (they
//! drain and keep their stream subscriptions: they will be back). A worker that dies
//! is restarted at once when a signal killed it or it had run for a while (its stream
//! session holds messages the broker drops past its queue limit), with backoff when
//! it keeps failing at start. Their output is relayed with a `[worker-id]` prefix.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{BoxFuture, ScaleError, Scaler};

/// The first restart waits this long; each crash in a row doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The restart of a worker that had run for [`HEALTHY_RUN`] or that a signal killed.
const QUICK_RESTART: Duration = Duration::from_millis(50);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long resets the backoff (a worker that fails at start — a
/// bad file, a port taken — fails sooner).
const HEALTHY_RUN: Duration = Duration::from_secs(2);
/// How long a draining worker may take before it is killed.
const DRAIN_LIMIT: Duration = Duration::from_secs(40);
/// Set in a worker's environment to the pid of the process that supervises it.
pub const SUPERVISOR_ENV: &str = "ETLMESH_SUPERVISOR_PID";

/// How workers are started.
#[derive(Clone)]
pub struct WorkerCommand {
    /// The `etlmesh` executable.
    pub exe: PathBuf,
    /// The pipeline file.
    pub config: PathBuf,
    /// The control plane's URL.
    pub control_plane: String,
    /// Extra arguments for every worker.
    pub extra: Vec<String>,
    /// Environment of every worker (never in arguments, which any user of the machine
    /// can read).
    pub env: Vec<(String, String)>,
    /// Mints a join token for each worker started (single use, short-lived), passed as
    /// `ETLMESH_JOIN_TOKEN`: a worker's token is good for its own start only.
    pub join_token: Option<Arc<dyn Fn() -> Option<String> + Send + Sync>>,
}

impl std::fmt::Debug for WorkerCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCommand")
            .field("exe", &self.exe)
            .field("config", &self.config)
            .field("control_plane", &self.control_plane)
            .field("extra", &self.extra)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("join_token", &self.join_token.is_some())
            .finish()
    }
}

struct Slot {
    id: String,
    /// `Some(signal)` stops the slot's worker with that signal.
    stop: watch::Sender<Option<Signal>>,
    task: JoinHandle<()>,
    pid: Arc<Mutex<Option<u32>>>,
}

#[derive(Default)]
struct Pool {
    slots: Vec<Slot>,
    next: u32,
    /// Workers draining after a scale-down.
    leaving: Vec<JoinHandle<()>>,
}

/// Workers as child processes.
pub struct ProcessScaler {
    command: WorkerCommand,
    pools: Mutex<HashMap<String, Pool>>,
}

impl ProcessScaler {
    /// A scaler that starts workers with `command`.
    pub fn new(command: WorkerCommand) -> Self {
        Self {
            command,
            pools: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Process ids of a pool's running workers, by worker id.
    pub fn pids(&self, pool: &str) -> Vec<(String, Option<u32>)> {
        self.lock()
            .get(pool)
            .map(|p| {
                p.slots
                    .iter()
                    .map(|s| {
                        (
                            s.id.clone(),
                            *s.pid.lock().unwrap_or_else(|e| e.into_inner()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Workers running in a pool.
    pub fn running(&self, pool: &str) -> usize {
        self.lock().get(pool).map_or(0, |p| p.slots.len())
    }

    fn scale(&self, pool: &str, replicas: u32) {
        let mut pools = self.lock();
        let p = pools.entry(pool.to_string()).or_default();
        p.leaving.retain(|t| !t.is_finished());
        while p.slots.len() < replicas as usize {
            p.next += 1;
            let id = format!("{pool}-{}", p.next);
            let (stop, stop_rx) = watch::channel(None);
            let pid = Arc::new(Mutex::new(None));
            let runner = Runner {
                id: id.clone(),
                pool: pool.to_string(),
                command: self.command.clone(),
                pid: pid.clone(),
            };
            let task = tokio::spawn(runner.run(stop_rx));
            p.slots.push(Slot {
                id,
                stop,
                task,
                pid,
            });
        }
        while p.slots.len() > replicas as usize {
            if let Some(slot) = p.slots.pop() {
                tracing::info!(worker = %slot.id, pool, "scaling down: draining worker");
                let _ = slot.stop.send(Some(Signal::SIGTERM));
                p.leaving.push(slot.task);
            }
        }
    }
}

impl Scaler for ProcessScaler {
    fn name(&self) -> &'static str {
        "process"
    }

    fn set_replicas<'a>(
        &'a self,
        pool: &'a str,
        replicas: u32,
    ) -> BoxFuture<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            self.scale(pool, replicas);
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let tasks: Vec<JoinHandle<()>> = {
                let mut pools = self.lock();
                let mut tasks = Vec::new();
                for p in pools.values_mut() {
                    for s in p.slots.drain(..) {
                        let _ = s.stop.send(Some(Signal::SIGINT));
                        tasks.push(s.task);
                    }
                    tasks.append(&mut p.leaving);
                }
                tasks
            };
            for t in tasks {
                let _ = t.await;
            }
        })
    }
}

/// Runs one worker slot: start, relay output, restart on exit, drain on stop.
struct Runner {
    id: String,
    pool: String,
    command: WorkerCommand,
    pid: Arc<Mutex<Option<u32>>>,
}

impl Runner {
    fn spawn(&self) -> std::io::Result<Child> {
        let c = &self.command;
        let mut cmd = Command::new(&c.exe);
        cmd.arg("worker")
            .arg("-c")
            .arg(&c.config)
            .args([
                "--pipeline",
                &self.pool,
                "--id",
                &self.id,
                "--control-plane",
                &c.control_plane,
            ])
            .args(["--listen", "127.0.0.1:0"])
            .args(&c.extra)
            .envs(c.env.iter().map(|(k, v)| (k, v)))
            .envs(
                c.join_token
                    .as_ref()
                    .and_then(|mint| mint())
                    .map(|t| ("ETLMESH_JOIN_TOKEN", t)),
            )
            .env(SUPERVISOR_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Children write to a pipe, not a terminal: keep their logs in the
            // parent's format unless one was chosen.
            .env(
                "ETLMESH_LOG_FORMAT",
                std::env::var("ETLMESH_LOG_FORMAT").unwrap_or_else(|_| {
                    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                        "text"
                    } else {
                        "json"
                    }
                    .into()
                }),
            )
            .kill_on_drop(true);
        cmd.spawn()
    }

    fn set_pid(&self, pid: Option<u32>) {
        *self.pid.lock().unwrap_or_else(|p| p.into_inner()) = pid;
    }

    async fn run(self, mut stop: watch::Receiver<Option<Signal>>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(worker = %self.id, error = %e, "cannot start the worker process");
                    if wait_or_stop(&mut stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let pid = child.id();
            self.set_pid(pid);
            tracing::info!(worker = %self.id, pid = pid.unwrap_or(0), "worker started");
            if let Some(out) = child.stdout.take() {
                tokio::spawn(relay(self.id.clone(), out));
            }
            if let Some(err) = child.stderr.take() {
                tokio::spawn(relay(self.id.clone(), err));
            }
            let status = tokio::select! {
                s = child.wait() => s,
                () = stopped(&mut stop) => {
                    let signal = (*stop.borrow()).unwrap_or(Signal::SIGTERM);
                    if let Some(pid) = pid {
                        let _ = kill(Pid::from_raw(pid as i32), signal);
                    }
                    let s = match tokio::time::timeout(DRAIN_LIMIT, child.wait()).await {
                        Ok(s) => s,
                        Err(_) => {
                            tracing::warn!(worker = %self.id, "the worker did not drain in time; killing it");
                            let _ = child.kill().await;
                            child.wait().await
                        }
                    };
                    tracing::info!(worker = %self.id, status = ?s.as_ref().ok(), "worker stopped");
                    self.set_pid(None);
                    return;
                }
            };
            self.set_pid(None);
            if stop.borrow().is_some() {
                return;
            }
            let killed = status
                .as_ref()
                .ok()
                .and_then(std::os::unix::process::ExitStatusExt::signal)
                .is_some();
            if killed || started.elapsed() >= HEALTHY_RUN {
                // A worker killed (kill -9, the OOM killer) or that ran well and died
                // comes back at once: its stream session holds messages only it will
                // be sent, and the broker drops what passes its queue limit meanwhile.
                // Failures at start still back off.
                backoff = QUICK_RESTART;
            }
            tracing::warn!(worker = %self.id, status = ?status.ok(), restart_in_ms = backoff.as_millis() as u64, "worker exited; restarting");
            if wait_or_stop(&mut stop, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// In a worker started by this scaler: completes when the supervising process is
/// gone (killed with SIGKILL, say, so that it could not drain its workers), so that
/// the worker drains and exits instead of running on, orphaned. Never completes in a
/// worker started otherwise.
pub async fn supervisor_gone() {
    let Some(pid) = std::env::var(SUPERVISOR_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if nix::unistd::getppid().as_raw() != pid {
            tracing::warn!(
                supervisor = pid,
                "the process that started this worker is gone; draining"
            );
            return;
        }
    }
}

/// Completes once stopping was asked for.
async fn stopped(rx: &mut watch::Receiver<Option<Signal>>) {
    let _ = rx.wait_for(Option::is_some).await;
}

/// Sleeps; `true` when stopping was asked for meanwhile.
async fn wait_or_stop(rx: &mut watch::Receiver<Option<Signal>>, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = stopped(rx) => true,
    }
}

/// Copies a child's output lines to ours, prefixed with its id.
async fn relay(id: String, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{id}] {line}");
    }
}
