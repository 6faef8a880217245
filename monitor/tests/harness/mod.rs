//! The randomized differential harness: seeded cases of real TCP teardown in a namespace the
//! agent watches, checked at rest against the kernel's own counters and tables (never against
//! twmon's logic). `cases` runs a fixed set of seeds in `cargo xtask test`; `cargo xtask soak`
//! runs them one after another in one namespace for as long as asked.
use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use testkit::workload::{Close, NftTable, Server};

use crate::common::{self, Agent, Metrics, Netns};

/// splitmix64: small, seedable, and the same sequence on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// A case's settings, drawn from its seed.
#[derive(Debug)]
struct Plan {
    threads: usize,
    per_thread: usize,
    ipv6_percent: u64,
    tw_reuse: u8,
    /// tcp_max_tw_buckets: small ones overflow.
    max_tw: u32,
    /// A short tcp_fin_timeout, with held connections outliving it: their orphaned FIN_WAIT2
    /// peers end at the timeout without a FIN.
    short_fin_timeout: bool,
    /// A port range of 4: clients reuse ports (and 4-tuples) at once.
    narrow_ports: bool,
    /// nftables drops one bare ACK of the servers' in three: final ACKs among them, so the
    /// client retransmits its FIN from LAST_ACK and the server's timewait socket answers it.
    lose_acks: bool,
    closes: Vec<Close>,
}

impl Plan {
    fn draw(rng: &mut Rng) -> Self {
        let mut closes = Vec::new();
        for c in Close::ALL {
            // Each kind in about two cases of three, at least one kind.
            if rng.chance(66) {
                closes.push(c);
            }
        }
        if closes.is_empty() {
            closes.push(rng.pick(&Close::ALL));
        }
        let narrow_ports = rng.chance(25);
        Self {
            threads: 1 + rng.below(4) as usize,
            per_thread: if narrow_ports { 8 } else { 10 + rng.below(60) as usize },
            ipv6_percent: rng.pick(&[0, 30, 100]),
            tw_reuse: rng.below(3) as u8,
            max_tw: if rng.chance(20) { 5 + rng.below(40) as u32 } else { 262_144 },
            short_fin_timeout: rng.chance(25),
            narrow_ports,
            lose_acks: rng.chance(20),
            closes,
        }
    }
}

/// What a case did, by the harness's own count: connections made (and how many failed to
/// connect), and orphaned FIN_WAIT2 sockets that never got their FIN.
#[derive(Debug, Default, Clone)]
pub struct Made {
    pub connections: u64,
    /// Closes where both sides shut down at once (see [`check`]'s re-arms).
    pub simultaneous: u64,
    pub connect_failures: u64,
    /// Connects that timed out: sockets the harness closed in SYN_SENT (a SYN reopening a
    /// 4-tuple the server holds in TIME_WAIT, answered by an ACK that nftables dropped). The
    /// kernel counts them in `ActiveOpens` but not in `AttemptFails`, which only `tcp_done`
    /// counts; such a socket never reached ESTABLISHED.
    pub abandoned: u64,
    pub never_fin: u64,
    /// Set when the workload is not the harness's own (a real server and load generator):
    /// then the orphans without a FIN are not known from the connections made, and are taken
    /// from twmon's `fin_wait2 -> close` less its missed hand-offs, plus those `ss` still shows
    /// in FIN-WAIT-2, which holds when every FIN_WAIT2 socket is an orphan (a server that closed
    /// first).
    pub orphans_unknown: bool,
}

impl std::ops::AddAssign for Made {
    fn add_assign(&mut self, o: Self) {
        self.connections += o.connections;
        self.simultaneous += o.simultaneous;
        self.connect_failures += o.connect_failures;
        self.abandoned += o.abandoned;
        self.never_fin += o.never_fin;
        self.orphans_unknown |= o.orphans_unknown;
    }
}

/// One case in `ns` (the namespace `agent` watches): draws a plan from `seed`, runs it, waits
/// for rest. Returns what it made; the caller checks [`check`] with the running totals.
pub fn run_case(ns: &Netns, seed: u64) -> Made {
    let mut rng = Rng::new(seed);
    let plan = Plan::draw(&mut rng);
    eprintln!("case {seed:#x}: {plan:?}");
    let fin_timeout = if plan.short_fin_timeout { 2 } else { 60 };
    let range = if plan.narrow_ports { "40000 40003" } else { "32768 60999" };
    for (k, v) in [
        ("net.ipv4.tcp_tw_reuse", plan.tw_reuse.to_string()),
        ("net.ipv4.tcp_max_tw_buckets", plan.max_tw.to_string()),
        ("net.ipv4.tcp_fin_timeout", fin_timeout.to_string()),
        ("net.ipv4.ip_local_port_range", range.to_string()),
    ] {
        ns.exec(&["sysctl", "-qw", &format!("{k}={v}")]);
    }
    // The servers' bare ACKs only (a client's would be the handshake's last too): the final ACK
    // of a close the server began, and its ACK of a client's FIN.
    let loss = plan.lose_acks.then(|| {
        NftTable::new(
            ns,
            "twmon_loss",
            &format!(
                "chain out {{ type filter hook output priority 0; tcp sport {SERVER_PORTS} tcp \
                 flags == ack numgen random mod 3 == 0 drop; }}"
            ),
        )
    });
    let mut made = Made::default();
    let mut held = Vec::new();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..plan.threads)
            .map(|t| {
                let seed = rng.next();
                let (per, v6, closes) = (plan.per_thread, plan.ipv6_percent, &plan.closes);
                scope.spawn(move || {
                    ns.enter().expect("entering the case's namespace");
                    worker(t as u16, seed, per, v6, closes)
                })
            })
            .collect();
        for w in workers {
            let (m, h) = w.join().expect("a worker thread panicked");
            made += m;
            held.extend(h);
        }
    });
    // Held CLOSE_WAITs: released before their peers' fin_timeout, or after it (those peers then
    // end without their FIN, and the late FIN is answered with a reset).
    let outlive = plan.short_fin_timeout && !held.is_empty();
    if outlive {
        // The held connections' orphaned peers as the kernel keeps them: timewait sockets in
        // FIN_WAIT2 (fewer than the held connections when tcp_max_tw_buckets was reached).
        // Watched until they have all timed out: where ACKs are lost, some reach FIN_WAIT2
        // (and time out) seconds after others, after FINs sent again from FIN_WAIT1.
        // One seen in FIN_WAIT2 and then in TIME_WAIT got its FIN after all (a worker's last
        // server-first close, whose client's FIN was still on its way).
        // Timewait sockets only: an orphan whose FIN's ACK came while close() still held it
        // stays a full socket in FIN_WAIT2 (`ss` shows both alike, but for the timer), and
        // ends with a reset at its keepalive timer, without ever becoming a timewait socket.
        let mut orphans = std::collections::HashSet::new();
        let start = Instant::now();
        loop {
            let dump = ns.exec(&["ss", "-tanoH"]);
            let timewait: String = dump
                .lines()
                .filter(|l| l.contains("timer:(timewait"))
                .collect::<Vec<_>>()
                .join("\n");
            let now = common::ss_in(&timewait, "FIN-WAIT-2");
            let closing = ns.ss("FIN-WAIT-1").len();
            for pair in ns.ss("TIME-WAIT") {
                orphans.remove(&pair);
            }
            let done = now.is_empty()
                && closing == 0
                && start.elapsed() > Duration::from_secs(fin_timeout);
            orphans.extend(now);
            if done || start.elapsed() > Duration::from_secs(30) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        made.never_fin += orphans.len() as u64;
    } else {
        std::thread::sleep(Duration::from_millis(rng.below(300)));
    }
    drop(held);
    if let Some(loss) = loss {
        // Long enough for FINs retransmitted from LAST_ACK (0.2, 0.6, 1.4 s) to meet the loss.
        std::thread::sleep(Duration::from_millis(1500));
        drop(loss);
    }
    wait_quiet(ns);
    made
}

/// The ports the workers' listeners take: 20000 + 2 x worker (IPv4), + 1 (IPv6), 4 workers.
const SERVER_PORTS: &str = "20000-20007";

/// One thread's connections (made in the namespace it entered): `n` of them to its own two
/// listeners (IPv4 and IPv6), each ended by one of `closes`. Returns what it made and the server
/// ends it holds in CLOSE_WAIT.
fn worker(
    index: u16,
    seed: u64,
    n: usize,
    v6_percent: u64,
    closes: &[Close],
) -> (Made, Vec<TcpStream>) {
    let mut rng = Rng::new(seed);
    // Fixed ports below the ephemeral range: port 0 would take one of a narrow range's few.
    let l4 = Server::bind(("127.0.0.1", 20_000 + 2 * index));
    let l6 = Server::bind(("::1", 20_001 + 2 * index));
    let mut made = Made::default();
    let mut held = Vec::new();
    for _ in 0..n {
        let l = if rng.chance(v6_percent) { &l6 } else { &l4 };
        let pair = match l.try_connect(Duration::from_secs(2)) {
            Ok(pair) => pair,
            Err(e) => {
                // A narrow port range with every port in TIME_WAIT (no SYN sent), or a SYN left
                // unanswered (closed in SYN_SENT): no connection made.
                made.connect_failures += 1;
                made.abandoned += u64::from(e.kind() == std::io::ErrorKind::TimedOut);
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        made.connections += 1;
        let close = rng.pick(closes);
        made.simultaneous += u64::from(close == Close::Simultaneous);
        held.extend(close.run(pair));
    }
    (made, held)
}

/// Until no socket is in a state that moves on its own within seconds: FIN_WAIT1, CLOSING,
/// LAST_ACK, CLOSE_WAIT (none is held any more).
fn wait_quiet(ns: &Netns) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let busy: usize = ["FIN-WAIT-1", "CLOSING", "LAST-ACK", "CLOSE-WAIT"]
            .iter()
            .map(|s| ns.ss(s).len())
            .sum();
        if busy == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sockets still closing after 30 s:\n{}",
            ns.exec(&["ss", "-tanH"])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sum of a metric's series whose labels include `label`.
pub fn sum_with(m: &Metrics, name: &str, label: &str) -> f64 {
    m.series(name).iter().filter(|(l, _)| l.split(',').any(|p| p == label)).map(|(_, v)| v).sum()
}

pub fn into_state(m: &Metrics, state: &str) -> f64 {
    sum_with(m, "twmon_state_transitions_total", &format!("to=\"{state}\""))
}

pub fn out_of_state(m: &Metrics, state: &str) -> f64 {
    sum_with(m, "twmon_state_transitions_total", &format!("from=\"{state}\""))
}

pub fn ends(m: &Metrics, reason: &str) -> f64 {
    m.get("twmon_timewait_ends_total", &[("reason", reason)])
}

/// Whether this kernel counts TcpExt `TW`/`TWKilled` when a timewait socket is created (since
/// early 2022) rather than when its timer runs out (5.10): found once, from one socket.
pub fn tw_counted_at_creation() -> bool {
    static AT_CREATION: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AT_CREATION.get_or_init(|| {
        let ns = Netns::new("twprobe");
        ns.run(|| Close::ClientFirst.run(Server::bind("127.0.0.1:0").connect()));
        std::thread::sleep(Duration::from_millis(100));
        ns.counter("TcpExt", "TW") == 1
    })
}

/// The kernel's view of a namespace at one moment: its counters and its sockets per state.
#[derive(Debug)]
pub struct Kernel {
    /// TcpExt `TW` + `TWKilled`: timewait sockets created, or on older kernels those whose
    /// timer ran out (see [`tw_counted_at_creation`]).
    pub created: f64,
    pub overflow: f64,
    pub recycled: f64,
    pub established_left: f64,
    /// Tcp `RetransSegs`: segments sent again, each FIN from LAST_ACK among them.
    pub retransmitted: f64,
    pub states: Vec<(&'static str, f64)>,
}

const SS_STATES: [(&str, &str); 6] = [
    ("fin_wait1", "FIN-WAIT-1"),
    ("fin_wait2", "FIN-WAIT-2"),
    ("close_wait", "CLOSE-WAIT"),
    ("closing", "CLOSING"),
    ("last_ack", "LAST-ACK"),
    ("time_wait", "TIME-WAIT"),
];

impl Kernel {
    /// One read of the counters and one of `ss`: a process each, which is slow to start in an
    /// emulated VM.
    pub fn read(ns: &Netns) -> Self {
        let (counters, ss) = (ns.counters(), ns.ss_all());
        let c = |g: &str, k: &str| common::counter_in(&counters, g, k) as f64;
        Self {
            // Timewait sockets created: over 4 s of timer (TW) or at most (TWKilled).
            created: c("TcpExt", "TW") + c("TcpExt", "TWKilled"),
            overflow: c("TcpExt", "TCPTimeWaitOverflow"),
            recycled: c("TcpExt", "TWRecycled"),
            // Every connection that reached ESTABLISHED, both sides, once each.
            established_left: c("Tcp", "ActiveOpens") + c("Tcp", "PassiveOpens")
                - c("Tcp", "AttemptFails")
                - c("Tcp", "CurrEstab"),
            retransmitted: c("Tcp", "RetransSegs"),
            states: SS_STATES
                .iter()
                .map(|(name, state)| (*name, common::ss_in(&ss, state).len() as f64))
                .collect(),
        }
    }

    fn sockets(&self, state: &str) -> f64 {
        // Every state of SS_STATES is read; any other is a mistake in the harness.
        self.states
            .iter()
            .find(|(s, _)| *s == state)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| panic!("{state} not read from ss"))
    }
}

/// Scrapes until twmon's gauges equal `ss` and the kernel's counters have stood still from the
/// previous round (200 ms earlier, longer than the agent waits for a re-arm before it counts a
/// cancelled timer as an end) to after the scrape; returns both. Fails when that never happens
/// within `timeout`.
pub fn at_rest(agent: &Agent, ns: &Netns, timeout: Duration) -> (Metrics, Kernel) {
    let deadline = Instant::now() + timeout;
    let mut previous: Option<Kernel> = None;
    loop {
        let before = Kernel::read(ns);
        let m = agent.metrics();
        let after = Kernel::read(ns);
        let same = |a: &Kernel, b: &Kernel| a.created == b.created && a.states == b.states;
        let still = same(&before, &after) && previous.as_ref().is_some_and(|p| same(p, &before));
        let equal = SS_STATES.iter().all(|(s, _)| m.sockets(s) == after.sockets(s));
        if still && equal {
            return (m, after);
        }
        assert!(
            Instant::now() < deadline,
            "twmon's gauges never equalled ss at rest: kernel {after:?}, sockstat tw {}\n{}\nss:\n{}\n\
             /proc/net/tcp and tcp6 (the kernel's other view):\n{}{}\nthe agent's log, last lines:\n{}",
            ns.sockstat_tw(),
            m.explain(),
            ns.exec(&["ss", "-tanH"]),
            ns.exec(&["cat", "/proc/net/tcp"]),
            ns.exec(&["cat", "/proc/net/tcp6"]),
            agent
                .log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n"),
        );
        previous = Some(after);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The invariants at a rest point, over everything since the agent started in a fresh
/// namespace (`made` is the harness's own total).
pub fn check(ctx: &str, m: &Metrics, k: &Kernel, made: &Made) {
    let n = m.explain();
    // Events the kernel skipped (a program's tracepoint hit again on its CPU from an interrupt,
    // outside the window its twin covers): counted, and every number below is off by them.
    let skipped: f64 = m.series("twmon_bpf_program_missed_total").iter().map(|(_, v)| v).sum();
    assert_eq!(
        skipped, 0.0,
        "{ctx}: events the kernel skipped (twmon_bpf_program_missed_total)\n{n}"
    );
    let remaining = k.sockets("time_wait") + k.sockets("fin_wait2");
    let ended = ends(m, "reuse") + ends(m, "killed") + ends(m, "expired") + ends(m, "fin_timeout");
    // Timewait sockets that never got their FIN (orphans in FIN_WAIT2): known exactly to the
    // harness, or, with a real server and client, only bounded by twmon's fin_wait2 -> close,
    // which also counts full sockets aborted in FIN_WAIT2 (SO_LINGER 0, data after close).
    let (fewest, most) = if made.orphans_unknown {
        let most = m.transitions("fin_wait2", "close")
            - m.get("twmon_timewait_handoff_missed_total", &[])
            + k.sockets("fin_wait2");
        (0.0, most)
    } else {
        (made.never_fin as f64, made.never_fin as f64)
    };
    let (without_fin, against) = if tw_counted_at_creation() {
        assert_eq!(
            ended,
            k.created - remaining,
            "{ctx}: timewait sockets ended vs created - still there\n{n}"
        );
        (k.created - into_state(m, "time_wait"), "TcpExt TW + TWKilled")
    } else {
        assert_eq!(
            ends(m, "expired") + ends(m, "fin_timeout"),
            k.created,
            "{ctx}: timers that ran out vs TcpExt TW + TWKilled (counted then on this kernel)\n{n}"
        );
        (ended + remaining - into_state(m, "time_wait"), "ended + still there")
    };
    assert!(
        fewest <= without_fin && without_fin <= most,
        "{ctx}: {against} - transitions into time_wait = {without_fin}, but the orphans without a \
         FIN are {fewest}..={most}\n{n}"
    );
    assert_eq!(
        m.get("twmon_timewait_handoff_missed_total", &[]),
        k.overflow,
        "{ctx}: hand-offs missed vs TCPTimeWaitOverflow\n{n}"
    );
    assert_eq!(ends(m, "reuse"), k.recycled, "{ctx}: reuse ends vs TWRecycled\n{n}");
    // A re-arm needs a segment that reached a timewait socket: a FIN sent again from LAST_ACK
    // or CLOSING, or after a simultaneous close the peer's ACK of our FIN, which may arrive
    // when we are in TIME_WAIT already (one per side). Every retransmit twmon counts is one the
    // kernel counts. (A real server's segments are not the harness's to count.)
    let retransmits: f64 = m.series("twmon_retransmits_total").iter().map(|(_, v)| v).sum();
    assert!(
        retransmits <= k.retransmitted,
        "{ctx}: retransmits {retransmits} vs RetransSegs {}\n{n}",
        k.retransmitted
    );
    if !made.orphans_unknown {
        let rearms = m.get("twmon_timewait_rearms_total", &[]);
        let fins_again: f64 = ["last_ack", "closing"]
            .iter()
            .map(|s| m.get("twmon_retransmits_total", &[("state", s)]))
            .sum();
        let acks = 2 * made.simultaneous;
        assert!(
            rearms <= fins_again + acks as f64,
            "{ctx}: re-arms {rearms} vs FINs sent again from LAST_ACK or CLOSING {fins_again} + \
             ACKs after simultaneous closes {acks}\n{n}"
        );
    }
    assert_eq!(
        out_of_state(m, "established"),
        k.established_left - made.abandoned as f64,
        "{ctx}: sides that left ESTABLISHED vs Tcp ActiveOpens + PassiveOpens - AttemptFails - \
         CurrEstab - connects the harness abandoned in SYN_SENT ({})\n{n}",
        made.abandoned
    );
    assert_eq!(
        m.get("twmon_timewait_end_missed_total", &[]),
        0.0,
        "{ctx}: ends no program saw\n{n}"
    );
    assert_eq!(m.get("twmon_events_lost_total", &[]), 0.0, "{ctx}\n{n}");
    for (s, _) in SS_STATES {
        assert_eq!(m.sockets(s), k.sockets(s), "{ctx}: {s} vs ss\n{n}");
    }
    // Every TIME_WAIT socket is one whose close the agent saw: each is held by a process.
    let held: f64 = m.series("twmon_timewait_sockets").iter().map(|(_, v)| v).sum();
    assert_eq!(
        held,
        k.sockets("time_wait"),
        "{ctx}: TIME_WAIT by the process that closed first vs ss\n{n}"
    );
}

/// Kernel work done on a thread of PID 1, which some kernels hide from every BPF program: this
/// project's CI machine runs one whose `bpf_trace_run*`, `trace_call_bpf` and trampolines return
/// before the program when the current task's thread group is 1 (its init) and the program was
/// not loaded by init. A softirq runs on whatever task the CPU was running, so when it runs on
/// one of init's threads, the connections it handles, and the timewait timers it runs out, are
/// out of the sight of twmon, or of any BPF tool. ftrace still sees them: a tracefs instance of
/// this harness's own records, on init's threads, TCP state changes, network receive softirqs
/// and timewait timers running out, so that a case they touched is told from a defect of twmon.
pub struct Blind {
    dir: std::path::PathBuf,
}

impl Blind {
    /// The events recorded, each with a condition beside the thread's.
    const EVENTS: [(&str, &str); 3] = [
        ("sock/inet_sock_set_state", ""),
        ("irq/softirq_entry", "vec == 3"), // NET_RX
        ("timer/timer_expire_entry", "function == TW_TIMER_HANDLER"),
    ];

    /// `None` where tracefs cannot be had (then nothing is told apart, and this says why).
    pub fn watch() -> Option<Self> {
        Self::try_watch().map_err(|e| eprintln!("harness: PID 1's threads not watched: {e}")).ok()
    }

    fn try_watch() -> std::io::Result<Self> {
        let root = std::path::Path::new("/sys/kernel/tracing");
        if !root.join("instances").exists() {
            let _ = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev"])
                .arg(root)
                .status();
        }
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join("instances").join(format!("twmon-blind-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir)?;
        let blind = Self { dir };
        let init: Vec<String> = std::fs::read_dir("/proc/1/task")?
            .filter_map(|e| Some(format!("common_pid == {}", e.ok()?.file_name().to_str()?)))
            .collect();
        let handler = std::fs::read_to_string("/proc/kallsyms")?
            .lines()
            .find(|l| l.ends_with(" tw_timer_handler"))
            .and_then(|l| l.split(' ').next().map(|a| format!("0x{a}")))
            .ok_or_else(|| std::io::Error::other("tw_timer_handler not in /proc/kallsyms"))?;
        for (event, also) in Self::EVENTS {
            let also = also.replace("TW_TIMER_HANDLER", &handler);
            let filter = if also.is_empty() {
                init.join(" || ")
            } else {
                format!("({}) && {also}", init.join(" || "))
            };
            let event = blind.dir.join("events").join(event);
            std::fs::write(event.join("filter"), filter)?;
            std::fs::write(event.join("enable"), "1")?;
        }
        Ok(blind)
    }

    /// What was recorded on init's threads since `watch`. An unreadable record is a failure:
    /// read as nothing, it would hide the events it exists to show.
    pub fn hidden(&self) -> usize {
        let trace = self.dir.join("trace");
        std::fs::read_to_string(&trace)
            .unwrap_or_else(|e| panic!("reading {}: {e}", trace.display()))
            .lines()
            .filter(|l| !l.starts_with('#'))
            .count()
    }
}

impl Drop for Blind {
    fn drop(&mut self) {
        for (event, _) in Self::EVENTS {
            let _ = std::fs::write(self.dir.join("events").join(event).join("enable"), "0");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
