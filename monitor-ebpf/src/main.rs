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
//!
//! One module per concern, in the order of the data path:
//!
//! - [`maps`]: the layout the agent fills in at load time, and every map.
//! - [`kernel`] and [`sock`]: reading kernel memory, and sockets through their `sock_common`.
//! - [`count`] and [`agent`]: what is counted in the kernel, and what crosses the ring buffer.
//! - [`twin`]: the protocol between a program and its twin, for events nested in it.
//! - [`state`]: full sockets on `sock:inet_sock_set_state`; with it [`closers`] (who closed)
//!   and [`handoff`] (a full socket's close matched to the timewait socket that replaces it).
//! - [`timewait`]: timewait sockets through their timer's start and cancel.
//! - [`scan`]: programs the agent runs itself (the sweep, the CLOSE_WAIT scan).
//! - [`segments`]: retransmits and resets, counted by state.
#![no_std]
#![no_main]
// For `atomic_xadd`: the BPF target has no compare-and-swap, so core offers no `fetch_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod agent;
mod closers;
mod count;
mod handoff;
mod kernel;
mod maps;
mod scan;
mod segments;
mod sock;
mod state;
mod timewait;
mod twin;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
