//! Who closes first: connections closed by each process, per namespace and role, read from the
//! kernel programs' `CLOSERS` map at every scrape.
//!
//! The active closer's close() takes a connection from ESTABLISHED to FIN_WAIT1, and its side
//! then holds TIME_WAIT; the passive closer's takes it from CLOSE_WAIT to LAST_ACK. Only the
//! kernel sees which process did it: a timewait socket has no owner, so `ss` shows ports only.
//!
//! A process keeps its series once shown: the first `top_k` (netns, process) pairs by closes get
//! their own, every later one is added to `comm="other"`. Counters must not move between series
//! (a drop reads as a reset to `rate()`), so the set is not re-ranked.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use aya::maps::{HashMap, MapData};
use monitor_common::{CloserKey, Closes};
use prometheus::{IntCounterVec, Opts, core::Collector, core::Desc, proto};

use crate::export::netns_counters::Watched;

pub type ClosersMap = HashMap<MapData, CloserKey, Closes>;

/// A process's closes, as the JSON snapshot shows them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CloserRow {
    pub netns: String,
    pub comm: String,
    pub active: u64,
    pub passive: u64,
}

pub struct Closers {
    map: Mutex<ClosersMap>,
    watched: Watched,
    top_k: usize,
    /// (netns, comm) pairs with series of their own.
    shown: Mutex<BTreeSet<(String, String)>>,
    /// For its description: each scrape fills a new one.
    closes: IntCounterVec,
}

impl Closers {
    pub fn new(map: ClosersMap, watched: Watched, top_k: usize) -> prometheus::Result<Self> {
        Ok(Self { map: Mutex::new(map), watched, top_k, shown: Mutex::default(), closes: Self::vec()? })
    }

    fn vec() -> prometheus::Result<IntCounterVec> {
        IntCounterVec::new(
            Opts::new(
                "twmon_closes_total",
                "Connections closed, by the process whose close() or shutdown() did it (comm: its \
                 name) and role: active (it closed first, ESTABLISHED -> FIN_WAIT1; its side holds \
                 TIME_WAIT) or passive (it closed second, CLOSE_WAIT -> LAST_ACK). The first top_k \
                 processes keep their own series; later ones are counted in comm=\"other\".",
            ),
            &["netns", "comm", "role"],
        )
    }

    /// Every process's closes, most first.
    pub fn rows(&self) -> Vec<CloserRow> {
        let names: BTreeMap<u32, String> =
            self.watched.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|n| (n.inode, n.name.clone())).collect();
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Only the namespaces the agent watches (the last reconcile found them and named them).
        let mut rows: Vec<CloserRow> = map
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Some((names.get(&k.netns)?, k, v)))
            .map(|(netns, k, v)| CloserRow {
                netns: netns.clone(),
                comm: comm(&k.comm),
                active: v.active,
                passive: v.passive,
            })
            .collect();
        rows.sort_by(|a, b| (b.active + b.passive).cmp(&(a.active + a.passive)).then(a.comm.cmp(&b.comm)));
        rows
    }
}

/// A `comm` up to its first NUL, as text.
fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

impl Collector for Closers {
    fn desc(&self) -> Vec<&Desc> {
        self.closes.desc()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let rows = self.rows();
        let Ok(closes) = Self::vec() else { return Vec::new() };
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        for r in rows {
            let key = (r.netns.clone(), r.comm.clone());
            if !shown.contains(&key) && shown.len() < self.top_k {
                shown.insert(key.clone());
            }
            let comm = if shown.contains(&key) { r.comm.as_str() } else { "other" };
            closes.with_label_values(&[&r.netns, comm, "active"]).inc_by(r.active);
            closes.with_label_values(&[&r.netns, comm, "passive"]).inc_by(r.passive);
        }
        closes.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_stops_at_the_first_nul() {
        let mut raw = [0u8; 16];
        raw[..5].copy_from_slice(b"nginx");
        assert_eq!(comm(&raw), "nginx");
        assert_eq!(comm(b"a-sixteen-byte-n"), "a-sixteen-byte-n");
    }
}
