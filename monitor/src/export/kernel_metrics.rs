//! What the kernel programs count, as read at a scrape and added to what the agent decided
//! itself (early timewait ends): sockets per state, transitions, durations, timewait ends,
//! re-arms, retransmits, resets, and the programs' own health. A collector over the latest
//! reading, which each scrape replaces whole before it gathers.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use monitor_common::{DURATION_BOUNDS_NS, DURATION_SLOTS, Lifecycle, counter, reason, tcp};
use prometheus::{
    core::{Collector, Desc},
    proto,
};

use crate::{
    agent::tracker::{Decided, reason_name, state_name},
    export::family::Spec,
    kernel::{ProgramStats, Readout},
};

/// The states whose current socket count `twmon_sockets` reports.
pub const GAUGE_STATES: [u8; 6] =
    [tcp::FIN_WAIT1, tcp::FIN_WAIT2, tcp::CLOSE_WAIT, tcp::CLOSING, tcp::LAST_ACK, tcp::TIME_WAIT];

/// RFC 793's close path: the four-way close on each side, simultaneous close, and aborts (a
/// reset or timeout) from the states a close passes. Exported from the start, so that rate()
/// and absent() work before the first one happens; other transitions appear when they do.
const CLOSE_PATH: [(u8, u8); 16] = [
    (tcp::ESTABLISHED, tcp::FIN_WAIT1),
    (tcp::ESTABLISHED, tcp::CLOSE_WAIT),
    (tcp::ESTABLISHED, tcp::CLOSE),
    (tcp::FIN_WAIT1, tcp::FIN_WAIT2),
    (tcp::FIN_WAIT1, tcp::CLOSING),
    (tcp::FIN_WAIT1, tcp::TIME_WAIT),
    (tcp::FIN_WAIT1, tcp::CLOSE),
    (tcp::FIN_WAIT2, tcp::TIME_WAIT),
    (tcp::FIN_WAIT2, tcp::CLOSE),
    (tcp::CLOSING, tcp::TIME_WAIT),
    (tcp::CLOSING, tcp::CLOSE),
    (tcp::CLOSE_WAIT, tcp::LAST_ACK),
    (tcp::CLOSE_WAIT, tcp::CLOSE),
    (tcp::LAST_ACK, tcp::CLOSE),
    (tcp::TIME_WAIT, tcp::CLOSE),
    (tcp::SYN_SENT, tcp::CLOSE),
];

const ENDS: [u8; 4] = [reason::EXPIRED, reason::REUSE, reason::KILLED, reason::FIN_TIMEOUT];

/// The kernel maps whose full state is counted, by their `map` label.
const MAPS: [(&str, u32); 4] = [
    ("sockets", counter::SOCKS_FULL),
    ("timewait", counter::TIMEWAIT_FULL),
    ("orphans", counter::ORPHANS_FULL),
    ("closers", counter::CLOSERS_FULL),
];

/// One scrape's reading of the kernel, with what the agent holds beside it.
#[derive(Default)]
pub struct Reading {
    pub readout: Readout,
    pub decided: Decided,
    /// Sockets seeded from sock_diag and not yet seen to move, per state.
    pub seeded: Vec<i64>,
    pub attached: usize,
    pub programs: Vec<ProgramStats>,
}

pub struct KernelMetrics {
    latest: Mutex<Arc<Reading>>,
    /// The highest missed hand-off count exported: the kernel programs take a count back when
    /// a reset right after the close shows it was an abort, and a counter must not go down.
    handoff_missed_seen: AtomicU64,
    sockets: Spec,
    seeded: Spec,
    transitions: Spec,
    durations: Spec,
    ends: Spec,
    rearms: Spec,
    retransmits: Spec,
    resets: Spec,
    events_lost: Spec,
    map_full: Spec,
    handoff_missed: Spec,
    end_missed: Spec,
    trace_lost: Spec,
    attached: Spec,
    program_runs: Spec,
    program_missed: Spec,
    program_nested: Spec,
    program_seconds: Spec,
}

impl KernelMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            latest: Default::default(),
            handoff_missed_seen: AtomicU64::new(0),
            sockets: Spec::gauge(
                "twmon_sockets",
                "TCP sockets in each teardown state now; time_wait and fin_wait2 include the \
                 kernel's timewait sockets, as ss shows them.",
                &["state"],
            )?,
            seeded: Spec::gauge(
                "twmon_seeded_sockets",
                "Sockets that were in a teardown state when the agent started, counted from \
                 sock_diag until they leave it (included in twmon_sockets).",
                &["state"],
            )?,
            transitions: Spec::counter(
                "twmon_state_transitions_total",
                "TCP state transitions on the close path, as RFC 793 names them.",
                &["from", "to"],
            )?,
            durations: Spec::histogram(
                "twmon_state_duration_seconds",
                "Time a socket spent in a state, observed when it left it.",
                &["state"],
            )?,
            ends: Spec::counter(
                "twmon_timewait_ends_total",
                "Timewait sockets that ended, by why: expired (2MSL ran out), fin_timeout (an \
                 orphaned FIN_WAIT2 got no FIN within tcp_fin_timeout), reuse (a connect() took \
                 the 4-tuple), killed (RST, a reopening SYN, or namespace teardown).",
                &["reason"],
            )?,
            rearms: Spec::counter(
                "twmon_timewait_rearms_total",
                "Times a TIME_WAIT socket's 2MSL timer restarted because a segment reached it, \
                 normally a FIN retransmitted after the final ACK was lost.",
                &[],
            )?,
            retransmits: Spec::counter(
                "twmon_retransmits_total",
                "Segments retransmitted, by the sender's state; in fin_wait1, closing and last_ack \
                 they carry the FIN.",
                &["state"],
            )?,
            resets: Spec::counter(
                "twmon_resets_total",
                "RSTs sent or received, by the socket's state.",
                &["direction", "state"],
            )?,
            events_lost: Spec::counter(
                "twmon_events_lost_total",
                "Events the kernel programs dropped because the ring buffer was full; raise \
                 --bpf.ring-buffer-size.",
                &[],
            )?,
            map_full: Spec::counter(
                "twmon_map_full_total",
                "State entries the kernel programs could not keep because a map was full (that \
                 socket's time in the state is not measured and it is missing from twmon_sockets); \
                 raise --bpf.max-sockets or --bpf.max-timewait.",
                &["map"],
            )?,
            handoff_missed: Spec::counter(
                "twmon_timewait_handoff_missed_total",
                "Connections the kernel meant to hand over to a timewait socket and could not \
                 (tcp_max_tw_buckets reached, as TcpExt TCPTimeWaitOverflow counts, or no memory): \
                 they went from fin_wait2 or closing straight to close. Aborts (a reset, a \
                 timeout, SO_LINGER 0, a close with unread data) are not counted here.",
                &[],
            )?,
            end_missed: Spec::counter(
                "twmon_timewait_end_missed_total",
                "Timewait sockets whose end the kernel programs did not see as it happened; the \
                 sweep found them gone and ended them (reason killed).",
                &[],
            )?,
            trace_lost: Spec::counter(
                "twmon_trace_records_lost_total",
                "Trace records the kernel programs dropped because the trace ring buffer was full \
                 (only while someone traces; the counts are never affected).",
                &[],
            )?,
            attached: Spec::gauge(
                "twmon_bpf_programs_attached",
                "Kernel programs attached to tracepoints.",
                &[],
            )?,
            program_runs: Spec::counter(
                "twmon_bpf_program_runs_total",
                "Runs of each kernel program (needs sysctl kernel.bpf_stats_enabled=1).",
                &["program"],
            )?,
            program_missed: Spec::counter(
                "twmon_bpf_program_missed_total",
                "Times the kernel skipped a program because it was already running on that CPU \
                 (its tracepoint hit again from an interrupt) and no twin handled the event: each \
                 one an event lost, which twmon_reconcile_drift then shows.",
                &["program"],
            )?,
            program_nested: Spec::counter(
                "twmon_bpf_program_nested_total",
                "Events that hit a program's tracepoint while the program was running on that CPU \
                 (from an interrupt), handled by its twin.",
                &["program"],
            )?,
            program_seconds: Spec::counter(
                "twmon_bpf_program_run_seconds_total",
                "Time spent in each kernel program (needs sysctl kernel.bpf_stats_enabled=1).",
                &["program"],
            )?,
        })
    }

    /// Replaces the reading the next gather exports.
    pub fn set(&self, reading: Reading) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(reading);
    }

    fn specs(&self) -> [&Spec; 18] {
        [
            &self.sockets,
            &self.seeded,
            &self.transitions,
            &self.durations,
            &self.ends,
            &self.rearms,
            &self.retransmits,
            &self.resets,
            &self.events_lost,
            &self.map_full,
            &self.handoff_missed,
            &self.end_missed,
            &self.trace_lost,
            &self.attached,
            &self.program_runs,
            &self.program_missed,
            &self.program_nested,
            &self.program_seconds,
        ]
    }
}

impl Collector for KernelMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.specs().into_iter().map(|s| &s.desc).collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let r = self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let k = &r.readout;
        let seeded = |s: u8| r.seeded.get(s as usize).copied().unwrap_or(0);
        let mut out = Vec::new();

        let (mut sockets, mut seeded_f) = (self.sockets.family(), self.seeded.family());
        for s in GAUGE_STATES {
            sockets.add(&[state_name(s)], (k.sockets[s as usize] + seeded(s)) as f64);
            seeded_f.add(&[state_name(s)], seeded(s) as f64);
        }
        sockets.done(&mut out);
        seeded_f.done(&mut out);

        let mut total: Lifecycle = k.lifecycle;
        total.add(&r.decided.lifecycle);
        let mut transitions = self.transitions.family();
        let n = monitor_common::STATES;
        for (i, count) in total.transitions.iter().enumerate() {
            let (from, to) = ((i / n) as u8, (i % n) as u8);
            if *count > 0 || CLOSE_PATH.contains(&(from, to)) {
                transitions.add(&[state_name(from), state_name(to)], *count as f64);
            }
        }
        transitions.done(&mut out);
        self.durations(&total, &mut out);

        let mut ends = self.ends.family();
        for why in ENDS {
            let count =
                k.counter(counter::TIMEWAIT_ENDS + why as u32) + r.decided.ends[why as usize];
            ends.add(&[reason_name(why)], count as f64);
        }
        ends.done(&mut out);
        let one = |spec: &Spec, value: f64, out: &mut Vec<proto::MetricFamily>| {
            let mut f = spec.family();
            f.add(&[], value);
            f.done(out);
        };
        one(&self.rearms, k.counter(counter::REARMS) as f64, &mut out);

        let (mut retransmits, mut resets) = (self.retransmits.family(), self.resets.family());
        for s in 1..tcp::MAX_STATES as u8 {
            let rt = k.counter(counter::RETRANSMITS + s as u32);
            // The states whose retransmits carry the FIN are exported from the start.
            if rt > 0 || matches!(s, tcp::FIN_WAIT1 | tcp::CLOSING | tcp::LAST_ACK) {
                retransmits.add(&[state_name(s)], rt as f64);
            }
            for (dir, base) in
                [("sent", counter::RESETS_SENT), ("received", counter::RESETS_RECEIVED)]
            {
                let n = k.counter(base + s as u32);
                if n > 0 {
                    resets.add(&[dir, state_name(s)], n as f64);
                }
            }
        }
        retransmits.done(&mut out);
        resets.done(&mut out);

        one(&self.events_lost, k.counter(counter::EVENTS_LOST) as f64, &mut out);
        let mut map_full = self.map_full.family();
        for (map, idx) in MAPS {
            map_full.add(&[map], k.counter(idx) as f64);
        }
        map_full.done(&mut out);
        let handoff = self
            .handoff_missed_seen
            .fetch_max(k.counter(counter::HANDOFF_MISSED), Ordering::Relaxed);
        one(&self.handoff_missed, handoff.max(k.counter(counter::HANDOFF_MISSED)) as f64, &mut out);
        one(&self.end_missed, k.counter(counter::TIMEWAIT_MISSED) as f64, &mut out);
        one(&self.trace_lost, k.counter(counter::TRACE_LOST) as f64, &mut out);
        one(&self.attached, r.attached as f64, &mut out);

        let mut runs = self.program_runs.family();
        let mut missed = self.program_missed.family();
        let mut nested = self.program_nested.family();
        let mut seconds = self.program_seconds.family();
        for p in &r.programs {
            runs.add(&[&p.name], p.run_count as f64);
            missed.add(&[&p.name], p.missed as f64);
            if let Some(n) = p.nested {
                nested.add(&[&p.name], n as f64);
            }
            seconds.add(&[&p.name], p.run_time.as_secs_f64());
        }
        for f in [runs, missed, nested, seconds] {
            f.done(&mut out);
        }
        out
    }
}

impl KernelMetrics {
    /// `twmon_state_duration_seconds`, whose buckets the kernel programs count (the prometheus
    /// crate's own histogram can only be observed into, not set).
    fn durations(&self, total: &Lifecycle, out: &mut Vec<proto::MetricFamily>) {
        let mut family = self.durations.family();
        for (state, slots) in total.durations.chunks_exact(DURATION_SLOTS).enumerate() {
            let (counts, sum_ns) = slots.split_at(DURATION_SLOTS - 1);
            let count: u64 = counts.iter().sum();
            if count == 0 {
                continue;
            }
            let mut cumulative = 0;
            let buckets = DURATION_BOUNDS_NS
                .iter()
                .zip(counts)
                .map(|(bound, n)| {
                    cumulative += n;
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(*bound as f64 / 1e9);
                    b.set_cumulative_count(cumulative);
                    b
                })
                .collect();
            family.add_histogram(
                &[state_name(state as u8)],
                buckets,
                count,
                sum_ns[0] as f64 / 1e9,
            );
        }
        family.done(out);
    }
}
