//! The broker's Prometheus metrics (`etlmesh_broker_*`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Counters and gauges of one broker; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub(crate) connections: Gauge,
    pub(crate) sessions: Gauge,
    pub(crate) held: Gauge,
    pub(crate) received: Counter,
    pub(crate) delivered: Counter,
    pub(crate) redelivered: Counter,
    dropped: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
}

impl Metrics {
    /// Registers the families in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("broker");
        r.register(
            "connections",
            "MQTT clients connected",
            self.connections.clone(),
        );
        r.register(
            "sessions",
            "MQTT sessions kept (connected or persistent)",
            self.sessions.clone(),
        );
        r.register(
            "held_messages",
            "Messages queued or unacknowledged across sessions",
            self.held.clone(),
        );
        r.register(
            "messages_received",
            "PUBLISH packets received from clients",
            self.received.clone(),
        );
        r.register(
            "messages_delivered",
            "Messages delivered (QoS 1: acknowledged)",
            self.delivered.clone(),
        );
        r.register(
            "messages_redelivered",
            "Unacknowledged messages sent again (DUP) when their session's client came back",
            self.redelivered.clone(),
        );
        r.register(
            "messages_dropped",
            "Messages not delivered, by reason (queue_full, too_large_for_client, retained_full, no_subscriber)",
            self.dropped.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused, by reason (login, client_id, unavailable, protocol)",
            self.refused.clone(),
        );
    }

    pub(crate) fn dropped(&self, reason: &str) {
        self.dropped_n(reason, 1);
    }

    pub(crate) fn dropped_n(&self, reason: &str, n: u64) {
        if n > 0 {
            self.dropped
                .get_or_create(&vec![("reason".into(), reason.into())])
                .inc_by(n);
        }
    }

    pub(crate) fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }
}
