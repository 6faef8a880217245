//! twmon's kernel programs: follow TCP connections through the four-way close.
//!
//! Every program is a BTF tracepoint (`tp_btf`): it gets the tracepoint's arguments, and the
//! kernel skips it only when the same program is already running on that CPU (a classic
//! tracepoint program is skipped while any other BPF program runs there, say when an interrupt
//! arrives during one). An interrupt whose softirq changes a socket's state while `twmon_state`
//! runs in process context is such a nested run: `twmon_state` has a twin that handles exactly
//! those (see `monitor_common::twin`); the agent exports what is left.
//!
//! Full sockets are followed on `sock:inet_sock_set_state`. TIME_WAIT is not visible there: in
//! `tcp_time_wait()` the kernel hands the connection to a separate `inet_timewait_sock` and moves
//! the full socket to CLOSE. Timewait sockets are followed through their timer instead, whose
//! callback is `tw_timer_handler`:
//!
//! - `timer:timer_start` for a timer we do not know yet: a timewait socket was created. The
//!   full socket's `X -> CLOSE` that follows on the same CPU is the hand-off (`X -> TIME_WAIT`).
//! - `timer:timer_cancel` when the timer is due: the socket ended at 2MSL (the kernel detaches
//!   a timer just before running it). Before it is due: either a re-arm (a `timer_start` for the
//!   same timer follows at once) or an early end (reuse, RST, namespace teardown).
//! - The kernel re-arms a timer without any trace event when the new expiry lands in the same
//!   timer-wheel bucket, and an orphaned FIN_WAIT2 timewait socket becomes TIME_WAIT when its FIN
//!   arrives without any event at all. `twmon_sweep`, run by the agent, and the socket's end find
//!   both from the timer's `expires` and the socket's `tw_substate`.
//!
//! Counted in the kernel, per CPU, and read by the agent at scrape time: sockets per state,
//! transitions, the time spent in each state (histogram buckets), timewait ends the kernel can
//! decide on (expiry), re-arms, retransmits and resets. Only what needs a decision the kernel
//! programs cannot make crosses the ring buffer to the agent: a timewait timer cancelled early
//! (an end, unless a re-arm follows), CLOSE_WAIT entered or left (the agent ages them to name
//! leaks), sockets the programs do not follow (seeded from sock_diag at start-up), and, while
//! the agent seeds, every transition.
#![no_std]
#![no_main]
// For `atomic_xadd`: the BPF target has no compare-and-swap, so core offers no `fetch_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_for_each_map_elem, bpf_jiffies64},
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use aya_log_ebpf::warn;
use monitor_common::{
    ClockSample, CloserKey, Closes, Event, KernelLayout, Lifecycle, MAX_CLOSERS, Settings, SockEntry, counter, flags,
    found, kind, reason, sweep, tcp, twin,
};

const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

/// Filled in by the agent at load time (`EbpfLoader::set_global`); read-only to the verifier,
/// which prunes what it makes unreachable.
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = unsafe { core::mem::zeroed() };

macro_rules! layout {
    ($field:ident) => {{
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&LAYOUT.$field) };
        v
    }};
}

/// Lifecycle records for the agent. The agent sets the size at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 21, 0);

/// Full sockets in a teardown state: when they entered it. Bounded; a full map is counted.
/// Preallocated, like TIMEWAIT: an insert then allocates nothing (measured: about a fifth of the
/// state program's time), at the price of memory reserved up front (the agent sizes both).
#[map]
static SOCKS: HashMap<u64, SockEntry> = HashMap::with_max_entries(65_536, 0);

/// Timewait sockets, keyed by the address of their `inet_timewait_sock`.
#[map]
static TIMEWAIT: HashMap<u64, SockEntry> = HashMap::with_max_entries(262_144, 0);

/// The timewait sockets still in FIN_WAIT2 (orphans waiting for the peer's FIN): the only
/// ones whose state the kernel changes without any event, so the only ones the sweep visits.
/// Small on purpose: the sweep's cost is the number of buckets. Preallocated like the others:
/// allocating from a timer tracepoint is unsafe before Linux 6.1 (5.10 warns with a kernel
/// backtrace, "trace type BPF program uses run-time allocation").
#[map]
static ORPHANS: HashMap<u64, u8> = HashMap::with_max_entries(16_384, 0);

/// Connections closed, by process name and namespace (see `closed_by`). Preallocated, as the
/// others.
#[map]
static CLOSERS: HashMap<CloserKey, Closes> = HashMap::with_max_entries(MAX_CLOSERS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Transitions and state durations, per CPU; one element, so the agent reads it in one call.
#[map]
static LIFECYCLE: PerCpuArray<Lifecycle> = PerCpuArray::with_max_entries(1, 0);

/// Sockets entering (+1) and leaving (-1) each state, per CPU; their sum is the gauge.
#[map]
static GAUGES: PerCpuArray<i64> = PerCpuArray::with_max_entries(tcp::MAX_STATES, 0);

/// The timewait sockets this CPU created last, for matching the full socket's hand-off. More
/// than one: when the hand-off runs in process context (a segment queued while the application
/// held the socket, processed when it let go), softirqs may run between the timer's start and
/// the full socket's `X -> CLOSE`, and do hand-offs of their own (measured under nginx and wrk).
#[map]
static HANDOFF: PerCpuArray<Handoffs> = PerCpuArray::with_max_entries(1, 0);

/// The timewait socket whose timer this CPU cancelled last, kept so a re-arm can restore it.
#[map]
static CANCELLED: PerCpuArray<Cancelled> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, by `twin::*`: the events that program ran for last, for its twin (see `primary`).
#[map]
static RAN: PerCpuArray<Ran> = PerCpuArray::with_max_entries(twin::COUNT, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
static CLOCK: Array<ClockSample> = Array::with_max_entries(1, 0);

/// The events a twinned program ran for, newest at `next - 1`, each until its twin finds it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ran {
    ids: [EventId; RAN_SLOTS],
    next: u32,
    _pad: u32,
}

/// An event's identity from two of its tracepoint arguments, a pointer and a value: equal for a
/// program and its twin on one event, distinct from any event nested in it. (The pointer is
/// kept apart: the verifier allows no arithmetic on a tracepoint's typed pointer.)
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct EventId {
    ptr: u64,
    value: u64,
}

/// Notes a twin can look back on: an interrupt between a program and its twin runs both for
/// each event it brings (a softirq may bring a batch of state changes, each noted), and a note
/// pushed out before its twin ran makes that twin handle its event a second time.
const RAN_SLOTS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct Handoff {
    tw: u64,
    net: u64,
    dport: u32,
    hash: u32,
    state: u8,
    _pad: [u8; 7],
}

/// Hand-offs that nest on one CPU: one per level of softirq that can run in between, and spare.
const HANDOFF_SLOTS: usize = 4;

impl Handoff {
    /// The same socket, of the same connection (its memory may be another's by now).
    #[inline(always)]
    fn same(&self, other: &Handoff) -> bool {
        self.tw != 0
            && self.tw == other.tw
            && self.net == other.net
            && self.dport == other.dport
            && self.hash == other.hash
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Handoffs {
    slots: [Handoff; HANDOFF_SLOTS],
    /// The slot the next hand-off overwrites when none is free (one never taken: the oldest).
    next: u32,
    _pad: u32,
    /// The full socket that sent a reset last on this CPU (`tw` holds the socket).
    reset_by: Handoff,
    /// The full socket whose close was counted last as a missed hand-off: a reset it sends
    /// right after says it was an abort.
    unconfirmed: Handoff,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Cancelled {
    tw: u64,
    entry: SockEntry,
    /// The socket's identity: a freed timewait socket's memory is soon another one's, with
    /// the same timer address (and, for a SYN that reopened the 4-tuple, the same connection
    /// identity), so neither says it is a re-arm: see [`tw_identity`].
    identity: (u64, u32, u32, u32),
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

#[inline(always)]
fn kread<T>(addr: u64) -> Result<T, i64> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|e| e as i64)
}

/// A load through a pointer the verifier knows the BTF type of (a `tp_btf` argument, or a
/// pointer loaded through one) at an offset it knows as a constant (from the frozen LAYOUT): it
/// checks the access against the kernel's BTF and emits a fault-safe plain load, not a helper
/// call (measured: a probe read costs 30-50 ns, this about 1).
#[inline(always)]
fn field<T: Copy>(ptr: u64, offset: u32) -> T {
    unsafe { core::ptr::read_volatile((ptr + offset as u64) as *const T) }
}

/// Adds `v` to a per-CPU cell in one instruction (`BPF_ATOMIC | BPF_ADD`, in every kernel since
/// 3.18): a program interrupted between a load and a store by another one on the same CPU (a
/// softirq's, or a twin's) that adds to the same cell would lose that addition. The old value
/// is not used: fetching it needs Linux 5.12.
#[inline(always)]
fn add<T: Copy>(p: *mut T, v: T) {
    // SAFETY: `p` points into a map value, valid and aligned for this program run.
    let _ = unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(p, v) };
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        add(p, 1u64);
    }
}

/// Counts a condition to warn of, and whether to warn now: at powers of two, so a log is
/// not flooded.
#[inline(always)]
fn count_warn(idx: u32) -> bool {
    let Some(p) = COUNTERS.get_ptr_mut(idx) else { return false };
    add(p, 1u64);
    // SAFETY: as in `add`. A nested addition in between at worst moves a warning.
    unsafe { core::ptr::read_volatile(p) }.is_power_of_two()
}

#[inline(always)]
fn gauge(state: u8, delta: i64) {
    if let Some(p) = GAUGES.get_ptr_mut(state as u32) {
        add(p, delta);
    }
}

/// Counts a transition and, when the time `from` was entered is known, its duration.
#[inline(always)]
fn record(from: u8, to: u8, entered: u64, now: u64) {
    if let Some(l) = LIFECYCLE.get_ptr_mut(0) {
        let d = if entered != 0 && now >= entered { Some(now - entered) } else { None };
        // SAFETY: a per-CPU map value, valid for this program run; every cell is added to
        // atomically.
        unsafe { (*l).count_with(from, to, d, |n, v| add(n as *mut u64, v)) };
    }
}

/// True while the agent seeds from sock_diag and wants every transition reported.
#[inline(always)]
fn report_all() -> bool {
    settings().report_all != 0
}

/// Records are written without waking the agent: a wake-up (an irq_work and a context switch
/// per record) cost twice the rest of the program. The agent drains the ring on a short timer.
const BPF_RB_NO_WAKEUP: u64 = 1;

/// Map update flags: create a new element only; replace an existing element only.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

#[inline(always)]
fn emit(ev: &Event) {
    if EVENTS.output::<Event>(ev, BPF_RB_NO_WAKEUP).is_err() {
        count(counter::EVENTS_LOST);
    }
}

#[inline(always)]
fn settings() -> Settings {
    match SETTINGS.get(0) {
        Some(s) => *s,
        None => Settings::default(),
    }
}

#[inline(always)]
fn since(now: u64, then: u64) -> (u64, u16) {
    if then != 0 && now >= then { (now - then, flags::DURATION) } else { (0, 0) }
}

/// Runs a twinned program's body after noting, on this CPU, that it ran for event `id`.
///
/// The kernel marks a program running just before it enters it and clears the mark just
/// after it returns; an event nested anywhere in between (an interrupt on this CPU) skips the
/// program and runs only its twin, attached after it. The twin handles the event when the
/// program did not note it, so no window at either end is left uncovered: an event nested
/// before the note finds no note of itself, one nested after it finds another event's. An
/// event nested between the program and its twin runs both, and the twin finds its note.
#[inline(always)]
fn primary(which: u32, id: EventId, body: impl FnOnce()) -> u32 {
    if let Some(r) = RAN.get_ptr_mut(which) {
        // SAFETY: a per-CPU array element, valid for this program run. A twin nested here only
        // reads it (its program, this one, was skipped).
        unsafe {
            let at = (*r).next;
            (*r).ids[at as usize & (RAN_SLOTS - 1)] = id;
            (*r).next = at.wrapping_add(1);
        }
    }
    body();
    0
}

/// Attached right after its program: handles event `id` when that program did not run for it,
/// that is, when the event is nested in the program and the kernel skipped it. Every such
/// event counts as handled (`counter::NESTED`), the ones `body` ignores too: the kernel counts
/// a skipped run for each, and the agent takes those handled here off it, leaving those lost.
///
/// The note is looked for from the newest back: with nothing nested, it is the newest.
#[inline(always)]
fn nested(which: u32, id: EventId, body: impl FnOnce()) -> u32 {
    let Some(r) = RAN.get_ptr_mut(which) else { return 0 };
    // SAFETY: a per-CPU array element, valid for this program run. The program may run nested
    // in this twin and note another event meanwhile, in a slot this search has passed.
    unsafe {
        let newest = (*r).next.wrapping_sub(1);
        for back in 0..RAN_SLOTS as u32 {
            let slot = &mut (*r).ids[newest.wrapping_sub(back) as usize & (RAN_SLOTS - 1)];
            if *slot == id {
                slot.ptr = 0;
                return 0;
            }
        }
    }
    count(counter::NESTED + which);
    body();
    0
}

/// A `sock_common`, the start of full and timewait sockets alike.
trait SockCommon {
    fn get<T: Copy>(&self, offset: u32) -> Result<T, i64>;

    /// Network namespace inode.
    #[inline(always)]
    fn netns(&self) -> Result<u32, i64> {
        kread(self.get::<u64>(layout!(skc_net))? + layout!(net_inum) as u64)
    }

    #[inline(always)]
    fn addr16(&self, offset: u32) -> Result<[u8; 16], i64> {
        self.get(offset)
    }

    /// What identifies a connection across the hand-off from full socket to timewait socket:
    /// its namespace, remote port and established-hash (a hash of the whole 4-tuple). Not the
    /// local port: by the time the full socket moves to CLOSE the kernel has zeroed `skc_num`.
    #[inline(always)]
    fn identity(&self) -> Result<(u64, u32, u32), i64> {
        let dport: u16 = self.get(layout!(skc_dport))?;
        Ok((self.get(layout!(skc_net))?, dport as u32, self.get(layout!(skc_hash))?))
    }

    /// Family, remote port and both addresses into `ev`; the local port is the caller's.
    #[inline(always)]
    fn fill(&self, ev: &mut Event) -> Result<(), i64> {
        ev.family = self.get(layout!(skc_family))?;
        ev.dport = u16::from_be(self.get(layout!(skc_dport))?);
        if ev.family == AF_INET6 {
            ev.saddr = self.addr16(layout!(skc_v6_rcv_saddr))?;
            ev.daddr = self.addr16(layout!(skc_v6_daddr))?;
        } else {
            let s: [u8; 4] = self.get(layout!(skc_rcv_saddr))?;
            let d: [u8; 4] = self.get(layout!(skc_daddr))?;
            ev.saddr[..4].copy_from_slice(&s);
            ev.daddr[..4].copy_from_slice(&d);
        }
        Ok(())
    }
}

/// A socket read where it lies, one helper call per field.
struct Live(u64);

impl SockCommon for Live {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: u32) -> Result<T, i64> {
        kread(self.0 + offset as u64)
    }
}

/// A socket the verifier knows the type of (the state tracepoint's `struct sock *`): plain
/// loads, checked against BTF at load time.
struct Btf(u64);

impl SockCommon for Btf {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: u32) -> Result<T, i64> {
        Ok(field(self.0, offset))
    }

    #[inline(always)]
    fn netns(&self) -> Result<u32, i64> {
        Ok(field(field::<u64>(self.0, layout!(skc_net)), layout!(net_inum)))
    }

    /// `struct in6_addr` is a union of arrays: read it the way BTF allows, a word at a time.
    #[inline(always)]
    fn addr16(&self, offset: u32) -> Result<[u8; 16], i64> {
        let mut a = [0u8; 16];
        for i in 0..4 {
            let w: u32 = field(self.0, offset + 4 * i as u32);
            a[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ok(a)
    }
}

#[inline(always)]
fn netns_of(sk: u64) -> Result<u32, i64> {
    Live(sk).netns()
}

/// False when the agent watches one namespace and this is not it.
#[inline(always)]
fn wanted(netns: u32) -> bool {
    let only = layout!(netns_only);
    only == 0 || only == netns
}

// ---------------------------------------------------------------------------------------------
// sock:inet_sock_set_state

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn twmon_state(ctx: BtfTracePointContext) -> u32 {
    primary(twin::STATE, state_id(&ctx), || {
        let _ = try_state(&ctx);
    })
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn nested_state(ctx: BtfTracePointContext) -> u32 {
    nested(twin::STATE, state_id(&ctx), || {
        let _ = try_state(&ctx);
    })
}

/// A state change: the socket, from and to.
#[inline(always)]
fn state_id(ctx: &BtfTracePointContext) -> EventId {
    let (old, new) = (ctx.arg::<i32>(1) as u64, ctx.arg::<i32>(2) as u64);
    EventId { ptr: ctx.arg(0), value: old << 8 | new }
}

/// The state changes `try_state` looks at, what the close path is made of: into a teardown
/// state or CLOSE, not from CLOSE or LISTEN (bind, listen), and not to the same state (a
/// close() after shutdown() sets FIN_WAIT1, FIN_WAIT2, CLOSING or LAST_ACK again: no change).
#[inline(always)]
fn state_wanted(old: u8, new: u8) -> bool {
    (tcp::is_teardown(new) || new == tcp::CLOSE) && old != tcp::CLOSE && old != tcp::LISTEN && old != new
}

#[inline(always)]
fn try_state(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    let old = ctx.arg::<i32>(1) as u8;
    let new = ctx.arg::<i32>(2) as u8;

    if !state_wanted(old, new) {
        return Ok(());
    }
    let protocol: u16 = field(sk, layout!(sk_protocol));
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let c = Btf(sk);
    if layout!(netns_only) != 0 && !wanted(c.netns()?) {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if (old == tcp::ESTABLISHED && new == tcp::FIN_WAIT1) || (old == tcp::CLOSE_WAIT && new == tcp::LAST_ACK) {
        closed_by(c.netns()?, new == tcp::FIN_WAIT1);
    }

    // Leaving `old`: its entry time gives the duration. Teardown to teardown updates the entry
    // in place (no delete and insert).
    let mut entered = 0u64;
    let mut known = false;
    let mut kept = false;
    if let Some(e) = SOCKS.get_ptr_mut(sk) {
        let e = unsafe { &mut *e };
        known = true;
        if e.state == old {
            entered = e.entered_ns;
        }
        gauge(e.state, -1);
        if tcp::is_teardown(new) {
            e.state = new;
            e.entered_ns = now;
            gauge(new, 1);
            kept = true;
        } else {
            let _ = SOCKS.remove(sk);
        }
    }

    let mut to = new;
    let reset_before = new == tcp::CLOSE && take_notes(sk);
    if new == tcp::CLOSE && (old == tcp::FIN_WAIT1 || old == tcp::FIN_WAIT2 || old == tcp::CLOSING) {
        if let Some(h) = take_handoff(&c) {
            // The connection lives on as a timewait socket: RFC 793's view is old -> TIME_WAIT,
            // or no change at all for an orphaned FIN_WAIT2 that the kernel keeps as one.
            if h.state == old {
                if entered != 0 {
                    if let Some(tw) = TIMEWAIT.get_ptr_mut(h.tw) {
                        unsafe { (*tw).entered_ns = entered };
                    }
                }
                if report_all() {
                    report(&c, sk, kind::TRANSITION, old, old, now, 0)?;
                }
                return Ok(());
            }
            to = h.state;
        } else if handoff_due(sk, old, reset_before) {
            // The kernel meant to hand the connection over and could not: no timewait socket
            // (tcp_max_tw_buckets reached, or no memory).
            count(counter::HANDOFF_MISSED);
            note_unconfirmed(sk);
        }
    }

    if tcp::is_teardown(new) && !kept {
        let entry = SockEntry { entered_ns: now, expires: 0, state: new, ..SockEntry::default() };
        if SOCKS.insert(sk, entry, 0).is_ok() {
            gauge(new, 1);
        } else if count_warn(counter::SOCKS_FULL) {
            warn!(ctx, "twmon: socket map full; raise --bpf.max-sockets");
        }
    }
    record(old, to, entered, now);
    // The agent lets go of seeded sockets (in a teardown state the programs did not know) when
    // they move.
    if (tcp::is_teardown(old) && !known) || report_all() {
        report(&c, sk, kind::TRANSITION, old, to, now, entered)?;
    }
    Ok(())
}

/// Counts a close for the process that made it: these two state changes happen only in the
/// close() or shutdown() of the socket's owner, so the current task is the closer. Its process
/// is named after the main thread (a worker thread's name, such as nginx's or a JVM's, would
/// split one process into many).
#[inline(always)]
fn closed_by(netns: u32, active: bool) {
    let Some(comm) = process_name() else { return };
    let key = CloserKey { comm, netns };
    let mut closes = CLOSERS.get_ptr_mut(&key);
    if closes.is_none() {
        // Another CPU may add the same key meanwhile: then this insert fails and the lookup finds
        // theirs.
        let _ = CLOSERS.insert(&key, &Closes::default(), BPF_NOEXIST);
        closes = CLOSERS.get_ptr_mut(&key);
    }
    let Some(c) = closes else {
        count(counter::CLOSERS_FULL);
        return;
    };
    // SAFETY: a map value, valid for this program run; both cells are added to atomically.
    unsafe {
        if active {
            add(&raw mut (*c).active, 1u64);
        } else {
            add(&raw mut (*c).passive, 1u64);
        }
    }
}

/// The current process's name: its main thread's `comm`.
#[inline(always)]
fn process_name() -> Option<[u8; 16]> {
    // SAFETY: a helper without arguments; it returns the current task's address.
    let task = unsafe { bpf_get_current_task() };
    let leader: u64 = kread(task + layout!(task_group_leader) as u64).ok()?;
    kread(leader + layout!(task_comm) as u64).ok()
}

/// Whether a full socket's `old -> CLOSE` with no timewait socket for it is a hand-off the
/// kernel could not make (tcp_max_tw_buckets reached, or no memory) rather than an abort.
///
/// The kernel hands a connection over from FIN_WAIT2 or CLOSING only (from FIN_WAIT1 it moves
/// to FIN_WAIT2 first), and only once the application closed the socket (`SOCK_DEAD`) or the
/// peer's FIN arrived (`SOCK_DONE`): a close() or connect(AF_UNSPEC) that aborts has done
/// neither yet. Aborts on other paths set the error the application sees (a reset taken, a
/// timeout) before the close, or send a reset: just before it (an orphan's FIN_WAIT2 timeout,
/// `reset_before`) or right after it on the same CPU (data after close, `SO_LINGER` 0 or
/// unread data on a FIN_WAIT2 socket), when `twmon_send_reset` takes the count back. What is
/// left: an `SO_LINGER` 0 close of a CLOSING socket whose FIN was sent, which neither sends a
/// reset nor sets an error.
#[inline(always)]
fn handoff_due(sk: u64, old: u8, reset_before: bool) -> bool {
    if (old != tcp::FIN_WAIT2 && old != tcp::CLOSING) || reset_before {
        return false;
    }
    if field::<i32>(sk, layout!(sk_err)) != 0 {
        return false;
    }
    let flags: u64 = field(sk, layout!(sk_flags));
    flags & layout!(sk_flags_dead_or_done) as u64 != 0
}

/// A full socket as the reset notes know it: its address and connection (a new one may be
/// made in the same memory, on the same 4-tuple when ports are few).
#[inline(always)]
fn note_of(sk: u64) -> Option<Handoff> {
    let (net, dport, hash) = Btf(sk).identity().ok()?;
    Some(Handoff { tw: sk, net, dport, hash, state: 0, _pad: [0; 7] })
}

/// The per-CPU notes for the close of a full socket: whether this socket sent a reset just
/// before. Both notes are good for one close only, so both are cleared: the reset that
/// confirms an abort comes right after the close, before any other close on this CPU.
#[inline(always)]
fn take_notes(sk: u64) -> bool {
    let Some(all) = HANDOFF.get_ptr_mut(0) else { return false };
    // SAFETY: a per-CPU map value, valid for this program run.
    let all = unsafe { &mut *all };
    let before = all.reset_by.tw == sk && note_of(sk).is_some_and(|n| all.reset_by.same(&n));
    all.reset_by.tw = 0;
    all.unconfirmed.tw = 0;
    before
}

/// Notes a close counted as a missed hand-off, for a reset right after it to take back.
#[inline(always)]
fn note_unconfirmed(sk: u64) {
    if let (Some(all), Some(n)) = (HANDOFF.get_ptr_mut(0), note_of(sk)) {
        // SAFETY: a per-CPU map value, valid for this program run.
        unsafe { (*all).unconfirmed = n };
    }
}

/// A full socket sent a reset. From CLOSE, right after its close: an abort, so a close just
/// counted as a missed hand-off is taken back. From FIN_WAIT2: an orphan timing out, whose
/// close follows.
#[inline(always)]
fn reset_sent(sk: u64) {
    let state: u8 = field(sk, layout!(skc_state));
    if state != tcp::CLOSE && state != tcp::FIN_WAIT2 {
        return;
    }
    let (Some(all), Some(this)) = (HANDOFF.get_ptr_mut(0), note_of(sk)) else { return };
    // SAFETY: a per-CPU map value, valid for this program run.
    let all = unsafe { &mut *all };
    if state == tcp::FIN_WAIT2 {
        all.reset_by = this;
    } else if all.unconfirmed.same(&this) {
        all.unconfirmed.tw = 0;
        if let Some(p) = COUNTERS.get_ptr_mut(counter::HANDOFF_MISSED) {
            add(p, u64::MAX); // minus one, on the CPU that counted it
        }
    }
}

/// Tells the agent about a full socket (a transition, unless `kind` says otherwise).
#[inline(always)]
fn report<S: SockCommon>(c: &S, sk: u64, kind: u8, from: u8, to: u8, now: u64, entered: u64) -> Result<(), i64> {
    let mut ev = Event { ts_ns: now, obj: sk, netns: c.netns()?, kind, from, to, ..Event::default() };
    c.fill(&mut ev)?;
    // inet_sport, as the classic tracepoint reports it: skc_num is zeroed on some paths to CLOSE.
    ev.sport = u16::from_be(kread(sk + layout!(inet_sport) as u64)?);
    (ev.duration_ns, ev.flags) = since(now, entered);
    emit(&ev);
    Ok(())
}

/// The timewait socket this CPU just created for `sk`, if it is one of them.
#[inline(always)]
fn take_handoff(c: &Btf) -> Option<Handoff> {
    let all = HANDOFF.get_ptr_mut(0)?;
    let (net, dport, hash) = c.identity().ok()?;
    for i in 0..HANDOFF_SLOTS {
        // SAFETY: a per-CPU map value, used only by this CPU's programs, which do not nest here.
        let slot = unsafe { &mut (*all).slots[i] };
        if slot.tw != 0 && slot.net == net && slot.dport == dport && slot.hash == hash {
            let h = *slot;
            slot.tw = 0;
            return Some(h);
        }
    }
    None
}

/// Keeps a new timewait socket for the hand-off that follows: in a free slot, else over the
/// oldest.
#[inline(always)]
fn put_handoff(h: Handoff) {
    let Some(all) = HANDOFF.get_ptr_mut(0) else { return };
    // SAFETY: as in `take_handoff`.
    let all = unsafe { &mut *all };
    let mut at = (all.next as usize) % HANDOFF_SLOTS;
    for i in 0..HANDOFF_SLOTS {
        if all.slots[i].tw == 0 {
            at = i;
            break;
        }
    }
    all.slots[at] = h;
    all.next = (at as u32 + 1) % HANDOFF_SLOTS as u32;
}

// ---------------------------------------------------------------------------------------------
// Timewait sockets: timer:timer_start, timer:timer_cancel and the sweep.

/// The timer tracepoints fire with the timer base's lock held and interrupts off: nothing can
/// nest in these programs on their CPU, so they need no twin (a skipped run would still be
/// counted, in `twmon_bpf_program_missed_total`).
#[btf_tracepoint(function = "timer_start")]
pub fn twmon_timer_start(ctx: BtfTracePointContext) -> u32 {
    let _ = try_timer_start(&ctx);
    0
}

#[inline(always)]
fn try_timer_start(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let timer: u64 = ctx.arg(0);
    // Every timer in the system passes here: look at the callback before anything else.
    let function: u64 = field(timer, layout!(timer_function));
    if function != layout!(tw_timer_handler) {
        return Ok(());
    }
    let expires: u64 = field(timer, layout!(timer_expires));
    let tw = timer - layout!(tw_timer) as u64;
    let now = unsafe { bpf_ktime_get_ns() };

    // A re-arm: the kernel detached the pending timer (our cancel handler took the socket out
    // of the map and told the agent) and now queues it again. The agent hears of it too, so
    // that it does not count the cancel as an end.
    if let Some(slot) = CANCELLED.get_ptr_mut(0) {
        let c = unsafe { *slot };
        if c.tw == tw {
            unsafe { (*slot).tw = 0 };
        }
        if c.tw == tw && tw_identity(tw) == Ok(c.identity) {
            let mut entry = c.entry;
            gauge(entry.state, 1);
            let substate: u8 = kread(tw + layout!(tw_substate) as u64)?;
            if entry.state == tcp::FIN_WAIT2 && substate == tcp::TIME_WAIT {
                to_time_wait(&mut entry, tw, now, true);
            } else {
                count(counter::REARMS);
                let mut ev = tw_event(tw, now)?;
                ev.kind = kind::REARM;
                ev.from = entry.state;
                ev.to = entry.state;
                emit(&ev);
            }
            entry.expires = expires;
            if TIMEWAIT.insert(tw, entry, 0).is_err() {
                gauge(entry.state, -1);
                count(counter::TIMEWAIT_FULL);
            }
            return Ok(());
        }
    }
    let hash: u32 = Live(tw).get(layout!(skc_hash))?;
    if let Some(e) = TIMEWAIT.get_ptr(tw) {
        let e = unsafe { *e };
        if e.hash == hash {
            return Ok(());
        }
        // An entry of another connection: a socket whose end went unseen, in whose memory this
        // one was made. That end is counted as missed; the new socket is followed.
        end_missed(&e, tw, now, found::TIMER_START);
    }

    // A new timewait socket.
    if layout!(netns_only) != 0 && !wanted(netns_of(tw)?) {
        return Ok(());
    }
    let substate: u8 = kread(tw + layout!(tw_substate) as u64)?;
    let state = if substate == tcp::FIN_WAIT2 { tcp::FIN_WAIT2 } else { tcp::TIME_WAIT };
    let entry = SockEntry { entered_ns: now, expires, state, hash, ..SockEntry::default() };
    if TIMEWAIT.insert(tw, entry, 0).is_err() {
        if count_warn(counter::TIMEWAIT_FULL) {
            warn!(ctx, "twmon: timewait map full; raise --bpf.max-timewait");
        }
        return Ok(());
    }
    gauge(state, 1);
    if state == tcp::FIN_WAIT2 && ORPHANS.insert(tw, 0u8, 0).is_err() {
        count(counter::ORPHANS_FULL);
    }
    let (net, dport, hash) = Live(tw).identity()?;
    put_handoff(Handoff { tw, net, dport, hash, state, _pad: [0; 7] });
    Ok(())
}

/// What tells a re-arm (the same timewait socket, its timer queued again at once) from a new
/// timewait socket in the memory of one just freed: the connection's identity, and its send
/// sequence, which is fixed for a timewait socket's life and differs for a new connection on the
/// same 4-tuple (a SYN that reopened it starts from a new initial sequence number).
#[inline(always)]
fn tw_identity(tw: u64) -> Result<(u64, u32, u32, u32), i64> {
    let (net, dport, hash) = Live(tw).identity()?;
    Ok((net, dport, hash, kread(tw + layout!(tw_snd_nxt) as u64)?))
}

/// A timewait socket's record for the agent.
#[inline(always)]
fn tw_event(tw: u64, now: u64) -> Result<Event, i64> {
    let mut ev = Event { ts_ns: now, obj: tw, netns: netns_of(tw)?, flags: flags::TIMEWAIT, ..Event::default() };
    Live(tw).fill(&mut ev)?;
    ev.sport = Live(tw).get(layout!(skc_num))?;
    Ok(ev)
}

/// An orphaned FIN_WAIT2 timewait socket got its FIN: FIN_WAIT2 -> TIME_WAIT at `at`. The
/// agent hears of it when `report` (it settles a cancel the agent holds) or while it seeds.
#[inline(always)]
fn to_time_wait(entry: &mut SockEntry, tw: u64, at: u64, report: bool) {
    record(tcp::FIN_WAIT2, tcp::TIME_WAIT, entry.entered_ns, at);
    if report || report_all() {
        if let Ok(mut ev) = tw_event(tw, at) {
            ev.kind = kind::TRANSITION;
            ev.from = tcp::FIN_WAIT2;
            ev.to = tcp::TIME_WAIT;
            let (d, f) = since(at, entry.entered_ns);
            ev.duration_ns = d;
            ev.flags |= f;
            emit(&ev);
        }
    }
    gauge(tcp::FIN_WAIT2, -1);
    gauge(tcp::TIME_WAIT, 1);
    entry.state = tcp::TIME_WAIT;
    entry.entered_ns = at;
    let _ = ORPHANS.remove(tw);
}

/// When a silent FIN_WAIT2 -> TIME_WAIT happened: the kernel restarted the timer with
/// TCP_TIMEWAIT_LEN at that moment, so `expires - TCP_TIMEWAIT_LEN` is its jiffy.
#[inline(always)]
fn change_time(expires: u64, now: u64, now_jiffies: u64) -> u64 {
    let s = settings();
    let at = expires.wrapping_sub(s.timewait_len_jiffies);
    if s.ns_per_jiffy == 0 || at > now_jiffies {
        return now;
    }
    let back = (now_jiffies - at) * s.ns_per_jiffy;
    if back < now { now - back } else { now }
}

/// Bring an entry up to date with its socket: a silent substate change or re-arm.
#[inline(always)]
fn refresh(entry: &mut SockEntry, tw: u64, expires: u64, now: u64, now_jiffies: u64) -> Result<(), i64> {
    let substate: u8 = kread(tw + layout!(tw_substate) as u64)?;
    if entry.state == tcp::FIN_WAIT2 && substate == tcp::TIME_WAIT {
        // A timer we have not seen move is being re-armed for this very change (the kernel
        // sets the substate, then restarts the timer); a timer that moved was restarted then.
        let at = if expires == entry.expires { now } else { change_time(expires, now, now_jiffies) };
        to_time_wait(entry, tw, at, false);
    } else if entry.state == tcp::TIME_WAIT && expires != entry.expires {
        count(counter::REARMS);
    }
    entry.expires = expires;
    Ok(())
}

/// Without a twin, as `twmon_timer_start`.
#[btf_tracepoint(function = "timer_cancel")]
pub fn twmon_timer_cancel(ctx: BtfTracePointContext) -> u32 {
    let _ = try_timer_cancel(&ctx);
    0
}

#[inline(always)]
fn try_timer_cancel(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let timer: u64 = ctx.arg(0);
    // Every timer in the system passes here: look at the callback before touching a map.
    // timer_shutdown() clears it, so a NULL callback may be a timewait timer being killed.
    let function: u64 = field(timer, layout!(timer_function));
    if function != layout!(tw_timer_handler) && function != 0 {
        return Ok(());
    }
    let tw = timer - layout!(tw_timer) as u64;
    let mut entry = match unsafe { TIMEWAIT.get(tw) } {
        Some(e) => *e,
        // A NULL callback not in our map is any timer being shut down: not ours to report.
        None if function == 0 => return Ok(()),
        None => return untracked_end(tw, timer),
    };
    if Live(tw).get::<u32>(layout!(skc_hash)) != Ok(entry.hash) {
        // The entry is of a socket whose end went unseen, and this is another one in its memory.
        end_missed(&entry, tw, unsafe { bpf_ktime_get_ns() }, found::TIMER_CANCEL);
        return untracked_end(tw, timer);
    }
    let _ = TIMEWAIT.remove(tw);
    let now = unsafe { bpf_ktime_get_ns() };
    let now_jiffies = unsafe { bpf_jiffies64() };
    let expires: u64 = field(timer, layout!(timer_expires));
    let _ = refresh(&mut entry, tw, expires, now, now_jiffies);
    gauge(entry.state, -1);

    // A connect() that took the 4-tuple over is an end no re-arm follows: counted here. It is
    // told first, as it may take a socket whose timer is due (in the batch of timers expiring
    // on another CPU). Timers never run early, so otherwise a due timer being detached is the
    // expiry itself: counted here too. Before that, a re-arm may follow at once: the agent
    // decides.
    let why = if reused(tw) {
        Some(reason::REUSE)
    } else if (now_jiffies.wrapping_sub(expires) as i64) >= 0 {
        Some(if entry.state == tcp::FIN_WAIT2 { reason::FIN_TIMEOUT } else { reason::EXPIRED })
    } else {
        None
    };
    if let Some(why) = why {
        let _ = ORPHANS.remove(tw);
        end(&entry, tw, why, now, 0);
        return Ok(());
    }
    let mut ev = tw_event(tw, now)?;
    ev.kind = kind::TW_CANCEL;
    ev.from = entry.state;
    ev.to = tcp::CLOSE;
    let (d, f) = since(now, entry.entered_ns);
    ev.duration_ns = d;
    ev.flags |= f;
    ev.reason = reason::KILLED;
    if let Some(slot) = CANCELLED.get_ptr_mut(0) {
        unsafe { *slot = Cancelled { tw, entry, identity: tw_identity(tw).unwrap_or_default() } };
    }
    emit(&ev);
    Ok(())
}

/// A timewait socket ended in a way the kernel programs can tell on their own: counted here,
/// reported only while the agent seeds.
#[inline(always)]
fn end(entry: &SockEntry, tw: u64, why: u8, now: u64, extra: u16) {
    record(entry.state, tcp::CLOSE, entry.entered_ns, now);
    count(counter::TIMEWAIT_ENDS + why as u32);
    if report_all() {
        if let Ok(mut ev) = tw_event(tw, now) {
            ev.kind = kind::TRANSITION;
            ev.from = entry.state;
            ev.to = tcp::CLOSE;
            ev.reason = why;
            ev.flags |= extra;
            emit(&ev);
        }
    }
}

/// A timewait socket we do not follow ends or is re-armed: tell the agent while it holds
/// sockets it seeded from sock_diag, so it can let go of this one.
#[inline(always)]
fn untracked_end(tw: u64, timer: u64) -> Result<(), i64> {
    if settings().seeded == 0 {
        return Ok(());
    }
    if layout!(netns_only) != 0 && !wanted(netns_of(tw)?) {
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let mut ev = tw_event(tw, now)?;
    ev.kind = kind::UNTRACKED_END;
    ev.from = kread(tw + layout!(tw_substate) as u64)?;
    ev.to = tcp::CLOSE;
    // A due timer is the expiry; a TIME_WAIT socket's timer was last set 2MSL before it.
    let now_jiffies = unsafe { bpf_jiffies64() };
    let expires: u64 = field(timer, layout!(timer_expires));
    if (now_jiffies.wrapping_sub(expires) as i64) >= 0 {
        if ev.from == tcp::TIME_WAIT {
            ev.reason = reason::EXPIRED;
            (ev.duration_ns, ev.flags) = (now - change_time(expires, now, now_jiffies), ev.flags | flags::DURATION);
        } else {
            ev.reason = reason::FIN_TIMEOUT;
        }
    }
    emit(&ev);
    Ok(())
}

/// Whether a `connect()` took over this timewait socket's 4-tuple (tcp_tw_reuse): the kernel
/// takes such a socket out of the connection hash before it stops its timer, and every other
/// end (expiry, a reset, a reopening SYN, a namespace's teardown) stops the timer first. So a
/// timewait socket no longer hashed when its timer is cancelled is one a connect() reused.
#[inline(always)]
fn reused(tw: u64) -> bool {
    kread::<u64>(tw + layout!(skc_nulls_pprev) as u64) == Ok(0)
}

/// Run by the agent (BPF_PROG_TEST_RUN), never attached: brings the orphaned FIN_WAIT2
/// timewait sockets up to date (those that got their FIN are TIME_WAIT now), and records a clock
/// pair so the agent can measure HZ. Silent re-arms of TIME_WAIT sockets are found at their end.
/// Needs `bpf_for_each_map_elem` (Linux 5.13); before that the agent walks the map itself and
/// runs `twmon_sweep_one` for each key.
#[raw_tracepoint(tracepoint = "twmon_sweep")]
pub fn twmon_sweep(_ctx: RawTracePointContext) -> i32 {
    sample_clock();
    let visited = unsafe {
        bpf_for_each_map_elem(&ORPHANS as *const _ as *mut c_void, sweep_cb as *mut c_void, core::ptr::null_mut(), 0)
    };
    visited as i32
}

/// `twmon_sweep` over every timewait entry, ending those whose socket is gone (see
/// [`sweep_one`]); the agent runs it at reconciles. A program of its own rather than an argument
/// of `twmon_sweep`: a main program with callbacks that reads its context fails to load on 6.1.
#[raw_tracepoint(tracepoint = "twmon_sweep_all")]
pub fn twmon_sweep_all(_ctx: RawTracePointContext) -> i32 {
    sample_clock();
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
fn sample_clock() {
    let now = unsafe { bpf_ktime_get_ns() };
    let jiffies = unsafe { bpf_jiffies64() };
    if let Some(c) = CLOCK.get_ptr_mut(0) {
        unsafe { *c = ClockSample { ktime_ns: now, jiffies } };
    }
}

#[inline(never)]
extern "C" fn sweep_cb(_map: *mut c_void, key: *const u64, _value: *mut u8, _ctx: *mut c_void) -> i64 {
    sweep_one(unsafe { *key }, false);
    0
}

#[inline(never)]
extern "C" fn sweep_all_cb(_map: *mut c_void, key: *const u64, _value: *mut SockEntry, _ctx: *mut c_void) -> i64 {
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
fn sweep_one(tw: u64, all: bool) {
    let Some(seen) = (unsafe { TIMEWAIT.get(tw) }).copied() else {
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
    let now = unsafe { bpf_ktime_get_ns() };
    // The very entry seen: a re-arm on another CPU takes it out and puts it back with the
    // timer's new expiry (or a new state), and its timer is out of the wheel in between.
    let still_this = || {
        unsafe { TIMEWAIT.get(tw) }.is_some_and(|e| {
            e.hash == seen.hash && e.expires == seen.expires && e.state == seen.state && e.entered_ns == seen.entered_ns
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
    if seen.state != tcp::FIN_WAIT2 || kread::<u8>(tw + layout!(tw_substate) as u64) != Ok(tcp::TIME_WAIT) {
        return;
    }
    let Ok(expires) = kread::<u64>(timer + layout!(timer_expires) as u64) else { return };
    // A timer we have not seen move is being re-armed for this very change (the kernel sets the
    // substate, then restarts the timer); a timer that moved was restarted then.
    let at = if expires == seen.expires { now } else { change_time(expires, now, unsafe { bpf_jiffies64() }) };
    let mut entry = SockEntry { expires, ..seen };
    let changed = SockEntry { state: tcp::TIME_WAIT, entered_ns: at, ..entry };
    if still_this() && TIMEWAIT.insert(tw, changed, BPF_EXIST).is_ok() {
        to_time_wait(&mut entry, tw, at, false);
    }
}

/// A timewait entry whose socket ended without our cancel program seeing it: ended here,
/// counted as missed, and told to the agent with where it was found (`found::*`).
#[inline(always)]
fn end_missed(entry: &SockEntry, tw: u64, now: u64, at: u8) {
    gauge(entry.state, -1);
    count(counter::TIMEWAIT_MISSED);
    end(entry, tw, reason::KILLED, now, flags::SILENT);
    let mut ev = Event {
        ts_ns: now,
        obj: tw,
        kind: kind::MISSED_END,
        from: entry.state,
        to: tcp::CLOSE,
        reason: at,
        ..Event::default()
    };
    (ev.duration_ns, ev.flags) = since(now, entry.entered_ns);
    emit(&ev);
    let _ = TIMEWAIT.remove(tw);
    let _ = ORPHANS.remove(tw);
}

/// Whether the timewait socket of a map entry (of connection `hash`) ended without our cancel
/// program seeing it, and if so, how that shows (`found::SWEEP_*`).
#[inline(always)]
fn gone(tw: u64, timer: u64, hash: u32) -> Option<u8> {
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
    let Some(e) = (unsafe { SOCKS.get(sk) }) else { return 0 };
    let mut found = 0u64;
    close_wait_check(sk, *e, &mut found);
    found as i32
}

#[inline(never)]
extern "C" fn close_wait_cb(_map: *mut c_void, key: *const u64, value: *mut SockEntry, found: *mut c_void) -> i64 {
    let found = unsafe { &mut *(found as *mut u64) };
    close_wait_check(unsafe { *key }, unsafe { *value }, found)
}

/// Reports `sk` if it has been in CLOSE_WAIT since before the threshold and fewer than the scan
/// limit were reported so far (`found`). Returns 1 to stop a walk at the limit.
#[inline(always)]
fn close_wait_check(sk: u64, e: SockEntry, found: &mut u64) -> i64 {
    let s = settings();
    if e.state != tcp::CLOSE_WAIT || e.entered_ns > s.close_wait_before {
        return 0;
    }
    if *found >= s.scan_limit {
        return 1;
    }
    *found += 1;
    let _ = report(&Live(sk), sk, kind::CLOSE_WAIT_AGE, tcp::CLOSE_WAIT, tcp::CLOSE_WAIT, e.entered_ns, 0);
    0
}

// ---------------------------------------------------------------------------------------------
// Retransmits and resets: counted in the kernel by state, no event.

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn twmon_retransmit(ctx: BtfTracePointContext) -> u32 {
    // Since 6.17 the tracepoint also fires for retransmits that could not be sent.
    if layout!(retransmit_has_err) != 0 && ctx.arg::<i32>(2) != 0 {
        return 0;
    }
    count_by_state(ctx.arg(0), counter::RETRANSMITS);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn twmon_send_reset(ctx: BtfTracePointContext) -> u32 {
    // The socket is NULL for a reset to a segment no socket owns: not counted.
    let sk: u64 = ctx.arg(0);
    count_by_state(sk, counter::RESETS_SENT);
    if sk != 0 {
        reset_sent(sk);
    }
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn twmon_receive_reset(ctx: BtfTracePointContext) -> u32 {
    count_by_state(ctx.arg(0), counter::RESETS_RECEIVED);
    0
}

/// Counts `base + state of sk` when `sk` is one the agent watches.
#[inline(always)]
fn count_by_state(sk: u64, base: u32) {
    if sk == 0 || !in_scope(sk) {
        return;
    }
    let state: u8 = field(sk, layout!(skc_state));
    count(base + (state as u32 % tcp::MAX_STATES));
}

#[inline(always)]
fn in_scope(sk: u64) -> bool {
    layout!(netns_only) == 0 || Btf(sk).netns().map(wanted).unwrap_or(false)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
