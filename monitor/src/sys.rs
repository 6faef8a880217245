//! Small wrappers around the C library: clocks, the heap, who we run as, which kernel.
use std::time::Duration;

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

pub fn trim() {
    // SAFETY: glibc's malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// CPU time (user + system) of the whole agent so far.
pub fn process_cpu() -> Duration {
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
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Unix time minus CLOCK_MONOTONIC, in seconds: what turns a kernel timestamp into wall time.
pub fn unix_minus_monotonic() -> f64 {
    let unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64());
    unix.unwrap_or(0.0) - monotonic_ns() as f64 / 1e9
}
