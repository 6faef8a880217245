//! The agent under test: the real `twmon` binary, watching a namespace of the test's own (from
//! `testkit`, with the kernel's view from inside it), its /metrics parsed.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

#[allow(unused_imports)] // each test binary uses some
pub use testkit::{
    exposition::Metrics,
    http::get as http_get,
    netns::{Netns, counter_in, ss_in},
    process::Process,
};

/// Room for tens of thousands of sockets in one test process.
pub fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on our own process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0, "getrlimit");
        // Root may raise the hard limit too (some hosts and VMs start with 4096).
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max.max(1 << 20),
            rlim_max: lim.rlim_max.max(1 << 20),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            lim = raised;
        } else {
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
        }
    }
    assert!(
        lim.rlim_cur >= 20_000,
        "RLIMIT_NOFILE hard limit {} is too low for this test",
        lim.rlim_max
    );
}

/// A `[reconcile]` section for tests that read what reconciles produce (drift, breakdowns,
/// leaks, per-namespace counters): every second, and never spaced out for CPU, so that a slow
/// machine (a test VM in software emulation) only makes them slower, not later than the test
/// waits.
/// How long an agent may take to become healthy: loading and verifying the programs takes
/// seconds under software emulation (the VM matrix), more with many agents starting at once.
const START_TIMEOUT: Duration = Duration::from_secs(90);

pub const FAST_RECONCILE: &str = "[reconcile]\ninterval = \"1s\"\nmax_cpu = 1.0\n";

/// The real agent, watching one namespace.
pub struct Agent {
    process: Process,
    pub addr: SocketAddr,
}

impl Agent {
    pub fn start(ns: &Netns) -> Self {
        Self::start_with(ns, &[])
    }

    pub fn start_with(ns: &Netns, extra: &[&str]) -> Self {
        let mut args = vec!["--netns".to_string(), ns.path()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(&ns.name, &args)
    }

    /// An agent watching every namespace, with a configuration file of `config` (TOML).
    pub fn start_all(tag: &str, config: &str) -> Self {
        let path = std::env::temp_dir().join(format!("twmon-{tag}-{}.toml", std::process::id()));
        std::fs::write(&path, config).unwrap();
        Self::spawn(tag, &["--config.file".to_string(), path.display().to_string()])
    }

    /// Writes a configuration file for `--config.file` and returns its path.
    pub fn config_file(tag: &str, config: &str) -> String {
        let path = std::env::temp_dir().join(format!("twmon-{tag}-{}.toml", std::process::id()));
        std::fs::write(&path, config).unwrap();
        path.display().to_string()
    }

    /// Starts the agent on a port the kernel picks (no other test can take it meanwhile) and
    /// waits until it says where it listens and is healthy.
    fn spawn(tag: &str, args: &[String]) -> Self {
        let log = std::env::temp_dir().join(format!("twmon-{tag}-{}.log", std::process::id()));
        let mut process = Process::spawn(
            "twmon",
            Command::new(env!("CARGO_BIN_EXE_twmon"))
                .args(["--web.listen-address", "127.0.0.1:0", "--log.level", "debug"])
                .args(args),
            &log,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // Behind TLS (--web.config.file) plain HTTP gets no answer: listening is enough, the
        // caller speaks TLS.
        let tls = args.iter().any(|a| a == "--web.config.file");
        let addr = testkit::agent::wait_healthy(&mut process, START_TIMEOUT, tls)
            .unwrap_or_else(|e| panic!("{e}"));
        Self { process, addr }
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// The log once it contains `text`, or after `timeout`.
    pub fn wait_log(&self, timeout: Duration, text: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(text) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A plain HTTP/1.0 GET: status and body.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.addr, path)
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics").expect("scrape");
        assert_eq!(status, 200, "{body}");
        Metrics::parse(&body).unwrap_or_else(|e| panic!("the scrape: {e}\n{body}"))
    }

    /// Scrapes until `ok` holds or `timeout` passes; returns the last scrape either way so the
    /// caller's assertions report the numbers that differed.
    pub fn wait_for(&self, timeout: Duration, ok: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics();
            if ok(&m) || Instant::now() >= deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, and the exit status.
    pub fn stop(self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM)
    }

    /// Sends `sig` and does not wait.
    pub fn send(&self, sig: i32) {
        self.process.signal(sig);
    }

    /// Whether the agent is still running.
    pub fn alive(&mut self) -> bool {
        self.process.exited().unwrap().is_none()
    }

    /// Sends `sig` and returns the exit status.
    pub fn signal(mut self, sig: i32) -> std::process::ExitStatus {
        self.process.signal(sig);
        self.process.wait().unwrap()
    }

    /// The agent's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.process.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("the agent's /proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
    }

    /// Ids of the BPF programs the agent holds (from its file descriptors).
    pub fn program_ids(&self) -> Vec<u32> {
        self.bpf_ids("prog_id:")
    }

    /// Ids of the BPF maps the agent holds.
    pub fn map_ids(&self) -> Vec<u32> {
        self.bpf_ids("map_id:")
    }

    fn bpf_ids(&self, key: &str) -> Vec<u32> {
        let pid = self.process.pid();
        let mut ids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|info| {
                info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok())
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Whether the kernel still has a BPF program with this id.
pub fn program_exists(id: u32) -> bool {
    aya::programs::loaded_programs().any(|p| p.is_ok_and(|p| p.id() == id))
}
