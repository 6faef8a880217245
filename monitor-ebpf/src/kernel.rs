//! Reading kernel memory and adding to shared cells: the few `unsafe` operations every program
//! needs, each behind a safe wrapper that says why it is sound.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_jiffies64,
    },
    maps::HashMap,
};

/// Reads a `T` at a kernel address with a helper call: for memory the verifier does not know
/// the type of (a timewait socket reached from a timer, a task's fields).
#[inline(always)]
pub(crate) fn kread<T>(addr: u64) -> Result<T, i64> {
    // SAFETY: the helper checks the address, and fails where it cannot be read.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|e| e as i64)
}

/// A load through a pointer the verifier knows the BTF type of (a `tp_btf` argument, or a
/// pointer loaded through one) at an offset it knows as a constant (from the frozen LAYOUT): it
/// checks the access against the kernel's BTF and emits a fault-safe plain load, not a helper
/// call (measured: a probe read costs 30-50 ns, this about 1).
#[inline(always)]
pub(crate) fn field<T: Copy>(ptr: u64, offset: u32) -> T {
    // SAFETY: the verifier checks this load against the kernel's BTF at load time and makes it
    // fault-safe (a fault reads 0).
    unsafe { core::ptr::read_volatile((ptr + offset as u64) as *const T) }
}

/// Adds `v` to a per-CPU cell in one instruction (`BPF_ATOMIC | BPF_ADD`, in every kernel since
/// 3.18): a program interrupted between a load and a store by another one on the same CPU (a
/// softirq's, or a twin's) that adds to the same cell would lose that addition. The old value
/// is not used: fetching it needs Linux 5.12.
#[inline(always)]
pub(crate) fn add<T: Copy>(p: *mut T, v: T) {
    // SAFETY: `p` points into a map value, valid and aligned for this program run.
    let _ = unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Map update flags: create a new element only; replace an existing element only.
pub(crate) const BPF_NOEXIST: u64 = 1;
pub(crate) const BPF_EXIST: u64 = 2;

/// The monotonic clock, in nanoseconds.
#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// The kernel's `jiffies`, which timer expiries are counted in.
#[inline(always)]
pub(crate) fn jiffies() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// The address of the current task's `task_struct`.
#[inline(always)]
pub(crate) fn current_task() -> u64 {
    // SAFETY: a helper without arguments; the address is only read through `kread`.
    unsafe { bpf_get_current_task() }
}

/// The current process's id (the thread group's, as `ps` shows it).
#[inline(always)]
pub(crate) fn current_pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// A copy of the value `key` has in `map`, taken at once.
#[inline(always)]
pub(crate) fn copied<K, V: Copy>(map: &HashMap<K, V>, key: K) -> Option<V> {
    // SAFETY: the value is copied before this program does anything else. Every hash map here
    // is preallocated, so an element another CPU deletes meanwhile stays valid memory; its value
    // may then be another key's, which is why callers compare the connection's identity.
    unsafe { map.get(key) }.copied()
}
