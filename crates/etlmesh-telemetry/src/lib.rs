//! Telemetry shared by every process: W3C trace context ([`trace`]), the request a
//! task serves, for its log lines ([`context`]), Prometheus metrics rendering
//! ([`metrics`]), CPU and memory of this process ([`process`]), recent log lines kept
//! for the control plane ([`logs`]), error groups ([`errors`]) and OTLP span export
//! ([`otlp`]) of the traces the head [`sampler`] keeps.

pub mod context;
pub mod errors;
pub mod json_fields;
pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod process;
pub mod sampler;
pub mod served;
pub mod trace;

#[cfg(test)]
mod test_buf;

pub use trace::TraceContext;
