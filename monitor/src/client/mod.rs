//! Commands that read a running agent rather than run one: `twmon trace`, `twmon top`.
pub mod http;
pub mod top;
pub mod trace;
