//! What leaves the agent: the metrics registry ([`metrics`]) and the collectors that read their
//! source at scrape time ([`kernel_metrics`], [`ground_metrics`], [`closers`], [`netns_counters`],
//! built with [`family`]); the HTTP routes ([`http`]), the
//! listener they run under ([`serve`]) and its TLS and authentication ([`webconfig`]); the JSON
//! snapshot ([`snapshot`]); the trace stream ([`trace`]).
pub mod closers;
pub mod family;
pub mod ground_metrics;
pub mod http;
pub mod kernel_metrics;
pub mod metrics;
pub mod netns_counters;
pub mod serve;
pub mod snapshot;
pub mod trace;
pub mod webconfig;
