//! Workers as child processes: started, their output relayed with a prefix, restarted
//! with backoff when they exit, and stopped with SIGTERM (then SIGKILL).

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

/// The first restart waits this long; each crash in a row doubles it.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Supervised workers.
pub struct Supervisor {
    slots: Vec<JoinHandle<()>>,
    stopping: watch::Sender<bool>,
    pids: Arc<Mutex<Vec<Option<u32>>>>,
}

impl Supervisor {
    /// Starts `count` workers serving `config`, registered with `control_plane`.
    pub fn start(
        exe: PathBuf,
        config: PathBuf,
        control_plane: String,
        count: usize,
        extra: Vec<String>,
    ) -> Self {
        let (stopping, stop_rx) = watch::channel(false);
        let pids = Arc::new(Mutex::new(vec![None; count]));
        let slots = (0..count)
            .map(|i| {
                let slot = Slot {
                    id: format!("worker-{}", i + 1),
                    index: i,
                    exe: exe.clone(),
                    config: config.clone(),
                    control_plane: control_plane.clone(),
                    extra: extra.clone(),
                    pids: pids.clone(),
                };
                tokio::spawn(slot.run(stop_rx.clone()))
            })
            .collect();
        Self {
            slots,
            stopping,
            pids,
        }
    }

    /// Process ids of the running workers.
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.pids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// SIGTERM to every worker; SIGKILL to those still running after `timeout`.
    pub async fn stop(self, timeout: Duration) {
        let _ = self.stopping.send(true);
        let all = futures_join(self.slots);
        if tokio::time::timeout(timeout, all).await.is_err() {
            for pid in self
                .pids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .flatten()
            {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            }
        }
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

struct Slot {
    id: String,
    index: usize,
    exe: PathBuf,
    config: PathBuf,
    control_plane: String,
    extra: Vec<String>,
    pids: Arc<Mutex<Vec<Option<u32>>>>,
}

impl Slot {
    fn spawn(&self) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("worker")
            .arg("-c")
            .arg(&self.config)
            .args([
                "--id",
                &self.id,
                "--control-plane",
                &self.control_plane,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
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
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn()
    }

    fn set_pid(&self, pid: Option<u32>) {
        if let Some(slot) = self
            .pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(self.index)
        {
            *slot = pid;
        }
    }

    async fn run(self, mut stopping: watch::Receiver<bool>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(worker = %self.id, error = %e, "cannot start the worker process");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped(&mut stopping) => return,
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
                _ = stopped(&mut stopping) => {
                    if let Some(pid) = pid {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    }
                    let s = child.wait().await;
                    tracing::info!(worker = %self.id, status = ?s.as_ref().ok(), "worker stopped");
                    self.set_pid(None);
                    return;
                }
            };
            self.set_pid(None);
            if *stopping.borrow() {
                return;
            }
            if started.elapsed() >= HEALTHY_RUN {
                backoff = FIRST_BACKOFF;
            }
            tracing::warn!(worker = %self.id, status = ?status.ok(), restart_in_ms = backoff.as_millis() as u64, "worker exited; restarting");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped(&mut stopping) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Completes once stopping was asked for.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Copies a child's output lines to ours, prefixed with its id.
async fn relay(id: String, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{id}] {line}");
    }
}
