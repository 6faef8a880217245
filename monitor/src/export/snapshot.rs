//! The JSON snapshot (`/api/v1/snapshot`): live socket counts, the last reconcile and the
//! closes by process.
use std::collections::BTreeMap;

use monitor_common::{Lifecycle, counter, reason};

use crate::{
    agent::tracker::{Decided, reason_name, state_name},
    export::{
        closers::CloserRow,
        metrics::{GAUGE_STATES, Leak},
    },
    kernel::Readout,
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
                .map(|(n, s, c)| NamespaceJson {
                    netns: n.clone(),
                    state: state_name(*s),
                    sockets: *c,
                })
                .collect(),
            leaks,
        }
    }
}

/// Running totals since the agent started, as the metrics count them.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counts {
    /// `"from -> to"`: transitions that happened at least once.
    pub transitions: BTreeMap<String, u64>,
    /// How timewait sockets ended, by reason.
    pub timewait_ends: BTreeMap<&'static str, u64>,
    /// Records lost to a full ring buffer, entries lost to full maps, timewait ends no program
    /// saw: each one a number that may be off.
    pub events_lost: u64,
    pub map_full: u64,
    pub timewait_end_missed: u64,
}

impl Counts {
    pub fn new(k: &Readout, decided: &Decided) -> Self {
        let mut total: Lifecycle = k.lifecycle;
        total.add(&decided.lifecycle);
        let n = monitor_common::STATES;
        let transitions = total
            .transitions
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| {
                (format!("{} -> {}", state_name((i / n) as u8), state_name((i % n) as u8)), *c)
            })
            .collect();
        let ends = [reason::EXPIRED, reason::REUSE, reason::KILLED, reason::FIN_TIMEOUT];
        let timewait_ends = ends
            .iter()
            .map(|r| {
                (
                    reason_name(*r),
                    k.counter(counter::TIMEWAIT_ENDS + *r as u32) + decided.ends[*r as usize],
                )
            })
            .collect();
        let full = [
            counter::SOCKS_FULL,
            counter::TIMEWAIT_FULL,
            counter::ORPHANS_FULL,
            counter::CLOSERS_FULL,
        ];
        Self {
            transitions,
            timewait_ends,
            events_lost: k.counter(counter::EVENTS_LOST),
            map_full: full.iter().map(|c| k.counter(*c)).sum(),
            timewait_end_missed: k.counter(counter::TIMEWAIT_MISSED),
        }
    }
}

/// The whole snapshot: `sockets` (the agent's live counts, by state number), the running
/// counts, the last reconcile and the closes by process.
pub fn json(
    sockets: &[i64],
    counts: Counts,
    report: Report,
    closers: Vec<CloserRow>,
) -> serde_json::Value {
    let sockets: BTreeMap<&str, i64> =
        GAUGE_STATES.iter().map(|s| (state_name(*s), sockets[*s as usize])).collect();
    serde_json::json!({
        "sockets": sockets,
        "counts": counts,
        "reconcile": report,
        "closers": closers,
    })
}
