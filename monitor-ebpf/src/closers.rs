//! Who closes first: closes counted by the process that made them.

use monitor_common::{CLOSER_SLOTS, CloserKey, Closes, counter};

use crate::{
    count::count,
    kernel::{BPF_NOEXIST, add, copied, current_task, kread},
    maps::{CLOSER_SLOT_OWNERS, CLOSERS, layout},
};

/// Counts a close for the process that made it: these two state changes happen only in the
/// close() or shutdown() of the socket's owner, so the current task is the closer. Its process
/// is named after the main thread (a worker thread's name, such as nginx's or a JVM's, would
/// split one process into many). For an active close, returns the closer's cell in
/// `TIMEWAIT_HELD` (0: none), which the connection's timewait socket will count in.
#[inline(always)]
pub(crate) fn closed_by(netns: u32, active: bool) -> u16 {
    let Some(comm) = process_name() else { return 0 };
    let key = CloserKey { comm, netns };
    let mut closes = CLOSERS.get_ptr_mut(key);
    if closes.is_none() {
        // A closer's first close. Another CPU may add the same key meanwhile: then both take the
        // same cell, this insert fails and the lookup finds theirs.
        let fresh = Closes { slot: claim_slot(&key) as u32, ..Closes::default() };
        let _ = CLOSERS.insert(key, fresh, BPF_NOEXIST);
        closes = CLOSERS.get_ptr_mut(key);
    }
    let Some(c) = closes else {
        count(counter::CLOSERS_FULL);
        return 0;
    };
    // SAFETY: a map value, valid for this program run; both counts are added to atomically, and
    // the cell is written only before the value is in the map.
    unsafe {
        if active {
            add(&raw mut (*c).active, 1u64);
            (*c).slot as u16
        } else {
            add(&raw mut (*c).passive, 1u64);
            0
        }
    }
}

/// Cells tried from where a closer's name hashes to, before it goes without one.
const SLOT_PROBES: u32 = 8;

/// A cell of `TIMEWAIT_HELD` for this closer: the first of a few, from where its key hashes
/// to, that is free or already its own. 0 when all are another's (the closer's TIME_WAIT
/// sockets are then counted in the gauge by state only).
#[inline(always)]
fn claim_slot(key: &CloserKey) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 4 {
        let w = u32::from_ne_bytes([
            key.comm[i * 4],
            key.comm[i * 4 + 1],
            key.comm[i * 4 + 2],
            key.comm[i * 4 + 3],
        ]);
        h = (h ^ w).wrapping_mul(0x9e37_79b1);
        i += 1;
    }
    h = (h ^ key.netns).wrapping_mul(0x9e37_79b1);
    for probe in 0..SLOT_PROBES {
        let slot = h.wrapping_add(probe) & (CLOSER_SLOTS - 1);
        if slot == 0 {
            continue;
        }
        if CLOSER_SLOT_OWNERS.insert(slot, *key, BPF_NOEXIST).is_ok()
            || copied(&CLOSER_SLOT_OWNERS, slot) == Some(*key)
        {
            return slot as u16;
        }
    }
    0
}

/// The current process's name: its main thread's `comm`.
#[inline(always)]
pub(crate) fn process_name() -> Option<[u8; 16]> {
    let task = current_task();
    let leader: u64 = kread(task + layout!(task_group_leader) as u64).ok()?;
    kread(leader + layout!(task_comm) as u64).ok()
}
