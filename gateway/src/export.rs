//! Metric export's parts that know nothing of how the gateway runs: the `[[export]]`
//! tables ([`config`]), the mapping of results to samples ([`mapping`]) and the sinks'
//! wire formats ([`sinks`]). [`crate::exporting`] runs them: a task per sink, its cursor,
//! its lease in a fleet (docs/METRICS.md).

pub mod config;
pub mod mapping;
pub mod sinks;
