//! etlmesh and MQTT.
//!
//! - [`Broker`]: a broker address as users write it (`mqtt://user:pass@host:1883`).
//! - [`simulate`]: `etlmesh simulate`, virtual devices publishing readings at a given
//!   rate, with jitter, out-of-order and late readings and malformed payloads, so that
//!   streaming pipelines can be tried and tested against a real broker.
//! - [`count`]: a bare subscriber that counts what it receives.

pub mod broker;
pub mod count;
pub mod simulate;

pub use broker::Broker;

/// Errors of the MQTT side.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// A broker address that cannot be used.
    #[error("broker `{url}`: {message}")]
    BadBroker {
        /// What was given.
        url: String,
        /// What is wrong and what to write instead.
        message: String,
    },
    /// The connection failed or broke.
    #[error("MQTT broker {broker}: {message}; check that it runs and accepts the client")]
    Connection {
        /// host:port.
        broker: String,
        /// What happened.
        message: String,
    },
    /// Options that cannot work together.
    #[error("{0}")]
    Options(String),
}
