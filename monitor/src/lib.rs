//! twmon: an eBPF monitor of how TCP connections end.
//!
//! The modules follow the data path:
//!
//! - [`kernel`]: the kernel side. Loads and attaches the programs (offsets from BTF in
//!   [`kernel::layout`]), reads their maps, decodes their ring-buffer records ([`kernel::event`]).
//! - [`agent`]: the agent's decisions. The [`Agent`] drains the ring into the tracker, seeds and
//!   reconciles against the kernel's own view, and names CLOSE_WAIT leaks.
//! - [`view`]: the kernel's own view: sock_diag, procfs, network namespaces and their names.
//! - [`export`]: metrics and their collectors, the HTTP routes and listener, the JSON snapshot.
//!
//! [`client`] holds the commands that read a running agent (`twmon trace`). [`config`] is the
//! configuration file, [`sys`] a few C library calls, and `run` wires it all
//! together.
pub mod agent;
pub mod client;
pub mod config;
pub mod export;
pub mod kernel;
mod run;
pub mod sys;
pub mod view;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use agent::Agent;
use export::{serve, webconfig};
pub use run::{check, run};
pub use sys::bound_heap;

/// Everything the agent runs with; the CLI fills it in.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Inode of the only network namespace to watch, 0 for all.
    pub netns: u32,
    pub limits: kernel::Limits,
    pub sweep_interval: Duration,
    /// The namespace file given with --netns, if any.
    pub netns_path: Option<PathBuf>,
    pub settings: config::Config,
    /// The file `settings` came from, read again on SIGHUP.
    pub config_file: Option<PathBuf>,
    pub web: Web,
}

/// The HTTP side's settings (`--web.*`).
#[derive(Clone, Debug)]
pub struct Web {
    pub telemetry_path: String,
    pub max_requests: usize,
    pub limits: serve::Limits,
    /// `--web.config.file`: TLS, basic authentication, headers.
    pub config: webconfig::WebConfig,
}
