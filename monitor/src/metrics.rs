//! The metrics registry: kernel-side numbers (gauges, retransmits, resets, self-metrics) copied
//! in at scrape time, next to the tracker's event-driven counters and histograms.
use monitor_common::{counter, tcp};
use prometheus::{CounterVec, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, core::Collector};

use crate::{
    ground::{Breakdowns, role},
    kernel::{ProgramStats, Readout},
    procfs::{Sysctls, TcpExt},
    tracker::state_name,
};

/// A process holding CLOSE_WAIT sockets past the leak threshold.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Leak {
    pub netns: String,
    pub pid: i32,
    pub comm: String,
    pub sockets: u64,
    pub oldest_seconds: f64,
    /// A few of its leaked connections, `local <- remote`.
    pub examples: Vec<String>,
}

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
    timewait_missed: IntCounter,
    programs_attached: IntGauge,
    program_runs: IntCounterVec,
    program_missed: IntCounterVec,
    program_run_seconds: CounterVec,
    pub scrape_seconds: Gauge,
    seeded: IntGaugeVec,
    drift: IntGaugeVec,
    reconcile_seconds: Gauge,
    port_sockets: IntGaugeVec,
    pressure_ratio: prometheus::GaugeVec,
    pressure_sockets: IntGaugeVec,
    netns_sockets: IntGaugeVec,
    tcpext: IntCounterVec,
    sysctl: IntGaugeVec,
    leaked: IntGaugeVec,
    pub leaks_total: IntCounter,
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    reg(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
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
                        "State entries the kernel programs could not keep because a map was full \
                         (that socket's time in the state is not measured and it is missing from \
                         twmon_sockets); raise --bpf.max-sockets or --bpf.max-timewait.",
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
            timewait_missed: reg(
                &r,
                IntCounter::new(
                    "twmon_timewait_end_missed_total",
                    "Timewait sockets whose end the kernel programs did not see as it happened; \
                     the sweep found them gone and ended them (reason killed).",
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
            program_missed: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_bpf_program_missed_total",
                        "Times the kernel skipped a program because it was already running on \
                         that CPU (its tracepoint hit again from an interrupt): each one an event \
                         lost, which twmon_reconcile_drift then shows.",
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
            seeded: gauge_vec(
                &r,
                "twmon_seeded_sockets",
                "Sockets that were in a teardown state when the agent started, counted from \
                 sock_diag until they leave it (included in twmon_sockets).",
                &["state"],
            )?,
            drift: gauge_vec(
                &r,
                "twmon_reconcile_drift",
                "twmon_sockets minus the kernel's own count (sock_diag, as ss) at the last \
                 reconcile; 0 at rest.",
                &["state"],
            )?,
            reconcile_seconds: reg(
                &r,
                Gauge::new("twmon_reconcile_duration_seconds", "Time the last reconcile took.")?,
            )?,
            port_sockets: gauge_vec(
                &r,
                "twmon_port_sockets",
                "Sockets in teardown states by service port: side=local for this host's servers, \
                 side=remote for its clients; top-K ports per side, the rest as port=\"other\", \
                 port=\"ephemeral\" when both ends are ephemeral.",
                &["side", "port", "role", "state"],
            )?,
            pressure_ratio: reg(
                &r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "twmon_port_pressure_ratio",
                        "Sockets holding a local ephemeral port towards a destination (TIME_WAIT \
                         included) over the namespace's ephemeral ports; busiest destinations only.",
                    ),
                    &["netns", "destination"],
                )?,
            )?,
            pressure_sockets: gauge_vec(
                &r,
                "twmon_port_pressure_sockets",
                "Sockets holding a local ephemeral port towards a destination; busiest destinations only.",
                &["netns", "destination"],
            )?,
            netns_sockets: gauge_vec(
                &r,
                "twmon_netns_sockets",
                "Sockets in teardown states per network namespace (named by container or pod when \
                 it can be told), from the last reconcile.",
                &["netns", "state"],
            )?,
            tcpext: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_kernel_tcpext_total",
                        "The kernel's own teardown counters from /proc/net/netstat per namespace: \
                         TW (timewait sockets ended by their timer), TWRecycled, TWKilled, \
                         TCPTimeWaitOverflow (tcp_max_tw_buckets hit), TCPAbortOn*.",
                    ),
                    &["netns", "counter"],
                )?,
            )?,
            sysctl: gauge_vec(
                &r,
                "twmon_sysctl",
                "Limits the teardown is measured against, per namespace: tcp_max_tw_buckets, \
                 ephemeral_ports (size of ip_local_port_range less reserved ports), \
                 tcp_fin_timeout (seconds), tcp_tw_reuse.",
                &["netns", "name"],
            )?,
            leaked: gauge_vec(
                &r,
                "twmon_close_wait_leaked_sockets",
                "Sockets in CLOSE_WAIT longer than the leak threshold, by the process holding \
                 them (it has not called close()); top-K processes.",
                &["netns", "pid", "comm"],
            )?,
            leaks_total: reg(
                &r,
                IntCounter::new(
                    "twmon_close_wait_leaks_total",
                    "Sockets found in CLOSE_WAIT past the leak threshold (each counted and logged once).",
                )?,
            )?,
            registry: r,
        };
        for s in GAUGE_STATES {
            m.sockets.with_label_values(&[state_name(s)]);
        }
        for map in ["sockets", "timewait", "orphans"] {
            m.map_full.with_label_values(&[map]);
        }
        Ok(m)
    }

    pub fn refresh(&self, k: &Readout, seeded: &[i64], attached: usize, programs: &[ProgramStats]) {
        for s in GAUGE_STATES {
            self.sockets.with_label_values(&[state_name(s)]).set(k.sockets[s as usize] + seeded[s as usize]);
            self.seeded.with_label_values(&[state_name(s)]).set(seeded[s as usize]);
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
        sync(&self.map_full.with_label_values(&["orphans"]), k.counter(counter::ORPHANS_FULL));
        sync(&self.handoff_missed, k.counter(counter::HANDOFF_MISSED));
        sync(&self.timewait_missed, k.counter(counter::TIMEWAIT_MISSED));
        self.programs_attached.set(attached as i64);
        for p in programs {
            sync(&self.program_runs.with_label_values(&[&p.name]), p.run_count);
            sync(&self.program_missed.with_label_values(&[&p.name]), p.missed);
            let c = self.program_run_seconds.with_label_values(&[&p.name]);
            c.inc_by((p.run_time.as_secs_f64() - c.get()).max(0.0));
        }
    }

    /// Publishes one reconcile: drift per state, breakdowns, kernel counters and limits, leaks.
    pub fn refresh_ground(
        &self,
        drift: &[i64],
        b: &Breakdowns,
        kernel: &[(String, Option<TcpExt>, Option<Sysctls>)],
        leaks: &[Leak],
        took: std::time::Duration,
    ) {
        for s in GAUGE_STATES {
            self.drift.with_label_values(&[state_name(s)]).set(drift[s as usize]);
        }
        self.reconcile_seconds.set(took.as_secs_f64());
        self.port_sockets.reset();
        for r in &b.ports {
            self.port_sockets
                .with_label_values(&[r.side.label(), &r.port, role(r.state), state_name(r.state)])
                .set(r.sockets as i64);
        }
        self.pressure_ratio.reset();
        self.pressure_sockets.reset();
        for p in &b.pressure {
            let dst = p.destination.to_string();
            self.pressure_ratio.with_label_values(&[&p.netns, &dst]).set(p.ratio);
            self.pressure_sockets.with_label_values(&[&p.netns, &dst]).set(p.sockets as i64);
        }
        self.netns_sockets.reset();
        for (ns, state, n) in &b.namespaces {
            self.netns_sockets.with_label_values(&[ns, state_name(*state)]).set(*n as i64);
        }
        self.sysctl.reset();
        for (ns, tcpext, sysctls) in kernel {
            if let Some(t) = tcpext {
                for (name, v) in [
                    ("TW", t.tw),
                    ("TWRecycled", t.tw_recycled),
                    ("TWKilled", t.tw_killed),
                    ("TCPTimeWaitOverflow", t.timewait_overflow),
                    ("TCPAbortOnClose", t.tcp_abort_on_close),
                    ("TCPAbortOnData", t.tcp_abort_on_data),
                    ("TCPAbortOnLinger", t.tcp_abort_on_linger),
                    ("TCPAbortOnTimeout", t.tcp_abort_on_timeout),
                ] {
                    let c = self.tcpext.with_label_values(&[ns, name]);
                    if v < c.get() {
                        // A new namespace under an old name: start its counter again.
                        let _ = self.tcpext.remove_label_values(&[ns, name]);
                    }
                    sync(&self.tcpext.with_label_values(&[ns, name]), v);
                }
            }
            if let Some(s) = sysctls {
                for (name, v) in [
                    ("tcp_max_tw_buckets", s.tcp_max_tw_buckets as i64),
                    ("ephemeral_ports", s.ephemeral_ports() as i64),
                    ("tcp_fin_timeout", s.tcp_fin_timeout as i64),
                    ("tcp_tw_reuse", s.tcp_tw_reuse as i64),
                ] {
                    self.sysctl.with_label_values(&[ns, name]).set(v);
                }
            }
        }
        self.leaked.reset();
        for l in leaks {
            self.leaked.with_label_values(&[&l.netns, &l.pid.to_string(), &l.comm]).set(l.sockets as i64);
        }
    }
}
