//! twmon's kernel programs live in the `monitor` binary target; this empty library only lets
//! the agent name this crate as a build dependency so cargo rebuilds it when they change.
#![no_std]
