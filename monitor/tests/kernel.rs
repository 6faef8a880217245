//! Real kernel, real tracepoints, real TCP: each test makes its own network namespace, runs the
//! real agent watching only it, drives connections and compares the agent's numbers with the
//! exact number of connections it made and with the kernel's own view (`ss`, sockstat).
//!
//! Needs root (the agent loads BPF programs; namespaces and nftables need CAP_NET_ADMIN).
mod common;
#[allow(dead_code)] // Only `Blind` is used here.
mod harness;

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{Agent, Metrics, Netns};
use testkit::workload::{self, Close, NftTable, Pair, Server};

const N: usize = 20;
const SETTLE: Duration = Duration::from_secs(10);

/// `n` established connections inside `ns` (client and server ends), each with a request and
/// its reply.
fn connect(ns: &Netns, n: usize, v6: bool) -> Vec<Pair> {
    let (_server, mut pairs) = workload::pairs(ns, if v6 { "[::1]:0" } else { "127.0.0.1:0" }, n);
    pairs.iter_mut().for_each(workload::exchange);
    pairs
}

fn series(expected: &[(&str, &str, usize)]) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = expected
        .iter()
        .map(|(f, t, n)| {
            (format!("twmon_state_transitions_total{{from=\"{f}\",to=\"{t}\"}}"), *n as f64)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// What `n` complete four-way closes are made of, both sides on this host.
fn full_close(n: usize) -> [(&'static str, &'static str, usize); 6] {
    [
        ("established", "fin_wait1", n),
        ("fin_wait1", "fin_wait2", n),
        ("fin_wait2", "time_wait", n),
        ("established", "close_wait", n),
        ("close_wait", "last_ack", n),
        ("last_ack", "close", n),
    ]
}

/// Waits until the transitions are exactly `expected` (no more, no fewer, nothing else).
fn expect_transitions(agent: &Agent, expected: &[(&str, &str, usize)]) -> Metrics {
    let want = series(expected);
    let m = agent.wait_for(SETTLE, |m| m.all_transitions() == want);
    assert_eq!(m.all_transitions(), want, "transitions differ from the connections made");
    // A scrape reads the gauges before the transitions: one that saw the last transitions may
    // show gauges from just before them (seen once in a software-emulated VM). The programs
    // update a gauge before they count the transition, so the next scrape has both.
    agent.metrics()
}

/// A normal four-way close in which `client_first` decides who closes first.
fn four_way(v6: bool, client_first: bool) {
    let ns = Netns::new(if v6 { "close6" } else { "close" });
    let agent = Agent::start(&ns);
    let pairs = connect(&ns, N, v6);
    let server_port = pairs[0].1.local_addr().unwrap().port();
    let how = if client_first { Close::ClientFirst } else { Close::ServerFirst };
    for pair in pairs {
        how.run(pair);
    }
    let m = expect_transitions(&agent, &full_close(N));
    // Only the active closer holds TIME_WAIT, and the kernel agrees on how many.
    let tw = ns.ss("TIME-WAIT");
    assert_eq!(tw.len(), N, "ss TIME-WAIT: {tw:?}");
    let port = format!(":{server_port}");
    let on_server_port =
        tw.iter().filter(|(l, p)| l.ends_with(&port) || p.ends_with(&port)).count();
    let local_is_server = tw.iter().filter(|(l, _)| l.ends_with(&port)).count();
    assert_eq!(
        on_server_port, N,
        "every TIME_WAIT socket is one of the test's connections: {tw:?}"
    );
    assert_eq!(
        local_is_server,
        if client_first { 0 } else { N },
        "TIME_WAIT on the wrong side: {tw:?}"
    );
    assert_eq!(
        m.sockets("time_wait"),
        N as f64,
        "time_wait gauge vs ss ({}):\n{}",
        tw.len(),
        m.text
    );
    assert_eq!(
        m.sockets("time_wait"),
        ns.sockstat_tw() as f64,
        "time_wait gauge vs /proc/net/sockstat"
    );
    for state in ["fin_wait1", "fin_wait2", "close_wait", "closing", "last_ack"] {
        assert_eq!(m.sockets(state), 0.0, "{state} gauge after every close completed");
    }
    // Every state left was timed.
    for state in ["fin_wait1", "fin_wait2", "close_wait", "last_ack"] {
        assert_eq!(m.duration_count(state), N as f64, "{state} durations observed");
    }
    assert_eq!(m.get("twmon_events_lost_total", &[]), 0.0);
}

/// 1. Active close by the client: TIME_WAIT on the client side.
#[test]
fn active_close_by_client() {
    four_way(false, true);
}

/// 2. Active close by the server: TIME_WAIT on the server side.
#[test]
fn active_close_by_server() {
    four_way(false, false);
}

/// 6. IPv6 variant of 1.
#[test]
fn active_close_by_client_ipv6() {
    four_way(true, true);
}

/// Test 3: abort with RST (SO_LINGER 0): no TIME_WAIT, counted as resets on both sides. The kernel
/// moves an aborting socket to CLOSE before it sends the RST, so the sender's state is `close`.
#[test]
fn abort_with_rst() {
    let ns = Netns::new("rst");
    let agent = Agent::start(&ns);
    let pairs = connect(&ns, N, false);
    for pair in pairs {
        Close::Reset.run(pair);
    }
    expect_transitions(&agent, &[("established", "close", 2 * N)]);
    let m = agent.wait_for(SETTLE, |m| {
        m.get("twmon_resets_total", &[("direction", "received"), ("state", "established")])
            == N as f64
    });
    assert_eq!(
        m.get("twmon_resets_total", &[("direction", "sent"), ("state", "close")]),
        N as f64,
        "{}",
        m.text
    );
    assert_eq!(
        m.get("twmon_resets_total", &[("direction", "received"), ("state", "established")]),
        N as f64
    );
    assert_eq!(m.sockets("time_wait"), 0.0);
    assert_eq!(ns.ss("TIME-WAIT").len(), 0);
    assert_eq!(ns.sockstat_tw(), 0);
    assert_eq!(m.transitions("fin_wait2", "time_wait"), 0.0);
}

/// How far a duration the programs measured may lie beyond the span the test measured around
/// it. The programs read the clock on whichever CPU the state changed on. In a
/// software-emulated VM (`cargo xtask vm`) the guest's clocks were seen apart by 48-58 ms over
/// 3 s holds (twice in a dozen runs), 116 ms once in CI's VM on a loaded machine, and 330 ms
/// over a hold that a starved 5.10 guest stretched to 21.6 s: about 2 % of the span. So 300 ms,
/// and 3 % of the span beyond that.
fn clock_slack(span: Duration) -> f64 {
    0.3 + 0.03 * span.as_secs_f64()
}

/// 4 and 8. CLOSE_WAIT held by a peer that does not close: the gauge stays up, equal to ss;
/// when it closes the gauge drops and the time it was held is observed within tolerance.
#[test]
fn close_wait_held_then_released() {
    const HOLD: f64 = 3.0;
    let ns = Netns::new("closewait");
    let agent = Agent::start(&ns);
    let pairs = connect(&ns, N, false);
    // Each server enters CLOSE_WAIT between `first` and `since` (when it reads the EOF).
    let first = std::time::Instant::now();
    let mut servers: Vec<TcpStream> =
        pairs.into_iter().filter_map(|p| Close::Held.run(p)).collect();
    let since = std::time::Instant::now();
    // The closer reaches FIN_WAIT2 when the peer's (possibly delayed) ACK arrives.
    let m = agent.wait_for(SETTLE, |m| {
        m.sockets("close_wait") == N as f64 && m.sockets("fin_wait2") == N as f64
    });
    eprintln!("gauges settled after {:?}", since.elapsed());
    assert_eq!(m.sockets("close_wait"), N as f64, "close_wait gauge while held");
    assert_eq!(ns.ss("CLOSE-WAIT").len(), N, "ss close-wait while held");
    // The closer is in FIN_WAIT2 (an orphan the kernel keeps as a timewait socket), as ss says.
    assert_eq!(
        m.sockets("fin_wait2"),
        ns.ss("FIN-WAIT-2").len() as f64,
        "fin_wait2 gauge vs ss\n{}\nss:\n{}",
        m.explain(),
        ns.ss_all()
    );
    assert_eq!(m.sockets("fin_wait2"), N as f64);
    std::thread::sleep(Duration::from_secs_f64(HOLD).saturating_sub(since.elapsed()));
    // Still held right before the release.
    let m = agent.metrics();
    assert_eq!(m.sockets("close_wait"), N as f64, "close_wait gauge before release");
    assert_eq!(ns.ss("CLOSE-WAIT").len(), N, "ss close-wait before release");
    let released = std::time::Instant::now();
    servers.clear();
    let done = std::time::Instant::now();
    // What each CLOSE_WAIT lasted, as measured here (the programs' clock is CLOCK_MONOTONIC,
    // as Instant's), give or take `clock_slack`.
    let (shortest, longest) = (
        (released - since).as_secs_f64() - clock_slack(released - since),
        (done - first).as_secs_f64() + clock_slack(done - first),
    );
    let m = expect_transitions(&agent, &full_close(N));
    assert_eq!(m.sockets("close_wait"), 0.0, "close_wait gauge after release");
    assert_eq!(ns.ss("CLOSE-WAIT").len(), 0);
    assert_eq!(m.sockets("time_wait"), N as f64);
    assert_eq!(m.sockets("fin_wait2"), 0.0);
    // Durations: every CLOSE_WAIT lasted what was measured here (at least HOLD seconds).
    let (count, sum) = (m.duration_count("close_wait"), m.duration_sum("close_wait"));
    assert_eq!(count, N as f64);
    let mean = sum / count;
    let held = shortest..=longest;
    assert!(held.contains(&mean), "mean CLOSE_WAIT {mean:.3} s, held {shortest:.3}-{longest:.3} s");
    assert_eq!(m.bucket("close_wait", "2.5"), 0.0, "no CLOSE_WAIT shorter than 2.5 s");
    if longest <= 5.0 {
        assert_eq!(m.bucket("close_wait", "5"), N as f64, "every CLOSE_WAIT within 5 s");
    }
    // The orphaned FIN_WAIT2 lasted as long as the CLOSE_WAIT on the other side, less the time
    // the ACK of the client's FIN took (a delayed ACK: at most 200 ms).
    let fw2 = m.duration_sum("fin_wait2") / m.duration_count("fin_wait2");
    assert!(
        (shortest - 0.2..=longest).contains(&fw2),
        "mean FIN_WAIT2 {fw2:.3} s, held {shortest:.3}-{longest:.3} s"
    );
}

/// A close() after shutdown(): the kernel sets the state the socket is already in once more
/// (FIN_WAIT2 here). That is no transition, and the time in FIN_WAIT2 counts from entering it.
#[test]
fn close_after_shutdown_is_no_transition() {
    const HOLD: Duration = Duration::from_millis(500);
    let ns = Netns::new("shutclose");
    let agent = Agent::start(&ns);
    let pairs = connect(&ns, N, false);
    let mut kept = Vec::new();
    // FIN_WAIT2 is entered after this and left before the end of the test.
    let start = std::time::Instant::now();
    for (c, mut s) in pairs {
        c.shutdown(std::net::Shutdown::Write).unwrap();
        workload::eof(&mut s);
        kept.push((c, s));
    }
    let deadline = std::time::Instant::now() + SETTLE;
    while ns.ss("FIN-WAIT-2").len() < N && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ns.ss("FIN-WAIT-2").len(), N, "every client in FIN_WAIT2 after its shutdown");
    std::thread::sleep(HOLD);
    // Each client's close() sets FIN_WAIT2 again; the server's close() then ends it.
    for (c, s) in kept {
        drop(c);
        drop(s);
    }
    let m = expect_transitions(&agent, &full_close(N));
    let fw2 = m.duration_sum("fin_wait2") / m.duration_count("fin_wait2");
    assert!(
        fw2 >= HOLD.as_secs_f64() - 0.05
            && fw2 <= start.elapsed().as_secs_f64() + clock_slack(start.elapsed()),
        "mean FIN_WAIT2 {fw2:.3} s: counted from the shutdown, held at least {HOLD:?}"
    );
    assert_eq!(m.sockets("time_wait"), N as f64);
    assert_eq!(ns.ss("TIME-WAIT").len(), N);
}

/// Test 5: the final ACK is lost (nftables drops it): the passive closer retransmits its FIN from
/// LAST_ACK, and the active closer's TIME_WAIT timer is re-armed by each retransmission.
#[test]
fn lost_final_ack() {
    let ns = Netns::new("lostack");
    let agent = Agent::start(&ns);
    let mut pairs = connect(&ns, 1, false);
    let (c, s) = pairs.pop().unwrap();
    let cport = c.local_addr().unwrap().port();
    // Count every FIN the server sends (one table), and drop the client's bare ACKs, the final
    // ACK (another table, removed first, so that every FIN after it is counted and ACKed).
    let count = NftTable::new(
        &ns,
        "twmon_count",
        &format!(
            "chain out {{ type filter hook output priority 0; tcp dport {cport} tcp flags & fin \
             == fin counter; }}"
        ),
    );
    let lose = NftTable::new(
        &ns,
        "twmon_drop",
        &format!(
            "chain out {{ type filter hook output priority 0; tcp sport {cport} tcp flags == ack \
             drop; }}"
        ),
    );
    Close::ClientFirst.run((c, s));
    // The server's FIN is retransmitted at about 0.2, 0.6, 1.4 and 3 s. Re-arms that keep the
    // timer in its timer-wheel bucket are silent until the socket ends; the one at 3 s moves the
    // 60 s expiry by more than a bucket (2 s at HZ 250), so the kernel traces it.
    std::thread::sleep(Duration::from_millis(4500));
    drop(lose);
    let fins: u64 = {
        let rules = count.list();
        let line = rules.lines().find(|l| l.contains("counter packets")).expect("counter rule");
        let w: Vec<&str> = line.split_whitespace().collect();
        w[w.iter().position(|x| *x == "packets").unwrap() + 1].parse().unwrap()
    };
    drop(count);
    assert!(fins >= 3, "the server sent {fins} FINs: the final ACK was not lost?");
    let m = agent.wait_for(SETTLE, |m| m.transitions("last_ack", "close") == 1.0);
    assert_eq!(m.transitions("last_ack", "close"), 1.0, "LAST_ACK ends once the ACK gets through");
    let retrans = m.get("twmon_retransmits_total", &[("state", "last_ack")]);
    // Every FIN but the first is a retransmit; one sent after the counter was read (and ACKed)
    // may be counted by the agent only.
    assert!(
        retrans == (fins - 1) as f64 || retrans == fins as f64,
        "FIN retransmits from LAST_ACK: agent {retrans}, nftables saw {fins} FINs"
    );
    let rearms = m.get("twmon_timewait_rearms_total", &[]);
    assert!(
        rearms >= 1.0 && rearms <= retrans,
        "TIME_WAIT re-arms {rearms}, FINs retransmitted {retrans}"
    );
    assert_eq!(m.sockets("time_wait"), 1.0);
    assert_eq!(ns.ss("TIME-WAIT").len(), 1);
}

/// Test 7: TIME_WAIT expiry: timewait sockets end as `expired` after 2MSL (60 s on Linux, +- the
/// timer wheel's slack) and the time_wait histogram records it.
#[test]
fn time_wait_expires_after_2msl() {
    const M: usize = 10;
    let ns = Netns::new("expiry");
    let agent = Agent::start(&ns);
    for (c, s) in connect(&ns, M, false) {
        Close::ClientFirst.run((c, s));
    }
    let m = agent.wait_for(SETTLE, |m| m.sockets("time_wait") == M as f64);
    assert_eq!(m.sockets("time_wait"), M as f64);
    std::thread::sleep(Duration::from_secs(58));
    let m = agent.metrics();
    assert_eq!(
        m.get("twmon_timewait_ends_total", &[("reason", "expired")]),
        0.0,
        "ended before 2MSL"
    );
    let m = agent.wait_for(Duration::from_secs(15), |m| {
        m.get("twmon_timewait_ends_total", &[("reason", "expired")]) == M as f64
    });
    assert_eq!(
        m.get("twmon_timewait_ends_total", &[("reason", "expired")]),
        M as f64,
        "{}",
        m.text
    );
    assert_eq!(m.transitions("time_wait", "close"), M as f64);
    assert_eq!(m.sockets("time_wait"), 0.0);
    assert_eq!(ns.ss("TIME-WAIT").len(), 0);
    assert_eq!(ns.sockstat_tw(), 0);
    assert_eq!(m.duration_count("time_wait"), M as f64);
    assert_eq!(m.bucket("time_wait", "59"), 0.0, "TIME_WAIT shorter than 59 s");
    assert_eq!(m.bucket("time_wait", "66"), M as f64, "TIME_WAIT longer than 66 s");
    assert_eq!(m.get("twmon_timewait_ends_total", &[("reason", "killed")]), 0.0);
}

/// TIME_WAIT ended early by tcp_tw_reuse: a connect() from the same port to the same peer
/// takes over the 4-tuple, and the end is told apart from expiry.
#[test]
fn time_wait_reused_by_connect() {
    let ns = Netns::new("reuse");
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    let agent = Agent::start(&ns);
    let server = ns.run(|| Server::bind("127.0.0.1:0"));
    let first = ns.run(|| server.connect_reusable(None));
    let local = first.0.local_addr().unwrap();
    Close::ClientFirst.run(first);
    let m = agent.wait_for(SETTLE, |m| m.sockets("time_wait") == 1.0);
    assert_eq!(m.sockets("time_wait"), 1.0);
    // tcp_tw_reuse wants the timewait socket's last timestamp to be over a second old.
    std::thread::sleep(Duration::from_millis(1500));
    let second = ns.run(|| server.connect_reusable(Some(local)));
    assert_eq!(second.0.local_addr().unwrap(), local, "the 4-tuple was reused");
    let m = agent
        .wait_for(SETTLE, |m| m.get("twmon_timewait_ends_total", &[("reason", "reuse")]) == 1.0);
    assert_eq!(
        m.get("twmon_timewait_ends_total", &[("reason", "reuse")]),
        1.0,
        "ss: {:?}\n{:?}\n{}",
        ns.ss("TIME-WAIT"),
        m.text
            .lines()
            .filter(|l| l.starts_with("twmon_")
                && !l.contains("bucket")
                && !l.contains("bpf_program"))
            .collect::<Vec<_>>()
            .join("\n"),
        agent.log().lines().filter(|l| !l.contains("DEBUG")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(m.get("twmon_timewait_ends_total", &[("reason", "expired")]), 0.0);
    assert_eq!(m.transitions("time_wait", "close"), 1.0);
    assert_eq!(m.sockets("time_wait"), 0.0);
    assert_eq!(ns.ss("TIME-WAIT").len(), 0);
    drop(second);
}

/// tcp_max_tw_buckets reached: the kernel closes the connections it cannot keep in TIME_WAIT.
/// The agent counts each one, equal to the kernel's own TCPTimeWaitOverflow.
#[test]
fn timewait_overflow_counted() {
    const LIMIT: usize = 5;
    let ns = Netns::new("overflow");
    ns.exec(&["sysctl", "-qw", &format!("net.ipv4.tcp_max_tw_buckets={LIMIT}")]);
    let agent = Agent::start(&ns);
    for (c, s) in connect(&ns, N, false) {
        Close::ClientFirst.run((c, s));
    }
    let overflow = || ns.counter("TcpExt", "TCPTimeWaitOverflow") as f64;
    let want = (N - LIMIT) as f64;
    // Until the last FINs have reached the orphans too: a loaded machine may process them in
    // ksoftirqd after the closes returned, and the sweep then sees them TIME_WAIT.
    let m = agent.wait_for(SETTLE, |m| {
        m.get("twmon_timewait_handoff_missed_total", &[]) == want
            && m.sockets("time_wait") == LIMIT as f64
    });
    assert_eq!(overflow(), want, "the kernel's TCPTimeWaitOverflow");
    assert_eq!(m.get("twmon_timewait_handoff_missed_total", &[]), want, "{}", m.text);
    assert_eq!(m.sockets("time_wait"), LIMIT as f64, "{}\nss:\n{}", m.explain(), ns.ss_all());
    assert_eq!(ns.ss("TIME-WAIT").len(), LIMIT);
    assert_eq!(
        m.transitions("fin_wait2", "time_wait"),
        LIMIT as f64,
        "{}\n{}",
        m.text,
        agent.log()
    );
    assert_eq!(m.transitions("fin_wait2", "close"), want);
}

/// An orphaned FIN_WAIT2 whose peer never sends its FIN ends at tcp_fin_timeout, told apart
/// from one that got its FIN and went on to TIME_WAIT.
#[test]
fn orphaned_fin_wait2_ends_at_fin_timeout() {
    let ns = Netns::new("fintimeout");
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_fin_timeout=3"]);
    let agent = Agent::start(&ns);
    let mut pairs = connect(&ns, 2, false);
    let (c1, s1) = pairs.pop().unwrap();
    let (c2, s2) = pairs.pop().unwrap();
    Close::ClientFirst.run((c1, s1));
    let s2 = Close::Held.run((c2, s2));
    let m = agent.wait_for(Duration::from_secs(15), |m| {
        m.get("twmon_timewait_ends_total", &[("reason", "fin_timeout")]) == 1.0
    });
    assert_eq!(m.get("twmon_timewait_ends_total", &[("reason", "fin_timeout")]), 1.0, "{}", m.text);
    assert_eq!(m.transitions("fin_wait2", "close"), 1.0, "the orphan's end");
    assert_eq!(m.transitions("fin_wait2", "time_wait"), 1.0, "the one that got its FIN");
    assert_eq!(m.get("twmon_timewait_ends_total", &[("reason", "expired")]), 0.0);
    // It lasted tcp_fin_timeout (3 s): between 2.5 and 5 s.
    assert_eq!(m.bucket("fin_wait2", "2.5"), 1.0, "only the FIN_WAIT2 that got its FIN is short");
    assert_eq!(m.bucket("fin_wait2", "5"), 2.0);
    assert_eq!(ns.ss("FIN-WAIT-2").len(), 0);
    drop(s2);
}

/// Full kernel maps are counted, never silent: with room for 1024 entries, 1500 TIME_WAIT and
/// then 1500 CLOSE_WAIT sockets overflow the maps; every entry that did not fit is counted, the
/// kernel programs log it, and the reconcile shows the shortfall against ss exactly.
#[test]
fn full_maps_are_counted() {
    const M: usize = 1500;
    const ROOM: usize = 1024;
    common::raise_nofile();
    let ns = Netns::new("full");
    let config = Agent::config_file("full", common::FAST_RECONCILE);
    let agent = Agent::start_with(
        &ns,
        &["--bpf.max-sockets", "1024", "--bpf.max-timewait", "1024", "--config.file", &config],
    );
    // `state` (as ss names it, `ss_name`) has about M sockets; the map `map` has room for ROOM
    // entries. About: on loopback a connect() may take over a TIME_WAIT 4-tuple older than a
    // second (tcp_tw_reuse 2, the default), which a slow guest reaches; `ss` is the oracle.
    let overflows = |state: &str, ss_name: &str, map: &str| {
        let full = |m: &Metrics| m.get("twmon_map_full_total", &[("map", map)]);
        let drift = |m: &Metrics| m.get("twmon_reconcile_drift", &[("state", state)]);
        let ss = ns.ss(ss_name).len() as f64;
        assert!(ss > (M - 10) as f64 && ss <= M as f64, "ss {ss_name}: {ss} of the {M} made");
        // Each socket alive and not in the map had its insert fail.
        let over = ss - ROOM as f64;
        let m = agent.wait_for(SETTLE, |m| drift(m) == m.sockets(state) - ss && full(m) >= over);
        let gauge = m.sockets(state);
        assert!(full(&m) >= over, "{map} map overflow {} < {over}", full(&m));
        assert!(gauge <= ROOM as f64, "{state} gauge {gauge} beyond the map's room");
        assert_eq!(drift(&m), gauge - ss, "drift shows the {state} sockets not followed");
    };

    for (c, s) in connect(&ns, M, false) {
        Close::ClientFirst.run((c, s));
    }
    overflows("time_wait", "TIME-WAIT", "timewait");

    let held: Vec<TcpStream> = connect(&ns, M, false)
        .into_iter()
        .map(|pair| Close::Held.run(pair).expect("the server's end"))
        .collect();
    overflows("close_wait", "CLOSE-WAIT", "sockets");
    assert!(agent.log().contains("map full"), "the kernel programs' warning reached the log");
    drop(held);
}

/// A full ring buffer loses records and says so: 1000 timewait sockets killed at once (their
/// namespace deleted) through a 4 KiB ring buffer. Every lost record is counted, the kernel-side
/// gauge stays exact, and the early ends received plus the records lost make up the 1000.
#[test]
fn lost_events_are_counted() {
    const M: usize = 1000;
    common::raise_nofile();
    let ns = Netns::new("lost");
    let agent = Agent::start_with(&ns, &["--bpf.ring-buffer-size", "4096"]);
    for (c, s) in connect(&ns, M, false) {
        Close::ClientFirst.run((c, s));
    }
    // Every one in TIME_WAIT, or ended at 2MSL: making them takes over a minute in a loaded VM.
    let expired = |m: &Metrics| m.get("twmon_timewait_ends_total", &[("reason", "expired")]);
    let m = agent.wait_for(SETTLE, |m| m.sockets("time_wait") + expired(m) == M as f64);
    assert_eq!(m.sockets("time_wait") + expired(&m), M as f64, "{}", m.explain());
    assert_eq!(m.sockets("time_wait"), ns.sockstat_tw() as f64, "the kernel's own count");
    assert!(expired(&m) < (M / 2) as f64, "{} of {M} expired before the test", expired(&m));
    assert_eq!(m.get("twmon_events_lost_total", &[]), 0.0);
    // `ip netns del`: the kernel kills every timewait socket of the namespace in one go (any
    // that reaches 2MSL meanwhile ends as an expiry).
    drop(ns);
    let killed = |m: &Metrics| m.get("twmon_timewait_ends_total", &[("reason", "killed")]);
    let lost = |m: &Metrics| m.get("twmon_events_lost_total", &[]);
    let ended = |m: &Metrics| killed(m) + lost(m) + expired(m);
    let m = agent.wait_for(SETTLE, |m| m.sockets("time_wait") == 0.0 && ended(m) == M as f64);
    eprintln!("killed {}, records lost {}, expired {}", killed(&m), lost(&m), expired(&m));
    assert!(lost(&m) > 0.0, "a 4 KiB ring buffer took {M} records at once");
    assert_eq!(
        ended(&m),
        M as f64,
        "killed {} + lost {} + expired {}",
        killed(&m),
        lost(&m),
        expired(&m)
    );
    assert_eq!(
        m.sockets("time_wait"),
        0.0,
        "the gauge is counted in the kernel, lost records or not"
    );
    assert_eq!(agent.get("/healthz").unwrap().0, 200);
    let log = agent.wait_log(SETTLE, "raise --bpf.ring-buffer-size");
    assert!(log.contains("kernel records lost"), "the loss was not logged:\n{log}");
}

/// Who closes first: each close is counted for the process whose close() made it, by name and
/// role, and so is the TIME_WAIT its side then holds. Clients are bash under names of their own
/// (a process's name is its executable's), the servers this test process, closing on one of its
/// threads: a process is named after its main thread, not the thread that closed.
#[test]
fn closes_are_counted_by_process() {
    const FIRST: usize = 17; // the clients close first
    const SECOND: usize = 11; // the server closes first
    let ns = Netns::new("closers");
    // Every client's TIME_WAIT stays: no connect() may take over one older than a second, as
    // loopback allows by default (tcp_tw_reuse 2) and a slow run reaches.
    ns.sysctls(&[("net/ipv4/tcp_tw_reuse", "0")]);
    let agent = Agent::start(&ns);
    let dir = std::env::temp_dir().join(format!("twmon-closers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let named = |name: &str| {
        let p = dir.join(name);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink("/bin/bash", &p).unwrap();
        p.to_string_lossy().into_owned()
    };
    let (first, second) = (named("client-first"), named("client-second"));
    let serve = |n: usize, close_first: bool| {
        let l = ns.run(|| TcpListener::bind("127.0.0.1:0").expect("listen"));
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for _ in 0..n {
                let (mut s, _) = l.accept().expect("accept");
                if close_first {
                    drop(s);
                } else {
                    let _ = s.read_to_end(&mut Vec::new());
                }
            }
        });
        (port, server)
    };

    let began = Instant::now();
    let (port, server) = serve(FIRST, false);
    let mut listened = vec![port];
    let script =
        format!("for i in $(seq {FIRST}); do exec 3<>/dev/tcp/127.0.0.1/{port}; exec 3>&-; done");
    ns.exec(&[&first, "-c", &script]);
    server.join().unwrap();
    let (port, server) = serve(SECOND, true);
    listened.push(port);
    let script = format!(
        "for i in $(seq {SECOND}); do exec 3<>/dev/tcp/127.0.0.1/{port}; while read -u 3 x; do :; \
         done; exec 3>&-; done"
    );
    ns.exec(&[&second, "-c", &script]);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    // This test process, as the kernel names it: its executable's name, cut to 15 bytes.
    let exe = std::env::current_exe().unwrap();
    let me: String = exe.file_name().unwrap().to_string_lossy().chars().take(15).collect();
    let netns = format!("netns/{}", ns.name);
    let closes = |m: &Metrics, comm: &str, role: &str| {
        m.get("twmon_closes_total", &[("netns", &netns), ("comm", comm), ("role", role)])
    };
    // The servers' side, whoever closed it last. A process that this one starts meanwhile (the
    // tests beside it run `ip`, `ss`, `nft`) holds a copy of every socket from its fork to its
    // exec, which closes them: when that copy is the last, the close is its own, under its new
    // name, and so the kernel counts it (seen on 6.1: one close by `ip`).
    let servers = |m: &Metrics, role: &str| -> f64 {
        m.series("twmon_closes_total")
            .iter()
            .filter(|(l, _)| {
                l.contains(&format!("netns=\"{netns}\"")) && l.contains(&format!("role=\"{role}\""))
            })
            .filter(|(l, _)| !l.contains("comm=\"client-"))
            .map(|(_, v)| v)
            .sum()
    };
    let exact = [
        ("client-first", "active", FIRST),
        ("client-first", "passive", 0),
        ("client-second", "passive", SECOND),
        ("client-second", "active", 0),
    ];
    let done = |m: &Metrics| {
        exact.iter().all(|(c, r, n)| closes(m, c, r) == *n as f64)
            && servers(m, "passive") == FIRST as f64
            && servers(m, "active") == SECOND as f64
    };
    let m = agent.wait_for(SETTLE, done);
    for (comm, role, n) in exact {
        assert_eq!(closes(&m, comm, role), n as f64, "{comm} {role}\n{}", m.explain());
    }
    assert_eq!(servers(&m, "passive"), FIRST as f64, "servers' passive closes\n{}", m.explain());
    assert_eq!(servers(&m, "active"), SECOND as f64, "servers' active closes\n{}", m.explain());
    for role in ["active", "passive"] {
        assert!(
            closes(&m, &me, role) > 0.0,
            "{me} {role}: not named after its main thread?\n{}",
            m.explain()
        );
    }

    // TIME_WAIT by who closed first, against `ss` at rest (each side's ports tell whose it is):
    // the clients that closed first hold theirs, the one that closed second holds none, and the
    // servers hold those of the connections they closed first. `ss` is read before and after
    // each scrape, until both agree and twmon equals them (the last FIN may still be on its way
    // in a slow VM). Each side held some: the comparison is never of zeros.
    let held = |m: &Metrics| -> Vec<(String, f64)> {
        let here = format!("netns=\"{netns}\"");
        m.series("twmon_timewait_sockets").into_iter().filter(|(l, _)| l.contains(&here)).collect()
    };
    let of = |m: &Metrics, comm: &str| {
        m.value("twmon_timewait_sockets", &[("netns", &netns), ("comm", comm)])
    };
    let servers_held = |m: &Metrics| -> f64 {
        held(m).iter().filter(|(l, _)| !l.contains("comm=\"client-")).map(|(_, v)| v).sum()
    };
    // (clients', servers') TIME_WAIT sockets as `ss` shows them.
    let sides = || {
        let tw = ns.ss("TIME-WAIT");
        let servers = tw
            .iter()
            .filter(|(local, _)| listened.iter().any(|p| local.ends_with(&format!(":{p}"))))
            .count();
        (tw.len() - servers, servers)
    };
    let deadline = Instant::now() + SETTLE;
    let (m, seen) = loop {
        let before = sides();
        let m = agent.metrics();
        let after = sides();
        let equal =
            of(&m, "client-first") == Some(after.0 as f64) && servers_held(&m) == after.1 as f64;
        let all = after == (FIRST, SECOND);
        if (before == after && equal && all) || Instant::now() > deadline {
            break (m, after);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let why =
        format!("ss (clients, servers) {seen:?}, after {:?}: {:?}", began.elapsed(), held(&m));
    assert_eq!(of(&m, "client-first"), Some(seen.0 as f64), "{why}");
    assert_eq!(servers_held(&m), seen.1 as f64, "{why}");
    assert!(seen.0 > 0 && seen.1 > 0, "{why}\nss:\n{}", ns.ss_all());
    assert_eq!(of(&m, "client-second"), None, "it closed none first: no series\n{why}");
    // Every connection's TIME_WAIT is still there, unless a run slow enough for some to end
    // (seen twice among many runs of the whole suite: fewer clients' ones, each counted out by
    // twmon too, as the comparison above shows).
    if seen != (FIRST, SECOND) {
        eprintln!("closes_are_counted_by_process: not every TIME_WAIT was still there: {why}");
    }
}

/// `twmon trace` prints every change of known connections, both sides, TIME_WAIT and its end
/// included, in order per connection, and nothing else: closes by either side, and an orphan
/// whose peer held CLOSE_WAIT past tcp_fin_timeout. Deleting the namespace ends the TIME_WAIT
/// sockets left (killed), as the agent decides.
#[test]
fn trace_shows_each_connection_in_order() {
    use std::time::Instant;
    use twmon::export::trace::TraceLine;
    const ATTEMPTS: usize = 3;
    const ACTIVE: &[&str] =
        &["established>fin_wait1", "fin_wait1>fin_wait2", "fin_wait2>time_wait", "time_wait>close"];
    const PASSIVE: &[&str] = &["established>close_wait", "close_wait>last_ack", "last_ack>close"];
    const ORPHAN: &[&str] = &["established>fin_wait1", "fin_wait1>fin_wait2", "fin_wait2>close"];
    for attempt in 1..=ATTEMPTS {
        let blind = harness::Blind::watch();
        let ns = Netns::new("trace");
        ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_fin_timeout=1"]);
        let agent = Agent::start(&ns);
        let trace = TraceCli::start(&agent, &[]);

        // (local, remote) of each side, with the changes it must show.
        let expected: Vec<((SocketAddr, SocketAddr), &'static [&'static str])> = ns.run(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut expected: Vec<((SocketAddr, SocketAddr), &'static [&'static str])> = Vec::new();
            let ends = |t: &TcpStream| (t.local_addr().unwrap(), t.peer_addr().unwrap());
            for i in 0..7 {
                let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (mut s, _) = l.accept().unwrap();
                let (tc, ts) = (ends(&c), ends(&s));
                match i % 3 {
                    0 => {
                        drop(c);
                        let _ = s.read_to_end(&mut Vec::new());
                        expected.extend([(tc, ACTIVE), (ts, PASSIVE)]);
                    }
                    1 => {
                        drop(s);
                        let _ = c.read_to_end(&mut Vec::new());
                        expected.extend([(ts, ACTIVE), (tc, PASSIVE)]);
                    }
                    _ => {
                        // Held in CLOSE_WAIT until the orphan's tcp_fin_timeout (1 s) has run out.
                        drop(c);
                        let _ = s.read_to_end(&mut Vec::new());
                        std::thread::sleep(Duration::from_millis(2500));
                        expected.extend([(tc, ORPHAN), (ts, PASSIVE)]);
                    }
                }
            }
            expected
        });
        // The TIME_WAIT sockets left end with their namespace.
        drop(ns);
        let changes = |lines: &[TraceLine], t: (SocketAddr, SocketAddr)| -> Vec<String> {
            lines
                .iter()
                .filter(|l| (l.local, l.remote) == t)
                .map(|l| format!("{}>{}", l.from, l.to))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let got = trace.lines();
            if expected.iter().all(|(t, want)| changes(&got, *t).len() >= want.len()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // SIGINT stops it, with 0.
        let (status, got) = trace.stop();
        let hidden = blind.as_ref().map_or(0, harness::Blind::hidden);
        let complete = expected.iter().all(|(t, want)| changes(&got, *t) == *want);
        if !complete && hidden > 0 && attempt < ATTEMPTS {
            eprintln!(
                "{hidden} events on PID 1's threads, hidden from BPF (harness::Blind); again"
            );
            continue;
        }
        assert!(status.success(), "twmon trace exited with {status} on SIGINT");
        for (t, want) in &expected {
            assert_eq!(
                changes(&got, *t),
                *want,
                "{} -> {}: its trace (all lines: {got:#?})",
                t.0,
                t.1
            );
        }
        let ours = |l: &&TraceLine| expected.iter().any(|(t, _)| *t == (l.local, l.remote));
        let others: Vec<&TraceLine> = got.iter().filter(|l| !ours(l)).collect();
        assert!(others.is_empty(), "lines of other connections: {others:#?}");
        // The process is named where its close() made the change; the end says how.
        for l in &got {
            let closing =
                (l.from == "established" && l.to == "fin_wait1") || l.from == "close_wait";
            assert_eq!(l.comm.is_some(), closing, "{l:?}");
            assert_eq!(l.pid.is_some(), closing, "{l:?}");
            let reason = match (l.from.as_str(), l.to.as_str()) {
                ("time_wait", "close") => Some("killed"),
                ("fin_wait2", "close") => Some("fin_timeout"),
                _ => None,
            };
            assert_eq!(l.reason.as_deref(), reason, "{l:?}");
            assert!(l.seconds.is_some() || l.from == "established", "no time in the state: {l:?}");
        }
        // Each orphan waited out tcp_fin_timeout (1 s) in FIN_WAIT2, and only the orphans ended
        // there.
        let orphans = expected.iter().filter(|(_, want)| *want == ORPHAN).count();
        let timed_out = got.iter().filter(|l| l.from == "fin_wait2" && l.to == "close");
        assert_eq!(timed_out.clone().count(), orphans, "{got:#?}");
        // At least tcp_fin_timeout, and not much more: timer slack, not another state's time.
        assert!(
            timed_out.clone().all(|l| l.seconds.is_some_and(|s| (1.0..3.0).contains(&s))),
            "{got:#?}"
        );
        let m = agent.metrics();
        assert_eq!(m.get("twmon_trace_clients", &[]), 0.0, "the client left");
        assert_eq!(m.get("twmon_trace_records_lost_total", &[]), 0.0);
        return;
    }
}

/// `twmon trace --json` against an agent, its lines collected as they come.
struct TraceCli {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<twmon::export::trace::TraceLine>>>,
    reader: std::thread::JoinHandle<()>,
    /// Kept open: the client writes to it until it exits.
    _stderr: std::io::BufReader<std::process::ChildStderr>,
}

impl TraceCli {
    /// Started, and streaming once this returns.
    fn start(agent: &Agent, args: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_twmon"))
            .args(["trace", "--json", "--agent", &format!("http://{}", agent.addr)])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start twmon trace");
        let mut said = String::new();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        stderr.read_line(&mut said).unwrap();
        assert!(said.contains("streaming from"), "twmon trace: {said}");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = {
            let (lines, stdout) = (lines.clone(), child.stdout.take().unwrap());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let l = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                    lines.lock().unwrap().push(l);
                }
            })
        };
        Self { child, lines, reader, _stderr: stderr }
    }

    fn lines(&self) -> Vec<twmon::export::trace::TraceLine> {
        self.lines.lock().unwrap().clone()
    }

    /// Stopped with SIGINT: its exit status and every line it printed.
    fn stop(mut self) -> (std::process::ExitStatus, Vec<twmon::export::trace::TraceLine>) {
        // SAFETY: kill with a child's pid, which it still is (not waited for yet).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        self.reader.join().unwrap();
        let lines = self.lines.lock().unwrap().clone();
        (status, lines)
    }
}

/// `n` connections to `l` inside `ns`, each closed by its client first and then by the server:
/// six traced changes each (three on either side; the TIME_WAIT sockets end later).
fn close_client_first(ns: &Netns, server: &Server, n: usize) {
    ns.run(|| {
        for _ in 0..n {
            Close::ClientFirst.run(server.connect());
        }
    });
}

/// While every client traces one port, the kernel programs write records of that port's
/// connections only, so other traffic costs no record (`twmon_trace_records_total` stays); a
/// client without that filter switches the kernel's filter off, and it is back once it leaves.
#[test]
fn trace_is_filtered_in_the_kernel() {
    use std::time::Instant;
    const ATTEMPTS: usize = 3;
    const PER_CONNECTION: usize = 6;
    let records = |agent: &Agent| -> f64 {
        let m = agent.metrics();
        m.value("twmon_trace_records_total", &[])
            .unwrap_or_else(|| panic!("no twmon_trace_records_total:\n{}", m.explain()))
    };
    let wait_lines = |t: &TraceCli, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.lines().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        t.lines().len()
    };
    for attempt in 1..=ATTEMPTS {
        let blind = harness::Blind::watch();
        let ns = Netns::new("tracef");
        let agent = Agent::start(&ns);
        let (traced, other) = ns.run(|| (Server::bind("127.0.0.1:0"), Server::bind("127.0.0.1:0")));
        let port = traced.addr().port().to_string();
        let filtered = TraceCli::start(&agent, &["--port", &port]);

        // Only the traced port's connections are written.
        let r0 = records(&agent);
        close_client_first(&ns, &other, 10);
        std::thread::sleep(Duration::from_millis(500));
        let r1 = records(&agent);
        close_client_first(&ns, &traced, 3);
        let seen = wait_lines(&filtered, 3 * PER_CONNECTION);
        let r2 = records(&agent);

        // A client that wants everything: every connection is written while it streams.
        let all = TraceCli::start(&agent, &[]);
        close_client_first(&ns, &other, 4);
        let seen_all = wait_lines(&all, 4 * PER_CONNECTION);
        let r3 = records(&agent);
        let (status, _) = all.stop();
        agent.wait_for(Duration::from_secs(5), |m| m.get("twmon_trace_clients", &[]) == 1.0);

        // Back to the one port.
        close_client_first(&ns, &other, 10);
        std::thread::sleep(Duration::from_millis(500));
        let r4 = records(&agent);
        let (_, lines) = filtered.stop();

        let got = [r1 - r0, r2 - r1, r3 - r2, r4 - r3];
        let want = [0.0, (3 * PER_CONNECTION) as f64, (4 * PER_CONNECTION) as f64, 0.0];
        let hidden = blind.as_ref().map_or(0, harness::Blind::hidden);
        if got != want && hidden > 0 && attempt < ATTEMPTS {
            eprintln!(
                "{hidden} events on PID 1's threads, hidden from BPF (harness::Blind); again"
            );
            continue;
        }
        assert!(status.success(), "twmon trace exited with {status} on SIGINT");
        assert_eq!(
            got, want,
            "records written: other port, traced port, both clients, other port again"
        );
        assert_eq!((seen, seen_all), (3 * PER_CONNECTION, 4 * PER_CONNECTION));
        assert_eq!(
            lines.len(),
            3 * PER_CONNECTION,
            "the filtered client saw its port only: {lines:#?}"
        );
        assert!(
            lines
                .iter()
                .all(|l| l.local.port().to_string() == port || l.remote.port().to_string() == port)
        );
        return;
    }
}
