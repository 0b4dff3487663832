//! Telemetry shared by every process: W3C trace context ([`trace`]), Prometheus
//! metrics rendering ([`metrics`]), and CPU and memory of this process ([`process`]).

pub mod metrics;
pub mod process;
pub mod trace;

pub use trace::TraceContext;
