//! Network namespaces the benchmark creates for its load, removed again on every path.
use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

const PREFIX: &str = "twmon-bench-";

/// A named namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
    path: PathBuf,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Netns {
    /// Creates `twmon-bench-<pid>-<suffix>` with its loopback up.
    pub fn create(suffix: &str) -> Result<Self> {
        let name = format!("{PREFIX}{}-{suffix}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { path: PathBuf::from(format!("/run/netns/{name}")), name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Sets the loopback's MTU: at 1500 bytes, segment and timer rates are an Ethernet NIC's.
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        ip(&["-n", &self.name, "link", "set", "lo", "mtu", &mtu.to_string()])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the calling thread into the namespace (sockets it creates from now on live there).
    pub fn enter(&self) -> Result<()> {
        let f = File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        // SAFETY: setns on an fd we hold; CLONE_NEWNET may be entered by one thread of a
        // multi-threaded process.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {} failed: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .unwrap_or_else(|_| bail!("a thread in {} panicked", self.name))
        })
    }

    /// Sets per-namespace sysctls (`net/ipv4/...` under /proc/sys) and reads them back.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.run(|| {
            for (key, value) in settings {
                let p = format!("/proc/sys/{key}");
                fs::write(&p, value).with_context(|| format!("writing {value} to {p} in {}", self.name))?;
                let got = fs::read_to_string(&p)?;
                if got.split_whitespace().collect::<Vec<_>>() != value.split_whitespace().collect::<Vec<_>>() {
                    bail!("{p} in {} reads {got:?} after writing {value:?}", self.name);
                }
            }
            Ok(())
        })
    }

    /// A file under /proc/net as this namespace sees it (e.g. `sockstat`).
    pub fn proc_net(&self, file: &str) -> Result<String> {
        self.run(|| Ok(fs::read_to_string(format!("/proc/thread-self/net/{file}"))?))
    }

    /// TIME_WAIT sockets in this namespace (the `tw` of /proc/net/sockstat).
    pub fn timewait_count(&self) -> Result<u64> {
        let s = self.proc_net("sockstat")?;
        let tcp = s.lines().find(|l| l.starts_with("TCP:")).context("no TCP line in sockstat")?;
        let words: Vec<&str> = tcp.split_whitespace().collect();
        let i = words.iter().position(|w| *w == "tw").context("no tw in sockstat")?;
        Ok(words.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(0))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("bench: could not delete network namespace {}: {e:#}", self.name);
        }
    }
}

/// Deletes namespaces an earlier benchmark left behind (its process is gone).
pub fn remove_stale() {
    let Ok(dir) = fs::read_dir("/run/netns") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("bench: deleting network namespace {name} left by an earlier run");
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}
