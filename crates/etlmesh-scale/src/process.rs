//! The `process` scaler: workers as local child processes (`etlmesh worker`), one pool
//! per pipeline. Scaling up starts workers; scaling down sends SIGTERM to the newest,
//! which drain, leave their pool and exit; stopping the whole mesh sends SIGINT (they
//! drain and keep their stream subscriptions: they will be back). A worker that dies
//! is restarted at once when a signal killed it or it had run for a while (its stream
//! session holds messages the broker drops past its queue limit), with backoff when
//! it keeps failing at start. Their output is relayed with a `[worker-id]` prefix.
//!
//! A reload ([`Rollouts`]) gives a pool another pipeline file: new workers start beside
//! the old ones, which drain once the new are ready, or a worker restarts in place
//! (SIGINT, then again under the same id, so with the same stream sessions).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{BoxFuture, Rollouts, ScaleError, Scaler};

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

/// What a slot's runner is told to do.
#[derive(Debug, Clone, PartialEq)]
enum Order {
    Run,
    /// Stop the worker with this signal, for good.
    Stop(Signal),
    /// Stop the worker with SIGINT (it drains and keeps its stream sessions) and start
    /// it again, under the same id, with this pipeline file.
    Restart(PathBuf),
}

struct Slot {
    id: String,
    order: watch::Sender<Order>,
    task: JoinHandle<()>,
    pid: Arc<Mutex<Option<u32>>>,
}

impl Slot {
    fn pid(&self) -> Option<u32> {
        *self.pid.lock()
    }

    /// Asks the worker to drain and leave; its task, to wait for.
    fn stop(self, signal: Signal) -> JoinHandle<()> {
        let _ = self.order.send(Order::Stop(signal));
        self.task
    }
}

#[derive(Default)]
struct Pool {
    slots: Vec<Slot>,
    /// A rollout's workers, started beside `slots` (see [`Rollouts::start_beside`]).
    incoming: Vec<Slot>,
    next: u32,
    /// The pipeline file its workers start with (`None`: the command's).
    config: Option<PathBuf>,
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

    /// Process ids of a pool's running workers, by worker id.
    pub fn pids(&self, pool: &str) -> Vec<(String, Option<u32>)> {
        self.pools
            .lock()
            .get(pool)
            .map(|p| p.slots.iter().map(|s| (s.id.clone(), s.pid())).collect())
            .unwrap_or_default()
    }

    /// Workers running in a pool.
    pub fn running(&self, pool: &str) -> usize {
        self.pools.lock().get(pool).map_or(0, |p| p.slots.len())
    }

    /// Starts a worker for `pool` in a new slot.
    fn start(&self, p: &mut Pool, pool: &str) -> Slot {
        p.next += 1;
        let id = format!("{pool}-{}", p.next);
        let (order, orders) = watch::channel(Order::Run);
        let pid = Arc::new(Mutex::new(None));
        let mut command = self.command.clone();
        if let Some(c) = &p.config {
            command.config = c.clone();
        }
        let runner = Runner {
            id: id.clone(),
            pool: pool.to_string(),
            command,
            pid: pid.clone(),
        };
        let task = tokio::spawn(runner.run(orders));
        Slot {
            id,
            order,
            task,
            pid,
        }
    }

    fn scale(&self, pool: &str, replicas: u32) {
        let mut pools = self.pools.lock();
        let p = pools.entry(pool.to_string()).or_default();
        self.resize(p, pool, replicas as usize);
    }

    fn resize(&self, p: &mut Pool, pool: &str, replicas: usize) {
        p.leaving.retain(|t| !t.is_finished());
        while p.slots.len() < replicas {
            let slot = self.start(p, pool);
            p.slots.push(slot);
        }
        while p.slots.len() > replicas {
            if let Some(slot) = p.slots.pop() {
                tracing::info!(worker = %slot.id, pool, "scaling down: draining worker");
                p.leaving.push(slot.stop(Signal::SIGTERM));
            }
        }
    }
}

impl Rollouts for ProcessScaler {
    fn use_config(&self, pool: &str, config: &Path) {
        self.pools
            .lock()
            .entry(pool.to_string())
            .or_default()
            .config = Some(config.to_path_buf());
    }

    fn start_beside(&self, pool: &str) -> Vec<String> {
        let mut pools = self.pools.lock();
        let p = pools.entry(pool.to_string()).or_default();
        let n = p.slots.len();
        for _ in 0..n {
            let slot = self.start(p, pool);
            p.incoming.push(slot);
        }
        p.incoming.iter().map(|s| s.id.clone()).collect()
    }

    fn finish(&self, pool: &str, keep_new: bool) {
        let mut pools = self.pools.lock();
        let Some(p) = pools.get_mut(pool) else { return };
        let incoming = std::mem::take(&mut p.incoming);
        let leaving = if keep_new {
            let old = std::mem::replace(&mut p.slots, incoming);
            // The autoscaler may have resized the old set meanwhile.
            self.resize(p, pool, old.len());
            old
        } else {
            incoming
        };
        for slot in leaving {
            tracing::info!(worker = %slot.id, pool, "reload: draining worker");
            p.leaving.push(slot.stop(Signal::SIGTERM));
        }
    }

    fn restart(&self, pool: &str, id: &str) -> bool {
        let pools = self.pools.lock();
        let Some(p) = pools.get(pool) else {
            return false;
        };
        let config = p
            .config
            .clone()
            .unwrap_or_else(|| self.command.config.clone());
        p.slots
            .iter()
            .find(|s| s.id == id)
            .is_some_and(|s| s.order.send(Order::Restart(config)).is_ok())
    }

    fn workers(&self, pool: &str) -> Vec<(String, Option<u32>)> {
        self.pids(pool)
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

    fn rollouts(&self) -> Option<&dyn Rollouts> {
        Some(self)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let tasks: Vec<JoinHandle<()>> = {
                let mut pools = self.pools.lock();
                let mut tasks = Vec::new();
                for p in pools.values_mut() {
                    for s in p.slots.drain(..).chain(p.incoming.drain(..)) {
                        tasks.push(s.stop(Signal::SIGINT));
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
        *self.pid.lock() = pid;
    }

    async fn run(mut self, mut orders: watch::Receiver<Order>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(worker = %self.id, error = %e, "cannot start the worker process");
                    match self.wait_or_order(&mut orders, backoff).await {
                        Some(Order::Stop(_)) => return,
                        Some(_) => backoff = QUICK_RESTART,
                        None => backoff = (backoff * 2).min(MAX_BACKOFF),
                    }
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
                order = self.next_order(&mut orders) => {
                    let signal = match &order {
                        Order::Stop(signal) => *signal,
                        _ => Signal::SIGINT,
                    };
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
                    self.set_pid(None);
                    if let Order::Restart(config) = order {
                        tracing::info!(worker = %self.id, config = %config.display(), status = ?s.as_ref().ok(), "worker stopped; starting it again with the reloaded pipeline file");
                        self.command.config = config;
                        backoff = FIRST_BACKOFF;
                        continue;
                    }
                    tracing::info!(worker = %self.id, status = ?s.as_ref().ok(), "worker stopped");
                    return;
                }
            };
            self.set_pid(None);
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
            match self.wait_or_order(&mut orders, backoff).await {
                Some(Order::Stop(_)) => return,
                Some(_) => backoff = QUICK_RESTART,
                None => backoff = (backoff * 2).min(MAX_BACKOFF),
            }
        }
    }

    /// The next order to act on: a stop, or a restart with another file. A restart
    /// with the file this worker already runs is nothing to do.
    async fn next_order(&self, orders: &mut watch::Receiver<Order>) -> Order {
        loop {
            let order = orders.borrow_and_update().clone();
            match order {
                Order::Stop(_) => return order,
                Order::Restart(ref c) if *c != self.command.config => return order,
                _ => {}
            }
            if orders.changed().await.is_err() {
                // The scaler is gone: nothing will be asked of this worker again.
                return std::future::pending().await;
            }
        }
    }

    /// Sleeps before a restart; an order that comes meanwhile ends the sleep (a
    /// restart order also sets the file to start with).
    async fn wait_or_order(
        &mut self,
        orders: &mut watch::Receiver<Order>,
        d: Duration,
    ) -> Option<Order> {
        let order = tokio::select! {
            () = tokio::time::sleep(d) => return None,
            order = self.next_order(orders) => order,
        };
        if let Order::Restart(c) = &order {
            self.command.config = c.clone();
        }
        Some(order)
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

/// Copies a child's output lines to ours, prefixed with its id.
async fn relay(id: String, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{id}] {line}");
    }
}
