//! The metrics registry: kernel-side numbers (gauges, retransmits, resets, self-metrics) copied
//! in at scrape time, next to the tracker's event-driven counters and histograms.
use monitor_common::{counter, tcp};
use prometheus::{CounterVec, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, core::Collector};

use crate::{
    kernel::{ProgramStats, Readout},
    tracker::state_name,
};

/// The states whose current socket count `twmon_sockets` reports.
pub const GAUGE_STATES: [u8; 6] =
    [tcp::FIN_WAIT1, tcp::FIN_WAIT2, tcp::CLOSE_WAIT, tcp::CLOSING, tcp::LAST_ACK, tcp::TIME_WAIT];

pub struct Metrics {
    pub registry: Registry,
    sockets: IntGaugeVec,
    retransmits: IntCounterVec,
    resets: IntCounterVec,
    events_lost: IntCounter,
    pub events_invalid: IntCounter,
    map_full: IntCounterVec,
    handoff_missed: IntCounter,
    programs_attached: IntGauge,
    program_runs: IntCounterVec,
    program_run_seconds: CounterVec,
    pub scrape_seconds: Gauge,
}

fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Brings a counter up to a value the kernel counts on its own.
fn sync(c: &IntCounter, value: u64) {
    c.inc_by(value.saturating_sub(c.get()));
}

impl Metrics {
    pub fn new(kernel_release: &str, hz: u32) -> prometheus::Result<Self> {
        let r = Registry::new();
        let build = reg(
            &r,
            IntGaugeVec::new(
                Opts::new("twmon_build_info", "twmon's version and the kernel it runs on; always 1."),
                &["version", "kernel", "hz"],
            )?,
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION"), kernel_release, &hz.to_string()]).set(1);
        let m = Self {
            sockets: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "twmon_sockets",
                        "TCP sockets in each teardown state now; time_wait and fin_wait2 include \
                         the kernel's timewait sockets, as ss shows them.",
                    ),
                    &["state"],
                )?,
            )?,
            retransmits: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_retransmits_total",
                        "Segments retransmitted, by the sender's state; in fin_wait1, closing and \
                         last_ack they carry the FIN.",
                    ),
                    &["state"],
                )?,
            )?,
            resets: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("twmon_resets_total", "RSTs sent or received, by the socket's state."),
                    &["direction", "state"],
                )?,
            )?,
            events_lost: reg(
                &r,
                IntCounter::new(
                    "twmon_events_lost_total",
                    "Events the kernel programs dropped because the ring buffer was full; raise \
                     --bpf.ring-buffer-size.",
                )?,
            )?,
            events_invalid: reg(
                &r,
                IntCounter::new("twmon_events_invalid_total", "Ring-buffer records that failed to decode.")?,
            )?,
            map_full: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_map_full_total",
                        "Sockets not followed because a kernel map was full; raise --bpf.max-sockets \
                         or --bpf.max-timewait.",
                    ),
                    &["map"],
                )?,
            )?,
            handoff_missed: reg(
                &r,
                IntCounter::new(
                    "twmon_timewait_handoff_missed_total",
                    "Sockets that closed from fin_wait1, fin_wait2 or closing without a timewait \
                     socket taking over (tcp_max_tw_buckets reached, memory pressure, or RST).",
                )?,
            )?,
            programs_attached: reg(
                &r,
                IntGauge::new("twmon_bpf_programs_attached", "Kernel programs attached to tracepoints.")?,
            )?,
            program_runs: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_bpf_program_runs_total",
                        "Runs of each kernel program (needs sysctl kernel.bpf_stats_enabled=1).",
                    ),
                    &["program"],
                )?,
            )?,
            program_run_seconds: reg(
                &r,
                CounterVec::new(
                    Opts::new(
                        "twmon_bpf_program_run_seconds_total",
                        "Time spent in each kernel program (needs sysctl kernel.bpf_stats_enabled=1).",
                    ),
                    &["program"],
                )?,
            )?,
            scrape_seconds: reg(
                &r,
                Gauge::new(
                    "twmon_scrape_collect_seconds",
                    "Time the previous scrape took to read the kernel's maps and settle events.",
                )?,
            )?,
            registry: r,
        };
        for s in GAUGE_STATES {
            m.sockets.with_label_values(&[state_name(s)]);
        }
        for map in ["sockets", "timewait"] {
            m.map_full.with_label_values(&[map]);
        }
        Ok(m)
    }

    pub fn refresh(&self, k: &Readout, attached: usize, programs: &[ProgramStats]) {
        for s in GAUGE_STATES {
            self.sockets.with_label_values(&[state_name(s)]).set(k.sockets[s as usize]);
        }
        for s in 1..tcp::MAX_STATES as u8 {
            let name = state_name(s);
            let rt = k.counter(counter::RETRANSMITS + s as u32);
            if rt > 0 {
                sync(&self.retransmits.with_label_values(&[name]), rt);
            }
            for (dir, base) in [("sent", counter::RESETS_SENT), ("received", counter::RESETS_RECEIVED)] {
                let n = k.counter(base + s as u32);
                if n > 0 {
                    sync(&self.resets.with_label_values(&[dir, name]), n);
                }
            }
        }
        sync(&self.events_lost, k.counter(counter::EVENTS_LOST));
        sync(&self.map_full.with_label_values(&["sockets"]), k.counter(counter::SOCKS_FULL));
        sync(&self.map_full.with_label_values(&["timewait"]), k.counter(counter::TIMEWAIT_FULL));
        sync(&self.handoff_missed, k.counter(counter::HANDOFF_MISSED));
        self.programs_attached.set(attached as i64);
        for p in programs {
            sync(&self.program_runs.with_label_values(&[&p.name]), p.run_count);
            let c = self.program_run_seconds.with_label_values(&[&p.name]);
            c.inc_by((p.run_time.as_secs_f64() - c.get()).max(0.0));
        }
    }
}
