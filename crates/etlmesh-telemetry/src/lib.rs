//! Telemetry shared by every process: W3C trace context ([`trace`]), Prometheus
//! metrics rendering ([`metrics`]), CPU and memory of this process ([`process`]),
//! recent log lines kept for the control plane ([`logs`]) and error groups
//! ([`errors`]).

pub mod errors;
pub mod logs;
pub mod metrics;
pub mod process;
pub mod trace;

pub use trace::TraceContext;
