//! Telemetry shared by every process: W3C trace context ([`trace`]), Prometheus
//! metrics rendering ([`metrics`]), CPU and memory of this process ([`process`]),
//! recent log lines kept for the control plane ([`logs`]), error groups
//! ([`errors`]) and OTLP span export ([`otlp`]).

pub mod errors;
pub mod json_fields;
pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod process;
pub mod trace;

pub use trace::TraceContext;
