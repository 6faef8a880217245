//! The metrics registry: one collector per source, each reading it at scrape time
//! ([`KernelMetrics`]: the kernel programs' counts; [`GroundMetrics`]: the last reconcile;
//! `netns_counters`: TcpExt and sysctls per namespace; `closers`: closes by process), and the
//! agent's own counters about itself.
use std::sync::Arc;

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub use crate::export::kernel_metrics::GAUGE_STATES;
use crate::export::{
    family::Shared,
    ground_metrics::{GroundMetrics, Reconciled},
    kernel_metrics::{KernelMetrics, Reading},
    netns_counters::{NamespaceCounters, Watched},
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

pub struct Metrics {
    pub registry: Registry,
    kernel: Arc<KernelMetrics>,
    ground: Arc<GroundMetrics>,
    pub events_invalid: IntCounter,
    pub scrape_seconds: Gauge,
    reconcile_seconds: Gauge,
    unreadable: IntGaugeVec,
    reconcile_cpu_seconds: prometheus::Counter,
    pub leaks_total: IntCounter,
    /// HTTP requests and connections turned away (`reason`: `connections`, `requests`).
    pub http_refused: IntCounterVec,
    /// Configuration reloads (SIGHUP) by `result`: `success`, `failure`.
    pub reloads: IntCounterVec,
    /// Clients streaming `/api/v1/trace` now.
    pub trace_clients: IntGauge,
    /// Trace lines a client lost because it read too slowly.
    pub trace_lines_lost: IntCounter,
    /// Trace records read from the kernel programs.
    pub trace_records: IntCounter,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: C,
) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// `watched`: the namespaces whose TcpExt counters and sysctls each scrape reads.
    pub fn new(kernel_release: &str, hz: u32, watched: Watched) -> prometheus::Result<Self> {
        let r = Registry::new();
        r.register(Box::new(NamespaceCounters::new(watched)?))?;
        let kernel = Arc::new(KernelMetrics::new()?);
        r.register(Box::new(Shared(kernel.clone())))?;
        let ground = Arc::new(GroundMetrics::new()?);
        r.register(Box::new(Shared(ground.clone())))?;
        let build = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "twmon_build_info",
                    "twmon's version and the kernel it runs on; always 1.",
                ),
                &["version", "kernel", "hz"],
            )?,
        )?;
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), kernel_release, &hz.to_string()])
            .set(1);
        let m = Self {
            kernel,
            ground,
            events_invalid: reg(
                &r,
                IntCounter::new(
                    "twmon_events_invalid_total",
                    "Ring-buffer records that failed to decode.",
                )?,
            )?,
            scrape_seconds: reg(
                &r,
                Gauge::new(
                    "twmon_scrape_collect_seconds",
                    "Time the previous scrape took to read the kernel's maps and settle events.",
                )?,
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
            leaks_total: reg(
                &r,
                IntCounter::new(
                    "twmon_close_wait_leaks_total",
                    "Sockets found in CLOSE_WAIT past the leak threshold (each counted and logged \
                     once).",
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
            trace_clients: reg(
                &r,
                IntGauge::new(
                    "twmon_trace_clients",
                    "Clients streaming the trace (/api/v1/trace, twmon trace) now.",
                )?,
            )?,
            trace_lines_lost: reg(
                &r,
                IntCounter::new(
                    "twmon_trace_lines_lost_total",
                    "Trace lines a client lost because it read more slowly than they came (it is \
                     told how many).",
                )?,
            )?,
            trace_records: reg(
                &r,
                IntCounter::new(
                    "twmon_trace_records_total",
                    "Trace records the kernel programs wrote and the agent read: only while \
                     someone traces, and when every client filters on one port, only that port's \
                     connections.",
                )?,
            )?,
            registry: r,
        };
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_max_fds, process_start_time_seconds: the names every exporter uses.
        m.registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        for reason in ["connections", "requests", "unauthorized"] {
            m.http_refused.with_label_values(&[reason]);
        }
        for result in ["success", "failure"] {
            m.reloads.with_label_values(&[result]);
        }
        Ok(m)
    }

    /// What a scrape read from the kernel: the next gather exports it.
    pub fn set_reading(&self, reading: Reading) {
        self.kernel.set(reading);
    }

    /// What the last reading of the kernel's view could not read.
    pub fn set_unreadable(&self, denied: usize, hidden: usize) {
        self.unreadable.with_label_values(&["enter"]).set(denied as i64);
        self.unreadable.with_label_values(&["hidden"]).set(hidden as i64);
    }

    /// Removes every series of network namespace `name` (per-namespace counts, port pressure,
    /// leaks): it is gone. (Its TcpExt and sysctls go by themselves, see `netns_counters`.)
    pub fn forget_netns(&self, name: &str) {
        self.ground.forget_netns(name);
    }

    /// Publishes one reconcile: drift per state, breakdowns, leaks, and what it cost.
    pub fn set_reconciled(
        &self,
        reconciled: Reconciled,
        took: std::time::Duration,
        cpu: std::time::Duration,
    ) {
        self.ground.set(reconciled);
        self.reconcile_seconds.set(took.as_secs_f64());
        self.reconcile_cpu_seconds.inc_by(cpu.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::{DURATION_BOUNDS_NS, counter, duration_bucket, reason, tcp};
    use prometheus::proto;

    use super::*;
    use crate::{agent::tracker::Decided, kernel::Readout};

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
        m.set_reading(Reading {
            readout: k,
            decided,
            seeded: vec![0; tcp::MAX_STATES as usize],
            attached: 6,
            programs: vec![],
        });

        let families = m.registry.gather();
        let family = |name: &str| {
            families.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("{name}"))
        };
        let with = |f: &'static str, v: &'static str| {
            move |m: &&proto::Metric| m.get_label().iter().any(|l| l.name() == f && l.value() == v)
        };
        let transitions = family("twmon_state_transitions_total");
        let tw_close = transitions
            .get_metric()
            .iter()
            .filter(with("from", "time_wait"))
            .find(with("to", "close"));
        assert_eq!(tw_close.unwrap().get_counter().get_value(), 3.0);
        let ends = family("twmon_timewait_ends_total");
        let end =
            |r| ends.get_metric().iter().find(with("reason", r)).unwrap().get_counter().get_value();
        assert_eq!((end("expired"), end("reuse"), end("killed")), (2.0, 1.0, 0.0));
        assert_eq!(
            family("twmon_timewait_rearms_total").get_metric()[0].get_counter().get_value(),
            3.0
        );

        let durations = family("twmon_state_duration_seconds");
        assert_eq!(durations.get_field_type(), proto::MetricType::HISTOGRAM);
        let h =
            durations.get_metric().iter().find(with("state", "time_wait")).unwrap().get_histogram();
        assert_eq!(h.get_sample_count(), 2, "the end without a known entry time is not observed");
        assert!((h.get_sample_sum() - 61.5).abs() < 1e-9);
        let le = |bound: f64| {
            h.get_bucket().iter().find(|b| b.upper_bound() == bound).unwrap().cumulative_count()
        };
        assert_eq!((le(0.5), le(1.0), le(59.0), le(61.0), le(600.0)), (0, 1, 1, 2, 2));
        assert_eq!(h.get_bucket().len(), DURATION_BOUNDS_NS.len());
        let fin_wait2 =
            durations.get_metric().iter().find(with("state", "fin_wait2")).unwrap().get_histogram();
        assert_eq!(fin_wait2.get_bucket()[duration_bucket(2_000_000)].upper_bound(), 0.0025);
        assert_eq!(fin_wait2.get_bucket()[duration_bucket(2_000_000)].cumulative_count(), 1);
        assert!(durations.get_metric().iter().find(with("state", "close_wait")).is_none());
    }
}
