//! Energy and carbon of the work etlmesh does.
//!
//! - [`rapl`] reads the machine's energy counters from powercap (Intel RAPL), wraparound
//!   included;
//! - [`model`] estimates power from CPU time when RAPL cannot be read (watts per vCPU
//!   between idle and full load, watts per GB of memory, a PUE), and reads the machine's
//!   CPU time and memory from `/proc`;
//! - [`carbon`] is the grid's carbon intensity: fixed, or a forecast file (the Carbon
//!   Aware SDK's JSON, or CSV);
//! - [`schedule`] places a deferrable job in the window of lowest average intensity
//!   that ends before its deadline;
//! - [`ledger`] turns one-second samples (machine energy, each process's CPU time, the
//!   records each pipeline handled) into joules, kWh, gCO2e and the SCI per pipeline,
//!   the idle power apart, and the energy scale-to-zero avoided.
//!
//! The control plane drives the meter once a second; everything here is synchronous and
//! testable with synthetic inputs.

pub mod carbon;
pub mod ledger;
pub mod model;
pub mod rapl;
pub mod schedule;

pub use carbon::{Forecast, ForecastError, Intensity};
pub use ledger::{Ledger, LedgerConfig, ProcessSample, Tick};
pub use model::PowerModel;
pub use rapl::Rapl;
pub use schedule::{Placement, place};

/// Joules in one kilowatt-hour.
pub const JOULES_PER_KWH: f64 = 3.6e6;
