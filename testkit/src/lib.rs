//! What twmon's tests (`monitor/tests`), checks and benchmark (`xtask`) share, written once:
//!
//! - [`process`], [`agent`]: a process stopped on every path; where an agent started on port 0
//!   listens, and when it is ready;
//! - [`netns`]: network namespaces of their own, with the kernel's view from inside (`ss`,
//!   /proc/net counters, sysctls);
//! - [`http`]: a plain HTTP GET and a free port, to talk to the agent without a client stack
//!   that could hide what it answers;
//! - [`exposition`]: the Prometheus text format parsed, where a missing series is not 0;
//! - [`workload`]: connections and each way they end, and nftables rules that lose segments.
//!
//! Set-up failures (no `ip`, a namespace that cannot be made) panic with what to do: this is
//! test support, and a host that cannot make a namespace cannot run any of them.
pub mod agent;
pub mod exposition;
pub mod http;
pub mod netns;
pub mod process;
pub mod workload;
