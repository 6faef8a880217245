//! The kernel's own view, which the agent is checked against and which names what the programs
//! cannot: sockets from sock_diag ([`diag`]), counters, limits and socket owners from procfs
//! ([`procfs`]), network namespaces and their names ([`netns`]), and all of it per namespace,
//! with the breakdowns computed from it ([`ground`]).
pub mod diag;
pub mod ground;
pub mod netns;
pub mod procfs;
