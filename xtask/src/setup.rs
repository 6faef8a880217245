//! Installs what a fresh Debian 12 machine of this project's kind lacks. Idempotent and quick
//! when everything is there; says what it does and fails with what to do by hand.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{output, run};

/// Debian packages: LLVM 22 for bpf-linker, and the real tools the tests drive.
const APT: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "nftables",
    "prometheus",
    "curl",
    "python3-pip",
    "procps",
    "nginx-light",
    "wrk",
    "tmux",
];
const BPF_LINKER: &str = "0.13.0";

pub fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs Debian packages (as root; says what to do otherwise).
pub fn apt_install(missing: &[&str]) -> Result<()> {
    if !crate::is_root() {
        bail!("missing Debian packages {missing:?}: run `sudo cargo xtask setup` or install them");
    }
    eprintln!("setup: installing {missing:?}");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing))
    .context("apt-get install failed; check the package sources")
}

pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = APT.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }

    let src = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    match src {
        None => {
            bail!(
                "the nightly toolchain is missing; the kernel programs need it: `rustup toolchain \
                 install nightly`"
            )
        }
        Some(list) if !list.lines().any(|l| l.starts_with("rust-src")) => {
            eprintln!("setup: adding rust-src to the nightly toolchain");
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
        }
        Some(_) => {}
    }

    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER) {
        eprintln!("setup: building bpf-linker {BPF_LINKER} against LLVM 22 (about a minute)");
        run(Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--version", BPF_LINKER])
            .args(["--no-default-features", "--features", "llvm-22"]))
        .context("building bpf-linker failed; it needs llvm-22-dev and libpolly-22-dev")?;
    }
    Ok(())
}
