//! What the last reconcile found in the kernel's own view: drift per state, sockets by port,
//! port pressure by destination, sockets per namespace, and CLOSE_WAIT leaks by process. A
//! collector over the reconcile's result, replaced whole: a scrape during a reconcile shows the
//! previous one complete, never a family half rebuilt.
use std::sync::{Arc, Mutex};

use prometheus::{
    core::{Collector, Desc},
    proto,
};

use crate::{
    agent::tracker::state_name,
    export::{family::Spec, kernel_metrics::GAUGE_STATES, metrics::Leak},
    view::ground::{Breakdowns, role},
};

/// One reconcile's result.
#[derive(Clone, Debug, Default)]
pub struct Reconciled {
    /// twmon's count minus the kernel's, per state number.
    pub drift: Vec<i64>,
    pub breakdowns: Breakdowns,
    pub leaks: Vec<Leak>,
}

pub struct GroundMetrics {
    latest: Mutex<Arc<Reconciled>>,
    drift: Spec,
    ports: Spec,
    pressure_ratio: Spec,
    pressure_sockets: Spec,
    netns_sockets: Spec,
    leaked: Spec,
}

impl GroundMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(Self {
            latest: Default::default(),
            drift: Spec::gauge(
                "twmon_reconcile_drift",
                "twmon_sockets minus the kernel's own count (sock_diag, as ss) at the last \
                 reconcile; 0 at rest.",
                &["state"],
            )?,
            ports: Spec::gauge(
                "twmon_port_sockets",
                "Sockets in teardown states by service port: side=local for this host's servers, \
                 side=remote for its clients; top-K ports per side, the rest as port=\"other\", \
                 port=\"ephemeral\" when both ends are ephemeral.",
                &["side", "port", "role", "state"],
            )?,
            pressure_ratio: Spec::gauge(
                "twmon_port_pressure_ratio",
                "Sockets holding a local ephemeral port towards a destination (TIME_WAIT included) \
                 over the namespace's ephemeral ports; busiest destinations only.",
                &["netns", "destination"],
            )?,
            pressure_sockets: Spec::gauge(
                "twmon_port_pressure_sockets",
                "Sockets holding a local ephemeral port towards a destination; busiest \
                 destinations only.",
                &["netns", "destination"],
            )?,
            netns_sockets: Spec::gauge(
                "twmon_netns_sockets",
                "Sockets in teardown states per network namespace (named by container or pod when \
                 it can be told), from the last reconcile.",
                &["netns", "state"],
            )?,
            leaked: Spec::gauge(
                "twmon_close_wait_leaked_sockets",
                "Sockets in CLOSE_WAIT longer than the leak threshold, by the process holding them \
                 (it has not called close()); top-K processes.",
                &["netns", "pid", "comm"],
            )?,
        })
    }

    pub fn set(&self, reconciled: Reconciled) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(reconciled);
    }

    /// Drops every series of network namespace `name`: it is gone.
    pub fn forget_netns(&self, name: &str) {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let mut r = Reconciled::clone(&latest);
        r.breakdowns.pressure.retain(|p| p.netns != name);
        r.breakdowns.namespaces.retain(|(n, _, _)| n != name);
        r.leaks.retain(|l| l.netns != name);
        *latest = Arc::new(r);
    }
}

impl Collector for GroundMetrics {
    fn desc(&self) -> Vec<&Desc> {
        [
            &self.drift,
            &self.ports,
            &self.pressure_ratio,
            &self.pressure_sockets,
            &self.netns_sockets,
            &self.leaked,
        ]
        .into_iter()
        .map(|s| &s.desc)
        .collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let r = self.latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let b = &r.breakdowns;
        let mut out = Vec::new();
        let mut drift = self.drift.family();
        for s in GAUGE_STATES {
            drift.add(&[state_name(s)], r.drift.get(s as usize).copied().unwrap_or(0) as f64);
        }
        drift.done(&mut out);
        let mut ports = self.ports.family();
        for p in &b.ports {
            ports.add(
                &[p.side.label(), &p.port, role(p.state), state_name(p.state)],
                p.sockets as f64,
            );
        }
        ports.done(&mut out);
        let (mut ratio, mut sockets) =
            (self.pressure_ratio.family(), self.pressure_sockets.family());
        for p in &b.pressure {
            let destination = p.destination.to_string();
            ratio.add(&[&p.netns, &destination], p.ratio);
            sockets.add(&[&p.netns, &destination], p.sockets as f64);
        }
        ratio.done(&mut out);
        sockets.done(&mut out);
        let mut netns = self.netns_sockets.family();
        for (ns, state, n) in &b.namespaces {
            netns.add(&[ns, state_name(*state)], *n as f64);
        }
        netns.done(&mut out);
        let mut leaked = self.leaked.family();
        for l in &r.leaks {
            leaked.add(&[&l.netns, &l.pid.to_string(), &l.comm], l.sockets as f64);
        }
        leaked.done(&mut out);
        out
    }
}
