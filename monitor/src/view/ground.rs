//! The kernel's own view, per network namespace: sockets from sock_diag and the sysctls they
//! are measured against. Read at start-up to seed the agent and every reconcile
//! interval to check it (`twmon_reconcile_drift`) and to compute the breakdowns that a snapshot
//! answers best: sockets by service port, ephemeral-port pressure by destination, sockets per
//! namespace.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use monitor_common::tcp;

use crate::{
    agent::tracker::Tuple,
    config::Config,
    view::{
        diag::{self, DiagSocket},
        netns::{self, Namespace},
        procfs::{self, Sysctls},
    },
};

/// One namespace as the kernel sees it.
#[derive(Clone, Debug)]
pub struct NsView {
    pub inode: u32,
    pub name: String,
    pub sockets: Vec<DiagSocket>,
    pub sysctls: Option<Sysctls>,
}

/// Every state but LISTEN's peers we do not care about: all of them, LISTEN included (it tells
/// service ports apart), except the request sockets of half-open connections.
const DUMP_STATES: u32 = !((1 << tcp::NEW_SYN_RECV) | (1 << tcp::SYN_RECV));

/// Reads each namespace from inside it. A namespace that vanished meanwhile is skipped; one
/// the agent may not enter (no CAP_SYS_ADMIN) is counted in `denied`.
pub fn read(namespaces: &[Namespace], denied: &mut usize) -> Vec<NsView> {
    let read = match netns::visit(namespaces.to_vec(), |_| {
        let families = families(procfs::read_sockstat().ok());
        (diag::dump(DUMP_STATES, &families), procfs::read_sysctls().ok())
    }) {
        Ok(read) => read,
        Err(e) => {
            tracing::warn!("namespaces not read: {e}");
            return Vec::new();
        }
    };
    read.into_iter()
        .filter_map(|(ns, r)| match r {
            Ok((Ok(sockets), sysctls)) => {
                Some(NsView { inode: ns.inode, name: ns.name, sockets, sysctls })
            }
            Ok((Err(e), _)) => {
                tracing::warn!(netns = %ns.name, "sock_diag dump failed: {e}");
                None
            }
            Err(e) => {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    *denied += 1;
                }
                tracing::debug!(netns = %ns.name, "cannot enter namespace: {e}");
                None
            }
        })
        .collect()
}

/// The address families a namespace's dump must ask for: those it has sockets of. sock_diag
/// walks every bucket of the host's established hash table for each family of each namespace,
/// whatever the namespace holds (262 144 buckets, about 1.7 ms, on a small VM), which bounds a
/// reconcile over many namespaces; so a family without sockets is not asked for. Timewait
/// sockets are counted for both families together: while there are any, both are asked for.
/// (Kernels from 6.1 can give each new namespace its own table: `tcp_child_ehash_entries`.)
fn families(sockstat: Option<procfs::Sockstat>) -> Vec<u8> {
    let Some(s) = sockstat else { return vec![diag::AF_INET, diag::AF_INET6] };
    [(diag::AF_INET, s.inuse4), (diag::AF_INET6, s.inuse6)]
        .into_iter()
        .filter(|(_, n)| n + s.tw > 0)
        .map(|(f, _)| f)
        .collect()
}

/// Teardown-state sockets of these namespaces, keyed like the agent's events, with the time
/// left on timewait sockets' timers.
pub fn seeds(views: &[NsView]) -> impl Iterator<Item = (Tuple, u8, Option<Duration>)> + '_ {
    views.iter().flat_map(|v| {
        v.sockets
            .iter()
            .filter(|s| tcp::is_teardown(s.state) || (s.timewait && s.state == tcp::FIN_WAIT2))
            .map(move |s| (Tuple::new(v.inode, s.local, s.remote), s.state, s.timewait_left))
    })
}

/// Teardown-state sockets of these namespaces, keyed like the agent's events.
pub fn teardown(views: &[NsView]) -> HashMap<Tuple, u8> {
    seeds(views).map(|(t, state, _)| (t, state)).collect()
}

/// Sockets per state over these namespaces, as `ss` counts them.
pub fn totals(views: &[NsView]) -> [i64; tcp::MAX_STATES as usize] {
    let mut out = [0i64; tcp::MAX_STATES as usize];
    for v in views {
        for s in &v.sockets {
            if (s.state as u32) < tcp::MAX_STATES {
                out[s.state as usize] += 1;
            }
        }
    }
    out
}

/// Which side of a socket names the service: the local port for a server's sockets, the
/// remote port for a client's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Local,
    Remote,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Remote => "remote",
        }
    }
}

/// "active" for the side that closed first (FIN_WAIT1, FIN_WAIT2, CLOSING, TIME_WAIT),
/// "passive" for the other (CLOSE_WAIT, LAST_ACK).
pub fn role(state: u8) -> &'static str {
    match state {
        tcp::CLOSE_WAIT | tcp::LAST_ACK => "passive",
        _ => "active",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PortRow {
    pub side: Side,
    /// A port number, "ephemeral" (both ends in the ephemeral range) or "other" (past top-K).
    pub port: String,
    pub state: u8,
    pub sockets: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PressureRow {
    pub netns: String,
    pub destination: SocketAddr,
    /// Sockets to the destination holding a local ephemeral port, TIME_WAIT included.
    pub sockets: u64,
    /// `sockets` over the namespace's ephemeral ports.
    pub ratio: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Breakdowns {
    pub ports: Vec<PortRow>,
    pub pressure: Vec<PressureRow>,
    /// (namespace name, state, sockets) for teardown states.
    pub namespaces: Vec<(String, u8, u64)>,
}

fn ephemeral(sysctls: &Option<Sysctls>, port: u16) -> bool {
    let (lo, hi) = sysctls.as_ref().map(|s| s.ip_local_port_range).unwrap_or((32768, 60999));
    (lo..=hi).contains(&port)
}

/// Sockets by service port (top-K per side plus allow-listed ports, the rest as "other"),
/// ephemeral-port pressure by destination (top-K), and sockets per namespace.
pub fn breakdown(views: &[NsView], cfg: &Config) -> Breakdowns {
    let mut ports: HashMap<(Side, String, u8), u64> = HashMap::new();
    let mut pressure: HashMap<(usize, SocketAddr), u64> = HashMap::new();
    let mut namespaces: BTreeMap<(String, u8), u64> = BTreeMap::new();
    for (i, v) in views.iter().enumerate() {
        let listening: HashSet<u16> =
            v.sockets.iter().filter(|s| s.state == tcp::LISTEN).map(|s| s.local.1).collect();
        for s in &v.sockets {
            if s.state == tcp::LISTEN {
                continue;
            }
            let local_service = listening.contains(&s.local.1) || !ephemeral(&v.sysctls, s.local.1);
            if !local_service && !unspecified(s.remote.0) {
                *pressure.entry((i, SocketAddr::new(s.remote.0, s.remote.1))).or_default() += 1;
            }
            if !tcp::is_teardown(s.state) {
                continue;
            }
            *namespaces.entry((v.name.clone(), s.state)).or_default() += 1;
            let (side, port) = if local_service {
                (Side::Local, s.local.1.to_string())
            } else if !ephemeral(&v.sysctls, s.remote.1) {
                (Side::Remote, s.remote.1.to_string())
            } else {
                (Side::Remote, "ephemeral".to_string())
            };
            *ports.entry((side, port, s.state)).or_default() += 1;
        }
    }

    // Top-K per side by sockets over all states; the rest folded into "other".
    let keep: HashSet<(Side, String)> = [Side::Local, Side::Remote]
        .into_iter()
        .flat_map(|side| {
            let mut per_port: HashMap<&str, u64> = HashMap::new();
            for ((s, p, _), n) in &ports {
                if *s == side {
                    *per_port.entry(p.as_str()).or_default() += n;
                }
            }
            let mut ranked: Vec<(&str, u64)> = per_port.into_iter().collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let mut kept: Vec<(Side, String)> = ranked
                .iter()
                .take(cfg.breakdown.top_k)
                .map(|(p, _)| (side, p.to_string()))
                .collect();
            kept.extend(cfg.breakdown.always_ports.iter().map(|p| (side, p.to_string())));
            kept
        })
        .collect();
    let mut folded: BTreeMap<(Side, String, u8), u64> = BTreeMap::new();
    for ((side, port, state), n) in ports {
        let port = if keep.contains(&(side, port.clone())) { port } else { "other".to_string() };
        *folded.entry((side, port, state)).or_default() += n;
    }

    let mut pressure: Vec<PressureRow> = pressure
        .into_iter()
        .map(|((i, destination), sockets)| {
            let size =
                views[i].sysctls.as_ref().map(|s| s.ephemeral_ports()).unwrap_or(28232).max(1);
            PressureRow {
                netns: views[i].name.clone(),
                destination,
                sockets,
                ratio: sockets as f64 / size as f64,
            }
        })
        .collect();
    pressure.sort_by(|a, b| b.ratio.total_cmp(&a.ratio).then(a.destination.cmp(&b.destination)));
    pressure.truncate(cfg.pressure.top_k);

    Breakdowns {
        ports: folded
            .into_iter()
            .map(|((side, port, state), sockets)| PortRow { side, port, state, sockets })
            .collect(),
        pressure,
        namespaces: namespaces.into_iter().map(|((n, s), c)| (n, s, c)).collect(),
    }
}

fn unspecified(a: IpAddr) -> bool {
    a.is_unspecified()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sock(state: u8, local: &str, remote: &str) -> DiagSocket {
        let l: SocketAddr = local.parse().unwrap();
        let r: SocketAddr = remote.parse().unwrap();
        DiagSocket {
            state,
            local: (l.ip(), l.port()),
            remote: (r.ip(), r.port()),
            inode: 0,
            timewait_left: (state == tcp::TIME_WAIT).then(|| Duration::from_secs(30)),
            timewait: state == tcp::TIME_WAIT,
        }
    }

    fn view(sockets: Vec<DiagSocket>) -> NsView {
        NsView {
            inode: 1,
            name: "netns/a".into(),
            sockets,
            sysctls: Some(Sysctls {
                tcp_max_tw_buckets: 262144,
                ip_local_port_range: (40000, 40999),
                tcp_fin_timeout: 60,
                tcp_tw_reuse: 2,
                ip_local_reserved_ports: 0,
            }),
        }
    }

    #[test]
    fn service_ports_roles_and_pressure() {
        let v = view(vec![
            sock(tcp::LISTEN, "0.0.0.0:45000", "0.0.0.0:0"),
            // A server on a port inside the ephemeral range: the listener says it is a service.
            sock(tcp::TIME_WAIT, "10.0.0.1:45000", "10.0.0.9:40001"),
            sock(tcp::CLOSE_WAIT, "10.0.0.1:8080", "10.0.0.9:40002"),
            // Clients: the remote port is the service.
            sock(tcp::TIME_WAIT, "10.0.0.1:40003", "10.0.0.7:443"),
            sock(tcp::TIME_WAIT, "10.0.0.1:40004", "10.0.0.7:443"),
            sock(tcp::ESTABLISHED, "10.0.0.1:40005", "10.0.0.7:443"),
            sock(tcp::TIME_WAIT, "10.0.0.1:40006", "10.0.0.8:40100"),
        ]);
        let b = breakdown(&[v], &Config::default());
        let row = |side, port: &str, state| {
            b.ports
                .iter()
                .find(|r| r.side == side && r.port == port && r.state == state)
                .map(|r| r.sockets)
        };
        assert_eq!(row(Side::Local, "45000", tcp::TIME_WAIT), Some(1));
        assert_eq!(row(Side::Local, "8080", tcp::CLOSE_WAIT), Some(1));
        assert_eq!(row(Side::Remote, "443", tcp::TIME_WAIT), Some(2));
        assert_eq!(row(Side::Remote, "ephemeral", tcp::TIME_WAIT), Some(1));
        assert_eq!(role(tcp::CLOSE_WAIT), "passive");
        assert_eq!(role(tcp::TIME_WAIT), "active");
        // 3 sockets hold a local port towards 10.0.0.7:443, out of 1000 ephemeral ports.
        let p = &b.pressure[0];
        assert_eq!((p.destination.to_string().as_str(), p.sockets), ("10.0.0.7:443", 3));
        assert!((p.ratio - 0.003).abs() < 1e-9);
        assert_eq!(b.namespaces.iter().map(|(_, _, n)| n).sum::<u64>(), 5);
    }

    #[test]
    fn top_k_folds_the_rest_into_other() {
        let sockets: Vec<DiagSocket> = (0..50u16)
            .flat_map(|i| {
                (0..=i % 5).map(move |j| {
                    sock(
                        tcp::TIME_WAIT,
                        &format!("10.0.0.1:{}", 40000 + i * 10 + j),
                        &format!("10.0.0.7:{}", 1000 + i),
                    )
                })
            })
            .collect();
        let mut cfg = Config::default();
        cfg.breakdown.top_k = 4;
        cfg.breakdown.always_ports = vec![1000];
        let b = breakdown(&[view(sockets.clone())], &cfg);
        let ports: HashSet<&str> = b.ports.iter().map(|r| r.port.as_str()).collect();
        assert!(ports.contains("other") && ports.contains("1000"), "{ports:?}");
        assert_eq!(ports.len(), 4 + 1 + 1, "{ports:?}");
        let total: u64 = b.ports.iter().map(|r| r.sockets).sum();
        assert_eq!(total, sockets.len() as u64, "folding lost sockets");
    }
}
