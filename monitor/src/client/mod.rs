//! Commands that read a running agent rather than run one: `twmon trace`.
pub mod trace;
