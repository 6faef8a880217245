//! Programs the agent runs itself (BPF_PROG_TEST_RUN), never attached: the sweep of timewait
//! entries and the CLOSE_WAIT scan.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_for_each_map_elem, macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use monitor_common::{ClockSample, SockEntry, found, kind, sweep, tcp};

use crate::{
    agent::{report, setting},
    kernel::{BPF_EXIST, copied, jiffies, kread, now},
    maps::{CLOCK, ORPHANS, SOCKS, TIMEWAIT, layout},
    sock::{Live, SockCommon},
    timewait::{change_time, end_missed, to_time_wait},
};

/// Run by the agent (BPF_PROG_TEST_RUN), never attached: brings the orphaned FIN_WAIT2
/// timewait sockets up to date (those that got their FIN are TIME_WAIT now), and records a clock
/// pair so the agent can measure HZ. Silent re-arms of TIME_WAIT sockets are found at their end.
/// Needs `bpf_for_each_map_elem` (Linux 5.13); before that the agent walks the map itself and
/// runs `twmon_sweep_one` for each key.
#[raw_tracepoint(tracepoint = "twmon_sweep")]
pub fn twmon_sweep(_ctx: RawTracePointContext) -> i32 {
    sample_clock();
    // SAFETY: the map and the callback are this crate's; the verifier checks the callback's
    // arguments against the map's key and value types.
    let visited = unsafe {
        bpf_for_each_map_elem(
            &ORPHANS as *const _ as *mut c_void,
            sweep_cb as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    visited as i32
}

/// `twmon_sweep` over every timewait entry, ending those whose socket is gone (see
/// [`sweep_one`]); the agent runs it at reconciles. A program of its own rather than an argument
/// of `twmon_sweep`: a main program with callbacks that reads its context fails to load on 6.1.
#[raw_tracepoint(tracepoint = "twmon_sweep_all")]
pub fn twmon_sweep_all(_ctx: RawTracePointContext) -> i32 {
    sample_clock();
    // SAFETY: the map and the callback are this crate's; the verifier checks the callback's
    // arguments against the map's key and value types.
    let visited = unsafe {
        bpf_for_each_map_elem(
            &TIMEWAIT as *const _ as *mut c_void,
            sweep_all_cb as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    visited as i32
}

/// `twmon_sweep` for one timewait entry, its address the first argument (0: only the clock
/// pair) and [`sweep::ALL`] the second for the check of every entry, for kernels without
/// `bpf_for_each_map_elem`.
#[raw_tracepoint(tracepoint = "twmon_sweep_one")]
pub fn twmon_sweep_one(ctx: RawTracePointContext) -> i32 {
    sample_clock();
    let tw: u64 = ctx.arg(0);
    let all: u64 = ctx.arg(1);
    if tw != 0 {
        sweep_one(tw, all == sweep::ALL);
    }
    0
}

#[inline(always)]
pub(crate) fn sample_clock() {
    let now = now();
    let jiffies = jiffies();
    if let Some(c) = CLOCK.get_ptr_mut(0) {
        // SAFETY: an array element, valid for this program run; the agent runs these programs
        // one at a time.
        unsafe { *c = ClockSample { ktime_ns: now, jiffies } };
    }
}

#[inline(never)]
extern "C" fn sweep_cb(
    _map: *mut c_void,
    key: *const u64,
    _value: *mut u8,
    _ctx: *mut c_void,
) -> i64 {
    // SAFETY: the kernel passes the element's key and value, valid for the callback's run.
    sweep_one(unsafe { *key }, false);
    0
}

#[inline(never)]
extern "C" fn sweep_all_cb(
    _map: *mut c_void,
    key: *const u64,
    _value: *mut SockEntry,
    _ctx: *mut c_void,
) -> i64 {
    // SAFETY: the kernel passes the element's key and value, valid for the callback's run.
    sweep_one(unsafe { *key }, true);
    0
}

/// Brings one timewait entry up to date: an orphan that got its FIN is TIME_WAIT now. With
/// `all`, TIME_WAIT entries are checked too, and any entry whose socket is gone is ended here,
/// counted as missed: its timer is no longer a timewait socket's, or no longer queued (the
/// kernel dequeues a timer right after the cancel event that would have ended the entry, and
/// queues it again before the start event of a re-arm, so a live socket's timer is queued
/// whenever its entry is in the map).
///
/// The sweep runs beside the programs on the other CPUs, so it works on a copy and replaces
/// the entry only while it is still this connection's: a pointer into the map would write into
/// an element the cancel program had just freed and another socket's insert had taken (the map
/// is preallocated), seen in a soak as re-arms no segment caused. A TIME_WAIT entry is never
/// written here: a silent re-arm is counted at its end, against the expiry last seen.
#[inline(always)]
pub(crate) fn sweep_one(tw: u64, all: bool) {
    let Some(seen) = copied(&TIMEWAIT, tw) else {
        // Ended meanwhile (its end was reported where it happened), or cancelled for a re-arm
        // that has not put it back yet: the re-arm adds it again if it is still an orphan.
        let _ = ORPHANS.remove(tw);
        return;
    };
    if seen.state != tcp::FIN_WAIT2 {
        let _ = ORPHANS.remove(tw);
        if !all {
            return;
        }
    }
    let timer = tw + layout!(tw_timer) as u64;
    let now = now();
    // The very entry seen: a re-arm on another CPU takes it out and puts it back with the
    // timer's new expiry (or a new state), and its timer is out of the wheel in between.
    let still_this = || {
        copied(&TIMEWAIT, tw).is_some_and(|e| {
            e.hash == seen.hash
                && e.expires == seen.expires
                && e.state == seen.state
                && e.entered_ns == seen.entered_ns
        })
    };
    // Gone, then the same entry still there, then still gone: not a re-arm caught between its
    // cancel and its start.
    if let Some(at) = gone(tw, timer, seen.hash)
        && still_this()
        && gone(tw, timer, seen.hash).is_some()
    {
        end_missed(&seen, tw, now, at);
        return;
    }
    if seen.state != tcp::FIN_WAIT2
        || kread::<u8>(tw + layout!(tw_substate) as u64) != Ok(tcp::TIME_WAIT)
    {
        return;
    }
    let Ok(expires) = kread::<u64>(timer + layout!(timer_expires) as u64) else { return };
    // A timer we have not seen move is being re-armed for this very change (the kernel sets the
    // substate, then restarts the timer); a timer that moved was restarted then.
    let at = if expires == seen.expires { now } else { change_time(expires, now, jiffies()) };
    let mut entry = SockEntry { expires, ..seen };
    let changed = SockEntry { state: tcp::TIME_WAIT, entered_ns: at, ..entry };
    if still_this() && TIMEWAIT.insert(tw, changed, BPF_EXIST).is_ok() {
        to_time_wait(&mut entry, tw, at, false);
    }
}

/// Whether the timewait socket of a map entry (of connection `hash`) ended without our cancel
/// program seeing it, and if so, how that shows (`found::SWEEP_*`).
#[inline(always)]
pub(crate) fn gone(tw: u64, timer: u64, hash: u32) -> Option<u8> {
    // The kernel clears the callback only after the cancel event (timer_shutdown), and a freed
    // socket's memory may be anything else by now, another connection's timewait socket too.
    match kread::<u64>(timer + layout!(timer_function) as u64) {
        Ok(f) if f == layout!(tw_timer_handler) => {}
        _ => return Some(found::SWEEP_CALLBACK),
    }
    if Live(tw).get::<u32>(layout!(skc_hash)) != Ok(hash) {
        return Some(found::SWEEP_CONNECTION);
    }
    // Not queued: dequeued for its expiry or a kill on another CPU, after the cancel program
    // took the entry out (the caller looks it up again), or gone. A re-arm keeps it queued.
    match kread::<u64>(timer + layout!(timer_pprev) as u64) {
        Ok(p) if p != 0 => None,
        _ => Some(found::SWEEP_UNQUEUED),
    }
}

/// Run by the agent (BPF_PROG_TEST_RUN) before it looks for leaks, never attached: reports the
/// CLOSE_WAIT sockets that entered the state before `Settings::close_wait_before`, with when.
/// CLOSE_WAIT entries and exits stay in the kernel; only sockets past the threshold cross.
/// Needs `bpf_for_each_map_elem` (Linux 5.13); before that the agent walks SOCKS itself and
/// runs `twmon_close_wait_one` for each socket past the threshold.
#[raw_tracepoint(tracepoint = "twmon_close_wait")]
pub fn twmon_close_wait(_ctx: RawTracePointContext) -> i32 {
    let mut found: u64 = 0;
    // SAFETY: the map and the callback are this crate's; the verifier checks the callback's
    // arguments against the map's key and value types.
    unsafe {
        bpf_for_each_map_elem(
            &SOCKS as *const _ as *mut c_void,
            close_wait_cb as *mut c_void,
            &mut found as *mut u64 as *mut c_void,
            0,
        )
    };
    found as i32
}

/// `twmon_close_wait` for one socket, its address the first argument: 1 if it was reported.
#[raw_tracepoint(tracepoint = "twmon_close_wait_one")]
pub fn twmon_close_wait_one(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let Some(e) = copied(&SOCKS, sk) else { return 0 };
    let mut found = 0u64;
    close_wait_check(sk, e, &mut found);
    found as i32
}

#[inline(never)]
extern "C" fn close_wait_cb(
    _map: *mut c_void,
    key: *const u64,
    value: *mut SockEntry,
    found: *mut c_void,
) -> i64 {
    // SAFETY: `found` is the counter `twmon_close_wait` passes along, alive for the whole walk;
    // key and value are the element's, valid for the callback's run.
    let found = unsafe { &mut *(found as *mut u64) };
    close_wait_check(unsafe { *key }, unsafe { *value }, found)
}

/// Reports `sk` if it has been in CLOSE_WAIT since before the threshold and fewer than the scan
/// limit were reported so far (`found`). Returns 1 to stop a walk at the limit.
#[inline(always)]
pub(crate) fn close_wait_check(sk: u64, e: SockEntry, found: &mut u64) -> i64 {
    if e.state != tcp::CLOSE_WAIT || e.entered_ns > setting(|s| s.close_wait_before) {
        return 0;
    }
    if *found >= setting(|s| s.scan_limit) {
        return 1;
    }
    *found += 1;
    let _ = report(
        &Live(sk),
        sk,
        kind::CLOSE_WAIT_AGE,
        tcp::CLOSE_WAIT,
        tcp::CLOSE_WAIT,
        e.entered_ns,
        0,
    );
    0
}
