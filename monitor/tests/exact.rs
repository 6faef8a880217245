//! Exact under real traffic: twmon's *why* numbers (transitions, hand-offs, how timewait
//! sockets ended) against the kernel's own counters, with real software closing connections
//! and the kernel paths that reuse a 4-tuple or a freed socket's memory.
//!
//! Invariants checked (the oracle is the kernel, never twmon's own logic):
//! - transitions into `time_wait` equal the timewait sockets the kernel created (TcpExt `TW` +
//!   `TWKilled`) when every one of them reached TIME_WAIT;
//! - a hand-off is missed only when the kernel created no timewait socket
//!   (`TCPTimeWaitOverflow`);
//! - both sides of every connection leave ESTABLISHED exactly once (Tcp `ActiveOpens` +
//!   `PassiveOpens` - `AttemptFails`);
//! - timewait sockets that ended before 2MSL equal those created minus those `ss` still shows;
//! - the gauges equal `ss`, and no timewait entry outlives its socket past a reconcile.
mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use common::{Agent, Metrics, Netns};
use monitor_common::{SockEntry, tcp};
use socket2::{Domain, Socket, Type};

const SETTLE: Duration = Duration::from_secs(20);

/// Sum of a metric's series whose labels include `label`.
fn sum_with(m: &Metrics, name: &str, label: &str) -> f64 {
    m.series(name).iter().filter(|(l, _)| l.split(',').any(|p| p == label)).map(|(_, v)| v).sum()
}

fn into_state(m: &Metrics, state: &str) -> f64 {
    sum_with(m, "twmon_state_transitions_total", &format!("to=\"{state}\""))
}

fn out_of_state(m: &Metrics, state: &str) -> f64 {
    sum_with(m, "twmon_state_transitions_total", &format!("from=\"{state}\""))
}

/// Timewait sockets that ended before 2MSL, by twmon: every reason but expiry.
fn early_ends(m: &Metrics) -> f64 {
    ["reuse", "killed"].iter().map(|r| m.must("twmon_timewait_ends_total", &[("reason", r)])).sum()
}

/// The kernel's timewait sockets created in the namespace.
fn created(ns: &Netns) -> u64 {
    ns.counter("TcpExt", "TW") + ns.counter("TcpExt", "TWKilled")
}

/// Every number twmon derives, for failure messages.
fn numbers(m: &Metrics) -> String {
    m.text
        .lines()
        .filter(|l| {
            l.starts_with("twmon_")
                && !l.contains("_bucket")
                && !l.contains("bpf_program")
                && !l.contains("kernel_sysctl")
                && !l.ends_with(" 0")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// nginx, closing first (keep-alive off), under wrk: every connection's server side goes to
/// TIME_WAIT through a hand-off, many of them in process context while nginx holds the socket,
/// and clients reuse ports whose 4-tuple the server still holds in TIME_WAIT (a SYN reopens it).
#[test]
fn nginx_closing_first_under_wrk() {
    common::raise_nofile();
    let ns = Netns::new("nginx");
    let config = Agent::config_file("nginx", common::FAST_RECONCILE);
    let agent = Agent::start_with(&ns, &["--config.file", &config]);
    let nginx = Nginx::start(&ns);
    let out = ns.exec(&["wrk", "-t2", "-c64", "-d3s", &format!("http://{}/", nginx.addr)]);
    let requests: u64 = out
        .lines()
        .find_map(|l| l.split_once(" requests in ").map(|(n, _)| n.trim().parse().unwrap_or(0)))
        .unwrap_or_else(|| panic!("wrk's output: {out}"));
    assert!(requests > 1000, "wrk made only {requests} requests:\n{out}");
    drop(nginx);

    // At rest: only the server's TIME_WAIT sockets are left, and twmon counts them as ss does.
    let at_rest = |m: &Metrics| {
        let tw = ns.ss("TIME-WAIT").len() as f64;
        m.sockets("time_wait") == tw
            && ["fin_wait1", "fin_wait2", "close_wait", "closing", "last_ack"].iter().all(|s| m.sockets(s) == 0.0)
            && m.value("twmon_reconcile_drift", &[("state", "time_wait")]) == Some(0.0)
    };
    let m = agent.wait_for(SETTLE, at_rest);
    assert!(at_rest(&m), "not at rest: ss {} TIME-WAIT\n{}", ns.ss("TIME-WAIT").len(), numbers(&m));
    check_kernel_invariants(&ns, &m);
    let opened = ns.counter("Tcp", "ActiveOpens") + ns.counter("Tcp", "PassiveOpens");
    let failed = ns.counter("Tcp", "AttemptFails");
    assert_eq!(
        out_of_state(&m, "established") as u64,
        opened - failed,
        "every connection's two sides leave ESTABLISHED once\n{}",
        numbers(&m)
    );
    eprintln!("nginx: {requests} requests, {} timewait sockets, {} reopened", created(&ns), early_ends(&m));
}

/// The invariants that hold at rest in any namespace, against the kernel's counters.
fn check_kernel_invariants(ns: &Netns, m: &Metrics) {
    let created = created(ns) as f64;
    let overflow = ns.counter("TcpExt", "TCPTimeWaitOverflow") as f64;
    let in_tw = ns.ss("TIME-WAIT").len() as f64;
    let expired = m.must("twmon_timewait_ends_total", &[("reason", "expired")]);
    let numbers = numbers(m);
    assert_eq!(m.must("twmon_timewait_handoff_missed_total", &[]), overflow, "hand-offs missed\n{numbers}");
    assert_eq!(into_state(m, "time_wait"), created, "transitions into time_wait vs TW + TWKilled\n{numbers}");
    assert_eq!(early_ends(m) + expired, created - in_tw, "timewait sockets that ended\n{numbers}");
    assert_eq!(m.transitions("time_wait", "close"), created - in_tw, "time_wait -> close\n{numbers}");
    assert_eq!(
        m.must("twmon_timewait_ends_total", &[("reason", "reuse")]),
        ns.counter("TcpExt", "TWRecycled") as f64,
        "reuse ends vs TWRecycled\n{numbers}"
    );
    assert_eq!(m.must("twmon_timewait_end_missed_total", &[]), 0.0, "{numbers}");
    assert_eq!(m.sockets("time_wait"), in_tw, "{numbers}");
}

/// A port range of 4 and connections the server closes first: clients reconnect from ports
/// whose 4-tuple the server holds in TIME_WAIT, and the kernel lets their SYN reopen it (the
/// timewait socket ends, a new connection takes the 4-tuple). Each is a new timewait socket in
/// the memory of the one just freed, on the same 4-tuple: not a re-arm.
#[test]
fn syn_reopens_time_wait() {
    const N: usize = 20;
    let ns = Netns::new("reopen");
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40003"]);
    let agent = Agent::start(&ns);
    let server = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = server.local_addr().unwrap();
    for _ in 0..N {
        let mut c = ns.run(move || TcpStream::connect(addr).expect("a port of 4 is free"));
        let (s, _) = server.accept().unwrap();
        drop(s);
        assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0, "the server's FIN");
        drop(c);
        // The client's LAST_ACK ends once the server's final ACK arrives.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ns.ss("LAST-ACK").is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let reopened = N as u64 - ns.ss("TIME-WAIT").len() as u64;
    assert_eq!(created(&ns), N as u64, "one timewait socket per connection");
    assert!(reopened >= (N - 4) as u64, "the kernel reopened only {reopened} of {N}: the test needs port reuse");
    let m = agent.wait_for(SETTLE, |m| early_ends(m) == reopened as f64);
    check_kernel_invariants(&ns, &m);
    assert_eq!(m.transitions("fin_wait2", "time_wait"), N as f64, "{}", numbers(&m));
    assert_eq!(m.must("twmon_timewait_rearms_total", &[]), 0.0, "no segment re-armed a timer");
    assert_eq!(m.must("twmon_timewait_ends_total", &[("reason", "killed")]), reopened as f64);
}

/// A timewait entry whose socket is gone without its end seen (whatever the cause) is ended
/// at the next reconcile and counted as missed. Made here from a real one: a SYN reopens a
/// TIME_WAIT 4-tuple (its entry ends as it should), then its entry is put back into the map and
/// counted in the gauge again, as if that end had never been seen.
#[test]
fn timewait_entry_without_socket_is_ended() {
    let ns = Netns::new("ghost");
    let config = Agent::config_file("ghost", common::FAST_RECONCILE);
    let agent = Agent::start_with(&ns, &["--config.file", &config]);
    let server = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = server.local_addr().unwrap();
    let local: SocketAddr = "127.0.0.1:40123".parse().unwrap();
    let client = move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&local.into()).unwrap();
        s.connect(&addr.into()).unwrap();
        TcpStream::from(s)
    };
    // The server closes first: its side goes to TIME_WAIT.
    let mut c = ns.run(client);
    let (s, _) = server.accept().unwrap();
    drop(s);
    assert_eq!(c.read(&mut [0u8; 1]).unwrap(), 0);
    drop(c);
    let m = agent.wait_for(SETTLE, |m| m.sockets("time_wait") == 1.0);
    assert_eq!(m.sockets("time_wait"), 1.0);
    let maps = AgentMaps::open(&agent);
    let entries: Vec<(u64, SockEntry)> = maps.timewait().iter().map(|r| r.unwrap()).collect();
    assert_eq!(entries.len(), 1, "one timewait entry");

    // The same 4-tuple again: the SYN ends the timewait socket.
    let mut again = ns.run(client);
    let (mut s2, _) = server.accept().unwrap();
    let m = agent.wait_for(SETTLE, |m| early_ends(m) == 1.0);
    assert_eq!(m.sockets("time_wait"), 0.0, "{}", numbers(&m));
    assert!(maps.timewait().iter().next().is_none(), "the entry ended with its socket");

    // Back into the map and the gauge: an entry without a socket.
    let (tw, entry) = entries[0];
    maps.timewait().insert(tw, entry, 0).unwrap();
    maps.add_to_gauge(tcp::TIME_WAIT, 1);
    let missed = |m: &Metrics| m.must("twmon_timewait_end_missed_total", &[]);
    let m = agent.wait_for(SETTLE, |m| missed(m) == 1.0 && m.sockets("time_wait") == 0.0);
    assert_eq!(missed(&m), 1.0, "{}", numbers(&m));
    assert_eq!(m.sockets("time_wait"), 0.0);
    assert!(maps.timewait().iter().next().is_none(), "the entry without a socket was ended");
    let m = agent.wait_for(SETTLE, |m| m.value("twmon_reconcile_drift", &[("state", "time_wait")]) == Some(0.0));
    assert_eq!(m.must("twmon_reconcile_drift", &[("state", "time_wait")]), 0.0);
    // The live connection is untouched.
    again.write_all(b"x").unwrap();
    assert_eq!(s2.read(&mut [0u8; 1]).unwrap(), 1);
}

/// The agent's own maps, opened by id.
struct AgentMaps {
    ids: Vec<u32>,
}

impl AgentMaps {
    fn open(agent: &Agent) -> Self {
        Self { ids: agent.map_ids() }
    }

    fn find(&self, name: &str) -> Map {
        for id in &self.ids {
            let data = MapData::from_id(*id).unwrap();
            if data.info().unwrap().name_as_str() == Some(name) {
                return Map::from_map_data(data).unwrap();
            }
        }
        panic!("the agent has no map {name}");
    }

    fn timewait(&self) -> BpfHashMap<MapData, u64, SockEntry> {
        BpfHashMap::try_from(self.find("TIMEWAIT")).unwrap()
    }

    /// Adds `delta` to a state's gauge (its slot of the first CPU).
    fn add_to_gauge(&self, state: u8, delta: i64) {
        let mut gauges: PerCpuArray<MapData, i64> = PerCpuArray::try_from(self.find("GAUGES")).unwrap();
        let mut values: Vec<i64> = gauges.get(&(state as u32), 0).unwrap().to_vec();
        values[0] += delta;
        gauges.set(state as u32, PerCpuValues::try_from(values).unwrap(), 0).unwrap();
    }
}

/// nginx in the namespace, serving a small response on a loopback port with keep-alive off.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Nginx {
    fn start(ns: &Netns) -> Self {
        let dir = std::env::temp_dir().join(format!("twmon-nginx-{}", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nuser root;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_timeout 0;\n  client_body_temp_path {d}/body;\n\
             \x20 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 server {{ listen {addr}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nginx", "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian package nginx-light; `cargo xtask setup` installs it)");
        let nginx = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.exec(&["ss", "-tlnH"]).contains(&addr.to_string()) {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {addr}: {:?}",
                std::fs::read_to_string(nginx.dir.join("error.log"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: nginx's graceful stop, which closes every connection first.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
