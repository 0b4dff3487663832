//! etlmesh's embedded MQTT broker: what `etlmesh up` runs in its own process when the
//! pipeline file asks for `platform.broker` (and `up --demo` when nothing answers on
//! 1883), and what `etlmesh broker` runs alone — for demos, the edge and tests, so that
//! one binary is the whole stream path.
//!
//! It speaks MQTT 3.1.1 and 5 (rumqttc's packet codec, which the workers' client
//! already builds), with QoS 0 and 1 (QoS 2 publishes are accepted and delivered at
//! QoS 1), persistent sessions (MQTT 3.1.1 `clean_session = false`, MQTT 5 session
//! expiry), shared subscriptions (`$share/GROUP/FILTER`: each message to one member,
//! connected ones first; what a member that leaves for good held goes to the others),
//! retained messages, wills, TLS and logins. Every queue is bounded
//! ([`etlmesh_config::BrokerSpec`]); what does not fit is dropped and counted.
//!
//! Sessions live in memory: a restart of the process loses them. Where messages must
//! outlive the broker, or many machines share one, use a clustered broker (EMQX,
//! HiveMQ, VerneMQ) or Mosquitto with persistence.
//!
//! - [`topic`], topic names, filters and shared subscriptions;
//! - `wire`: MQTT 3.1.1 and 5 packets as one vocabulary;
//! - `state`: sessions, the subscription index, routing — behind one lock;
//! - `connection`: one client, from CONNECT to goodbye;
//! - [`Metrics`], the `etlmesh_broker_*` families.

mod connection;
mod metrics;
mod state;
pub mod topic;
mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etlmesh_config::{BrokerSpec, BrokerUser};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

pub use metrics::Metrics;

/// Errors of starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The address is taken or not ours.
    #[error(
        "MQTT broker: cannot listen on {addr}: {source}; is another broker running there? Set platform.broker.listen to a free address"
    )]
    Bind {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS files.
    #[error("MQTT broker TLS: {0}")]
    Tls(String),
}

/// Who may connect: anyone, or the users of `platform.broker.users`.
#[derive(Debug)]
pub(crate) struct Login {
    users: Vec<BrokerUser>,
}

impl Login {
    fn check(&self, given: Option<&(String, String)>) -> Result<(), wire::Refusal> {
        if self.users.is_empty() {
            return Ok(());
        }
        let Some((user, password)) = given else {
            return Err(wire::Refusal::BadLogin);
        };
        let digest = etlmesh_tls::sha256(password.as_bytes());
        let ok = self
            .users
            .iter()
            .any(|u| &u.username == user && u.sha256 == digest);
        if ok {
            Ok(())
        } else {
            Err(wire::Refusal::BadLogin)
        }
    }
}

/// A bound broker, ready to serve.
pub struct Server {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    core: Arc<state::Core>,
    login: Arc<Login>,
    max_connections: usize,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Binds the listener (so that a taken port is reported before anything else starts).
pub async fn bind(spec: &BrokerSpec) -> Result<Server, BrokerError> {
    let listener = TcpListener::bind(spec.listen)
        .await
        .map_err(|source| BrokerError::Bind {
            addr: spec.listen,
            source,
        })?;
    let tls = match &spec.tls {
        Some(t) => Some(
            etlmesh_tls::listener::server_config_from_pem(
                &t.cert,
                &t.key,
                &[],
                "platform.broker.tls",
            )
            .map_err(BrokerError::Tls)?,
        ),
        None => None,
    };
    let limits = state::Limits {
        max_queued: spec.max_queued,
        max_queued_bytes: spec.max_queued_bytes,
        max_inflight: spec.max_inflight,
        max_session_expiry: spec.max_session_expiry,
        max_connections: spec.max_connections,
        max_retained: 10_000,
    };
    Ok(Server {
        listener,
        tls,
        core: Arc::new(state::Core::new(
            limits,
            Metrics::default(),
            spec.max_packet,
        )),
        login: Arc::new(Login {
            users: spec.users.clone(),
        }),
        max_connections: spec.max_connections,
    })
}

impl Server {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Its metrics, to register in the process's registry.
    pub fn metrics(&self) -> &Metrics {
        &self.core.metrics
    }

    /// Serves until `shutdown`; connected clients are then told (MQTT 5) and closed.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let addr = self.addr();
        tracing::info!(%addr, tls = self.tls.is_some(), logins = !self.login.users.is_empty(), "MQTT broker listening");
        let core = self.core.clone();
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                core.reap();
            }
        });
        // Sockets at once, before and after CONNECT; past it new ones are closed.
        let all = self.max_connections + 64;
        let spawner = Spawner {
            core: self.core,
            login: self.login,
            sockets: Arc::new(Semaphore::new(all)),
            stop: stop_rx,
        };
        let (listener, tls) = (self.listener, self.tls);
        let accept = async {
            match tls {
                Some(config) => {
                    let mut tls = match etlmesh_tls::listener::TlsListener::new(
                        listener, config, None,
                    ) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "MQTT broker: cannot accept TLS connections");
                            return;
                        }
                    };
                    while let Some((io, peer)) = tls.next().await {
                        spawner.spawn(io, peer);
                    }
                }
                None => loop {
                    match listener.accept().await {
                        Ok((io, peer)) => {
                            let _ = io.set_nodelay(true);
                            spawner.spawn(io, peer);
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "MQTT broker: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                },
            }
        };
        tokio::select! {
            () = accept => {}
            () = shutdown => {}
        }
        let _ = stop_tx.send(true);
        reaper.abort();
        // Give the connections a moment to say goodbye.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            spawner
                .sockets
                .acquire_many(u32::try_from(all).unwrap_or(u32::MAX)),
        )
        .await;
        tracing::info!(%addr, "MQTT broker stopped");
    }
}

/// Starts a task per connection, within the socket bound.
struct Spawner {
    core: Arc<state::Core>,
    login: Arc<Login>,
    sockets: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
}

impl Spawner {
    fn spawn<S>(&self, io: S, peer: SocketAddr)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(permit) = self.sockets.clone().try_acquire_owned() else {
            self.core.metrics.refused("unavailable");
            tracing::warn!(%peer, "MQTT broker: too many connections (platform.broker.max_connections); closing this one");
            return;
        };
        let (core, login, stop) = (self.core.clone(), self.login.clone(), self.stop.clone());
        tokio::spawn(async move {
            connection::serve(io, peer, core, login, stop).await;
            drop(permit);
        });
    }
}
