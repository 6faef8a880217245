//! The JSON snapshot (`/api/v1/snapshot`): live socket counts, the last reconcile and the
//! closes by process.
use std::collections::BTreeMap;

use crate::{
    agent::tracker::state_name,
    export::{
        closers::CloserRow,
        metrics::{GAUGE_STATES, Leak},
    },
    view::ground::{self, Breakdowns},
};

/// What `/api/v1/snapshot` returns besides the live socket counts: the last reconcile.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub reconciled_unix_seconds: f64,
    pub drift: BTreeMap<&'static str, i64>,
    pub ports: Vec<PortJson>,
    pub pressure: Vec<PressureJson>,
    pub namespaces: Vec<NamespaceJson>,
    pub leaks: Vec<Leak>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PortJson {
    pub side: &'static str,
    pub port: String,
    pub role: &'static str,
    pub state: &'static str,
    pub sockets: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PressureJson {
    pub netns: String,
    pub destination: String,
    pub sockets: u64,
    pub ratio: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NamespaceJson {
    pub netns: String,
    pub state: &'static str,
    pub sockets: u64,
}

impl Report {
    /// The report of a reconcile that found `drift` and the breakdowns `b`.
    pub fn new(drift: &[i64], b: &Breakdowns, leaks: Vec<Leak>) -> Self {
        Report {
            reconciled_unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            drift: GAUGE_STATES.iter().map(|s| (state_name(*s), drift[*s as usize])).collect(),
            ports: b
                .ports
                .iter()
                .map(|r| PortJson {
                    side: r.side.label(),
                    port: r.port.clone(),
                    role: ground::role(r.state),
                    state: state_name(r.state),
                    sockets: r.sockets,
                })
                .collect(),
            pressure: b
                .pressure
                .iter()
                .map(|p| PressureJson {
                    netns: p.netns.clone(),
                    destination: p.destination.to_string(),
                    sockets: p.sockets,
                    ratio: p.ratio,
                })
                .collect(),
            namespaces: b
                .namespaces
                .iter()
                .map(|(n, s, c)| NamespaceJson { netns: n.clone(), state: state_name(*s), sockets: *c })
                .collect(),
            leaks,
        }
    }
}

/// The whole snapshot: `sockets` (the agent's live counts, by state number), the last reconcile
/// and the closes by process.
pub fn json(sockets: &[i64], report: Report, closers: Vec<CloserRow>) -> serde_json::Value {
    let sockets: BTreeMap<&str, i64> = GAUGE_STATES.iter().map(|s| (state_name(*s), sockets[*s as usize])).collect();
    serde_json::json!({ "sockets": sockets, "reconcile": report, "closers": closers })
}
