//! The kernel side: loading and attaching the programs, and reading what they keep in the
//! kernel. [`layout`] finds the running kernel's offsets in its BTF, [`event`] decodes the
//! records the programs write to the ring buffer.
//!
//! Over 400 lines on purpose: loading, attaching, calibrating and every read of the programs'
//! maps share one `Ebpf` object and its error handling; split, each part would reach into the
//! others' maps.
pub mod event;
pub mod layout;

use std::{
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, ProgramFd, RawTracePoint, RawTracePointRunOptions, TestRun},
};
use monitor_common::{
    ClockSample, KernelLayout, Lifecycle, Settings, SockEntry, counter, sweep, tcp, twin,
};

use crate::export::closers::ClosersMaps;
use layout::LayoutError;

/// The kernel object built by `build.rs` from `monitor-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

pub use layout::TRACEPOINTS;
/// The programs the agent runs itself (BPF_PROG_TEST_RUN): the sweep and the CLOSE_WAIT scan
/// walk their map in one run where the kernel has `bpf_for_each_map_elem` (5.13+); before
/// that, the agent walks the map and runs the `_one` variant per entry.
const SWEEP: &str = "twmon_sweep";
const SWEEP_ALL: &str = "twmon_sweep_all";
const SWEEP_ONE: &str = "twmon_sweep_one";
const CLOSE_WAIT_SCAN: &str = "twmon_close_wait";
const CLOSE_WAIT_ONE: &str = "twmon_close_wait_one";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(
        "twmon lacks {}: it needs root, or CAP_BPF (maps and programs), CAP_PERFMON (tracing \
         programs) and CAP_SYSLOG (kernel addresses); run it with sudo, or grant them \
         (AmbientCapabilities= in a systemd unit, securityContext.capabilities.add in Kubernetes)",
        .0.join(", ")
    )]
    Capabilities(Vec<&'static str>),
    #[error(
        "the kernel refused to load the programs although twmon holds CAP_BPF, CAP_PERFMON and \
         CAP_SYSLOG: {0}\n  kernel lockdown (/sys/kernel/security/lockdown) or a security module \
         (SELinux, AppArmor, a BPF LSM) forbids it; see the kernel log (dmesg)"
    )]
    Permission(String),
    #[error("loading the kernel programs failed: {0:#}")]
    Load(#[source] anyhow::Error),
    #[error(
        "attaching {0} to BTF tracepoint {1} failed: {2}\n  twmon needs BTF tracepoints \
         (BPF_PROG_TYPE_TRACING, Linux 5.5 or newer, CONFIG_DEBUG_INFO_BTF=y)"
    )]
    Attach(String, String, String),
}

/// Forwards the kernel programs' log records; kept alive as long as the programs.
pub type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Sizes of the kernel maps.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_sockets: u32,
    pub max_timewait: u32,
    pub ring_buffer_bytes: u32,
}

/// The loaded, attached programs and the maps the agent reads at scrape time.
pub struct Kernel {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    gauges: PerCpuArray<MapData, i64>,
    lifecycle: PerCpuArray<MapData, Lifecycle>,
    /// Whether the sweep and the scan walk their maps in the kernel (`bpf_for_each_map_elem`).
    walk_in_kernel: bool,
    settings_map: Array<MapData, Settings>,
    settings: Settings,
    /// Until the agent takes it for its collector.
    closers: Option<ClosersMaps>,
    /// The trace ring buffer, until the agent takes it (written only while someone traces).
    trace: Option<RingBuf<MapData>>,
    pub hz: u32,
    pub attached: usize,
}

/// Kernel-side numbers read at one moment.
#[derive(Debug, Default, Clone)]
pub struct Readout {
    /// Sockets in each state (indexed by kernel state number).
    pub sockets: [i64; tcp::MAX_STATES as usize],
    pub counters: Vec<u64>,
    /// Transitions and state durations counted by the kernel programs, summed over CPUs.
    pub lifecycle: Lifecycle,
}

impl Readout {
    pub fn counter(&self, idx: u32) -> u64 {
        self.counters.get(idx as usize).copied().unwrap_or(0)
    }
}

/// Per-program statistics from the kernel. Run counts and times are non-zero only while
/// kernel.bpf_stats_enabled=1; missed runs are always counted.
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time: Duration,
    /// Times the kernel skipped the program because it was already running on that CPU (a
    /// tracepoint hit inside an interrupt that came while the program ran) and its twin did
    /// not handle: lost events.
    pub missed: u64,
    /// Nested events the program's twin handled, for programs that have one.
    pub nested: Option<u64>,
}

/// The capabilities the programs need that `cap_eff` (CapEff of /proc/self/status) lacks.
/// CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as on kernels before 5.8.
pub fn missing_capabilities(cap_eff: u64) -> Vec<&'static str> {
    const SYSLOG: u32 = 34;
    const PERFMON: u32 = 38;
    const BPF: u32 = 39;
    const SYS_ADMIN: u32 = 21;
    let has = |c: u32| cap_eff & (1 << c) != 0;
    let mut missing = Vec::new();
    if !has(BPF) && !has(SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(PERFMON) && !has(SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(SYSLOG) {
        missing.push("CAP_SYSLOG");
    }
    missing
}

/// Fails, naming them, when this process lacks capabilities the programs need.
fn check_capabilities() -> Result<(), KernelError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    match eff.map(missing_capabilities) {
        Some(missing) if !missing.is_empty() => Err(KernelError::Capabilities(missing)),
        // Unreadable: let loading say what is wrong.
        _ => Ok(()),
    }
}

/// EPERM anywhere in the error chain: with the capabilities checked, the kernel's policy.
/// (EACCES is the verifier rejecting a program, a load error with its log.)
fn is_permission(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Kernel {
    /// Loads, calibrates and attaches everything. On error nothing stays attached.
    pub fn load(
        netns_only: u32,
        limits: &Limits,
    ) -> Result<(Self, RingBuf<MapData>, Option<Logger>), KernelError> {
        check_capabilities()?;
        raise_memlock();
        let (layout, features): (KernelLayout, _) = layout::read(netns_only)?;
        tracing::debug!(?layout, ?features, "kernel layout");
        let walk_in_kernel = features.for_each_map_elem;
        if !walk_in_kernel {
            tracing::info!(
                "this kernel has no bpf_for_each_map_elem (5.13+): the agent walks the orphan and \
                 socket maps itself for the sweep and the CLOSE_WAIT scan (one program run per \
                 entry)"
            );
        }
        // Parsed once, for the loader's relocations and for loading each program (the loader
        // would parse its own otherwise). The layout above comes from btf-rs, which looks up
        // members and enumerators by name.
        let btf = aya::Btf::from_sys_fs().map_err(|e| {
            KernelError::Layout(LayoutError::Btf(layout::BTF_PATH.into(), e.to_string()))
        })?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("LAYOUT", &layout, true)
            .map_max_entries("SOCKS", limits.max_sockets)
            .map_max_entries("TIMEWAIT", limits.max_timewait)
            .map_max_entries("EVENTS", limits.ring_buffer_bytes)
            .load(OBJECT)
            .map_err(|e| {
                if is_permission(&e) {
                    KernelError::Permission(e.to_string())
                } else {
                    KernelError::Load(e.into())
                }
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("kernel-side logging unavailable: {e}");
                None
            }
        };
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| KernelError::Load(anyhow::anyhow!("map {name} missing")))
        };
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)
            .map_err(|e| KernelError::Load(e.into()))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)
            .map_err(|e| KernelError::Load(e.into()))?;
        let gauges = PerCpuArray::try_from(take(&mut ebpf, "GAUGES")?)
            .map_err(|e| KernelError::Load(e.into()))?;
        let lifecycle = PerCpuArray::try_from(take(&mut ebpf, "LIFECYCLE")?)
            .map_err(|e| KernelError::Load(e.into()))?;
        let settings_map = Array::try_from(take(&mut ebpf, "SETTINGS")?)
            .map_err(|e| KernelError::Load(e.into()))?;
        let closers = ClosersMaps {
            closes: HashMap::try_from(take(&mut ebpf, "CLOSERS")?)
                .map_err(|e| KernelError::Load(e.into()))?,
            held: PerCpuArray::try_from(take(&mut ebpf, "TIMEWAIT_HELD")?)
                .map_err(|e| KernelError::Load(e.into()))?,
        };
        let trace = RingBuf::try_from(take(&mut ebpf, "TRACE")?)
            .map_err(|e| KernelError::Load(e.into()))?;

        let own: &[&str] = if walk_in_kernel {
            &[SWEEP, SWEEP_ALL, CLOSE_WAIT_SCAN]
        } else {
            &[SWEEP_ONE, CLOSE_WAIT_ONE]
        };
        for name in own {
            load_test_run(&mut ebpf, name)?;
        }

        let mut kernel = Kernel {
            ebpf,
            counters,
            gauges,
            lifecycle,
            walk_in_kernel,
            settings_map,
            settings: Settings {
                // Half the ring buffer, so that a scan leaves room for everything else.
                scan_limit: limits.ring_buffer_bytes as u64
                    / 2
                    / (std::mem::size_of::<monitor_common::Event>() as u64 + 8),
                ..Settings::default()
            },
            closers: Some(closers),
            trace: Some(trace),
            hz: 0,
            attached: 0,
        };
        kernel.calibrate()?;
        for (name, tp, _, _) in TRACEPOINTS {
            // A program's twin goes right after it: the kernel runs a tracepoint's programs in
            // the order they were attached.
            let twin = twin::PROGRAMS.iter().find(|(p, _)| p == name).map(|(_, t)| *t);
            for name in std::iter::once(*name).chain(twin) {
                let prog: &mut BtfTracePoint = kernel
                    .ebpf
                    .program_mut(name)
                    .ok_or_else(|| KernelError::Load(anyhow::anyhow!("program {name} missing")))?
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| KernelError::Load(e.into()))?;
                prog.load(tp, &btf).map_err(|e| load_error(name, e))?;
                prog.attach().map_err(|e| {
                    KernelError::Attach(name.to_string(), tp.to_string(), format!("{e:#}"))
                })?;
            }
            kernel.attached += 1;
        }
        Ok((kernel, events, logger))
    }

    /// Measures HZ with two clock samples from the sweep program and tells the programs how to
    /// turn jiffies into nanoseconds.
    fn calibrate(&mut self) -> Result<(), KernelError> {
        let sample = |k: &mut Self| -> Result<ClockSample, KernelError> {
            let name = if k.walk_in_kernel { SWEEP } else { SWEEP_ONE };
            k.test_run(name, [0, 0])
                .map_err(|e| KernelError::Load(anyhow::anyhow!("running {name}: {e}")))?;
            let clock: Array<&MapData, ClockSample> =
                Array::try_from(k.ebpf.map("CLOCK").expect("CLOCK map"))
                    .map_err(|e| KernelError::Load(e.into()))?;
            clock.get(&0, 0).map_err(|e| KernelError::Load(e.into()))
        };
        let a = sample(self)?;
        std::thread::sleep(Duration::from_millis(200));
        let b = sample(self)?;
        let hz = hz_from(&a, &b);
        self.hz = hz;
        self.settings.ns_per_jiffy = 1_000_000_000 / hz as u64;
        self.settings.timewait_len_jiffies = 60 * hz as u64;
        // From the moment the programs are attached until the agent has seeded.
        self.settings.report_all = 1;
        self.write_settings().map_err(|e| KernelError::Load(e.into()))?;
        tracing::info!(hz, "kernel timer frequency measured");
        Ok(())
    }

    fn write_settings(&mut self) -> Result<(), aya::maps::MapError> {
        self.settings_map.set(0, self.settings, 0)
    }

    /// The maps of closes and TIME_WAIT by process, for the collector that reads them at scrape
    /// time (once).
    pub fn take_closers(&mut self) -> Option<ClosersMaps> {
        self.closers.take()
    }

    /// The trace ring buffer, for the agent to read while someone traces (once).
    pub fn take_trace(&mut self) -> Option<RingBuf<MapData>> {
        self.trace.take()
    }

    /// Asks the programs to write every transition to the trace ring buffer, or nothing; with
    /// `port`, only those of connections with that port at either end.
    pub fn set_trace(&mut self, on: bool, port: Option<u16>) {
        self.update(|s| {
            s.trace = on as u64;
            s.trace_port = port.unwrap_or(0) as u64;
        });
    }

    /// Asks the programs to report the end of timewait sockets they do not follow, while the
    /// agent holds seeded ones.
    pub fn set_seeded(&mut self, on: bool) {
        self.update(|s| s.seeded = on as u64);
    }

    /// Asks the programs to report every transition (while the agent seeds) or only those
    /// that need the agent.
    pub fn set_report_all(&mut self, on: bool) {
        self.update(|s| s.report_all = on as u64);
    }

    fn update(&mut self, f: impl FnOnce(&mut Settings)) {
        let before = self.settings;
        f(&mut self.settings);
        let flags = |s: &Settings| (s.seeded, s.report_all, s.trace, s.trace_port);
        if flags(&before) != flags(&self.settings)
            && let Err(e) = self.write_settings()
        {
            tracing::warn!("updating kernel settings: {e}");
        }
    }

    /// Has the programs report every CLOSE_WAIT socket that entered the state at or before
    /// `before` (CLOCK_MONOTONIC ns) to the ring buffer. Returns how many.
    pub fn scan_close_wait(&mut self, before: u64) -> std::io::Result<u32> {
        self.settings.close_wait_before = before;
        self.write_settings().map_err(std::io::Error::other)?;
        if self.walk_in_kernel {
            return self.test_run(CLOSE_WAIT_SCAN, [0, 0]);
        }
        let (socks, capacity) = self.map::<SockEntry>("SOCKS")?;
        // At most `capacity` steps: a walk that meets a key deleted meanwhile starts over.
        let old: Vec<u64> = socks
            .iter()
            .take(capacity)
            .filter_map(Result::ok)
            .filter(|(_, e)| e.state == tcp::CLOSE_WAIT && e.entered_ns <= before)
            .map(|(sk, _)| sk)
            .take(self.settings.scan_limit as usize)
            .collect();
        old.into_iter().try_fold(0, |n, sk| Ok(n + self.test_run(CLOSE_WAIT_ONE, [sk, 0])?))
    }

    /// Whether the kernel walks the maps in one program run (`bpf_for_each_map_elem`).
    pub fn walks_in_kernel(&self) -> bool {
        self.walk_in_kernel
    }

    /// Runs the sweep once: brings the orphaned FIN_WAIT2 timewait entries up to date, or with
    /// `all` checks every timewait entry and ends those whose socket is gone. Returns how many
    /// entries it visited.
    pub fn run_sweep(&self, all: bool) -> std::io::Result<u32> {
        let mode = if all { sweep::ALL } else { sweep::ORPHANS };
        if self.walk_in_kernel {
            return self.test_run(if all { SWEEP_ALL } else { SWEEP }, [0, 0]);
        }
        // Collected first: the program deletes entries, and a walk resumed from a deleted key
        // starts over.
        let keys: Vec<u64> = if all {
            let (map, capacity) = self.map::<SockEntry>("TIMEWAIT")?;
            map.keys().take(capacity).filter_map(Result::ok).collect()
        } else {
            let (map, capacity) = self.map::<u8>("ORPHANS")?;
            map.keys().take(capacity).filter_map(Result::ok).collect()
        };
        for &tw in &keys {
            self.test_run(SWEEP_ONE, [tw, mode])?;
        }
        Ok(keys.len() as u32)
    }

    /// Runs one of the agent's own programs with `args` as its first arguments.
    fn test_run(&self, name: &str, args: [u64; 2]) -> std::io::Result<u32> {
        let prog: &RawTracePoint = self
            .ebpf
            .program(name)
            .ok_or_else(|| std::io::Error::other(format!("program {name} missing")))?
            .try_into()
            .map_err(std::io::Error::other)?;
        let mut opts = RawTracePointRunOptions::new();
        opts.args[..2].copy_from_slice(&args);
        prog.test_run(opts).map(|r| r.return_value).map_err(std::io::Error::other)
    }

    /// A hash map of the programs' keyed by kernel address, and its capacity.
    fn map<V: aya::Pod>(&self, name: &str) -> std::io::Result<(HashMap<&MapData, u64, V>, usize)> {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| std::io::Error::other(format!("map {name} missing")))?;
        let aya::maps::Map::HashMap(data) = map else {
            return Err(std::io::Error::other(format!("map {name} is not a hash map")));
        };
        let capacity = data.info().map_err(std::io::Error::other)?.max_entries() as usize;
        Ok((HashMap::try_from(map).map_err(std::io::Error::other)?, capacity))
    }

    pub fn read(&self) -> Readout {
        let mut out = Readout::default();
        for (state, slot) in out.sockets.iter_mut().enumerate() {
            if let Ok(v) = self.gauges.get(&(state as u32), 0) {
                *slot = v.iter().sum::<i64>().max(0);
            }
        }
        out.counters = (0..counter::COUNT).map(|i| self.counter(i)).collect();
        if let Ok(per_cpu) = self.lifecycle.get(&0, 0) {
            for l in per_cpu.iter() {
                out.lifecycle.add(l);
            }
        }
        out
    }

    /// Statistics of the programs (the sweep's runs are the agent's own test runs). A twin
    /// counts as part of its program: its time is added, and the runs it handled are taken off
    /// the program's misses, which leaves the events lost. The twin's own misses are not: it
    /// is skipped only when nested in itself, and the program handled that event.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let stats = |name: &str| {
            let info = prog_info(self.ebpf.program(name)?.fd().ok()?).ok()?;
            Some((info.run_cnt, Duration::from_nanos(info.run_time_ns), info.recursion_misses))
        };
        self.ebpf
            .programs()
            .map(|(name, _)| name)
            .filter(|name| !twin::PROGRAMS.iter().any(|(_, t)| t == name))
            .filter_map(|name| {
                let (run_count, mut run_time, mut missed) = stats(name)?;
                let mut nested = None;
                if let Some(i) = twin::PROGRAMS.iter().position(|(p, _)| *p == name) {
                    run_time += stats(twin::PROGRAMS[i].1).map(|s| s.1).unwrap_or_default();
                    let handled = self.counter(counter::NESTED + i as u32);
                    missed = missed.saturating_sub(handled);
                    nested = Some(handled);
                }
                Some(ProgramStats { name: name.to_string(), run_count, run_time, missed, nested })
            })
            .collect()
    }

    /// One of the programs' counters (`monitor_common::counter`), summed over CPUs.
    pub fn counter(&self, idx: u32) -> u64 {
        self.counters.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

/// The kernel's `bpf_prog_info` of a program (aya's view of it leaves out `recursion_misses`).
fn prog_info(fd: &ProgramFd) -> std::io::Result<aya_obj::generated::bpf_prog_info> {
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: bpf_prog_info is plain integers; all zeroes is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: &mut info as *mut _ as u64,
    };
    // SAFETY: attr points at `info`, of the length given; the kernel writes at most that much.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoByFd,
            std::mem::size_of::<InfoByFd>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

fn load_error(name: &str, e: aya::programs::ProgramError) -> KernelError {
    if is_permission(&e) {
        KernelError::Permission(format!("{name}: {e}"))
    } else {
        KernelError::Load(anyhow::Error::new(e).context(format!("loading program {name}")))
    }
}

/// HZ from two (ktime, jiffies) samples, snapped to the values kernels are built with.
pub fn hz_from(a: &ClockSample, b: &ClockSample) -> u32 {
    let ns = b.ktime_ns.saturating_sub(a.ktime_ns).max(1) as f64;
    let measured = b.jiffies.saturating_sub(a.jiffies) as f64 * 1e9 / ns;
    [100u32, 250, 300, 1000]
        .into_iter()
        .min_by(|x, y| (*x as f64 - measured).abs().total_cmp(&(*y as f64 - measured).abs()))
        .unwrap_or(250)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones use memory cgroups.
fn raise_memlock() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); harmless on Linux 5.11 and newer",
            std::io::Error::last_os_error()
        );
    }
}

/// Loads a program the agent runs itself (BPF_PROG_TEST_RUN), never attached.
fn load_test_run(ebpf: &mut Ebpf, name: &str) -> Result<(), KernelError> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| KernelError::Load(anyhow::anyhow!("program {name} missing")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| KernelError::Load(e.into()))?;
    prog.load().map_err(|e| load_error(name, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_missing_capabilities() {
        let missing = missing_capabilities;
        assert_eq!(missing(0), ["CAP_BPF", "CAP_PERFMON", "CAP_SYSLOG"]);
        assert!(missing(u64::MAX).is_empty());
        assert_eq!(missing(1 << 39 | 1 << 34), ["CAP_PERFMON"]);
        // CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON (kernels before 5.8), not CAP_SYSLOG.
        assert_eq!(missing(1 << 21), ["CAP_SYSLOG"]);
    }

    #[test]
    fn hz_snaps_to_kernel_values() {
        let a = ClockSample { ktime_ns: 1_000_000_000, jiffies: 10_000 };
        let b = ClockSample { ktime_ns: 1_200_000_000, jiffies: 10_051 };
        assert_eq!(hz_from(&a, &b), 250);
        let b = ClockSample { ktime_ns: 1_200_000_000, jiffies: 10_199 };
        assert_eq!(hz_from(&a, &b), 1000);
        let b = ClockSample { ktime_ns: 1_200_000_000, jiffies: 10_020 };
        assert_eq!(hz_from(&a, &b), 100);
    }
}
