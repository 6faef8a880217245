//! Test harness for real-kernel tests: private network namespaces, the real `twmon` binary
//! watching only that namespace, its /metrics parsed, and the kernel's own view (`ss`,
//! /proc/net/sockstat) read from inside the namespace.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's own, with loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("twmon-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> String {
        sh(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: a valid namespace fd; affects only this thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// TCP sockets `ss` shows in a state (its names: TIME-WAIT, FIN-WAIT-2, CLOSE-WAIT ...), as
    /// (local, peer) address pairs.
    pub fn ss(&self, state: &str) -> Vec<(String, String)> {
        ss_in(&self.ss_all(), state)
    }

    /// Every TCP socket, as `ss -tanH` prints them. The full dump rather than `ss state X`: the
    /// kernel's sock_diag leaves timewait sockets out of a FIN-WAIT-2 query but reports the
    /// orphaned FIN_WAIT2 ones as FIN-WAIT-2 in a full dump.
    pub fn ss_all(&self) -> String {
        self.exec(&["ss", "-tanH"])
    }

    /// A counter of the kernel's own in this namespace: `group` is a line prefix of
    /// /proc/net/netstat (`TcpExt`) or /proc/net/snmp (`Tcp`), `key` a column of it.
    pub fn counter(&self, group: &str, key: &str) -> u64 {
        counter_in(&self.counters(), group, key)
    }

    /// /proc/net/netstat and /proc/net/snmp in one read, for [`counter_in`].
    pub fn counters(&self) -> String {
        self.exec(&["cat", "/proc/net/netstat", "/proc/net/snmp"])
    }

    /// The `tw` count of /proc/net/sockstat in this namespace.
    pub fn sockstat_tw(&self) -> u64 {
        let text = self.exec(&["cat", "/proc/net/sockstat"]);
        let line = text.lines().find(|l| l.starts_with("TCP:")).expect("TCP line in sockstat");
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words.iter().position(|w| *w == "tw").expect("tw in sockstat");
        words[i + 1].parse().expect("tw count")
    }
}

/// The sockets of an `ss -tanH` dump in `state`, as (local, peer) address pairs.
pub fn ss_in(dump: &str, state: &str) -> Vec<(String, String)> {
    dump.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 5 && w[0] == state).then(|| (w[3].to_string(), w[4].to_string()))
        })
        .collect()
}

/// A counter from the text of /proc/net/netstat and /proc/net/snmp: `group` is a line prefix
/// (`TcpExt`, `Tcp`), `key` a column of it.
pub fn counter_in(text: &str, group: &str, key: &str) -> u64 {
    let prefix = format!("{group}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(lines.len(), 2, "{group} in /proc/net/netstat or snmp");
    let (names, values) = (lines[0].split_whitespace(), lines[1].split_whitespace());
    let value = names.zip(values).find(|(n, _)| *n == key).map(|(_, v)| v);
    value.unwrap_or_else(|| panic!("{group} {key} in /proc/net/netstat or snmp")).parse().expect("a number")
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Room for tens of thousands of sockets in one test process.
pub fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on our own process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0, "getrlimit");
        // Root may raise the hard limit too (some hosts and VMs start with 4096).
        let raised = libc::rlimit { rlim_cur: lim.rlim_max.max(1 << 20), rlim_max: lim.rlim_max.max(1 << 20) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            lim = raised;
        } else {
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
        }
    }
    assert!(lim.rlim_cur >= 20_000, "RLIMIT_NOFILE hard limit {} is too low for this test", lim.rlim_max);
}

/// A `[reconcile]` section for tests that read what reconciles produce (drift, breakdowns,
/// leaks, per-namespace counters): every second, and never spaced out for CPU, so that a slow
/// machine (a test VM in software emulation) only makes them slower, not later than the test
/// waits.
/// How long an agent may take to become healthy: loading and verifying the programs takes
/// seconds under software emulation (the VM matrix), more with many agents starting at once.
const START_TIMEOUT: Duration = Duration::from_secs(90);

pub const FAST_RECONCILE: &str = "[reconcile]\ninterval = \"1s\"\nmax_cpu = 1.0\n";

/// The address in the agent's `serving /metrics address=...` log line.
fn listening_on(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("serving /metrics"))?;
    line.split_whitespace().find_map(|w| w.strip_prefix("address=")?.parse().ok())
}

/// The real agent, watching one namespace.
pub struct Agent {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: std::path::PathBuf,
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
        let child = Command::new(env!("CARGO_BIN_EXE_twmon"))
            .args(["--web.listen-address", "127.0.0.1:0", "--log.level", "debug"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start twmon");
        let mut agent = Self { child: Some(child), addr: SocketAddr::from(([127, 0, 0, 1], 0)), log };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if agent.addr.port() == 0
                && let Some(addr) = listening_on(&agent.log())
            {
                agent.addr = addr;
            }
            // Behind TLS (--web.config.file) plain HTTP gets no answer: listening is enough,
            // the caller speaks TLS.
            let tls = args.iter().any(|a| a == "--web.config.file");
            if agent.addr.port() != 0 && (tls || matches!(agent.get("/healthz"), Ok((200, _)))) {
                return agent;
            }
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("twmon exited with {status} before it was healthy:\n{}", agent.log());
            }
            assert!(Instant::now() < deadline, "twmon not healthy after {START_TIMEOUT:?}:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
        Metrics::parse(&body)
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
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.as_ref().unwrap().id() as i32, sig) };
    }

    /// Whether the agent is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Sends `sig` and returns the exit status.
    pub fn signal(mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().unwrap()
    }

    /// The agent's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().unwrap().id();
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
        let pid = self.child.as_ref().unwrap().id();
        let mut ids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|info| info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Whether the kernel still has a BPF program with this id.
pub fn program_exists(id: u32) -> bool {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    let attr = Attr { id, next_id: 0, open_flags: 0 };
    // SAFETY: attr is a valid bpf_attr prefix for this command, of the size given.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, &attr as *const Attr, size_of::<Attr>() as u32) };
    if fd >= 0 {
        // SAFETY: a descriptor the call above returned.
        unsafe { libc::close(fd as i32) };
    }
    fd >= 0
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {buf:?}"))
    })?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A parsed Prometheus text exposition: `name{sorted labels}` -> value.
#[derive(Debug, Clone)]
pub struct Metrics {
    samples: HashMap<String, f64>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let mut pairs: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
                    pairs.sort();
                    (n, pairs.join(","))
                }
                None => (series, String::new()),
            };
            samples.insert(format!("{name}{{{labels}}}"), value.parse::<f64>().expect("value"));
        }
        Self { samples, text: text.to_string() }
    }

    /// A sample's value; NaN when the series does not exist, so that a missing series fails
    /// every comparison (it is not 0) and a wait for a value keeps waiting.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(f64::NAN)
    }

    /// A sample's value; `None` when the series does not exist.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        pairs.sort();
        self.samples.get(&format!("{name}{{{}}}", pairs.join(","))).copied()
    }

    /// Every series of a metric: (labels as `k="v"` sorted and comma-joined, value).
    pub fn series(&self, name: &str) -> Vec<(String, f64)> {
        let prefix = format!("{name}{{");
        let mut v: Vec<(String, f64)> = self
            .samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k[prefix.len()..k.len() - 1].to_string(), *v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn sockets(&self, state: &str) -> f64 {
        self.get("twmon_sockets", &[("state", state)])
    }

    pub fn transitions(&self, from: &str, to: &str) -> f64 {
        self.get("twmon_state_transitions_total", &[("from", from), ("to", to)])
    }

    pub fn duration_count(&self, state: &str) -> f64 {
        self.get("twmon_state_duration_seconds_count", &[("state", state)])
    }

    pub fn duration_sum(&self, state: &str) -> f64 {
        self.get("twmon_state_duration_seconds_sum", &[("state", state)])
    }

    pub fn bucket(&self, state: &str, le: &str) -> f64 {
        self.get("twmon_state_duration_seconds_bucket", &[("state", state), ("le", le)])
    }

    /// What a failed comparison needs to be understood, for its message: every non-zero
    /// twmon series but histogram buckets, program run statistics and sysctls.
    pub fn explain(&self) -> String {
        self.text
            .lines()
            .filter(|l| {
                l.starts_with("twmon_")
                    && !l.contains("_bucket")
                    && !l.contains("bpf_program_run")
                    && !l.contains("sysctl")
                    && !l.ends_with(" 0")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every `twmon_state_transitions_total` series with a non-zero value, for messages.
    pub fn all_transitions(&self) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self
            .samples
            .iter()
            .filter(|(k, v)| k.starts_with("twmon_state_transitions_total{") && **v != 0.0)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}
