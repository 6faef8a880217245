//! `cargo xtask bench`: overhead of the agent, measured. Method and results in BENCHMARKS.md.
//!
//! Phases, each printing its numbers as it ends:
//! 1. churn: connections per second on loopback in a private namespace with the agent off and
//!    on, alternated (off/on, on/off, ...) so drift and other load on the machine cancel out;
//! 2. cost: mean run time per event of each kernel program (kernel run-time statistics) next to
//!    floor programs on the same tracepoints, and events lost at the maximum rate;
//! 3. cpu: the agent's CPU time and peak RSS at a fixed connection rate;
//! 4. scrape: /metrics latency;
//! 5. memory: agent RSS and kernel map memory with many timewait sockets alive.
//!
//! Progress goes to stderr, results to stdout.
mod agent;
mod bpf;
mod load;
mod netns;
mod stats;

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    agent::{Agent, Scrape},
    bpf::{FloorKind, RunStats},
    load::{Churn, Servers, Until},
    netns::Netns,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// True once SIGINT or SIGTERM arrived: every loop winds down and cleanup runs.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted; namespaces and processes cleaned up");
    }
    Ok(())
}

const USAGE: &str = "\
cargo xtask bench [-- OPTIONS]
  --quick              about 2 minutes instead of about 6 (fewer, shorter rounds)
  --rounds N           off/on churn rounds (default 5, quick 3)
  --round-secs S       seconds per churn run (default 5, quick 3)
  --clients N          parallel client threads (default 4)
  --rate R             connections/s for the CPU measurement (default 15000)
  --timewait N         timewait sockets for the memory measurement (default 131072)
  --scrapes N          /metrics scrapes to time (default 200)
  --only LIST          comma-separated phases: churn,cost,cpu,scrape,memory";

#[derive(Debug, Clone)]
struct Options {
    quick: bool,
    rounds: usize,
    round: Duration,
    clients: usize,
    rate: f64,
    timewait: u64,
    scrapes: usize,
    cost: Duration,
    cpu: Duration,
    phases: Vec<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Options {
            quick,
            rounds: if quick { 3 } else { 5 },
            round: Duration::from_secs(if quick { 3 } else { 5 }),
            clients: 4,
            rate: 15000.0,
            timewait: 131072,
            scrapes: 200,
            cost: Duration::from_secs(if quick { 5 } else { 10 }),
            cpu: Duration::from_secs(if quick { 10 } else { 20 }),
            phases: ["churn", "cost", "cpu", "scrape", "memory"].map(String::from).to_vec(),
        };
        let mut it = args.iter().filter(|a| *a != "--" && *a != "--quick");
        while let Some(a) = it.next() {
            let mut value = || it.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
            match a.as_str() {
                "--rounds" => o.rounds = value()?.parse()?,
                "--round-secs" => o.round = Duration::from_secs_f64(value()?.parse()?),
                "--clients" => o.clients = value()?.parse()?,
                "--rate" => o.rate = value()?.parse()?,
                "--timewait" => o.timewait = value()?.parse()?,
                "--scrapes" => o.scrapes = value()?.parse()?,
                "--only" => o.phases = value()?.split(',').map(|s| s.trim().to_string()).collect(),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown option {other}\n{USAGE}"),
            }
        }
        if o.rounds == 0 || o.clients == 0 || o.scrapes == 0 {
            bail!("--rounds, --clients and --scrapes must be at least 1");
        }
        Ok(o)
    }

    fn wants(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
}

/// What the phases found, for the comparison with the targets at the end.
#[derive(Default)]
struct Findings {
    /// Median connections/s with the agent off, and on/off ratios per round.
    off_rate: Option<f64>,
    ratios: Vec<f64>,
    lost_at_max: Option<(u64, f64)>,
    /// ns/run of twmon_state and its floors, state changes per second during the cost phase.
    state_ns: Option<f64>,
    state_floor_ns: Option<f64>,
    state_changes_per_s: Option<f64>,
    cost_lost: Option<u64>,
    /// CPU % of one core and the rate it was measured at.
    cpu: Option<(f64, f64, bool)>,
    scrape_p99_ms: Option<f64>,
    scrape_median_ms: Option<f64>,
    tw_rss_mib: Option<(f64, u64)>,
}

pub fn run(twmon: &Path, args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    netns::remove_stale();
    let work = std::env::temp_dir().join(format!("twmon-bench-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = phases(twmon, &opts, &work);
    if result.is_ok() {
        let _ = fs::remove_dir_all(&work);
    } else {
        eprintln!("bench: agent logs kept in {}", work.display());
    }
    result
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "date {date}; kernel {kernel}; CPU {model} x {cpus}; memory {mem}; load average {}",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

fn phases(twmon: &Path, o: &Options, work: &Path) -> Result<()> {
    println!("twmon benchmark: {}", machine());
    println!(
        "options: rounds {} x {:.0} s per mode, {} clients, CPU at {:.0} conn/s, {} timewait sockets, {} scrapes{}",
        o.rounds,
        o.round.as_secs_f64(),
        o.clients,
        o.rate,
        o.timewait,
        o.scrapes,
        if o.quick { " (quick)" } else { "" }
    );
    let mut f = Findings::default();
    let started = Instant::now();

    if ["churn", "cost", "cpu", "scrape"].iter().any(|p| o.wants(p)) {
        let ns = Netns::create("churn")?;
        // Wide port range and tcp_tw_reuse so clients never run out of ports; TIME_WAIT kept
        // below the agent's 262144-entry map (two destinations x 64512 ports < 131072).
        ns.sysctls(&[
            ("net/ipv4/ip_local_port_range", "1024 65535"),
            ("net/ipv4/tcp_tw_reuse", "1"),
            ("net/ipv4/tcp_max_tw_buckets", "131072"),
        ])?;
        let servers = Servers::start(&ns, 2, o.clients)?;
        eprintln!("bench: namespace {} up, servers on {:?}", ns.name, servers.addrs);
        if o.wants("churn") {
            churn_phase(twmon, o, work, &ns, &servers.addrs, &mut f)?;
        }
        if o.wants("cost") {
            cost_phase(twmon, o, work, &ns, &servers.addrs, &mut f)?;
        }
        if o.wants("cpu") || o.wants("scrape") {
            cpu_and_scrape_phase(twmon, o, work, &ns, &servers.addrs, &mut f)?;
        }
        drop(servers);
        drop(ns);
    }
    if o.wants("memory") {
        // Let the churn namespace's timewait sockets go before counting memory.
        std::thread::sleep(Duration::from_secs(2));
        memory_phase(twmon, o, work, &mut f)?;
    }
    summary(o, &f);
    eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// One measured churn run with the agent on: connection rate, agent numbers over the window.
struct OnRun {
    churn: Churn,
    events: f64,
    lost: f64,
    cpu_percent: f64,
}

fn run_with_agent(agent: &Agent, ns: &Netns, dsts: &[SocketAddr], clients: usize, until: Until, pace: Option<f64>) -> Result<OnRun> {
    let m0 = agent.scrape()?;
    let c0 = agent.cpu_ticks()?;
    let churn = load::churn(ns, dsts, clients, until, pace)?;
    let c1 = agent.cpu_ticks()?;
    let m1 = agent.scrape()?;
    Ok(OnRun {
        events: m1.get("twmon_events_total", &[]) - m0.get("twmon_events_total", &[]),
        lost: m1.get("twmon_events_lost_total", &[]) - m0.get("twmon_events_lost_total", &[]),
        cpu_percent: (c1 - c0) as f64 / ticks_per_second() / churn.elapsed.as_secs_f64() * 100.0,
        churn,
    })
}

fn note_errors(c: &Churn) -> String {
    match &c.first_error {
        Some(e) if c.errors > 0 => format!(" ({} failed connects, first: {e})", c.errors),
        _ => String::new(),
    }
}

/// The tracepoints twmon attaches to.
const TRACEPOINTS: [(&str, &str); 6] = [
    ("sock", "inet_sock_set_state"),
    ("timer", "timer_start"),
    ("timer", "timer_cancel"),
    ("tcp", "tcp_retransmit_skb"),
    ("tcp", "tcp_send_reset"),
    ("tcp", "tcp_receive_reset"),
];

/// Other twmon instances loaded on the machine now (other users' agents or tests): their
/// programs run on the same events and count as load that the alternation has to cancel.
fn other_instances(mine: Option<&Agent>) -> usize {
    let own: Vec<u32> = mine.map(|a| bpf::process_progs(a.pid()).into_iter().map(|(id, _)| id).collect()).unwrap_or_default();
    bpf::programs_named("twmon_state").into_iter().filter(|id| !own.contains(id)).count()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Off,
    Empty,
    On,
}

fn churn_phase(twmon: &Path, o: &Options, work: &Path, ns: &Netns, dsts: &[SocketAddr], f: &mut Findings) -> Result<()> {
    println!(
        "\n## 1. Connection churn: agent off, empty programs on its six tracepoints, agent on \
         ({} rounds, {:.0} s per run, {} clients, order rotated every round)",
        o.rounds,
        o.round.as_secs_f64(),
        o.clients
    );
    eprintln!("bench: churn warm-up");
    load::churn(ns, dsts, o.clients, Until::Time(Duration::from_secs(2)), None)?;
    println!(
        "| round | order | off conn/s | empty conn/s | on conn/s | empty/off | on/off | events/s to agent | lost | agent CPU % of a core | other twmon instances |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let modes = [Mode::Off, Mode::Empty, Mode::On];
    let (mut offs, mut empties, mut ons, mut ratios, mut empty_ratios, mut cpus) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut lost_total, mut events_rates) = (0u64, vec![]);
    for r in 0..o.rounds {
        check_interrupted()?;
        let order: Vec<Mode> = (0..3).map(|i| modes[(i + r) % 3]).collect();
        let (mut off, mut empty, mut on) = (None, None, None);
        let mut others = 0;
        for mode in &order {
            eprintln!("bench: round {} {mode:?}", r + 1);
            match mode {
                Mode::Off => {
                    others = others.max(other_instances(None));
                    off = Some(load::churn(ns, dsts, o.clients, Until::Time(o.round), None)?);
                    others = others.max(other_instances(None));
                }
                Mode::Empty => {
                    let floors = TRACEPOINTS
                        .iter()
                        .map(|(c, t)| bpf::attach_floor(FloorKind::Empty, c, t))
                        .collect::<Result<Vec<_>>>()?;
                    empty = Some(load::churn(ns, dsts, o.clients, Until::Time(o.round), None)?);
                    drop(floors);
                }
                Mode::On => {
                    let agent = Agent::start(twmon, &[], work)?;
                    others = others.max(other_instances(Some(&agent)));
                    let run = run_with_agent(&agent, ns, dsts, o.clients, Until::Time(o.round), None)?;
                    others = others.max(other_instances(Some(&agent)));
                    agent.stop()?;
                    on = Some(run);
                }
            }
        }
        let (off, empty, on) = (off.expect("ran"), empty.expect("ran"), on.expect("ran"));
        let ratio = on.churn.rate() / off.rate();
        let empty_ratio = empty.rate() / off.rate();
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {:.0} | {} | {:.1} | {} |{}{}{}",
            r + 1,
            order.iter().map(|m| format!("{m:?}").to_lowercase()).collect::<Vec<_>>().join(", "),
            off.rate(),
            empty.rate(),
            on.churn.rate(),
            empty_ratio,
            ratio,
            on.events / on.churn.elapsed.as_secs_f64(),
            on.lost,
            on.cpu_percent,
            others,
            note_errors(&off),
            note_errors(&empty),
            note_errors(&on.churn)
        );
        offs.push(off.rate());
        empties.push(empty.rate());
        ons.push(on.churn.rate());
        ratios.push(ratio);
        empty_ratios.push(empty_ratio);
        cpus.push(on.cpu_percent);
        lost_total += on.lost as u64;
        events_rates.push(on.events / on.churn.elapsed.as_secs_f64());
    }
    let mmm = |xs: &[f64], p: usize| {
        format!("{:.*} / {:.*} / {:.*}", p, stats::min(xs), p, stats::median(xs), p, stats::max(xs))
    };
    println!("\nconn/s min / median / max: off {}; empty programs {}; agent on {}", mmm(&offs, 0), mmm(&empties, 0), mmm(&ons, 0));
    println!("ratio to off, min / median / max: empty programs {}; **agent on {}**", mmm(&empty_ratios, 3), mmm(&ratios, 3));
    println!(
        "agent at the maximum rate: CPU median {:.1} % of a core, median {:.0} events/s, {lost_total} events lost",
        stats::median(&cpus),
        stats::median(&events_rates)
    );
    f.off_rate = Some(stats::median(&offs));
    f.ratios = ratios;
    f.lost_at_max = Some((lost_total, stats::median(&events_rates)));
    Ok(())
}

/// bpftrace counting one tracepoint: a widely used tool's floor next to ours.
struct Bpftrace {
    tracepoint: String,
    child: Child,
}

impl Bpftrace {
    fn start(tracepoint: &str) -> Result<Self> {
        let child = Command::new("bpftrace")
            .args(["-e", &format!("tracepoint:{tracepoint} {{ @c = count(); }}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Bpftrace { tracepoint: tracepoint.to_string(), child })
    }

    /// The run statistics of its one tracepoint program, once it has one.
    fn stats(&self) -> Option<RunStats> {
        bpf::process_progs(self.child.id()).into_iter().map(|(_, s)| s).max_by_key(|s| s.run_cnt)
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; SIGINT makes bpftrace print its map and exit.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const COST_TRACEPOINTS: [(&str, &str, &str); 3] = [
    ("twmon_state", "sock", "inet_sock_set_state"),
    ("twmon_timer_start", "timer", "timer_start"),
    ("twmon_timer_cancel", "timer", "timer_cancel"),
];
const OTHER_PROGRAMS: [&str; 4] = ["twmon_retransmit", "twmon_send_reset", "twmon_receive_reset", "twmon_sweep"];

fn cost_phase(twmon: &Path, o: &Options, work: &Path, ns: &Netns, dsts: &[SocketAddr], f: &mut Findings) -> Result<()> {
    println!("\n## 2. Kernel cost per event (run_time_ns / run_cnt, {:.0} s at maximum churn)", o.cost.as_secs_f64());
    check_interrupted()?;
    let agent = Agent::start(twmon, &[], work)?;
    let _stats = bpf::enable_stats()?;
    let mut floors = Vec::new();
    for (_, cat, tp) in COST_TRACEPOINTS {
        for kind in [FloorKind::Empty, FloorKind::Count] {
            floors.push(bpf::attach_floor(kind, cat, tp)?);
        }
    }
    // What one ring-buffer record costs, with and without a wake-up, on every state change.
    for kind in [FloorKind::RingWakeup, FloorKind::RingNoWakeup] {
        floors.push(bpf::attach_floor(kind, "sock", "inet_sock_set_state")?);
    }
    let mut tracers = Vec::new();
    if which("bpftrace") {
        for (_, cat, tp) in COST_TRACEPOINTS {
            tracers.push(Bpftrace::start(&format!("{cat}:{tp}"))?);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while tracers.iter().any(|t| t.stats().is_none()) && Instant::now() < deadline && !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
        tracers.retain(|t| {
            let ok = t.stats().is_some();
            if !ok {
                eprintln!("bench: bpftrace on {} did not attach within 60 s; left out", t.tracepoint);
            }
            ok
        });
    } else {
        eprintln!("bench: bpftrace not installed (apt-get install bpftrace); its column is left out");
    }
    eprintln!("bench: cost warm-up");
    load::churn(ns, dsts, o.clients, Until::Time(Duration::from_secs(1)), None)?;
    check_interrupted()?;

    let m0 = agent.scrape()?;
    let fl0: Vec<RunStats> = floors.iter().map(|x| x.stats()).collect();
    let read0: Vec<u64> = floors.iter().map(|x| x.consumed()).collect();
    let bt0: Vec<RunStats> = tracers.iter().map(|t| t.stats().unwrap_or_default()).collect();
    let c0 = agent.cpu_ticks()?;
    eprintln!("bench: cost measurement");
    let churn = load::churn(ns, dsts, o.clients, Until::Time(o.cost), None)?;
    let c1 = agent.cpu_ticks()?;
    let fl1: Vec<RunStats> = floors.iter().map(|x| x.stats()).collect();
    // Give the polling reader one more period to catch up.
    std::thread::sleep(Duration::from_millis(50));
    let read1: Vec<u64> = floors.iter().map(|x| x.consumed()).collect();
    let bt1: Vec<RunStats> = tracers.iter().map(|t| t.stats().unwrap_or_default()).collect();
    let m1 = agent.scrape()?;
    let secs = churn.elapsed.as_secs_f64();
    let conns = churn.connections as f64;

    println!(
        "{:.0} conn/s with statistics on{}; agent CPU {:.1} % of a core",
        churn.rate(),
        note_errors(&churn),
        (c1 - c0) as f64 / ticks_per_second() / secs * 100.0
    );
    println!("| tracepoint | program | events/s | ns/event (mean) | ns per connection |");
    println!("|---|---|---|---|---|");
    let mut twmon_ns_per_conn = 0.0;
    let mut floor_ns_per_conn = 0.0;
    for (prog, cat, tp) in COST_TRACEPOINTS {
        let s = m1.program(prog).since(m0.program(prog));
        twmon_ns_per_conn += s.run_time_ns as f64 / conns;
        println!(
            "| {cat}:{tp} | **{prog}** | {:.0} | **{:.1}** | {:.0} |",
            s.run_cnt as f64 / secs,
            s.ns_per_run(),
            s.run_time_ns as f64 / conns
        );
        if prog == "twmon_state" {
            f.state_ns = Some(s.ns_per_run());
            f.state_changes_per_s = Some(s.run_cnt as f64 / secs);
        }
        for (i, fl) in floors.iter().enumerate().filter(|(_, x)| x.tracepoint == format!("{cat}:{tp}")) {
            let d = fl1[i].since(fl0[i]);
            if fl.kind == FloorKind::Empty {
                floor_ns_per_conn += d.run_time_ns as f64 / conns;
                if prog == "twmon_state" {
                    f.state_floor_ns = Some(d.ns_per_run());
                }
            }
            let read = match fl.kind {
                FloorKind::RingWakeup | FloorKind::RingNoWakeup => {
                    format!(" ({} of {} records read)", read1[i] - read0[i], d.run_cnt)
                }
                _ => String::new(),
            };
            println!(
                "| | {}{read} | {:.0} | {:.1} | {:.0} |",
                fl.kind.label(),
                d.run_cnt as f64 / secs,
                d.ns_per_run(),
                d.run_time_ns as f64 / conns
            );
        }
        for (i, _) in tracers.iter().enumerate().filter(|(_, t)| t.tracepoint == format!("{cat}:{tp}")) {
            let d = bt1[i].since(bt0[i]);
            println!("| | floor: bpftrace `@c = count()` | {:.0} | {:.1} | {:.0} |", d.run_cnt as f64 / secs, d.ns_per_run(), d.run_time_ns as f64 / conns);
        }
    }
    for prog in OTHER_PROGRAMS {
        let s = m1.program(prog).since(m0.program(prog));
        if prog != "twmon_sweep" {
            twmon_ns_per_conn += s.run_time_ns as f64 / conns;
        }
        println!("| {} | {prog} | {:.1} | {:.1} | {:.1} |", if prog == "twmon_sweep" { "(test run by the agent)" } else { "tcp" }, s.run_cnt as f64 / secs, s.ns_per_run(), s.run_time_ns as f64 / conns);
    }
    let state_runs = m1.program("twmon_state").since(m0.program("twmon_state")).run_cnt as f64;
    let events = m1.get("twmon_events_total", &[]) - m0.get("twmon_events_total", &[]);
    let lost = m1.get("twmon_events_lost_total", &[]) - m0.get("twmon_events_lost_total", &[]);
    let tw = m1.timewait();
    println!(
        "\nper connection: {:.1} state changes, {:.1} events to the agent; kernel time of all twmon \
         programs {:.0} ns per connection vs {:.0} ns for empty programs on the same three tracepoints",
        state_runs / conns,
        events / conns,
        twmon_ns_per_conn,
        floor_ns_per_conn
    );
    println!(
        "state changes {:.0}/s, events {:.0}/s, events lost {lost}; the sweep visits the {tw:.0} \
         timewait sockets the agent follows",
        state_runs / secs,
        events / secs
    );
    f.cost_lost = Some(lost as u64);
    drop(tracers);
    drop(floors);
    agent.stop()?;
    Ok(())
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn cpu_and_scrape_phase(twmon: &Path, o: &Options, work: &Path, ns: &Netns, dsts: &[SocketAddr], f: &mut Findings) -> Result<()> {
    check_interrupted()?;
    let agent = Agent::start(twmon, &[], work)?;
    let fresh = agent.memory()?;
    if o.wants("cpu") {
        // Pace only if the machine can reach the rate with room to spare.
        let reachable = f.off_rate.map(|r| r >= o.rate * 1.1).unwrap_or(true);
        let pace = reachable.then_some(o.rate);
        println!(
            "\n## 3. Agent CPU and memory at {} ({:.0} s)",
            match pace {
                Some(r) => format!("a paced {r:.0} conn/s"),
                None => format!("the maximum rate (the machine does not reach {:.0} conn/s)", o.rate),
            },
            o.cpu.as_secs_f64()
        );
        eprintln!("bench: cpu warm-up");
        load::churn(ns, dsts, o.clients, Until::Time(Duration::from_secs(2)), pace)?;
        eprintln!("bench: cpu measurement");
        let run = run_with_agent(&agent, ns, dsts, o.clients, Until::Time(o.cpu), pace)?;
        let mem = agent.memory()?;
        let c0 = agent.cpu_ticks()?;
        let idle = Duration::from_secs(5);
        std::thread::sleep(idle);
        let idle_cpu = (agent.cpu_ticks()? - c0) as f64 / ticks_per_second() / idle.as_secs_f64() * 100.0;
        let rate = run.churn.rate();
        println!(
            "achieved {rate:.0} conn/s{}, {:.0} events/s to the agent, {} lost",
            note_errors(&run.churn),
            run.events / run.churn.elapsed.as_secs_f64(),
            run.lost
        );
        println!(
            "agent CPU (utime+stime) {:.2} % of one core = {:.3} % per 1000 conn/s; idle afterwards {:.2} %",
            run.cpu_percent,
            run.cpu_percent / rate * 1000.0,
            idle_cpu
        );
        println!(
            "agent memory: RSS {:.1} MiB at start, {:.1} MiB after (anon {:.1}, file {:.1}, shmem {:.1}); peak (VmHWM) {:.1} MiB",
            mib(fresh.rss),
            mib(mem.rss),
            mib(mem.anon),
            mib(mem.file),
            mib(mem.shmem),
            mib(mem.hwm)
        );
        f.cpu = Some((run.cpu_percent, rate, pace.is_some()));
    }
    if o.wants("scrape") {
        check_interrupted()?;
        let first = agent.scrape()?;
        let tw = first.timewait();
        println!("\n## 4. /metrics scrape latency ({} scrapes, one at a time, agent idle)", o.scrapes);
        let (ms, collect) = time_scrapes(&agent, o.scrapes)?;
        println!(
            "{} bytes, {} samples, {tw:.0} timewait sockets followed; latency median {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             collect part (twmon_scrape_collect_seconds) median {:.2} ms",
            first.bytes,
            first.series(),
            stats::median(&ms),
            stats::percentile(&ms, 99.0),
            stats::max(&ms),
            stats::median(&collect)
        );
        f.scrape_median_ms = Some(stats::median(&ms));
        f.scrape_p99_ms = Some(stats::percentile(&ms, 99.0));
    }
    agent.stop()
}

/// Times `n` sequential scrapes; returns the latencies and the agent's own collect times (ms).
fn time_scrapes(agent: &Agent, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut ms, mut collect) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        check_interrupted()?;
        let t = Instant::now();
        let (status, body) = agent::http_get(agent.addr, "/metrics")?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        // Reports the previous scrape's collect time; close enough over many scrapes.
        collect.push(Scrape::parse(&body).collect_ms());
    }
    Ok((ms, collect))
}

fn memory_phase(twmon: &Path, o: &Options, work: &Path, f: &mut Findings) -> Result<()> {
    println!("\n## 5. Memory with {} timewait sockets alive", o.timewait);
    check_interrupted()?;
    let ns = Netns::create("tw")?;
    // No reuse: every connection leaves a timewait socket for 60 s. Four server ports give
    // 4 x 64512 four-tuples per client address.
    ns.sysctls(&[
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/ipv4/tcp_tw_reuse", "0"),
        ("net/ipv4/tcp_max_tw_buckets", "262144"),
    ])?;
    let servers = Servers::start(&ns, 4, o.clients.div_ceil(4).max(1))?;
    let agent = Agent::start(twmon, &[], work)?;
    std::thread::sleep(Duration::from_millis(500));
    let before = agent.memory()?;
    let maps_before = agent.maps();
    eprintln!("bench: creating {} timewait sockets", o.timewait);
    // Timewait sockets live 60 s: create them well within that.
    let clients = o.clients.max(4);
    let churn = load::churn(&ns, &servers.addrs, clients, Until::Count(o.timewait, Duration::from_secs(40)), None)?;
    // One sweep interval, so silent FIN_WAIT2 -> TIME_WAIT changes are settled.
    std::thread::sleep(Duration::from_millis(1500));
    let in_ns = ns.timewait_count()?;
    let m = agent.scrape()?;
    let followed = m.timewait();
    let after = agent.memory()?;
    let maps = agent.maps();
    println!(
        "created {} connections in {:.1} s ({:.0}/s){}; the namespace holds {in_ns} timewait sockets \
         (/proc/net/sockstat tw), the agent follows {followed:.0} (twmon_sockets time_wait + fin_wait2, all namespaces)",
        churn.connections,
        churn.elapsed.as_secs_f64(),
        churn.rate(),
        note_errors(&churn)
    );
    println!(
        "agent RSS {:.1} MiB (anon {:.1}, file {:.1}, shmem {:.1}), peak (VmHWM) {:.1} MiB; before the sockets: RSS {:.1} MiB",
        mib(after.rss),
        mib(after.anon),
        mib(after.file),
        mib(after.shmem),
        mib(after.hwm),
        mib(before.rss)
    );
    println!("| map | type | max entries | kernel memory before | with the sockets |");
    println!("|---|---|---|---|---|");
    let mut total = (0u64, 0u64);
    for map in &maps {
        let b = maps_before.iter().find(|x| x.id == map.id).map(|x| x.memlock).unwrap_or(0);
        total.0 += b;
        total.1 += map.memlock;
        println!(
            "| {} | {} | {} | {:.2} MiB | {:.2} MiB |",
            map.name,
            map_type(map.map_type),
            map.max_entries,
            b as f64 / (1 << 20) as f64,
            map.memlock as f64 / (1 << 20) as f64
        );
    }
    println!("| total | | | {:.2} MiB | {:.2} MiB |", total.0 as f64 / (1 << 20) as f64, total.1 as f64 / (1 << 20) as f64);
    let (ms, _) = time_scrapes(&agent, 50.min(o.scrapes))?;
    println!(
        "scrape latency with these sockets: median {:.2} ms, p99 {:.2} ms (each scrape runs the sweep over them)",
        stats::median(&ms),
        stats::percentile(&ms, 99.0)
    );
    f.tw_rss_mib = Some((mib(after.hwm), in_ns));
    agent.stop()?;
    drop(servers);
    drop(ns);
    Ok(())
}

fn map_type(t: u32) -> &'static str {
    match t {
        1 => "hash",
        2 => "array",
        5 => "percpu_hash",
        6 => "percpu_array",
        27 => "ringbuf",
        _ => "other",
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

fn summary(o: &Options, f: &Findings) {
    let mut s = String::new();
    let _ = writeln!(s, "\n## Targets (this machine)\n| target | measured | |\n|---|---|---|");
    if !f.ratios.is_empty() {
        let med = stats::median(&f.ratios);
        let _ = writeln!(
            s,
            "| churn with agent on >= 0.99 of off | on/off median {med:.3} (min {:.3}, max {:.3}) | {} |",
            stats::min(&f.ratios),
            stats::max(&f.ratios),
            verdict(med >= 0.99)
        );
    }
    if let Some(ns) = f.state_ns {
        let _ = writeln!(
            s,
            "| <= 150 ns per state-change event | twmon_state {ns:.0} ns (empty program {:.0} ns) | {} |",
            f.state_floor_ns.unwrap_or(f64::NAN),
            verdict(ns <= 150.0)
        );
    }
    if let Some((cpu, rate, paced)) = f.cpu {
        let at_target = cpu / rate * o.rate;
        let _ = writeln!(
            s,
            "| agent CPU <= 2 % of a core at {:.0} conn/s | {cpu:.2} % at {rate:.0} conn/s{} | {} |",
            o.rate,
            if paced { String::new() } else { format!(" (max reached; {at_target:.2} % scaled to {:.0})", o.rate) },
            verdict(at_target <= 2.0)
        );
    }
    if let (Some(rate), Some(lost)) = (f.state_changes_per_s, f.cost_lost) {
        let lost_max = f.lost_at_max.map(|(l, _)| l).unwrap_or(0);
        let reached = rate >= 100_000.0;
        let _ = writeln!(
            s,
            "| zero lost events at 100000 state changes/s | {lost} lost at {rate:.0} state changes/s; {lost_max} in the churn rounds | {} |",
            if lost + lost_max > 0 { "**missed**" } else if reached { "met" } else { "met at the rate reached" }
        );
    }
    if let Some((hwm, tw)) = f.tw_rss_mib {
        let _ = writeln!(
            s,
            "| agent RSS <= 32 MiB with {} timewait sockets | peak {hwm:.1} MiB with {tw} alive | {} |",
            o.timewait,
            verdict(hwm <= 32.0 && tw >= o.timewait)
        );
    }
    if let (Some(med), Some(p99)) = (f.scrape_median_ms, f.scrape_p99_ms) {
        let _ = writeln!(s, "| scrape < 10 ms | median {med:.2} ms, p99 {p99:.2} ms | {} |", verdict(p99 < 10.0));
    }
    print!("{s}");
}

