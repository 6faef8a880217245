//! Timewait sockets, followed through their timer (`tw_timer_handler`): `timer:timer_start`
//! creates an entry or re-arms one, `timer:timer_cancel` ends one or leaves the decision to the
//! agent.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use aya_log_ebpf::warn;
use monitor_common::{Event, SockEntry, counter, flags, found, kind, reason, tcp};

use crate::{
    agent::{emit, report_all, setting, since, trace, tracing},
    count::{count, count_warn, gauge, record, tw_gauge},
    handoff::{Handoff, put_handoff},
    kernel::{BPF_NOEXIST, copied, field, jiffies, kread, now},
    maps::{CANCELLED, ORPHANS, TIMEWAIT, layout},
    sock::{Live, SockCommon, netns_of, wanted},
};

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Cancelled {
    tw: u64,
    entry: SockEntry,
    /// The socket's identity: a freed timewait socket's memory is soon another one's, with
    /// the same timer address (and, for a SYN that reopened the 4-tuple, the same connection
    /// identity), so neither says it is a re-arm: see [`tw_identity`].
    identity: (u64, u32, u32, u32),
}

/// The timer tracepoints fire with the timer base's lock held and interrupts off: nothing can
/// nest in these programs on their CPU, so they need no twin (a skipped run would still be
/// counted, in `twmon_bpf_program_missed_total`).
///
/// Every timer in the system passes here, so the callback decides first, and an unrelated timer
/// leaves right there: the rest is a subprogram of its own (`#[inline(never)]`), which keeps
/// that exit next to the test instead of past thousands of instructions.
#[btf_tracepoint(function = "timer_start")]
pub fn twmon_timer_start(ctx: BtfTracePointContext) -> u32 {
    let timer: u64 = ctx.arg(0);
    if field::<u64>(timer, layout!(timer_function)) == layout!(tw_timer_handler) {
        timewait_timer_started(&ctx, timer);
    }
    0
}

#[inline(never)]
fn timewait_timer_started(ctx: &BtfTracePointContext, timer: u64) {
    let _ = try_timer_start(ctx, timer);
}

#[inline(always)]
pub(crate) fn try_timer_start(ctx: &BtfTracePointContext, timer: u64) -> Result<(), i64> {
    let expires: u64 = field(timer, layout!(timer_expires));
    let tw = timer - layout!(tw_timer) as u64;
    let now = now();

    // A re-arm: the kernel detached the pending timer (our cancel handler took the socket out
    // of the map and told the agent) and now queues it again. The agent hears of it too, so
    // that it does not count the cancel as an end.
    if let Some(slot) = CANCELLED.get_ptr_mut(0) {
        // SAFETY: a per-CPU value, valid for this program run. Timer programs run with
        // interrupts off, so no other program uses it on this CPU meanwhile.
        let c = unsafe { *slot };
        if c.tw == tw {
            // SAFETY: as above.
            unsafe { (*slot).tw = 0 };
        }
        if c.tw == tw && tw_identity(tw) == Ok(c.identity) {
            let mut entry = c.entry;
            tw_gauge(&entry, 1);
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
                tw_gauge(&entry, -1);
                count(counter::TIMEWAIT_FULL);
            }
            return Ok(());
        }
    }
    let hash: u32 = Live(tw).get(layout!(skc_hash))?;
    let substate: u8 = kread(tw + layout!(tw_substate) as u64)?;
    let state = if substate == tcp::FIN_WAIT2 { tcp::FIN_WAIT2 } else { tcp::TIME_WAIT };
    let entry = SockEntry { entered_ns: now, expires, state, hash, ..SockEntry::default() };
    let followed = layout!(netns_only) == 0 || wanted(netns_of(tw)?);

    // Usually a timer we do not know: the insert alone says so (one hash operation, not a lookup
    // and then an insert).
    let inserted = if followed { TIMEWAIT.insert(tw, entry, BPF_NOEXIST) } else { Err(-EEXIST) };
    match inserted {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            if let Some(e) = copied(&TIMEWAIT, tw) {
                if e.hash == hash {
                    return Ok(());
                }
                // An entry of another connection: a socket whose end went unseen, in whose
                // memory this one was made. That end is counted as missed; the new socket is
                // followed.
                end_missed(&e, tw, now, found::TIMER_START);
            }
            if !followed {
                return Ok(());
            }
            if TIMEWAIT.insert(tw, entry, 0).is_err() {
                return timewait_full(ctx);
            }
        }
        Err(_) => return timewait_full(ctx),
    }
    gauge(state, 1);
    if state == tcp::FIN_WAIT2 && ORPHANS.insert(tw, 0u8, 0).is_err() {
        count(counter::ORPHANS_FULL);
    }
    let net: u64 = Live(tw).get(layout!(skc_net))?;
    let dport: u16 = Live(tw).get(layout!(skc_dport))?;
    put_handoff(Handoff { tw, net, dport: dport as u32, hash, state, _pad: [0; 7] });
    Ok(())
}

/// `-EEXIST`, as a map insert with `BPF_NOEXIST` returns it for a key that is there.
const EEXIST: i32 = 17;

#[inline(always)]
fn timewait_full(ctx: &BtfTracePointContext) -> Result<(), i64> {
    if count_warn(counter::TIMEWAIT_FULL) {
        warn!(ctx, "twmon: timewait map full; raise --bpf.max-timewait");
    }
    Ok(())
}

/// What tells a re-arm (the same timewait socket, its timer queued again at once) from a new
/// timewait socket in the memory of one just freed: the connection's identity, and its send
/// sequence, which is fixed for a timewait socket's life and differs for a new connection on the
/// same 4-tuple (a SYN that reopened it starts from a new initial sequence number).
#[inline(always)]
pub(crate) fn tw_identity(tw: u64) -> Result<(u64, u32, u32, u32), i64> {
    let (net, dport, hash) = Live(tw).identity()?;
    Ok((net, dport, hash, kread(tw + layout!(tw_snd_nxt) as u64)?))
}

/// A timewait socket's record for the agent.
#[inline(always)]
pub(crate) fn tw_event(tw: u64, now: u64) -> Result<Event, i64> {
    let mut ev = Event {
        ts_ns: now,
        obj: tw,
        netns: netns_of(tw)?,
        flags: flags::TIMEWAIT,
        ..Event::default()
    };
    Live(tw).fill(&mut ev)?;
    ev.sport = Live(tw).get(layout!(skc_num))?;
    Ok(ev)
}

/// An orphaned FIN_WAIT2 timewait socket got its FIN: FIN_WAIT2 -> TIME_WAIT at `at`. The
/// agent hears of it when `report` (it settles a cancel the agent holds) or while it seeds.
#[inline(always)]
pub(crate) fn to_time_wait(entry: &mut SockEntry, tw: u64, at: u64, report: bool) {
    record(tcp::FIN_WAIT2, tcp::TIME_WAIT, entry.entered_ns, at);
    let traced = tracing();
    if (report || report_all() || traced)
        && let Ok(mut ev) = tw_event(tw, at)
    {
        ev.kind = kind::TRANSITION;
        ev.from = tcp::FIN_WAIT2;
        ev.to = tcp::TIME_WAIT;
        let (d, f) = since(at, entry.entered_ns);
        ev.duration_ns = d;
        ev.flags |= f;
        if traced {
            trace(&ev, [0; 16], 0);
        }
        if report || report_all() {
            emit(&ev);
        }
    }
    gauge(tcp::FIN_WAIT2, -1);
    entry.state = tcp::TIME_WAIT;
    entry.entered_ns = at;
    tw_gauge(entry, 1);
    let _ = ORPHANS.remove(tw);
}

/// When a silent FIN_WAIT2 -> TIME_WAIT happened: the kernel restarted the timer with
/// TCP_TIMEWAIT_LEN at that moment, so `expires - TCP_TIMEWAIT_LEN` is its jiffy.
#[inline(always)]
pub(crate) fn change_time(expires: u64, now: u64, now_jiffies: u64) -> u64 {
    let ns_per_jiffy = setting(|s| s.ns_per_jiffy);
    let at = expires.wrapping_sub(setting(|s| s.timewait_len_jiffies));
    if ns_per_jiffy == 0 || at > now_jiffies {
        return now;
    }
    let back = (now_jiffies - at) * ns_per_jiffy;
    if back < now { now - back } else { now }
}

/// Bring an entry up to date with its socket: a silent substate change or re-arm.
#[inline(always)]
pub(crate) fn refresh(
    entry: &mut SockEntry,
    tw: u64,
    expires: u64,
    now: u64,
    now_jiffies: u64,
) -> Result<(), i64> {
    let substate: u8 = kread(tw + layout!(tw_substate) as u64)?;
    if entry.state == tcp::FIN_WAIT2 && substate == tcp::TIME_WAIT {
        // A timer we have not seen move is being re-armed for this very change (the kernel
        // sets the substate, then restarts the timer); a timer that moved was restarted then.
        let at =
            if expires == entry.expires { now } else { change_time(expires, now, now_jiffies) };
        to_time_wait(entry, tw, at, false);
    } else if entry.state == tcp::TIME_WAIT && expires != entry.expires {
        count(counter::REARMS);
    }
    entry.expires = expires;
    Ok(())
}

/// Without a twin, and leaving as early, as `twmon_timer_start`. timer_shutdown() clears the
/// callback, so a NULL one may be a timewait timer being killed.
#[btf_tracepoint(function = "timer_cancel")]
pub fn twmon_timer_cancel(ctx: BtfTracePointContext) -> u32 {
    let timer: u64 = ctx.arg(0);
    let function: u64 = field(timer, layout!(timer_function));
    if function == layout!(tw_timer_handler) || function == 0 {
        timewait_timer_cancelled(timer, function);
    }
    0
}

#[inline(never)]
fn timewait_timer_cancelled(timer: u64, function: u64) {
    let _ = try_timer_cancel(timer, function);
}

#[inline(always)]
pub(crate) fn try_timer_cancel(timer: u64, function: u64) -> Result<(), i64> {
    let tw = timer - layout!(tw_timer) as u64;
    let mut entry = match copied(&TIMEWAIT, tw) {
        Some(e) => e,
        // A NULL callback not in our map is any timer being shut down: not ours to report.
        None if function == 0 => return Ok(()),
        None => return untracked_end(tw, timer),
    };
    if Live(tw).get::<u32>(layout!(skc_hash)) != Ok(entry.hash) {
        // The entry is of a socket whose end went unseen, and this is another one in its memory.
        end_missed(&entry, tw, now(), found::TIMER_CANCEL);
        return untracked_end(tw, timer);
    }
    let _ = TIMEWAIT.remove(tw);
    let now = now();
    let now_jiffies = jiffies();
    let expires: u64 = field(timer, layout!(timer_expires));
    let _ = refresh(&mut entry, tw, expires, now, now_jiffies);
    tw_gauge(&entry, -1);

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
        // Only a FIN_WAIT2 entry is in ORPHANS (its change to TIME_WAIT took it out).
        if entry.state == tcp::FIN_WAIT2 {
            let _ = ORPHANS.remove(tw);
        }
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
        // SAFETY: as in `try_timer_start`: a per-CPU value, and interrupts are off.
        unsafe { *slot = Cancelled { tw, entry, identity: tw_identity(tw).unwrap_or_default() } };
    }
    emit(&ev);
    Ok(())
}

/// A timewait socket ended in a way the kernel programs can tell on their own: counted here,
/// reported only while the agent seeds, traced while someone traces.
#[inline(always)]
pub(crate) fn end(entry: &SockEntry, tw: u64, why: u8, now: u64, extra: u16) {
    record(entry.state, tcp::CLOSE, entry.entered_ns, now);
    count(counter::TIMEWAIT_ENDS + why as u32);
    let (seeding, traced) = (report_all(), tracing());
    if (seeding || traced)
        && let Ok(mut ev) = tw_event(tw, now)
    {
        ev.kind = kind::TRANSITION;
        ev.from = entry.state;
        ev.to = tcp::CLOSE;
        ev.reason = why;
        ev.flags |= extra;
        if seeding {
            emit(&ev);
        }
        if traced {
            let (d, f) = since(now, entry.entered_ns);
            ev.duration_ns = d;
            ev.flags |= f;
            trace(&ev, [0; 16], 0);
        }
    }
}

/// A timewait socket we do not follow ends or is re-armed: tell the agent while it holds
/// sockets it seeded from sock_diag, so it can let go of this one.
#[inline(always)]
pub(crate) fn untracked_end(tw: u64, timer: u64) -> Result<(), i64> {
    if setting(|s| s.seeded) == 0 {
        return Ok(());
    }
    if layout!(netns_only) != 0 && !wanted(netns_of(tw)?) {
        return Ok(());
    }
    let now = now();
    let mut ev = tw_event(tw, now)?;
    ev.kind = kind::UNTRACKED_END;
    ev.from = kread(tw + layout!(tw_substate) as u64)?;
    ev.to = tcp::CLOSE;
    // A due timer is the expiry; a TIME_WAIT socket's timer was last set 2MSL before it.
    let now_jiffies = jiffies();
    let expires: u64 = field(timer, layout!(timer_expires));
    if (now_jiffies.wrapping_sub(expires) as i64) >= 0 {
        if ev.from == tcp::TIME_WAIT {
            ev.reason = reason::EXPIRED;
            (ev.duration_ns, ev.flags) =
                (now - change_time(expires, now, now_jiffies), ev.flags | flags::DURATION);
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
pub(crate) fn reused(tw: u64) -> bool {
    kread::<u64>(tw + layout!(skc_nulls_pprev) as u64) == Ok(0)
}

/// A timewait entry whose socket ended without our cancel program seeing it: ended here,
/// counted as missed, and told to the agent with where it was found (`found::*`).
#[inline(always)]
pub(crate) fn end_missed(entry: &SockEntry, tw: u64, now: u64, at: u8) {
    tw_gauge(entry, -1);
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
