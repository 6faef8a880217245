//! Who closes first: closes counted by the process that made them.

use monitor_common::{CloserKey, Closes, counter};

use crate::{
    count::count,
    kernel::{BPF_NOEXIST, add, current_task, kread},
    maps::{CLOSERS, layout},
};

/// Counts a close for the process that made it: these two state changes happen only in the
/// close() or shutdown() of the socket's owner, so the current task is the closer. Its process
/// is named after the main thread (a worker thread's name, such as nginx's or a JVM's, would
/// split one process into many).
#[inline(always)]
pub(crate) fn closed_by(netns: u32, active: bool) {
    let Some(comm) = process_name() else { return };
    let key = CloserKey { comm, netns };
    let mut closes = CLOSERS.get_ptr_mut(key);
    if closes.is_none() {
        // Another CPU may add the same key meanwhile: then this insert fails and the lookup finds
        // theirs.
        let _ = CLOSERS.insert(key, Closes::default(), BPF_NOEXIST);
        closes = CLOSERS.get_ptr_mut(key);
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
pub(crate) fn process_name() -> Option<[u8; 16]> {
    let task = current_task();
    let leader: u64 = kread(task + layout!(task_group_leader) as u64).ok()?;
    kread(leader + layout!(task_comm) as u64).ok()
}
