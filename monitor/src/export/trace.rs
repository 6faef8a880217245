//! `/api/v1/trace`: teardown events as they happen, one JSON line each, for `twmon trace` (or
//! curl). The kernel programs write trace records only while at least one client streams
//! them; the agent adds the early timewait ends it decides, and hands every line to each
//! client whose filter it passes. A client too slow to keep up loses lines, and is told how
//! many (`{"lost": N}`), as is `twmon_trace_lost_total`.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use monitor_common::{Event, TraceRecord, flags};
use tokio::sync::broadcast;

use crate::agent::tracker::{reason_name, state_name};

const AF_INET6: u16 = 10;

/// Lines kept for a client between its reads; past that it loses the oldest.
const BACKLOG: usize = 16_384;

/// Clients streaming at once, at most; more get 503.
pub const MAX_CLIENTS: usize = 8;

/// One teardown event, as a trace shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TraceLine {
    /// When it happened, Unix seconds.
    pub time: f64,
    pub netns: String,
    /// The process whose close() or shutdown() made the change, where it is one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub comm: Option<String>,
    /// Its pid.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<u32>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub from: String,
    pub to: String,
    /// Time spent in `from`, where the programs saw it entered.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seconds: Option<f64>,
    /// How a timewait socket ended.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

impl TraceLine {
    /// `clock`: Unix seconds minus CLOCK_MONOTONIC seconds, now. `names`: namespace names by
    /// inode.
    pub fn new(
        ev: &Event,
        comm: &[u8; 16],
        pid: u32,
        clock: f64,
        names: &HashMap<u32, String>,
    ) -> Self {
        let ip = |a: &[u8; 16]| -> IpAddr {
            if ev.family == AF_INET6 {
                Ipv6Addr::from(*a).into()
            } else {
                Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()
            }
        };
        let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
        let is_end = ev.to == monitor_common::tcp::CLOSE && ev.flags & flags::TIMEWAIT != 0;
        Self {
            time: clock + ev.ts_ns as f64 / 1e9,
            netns: names.get(&ev.netns).cloned().unwrap_or_else(|| format!("inode/{}", ev.netns)),
            comm: (end > 0).then(|| String::from_utf8_lossy(&comm[..end]).into_owned()),
            pid: (pid > 0).then_some(pid),
            local: (ip(&ev.saddr), ev.sport).into(),
            remote: (ip(&ev.daddr), ev.dport).into(),
            from: state_name(ev.from).to_string(),
            to: state_name(ev.to).to_string(),
            seconds: (ev.flags & flags::DURATION != 0).then_some(ev.duration_ns as f64 / 1e9),
            reason: is_end.then(|| reason_name(ev.reason).to_string()),
        }
    }

    /// One line for people: `HH:MM:SS.mmm netns comm/pid local remote from -> to, time in from,
    /// (reason)`.
    pub fn text(&self) -> String {
        let day = self.time.rem_euclid(86_400.0);
        let (h, m, s) = ((day / 3600.0) as u32, (day % 3600.0 / 60.0) as u32, day % 60.0);
        let mut line = format!(
            "{h:02}:{m:02}:{s:06.3} {:<16} {:<22} {:<22} {:<22} {:>11} -> {:<10}",
            self.netns,
            match (&self.comm, self.pid) {
                (Some(c), Some(p)) => format!("{c}/{p}"),
                (Some(c), None) => c.clone(),
                _ => "-".into(),
            },
            self.local,
            self.remote,
            self.from,
            self.to
        );
        if let Some(secs) = self.seconds {
            line.push_str(&format!(" after {}", human(secs)));
        }
        if let Some(r) = &self.reason {
            line.push_str(&format!(" ({r})"));
        }
        line
    }
}

/// A duration as people read it: 840 µs, 12.5 ms, 60.0 s.
fn human(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.0} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.1} ms", secs * 1e3)
    } else {
        format!("{secs:.1} s")
    }
}

/// What a client asked to see; every field given must match.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct Filter {
    /// Either end's port.
    pub port: Option<u16>,
    /// Either end's address.
    pub address: Option<IpAddr>,
    pub netns: Option<String>,
    /// `from` or `to`.
    pub state: Option<String>,
    pub comm: Option<String>,
}

impl Filter {
    pub fn matches(&self, l: &TraceLine) -> bool {
        self.port.is_none_or(|p| l.local.port() == p || l.remote.port() == p)
            && self.address.is_none_or(|a| l.local.ip() == a || l.remote.ip() == a)
            && self.netns.as_ref().is_none_or(|n| &l.netns == n)
            && self.state.as_ref().is_none_or(|s| &l.from == s || &l.to == s)
            && self.comm.as_ref().is_none_or(|c| l.comm.as_ref() == Some(c))
    }
}

/// The lines of the running trace, for every client.
pub struct Tracer {
    /// `None` once the agent shuts down: every stream ends with the lines it has.
    tx: Mutex<Option<broadcast::Sender<Arc<TraceLine>>>>,
    /// The clients by id, each with the port it filters on, if it does.
    clients: Mutex<Vec<(u64, Option<u16>)>>,
    next_id: AtomicU64,
}

impl Default for Tracer {
    fn default() -> Self {
        Self {
            tx: Mutex::new(Some(broadcast::channel(BACKLOG).0)),
            clients: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }
}

impl Tracer {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Option<u16>)>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether anyone traces.
    pub fn active(&self) -> bool {
        self.clients() > 0
    }

    pub fn clients(&self) -> usize {
        self.list().len()
    }

    /// The port every client filters on, when they all filter on the same one: the kernel
    /// programs then write records of that port's connections only.
    pub fn common_port(&self) -> Option<u16> {
        let list = self.list();
        let first = list.first()?.1?;
        list.iter().all(|(_, p)| *p == Some(first)).then_some(first)
    }

    /// A new client that filters on `port`, if given: its receiver and id. `None` when
    /// [`MAX_CLIENTS`] stream already.
    pub fn join(&self, port: Option<u16>) -> Option<(broadcast::Receiver<Arc<TraceLine>>, u64)> {
        let lines = self.sender()?.subscribe();
        let mut list = self.list();
        if list.len() >= MAX_CLIENTS {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        list.push((id, port));
        Some((lines, id))
    }

    fn sender(&self) -> Option<broadcast::Sender<Arc<TraceLine>>> {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ends every stream (the agent shuts down), so that no client holds the shutdown up.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// A client left.
    pub fn leave(&self, id: u64) {
        self.list().retain(|(i, _)| *i != id);
    }

    pub fn publish(&self, line: TraceLine) {
        // No receiver: the last client left meanwhile.
        if let Some(tx) = self.sender() {
            let _ = tx.send(Arc::new(line));
        }
    }
}

/// A trace record's bytes, checked and copied (see [`crate::kernel::event::decode`]).
pub fn decode(bytes: &[u8]) -> Option<TraceRecord> {
    if bytes.len() != std::mem::size_of::<TraceRecord>() {
        return None;
    }
    // SAFETY: the length is checked; TraceRecord is plain data valid for any bit pattern;
    // read_unaligned makes no alignment assumption about the ring buffer.
    let r: TraceRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let valid = |s: u8| (s as u32) < monitor_common::tcp::MAX_STATES;
    (valid(r.event.from) && valid(r.event.to)).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_as_people_and_filters_expect() {
        let ev = Event {
            ts_ns: 1_500_000_000,
            duration_ns: 250_000_000,
            netns: 7,
            from: monitor_common::tcp::TIME_WAIT,
            to: monitor_common::tcp::CLOSE,
            reason: monitor_common::reason::EXPIRED,
            family: 2,
            sport: 40000,
            dport: 80,
            flags: flags::DURATION | flags::TIMEWAIT,
            saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..Event::default()
        };
        let names = HashMap::from([(7, "web".to_string())]);
        let l = TraceLine::new(&ev, &[0; 16], 0, 3600.0, &names);
        assert_eq!(
            (l.time, l.netns.as_str(), l.comm.as_deref(), l.pid),
            (3601.5, "web", None, None)
        );
        assert_eq!(
            (l.local.to_string(), l.remote.to_string()),
            ("10.0.0.1:40000".into(), "10.0.0.2:80".into())
        );
        assert_eq!((l.seconds, l.reason.as_deref()), (Some(0.25), Some("expired")));
        let text = l.text();
        assert!(text.starts_with("01:00:01.500 web"), "{text}");
        assert!(
            text.contains("time_wait -> close") && text.ends_with("after 250.0 ms (expired)"),
            "{text}"
        );
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<TraceLine>(&json).unwrap(), l);
        assert!(!json.contains("comm") && !json.contains("pid"), "{json}");
        let mut nginx = [0u8; 16];
        nginx[..5].copy_from_slice(b"nginx");
        let closer = TraceLine::new(&ev, &nginx, 4242, 0.0, &names);
        assert!(closer.text().contains(" nginx/4242 "), "{}", closer.text());

        assert!(Filter { port: Some(80), ..Filter::default() }.matches(&l));
        assert!(!Filter { port: Some(81), ..Filter::default() }.matches(&l));
        assert!(
            Filter {
                state: Some("time_wait".into()),
                netns: Some("web".into()),
                ..Filter::default()
            }
            .matches(&l)
        );
        assert!(
            !Filter { address: Some("10.0.0.3".parse().unwrap()), ..Filter::default() }.matches(&l)
        );
    }
}
