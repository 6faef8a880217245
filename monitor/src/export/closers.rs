//! Who closes first: connections closed by each process, per namespace and role, and the
//! TIME_WAIT sockets those closes left, read from the kernel programs' `CLOSERS` and
//! `TIMEWAIT_HELD` maps at every scrape.
//!
//! The active closer's close() takes a connection from ESTABLISHED to FIN_WAIT1, and its side
//! then holds TIME_WAIT; the passive closer's takes it from CLOSE_WAIT to LAST_ACK. Only the
//! kernel sees which process did it: a timewait socket has no owner, so `ss` shows ports only.
//! The kernel programs carry the closer's cell from the close to the connection's timewait
//! socket, and count it there until the socket ends.
//!
//! A process keeps its series once shown: the first `top_k` (netns, process) pairs by closes get
//! their own, every later one is added to `comm="other"`. Counters must not move between series
//! (a drop reads as a reset to `rate()`), so the set is not re-ranked.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use aya::maps::{HashMap, MapData, PerCpuArray};
use monitor_common::{CloserKey, Closes};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, core::Collector, core::Desc, proto};

use crate::export::netns_counters::Watched;

/// The kernel programs' maps of closers: closes by process, and by each closer's cell the
/// TIME_WAIT sockets it holds, per CPU.
pub struct ClosersMaps {
    pub closes: HashMap<MapData, CloserKey, Closes>,
    pub held: PerCpuArray<MapData, i64>,
}

/// A process's closes, as the JSON snapshot shows them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CloserRow {
    pub netns: String,
    pub comm: String,
    pub active: u64,
    pub passive: u64,
    /// TIME_WAIT sockets there now of connections it closed first.
    pub timewait: u64,
}

pub struct Closers {
    maps: Mutex<ClosersMaps>,
    watched: Watched,
    top_k: usize,
    /// (netns, comm) pairs with series of their own.
    shown: Mutex<BTreeSet<(String, String)>>,
    /// For their descriptions: each scrape fills new ones.
    closes: IntCounterVec,
    held: IntGaugeVec,
}

impl Closers {
    pub fn new(maps: ClosersMaps, watched: Watched, top_k: usize) -> prometheus::Result<Self> {
        let (closes, held) = (Self::closes()?, Self::held()?);
        Ok(Self { maps: Mutex::new(maps), watched, top_k, shown: Mutex::default(), closes, held })
    }

    fn held() -> prometheus::Result<IntGaugeVec> {
        IntGaugeVec::new(
            Opts::new(
                "twmon_timewait_sockets",
                "TIME_WAIT sockets now, by the process whose close() created them (it closed \
                 first) and its namespace. Sockets whose close the agent did not see (made before \
                 it started) are in twmon_sockets only. The first top_k processes keep their own \
                 series; later ones are counted in comm=\"other\".",
            ),
            &["netns", "comm"],
        )
    }

    fn closes() -> prometheus::Result<IntCounterVec> {
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
        let names: BTreeMap<u32, String> = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|n| (n.inode, n.name.clone()))
            .collect();
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        // What a closer's cell holds, summed over CPUs (each CPU counts the sockets that entered
        // and left on it, so one alone may be negative).
        let held = |slot: u32| -> u64 {
            if slot == 0 {
                return 0;
            }
            maps.held.get(&slot, 0).map_or(0, |per_cpu| per_cpu.iter().sum::<i64>().max(0) as u64)
        };
        // Only the namespaces the agent watches (the last reconcile found them and named them).
        let mut rows: Vec<CloserRow> = maps
            .closes
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Some((names.get(&k.netns)?, k, v)))
            .map(|(netns, k, v)| CloserRow {
                netns: netns.clone(),
                comm: comm(&k.comm),
                active: v.active,
                passive: v.passive,
                timewait: if v.active > 0 { held(v.slot) } else { 0 },
            })
            .collect();
        rows.sort_by(|a, b| {
            (b.active + b.passive).cmp(&(a.active + a.passive)).then(a.comm.cmp(&b.comm))
        });
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
        self.closes.desc().into_iter().chain(self.held.desc()).collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let rows = self.rows();
        let (Ok(closes), Ok(held)) = (Self::closes(), Self::held()) else { return Vec::new() };
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        for r in rows {
            let key = (r.netns.clone(), r.comm.clone());
            if !shown.contains(&key) && shown.len() < self.top_k {
                shown.insert(key.clone());
            }
            let comm = if shown.contains(&key) { r.comm.as_str() } else { "other" };
            closes.with_label_values(&[&r.netns, comm, "active"]).inc_by(r.active);
            closes.with_label_values(&[&r.netns, comm, "passive"]).inc_by(r.passive);
            if r.active > 0 {
                held.with_label_values(&[&r.netns, comm]).add(r.timewait as i64);
            }
        }
        closes.collect().into_iter().chain(held.collect()).collect()
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
