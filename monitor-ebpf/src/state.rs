//! Full sockets on `sock:inet_sock_set_state`: gauges, transitions and durations, with the
//! hand-off to a timewait socket recognised (see [`crate::handoff`]).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use aya_log_ebpf::warn;
use monitor_common::{SockEntry, counter, kind, tcp, twin};

use crate::{
    agent::{report, setting, socket_event, trace},
    closers::{closed_by, process_name},
    count::{count, count_warn, gauge, held, record},
    handoff::{handoff_due, note_unconfirmed, take_handoff, take_notes},
    kernel::{current_pid, field, now},
    maps::{SOCKS, TIMEWAIT, layout},
    sock::{Btf, IPPROTO_TCP, SockCommon, wanted},
    twin::{EventId, nested, primary},
};

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
pub(crate) fn state_id(ctx: &BtfTracePointContext) -> EventId {
    let (old, new) = (ctx.arg::<i32>(1) as u64, ctx.arg::<i32>(2) as u64);
    EventId { ptr: ctx.arg(0), value: old << 8 | new }
}

/// The state changes `try_state` looks at, what the close path is made of: into a teardown
/// state or CLOSE, not from CLOSE or LISTEN (bind, listen), and not to the same state (a
/// close() after shutdown() sets FIN_WAIT1, FIN_WAIT2, CLOSING or LAST_ACK again: no change).
#[inline(always)]
pub(crate) fn state_wanted(old: u8, new: u8) -> bool {
    (tcp::is_teardown(new) || new == tcp::CLOSE)
        && old != tcp::CLOSE
        && old != tcp::LISTEN
        && old != new
}

#[inline(always)]
pub(crate) fn try_state(ctx: &BtfTracePointContext) -> Result<(), i64> {
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
    let now = now();
    // Read once: what the agent wants reported (while it seeds) and traced (while someone traces).
    let (report_all, tracing) = (setting(|s| s.report_all) != 0, setting(|s| s.trace) != 0);
    // The owner's close() or shutdown(): the current task is the closer.
    let closing = (old == tcp::ESTABLISHED && new == tcp::FIN_WAIT1)
        || (old == tcp::CLOSE_WAIT && new == tcp::LAST_ACK);
    // Its cell for the TIME_WAIT its side will hold, when it closed first.
    let mut closed_first_by =
        if closing { closed_by(c.netns()?, new == tcp::FIN_WAIT1) } else { 0 };

    // Leaving `old`: its entry time gives the duration. Teardown to teardown updates the entry
    // in place (no delete and insert).
    let mut entered = 0u64;
    let mut known = false;
    let mut kept = false;
    if let Some(e) = SOCKS.get_ptr_mut(sk) {
        // SAFETY: a map value, valid for this program run (the map is preallocated); only this
        // socket's state changes write it, and the socket's lock orders them.
        let e = unsafe { &mut *e };
        known = true;
        if e.state == old {
            entered = e.entered_ns;
        }
        if closed_first_by == 0 {
            closed_first_by = e.closer;
        }
        gauge(e.state, -1);
        if tcp::is_teardown(new) {
            e.state = new;
            e.entered_ns = now;
            e.closer = closed_first_by;
            gauge(new, 1);
            kept = true;
        } else {
            let _ = SOCKS.remove(sk);
        }
    }

    let mut to = new;
    let reset_before = new == tcp::CLOSE && take_notes(sk);
    if new == tcp::CLOSE && (old == tcp::FIN_WAIT1 || old == tcp::FIN_WAIT2 || old == tcp::CLOSING)
    {
        if let Some(h) = take_handoff(&c) {
            // The connection lives on as a timewait socket: RFC 793's view is old -> TIME_WAIT,
            // or no change at all for an orphaned FIN_WAIT2 that the kernel keeps as one.
            let orphan = h.state == old;
            if (closed_first_by != 0 || (orphan && entered != 0))
                && let Some(tw) = TIMEWAIT.get_ptr_mut(h.tw)
            {
                // SAFETY: a map value, valid for this program run (preallocated); the timewait
                // socket was made just now, on this CPU, and nothing else has changed it yet.
                let tw = unsafe { &mut *tw };
                if orphan && entered != 0 {
                    tw.entered_ns = entered;
                }
                tw.closer = closed_first_by;
                held(tw, 1);
            }
            if orphan {
                if report_all {
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
        let entry = SockEntry {
            entered_ns: now,
            state: new,
            closer: closed_first_by,
            ..SockEntry::default()
        };
        if SOCKS.insert(sk, entry, 0).is_ok() {
            gauge(new, 1);
        } else if count_warn(counter::SOCKS_FULL) {
            warn!(ctx, "twmon: socket map full; raise --bpf.max-sockets");
        }
    }
    record(old, to, entered, now);
    if tracing {
        let (comm, pid) = if closing {
            (process_name().unwrap_or_default(), current_pid())
        } else {
            ([0; 16], 0)
        };
        trace(&socket_event(&c, sk, kind::TRANSITION, old, to, now, entered)?, comm, pid);
    }
    // The agent lets go of seeded sockets (in a teardown state the programs did not know) when
    // they move.
    if (tcp::is_teardown(old) && !known) || report_all {
        report(&c, sk, kind::TRANSITION, old, to, now, entered)?;
    }
    Ok(())
}
