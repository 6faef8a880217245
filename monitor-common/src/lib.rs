//! Types shared by the kernel programs (`monitor-ebpf`) and the agent (`monitor`).
//!
//! Everything here is `#[repr(C)]` with explicit padding and a compile-time size check, so
//! both sides agree on the bytes without relying on the compiler's layout choices.
//!
//! Over 400 lines on purpose: every byte the two sides exchange (map keys and values, records,
//! settings) is laid out here, next to the others it must not collide with; each type is small.
#![cfg_attr(target_arch = "bpf", no_std)]

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
    /// One past the highest state number: the size of per-state arrays.
    pub const MAX_STATES: u32 = 13;

    /// The states a connection passes through while it is being torn down, the ones the kernel
    /// programs keep a per-socket entry time for.
    #[inline(always)]
    pub const fn is_teardown(state: u8) -> bool {
        matches!(state, FIN_WAIT1 | FIN_WAIT2 | CLOSE_WAIT | CLOSING | LAST_ACK | TIME_WAIT)
    }
}

/// What an [`Event`] reports.
pub mod kind {
    /// A socket moved from `from` to `to`. For a timewait socket ending at 2MSL, `to` is CLOSE
    /// and `reason` is [`super::reason::EXPIRED`].
    pub const TRANSITION: u8 = 1;
    /// A timewait socket's timer was cancelled before it was due. If the kernel re-arms it at
    /// once a [`REARM`] with the same `obj` follows; otherwise the socket ended early and
    /// `reason` says what the kernel program could tell about why.
    pub const TW_CANCEL: u8 = 2;
    /// A timewait socket's 2MSL timer was restarted (a segment, normally a retransmitted FIN,
    /// reached it). `flags` has [`super::flags::SILENT`] when the kernel re-armed the timer
    /// without a trace event and the sweep or the socket's end found it.
    pub const REARM: u8 = 3;
    /// The timer of a timewait socket the kernel programs do not follow (it existed before the
    /// agent started) was cancelled: it ended, or is being re-armed (then it is followed from
    /// now on). Sent only while the agent holds sockets seeded from sock_diag.
    pub const UNTRACKED_END: u8 = 4;
    /// A socket in CLOSE_WAIT since `ts_ns`, found by the agent's leak scan (a program it runs
    /// itself over the kernel's socket map): only sockets older than the leak threshold cross.
    pub const CLOSE_WAIT_AGE: u8 = 5;
    /// A followed timewait socket ended without the cancel program seeing it (counted in the
    /// kernel as missed and as killed); `reason` says where it was found ([`super::found`]),
    /// `duration_ns` how long its entry had been in `from`. For the agent's log: a missed end
    /// is a defect to report.
    pub const MISSED_END: u8 = 6;
}

/// Where a missed timewait end was found (`reason` of a [`kind::MISSED_END`] record).
pub mod found {
    /// A new timewait socket's timer started in the memory of a followed one.
    pub const TIMER_START: u8 = 1;
    /// A timer cancelled in the memory of a followed timewait socket, of another connection.
    pub const TIMER_CANCEL: u8 = 2;
    /// The sweep: the timer's callback is no longer the timewait one.
    pub const SWEEP_CALLBACK: u8 = 3;
    /// The sweep: the memory holds another connection.
    pub const SWEEP_CONNECTION: u8 = 4;
    /// The sweep: the timer is not queued.
    pub const SWEEP_UNQUEUED: u8 = 5;

    pub fn name(at: u8) -> &'static str {
        match at {
            TIMER_START => "a timer started in its memory",
            TIMER_CANCEL => "a timer cancelled in its memory",
            SWEEP_CALLBACK => "the sweep (its timer's callback changed)",
            SWEEP_CONNECTION => "the sweep (its memory holds another connection)",
            SWEEP_UNQUEUED => "the sweep (its timer was not queued)",
            _ => "?",
        }
    }
}

/// Why a timewait socket ended.
pub mod reason {
    pub const NONE: u8 = 0;
    /// The 2MSL (or tcp_fin_timeout for an orphaned FIN_WAIT2) timer ran out.
    pub const EXPIRED: u8 = 1;
    /// A `connect()` took over the 4-tuple (net.ipv4.tcp_tw_reuse).
    pub const REUSE: u8 = 2;
    /// Ended by the kernel before its timer: an RST (RFC 1337 assassination), a new SYN that
    /// reopened the 4-tuple, or the network namespace being destroyed.
    pub const KILLED: u8 = 3;
    /// An orphaned FIN_WAIT2 kept as a timewait socket got no FIN within tcp_fin_timeout.
    pub const FIN_TIMEOUT: u8 = 4;
    pub const COUNT: u32 = 5;
}

/// Upper bounds of the state-duration histogram's buckets, in nanoseconds: 1 ms to 10 min,
/// dense around 2MSL (60 s on Linux; the timer wheel fires up to a few seconds late).
pub const DURATION_BOUNDS_NS: [u64; 22] = {
    const MS: u64 = 1_000_000;
    const S: u64 = 1000 * MS;
    [
        MS,
        5 * MS / 2,
        5 * MS,
        10 * MS,
        25 * MS,
        50 * MS,
        100 * MS,
        250 * MS,
        500 * MS,
        S,
        5 * S / 2,
        5 * S,
        10 * S,
        30 * S,
        59 * S,
        61 * S,
        63 * S,
        66 * S,
        90 * S,
        120 * S,
        300 * S,
        600 * S,
    ]
};

/// Slots per state in [`Lifecycle::durations`]: one per bound, one for +Inf, then the sum.
pub const DURATION_SLOTS: usize = DURATION_BOUNDS_NS.len() + 2;

/// The histogram bucket a duration falls in: the first bound it does not exceed, or
/// `DURATION_BOUNDS_NS.len()` (+Inf). Shared by the kernel programs and the agent.
#[inline(always)]
pub fn duration_bucket(ns: u64) -> usize {
    let mut i = 0;
    while i < DURATION_BOUNDS_NS.len() {
        if ns <= DURATION_BOUNDS_NS[i] {
            return i;
        }
        i += 1;
    }
    DURATION_BOUNDS_NS.len()
}

/// States per dimension of [`Lifecycle`]'s arrays: MAX_STATES rounded up to a power of two,
/// because the verifier bounds a state by the mask the compiler makes of the range check.
pub const STATES: usize = 16;
const _: () = assert!(STATES >= tcp::MAX_STATES as usize && STATES.is_power_of_two());

/// What the kernel programs count on their own, per CPU: every transition and the time spent
/// in the state it left. Only what needs a decision the kernel cannot make crosses the ring
/// buffer; the agent sums this array over CPUs at scrape time.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Lifecycle {
    /// `[from * STATES + to]`.
    pub transitions: [u64; STATES * STATES],
    /// `[state * DURATION_SLOTS + bucket]`: non-cumulative bucket counts, then the sum in ns.
    pub durations: [u64; STATES * DURATION_SLOTS],
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self { transitions: [0; STATES * STATES], durations: [0; STATES * DURATION_SLOTS] }
    }
}

impl Lifecycle {
    /// Adds another count (another CPU's, or the agent's own) to this one.
    pub fn add(&mut self, other: &Lifecycle) {
        for (a, b) in self.transitions.iter_mut().zip(other.transitions.iter()) {
            *a += b;
        }
        for (a, b) in self.durations.iter_mut().zip(other.durations.iter()) {
            *a += b;
        }
    }

    /// Counts a transition, with the time spent in `from` when it is known; a state out of
    /// range is ignored.
    #[inline(always)]
    pub fn count(&mut self, from: u8, to: u8, duration_ns: Option<u64>) {
        if (from as u32) < tcp::MAX_STATES && (to as u32) < tcp::MAX_STATES {
            self.count_with(from, to, duration_ns, |n, v| *n += v);
        }
    }

    /// [`Lifecycle::count`] with the addition given: the kernel programs add atomically, as a
    /// program nested on the same CPU may add to the same cell. No panicking index: the kernel
    /// programs use it too.
    #[inline(always)]
    pub fn count_with(
        &mut self,
        from: u8,
        to: u8,
        duration_ns: Option<u64>,
        add: impl Fn(&mut u64, u64),
    ) {
        // Masked, not checked: 5.10's verifier loses a checked bound on the way to the address
        // (of a state read from a map) and rejects the program; a mask it keeps. The kernel's
        // states are below STATES, so a mask changes none of them.
        let (f, t) = (from as usize & (STATES - 1), to as usize & (STATES - 1));
        if let Some(n) = self.transitions.get_mut(f * STATES + t) {
            add(n, 1);
        }
        if let Some(d) = duration_ns {
            if let Some(n) = self.durations.get_mut(f * DURATION_SLOTS + duration_bucket(d)) {
                add(n, 1);
            }
            if let Some(sum) = self.durations.get_mut(f * DURATION_SLOTS + DURATION_SLOTS - 1) {
                add(sum, d);
            }
        }
    }
}

/// Bits of [`Event::flags`].
pub mod flags {
    /// `duration_ns` holds the time spent in `from`.
    pub const DURATION: u16 = 1 << 0;
    /// `obj` is a timewait socket (`struct inet_timewait_sock`), not a full socket.
    pub const TIMEWAIT: u16 = 1 << 1;
    /// A re-arm the kernel made without a timer trace event (same timer-wheel bucket).
    pub const SILENT: u16 = 1 << 2;
}

/// One record on the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) when it happened.
    pub ts_ns: u64,
    /// Time spent in `from` when `flags & DURATION`.
    pub duration_ns: u64,
    /// Address of the kernel object; an identity only, never dereferenced by the agent.
    pub obj: u64,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    pub kind: u8,
    pub from: u8,
    pub to: u8,
    pub reason: u8,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Local and remote port, host byte order.
    pub sport: u16,
    pub dport: u16,
    pub flags: u16,
    /// Local and remote address, network byte order; IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Event>() == 72);

/// One record on the trace ring buffer: a transition or a timewait end as it happened.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceRecord {
    pub event: Event,
    /// The process that made the change, where it is the socket's owner's close() or
    /// shutdown() (`ESTABLISHED -> FIN_WAIT1`, `CLOSE_WAIT -> LAST_ACK`): its name (its main
    /// thread's `comm`) and its pid. Zeroes elsewhere.
    pub comm: [u8; 16],
    pub pid: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TraceRecord>() == 96);

/// Indexes into the per-CPU `COUNTERS` array.
pub mod counter {
    use super::tcp::MAX_STATES;
    /// A ring-buffer reservation failed: the event was dropped.
    pub const EVENTS_LOST: u32 = 0;
    /// The per-socket map was full: a socket's entry time was not kept.
    pub const SOCKS_FULL: u32 = 1;
    /// The timewait map was full: a timewait socket was not followed.
    pub const TIMEWAIT_FULL: u32 = 2;
    /// A full socket ended in the state of a timewait hand-off but no timewait socket matched it.
    pub const HANDOFF_MISSED: u32 = 3;
    /// A followed timewait socket whose end the cancel program did not see; the sweep ended it.
    pub const TIMEWAIT_MISSED: u32 = 4;
    /// The orphan map was full: an orphaned FIN_WAIT2's FIN is seen only at its timer's next
    /// event (a re-arm across a timer-wheel bucket, or its end).
    pub const ORPHANS_FULL: u32 = 5;
    /// The closers map was full: a close was not attributed to its process.
    pub const CLOSERS_FULL: u32 = 6;
    /// A trace record was dropped: the trace ring buffer was full (only while a trace runs).
    pub const TRACE_LOST: u32 = 7;
    /// `RETRANSMITS + state`: retransmitted segments by the socket's state (err == 0 only).
    pub const RETRANSMITS: u32 = 8;
    /// `RESETS_SENT + state`: RSTs sent, by the state of the socket that sent them.
    pub const RESETS_SENT: u32 = RETRANSMITS + MAX_STATES;
    /// `RESETS_RECEIVED + state`: RSTs received, by the state of the socket that got them.
    pub const RESETS_RECEIVED: u32 = RESETS_SENT + MAX_STATES;
    /// `TIMEWAIT_ENDS + reason`: timewait sockets whose end the kernel programs could decide
    /// on their own (2MSL or tcp_fin_timeout expiry, an end the sweep found); early ends
    /// (reuse, kill) are decided by the agent, which waits for a re-arm that may follow.
    pub const TIMEWAIT_ENDS: u32 = RESETS_RECEIVED + MAX_STATES;
    /// 2MSL timer restarts of TIME_WAIT sockets.
    pub const REARMS: u32 = TIMEWAIT_ENDS + super::reason::COUNT;
    /// `NESTED + twin`: events a nested twin handled because its program was skipped (see
    /// [`super::twin`]).
    pub const NESTED: u32 = REARMS + 1;
    pub const COUNT: u32 = NESTED + super::twin::COUNT;
}

/// The second argument of a test run of `twmon_sweep_one` (kernels without
/// `bpf_for_each_map_elem`).
pub mod sweep {
    /// Only the orphaned FIN_WAIT2 timewait sockets.
    pub const ORPHANS: u64 = 0;
    /// Every timewait entry, ending those whose socket is gone.
    pub const ALL: u64 = 1;
}

/// Programs that have a nested twin. The kernel skips a tracing program when the same program
/// is already running on the CPU: an interrupt that arrives while `twmon_state` runs in process
/// context and whose softirq changes another socket's state would lose that change. Each of
/// these programs is attached twice: the twin runs right after it and acts only while the
/// program's body is running on that CPU, that is, only when the kernel skipped the program
/// for a nested event.
pub mod twin {
    pub const STATE: u32 = 0;
    pub const COUNT: u32 = 1;
    /// (program, its twin), indexed by the constants above. The timer programs have none: their
    /// tracepoints fire with interrupts off, so nothing nests in them.
    pub const PROGRAMS: [(&str, &str); COUNT as usize] = [("twmon_state", "nested_state")];
}

/// Offsets and addresses of the running kernel, read by the agent at load time from BTF and
/// /proc/kallsyms, and handed to the kernel programs as a constant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// `struct sock_common` members.
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_hash: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `struct sock` -> `sk_protocol`, `struct inet_sock` -> `inet_sport`.
    pub sk_protocol: u32,
    pub inet_sport: u32,
    /// `struct net` -> `ns.inum`.
    pub net_inum: u32,
    /// `struct inet_timewait_sock` members.
    pub tw_substate: u32,
    pub tw_timer: u32,
    /// `struct sock_common` -> `skc_tw_snd_nxt` (`tw_snd_nxt`): fixed for a timewait socket's
    /// life, and different for a new connection on the same 4-tuple (its own initial sequence
    /// number).
    pub tw_snd_nxt: u32,
    /// `struct timer_list` members; `entry.pprev` is NULL while the timer is not queued.
    pub timer_expires: u32,
    pub timer_function: u32,
    pub timer_pprev: u32,
    /// 1 when `tcp_retransmit_skb` passes the transmit result (`err`, since 6.17): the
    /// tracepoint then also fires for retransmits that could not be sent.
    pub retransmit_has_err: u32,
    /// Address of `tw_timer_handler`, the callback of every timewait socket's timer.
    pub tw_timer_handler: u64,
    /// Only sockets of this network namespace when not 0.
    pub netns_only: u32,
    /// `struct sock` -> `sk_err`: set when a connection is aborted (reset, timeout).
    pub sk_err: u32,
    /// `struct sock_common` -> `skc_nulls_node.pprev`: NULL once out of the connection hash.
    pub skc_nulls_pprev: u32,
    /// `struct sock_common` -> `skc_flags` (`sk_flags`), and in it the bits of `SOCK_DEAD`
    /// (orphaned: the application closed it) and `SOCK_DONE` (the peer's FIN arrived).
    pub sk_flags: u32,
    pub sk_flags_dead_or_done: u32,
    /// `struct task_struct` -> `group_leader` and `comm`: the process (not the thread) that
    /// closed a connection.
    pub task_group_leader: u32,
    pub task_comm: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<KernelLayout>() == 26 * 4 + 16);

/// Who closed connections: a process name in a network namespace (the key of `CLOSERS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CloserKey {
    /// The process's name (its main thread's `comm`), NUL-padded.
    pub comm: [u8; 16],
    /// Network namespace inode.
    pub netns: u32,
}

/// How many connections a [`CloserKey`] closed: first (its close() or shutdown() took the
/// connection from ESTABLISHED to FIN_WAIT1) or second (from CLOSE_WAIT to LAST_ACK).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closes {
    pub active: u64,
    pub passive: u64,
    /// This closer's cell in `TIMEWAIT_HELD` (the TIME_WAIT sockets its closes created and that
    /// are still there), 0 for none: the cells ran out, see [`CLOSER_SLOTS`].
    pub slot: u32,
    pub _pad: u32,
}

/// Entries of the `CLOSERS` map: distinct process names per namespace (a closer past them is
/// counted in [`counter::CLOSERS_FULL`]).
pub const MAX_CLOSERS: u32 = 4096;

/// Cells of `TIMEWAIT_HELD`, one per closer (cell 0 is no closer's). Twice [`MAX_CLOSERS`], so
/// that a closer finds a free cell within a few probes from where its name hashes to.
pub const CLOSER_SLOTS: u32 = 2 * MAX_CLOSERS;
const _: () = assert!(CLOSER_SLOTS.is_power_of_two() && CLOSER_SLOTS <= u16::MAX as u32 + 1);

/// Per-socket entry of the kernel's socket and timewait maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockEntry {
    /// When the socket entered `state` (0 when unknown: it was there before the agent started).
    pub entered_ns: u64,
    /// For timewait sockets: the timer's `expires` (jiffies) as last seen.
    pub expires: u64,
    pub state: u8,
    pub _pad: u8,
    /// The closer's cell in `TIMEWAIT_HELD` ([`Closes::slot`]), from the close() that took the
    /// connection to FIN_WAIT1 (0: not seen), carried over to its timewait socket.
    pub closer: u16,
    /// For timewait sockets: the connection's established-hash (`skc_hash`), so that an entry
    /// is told from another socket that took its memory after its end went unseen.
    pub hash: u32,
}
const _: () = assert!(core::mem::size_of::<SockEntry>() == 24);

/// Clock pair written by the sweep program so the agent can measure the kernel's HZ.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ClockSample {
    pub ktime_ns: u64,
    pub jiffies: u64,
}

/// Run-time settings the agent writes into the `SETTINGS` array after load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// Nanoseconds per jiffy, measured at start-up; 0 until then.
    pub ns_per_jiffy: u64,
    /// TCP_TIMEWAIT_LEN in jiffies (60 * HZ).
    pub timewait_len_jiffies: u64,
    /// Non-zero while the agent holds timewait sockets seeded from sock_diag, which need
    /// [`kind::UNTRACKED_END`] events.
    pub seeded: u64,
    /// Non-zero while the agent seeds from sock_diag: every transition is reported, so that
    /// it leaves out of the seed the sockets the kernel programs follow already.
    pub report_all: u64,
    /// For the leak scan: report CLOSE_WAIT sockets that entered the state at or before this
    /// (CLOCK_MONOTONIC ns), at most `scan_limit` of them.
    pub close_wait_before: u64,
    pub scan_limit: u64,
    /// Non-zero while someone traces (`twmon trace`): every transition and timewait end is
    /// written to the trace ring buffer as a [`TraceRecord`]. Nothing is written otherwise.
    pub trace: u64,
    /// While tracing: when non-zero, only connections with this port at either end are written
    /// (every client filters on it), so the others cost no record.
    pub trace_port: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: repr(C), no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::TraceRecord {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::SockEntry {}
    unsafe impl aya::Pod for super::ClockSample {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::Lifecycle {}
    unsafe impl aya::Pod for super::CloserKey {}
    unsafe impl aya::Pod for super::Closes {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transitions(l: &Lifecycle, from: u8, to: u8) -> u64 {
        l.transitions[from as usize * STATES + to as usize]
    }

    /// The kernel programs and the agent count with the same code: a transition, its duration in
    /// the right bucket and in the sum; sums over CPUs add up.
    #[test]
    fn lifecycle_counts_and_adds() {
        let mut cpu0 = Lifecycle::default();
        cpu0.count(tcp::FIN_WAIT2, tcp::TIME_WAIT, Some(2_000_000));
        cpu0.count(tcp::TIME_WAIT, tcp::CLOSE, Some(60_500_000_000));
        cpu0.count(tcp::ESTABLISHED, tcp::CLOSE, None);
        let mut cpu1 = Lifecycle::default();
        cpu1.count(tcp::TIME_WAIT, tcp::CLOSE, Some(61_000_000_000));
        // Out of range: ignored, not a panic (the verifier would refuse a panicking index).
        cpu1.count(200, tcp::CLOSE, Some(1));
        cpu1.count(tcp::TIME_WAIT, 16, Some(1));

        let mut sum = Lifecycle::default();
        sum.add(&cpu0);
        sum.add(&cpu1);
        assert_eq!(transitions(&sum, tcp::TIME_WAIT, tcp::CLOSE), 2);
        assert_eq!(transitions(&sum, tcp::FIN_WAIT2, tcp::TIME_WAIT), 1);
        assert_eq!(transitions(&sum, tcp::ESTABLISHED, tcp::CLOSE), 1);
        assert_eq!(sum.transitions.iter().sum::<u64>(), 4);

        let tw = &sum.durations[tcp::TIME_WAIT as usize * DURATION_SLOTS..][..DURATION_SLOTS];
        // Both in the (60, 61] s bucket; the last slot is the sum in ns.
        assert_eq!(tw[duration_bucket(60_500_000_000)], 2);
        assert_eq!(DURATION_BOUNDS_NS[duration_bucket(60_500_000_000)], 61_000_000_000);
        assert_eq!(tw[..DURATION_SLOTS - 1].iter().sum::<u64>(), 2);
        assert_eq!(tw[DURATION_SLOTS - 1], 121_500_000_000);
        // No duration, no observation.
        let est = &sum.durations[tcp::ESTABLISHED as usize * DURATION_SLOTS..][..DURATION_SLOTS];
        assert!(est.iter().all(|n| *n == 0));
    }

    #[test]
    fn teardown_states() {
        for s in [
            tcp::FIN_WAIT1,
            tcp::FIN_WAIT2,
            tcp::CLOSE_WAIT,
            tcp::CLOSING,
            tcp::LAST_ACK,
            tcp::TIME_WAIT,
        ] {
            assert!(tcp::is_teardown(s), "{s}");
        }
        for s in [
            tcp::ESTABLISHED,
            tcp::SYN_SENT,
            tcp::SYN_RECV,
            tcp::CLOSE,
            tcp::LISTEN,
            tcp::NEW_SYN_RECV,
        ] {
            assert!(!tcp::is_teardown(s), "{s}");
        }
    }
}
