//! What leaves the agent: the metrics registry ([`metrics`]) and the collectors that read their
//! source at scrape time ([`closers`], [`netns_counters`]); the HTTP routes ([`http`]), the
//! listener they run under ([`serve`]) and its TLS and authentication ([`webconfig`]); the JSON
//! snapshot ([`snapshot`]).
pub mod closers;
pub mod http;
pub mod metrics;
pub mod netns_counters;
pub mod serve;
pub mod snapshot;
pub mod webconfig;
