//! The twin protocol: a program and its twin, attached after it to the same tracepoint, so that
//! an event nested in the program (which the kernel skips) is still handled, once.

use monitor_common::counter;

use crate::{count::count, maps::RAN};

/// The events a twinned program ran for, newest at `next - 1`, each until its twin finds it.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Ran {
    ids: [EventId; RAN_SLOTS],
    next: u32,
    _pad: u32,
}

/// An event's identity from two of its tracepoint arguments, a pointer and a value: equal for a
/// program and its twin on one event, distinct from any event nested in it. (The pointer is
/// kept apart: the verifier allows no arithmetic on a tracepoint's typed pointer.)
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventId {
    pub(crate) ptr: u64,
    pub(crate) value: u64,
}

/// Notes a twin can look back on: an interrupt between a program and its twin runs both for
/// each event it brings (a softirq may bring a batch of state changes, each noted), and a note
/// pushed out before its twin ran makes that twin handle its event a second time.
pub(crate) const RAN_SLOTS: usize = 64;

/// Runs a twinned program's body after noting, on this CPU, that it ran for event `id`.
///
/// The kernel marks a program running just before it enters it and clears the mark just
/// after it returns; an event nested anywhere in between (an interrupt on this CPU) skips the
/// program and runs only its twin, attached after it. The twin handles the event when the
/// program did not note it, so no window at either end is left uncovered: an event nested
/// before the note finds no note of itself, one nested after it finds another event's. An
/// event nested between the program and its twin runs both, and the twin finds its note.
#[inline(always)]
pub(crate) fn primary(which: u32, id: EventId, body: impl FnOnce()) -> u32 {
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
pub(crate) fn nested(which: u32, id: EventId, body: impl FnOnce()) -> u32 {
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
