//! Retransmits and resets: counted in the kernel by the socket's state, no record.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use monitor_common::{counter, tcp};

use crate::{count::count, handoff::reset_sent, kernel::field, maps::layout, sock::in_scope};

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn twmon_retransmit(ctx: BtfTracePointContext) -> u32 {
    // Since 6.17 the tracepoint also fires for retransmits that could not be sent.
    if layout!(retransmit_has_err) != 0 && ctx.arg::<i32>(2) != 0 {
        return 0;
    }
    count_by_state(ctx.arg(0), counter::RETRANSMITS);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn twmon_send_reset(ctx: BtfTracePointContext) -> u32 {
    // The socket is NULL for a reset to a segment no socket owns: not counted.
    let sk: u64 = ctx.arg(0);
    count_by_state(sk, counter::RESETS_SENT);
    if sk != 0 {
        reset_sent(sk);
    }
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn twmon_receive_reset(ctx: BtfTracePointContext) -> u32 {
    count_by_state(ctx.arg(0), counter::RESETS_RECEIVED);
    0
}

/// Counts `base + state of sk` when `sk` is one the agent watches.
#[inline(always)]
pub(crate) fn count_by_state(sk: u64, base: u32) {
    if sk == 0 || !in_scope(sk) {
        return;
    }
    let state: u8 = field(sk, layout!(skc_state));
    count(base + (state as u32 % tcp::MAX_STATES));
}
