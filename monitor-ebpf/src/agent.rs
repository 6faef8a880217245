//! Between the programs and the agent: the settings it writes, the records it reads from the
//! ring buffer (only what needs a decision the programs cannot make), and, while someone
//! traces, every transition on the trace ring buffer.

use monitor_common::{Event, Settings, TraceRecord, counter, flags};

use crate::{
    count::count,
    kernel::kread,
    maps::{EVENTS, SETTINGS, TRACE, layout},
    sock::SockCommon,
};

/// True while the agent seeds from sock_diag and wants every transition reported.
#[inline(always)]
pub(crate) fn report_all() -> bool {
    setting(|s| s.report_all) != 0
}

/// Records are written without waking the agent: a wake-up (an irq_work and a context switch
/// per record) cost twice the rest of the program. The agent drains the ring on a short timer.
pub(crate) const BPF_RB_NO_WAKEUP: u64 = 1;

#[inline(always)]
pub(crate) fn emit(ev: &Event) {
    if EVENTS.output::<Event>(ev, BPF_RB_NO_WAKEUP).is_err() {
        count(counter::EVENTS_LOST);
    }
}

/// True while someone traces (`twmon trace`): only then are trace records written.
#[inline(always)]
pub(crate) fn tracing() -> bool {
    setting(|s| s.trace) != 0
}

/// Writes a trace record, `comm` and `pid` the process that made the change where it is known
/// (zeroes elsewhere), unless every client wants another port; a full trace ring is counted,
/// and never holds up the counts.
#[inline(always)]
pub(crate) fn trace(event: &Event, comm: [u8; 16], pid: u32) {
    let port = setting(|s| s.trace_port) as u16;
    if port != 0 && event.sport != port && event.dport != port {
        return;
    }
    // Written where it goes: a copy on the stack first would take room the state program cannot
    // spare.
    let Some(mut entry) = TRACE.reserve::<TraceRecord>(0) else {
        count(counter::TRACE_LOST);
        return;
    };
    let r = entry.as_mut_ptr();
    // SAFETY: `r` points to ring memory reserved for one TraceRecord, ours until submitted; every
    // field is written.
    unsafe {
        (&raw mut (*r).event).write(*event);
        (&raw mut (*r).comm).write(comm);
        (&raw mut (*r).pid).write(pid);
        (&raw mut (*r)._pad).write(0);
    }
    entry.submit(BPF_RB_NO_WAKEUP);
}

/// One of the agent's settings, read where it lies: a copy of them all would take stack that
/// the state program cannot spare (5.10 allows a program and its subprograms 512 bytes together).
#[inline(always)]
pub(crate) fn setting(read: impl FnOnce(&Settings) -> u64) -> u64 {
    SETTINGS.get(0).map_or(0, read)
}

#[inline(always)]
pub(crate) fn since(now: u64, then: u64) -> (u64, u16) {
    if then != 0 && now >= then { (now - then, flags::DURATION) } else { (0, 0) }
}

/// Tells the agent about a full socket (a transition, unless `kind` says otherwise).
#[inline(always)]
pub(crate) fn report<S: SockCommon>(
    c: &S,
    sk: u64,
    kind: u8,
    from: u8,
    to: u8,
    now: u64,
    entered: u64,
) -> Result<(), i64> {
    emit(&socket_event(c, sk, kind, from, to, now, entered)?);
    Ok(())
}

/// A full socket's record: its connection, the change, and the time spent in `from`.
#[inline(always)]
pub(crate) fn socket_event<S: SockCommon>(
    c: &S,
    sk: u64,
    kind: u8,
    from: u8,
    to: u8,
    now: u64,
    entered: u64,
) -> Result<Event, i64> {
    let mut ev =
        Event { ts_ns: now, obj: sk, netns: c.netns()?, kind, from, to, ..Event::default() };
    c.fill(&mut ev)?;
    // inet_sport, as the classic tracepoint reports it: skc_num is zeroed on some paths to CLOSE.
    ev.sport = u16::from_be(kread(sk + layout!(inet_sport) as u64)?);
    (ev.duration_ns, ev.flags) = since(now, entered);
    Ok(ev)
}
