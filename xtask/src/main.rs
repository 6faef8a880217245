//! Developer tasks that are more than a plain `cargo build`.
//!
//! `cargo xtask setup` installs what a fresh Debian machine lacks; every other task runs it first.
mod bench;
mod setup;
mod vm;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
pub use xtask::{is_root, root};

#[derive(Parser)]
#[command(name = "xtask", about = "twmon developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and packages a fresh machine lacks.
    Setup,
    /// Build the single `twmon` binary (kernel programs embedded).
    Build,
    /// Build, then run the agent as root with its defaults (extra arguments go to twmon).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, real-kernel tests, and the checks of dashboards, rules and
    /// deployment files.
    Test {
        /// Only tests whose name contains this (passed to cargo test).
        filter: Option<String>,
    },
    /// Run the real-kernel tests on other kernels: Debian's 5.10, 6.1 and 6.12 under qemu
    /// (virtme-ng), or `host` for this machine's own. Prints one pass/fail line per kernel.
    Vm {
        /// Kernel series to boot (5.10, 6.1, 6.12) or `host`; repeat for several. Default: 5.10,
        /// 6.1 and 6.12.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Test suites (monitor/tests/NAME.rs) to run; repeat for several. Default: kernel, ground.
        #[arg(long = "suite")]
        suites: Vec<String>,
        /// Only tests whose name contains this (passed to the test binaries).
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Run the randomized differential harness for a long time: cases one after another in one
    /// namespace watched by one agent, namespaces created and deleted alongside, every
    /// invariant checked against the kernel at each rest point; prints tallies and the agent's
    /// memory as it goes.
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// The first case's seed (decimal or 0x hex); the others follow from it.
        #[arg(long, default_value = "0x50a6")]
        seed: String,
        /// Stop after this many cases (say 1, to rerun a failed seed).
        #[arg(long)]
        cases: Option<u64>,
    },
    /// Check formatting (rustfmt.toml) and lints (clippy, warnings are errors), as CI does.
    Lint,
    /// Measure the agent's overhead: churn with the agent off and on, per-event kernel cost,
    /// agent CPU and memory, scrape latency. Prints numbers; see BENCHMARKS.md.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Runs a command in the workspace root, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.current_dir(root()).status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// A command's standard output, when it ran and succeeded.
pub fn output(cmd: &mut Command) -> Option<String> {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn build() -> Result<PathBuf> {
    setup::ensure()?;
    run(Command::new("cargo").args(["build", "--release", "--package", "monitor"]))?;
    Ok(root().join("target/release/twmon"))
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure(),
        Task::Build => build().map(|p| eprintln!("built {}", p.display())),
        Task::Run { args } => {
            let bin = build()?;
            let mut cmd = if is_root() {
                Command::new(&bin)
            } else {
                let mut c = Command::new("sudo");
                c.arg(&bin);
                c
            };
            run(cmd.args(args))
        }
        Task::Bench { args } => {
            let bin = build()?;
            if !is_root() {
                bail!(
                    "the benchmark loads kernel programs and creates network namespaces: run as \
                     root"
                );
            }
            bench::run(&bin, &args)
        }
        Task::Lint => {
            // The agent's build script builds the kernel programs: the toolchain first.
            setup::ensure()?;
            run(Command::new("cargo").args(["fmt", "--all", "--check"]))
                .context("formatting differs: run `cargo fmt --all`")?;
            run(Command::new("cargo").args([
                "clippy",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The kernel programs, for their own target with the toolchain that builds them.
            run(Command::new("cargo")
                .args(["+nightly", "clippy", "--package", "monitor-ebpf", "--release"])
                .args([
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ]))
            .context(
                "clippy on the kernel programs failed (`cargo +nightly clippy` needs \
                      nightly's clippy)",
            )
        }
        Task::Vm { kernels, suites, filter } => {
            if !is_root() {
                bail!("the VM runner downloads kernels with apt and boots them: run as root");
            }
            let or = |v: Vec<String>, d: &[&str]| {
                if v.is_empty() { d.iter().map(|s| s.to_string()).collect() } else { v }
            };
            vm::run_matrix(&vm::Options {
                kernels: or(kernels, vm::DEFAULT_KERNELS),
                suites: or(suites, vm::DEFAULT_SUITES),
                filter,
            })
        }
        Task::Soak { minutes, seed, cases } => {
            build()?;
            if !is_root() {
                bail!("the soak loads kernel programs and creates network namespaces: run as root");
            }
            let mut cmd = Command::new("cargo");
            cmd.args([
                "test",
                "--release",
                "--package",
                "monitor",
                "--test",
                "exact",
                "soak",
                "--",
            ])
            .args(["--ignored", "--exact", "--nocapture"])
            .env("TWMON_SOAK_MINUTES", minutes.to_string())
            .env("TWMON_SOAK_SEED", &seed);
            if let Some(n) = cases {
                cmd.env("TWMON_SOAK_CASES", n.to_string());
            }
            run(&mut cmd)
        }
        Task::Test { filter } => {
            build()?;
            if !is_root() {
                bail!("the tests load kernel programs and create network namespaces: run as root");
            }
            let mut cmd = Command::new("cargo");
            // The default members: everything but the kernel programs, which only build for BPF.
            cmd.args(["test", "--release"]);
            if let Some(f) = &filter {
                cmd.arg(f);
            }
            // Real-kernel tests each wait for timers of up to 2MSL; run them side by side.
            cmd.args(["--", "--test-threads", "16"]);
            // The checks of what ships beside the binary are among them (`xtask/tests/checks.rs`).
            run(&mut cmd)
        }
    }
}
