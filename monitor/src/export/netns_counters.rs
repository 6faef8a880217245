//! The kernel's own counters and limits per network namespace, read at every scrape: TcpExt
//! from /proc/net/netstat and the sysctls the teardown is measured against. A collector, not
//! series kept in step by hand: each scrape shows what the kernel says at that moment, for the
//! namespaces that exist at that moment (a deleted one is gone from the next scrape).
use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, core::Collector, core::Desc, proto};

use crate::view::{
    netns::{self, Namespace},
    procfs::{self, Sysctls, TcpExt},
};

/// The namespaces to read: those the last reconcile read and watches (set by the agent).
pub type Watched = Arc<Mutex<Vec<Namespace>>>;

pub struct NamespaceCounters {
    watched: Watched,
    /// For their descriptions: each scrape fills new ones (two scrapes may run at once).
    tcpext: IntCounterVec,
    sysctl: IntGaugeVec,
}

impl NamespaceCounters {
    pub fn new(watched: Watched) -> prometheus::Result<Self> {
        let (tcpext, sysctl) = Self::vecs()?;
        Ok(Self { watched, tcpext, sysctl })
    }

    fn vecs() -> prometheus::Result<(IntCounterVec, IntGaugeVec)> {
        Ok((
            IntCounterVec::new(
                Opts::new(
                    "twmon_kernel_tcpext_total",
                    "The kernel's own teardown counters from /proc/net/netstat per namespace, read \
                     at each scrape: TW (timewait sockets created, on a timer over 4 s), TWKilled \
                     (on a timer of 4 s or less), TWRecycled (4-tuples taken over under \
                     tcp_tw_reuse), TCPTimeWaitOverflow (tcp_max_tw_buckets hit), TCPAbortOn*.",
                ),
                &["netns", "counter"],
            )?,
            IntGaugeVec::new(
                Opts::new(
                    "twmon_sysctl",
                    "Limits the teardown is measured against, per namespace, read at each scrape: \
                     tcp_max_tw_buckets, ephemeral_ports (size of ip_local_port_range less \
                     reserved ports), tcp_fin_timeout (seconds), tcp_tw_reuse.",
                ),
                &["netns", "name"],
            )?,
        ))
    }
}

impl Collector for NamespaceCounters {
    fn desc(&self) -> Vec<&Desc> {
        self.tcpext.desc().into_iter().chain(self.sysctl.desc()).collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let namespaces = self.watched.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let read = match netns::visit(namespaces, |_| {
            (procfs::read_tcpext().ok(), procfs::read_sysctls().ok())
        }) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!("TcpExt and sysctls not read: {e}");
                return Vec::new();
            }
        };
        // Fresh each scrape: a namespace that is gone leaves no series behind.
        let Ok((tcpext_vec, sysctl_vec)) = Self::vecs() else { return Vec::new() };
        for (ns, r) in read {
            // Gone since the last reconcile (a pod deleted): no series until it is found again.
            let Ok((tcpext, sysctls)) = r else { continue };
            if let Some(t) = tcpext {
                for (name, v) in tcpext_counters(&t) {
                    tcpext_vec.with_label_values(&[&ns.name, name]).inc_by(v);
                }
            }
            if let Some(s) = sysctls {
                for (name, v) in sysctl_values(&s) {
                    sysctl_vec.with_label_values(&[&ns.name, name]).set(v);
                }
            }
        }
        let mut out = tcpext_vec.collect();
        out.extend(sysctl_vec.collect());
        out
    }
}

fn tcpext_counters(t: &TcpExt) -> [(&'static str, u64); 8] {
    [
        ("TW", t.tw),
        ("TWRecycled", t.tw_recycled),
        ("TWKilled", t.tw_killed),
        ("TCPTimeWaitOverflow", t.timewait_overflow),
        ("TCPAbortOnClose", t.tcp_abort_on_close),
        ("TCPAbortOnData", t.tcp_abort_on_data),
        ("TCPAbortOnLinger", t.tcp_abort_on_linger),
        ("TCPAbortOnTimeout", t.tcp_abort_on_timeout),
    ]
}

fn sysctl_values(s: &Sysctls) -> [(&'static str, i64); 6] {
    [
        ("tcp_max_tw_buckets", s.tcp_max_tw_buckets as i64),
        ("ip_local_port_range_min", s.ip_local_port_range.0 as i64),
        ("ip_local_port_range_max", s.ip_local_port_range.1 as i64),
        ("ephemeral_ports", s.ephemeral_ports() as i64),
        ("tcp_fin_timeout", s.tcp_fin_timeout as i64),
        ("tcp_tw_reuse", s.tcp_tw_reuse as i64),
    ]
}
