//! twmon: an eBPF monitor of how TCP connections end.
//!
//! Modules, one concern each: [`layout`] reads the running kernel's offsets, [`kernel`] loads
//! and attaches the programs and reads their maps, [`event`] decodes ring-buffer records,
//! [`tracker`] turns events into counters and histograms (no BPF in it), [`metrics`] holds the
//! registry, [`http`] has the routes and [`serve`] the listener they run under.
pub mod closers;
pub mod config;
pub mod diag;
pub mod event;
pub mod ground;
pub mod http;
pub mod kernel;
pub mod layout;
pub mod metrics;
pub mod netns;
pub mod netns_counters;
pub mod procfs;
pub mod serve;
pub mod tracker;
pub mod webconfig;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    closers::Closers,
    ground::NsView,
    kernel::Kernel,
    metrics::{GAUGE_STATES, Leak, Metrics},
    netns::Namespace,
    tracker::{Tracker, Tuple, state_name},
};

/// Everything the agent runs with; the CLI fills it in.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Inode of the only network namespace to watch, 0 for all.
    pub netns: u32,
    pub limits: kernel::Limits,
    pub sweep_interval: Duration,
    /// The namespace file given with --netns, if any.
    pub netns_path: Option<PathBuf>,
    pub settings: config::Config,
    /// The file `settings` came from, read again on SIGHUP.
    pub config_file: Option<PathBuf>,
    pub web: Web,
}

/// The HTTP side's settings (`--web.*`).
#[derive(Clone, Debug)]
pub struct Web {
    pub telemetry_path: String,
    pub max_requests: usize,
    pub limits: serve::Limits,
    /// `--web.config.file`: TLS, basic authentication, headers.
    pub config: webconfig::WebConfig,
}

/// What `/api/v1/snapshot` returns besides the live socket counts: the last reconcile.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub reconciled_unix_seconds: f64,
    pub drift: BTreeMap<&'static str, i64>,
    pub ports: Vec<PortJson>,
    pub pressure: Vec<PressureJson>,
    pub namespaces: Vec<NamespaceJson>,
    pub leaks: Vec<Leak>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PortJson {
    pub side: &'static str,
    pub port: String,
    pub role: &'static str,
    pub state: &'static str,
    pub sockets: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PressureJson {
    pub netns: String,
    pub destination: String,
    pub sockets: u64,
    pub ratio: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NamespaceJson {
    pub netns: String,
    pub state: &'static str,
    pub sockets: u64,
}

/// The running agent, shared by the event loop, the timers and the HTTP handlers.
pub struct Agent {
    /// Lock order: `ring`, then `tracker`; `kernel` is never held with either.
    ring: Mutex<RingBuf<MapData>>,
    kernel: Mutex<Kernel>,
    tracker: Mutex<Tracker>,
    metrics: Metrics,
    /// When the ring buffer was last drained (CLOCK_MONOTONIC ns).
    last_drain: AtomicU64,
    config: Config,
    report: Mutex<Report>,
    /// Leaked CLOSE_WAIT sockets already logged.
    logged: Mutex<HashSet<Tuple>>,
    /// Whether the agent said it cannot read every network namespace.
    warned_unreadable: std::sync::atomic::AtomicBool,
    /// Records lost to a full ring buffer, as of the last reconcile.
    lost_seen: AtomicU64,
    /// Tracepoints with programs attached (fixed after start-up; read by /healthz without a lock).
    attached: AtomicUsize,
    /// `config.settings`, as reloaded on SIGHUP.
    settings: RwLock<Arc<config::Config>>,
    /// The namespaces the last reconcile read and watches. TcpExt and sysctls are read from them
    /// at each scrape, and they are checked every sweep interval, so that a deleted one's other
    /// series go within seconds.
    namespaces_read: netns_counters::Watched,
    /// Closes by process, read from the kernel at each scrape and snapshot.
    closers: Arc<Closers>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often the agent drains the ring buffer between scrapes (a scrape drains it too).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Returns freed heap to the system: start-up (BTF parsing, the first sock_diag dump) and each
/// reconcile allocate far more than the agent keeps.
/// Keeps freed heap from piling up: the reconcile reads the kernel's whole socket table (over
/// 100000 sockets on a busy host) every few seconds, and with glibc's default, self-raising
/// thresholds the freed buffers stayed in the process (measured: 33.4 MiB RSS with 131072
/// timewait sockets, 14.8 MiB when glibc returns them). Fixed thresholds: large buffers are
/// mapped and unmapped on their own, and more than 1 MiB free at the top of the heap is given back.
pub fn bound_heap() {
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

fn trim() {
    // SAFETY: glibc's malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// CPU time (user + system) of the whole agent so far.
fn process_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether the agent runs as root (effective uid 0).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

impl Agent {
    /// Collects and encodes the metrics for one scrape.
    pub fn render(&self) -> anyhow::Result<String> {
        let start = Instant::now();
        // Every event committed before the scrape is counted in it.
        self.drain();
        let (seeded, decided) = {
            let tracker = lock(&self.tracker);
            (tracker.seeded(), tracker.decided().clone())
        };
        {
            let kernel = lock(&self.kernel);
            // Sweep first, so an orphaned FIN_WAIT2 that got its FIN counts as TIME_WAIT, as ss
            // shows it: every scrape equals the kernel's view.
            if let Err(e) = kernel.run_sweep(false) {
                tracing::warn!("timewait sweep failed: {e}");
            }
            self.metrics.refresh(&kernel.read(), &decided, &seeded, kernel.attached, &kernel.program_stats());
        }
        self.metrics.scrape_seconds.set(start.elapsed().as_secs_f64());
        let mut out = String::new();
        prometheus::TextEncoder::new().encode_utf8(&self.metrics.registry.gather(), &mut out)?;
        Ok(out)
    }

    /// The configuration file's settings now in force.
    fn settings(&self) -> Arc<config::Config> {
        self.settings.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads `--config.file` again (SIGHUP). A file that does not parse leaves the running
    /// configuration as it is, and says why.
    pub fn reload(&self) {
        let Some(path) = &self.config.config_file else {
            tracing::info!("SIGHUP: no --config.file to reload");
            return;
        };
        match config::Config::load(path) {
            Ok(new) => {
                *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
                self.metrics.reloads.with_label_values(&["success"]).inc();
                tracing::info!(file = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                tracing::error!("configuration not reloaded, the previous one stays: {e}");
            }
        }
    }

    pub fn health(&self) -> Result<(), String> {
        let attached = self.attached.load(Ordering::Relaxed);
        if attached != kernel::TRACEPOINTS.len() {
            return Err(format!("{attached} of {} kernel programs attached", kernel::TRACEPOINTS.len()));
        }
        let idle = monotonic_ns().saturating_sub(self.last_drain.load(Ordering::Relaxed));
        if idle > 5_000_000_000 {
            return Err(format!("events not drained for {} s", idle / 1_000_000_000));
        }
        Ok(())
    }

    /// The network namespaces the kernel programs watch (the --netns one, or all reachable),
    /// and how many processes' namespaces could not be seen.
    pub fn namespaces(&self) -> (Vec<Namespace>, usize) {
        let (all, hidden) = netns::discover_counting_hidden();
        let found = match &self.config.netns_path {
            None => return (all, hidden),
            Some(path) => {
                let mut found: Vec<Namespace> = all.into_iter().filter(|n| n.inode == self.config.netns).collect();
                if found.is_empty() {
                    found.push(Namespace {
                        inode: self.config.netns,
                        path: path.clone(),
                        name: format!("inode/{}", self.config.netns),
                        pid: None,
                    });
                }
                found.truncate(1);
                found
            }
        };
        (found, 0)
    }

    /// The kernel's own view of every namespace the agent can read. What it cannot read is
    /// exported (`twmon_netns_unreadable`) and said once, with what to grant.
    fn read_ground(&self) -> Vec<NsView> {
        let (namespaces, hidden) = self.namespaces();
        let mut denied = 0;
        let views = ground::read(&namespaces, &mut denied);
        let read: HashSet<u32> = views.iter().map(|v| v.inode).collect();
        let settings = self.settings();
        *lock(&self.namespaces_read) =
            namespaces.into_iter().filter(|n| read.contains(&n.inode) && settings.watches(n.inode, &n.name)).collect();
        self.metrics.set_unreadable(denied, hidden);
        if (denied > 0 || hidden > 0) && !self.warned_unreadable.swap(true, Ordering::Relaxed) {
            // Root that still cannot read them runs in a sandbox: capabilities are not the cure.
            let cure = if is_root() {
                "twmon runs as root but in a sandbox that hides them (a container without the \
                 host's PID namespace, a systemd unit with ProtectProc= or PrivatePIDs=, a user \
                 namespace): run it in the host's PID namespace (hostPID: true in Kubernetes)"
            } else {
                "entering a namespace needs CAP_SYS_ADMIN, seeing another user's process's \
                 namespace CAP_SYS_PTRACE (or run twmon as root)"
            };
            tracing::warn!(
                namespaces_not_entered = denied,
                processes_not_seen = hidden,
                "cannot read every network namespace: per-namespace counts, breakdowns, leaks and \
                 seeding cover only those read, and twmon_reconcile_drift counts the sockets of \
                 the others; {cure}"
            );
        }
        views
    }

    /// Seeds the agent with the sockets already in teardown states, from the kernel's own view.
    /// Called once, right after the programs are attached.
    fn seed(&self) -> usize {
        lock(&self.tracker).begin_seed();
        // Before the reading: this plus a timer's time left is at or before its end.
        let at = monotonic_ns();
        let views = self.read_ground();
        // Events since the programs were attached: those connections are followed already.
        self.drain();
        let (n, timewait) = {
            let mut tracker = lock(&self.tracker);
            let n = tracker.seed(ground::seeds(&views), at);
            (n, tracker.seeded_timewait())
        };
        let mut kernel = lock(&self.kernel);
        kernel.set_seeded(timewait);
        // From here on the programs report only what the agent decides on.
        kernel.set_report_all(false);
        n
    }

    /// Compares with the kernel's own view and refreshes what comes from it. Returns how long
    /// it took.
    pub fn reconcile(&self) -> Duration {
        let start = Instant::now();
        let cpu_start = process_cpu();
        let views = self.read_ground();
        let totals = ground::totals(&views);
        // A seeded socket missing from `views` ended before the reading, and the kernel program
        // wrote its end (say, an expiry) before the kernel unhashed it: drain first, so that end
        // is counted before the socket is let go of as gone.
        self.drain();
        let (seeded, timewait) = {
            let mut tracker = lock(&self.tracker);
            if tracker.seeded().iter().any(|n| *n > 0) {
                tracker.reconcile_seed(&ground::teardown(&views));
            }
            (tracker.seeded(), tracker.seeded_timewait())
        };
        let readout = {
            let mut kernel = lock(&self.kernel);
            kernel.set_seeded(timewait);
            // The sweep first, so orphaned FIN_WAIT2 sockets that got their FIN count as TIME_WAIT,
            // and every timewait entry whose socket is gone (one whose end no program saw) is
            // ended. Checking every entry is one program run where the kernel walks maps itself;
            // where the agent walks them (a run per entry), only when the counts are above the
            // kernel's, as such entries make them.
            let all = kernel.walks_in_kernel();
            let _ = kernel.run_sweep(all);
            let readout = kernel.read();
            let above = |s: u8| readout.sockets[s as usize] + seeded[s as usize] > totals[s as usize];
            if !all && (above(monitor_common::tcp::TIME_WAIT) || above(monitor_common::tcp::FIN_WAIT2)) {
                let _ = kernel.run_sweep(true);
                kernel.read()
            } else {
                readout
            }
        };
        self.note_lost(readout.counter(monitor_common::counter::EVENTS_LOST));
        let mut drift = [0i64; monitor_common::tcp::MAX_STATES as usize];
        for s in GAUGE_STATES {
            let s = s as usize;
            drift[s] = readout.sockets[s] + seeded[s] - totals[s];
        }
        let watched: Vec<NsView> = views.into_iter().filter(|v| self.settings().watches(v.inode, &v.name)).collect();
        let b = ground::breakdown(&watched, &self.settings());
        let leaks = self.leaks(&watched);
        let took = start.elapsed();
        self.metrics.refresh_ground(&drift, &b, &leaks, took, process_cpu().saturating_sub(cpu_start));
        trim();
        let mut report = lock(&self.report);
        *report = Report {
            reconciled_unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            drift: GAUGE_STATES.iter().map(|s| (state_name(*s), drift[*s as usize])).collect(),
            ports: b
                .ports
                .iter()
                .map(|r| PortJson {
                    side: r.side.label(),
                    port: r.port.clone(),
                    role: ground::role(r.state),
                    state: state_name(r.state),
                    sockets: r.sockets,
                })
                .collect(),
            pressure: b
                .pressure
                .iter()
                .map(|p| PressureJson {
                    netns: p.netns.clone(),
                    destination: p.destination.to_string(),
                    sockets: p.sockets,
                    ratio: p.ratio,
                })
                .collect(),
            namespaces: b
                .namespaces
                .iter()
                .map(|(n, s, c)| NamespaceJson { netns: n.clone(), state: state_name(*s), sockets: *c })
                .collect(),
            leaks,
        };
        took
    }

    /// CLOSE_WAIT sockets older than the threshold, attributed to the processes that hold them.
    fn leaks(&self, views: &[NsView]) -> Vec<Leak> {
        let settings = self.settings();
        let cfg = &settings.close_wait;
        let now = monotonic_ns();
        let before = now.saturating_sub(cfg.leak_threshold.as_nanos() as u64);
        // The kernel programs know when each socket entered CLOSE_WAIT; ask for the old ones.
        self.drain();
        lock(&self.tracker).begin_close_wait_scan();
        if let Err(e) = lock(&self.kernel).scan_close_wait(before) {
            // What was logged stays logged: nothing is known about those sockets this time.
            tracing::warn!("CLOSE_WAIT scan failed: {e}");
            return Vec::new();
        }
        self.drain();
        let old = lock(&self.tracker).close_wait_older_than(before);
        // A leak is logged and counted once for as long as the kernel programs see the socket in
        // CLOSE_WAIT, even when a reconcile's sock_diag view misses it.
        let mut logged = lock(&self.logged);
        let still: HashSet<Tuple> = old.iter().map(|(t, _)| *t).collect();
        logged.retain(|t| still.contains(t));
        if old.is_empty() {
            return Vec::new();
        }
        let mut sockets: HashMap<Tuple, (u64, &str)> = HashMap::new();
        for v in views {
            for s in v.sockets.iter().filter(|s| s.state == monitor_common::tcp::CLOSE_WAIT && s.inode != 0) {
                sockets.insert(Tuple::new(v.inode, s.local, s.remote), (s.inode as u64, v.name.as_str()));
            }
        }
        let inodes: HashSet<u64> = old.iter().filter_map(|(t, _)| sockets.get(t).map(|(i, _)| *i)).collect();
        let owners = procfs::socket_owners(&inodes);
        let mut by_process: BTreeMap<(String, i32, String), Leak> = BTreeMap::new();
        for (t, since) in old {
            let Some((inode, ns)) = sockets.get(&t) else { continue };
            let age = now.saturating_sub(since) as f64 / 1e9;
            for (pid, comm) in owners.get(inode).into_iter().flatten() {
                let leak = by_process.entry((ns.to_string(), *pid, comm.clone())).or_insert_with(|| Leak {
                    netns: ns.to_string(),
                    pid: *pid,
                    comm: comm.clone(),
                    sockets: 0,
                    oldest_seconds: 0.0,
                    examples: Vec::new(),
                });
                leak.sockets += 1;
                leak.oldest_seconds = leak.oldest_seconds.max(age);
                if leak.examples.len() < 3 {
                    leak.examples.push(format!("{} <- {}", t.local_addr(), t.remote_addr()));
                }
                if logged.insert(t) {
                    self.metrics.leaks_total.inc();
                    tracing::warn!(
                        pid, comm = %comm, netns = %ns, local = %t.local_addr(), remote = %t.remote_addr(),
                        seconds = age.round(),
                        "CLOSE_WAIT leak: the peer closed, this process has not called close()"
                    );
                }
            }
        }
        let mut leaks: Vec<Leak> = by_process.into_values().collect();
        leaks.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.pid.cmp(&b.pid)));
        leaks.truncate(cfg.top_k);
        leaks
    }

    /// JSON for `/api/v1/snapshot`: live socket counts and the last reconcile.
    pub fn snapshot(&self) -> serde_json::Value {
        let seeded = lock(&self.tracker).seeded();
        let readout = {
            let kernel = lock(&self.kernel);
            let _ = kernel.run_sweep(false);
            kernel.read()
        };
        let sockets: BTreeMap<&str, i64> =
            GAUGE_STATES.iter().map(|s| (state_name(*s), readout.sockets[*s as usize] + seeded[*s as usize])).collect();
        let report = lock(&self.report).clone();
        serde_json::json!({ "sockets": sockets, "reconcile": report, "closers": self.closers.rows() })
    }

    /// Removes the series of namespaces deleted since the last reconcile: one stat of a file
    /// that opened each (/run/netns/NAME, or /proc/PID/ns/net of a process in it). A namespace
    /// whose process exited while others still hold it is dropped until the next reconcile
    /// finds it again.
    fn forget_gone_namespaces(&self) {
        use std::os::unix::fs::MetadataExt as _;
        let mut read = lock(&self.namespaces_read);
        let (gone, alive): (Vec<_>, Vec<_>) =
            read.drain(..).partition(|n| !std::fs::metadata(&n.path).is_ok_and(|m| m.ino() as u32 == n.inode));
        *read = alive;
        drop(read);
        for n in gone {
            tracing::debug!(netns = %n.name, "network namespace gone: its series are removed");
            self.metrics.forget_netns(&n.name);
        }
    }

    /// Logs records lost since the last call (`lost` is the kernel's running count).
    fn note_lost(&self, lost: u64) {
        let before = self.lost_seen.swap(lost, Ordering::Relaxed);
        if lost > before {
            tracing::warn!(
                lost = lost - before,
                "kernel records lost: the ring buffer was full (early timewait ends among them are \
                 not counted); raise --bpf.ring-buffer-size"
            );
        }
    }

    /// Takes every record off the ring buffer into the tracker, then settles cancelled timewait
    /// timers that no re-arm followed.
    fn drain(&self) {
        let mut ring = lock(&self.ring);
        self.last_drain.store(monotonic_ns(), Ordering::Relaxed);
        let mut tracker = lock(&self.tracker);
        while let Some(item) = ring.next() {
            match event::decode(&item) {
                Ok(ev) => tracker.apply(&ev),
                Err(e) => {
                    self.metrics.events_invalid.inc();
                    tracing::debug!("dropping record: {e}");
                }
            }
        }
        // Safe: the re-arm that would follow a cancel is on the ring already, and was just read.
        tracker.settle(monotonic_ns());
    }
}

/// How long to wait before the next reconcile: the configured interval, stretched so that
/// reconciling takes at most `max_cpu` of a core on average (at the default 1 %, a 200 ms
/// reconcile waits 19.8 s). A reconcile reads every socket of every namespace through sock_diag,
/// whose cost grows with the sockets the host holds (the kernel walks its whole connection table
/// once per namespace), not with the connections it churns.
pub fn reconcile_wait(interval: Duration, took: Duration, max_cpu: f64) -> Duration {
    let stretched = took.div_f64(max_cpu).saturating_sub(took);
    if stretched > interval {
        tracing::debug!(?took, wait = ?stretched, max_cpu, "reconcile is slow; waiting longer to stay within reconcile.max_cpu");
    }
    interval.max(stretched)
}

/// `--config.check`: the flags and the configuration file were read already; this loads and
/// attaches the kernel programs, detaches them and says what it found.
pub fn check(config: &Config) -> anyhow::Result<()> {
    let (kernel, _ring, _logger) = Kernel::load(config.netns, &config.limits)?;
    println!(
        "twmon: configuration and kernel ok: {} of {} tracepoints attached (HZ {}, kernel {}){}",
        kernel.attached,
        kernel::TRACEPOINTS.len(),
        kernel.hz,
        kernel_release(),
        config.config_file.as_ref().map(|p| format!(", {} read", p.display())).unwrap_or_default()
    );
    if kernel.attached != kernel::TRACEPOINTS.len() {
        anyhow::bail!("not every kernel program attached");
    }
    Ok(())
}

/// Runs the agent until SIGINT or SIGTERM, then detaches everything.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Signals first: from here on SIGHUP reloads rather than kills (its default), and SIGINT or
    // SIGTERM stop the agent through its shutdown.
    let mut hangup = signal(SignalKind::hangup())?;
    let stop = shutdown()?;
    // Bind first: a busy port should fail before anything is attached to the kernel.
    let mut bound = tokio::net::TcpListener::bind(config.listen).await;
    if let Err(e) = &bound
        && config.listen.ip() == std::net::Ipv6Addr::UNSPECIFIED
        && e.raw_os_error() == Some(libc::EAFNOSUPPORT)
    {
        bound = tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, config.listen.port())).await;
    }
    let listener = bound.map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => "the port is taken: is another twmon or exporter using it?",
            Some(libc::EADDRNOTAVAIL) => "that address is not one of this host's: give one it has, or :PORT for all",
            Some(libc::EACCES) => "ports below 1024 need CAP_NET_BIND_SERVICE",
            _ => "",
        };
        anyhow::anyhow!("cannot listen on {}: {e}; {why} (--web.listen-address)", config.listen)
    })?;
    let (mut kernel, ring, logger) = Kernel::load(config.netns, &config.limits)?;
    let namespaces_read = netns_counters::Watched::default();
    let closers_map = kernel.take_closers().ok_or_else(|| anyhow::anyhow!("the closers map was taken already"))?;
    let closers = Arc::new(Closers::new(closers_map, namespaces_read.clone(), config.settings.breakdown.top_k)?);
    let metrics = Metrics::new(&kernel_release(), kernel.hz, namespaces_read.clone())?;
    metrics.registry.register(Box::new(closers::Registered(closers.clone())))?;
    let tracker = Tracker::new(&metrics.registry)?;
    tracing::info!(programs = kernel.attached, hz = kernel.hz, netns = config.netns, "kernel programs attached");
    let attached = kernel.attached;
    let agent = Arc::new(Agent {
        ring: Mutex::new(ring),
        kernel: Mutex::new(kernel),
        tracker: Mutex::new(tracker),
        metrics,
        last_drain: AtomicU64::new(monotonic_ns()),
        config: config.clone(),
        report: Mutex::new(Report::default()),
        logged: Mutex::new(HashSet::new()),
        warned_unreadable: Default::default(),
        lost_seen: AtomicU64::new(0),
        attached: AtomicUsize::new(attached),
        settings: RwLock::new(Arc::new(config.settings.clone())),
        namespaces_read,
        closers,
    });
    let seeded = agent.seed();
    trim();
    tracing::info!(sockets = seeded, "seeded sockets already in teardown states from sock_diag");
    agent.reconcile();

    let mut tasks = tokio::task::JoinSet::new();
    let a = agent.clone();
    let sweep_every = config.sweep_interval;
    tasks.spawn(async move {
        // The kernel programs write without waking us (see monitor-ebpf): drain on a timer.
        let mut tick = tokio::time::interval(DRAIN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep = Instant::now();
        loop {
            tick.tick().await;
            a.drain();
            if last_sweep.elapsed() >= sweep_every {
                last_sweep = Instant::now();
                let lost = {
                    let kernel = lock(&a.kernel);
                    if let Err(e) = kernel.run_sweep(false) {
                        tracing::warn!("timewait sweep failed: {e}");
                    }
                    kernel.counter(monitor_common::counter::EVENTS_LOST)
                };
                // Said within a sweep interval, not at the next reconcile (which may be minutes
                // away on a busy host).
                a.note_lost(lost);
                a.forget_gone_namespaces();
                trim();
            }
        }
    });
    if let Some(logger) = logger {
        tasks.spawn(async move {
            #[allow(deprecated)]
            let Ok(mut fd) = AsyncFd::new(logger) else { return };
            while let Ok(mut guard) = fd.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    let a = agent.clone();
    tasks.spawn(async move {
        let mut wait = a.settings().reconcile.interval;
        loop {
            tokio::time::sleep(wait).await;
            let r = a.clone();
            let took = tokio::task::spawn_blocking(move || r.reconcile()).await;
            // Read each time: a reload may have changed them.
            let s = a.settings();
            match took {
                Ok(took) => wait = reconcile_wait(s.reconcile.interval, took, s.reconcile.max_cpu),
                Err(e) => tracing::warn!("reconcile failed: {e}"),
            }
        }
    });
    let a = agent.clone();
    tasks.spawn(async move {
        while hangup.recv().await.is_some() {
            a.reload();
        }
    });

    // The address bound, not the one asked for: with port 0 the kernel picks it.
    let address = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(
        %address,
        path = %config.web.telemetry_path,
        tls = config.web.config.tls.is_some(),
        basic_auth = !config.web.config.users.is_empty(),
        "serving /metrics"
    );
    let app = http::router(agent.clone(), &config.web);
    serve::serve(listener, app, config.web.limits, config.web.config.tls.clone(), agent.clone(), stop).await;
    tasks.shutdown().await;
    drop(agent);
    tracing::info!("kernel programs detached; exiting");
    Ok(())
}

/// Completes at the first SIGINT or SIGTERM.
fn shutdown() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

impl serve::Counters for Agent {
    fn refused(&self) {
        self.metrics.http_refused.with_label_values(&["connections"]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_reconciles_wait_longer() {
        let s = Duration::from_secs;
        assert_eq!(reconcile_wait(s(10), Duration::from_millis(20), 0.01), s(10));
        assert_eq!(reconcile_wait(s(10), Duration::from_millis(200), 0.01), Duration::from_millis(19_800));
        assert_eq!(reconcile_wait(s(60), Duration::from_millis(200), 0.01), s(60));
        assert_eq!(reconcile_wait(s(1), Duration::from_millis(1500), 0.5), Duration::from_millis(1500));
    }
}
