//! What the programs count in the kernel, per CPU: counters, gauges, transitions and their
//! durations. The agent reads and sums them at scrape time.

use monitor_common::{SockEntry, tcp};

use crate::{
    kernel::add,
    maps::{COUNTERS, GAUGES, LIFECYCLE, TIMEWAIT_HELD},
};

#[inline(always)]
pub(crate) fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        add(p, 1u64);
    }
}

/// Counts a condition to warn of, and whether to warn now: at powers of two, so a log is
/// not flooded.
#[inline(always)]
pub(crate) fn count_warn(idx: u32) -> bool {
    let Some(p) = COUNTERS.get_ptr_mut(idx) else { return false };
    add(p, 1u64);
    // SAFETY: as in `add`. A nested addition in between at worst moves a warning.
    unsafe { core::ptr::read_volatile(p) }.is_power_of_two()
}

#[inline(always)]
pub(crate) fn gauge(state: u8, delta: i64) {
    if let Some(p) = GAUGES.get_ptr_mut(state as u32) {
        add(p, delta);
    }
}

/// A timewait socket's entry enters (+1) or leaves (-1) its state: the gauge, and in TIME_WAIT
/// what its closer holds.
#[inline(always)]
pub(crate) fn tw_gauge(entry: &SockEntry, delta: i64) {
    gauge(entry.state, delta);
    held(entry, delta);
}

/// What the closer of a timewait socket holds in TIME_WAIT, when the entry is in it.
#[inline(always)]
pub(crate) fn held(entry: &SockEntry, delta: i64) {
    if entry.state == tcp::TIME_WAIT
        && entry.closer != 0
        && let Some(p) = TIMEWAIT_HELD.get_ptr_mut(entry.closer as u32)
    {
        add(p, delta);
    }
}

/// Counts a transition and, when the time `from` was entered is known, its duration.
#[inline(always)]
pub(crate) fn record(from: u8, to: u8, entered: u64, now: u64) {
    if let Some(l) = LIFECYCLE.get_ptr_mut(0) {
        let d = if entered != 0 && now >= entered { Some(now - entered) } else { None };
        // SAFETY: a per-CPU map value, valid for this program run; every cell is added to
        // atomically.
        unsafe { (*l).count_with(from, to, d, |n, v| add(n as *mut u64, v)) };
    }
}
