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
mod harness;

use std::{
    io::{Read, Write},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use common::{Agent, Metrics, Netns};
use harness::{Made, ends};
use monitor_common::{SockEntry, tcp};
use testkit::workload::{self, Close, Server};

/// How long a rest point may take to come: a scrape and two reads of the kernel cost seconds
/// in a software-emulated VM running four tests at once.
const SETTLE: Duration = Duration::from_secs(60);

/// One test of this file at a time. On a machine whose cores are all busy (nginx and wrk beside
/// the randomized cases, two cores), a few state changes made in process context, as `close()`
/// processes the segments queued meanwhile, reach no BPF program at all: measured with 327 573
/// connections, 55 `fin_wait1 -> fin_wait2` and `fin_wait2 -> close` were missed by two agents
/// alike, while the kernel counted no skipped run and ftrace saw every one (README, "Exact
/// against the kernel"). The cases here check exact equality, so they run on quiet cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Timewait sockets that ended before 2MSL, by twmon: every reason but expiry.
fn early_ends(m: &Metrics) -> f64 {
    ends(m, "reuse") + ends(m, "killed")
}

/// The kernel's timewait sockets created in the namespace.
fn created(ns: &Netns) -> u64 {
    ns.counter("TcpExt", "TW") + ns.counter("TcpExt", "TWKilled")
}

/// Fixed seeds of the randomized harness: each a namespace of its own with its own agent, a
/// random mix of closes, aborts, held CLOSE_WAITs, port reuse, overflow, short fin timeouts,
/// IPv4 and IPv6 from several threads, checked at rest against the kernel. A case that some of
/// its kernel work was hidden from BPF in (done on a thread of PID 1, see `harness::Blind`)
/// runs again, at most twice.
#[test]
fn randomized_cases_match_the_kernel() {
    let _one = serial();
    // 0x7419 loses ACKs (nftables) and overflows tcp_max_tw_buckets. One after another, for the
    // reason `serial` gives: five cases at once keep both cores busy.
    const SEEDS: [u64; 5] = [0x7411, 0x7412, 0x7413, 0x7414, 0x7419];
    const ATTEMPTS: usize = 3;
    for seed in SEEDS {
        for attempt in 1..=ATTEMPTS {
            let ns = Netns::new("case");
            let config = Agent::config_file(&format!("case{seed}"), common::FAST_RECONCILE);
            let agent = Agent::start_with(&ns, &["--config.file", &config]);
            let blind = harness::Blind::watch();
            let hidden = || blind.as_ref().map_or(0, harness::Blind::hidden);
            let again = |hidden: usize| {
                eprintln!(
                    "seed {seed:#x}: {hidden} events on PID 1's threads, hidden from BPF \
                     (harness::Blind); again"
                );
            };
            let made = harness::run_case(&ns, seed);
            if hidden() > 0 && attempt < ATTEMPTS {
                again(hidden());
                continue;
            }
            let (m, k) = harness::at_rest(&agent, &ns, SETTLE);
            // Also while the case came to rest (timers running out, late segments).
            if hidden() > 0 && attempt < ATTEMPTS {
                again(hidden());
                continue;
            }
            let ctx = format!(
                "seed {seed:#x}, {} events hidden from BPF (rerun: cargo xtask soak --seed \
                 {seed:#x} --cases 1)",
                hidden()
            );
            harness::check(&ctx, &m, &k, &made);
            break;
        }
    }
}

/// `cargo xtask soak --minutes M --seed S`: cases one after another in one namespace watched
/// by one agent, with namespaces created and deleted alongside; the invariants at every rest
/// point, and the agent's memory, printed as it goes.
#[test]
#[ignore = "long: run by `cargo xtask soak`"]
fn soak() {
    let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| parse_u64(&v)).unwrap_or(d);
    let minutes = env("TWMON_SOAK_MINUTES", 60);
    let seed = env("TWMON_SOAK_SEED", 0x50a6);
    let max_cases = env("TWMON_SOAK_CASES", u64::MAX);
    common::raise_nofile();
    let fresh = || {
        let ns = Netns::new("soak");
        let config = Agent::config_file("soak", common::FAST_RECONCILE);
        let agent = Agent::start_with(&ns, &["--config.file", &config]);
        // For the agent's whole life: cases, rest points and what lies between.
        let blind = harness::Blind::watch();
        (ns, agent, blind)
    };
    let (mut ns, mut agent, mut blind) = fresh();
    let mut restarts = 0u64;
    let start = Instant::now();
    let mut rng = harness::Rng::new(seed);
    let mut made = harness::Made::default();
    let mut case = 0u64;
    println!(
        "soak: seed {seed:#x}, {minutes} min; minute  case  connections  timewait-created  ended  time_wait  drift  rss-kib  abandoned"
    );
    while start.elapsed() < Duration::from_secs(minutes * 60) && case < max_cases {
        let case_seed = if case == 0 { seed } else { rng.next() };
        // Other namespaces come and go with live TIME_WAIT sockets meanwhile.
        let churn = std::thread::spawn(move || namespace_churn(case_seed));
        let this = harness::run_case(&ns, case_seed);
        churn.join().expect("namespace churn");
        made += this;
        let hidden = |b: &Option<harness::Blind>| b.as_ref().map_or(0, harness::Blind::hidden);
        let rest =
            if hidden(&blind) == 0 { Some(harness::at_rest(&agent, &ns, SETTLE)) } else { None };
        let Some((m, k)) = rest.filter(|_| hidden(&blind) == 0) else {
            // Every count from here on would be off by them: start again in a new namespace.
            println!(
                "soak: case {case}: {} events on PID 1's threads, hidden from BPF \
                 (harness::Blind); a new namespace and agent",
                hidden(&blind)
            );
            restarts += 1;
            (ns, agent, blind) = fresh();
            made = harness::Made::default();
            case += 1;
            continue;
        };
        if m.get("twmon_timewait_end_missed_total", &[]) > 0.0 {
            let log = agent.log();
            let unseen: Vec<_> =
                log.lines().filter(|l| l.contains("ended unseen")).take(20).collect();
            eprintln!("soak: the agent's account of missed ends:\n{}", unseen.join("\n"));
        }
        harness::check(&format!("soak case {case} seed {case_seed:#x}"), &m, &k, &made);
        let total = |m: &Metrics| {
            m.series("twmon_reconcile_drift").iter().map(|(_, v)| v.abs()).sum::<f64>()
        };
        let drift = total(&agent.wait_for(SETTLE, |m| total(m) == 0.0));
        assert_eq!(drift, 0.0, "soak case {case} seed {case_seed:#x}: drift at rest");
        println!(
            "soak: {:6.1} {:5} {:12} {:17} {:6} {:10} {:6} {:8} {:10}",
            start.elapsed().as_secs_f64() / 60.0,
            case,
            made.connections,
            k.created,
            k.created
                - k.states
                    .iter()
                    .filter(|(s, _)| *s == "time_wait" || *s == "fin_wait2")
                    .map(|(_, n)| n)
                    .sum::<f64>(),
            m.sockets("time_wait"),
            drift,
            agent.rss_kib(),
            made.abandoned
        );
        case += 1;
    }
    println!(
        "soak: {case} cases, every invariant held at every rest point ({restarts} cases hidden in \
         part from BPF, each followed by a new namespace and agent)"
    );
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A few namespaces, each with TIME_WAIT sockets, deleted while they are alive.
fn namespace_churn(seed: u64) {
    let mut rng = harness::Rng::new(seed ^ 0xc4u64);
    let spaces: Vec<Netns> = (0..2 + rng.below(6)).map(|_| Netns::new("churn")).collect();
    for ns in &spaces {
        let n = 1 + rng.below(20) as usize;
        ns.run(|| {
            let server = Server::bind("127.0.0.1:0");
            for _ in 0..n {
                Close::ClientFirst.run(server.connect());
            }
        });
    }
    drop(spaces);
}

/// nginx, closing first (keep-alive off), under wrk: every connection's server side goes to
/// TIME_WAIT through a hand-off, many of them in process context while nginx holds the socket,
/// and clients reuse ports whose 4-tuple the server still holds in TIME_WAIT (a SYN reopens it).
#[test]
fn nginx_closing_first_under_wrk() {
    let _one = serial();
    common::raise_nofile();
    let ns = Netns::new("nginx");
    let config = Agent::config_file("nginx", common::FAST_RECONCILE);
    let agent = Agent::start_with(&ns, &["--config.file", &config]);
    let nginx = Nginx::start(&ns);
    let out = ns.exec(&["wrk", "-t2", "-c64", "-d3s", &format!("http://{}/", nginx.addr)]);
    let requests: u64 = out
        .lines()
        .find_map(|l| l.split_once(" requests in ")?.0.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk's output: {out}"));
    // Tens of thousands here; a few hundred in a software-emulated VM (196 once, on a loaded
    // machine).
    assert!(requests > 50, "wrk made only {requests} requests:\n{out}");
    drop(nginx);

    let (m, k) = harness::at_rest(&agent, &ns, SETTLE);
    // wrk resets the connections it has open when it stops: orphaned FIN_WAIT2 timewait
    // sockets of nginx's among them end without a FIN.
    harness::check("nginx under wrk", &m, &k, &Made { orphans_unknown: true, ..Made::default() });
    eprintln!(
        "nginx: {requests} requests, {} timewait sockets, {} reopened",
        k.created,
        early_ends(&m)
    );
}

/// Connections the client aborts after its FIN: `SO_LINGER` 0 in FIN_WAIT2, a close with unread
/// data in FIN_WAIT2, and a close answered by data (the server's ACK of the FIN carries it, so
/// the orphan gets data after close). Each goes from fin_wait2 to close without a timewait
/// socket, and none is a hand-off the kernel could not make: at the tracepoint the kernel has
/// not yet set the error these aborts report, and sends its reset only after.
#[test]
fn aborts_after_the_fin_are_not_missed_hand_offs() {
    let _one = serial();
    const EACH: usize = 8;
    let ns = Netns::new("abortfin");
    let agent = Agent::start(&ns);
    let server = ns.run(|| Server::bind("127.0.0.1:0"));
    for round in 0..3 * EACH {
        let (c, mut s) = ns.run(|| server.connect());
        match round % 3 {
            0 | 1 => {
                c.shutdown(std::net::Shutdown::Write).unwrap();
                workload::eof(&mut s);
                if round % 3 == 1 {
                    s.write_all(b"unread").unwrap();
                } else {
                    socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while ns.ss("FIN-WAIT-2").is_empty() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                // Let the unread data arrive.
                std::thread::sleep(Duration::from_millis(20));
                drop(c);
            }
            _ => {
                drop(c);
                workload::eof(&mut s);
                let _ = s.write_all(b"after close");
            }
        }
        drop(s);
    }
    let (m, k) = harness::at_rest(&agent, &ns, SETTLE);
    let n = m.explain();
    // Every client left fin_wait2 once: the first two kinds to close, as aborts of the full
    // socket. The third too, unless the ACK of its FIN came before the data: then the data
    // reset an orphaned FIN_WAIT2 timewait socket (to close, not an abort the kernel counts),
    // or, in an emulated VM, the server's FIN came alone and the orphan went to time_wait.
    let aborts = ns.counter("TcpExt", "TCPAbortOnData") + ns.counter("TcpExt", "TCPAbortOnClose");
    assert!(
        (2 * EACH..=3 * EACH).contains(&(aborts as usize)),
        "the kernel counted {aborts} aborts\n{n}"
    );
    let left = m.transitions("fin_wait2", "close") + m.transitions("fin_wait2", "time_wait");
    assert_eq!(left, (3 * EACH) as f64, "every connection made left fin_wait2 once\n{n}");
    assert!(m.transitions("fin_wait2", "close") >= aborts as f64, "every abort\n{n}");
    assert_eq!(k.overflow, 0.0);
    assert_eq!(
        m.get("twmon_timewait_handoff_missed_total", &[]),
        0.0,
        "aborts counted as missed hand-offs\n{n}"
    );
}

/// A port range of 4 and connections the server closes first: clients reconnect from ports
/// whose 4-tuple the server holds in TIME_WAIT, and the kernel lets their SYN reopen it (the
/// timewait socket ends, a new connection takes the 4-tuple). Each is a new timewait socket in
/// the memory of the one just freed, on the same 4-tuple: not a re-arm.
#[test]
fn syn_reopens_time_wait() {
    let _one = serial();
    const N: usize = 20;
    let ns = Netns::new("reopen");
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40003"]);
    let agent = Agent::start(&ns);
    let server = ns.run(|| Server::bind("127.0.0.1:0"));
    for _ in 0..N {
        // One of the range's 4 ports is free.
        Close::ServerFirst.run(ns.run(|| server.connect()));
        // The client's LAST_ACK ends once the server's final ACK arrives.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ns.ss("LAST-ACK").is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let reopened = N as u64 - ns.ss("TIME-WAIT").len() as u64;
    if harness::tw_counted_at_creation() {
        assert_eq!(created(&ns), N as u64, "one timewait socket per connection");
    }
    assert!(
        reopened >= (N - 4) as u64,
        "the kernel reopened only {reopened} of {N}: the test needs port reuse"
    );
    let (m, k) = harness::at_rest(&agent, &ns, SETTLE);
    harness::check("reopened 4-tuples", &m, &k, &Made::default());
    assert_eq!(early_ends(&m), reopened as f64);
    assert_eq!(m.transitions("fin_wait2", "time_wait"), N as f64, "{}", m.explain());
    assert_eq!(m.get("twmon_timewait_rearms_total", &[]), 0.0, "no segment re-armed a timer");
    assert_eq!(m.get("twmon_timewait_ends_total", &[("reason", "killed")]), reopened as f64);
}

/// A timewait entry whose socket is gone without its end seen (whatever the cause) is ended
/// at the next reconcile and counted as missed. Made here from a real one: a SYN reopens a
/// TIME_WAIT 4-tuple (its entry ends as it should), then its entry is put back into the map and
/// counted in the gauge again, as if that end had never been seen.
#[test]
fn timewait_entry_without_socket_is_ended() {
    let _one = serial();
    let ns = Netns::new("ghost");
    let config = Agent::config_file("ghost", common::FAST_RECONCILE);
    let agent = Agent::start_with(&ns, &["--config.file", &config]);
    let server = ns.run(|| Server::bind("127.0.0.1:0"));
    let local: SocketAddr = "127.0.0.1:40123".parse().unwrap();
    // The server closes first: its side goes to TIME_WAIT.
    Close::ServerFirst.run(ns.run(|| server.connect_reusable(Some(local))));
    let m = agent.wait_for(SETTLE, |m| m.sockets("time_wait") == 1.0);
    assert_eq!(m.sockets("time_wait"), 1.0);
    let maps = AgentMaps::open(&agent);
    let entries: Vec<(u64, SockEntry)> = maps.timewait().iter().map(|r| r.unwrap()).collect();
    assert_eq!(entries.len(), 1, "one timewait entry");

    // The same 4-tuple again: the SYN ends the timewait socket.
    let (mut again, mut s2) = ns.run(|| server.connect_reusable(Some(local)));
    let m = agent.wait_for(SETTLE, |m| early_ends(m) == 1.0);
    assert_eq!(m.sockets("time_wait"), 0.0, "{}", m.explain());
    assert!(maps.timewait().iter().next().is_none(), "the entry ended with its socket");

    // Back into the map and the gauge: an entry without a socket.
    // As TIME_WAIT, whatever the copy said (an orphan's silent move to TIME_WAIT may not have
    // reached its entry when it was read).
    let (tw, mut entry) = entries[0];
    entry.state = tcp::TIME_WAIT;
    entry.closer = 0; // counted in the gauge by state only, as a socket seen before its close
    maps.timewait().insert(tw, entry, 0).unwrap();
    maps.add_to_gauge(tcp::TIME_WAIT, 1);
    let missed = |m: &Metrics| m.get("twmon_timewait_end_missed_total", &[]);
    let m = agent.wait_for(SETTLE, |m| missed(m) == 1.0 && m.sockets("time_wait") == 0.0);
    assert_eq!(missed(&m), 1.0, "{}", m.explain());
    assert_eq!(m.sockets("time_wait"), 0.0, "{}", m.explain());
    assert!(maps.timewait().iter().next().is_none(), "the entry without a socket was ended");
    let m = agent.wait_for(SETTLE, |m| {
        m.value("twmon_reconcile_drift", &[("state", "time_wait")]) == Some(0.0)
    });
    assert_eq!(m.get("twmon_reconcile_drift", &[("state", "time_wait")]), 0.0);
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
        let mut gauges: PerCpuArray<MapData, i64> =
            PerCpuArray::try_from(self.find("GAUGES")).unwrap();
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
