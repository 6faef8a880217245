//! The layout the agent fills in at load time, and every map the programs share with it.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use monitor_common::{
    CLOSER_SLOTS, ClockSample, CloserKey, Closes, KernelLayout, Lifecycle, MAX_CLOSERS, Settings,
    SockEntry, counter, tcp, twin,
};

use crate::{handoff::Handoffs, timewait::Cancelled, twin::Ran};

/// Filled in by the agent at load time (`EbpfLoader::set_global`); read-only to the verifier,
/// which prunes what it makes unreachable.
#[unsafe(no_mangle)]
// SAFETY: all zeroes is a valid KernelLayout, whose fields are plain integers.
pub(crate) static LAYOUT: KernelLayout = unsafe { core::mem::zeroed() };

/// A field of [`LAYOUT`], read so that the compiler cannot fold it to the zero it holds at build
/// time (the verifier folds it to the agent's value instead).
macro_rules! layout {
    ($field:ident) => {{
        #[allow(unused_unsafe)]
        // SAFETY: a plain read of a static, which nothing writes after load.
        let v = unsafe { core::ptr::read_volatile(&$crate::maps::LAYOUT.$field) };
        v
    }};
}
pub(crate) use layout;

/// Lifecycle records for the agent. The agent sets the size at load time.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 21, 0);

/// Every transition and timewait end, written only while someone traces (`twmon trace`). Apart
/// from `EVENTS`, so that a busy trace can never cost the counts a record.
#[map]
pub(crate) static TRACE: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Full sockets in a teardown state: when they entered it. Bounded; a full map is counted.
/// Preallocated, like TIMEWAIT: an insert then allocates nothing (measured: about a fifth of the
/// state program's time), at the price of memory reserved up front (the agent sizes both).
#[map]
pub(crate) static SOCKS: HashMap<u64, SockEntry> = HashMap::with_max_entries(65_536, 0);

/// Timewait sockets, keyed by the address of their `inet_timewait_sock`.
#[map]
pub(crate) static TIMEWAIT: HashMap<u64, SockEntry> = HashMap::with_max_entries(262_144, 0);

/// The timewait sockets still in FIN_WAIT2 (orphans waiting for the peer's FIN): the only
/// ones whose state the kernel changes without any event, so the only ones the sweep visits.
/// Small on purpose: the sweep's cost is the number of buckets. Preallocated like the others:
/// allocating from a timer tracepoint is unsafe before Linux 6.1 (5.10 warns with a kernel
/// backtrace, "trace type BPF program uses run-time allocation").
#[map]
pub(crate) static ORPHANS: HashMap<u64, u8> = HashMap::with_max_entries(16_384, 0);

/// Connections closed, by process name and namespace (see `closed_by`). Preallocated, as the
/// others.
#[map]
pub(crate) static CLOSERS: HashMap<CloserKey, Closes> = HashMap::with_max_entries(MAX_CLOSERS, 0);

/// Which closer owns each cell of `TIMEWAIT_HELD`: a cell is taken by an insert that fails when
/// another closer has it, which is atomic on every kernel (a compare-and-exchange on a map value
/// needs Linux 5.12).
#[map]
pub(crate) static CLOSER_SLOT_OWNERS: HashMap<u32, CloserKey> =
    HashMap::with_max_entries(MAX_CLOSERS, 0);

/// Per CPU, by closer cell: TIME_WAIT sockets entering (+1) and leaving (-1), of connections
/// that closer closed first. Their sum is what the closer holds now.
#[map]
pub(crate) static TIMEWAIT_HELD: PerCpuArray<i64> = PerCpuArray::with_max_entries(CLOSER_SLOTS, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Transitions and state durations, per CPU; one element, so the agent reads it in one call.
#[map]
pub(crate) static LIFECYCLE: PerCpuArray<Lifecycle> = PerCpuArray::with_max_entries(1, 0);

/// Sockets entering (+1) and leaving (-1) each state, per CPU; their sum is the gauge.
#[map]
pub(crate) static GAUGES: PerCpuArray<i64> = PerCpuArray::with_max_entries(tcp::MAX_STATES, 0);

/// The timewait sockets this CPU created last, for matching the full socket's hand-off. More
/// than one: when the hand-off runs in process context (a segment queued while the application
/// held the socket, processed when it let go), softirqs may run between the timer's start and
/// the full socket's `X -> CLOSE`, and do hand-offs of their own (measured under nginx and wrk).
#[map]
pub(crate) static HANDOFF: PerCpuArray<Handoffs> = PerCpuArray::with_max_entries(1, 0);

/// The timewait socket whose timer this CPU cancelled last, kept so a re-arm can restore it.
#[map]
pub(crate) static CANCELLED: PerCpuArray<Cancelled> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, by `twin::*`: the events that program ran for last, for its twin (see `primary`).
#[map]
pub(crate) static RAN: PerCpuArray<Ran> = PerCpuArray::with_max_entries(twin::COUNT, 0);

#[map]
pub(crate) static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static CLOCK: Array<ClockSample> = Array::with_max_entries(1, 0);
