//! The agent under test as a child process: start, scrape, read its CPU and memory, stop.
use std::{fs, net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use testkit::{exposition::Metrics, process::Process};

use super::{bpf, interrupted};

pub struct Agent {
    process: Process,
    pub addr: SocketAddr,
}

/// One GET (`testkit`): status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    Ok(testkit::http::get(addr, path)?)
}

impl Agent {
    /// Starts `twmon` on a loopback port the kernel picks and waits until /healthz says it is
    /// attached.
    pub fn start(bin: &Path, extra: &[&str], log_dir: &Path) -> Result<Self> {
        Self::start_with_env(bin, extra, &[], log_dir)
    }

    /// As [`Agent::start`], with extra environment variables.
    pub fn start_with_env(
        bin: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Result<Self> {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = log_dir.join(format!("twmon-{n}.log"));
        // Info, for the line that says where it listens; the agent logs little more at it.
        let mut process = Process::spawn(
            "twmon",
            Command::new(bin)
                .args(["--web.listen-address", "127.0.0.1:0", "--log.level", "info"])
                .args(extra)
                .envs(env.iter().copied()),
            &log,
        )?;
        if interrupted() {
            bail!("interrupted while twmon was starting");
        }
        let addr = testkit::agent::wait_healthy(&mut process, Duration::from_secs(60), false)?;
        Ok(Agent { process, addr })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Scrapes /metrics once.
    pub fn scrape(&self) -> Result<Scrape> {
        let (status, body) = http_get(self.addr, "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}: {body}");
        }
        Scrape::parse(&body)
    }

    /// utime and stime (/proc/PID/stat fields 14 and 15): all threads, living or not.
    pub fn cpu_ticks(&self) -> Result<CpuTicks> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        let after = stat.rsplit_once(')').context("malformed stat")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // After ")" the fields start at 3 (state): utime is field 14, stime 15.
        Ok(CpuTicks { user: f[11].parse()?, system: f[12].parse()? })
    }

    /// Memory of the process from /proc/PID/status, in KiB.
    pub fn memory(&self) -> Result<Memory> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        // Ring buffers the agent mmap()s are kernel memory, counted in its RSS as they are touched
        // (the data pages twice: the kernel maps them back to back for wrap-around reads).
        let smaps = fs::read_to_string(format!("/proc/{}/smaps", self.pid())).unwrap_or_default();
        let (mut in_map, mut maps) = (false, 0);
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                in_map = line.ends_with("anon_inode:bpf-map");
            } else if in_map && first == "Rss:" {
                maps +=
                    line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        Ok(Memory {
            bpf_maps: maps,
            rss: kib("VmRSS:"),
            hwm: kib("VmHWM:"),
            anon: kib("RssAnon:"),
            file: kib("RssFile:"),
        })
    }

    /// The agent's programs with the kernel's counters, by the (15-byte) kernel name.
    pub fn programs(&self) -> Vec<bpf::ProgInfo> {
        bpf::process_progs(self.pid())
    }

    /// Stops the agent (SIGSTOP): it reads nothing until [`Agent::resume`].
    pub fn pause(&self) {
        self.process.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.process.signal(libc::SIGCONT);
    }

    pub fn maps(&self) -> Vec<bpf::MapMemory> {
        bpf::process_maps(self.pid())
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s (and then dropped: stopped).
    pub fn stop(mut self) -> Result<()> {
        let status = self.process.stop()?;
        if status.code().is_none() {
            bail!("twmon did not exit within 10 s of SIGTERM ({status})");
        }
        Ok(())
    }
}

/// CPU time in clock ticks (USER_HZ).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

impl CpuTicks {
    pub fn since(self, before: CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }

    /// As percentages of one core over `secs` seconds.
    pub fn percent(self, secs: f64) -> CpuPercent {
        let p = |t: u64| t as f64 / ticks_per_second() / secs.max(1e-9) * 100.0;
        CpuPercent { user: p(self.user), system: p(self.system) }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuPercent {
    pub user: f64,
    pub system: f64,
}

impl CpuPercent {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::fmt::Display for CpuPercent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} % of one core (user {:.2}, system {:.2})",
            self.total(),
            self.user,
            self.system
        )
    }
}

/// Memory figures in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss: u64,
    pub hwm: u64,
    pub anon: u64,
    pub file: u64,
    /// Part of `rss` that is mmap()ed BPF maps (the ring buffer).
    pub bpf_maps: u64,
}

/// A scrape, parsed (`testkit`), and its size.
#[derive(Clone, Debug)]
pub struct Scrape {
    metrics: Metrics,
    pub bytes: usize,
}

impl Scrape {
    pub fn parse(body: &str) -> Result<Self> {
        Ok(Scrape { metrics: Metrics::parse(body).map_err(anyhow::Error::msg)?, bytes: body.len() })
    }

    /// Sum of the samples of `name` whose labels include every `key="value"` given; 0 when there
    /// is none (a counter whose label set has not happened yet).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics.sum(name, labels).unwrap_or(0.0)
    }

    pub fn series(&self) -> usize {
        self.metrics.len()
    }

    /// Whether any sample of `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.metrics.has(name)
    }

    /// A program's (run_time_ns, run_cnt) as the agent reports them (run time in seconds, or
    /// in nanoseconds as early versions of the agent did).
    pub fn program(&self, name: &str) -> bpf::RunStats {
        let labels = [("program", name)];
        let ns = if self.has("twmon_bpf_program_run_seconds_total") {
            self.get("twmon_bpf_program_run_seconds_total", &labels) * 1e9
        } else {
            self.get("twmon_bpf_program_run_nanoseconds_total", &labels)
        };
        bpf::RunStats {
            run_time_ns: ns.round() as u64,
            run_cnt: self.get("twmon_bpf_program_runs_total", &labels) as u64,
        }
    }

    /// The agent's own time for collecting the previous scrape, in milliseconds.
    pub fn collect_ms(&self) -> f64 {
        if self.has("twmon_scrape_collect_seconds") {
            self.get("twmon_scrape_collect_seconds", &[]) * 1e3
        } else {
            self.get("twmon_scrape_collect_nanoseconds", &[]) / 1e6
        }
    }

    /// Timewait sockets the agent follows now (its TIME_WAIT and FIN_WAIT2 gauges include them).
    pub fn timewait(&self) -> f64 {
        self.get("twmon_sockets", &[("state", "time_wait")])
            + self.get("twmon_sockets", &[("state", "fin_wait2")])
    }
}
