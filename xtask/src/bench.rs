//! `cargo xtask bench`: overhead of the agent, measured. Method and results in BENCHMARKS.md.
use std::path::Path;

use anyhow::{Result, bail};

pub fn run(_twmon: &Path, _args: &[String]) -> Result<()> {
    bail!("the benchmark is not written yet")
}
