//! The hand-off from a full socket to its timewait socket: `timer_start` notes each new
//! timewait socket on its CPU, and the full socket's `X -> CLOSE` that follows takes the note.
//! Also the per-CPU notes of resets that tell an abort from a hand-off the kernel could not make.

use monitor_common::{counter, tcp};

use crate::{
    kernel::{add, field},
    maps::{COUNTERS, HANDOFF, layout},
    sock::{Btf, SockCommon},
};

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Handoff {
    pub(crate) tw: u64,
    pub(crate) net: u64,
    pub(crate) dport: u32,
    pub(crate) hash: u32,
    pub(crate) state: u8,
    pub(crate) _pad: [u8; 7],
}

/// Hand-offs that nest on one CPU: one per level of softirq that can run in between, and spare.
pub(crate) const HANDOFF_SLOTS: usize = 4;

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
pub(crate) struct Handoffs {
    pub(crate) slots: [Handoff; HANDOFF_SLOTS],
    /// The slot the next hand-off overwrites when none is free (one never taken: the oldest).
    pub(crate) next: u32,
    pub(crate) _pad: u32,
    /// The full socket that sent a reset last on this CPU (`tw` holds the socket).
    pub(crate) reset_by: Handoff,
    /// The full socket whose close was counted last as a missed hand-off: a reset it sends
    /// right after says it was an abort.
    pub(crate) unconfirmed: Handoff,
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
pub(crate) fn handoff_due(sk: u64, old: u8, reset_before: bool) -> bool {
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
pub(crate) fn note_of(sk: u64) -> Option<Handoff> {
    let (net, dport, hash) = Btf(sk).identity().ok()?;
    Some(Handoff { tw: sk, net, dport, hash, state: 0, _pad: [0; 7] })
}

/// The per-CPU notes for the close of a full socket: whether this socket sent a reset just
/// before. Both notes are good for one close only, so both are cleared: the reset that
/// confirms an abort comes right after the close, before any other close on this CPU.
#[inline(always)]
pub(crate) fn take_notes(sk: u64) -> bool {
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
pub(crate) fn note_unconfirmed(sk: u64) {
    if let (Some(all), Some(n)) = (HANDOFF.get_ptr_mut(0), note_of(sk)) {
        // SAFETY: a per-CPU map value, valid for this program run.
        unsafe { (*all).unconfirmed = n };
    }
}

/// A full socket sent a reset. From CLOSE, right after its close: an abort, so a close just
/// counted as a missed hand-off is taken back. From FIN_WAIT2: an orphan timing out, whose
/// close follows.
#[inline(always)]
pub(crate) fn reset_sent(sk: u64) {
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

/// The timewait socket this CPU just created for `sk`, if it is one of them.
#[inline(always)]
pub(crate) fn take_handoff(c: &Btf) -> Option<Handoff> {
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
pub(crate) fn put_handoff(h: Handoff) {
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
