//! Small helpers for the checks: processes that are stopped on every path, free ports, a
//! minimal HTTP client, and running commands with their output kept for the report.
use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A process the checks started, stopped on every path (`testkit`).
pub use testkit::process::Process as Proc;

/// Waits until the agent `p` is answers /healthz with 200; returns where it listens.
pub fn wait_healthy(p: &mut Proc, within: Duration) -> Result<SocketAddr> {
    Ok(testkit::agent::wait_healthy(p, within, false)?)
}

/// Where each thread of a process waits in the kernel, e.g. `twmon:futex_do_wait`: tells a hung
/// process from a busy one.
pub fn thread_waits(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("pid {pid} is gone");
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let read = |f: &str| {
            std::fs::read_to_string(t.path().join(f)).unwrap_or_default().trim().to_string()
        };
        out.push(format!("{}:{}", read("comm"), read("wchan")));
    }
    out.join(" ")
}

/// One GET (`testkit`): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    Ok(testkit::http::get(addr, path)?)
}

pub use testkit::http::free_port;

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Polls `ready` every 100 ms until it returns true; fails after `timeout` with `what`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    while Instant::now() < deadline {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => last_err = None,
            Err(e) => last_err = Some(e),
        }
        thread::sleep(Duration::from_millis(100));
    }
    match last_err {
        Some(e) => bail!("{what}: not ready after {timeout:?}: {e:#}"),
        None => bail!("{what}: not ready after {timeout:?}"),
    }
}

/// Output of a finished command.
pub struct Output {
    pub ok: bool,
    pub status: String,
    pub text: String,
}

/// Runs a command to the end, stdout and stderr together.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("starting {cmd:?}"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(Output { ok: out.status.success(), status: out.status.to_string(), text })
}

/// Runs a command that must succeed; returns what it printed.
pub fn must(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = output(cmd)?;
    if !out.ok {
        bail!("{desc} failed ({}):\n{}", out.status, out.text.trim_end());
    }
    Ok(out.text)
}

/// First line of a text, for one-line reports.
pub fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim()
}
