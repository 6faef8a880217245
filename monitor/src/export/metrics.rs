//! The metrics registry. What the kernel programs count (gauges, transitions, durations,
//! timewait ends, retransmits, resets, self-metrics) is copied in at scrape time and added to
//! what the agent decided itself (early timewait ends).
use std::sync::Mutex;

use monitor_common::{DURATION_BOUNDS_NS, DURATION_SLOTS, Lifecycle, counter, reason, tcp};
use prometheus::{
    CounterVec, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto,
};

use crate::{
    agent::tracker::{Decided, reason_name, state_name},
    export::netns_counters::{NamespaceCounters, Watched},
    kernel::{ProgramStats, Readout},
    view::ground::{Breakdowns, role},
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
    transitions: IntCounterVec,
    durations: Durations,
    timewait_ends: IntCounterVec,
    rearms: IntCounter,
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
    program_nested: IntCounterVec,
    program_run_seconds: CounterVec,
    pub scrape_seconds: Gauge,
    seeded: IntGaugeVec,
    drift: IntGaugeVec,
    reconcile_seconds: Gauge,
    unreadable: IntGaugeVec,
    reconcile_cpu_seconds: prometheus::Counter,
    port_sockets: IntGaugeVec,
    pressure_ratio: prometheus::GaugeVec,
    pressure_sockets: IntGaugeVec,
    netns_sockets: IntGaugeVec,
    leaked: IntGaugeVec,
    pub leaks_total: IntCounter,
    /// HTTP requests and connections turned away (`reason`: `connections`, `requests`).
    pub http_refused: IntCounterVec,
    /// Configuration reloads (SIGHUP) by `result`: `success`, `failure`.
    pub reloads: IntCounterVec,
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    reg(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// `twmon_state_duration_seconds`: a histogram whose buckets are counted by the kernel
/// programs (the prometheus crate's own histogram can only be observed into, not set).
#[derive(Clone)]
struct Durations {
    desc: Desc,
    /// The latest counts, `[state * DURATION_SLOTS + slot]` as in [`Lifecycle::durations`].
    latest: std::sync::Arc<Mutex<Vec<u64>>>,
}

impl Durations {
    fn new() -> prometheus::Result<Self> {
        Ok(Self {
            desc: Desc::new(
                "twmon_state_duration_seconds".into(),
                "Time a socket spent in a state, observed when it left it.".into(),
                vec!["state".into()],
                Default::default(),
            )?,
            latest: Default::default(),
        })
    }
}

impl Collector for Durations {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let mut metrics = Vec::new();
        for (state, slots) in latest.chunks_exact(DURATION_SLOTS).enumerate() {
            let (counts, sum_ns) = slots.split_at(DURATION_SLOTS - 1);
            let total: u64 = counts.iter().sum();
            if total == 0 {
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
            let mut h = proto::Histogram::default();
            h.set_sample_count(total);
            h.set_sample_sum(sum_ns[0] as f64 / 1e9);
            h.set_bucket(buckets);
            let mut label = proto::LabelPair::default();
            label.set_name("state".into());
            label.set_value(state_name(state as u8).into());
            let mut m = proto::Metric::from_label(vec![label]);
            m.set_histogram(h);
            metrics.push(m);
        }
        if metrics.is_empty() {
            return Vec::new();
        }
        let mut mf = proto::MetricFamily::default();
        mf.set_name(self.desc.fq_name.clone());
        mf.set_help(self.desc.help.clone());
        mf.set_field_type(proto::MetricType::HISTOGRAM);
        mf.set_metric(metrics);
        vec![mf]
    }
}

/// Removes the series of `vec` whose label `label` is `value`.
fn remove_where<T: prometheus::core::MetricVecBuilder>(vec: &prometheus::core::MetricVec<T>, label: &str, value: &str) {
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: std::collections::HashMap<&str, &str> =
                m.get_label().iter().map(|l| (l.name(), l.value())).collect();
            if labels.get(label) == Some(&value) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// Brings a counter up to a value the kernel counts on its own.
fn sync(c: &IntCounter, value: u64) {
    c.inc_by(value.saturating_sub(c.get()));
}

/// RFC 793's close path: the four-way close on each side, simultaneous close, and aborts (a
/// reset or timeout) from the states a close passes.
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

impl Metrics {
    /// `watched`: the namespaces whose TcpExt counters and sysctls each scrape reads.
    pub fn new(kernel_release: &str, hz: u32, watched: Watched) -> prometheus::Result<Self> {
        let r = Registry::new();
        r.register(Box::new(NamespaceCounters::new(watched)?))?;
        let build = reg(
            &r,
            IntGaugeVec::new(
                Opts::new("twmon_build_info", "twmon's version and the kernel it runs on; always 1."),
                &["version", "kernel", "hz"],
            )?,
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION"), kernel_release, &hz.to_string()]).set(1);
        let m = Self {
            transitions: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_state_transitions_total",
                        "TCP state transitions on the close path, as RFC 793 names them.",
                    ),
                    &["from", "to"],
                )?,
            )?,
            durations: reg(&r, Durations::new()?)?,
            timewait_ends: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_timewait_ends_total",
                        "Timewait sockets that ended, by why: expired (2MSL ran out), fin_timeout \
                         (an orphaned FIN_WAIT2 got no FIN within tcp_fin_timeout), reuse (a \
                         connect() took the 4-tuple), killed (RST, a reopening SYN, or namespace \
                         teardown).",
                    ),
                    &["reason"],
                )?,
            )?,
            rearms: reg(
                &r,
                IntCounter::new(
                    "twmon_timewait_rearms_total",
                    "Times a TIME_WAIT socket's 2MSL timer restarted because a segment reached it, \
                     normally a FIN retransmitted after the final ACK was lost.",
                )?,
            )?,
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
                    "Connections the kernel meant to hand over to a timewait socket and could not \
                     (tcp_max_tw_buckets reached, as TcpExt TCPTimeWaitOverflow counts, or no \
                     memory): they went from fin_wait2 or closing straight to close. Aborts (a \
                     reset, a timeout, SO_LINGER 0, a close with unread data) are not counted here.",
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
                         that CPU (its tracepoint hit again from an interrupt) and no twin \
                         handled the event: each one an event lost, which twmon_reconcile_drift \
                         then shows.",
                    ),
                    &["program"],
                )?,
            )?,
            program_nested: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_bpf_program_nested_total",
                        "Events that hit a program's tracepoint while the program was running on \
                         that CPU (from an interrupt), handled by its twin.",
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
            unreadable: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "twmon_netns_unreadable",
                        "At the last reconcile: network namespaces twmon could not enter \
                         (reason=\"enter\", needs CAP_SYS_ADMIN) and processes whose namespace \
                         it could not see (reason=\"hidden\", needs CAP_SYS_PTRACE). Their \
                         sockets are missing from the breakdowns and show in \
                         twmon_reconcile_drift.",
                    ),
                    &["reason"],
                )?,
            )?,
            reconcile_cpu_seconds: reg(
                &r,
                prometheus::Counter::new(
                    "twmon_reconcile_cpu_seconds_total",
                    "CPU time of the agent while reconciling; its rate is the share of a core \
                     reconciling takes (at most about 0.01: slow reconciles are spaced out).",
                )?,
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
            http_refused: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_http_refused_total",
                        "HTTP clients turned away: `connections` closed at once because \
                         --web.max-connections were open, `requests` answered 503 because \
                         --web.max-requests scrapes were running, `unauthorized` answered 401 \
                         (basic_auth_users in --web.config.file).",
                    ),
                    &["reason"],
                )?,
            )?,
            reloads: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "twmon_config_reloads_total",
                        "Reloads of --config.file on SIGHUP, by result (`success`, `failure`: the \
                         previous configuration stays).",
                    ),
                    &["result"],
                )?,
            )?,
            registry: r,
        };
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_max_fds, process_start_time_seconds: the names every exporter uses.
        m.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        for reason in ["connections", "requests", "unauthorized"] {
            m.http_refused.with_label_values(&[reason]);
        }
        for result in ["success", "failure"] {
            m.reloads.with_label_values(&[result]);
        }
        for s in GAUGE_STATES {
            m.sockets.with_label_values(&[state_name(s)]);
        }
        for map in ["sockets", "timewait", "orphans", "closers"] {
            m.map_full.with_label_values(&[map]);
        }
        for r in [reason::EXPIRED, reason::REUSE, reason::KILLED, reason::FIN_TIMEOUT] {
            m.timewait_ends.with_label_values(&[reason_name(r)]);
        }
        // Every step of the close path from the start, so that rate() and absent() work before
        // the first one happens; other transitions appear when they do.
        for (from, to) in CLOSE_PATH {
            m.transitions.with_label_values(&[state_name(from), state_name(to)]);
        }
        Ok(m)
    }

    /// Transitions, durations, timewait ends and re-arms: the kernel's counts plus the agent's.
    fn refresh_lifecycle(&self, k: &Readout, decided: &Decided) {
        let mut total: Lifecycle = k.lifecycle;
        total.add(&decided.lifecycle);
        let n = monitor_common::STATES;
        for (i, count) in total.transitions.iter().enumerate() {
            if *count > 0 {
                let (from, to) = ((i / n) as u8, (i % n) as u8);
                sync(&self.transitions.with_label_values(&[state_name(from), state_name(to)]), *count);
            }
        }
        *self.durations.latest.lock().unwrap_or_else(|e| e.into_inner()) = total.durations.to_vec();
        for r in [reason::EXPIRED, reason::REUSE, reason::KILLED, reason::FIN_TIMEOUT] {
            let count = k.counter(counter::TIMEWAIT_ENDS + r as u32) + decided.ends[r as usize];
            sync(&self.timewait_ends.with_label_values(&[reason_name(r)]), count);
        }
        sync(&self.rearms, k.counter(counter::REARMS));
    }

    pub fn refresh(&self, k: &Readout, decided: &Decided, seeded: &[i64], attached: usize, programs: &[ProgramStats]) {
        self.refresh_lifecycle(k, decided);
        for s in GAUGE_STATES {
            self.sockets.with_label_values(&[state_name(s)]).set(k.sockets[s as usize] + seeded[s as usize]);
            self.seeded.with_label_values(&[state_name(s)]).set(seeded[s as usize]);
        }
        for s in 1..tcp::MAX_STATES as u8 {
            let name = state_name(s);
            let rt = k.counter(counter::RETRANSMITS + s as u32);
            // The states whose retransmits carry the FIN are exported from the start.
            if rt > 0 || matches!(s, tcp::FIN_WAIT1 | tcp::CLOSING | tcp::LAST_ACK) {
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
        sync(&self.map_full.with_label_values(&["closers"]), k.counter(counter::CLOSERS_FULL));
        sync(&self.handoff_missed, k.counter(counter::HANDOFF_MISSED));
        sync(&self.timewait_missed, k.counter(counter::TIMEWAIT_MISSED));
        self.programs_attached.set(attached as i64);
        for p in programs {
            sync(&self.program_runs.with_label_values(&[&p.name]), p.run_count);
            sync(&self.program_missed.with_label_values(&[&p.name]), p.missed);
            if let Some(n) = p.nested {
                sync(&self.program_nested.with_label_values(&[&p.name]), n);
            }
            let c = self.program_run_seconds.with_label_values(&[&p.name]);
            c.inc_by((p.run_time.as_secs_f64() - c.get()).max(0.0));
        }
    }

    /// What the last reading of the kernel's view could not read.
    pub fn set_unreadable(&self, denied: usize, hidden: usize) {
        self.unreadable.with_label_values(&["enter"]).set(denied as i64);
        self.unreadable.with_label_values(&["hidden"]).set(hidden as i64);
    }

    /// Removes every series of network namespace `name` (per-namespace counts, port pressure,
    /// leaks): it is gone. (Its TcpExt and sysctls go by themselves, see `netns_counters`.)
    pub fn forget_netns(&self, name: &str) {
        remove_where(&self.netns_sockets, "netns", name);
        remove_where(&self.pressure_ratio, "netns", name);
        remove_where(&self.pressure_sockets, "netns", name);
        remove_where(&self.leaked, "netns", name);
    }

    /// Publishes one reconcile: drift per state, breakdowns, leaks.
    pub fn refresh_ground(
        &self,
        drift: &[i64],
        b: &Breakdowns,
        leaks: &[Leak],
        took: std::time::Duration,
        cpu: std::time::Duration,
    ) {
        for s in GAUGE_STATES {
            self.drift.with_label_values(&[state_name(s)]).set(drift[s as usize]);
        }
        self.reconcile_seconds.set(took.as_secs_f64());
        self.reconcile_cpu_seconds.inc_by(cpu.as_secs_f64());
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
        self.leaked.reset();
        for l in leaks {
            self.leaked.with_label_values(&[&l.netns, &l.pid.to_string(), &l.comm]).set(l.sockets as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::duration_bucket;

    use super::*;

    /// The kernel's per-CPU counts plus the agent's early ends, as Prometheus reads them:
    /// cumulative buckets in seconds, a +Inf bucket equal to the count, the sum in seconds.
    #[test]
    fn kernel_and_agent_counts_are_exported_together() {
        let m = Metrics::new("test", 250, Default::default()).unwrap();
        let mut k = Readout { counters: vec![0; counter::COUNT as usize], ..Readout::default() };
        k.lifecycle.count(tcp::FIN_WAIT2, tcp::TIME_WAIT, Some(2_000_000)); // 2 ms
        k.lifecycle.count(tcp::TIME_WAIT, tcp::CLOSE, Some(60_500_000_000)); // 60.5 s
        k.lifecycle.count(tcp::TIME_WAIT, tcp::CLOSE, None);
        k.counters[(counter::TIMEWAIT_ENDS + reason::EXPIRED as u32) as usize] = 2;
        k.counters[counter::REARMS as usize] = 3;
        let mut decided = Decided::default();
        decided.lifecycle.count(tcp::TIME_WAIT, tcp::CLOSE, Some(1_000_000_000)); // 1 s, early
        decided.ends[reason::REUSE as usize] = 1;
        m.refresh(&k, &decided, &[0; tcp::MAX_STATES as usize], 6, &[]);

        let families = m.registry.gather();
        let family = |name: &str| families.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("{name}"));
        let with = |f: &'static str, v: &'static str| {
            move |m: &&proto::Metric| m.get_label().iter().any(|l| l.name() == f && l.value() == v)
        };
        let transitions = family("twmon_state_transitions_total");
        let tw_close = transitions.get_metric().iter().filter(with("from", "time_wait")).find(with("to", "close"));
        assert_eq!(tw_close.unwrap().get_counter().get_value(), 3.0);
        let ends = family("twmon_timewait_ends_total");
        let end = |r| ends.get_metric().iter().find(with("reason", r)).unwrap().get_counter().get_value();
        assert_eq!((end("expired"), end("reuse"), end("killed")), (2.0, 1.0, 0.0));
        assert_eq!(family("twmon_timewait_rearms_total").get_metric()[0].get_counter().get_value(), 3.0);

        let durations = family("twmon_state_duration_seconds");
        assert_eq!(durations.get_field_type(), proto::MetricType::HISTOGRAM);
        let h = durations.get_metric().iter().find(with("state", "time_wait")).unwrap().get_histogram();
        assert_eq!(h.get_sample_count(), 2, "the end without a known entry time is not observed");
        assert!((h.get_sample_sum() - 61.5).abs() < 1e-9);
        let le = |bound: f64| h.get_bucket().iter().find(|b| b.upper_bound() == bound).unwrap().cumulative_count();
        assert_eq!((le(0.5), le(1.0), le(59.0), le(61.0), le(600.0)), (0, 1, 1, 2, 2));
        assert_eq!(h.get_bucket().len(), DURATION_BOUNDS_NS.len());
        let fin_wait2 = durations.get_metric().iter().find(with("state", "fin_wait2")).unwrap().get_histogram();
        assert_eq!(fin_wait2.get_bucket()[duration_bucket(2_000_000)].upper_bound(), 0.0025);
        assert_eq!(fin_wait2.get_bucket()[duration_bucket(2_000_000)].cumulative_count(), 1);
        assert!(durations.get_metric().iter().find(with("state", "close_wait")).is_none());
    }
}
