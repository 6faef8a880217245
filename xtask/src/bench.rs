//! `cargo xtask bench`: overhead of the agent, measured. Method and results in BENCHMARKS.md.
//!
//! Phases, each printing its numbers as it ends:
//! 1. churn: connections per second on loopback in a private namespace with the agent off,
//!    with empty programs on its tracepoints, and on, in an order that rotates every round so
//!    drift and other load on the machine fall on every mode alike;
//! 2. cost: mean run time per event of each kernel program (kernel run-time statistics) next to
//!    floor programs on the same tracepoints, and events lost at the maximum rate;
//! 3. scrape: /metrics latency on a fresh agent;
//! 4. cpu: the agent's CPU time and memory at a fixed connection rate;
//! 5. scrape: /metrics latency after that load;
//! 6. steady: traffic that closes nothing (bulk transfer, keep-alive request/response) off,
//!    with empty programs and on, and the timer programs' cost on unrelated timers;
//! 7. memory: agent RSS and kernel map memory with many timewait sockets alive;
//! 8. namespaces: a reconcile and a scrape over many namespaces with timewait sockets.
//!
//! Progress goes to stderr, results to stdout.
mod agent;
mod bpf;
mod load;
mod open;
mod stats;
mod steady;

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
use testkit::netns::Netns;

use self::{
    agent::{Agent, Scrape},
    bpf::{FloorKind, RunStats},
    load::{Churn, Servers, Until},
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
  --quick              about 2 minutes instead of about 4 (fewer, shorter rounds)
  --rounds N           churn and steady rounds of off, empty programs, on (default 8, quick 3)
  --round-secs S       seconds per churn run (default 5, quick 3)
  --clients N          parallel client threads (default 4)
  --rate R             connections/s for the CPU measurement (default 15000)
  --timewait N         timewait sockets for the memory measurement (default 131072)
  --scrapes N          /metrics scrapes to time (default 200)
  --namespaces N       namespaces for the reconcile measurement (default 200, quick 100)
  --twmon PATH         measure this build of the agent instead (an A/B against another commit)
  --only LIST          comma-separated phases: churn,cost,steady,cpu,scrape,memory,namespaces";

const PHASES: [&str; 7] = ["churn", "cost", "steady", "cpu", "scrape", "memory", "namespaces"];

#[derive(Debug, Clone)]
struct Options {
    quick: bool,
    rounds: usize,
    round: Duration,
    clients: usize,
    rate: f64,
    timewait: u64,
    scrapes: usize,
    namespaces: usize,
    cost: Duration,
    cpu: Duration,
    phases: Vec<String>,
    /// Another build of the agent to measure (an A/B against an earlier commit).
    twmon: Option<std::path::PathBuf>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Options {
            quick,
            rounds: if quick { 3 } else { 8 },
            round: Duration::from_secs(if quick { 3 } else { 5 }),
            clients: 4,
            rate: 15000.0,
            timewait: 131072,
            scrapes: 200,
            namespaces: if quick { 100 } else { 200 },
            cost: Duration::from_secs(if quick { 5 } else { 10 }),
            cpu: Duration::from_secs(if quick { 10 } else { 20 }),
            phases: PHASES.map(String::from).to_vec(),
            twmon: None,
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
                "--namespaces" => o.namespaces = value()?.parse()?,
                "--twmon" => o.twmon = Some(value()?.into()),
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
        if let Some(p) = o.phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
            bail!("unknown phase {p}: --only takes {}", PHASES.join(","));
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
    /// Median connections/s with the agent off and on, and on/off ratios per round.
    off_rate: Option<f64>,
    on_rate: Option<f64>,
    ratios: Vec<f64>,
    empty_ratios: Vec<f64>,
    lost_at_max: Option<u64>,
    /// Fastest churn run with the agent on (connections/s).
    on_max_rate: Option<f64>,
    /// State changes per connection, measured in the cost phase.
    changes_per_conn: Option<f64>,
    /// Kernel time of all twmon programs and of empty programs per connection (cost phase).
    per_conn_ns: Option<(f64, f64)>,
    /// The empty programs' share of `per_conn_ns` on the timer tracepoints.
    timer_floor_per_conn_ns: Option<f64>,
    /// On/off ratios per round of the bulk transfer and of request/response.
    bulk_ratios: Vec<f64>,
    rr_ratios: Vec<f64>,
    /// twmon's CPU time (programs above empty ones, and the agent) under traffic that closes
    /// nothing, in % of one core.
    steady_cpu_pct: Option<f64>,
    /// Per timer program: ns per run above an empty program's on unrelated timers, and runs/s.
    unrelated_timer_extra_ns: Vec<(String, f64, f64)>,
    /// ns/run of twmon_state and of an empty program, state changes per second, during the cost
    /// phase.
    state_ns: Option<f64>,
    state_floor_ns: Option<f64>,
    /// The per-socket hash map floor on the state tracepoint (lookup, then update or delete).
    state_socket_floor_ns: Option<f64>,
    state_reference_ns: Option<f64>,
    /// Agent CPU (% of a core) without reconciles, and reconciles on average.
    cpu_parts: Option<(f64, f64)>,
    ring_wakeup_ns: Option<f64>,
    /// twmon_state with the agent paused and the ring buffer full.
    state_paused_ns: Option<f64>,
    ring_nowakeup_ns: Option<f64>,
    state_changes_per_s: Option<f64>,
    cost_lost: Option<u64>,
    /// CPU % of one core, the rate it was measured at, CPU % with no load.
    cpu: Option<(f64, f64, f64)>,
    /// (median ms, p99 ms, timewait sockets followed).
    scrape_fresh_ms: Option<(f64, f64, f64)>,
    scrape_loaded_ms: Option<(f64, f64, f64)>,
    tw: Option<TwFindings>,
}

struct TwFindings {
    rss_before_mib: f64,
    rss_mib: f64,
    hwm_mib: f64,
    trimmed_rss_mib: f64,
    sockets: u64,
    maps_mib: f64,
    sweep_ms: f64,
    scrape_median_ms: f64,
}

pub fn run(built: &Path, args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    let twmon = opts.twmon.as_deref().unwrap_or(built);
    if !twmon.is_file() {
        bail!("--twmon {}: no such file", twmon.display());
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    testkit::netns::remove_stale();
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
    let kernel =
        fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
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
    println!("agent: {}", twmon.display());
    println!(
        "options: rounds {} x {:.0} s per mode, {} clients, CPU at {:.0} conn/s, {} timewait \
         sockets, {} scrapes{}",
        o.rounds,
        o.round.as_secs_f64(),
        o.clients,
        o.rate,
        o.timewait,
        o.scrapes,
        if o.quick { " (quick)" } else { "" }
    );
    if fs::read_to_string(STATS_SYSCTL).is_ok_and(|v| v.trim() == "1") {
        println!(
            "note: {STATS_SYSCTL} was 1 before the benchmark: every BPF program on the machine \
             pays for run-time statistics in every mode, which lowers the churn and steady ratios \
             (sysctl kernel.bpf_stats_enabled=0)"
        );
    }
    let mut f = Findings::default();
    let mut failed = Vec::new();
    let started = Instant::now();

    if ["churn", "cost", "cpu", "scrape"].iter().any(|p| o.wants(p)) {
        let ns = Netns::new("bench-churn");
        // Wide port range and tcp_tw_reuse so clients never run out of ports; TIME_WAIT kept
        // below the agent's 262144-entry map (two destinations x 64512 ports < 131072).
        ns.sysctls(&[
            ("net/ipv4/ip_local_port_range", "1024 65535"),
            ("net/ipv4/tcp_tw_reuse", "1"),
            ("net/ipv4/tcp_max_tw_buckets", "131072"),
        ]);
        let servers = Servers::start(&ns, 2, o.clients)?;
        eprintln!("bench: namespace {} up, servers on {:?}", ns.name, servers.addrs);
        if o.wants("churn") {
            record("churn", churn_phase(twmon, o, work, &ns, &servers.addrs, &mut f), &mut failed)?;
        }
        if o.wants("cost") {
            record("cost", cost_phase(twmon, o, work, &ns, &servers.addrs, &mut f), &mut failed)?;
        }
        if o.wants("cpu") || o.wants("scrape") {
            let r = cpu_and_scrape_phase(twmon, o, work, &ns, &servers.addrs, &mut f);
            record("cpu and scrape", r, &mut failed)?;
        }
        drop(servers);
        drop(ns);
    }
    // After the churn namespace is gone with its timewait sockets, so that no timer here is one.
    if o.wants("steady") {
        let r = steady::steady_phase(twmon, o.rounds, o.round, o.cost, work, &mut f);
        record("steady", r, &mut failed)?;
    }
    if o.wants("memory") {
        // Let the churn namespace's timewait sockets go before counting memory.
        std::thread::sleep(Duration::from_secs(2));
        record("memory", memory_phase(twmon, o, work, &mut f), &mut failed)?;
    }
    if o.wants("namespaces") {
        record("namespaces", namespaces_phase(twmon, o, work), &mut failed)?;
    }
    summary(o, &f, &failed);
    eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("phases that failed (their numbers are missing above): {}", failed.join("; "));
    }
    Ok(())
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// bpftrace finds tracepoints through tracefs: mounts it where it is missing, and says so.
fn ensure_tracefs() {
    const TRACEFS: &str = "/sys/kernel/tracing";
    if Path::new(TRACEFS).join("events").is_dir() {
        return;
    }
    let mounted = Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        eprintln!("bench: mounted tracefs at {TRACEFS} (bpftrace needs it to find tracepoints)");
    } else {
        eprintln!(
            "bench: tracefs is not mounted at {TRACEFS} and mounting it failed; bpftrace's rows \
             will be missing"
        );
    }
}

/// A phase that fails is reported and the others still run; an interrupt stops everything.
fn record(phase: &str, result: Result<()>, failed: &mut Vec<String>) -> Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if interrupted() => Err(e),
        Err(e) => {
            println!("\n**The {phase} phase failed: {e:#}**");
            failed.push(format!("{phase}: {e:#}"));
            Ok(())
        }
    }
}

/// One measured churn run with the agent on: connection rate, agent numbers over the window.
struct OnRun {
    churn: Churn,
    events: f64,
    lost: f64,
    cpu: agent::CpuPercent,
    /// Runs of the agent's programs the kernel skipped (recursion protection).
    misses: u64,
    /// CPU seconds the agent spent reconciling during the run.
    reconcile_seconds: f64,
}

fn misses(agent: &Agent) -> u64 {
    agent.programs().iter().map(|p| p.recursion_misses).sum()
}

fn run_with_agent(
    agent: &Agent,
    ns: &Netns,
    dsts: &[SocketAddr],
    clients: usize,
    until: Until,
    pace: Option<f64>,
) -> Result<OnRun> {
    let m0 = agent.scrape()?;
    let x0 = misses(agent);
    let c0 = agent.cpu_ticks()?;
    let churn = load::churn(ns, dsts, clients, until, pace)?;
    let c1 = agent.cpu_ticks()?;
    let x1 = misses(agent);
    let m1 = agent.scrape()?;
    Ok(OnRun {
        events: m1.get("twmon_events_total", &[]) - m0.get("twmon_events_total", &[]),
        lost: m1.get("twmon_events_lost_total", &[]) - m0.get("twmon_events_lost_total", &[]),
        cpu: c1.since(c0).percent(churn.elapsed.as_secs_f64()),
        misses: x1.saturating_sub(x0),
        reconcile_seconds: m1.get("twmon_reconcile_cpu_seconds_total", &[])
            - m0.get("twmon_reconcile_cpu_seconds_total", &[]),
        churn,
    })
}

/// Churn until the agent has let go of the sockets it seeded at start: the timewait sockets
/// earlier runs left in the namespace end within seconds (reused), and each end of one the
/// programs did not see begin is told to the agent. That is the cost of starting on a busy
/// host, not of running on one; at most 10 s.
fn settle(agent: &Agent, ns: &Netns, dsts: &[SocketAddr], clients: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.scrape()?.get("twmon_seeded_sockets", &[]) > 0.0 && Instant::now() < deadline {
        check_interrupted()?;
        load::churn(ns, dsts, clients, Until::Time(Duration::from_millis(500)), None)?;
    }
    Ok(())
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
    let own: Vec<u32> =
        mine.map(|a| a.programs().into_iter().map(|p| p.id).collect()).unwrap_or_default();
    bpf::programs_named("twmon_state").into_iter().filter(|id| !own.contains(id)).count()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Off,
    Empty,
    On,
}

fn churn_phase(
    twmon: &Path,
    o: &Options,
    work: &Path,
    ns: &Netns,
    dsts: &[SocketAddr],
    f: &mut Findings,
) -> Result<()> {
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
        "| round | order | off conn/s | empty conn/s | on conn/s | empty/off | on/off | events/s \
         to agent | lost | recursion misses | agent CPU % of a core | other twmon instances |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let modes = [Mode::Off, Mode::Empty, Mode::On];
    let (mut offs, mut empties, mut ons, mut ratios, mut empty_ratios, mut cpus) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut lost_total, mut misses_total, mut events_rates) = (0u64, 0u64, vec![]);
    let mut agent_failures: Vec<String> = Vec::new();
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
                    settle(&agent, ns, dsts, o.clients)?;
                    others = others.max(other_instances(Some(&agent)));
                    let run =
                        run_with_agent(&agent, ns, dsts, o.clients, Until::Time(o.round), None);
                    others = others.max(other_instances(Some(&agent)));
                    let stopped = agent.stop();
                    match run.and_then(|r| stopped.map(|()| r)) {
                        Ok(r) => on = Some(r),
                        Err(e) => {
                            check_interrupted()?;
                            agent_failures.push(format!("round {}: {e:#}", r + 1));
                        }
                    }
                }
            }
        }
        let (off, empty) = (off.expect("ran"), empty.expect("ran"));
        let Some(on) = on else {
            println!(
                "| {} | | {:.0} | {:.0} | failed: {} | | | | | | | |",
                r + 1,
                off.rate(),
                empty.rate(),
                agent_failures.last().map(String::as_str).unwrap_or("")
            );
            continue;
        };
        let ratio = on.churn.rate() / off.rate();
        let empty_ratio = empty.rate() / off.rate();
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {:.0} | {} | {} | {:.1} | {} \
             |{}{}{}",
            r + 1,
            order.iter().map(|m| format!("{m:?}").to_lowercase()).collect::<Vec<_>>().join(", "),
            off.rate(),
            empty.rate(),
            on.churn.rate(),
            empty_ratio,
            ratio,
            on.events / on.churn.elapsed.as_secs_f64(),
            on.lost,
            on.misses,
            on.cpu.total(),
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
        cpus.push(on.cpu.total());
        lost_total += on.lost as u64;
        misses_total += on.misses;
        events_rates.push(on.events / on.churn.elapsed.as_secs_f64());
    }
    let mmm = |xs: &[f64], p: usize| {
        format!("{:.*} / {:.*} / {:.*}", p, stats::min(xs), p, stats::median(xs), p, stats::max(xs))
    };
    println!(
        "\nconn/s min / median / max: off {}; empty programs {}; agent on {}",
        mmm(&offs, 0),
        mmm(&empties, 0),
        mmm(&ons, 0)
    );
    println!(
        "ratio to off, min / median / max: empty programs {}; **agent on {}**",
        mmm(&empty_ratios, 3),
        mmm(&ratios, 3)
    );
    println!(
        "agent at the maximum rate: CPU median {:.1} % of a core, median {:.0} events/s, \
         {lost_total} events lost, {misses_total} program runs skipped by the kernel's recursion \
         protection",
        stats::median(&cpus),
        stats::median(&events_rates)
    );
    if !agent_failures.is_empty() {
        println!("**runs with the agent that failed: {}**", agent_failures.join("; "));
    }
    if ratios.is_empty() {
        bail!("no run with the agent completed");
    }
    f.off_rate = Some(stats::median(&offs));
    f.on_rate = Some(stats::median(&ons));
    f.on_max_rate = Some(stats::max(&ons));
    f.ratios = ratios;
    f.empty_ratios = empty_ratios;
    f.lost_at_max = Some(lost_total);
    Ok(())
}

/// bpftrace on one tracepoint: its `count()` one-liner as a widely used tool's floor next to
/// ours, and a reference script that does part of twmon's job the way bcc's tcpstates does.
struct Bpftrace {
    tracepoint: String,
    label: &'static str,
    child: Child,
}

/// Per-socket entry times and per-state duration histograms, as in bcc's tcpstates: the
/// reference the targets name (about 306 ns per event on the machine they were set on).
const REFERENCE_SCRIPT: &str = "tracepoint:sock:inet_sock_set_state /args->protocol == 6/ { if \
                                (@start[args->skaddr]) { @us[args->oldstate] = hist((nsecs - \
                                @start[args->skaddr]) / 1000); delete(@start[args->skaddr]); } if \
                                (args->newstate != 7) { @start[args->skaddr] = nsecs; } }";
const REFERENCE_LABEL: &str = "reference: bpftrace, per-socket entry times and duration histograms";

impl Bpftrace {
    fn start(tracepoint: &str) -> Result<Self> {
        Self::script(
            tracepoint,
            "floor: bpftrace `@c = count()`",
            &format!("tracepoint:{tracepoint} {{ @c = count(); }}"),
        )
    }

    fn script(tracepoint: &str, label: &'static str, program: &str) -> Result<Self> {
        let child = Command::new("bpftrace")
            .args(["-e", program])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Bpftrace { tracepoint: tracepoint.to_string(), label, child })
    }

    /// The run statistics of its one tracepoint program, once it has one.
    fn stats(&self) -> Option<RunStats> {
        bpf::process_progs(self.child.id()).into_iter().map(|p| p.stats).max_by_key(|s| s.run_cnt)
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
const OTHER_PROGRAMS: [&str; 4] =
    ["twmon_retransmit", "twmon_send_reset", "twmon_receive_reset", "twmon_sweep"];

/// Measures the floors' run statistics over one churn run: (before, after, records read) each.
struct FloorWindow {
    churn: Churn,
    runs: Vec<RunStats>,
    read: Vec<u64>,
}

fn floor_window(
    floors: &[bpf::Floor],
    ns: &Netns,
    dsts: &[SocketAddr],
    clients: usize,
    d: Duration,
) -> Result<FloorWindow> {
    let s0: Vec<RunStats> = floors.iter().map(|x| x.stats()).collect();
    let r0: Vec<u64> = floors.iter().map(|x| x.consumed()).collect();
    let churn = load::churn(ns, dsts, clients, Until::Time(d), None)?;
    let s1: Vec<RunStats> = floors.iter().map(|x| x.stats()).collect();
    // One more period of the polling reader, so it has read what was written.
    std::thread::sleep(Duration::from_millis(50));
    let r1: Vec<u64> = floors.iter().map(|x| x.consumed()).collect();
    Ok(FloorWindow {
        churn,
        runs: s1.iter().zip(&s0).map(|(a, b)| a.since(*b)).collect(),
        read: r1.iter().zip(&r0).map(|(a, b)| a - b).collect(),
    })
}

fn cost_row(tracepoint: &str, program: &str, s: RunStats, secs: f64, conns: f64) {
    println!(
        "| {tracepoint} | {program} | {:.0} | {:.1} | {:.0} |",
        s.run_cnt as f64 / secs,
        s.ns_per_run(),
        s.run_time_ns as f64 / conns.max(1.0)
    );
}

fn cost_phase(
    twmon: &Path,
    o: &Options,
    work: &Path,
    ns: &Netns,
    dsts: &[SocketAddr],
    f: &mut Findings,
) -> Result<()> {
    println!(
        "\n## 2. Kernel cost per event (run_time_ns / run_cnt with kernel.bpf_stats_enabled, {:.0} s at maximum churn)",
        o.cost.as_secs_f64()
    );
    check_interrupted()?;
    let _stats = bpf::enable_stats()?;
    let agent = Agent::start(twmon, &[], work)?;
    let mut floors = Vec::new();
    for (_, cat, tp) in COST_TRACEPOINTS {
        for kind in [FloorKind::Empty, FloorKind::Count, FloorKind::SocketMap] {
            if kind != FloorKind::SocketMap || tp == "inet_sock_set_state" {
                floors.push(bpf::attach_floor(kind, cat, tp)?);
            }
        }
    }
    let mut tracers = Vec::new();
    if which("bpftrace") {
        ensure_tracefs();
        for (_, cat, tp) in COST_TRACEPOINTS {
            tracers.push(Bpftrace::start(&format!("{cat}:{tp}"))?);
        }
        tracers.push(Bpftrace::script(
            "sock:inet_sock_set_state",
            REFERENCE_LABEL,
            REFERENCE_SCRIPT,
        )?);
        let deadline = Instant::now() + Duration::from_secs(60);
        while tracers.iter().any(|t| t.stats().is_none())
            && Instant::now() < deadline
            && !interrupted()
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        tracers.retain(|t| {
            let ok = t.stats().is_some();
            if !ok {
                eprintln!(
                    "bench: bpftrace on {} did not attach within 60 s; left out",
                    t.tracepoint
                );
            }
            ok
        });
    } else {
        eprintln!(
            "bench: bpftrace not installed (apt-get install bpftrace); its rows are left out"
        );
    }
    eprintln!("bench: cost warm-up");
    settle(&agent, ns, dsts, o.clients)?;
    load::churn(ns, dsts, o.clients, Until::Time(Duration::from_secs(1)), None)?;
    check_interrupted()?;

    let m0 = agent.scrape()?;
    let p0 = agent.programs();
    let bt0: Vec<RunStats> = tracers.iter().map(|t| t.stats().unwrap_or_default()).collect();
    let c0 = agent.cpu_ticks()?;
    eprintln!("bench: cost measurement");
    let w = floor_window(&floors, ns, dsts, o.clients, o.cost)?;
    let c1 = agent.cpu_ticks()?;
    let bt1: Vec<RunStats> = tracers.iter().map(|t| t.stats().unwrap_or_default()).collect();
    let m1 = agent.scrape()?;
    let p1 = agent.programs();
    let floor_ids: Vec<(FloorKind, String)> =
        floors.iter().map(|x| (x.kind, x.tracepoint.clone())).collect();
    let tracer_ids: Vec<(String, &str)> =
        tracers.iter().map(|t| (t.tracepoint.clone(), t.label)).collect();
    drop(tracers);
    drop(floors);

    // The same programs with the agent paused once the ring buffer is full: every record then
    // fails at reservation, so this is their cost without writing records or waking a reader.
    check_interrupted()?;
    eprintln!("bench: cost with the agent paused");
    agent.pause();
    let paused = (|| -> Result<(Vec<bpf::ProgInfo>, Vec<bpf::ProgInfo>, Churn)> {
        load::churn(ns, dsts, o.clients, Until::Time(Duration::from_secs(2)), None)?;
        let q0 = agent.programs();
        let c = load::churn(
            ns,
            dsts,
            o.clients,
            Until::Time((o.cost / 2).max(Duration::from_secs(3))),
            None,
        )?;
        Ok((q0, agent.programs(), c))
    })();
    agent.resume();
    let (q0, q1, paused_churn) = paused?;
    let m2 = agent.scrape()?;
    agent.stop()?;
    let secs = w.churn.elapsed.as_secs_f64();
    let conns = w.churn.connections as f64;

    println!(
        "{:.0} conn/s with statistics on{}; agent CPU {}",
        w.churn.rate(),
        note_errors(&w.churn),
        c1.since(c0).percent(secs)
    );
    println!("| tracepoint | program | runs/s | ns per run (mean) | ns per connection |");
    println!("|---|---|---|---|---|");
    let (mut twmon_ns_per_conn, mut floor_ns_per_conn) = (0.0, 0.0);
    for (prog, cat, tp) in COST_TRACEPOINTS {
        let tracepoint = format!("{cat}:{tp}");
        let s = m1.program(prog).since(m0.program(prog));
        twmon_ns_per_conn += s.run_time_ns as f64 / conns;
        cost_row(&tracepoint, &format!("**{prog}**"), s, secs, conns);
        if prog == "twmon_state" {
            f.state_ns = Some(s.ns_per_run());
            f.state_changes_per_s = Some(s.run_cnt as f64 / secs);
        }
        for ((kind, on), fl) in floor_ids.iter().zip(&w.runs) {
            if *on != tracepoint {
                continue;
            }
            if *kind == FloorKind::SocketMap {
                f.state_socket_floor_ns = Some(fl.ns_per_run());
            }
            if *kind == FloorKind::Empty {
                floor_ns_per_conn += fl.run_time_ns as f64 / conns;
                if prog == "twmon_state" {
                    f.state_floor_ns = Some(fl.ns_per_run());
                } else {
                    *f.timer_floor_per_conn_ns.get_or_insert(0.0) += fl.run_time_ns as f64 / conns;
                }
            }
            cost_row("", kind.label(), *fl, secs, conns);
        }
        for (i, t) in bt1.iter().enumerate() {
            let (on, label) = &tracer_ids[i];
            if *on == tracepoint {
                let run = t.since(bt0[i]);
                cost_row("", label, run, secs, conns);
                if *label == REFERENCE_LABEL {
                    f.state_reference_ns = Some(run.ns_per_run());
                }
            }
        }
    }
    for prog in OTHER_PROGRAMS {
        let s = m1.program(prog).since(m0.program(prog));
        if prog != "twmon_sweep" {
            twmon_ns_per_conn += s.run_time_ns as f64 / conns;
        }
        let where_ = if prog == "twmon_sweep" { "(test run by the agent)" } else { "tcp:*" };
        cost_row(where_, prog, s, secs, conns);
    }
    let state_runs = m1.program("twmon_state").since(m0.program("twmon_state")).run_cnt as f64;
    let events = m1.get("twmon_events_total", &[]) - m0.get("twmon_events_total", &[]);
    let lost = m1.get("twmon_events_lost_total", &[]) - m0.get("twmon_events_lost_total", &[]);
    println!(
        "\nper connection: {:.1} state changes, {:.1} events to the agent; kernel time of all \
         twmon programs {:.0} ns per connection vs {:.0} ns for empty programs on the same three \
         tracepoints",
        state_runs / conns,
        events / conns,
        twmon_ns_per_conn,
        floor_ns_per_conn
    );
    println!(
        "state changes {:.0}/s, events {:.0}/s, events lost {lost}; the sweep visits the {:.0} \
         timewait sockets the agent follows, in a hash map of {} buckets",
        state_runs / secs,
        events / secs,
        m1.timewait(),
        262144
    );
    f.cost_lost = Some(lost as u64);
    f.per_conn_ns = Some((twmon_ns_per_conn, floor_ns_per_conn));
    f.changes_per_conn = Some(state_runs / conns);

    let kernel_name = |p: &str| p[..p.len().min(15)].to_string();
    let find = |v: &[bpf::ProgInfo], p: &str| {
        v.iter().find(|x| x.name == kernel_name(p)).cloned().unwrap_or_default()
    };
    println!(
        "\n| program | ns per run, agent reading | recursion misses | ns per run, agent paused and \
         ring buffer full ({:.0} conn/s; no record written, nobody woken) |",
        paused_churn.rate()
    );
    println!("|---|---|---|---|");
    for (prog, _, _) in COST_TRACEPOINTS {
        let (a, b) = (find(&p1, prog), find(&p0, prog));
        let paused = find(&q1, prog).stats.since(find(&q0, prog).stats);
        println!(
            "| {prog} | {:.1} | {} | {:.1} |",
            a.stats.since(b.stats).ns_per_run(),
            a.recursion_misses.saturating_sub(b.recursion_misses),
            paused.ns_per_run()
        );
        if prog == "twmon_state" {
            f.state_paused_ns = Some(paused.ns_per_run());
        }
    }
    println!(
        "records dropped while paused (twmon_events_lost_total): {:.0}",
        m2.get("twmon_events_lost_total", &[]) - m1.get("twmon_events_lost_total", &[])
    );

    // What one ring-buffer record costs by itself, with and without a wake-up, on every state
    // change; the agent is stopped so only these readers compete.
    check_interrupted()?;
    let ring = [FloorKind::Empty, FloorKind::RingWakeup, FloorKind::RingNoWakeup]
        .into_iter()
        .map(|k| bpf::attach_floor(k, "sock", "inet_sock_set_state"))
        .collect::<Result<Vec<_>>>()?;
    let d = (o.cost / 2).max(Duration::from_secs(3));
    eprintln!("bench: ring-buffer cost");
    let w = floor_window(&ring, ns, dsts, o.clients, d)?;
    println!(
        "\nring-buffer records, 72 bytes each, one per state change, agent stopped ({:.0} s, {:.0} conn/s):",
        d.as_secs_f64(),
        w.churn.rate()
    );
    println!("| tracepoint | program | runs/s | ns per run (mean) | ns per connection |");
    println!("|---|---|---|---|---|");
    let (secs, conns) = (w.churn.elapsed.as_secs_f64(), w.churn.connections as f64);
    for (fl, (s, read)) in ring.iter().zip(w.runs.iter().zip(&w.read)) {
        let label = match fl.kind {
            FloorKind::Empty => fl.kind.label().to_string(),
            _ => format!("{} ({read} of {} records read)", fl.kind.label(), s.run_cnt),
        };
        cost_row("sock:inet_sock_set_state", &label, *s, secs, conns);
        match fl.kind {
            FloorKind::RingWakeup => f.ring_wakeup_ns = Some(s.ns_per_run()),
            FloorKind::RingNoWakeup => f.ring_nowakeup_ns = Some(s.ns_per_run()),
            _ => {}
        }
    }
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

fn cpu_and_scrape_phase(
    twmon: &Path,
    o: &Options,
    work: &Path,
    ns: &Netns,
    dsts: &[SocketAddr],
    f: &mut Findings,
) -> Result<()> {
    check_interrupted()?;
    let agent = Agent::start(twmon, &[], work)?;
    let fresh = agent.memory()?;
    if o.wants("scrape") {
        let first = agent.scrape()?;
        println!(
            "\n## 3. /metrics scrape latency, fresh agent ({} scrapes one at a time, {} bytes, {} samples, {:.0} timewait sockets followed)",
            o.scrapes,
            first.bytes,
            first.series(),
            first.timewait()
        );
        let (med, p99) = time_scrapes(&agent, o.scrapes).report()?;
        f.scrape_fresh_ms = Some((med, p99, first.timewait()));
    }
    if o.wants("cpu") {
        // Pace at the target if the machine reaches it with the agent on, else at a rate it
        // reaches with room to spare; CPU at the maximum rate is in the churn table.
        let on_max = f.on_rate.unwrap_or(f64::INFINITY);
        let pace = if on_max >= o.rate * 1.05 {
            o.rate
        } else {
            ((on_max * 0.8) / 500.0).floor().max(1.0) * 500.0
        };
        println!(
            "\n## 4. Agent CPU and memory at a paced {pace:.0} conn/s ({:.0} s){}",
            o.cpu.as_secs_f64(),
            if pace < o.rate {
                format!(
                    "; the machine does not reach {:.0} conn/s with the agent on (median \
                     {on_max:.0}), so 80 % of that",
                    o.rate
                )
            } else {
                String::new()
            }
        );
        eprintln!("bench: cpu warm-up");
        settle(&agent, ns, dsts, o.clients)?;
        load::churn(ns, dsts, o.clients, Until::Time(Duration::from_secs(2)), Some(pace))?;
        eprintln!("bench: cpu measurement");
        let run = run_with_agent(&agent, ns, dsts, o.clients, Until::Time(o.cpu), Some(pace))?;
        let mem = agent.memory()?;
        let after = agent.scrape()?;
        let tw = after.timewait();
        let reconcile_s = after.get("twmon_reconcile_duration_seconds", &[]);
        let reconciling = run.reconcile_seconds / run.churn.elapsed.as_secs_f64() * 100.0;
        let c0 = agent.cpu_ticks()?;
        let idle = Duration::from_secs(5);
        std::thread::sleep(idle);
        let idle_cpu = agent.cpu_ticks()?.since(c0).percent(idle.as_secs_f64());
        let rate = run.churn.rate();
        println!(
            "achieved {rate:.0} conn/s{}, {:.0} events/s to the agent, {} lost",
            note_errors(&run.churn),
            run.events / run.churn.elapsed.as_secs_f64(),
            run.lost
        );
        println!(
            "agent CPU (utime+stime) {} = {:.3} % per 1000 conn/s; with no load afterwards {} \
             (the timewait sweep every second over the {tw:.0} sockets it follows)",
            run.cpu,
            run.cpu.total() / rate * 1000.0,
            idle_cpu
        );
        // What the agent spaces its reconciles by (monitor's reconcile_wait, with the default
        // reconcile.max_cpu of 0.5 % of a core).
        let reconcile_every = (reconcile_s * 199.0).max(10.0);
        let reconcile_avg = reconcile_s / (reconcile_every + reconcile_s) * 100.0;
        let events_cpu = (run.cpu.total() - reconciling).max(0.0);
        println!(
            "of which reconciling (sock_diag of every namespace, \
             twmon_reconcile_cpu_seconds_total) {reconciling:.2} % in this window: the last \
             reconcile took {:.0} ms ({tw:.0} timewait sockets), the next one follows \
             {reconcile_every:.0} s later, {reconcile_avg:.2} % of a core on average; everything \
             else {events_cpu:.2} % = {:.3} % per 1000 conn/s",
            reconcile_s * 1000.0,
            events_cpu / rate * 1000.0
        );
        println!(
            "agent memory: RSS {:.1} MiB at start, {:.1} MiB after (anon {:.1}, file {:.1}, of \
             which mmap()ed ring buffer {:.1}); peak (VmHWM) {:.1} MiB",
            mib(fresh.rss),
            mib(mem.rss),
            mib(mem.anon),
            mib(mem.file),
            mib(mem.bpf_maps),
            mib(mem.hwm)
        );
        f.cpu = Some((run.cpu.total(), rate, idle_cpu.total()));
        f.cpu_parts = Some((events_cpu, reconcile_avg));
    }
    if o.wants("scrape") {
        check_interrupted()?;
        let first = agent.scrape()?;
        println!(
            "\n## 5. /metrics scrape latency after the load ({} scrapes, {} bytes, {} samples, {:.0} timewait sockets followed)",
            o.scrapes,
            first.bytes,
            first.series(),
            first.timewait()
        );
        let (med, p99) = time_scrapes(&agent, o.scrapes).report()?;
        f.scrape_loaded_ms = Some((med, p99, first.timewait()));
    }
    agent.stop()
}

/// Latencies of sequential scrapes and the agent's own collect times (ms); `failure` says why
/// the series ended early.
struct ScrapeTimes {
    ms: Vec<f64>,
    collect: Vec<f64>,
    failure: Option<anyhow::Error>,
}

impl ScrapeTimes {
    /// Prints the summary line; an early end becomes the error of the phase.
    fn report(self) -> Result<(f64, f64)> {
        let (med, p99) = (stats::median(&self.ms), stats::percentile(&self.ms, 99.0));
        println!(
            "latency over {} scrapes: median {med:.2} ms, p99 {p99:.2} ms, max {:.2} ms; of which \
             collecting (twmon_scrape_collect_seconds, includes the timewait sweep) median {:.2} \
             ms",
            self.ms.len(),
            stats::max(&self.ms),
            stats::median(&self.collect)
        );
        match self.failure {
            Some(e) => {
                println!("**{e:#}**");
                Err(e)
            }
            None => Ok((med, p99)),
        }
    }
}

/// Times `n` sequential scrapes, stopping at the first that fails.
fn time_scrapes(agent: &Agent, n: usize) -> ScrapeTimes {
    let mut t =
        ScrapeTimes { ms: Vec::with_capacity(n), collect: Vec::with_capacity(n), failure: None };
    for i in 0..n {
        if interrupted() {
            t.failure = Some(anyhow::anyhow!("interrupted"));
            break;
        }
        let start = Instant::now();
        match agent::http_get(agent.addr, "/metrics") {
            Ok((200, body)) => {
                t.ms.push(start.elapsed().as_secs_f64() * 1e3);
                // Reports the previous scrape's collect time; close enough over many scrapes.
                t.collect.push(Scrape::parse(&body).map_or(f64::NAN, |s| s.collect_ms()));
            }
            Ok((status, _)) => {
                t.failure =
                    Some(anyhow::anyhow!("scrape {} of {n}: /metrics answered {status}", i + 1));
                break;
            }
            Err(e) => {
                t.failure = Some(e.context(format!(
                    "scrape {} of {n} got no answer: the agent stopped answering",
                    i + 1
                )));
                break;
            }
        }
    }
    t
}

fn memory_phase(twmon: &Path, o: &Options, work: &Path, f: &mut Findings) -> Result<()> {
    println!("\n## 7. Memory with {} timewait sockets alive", o.timewait);
    check_interrupted()?;
    let ns = Netns::new("bench-tw");
    // No reuse: every connection leaves a timewait socket for 60 s. Eight server ports give
    // 8 x 64512 four-tuples, so connect() finds a free port quickly.
    ns.sysctls(&[
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/ipv4/tcp_tw_reuse", "0"),
        ("net/ipv4/tcp_max_tw_buckets", "262144"),
    ]);
    let clients = 8;
    let servers = Servers::start(&ns, 8, 1)?;
    let _stats = bpf::enable_stats()?;
    let agent = Agent::start(twmon, &[], work)?;
    // The same agent with glibc returning freed heap at once: how much of the RSS is memory
    // the allocator keeps after start-up.
    let trimmed = Agent::start_with_env(
        twmon,
        &[],
        &[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")],
        work,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let before = agent.memory()?;
    let before_trimmed = trimmed.memory()?;
    let maps_before = agent.maps();
    let m0 = agent.scrape()?;
    eprintln!("bench: creating {} timewait sockets", o.timewait);
    // Timewait sockets live 60 s: create them well within that.
    let churn = load::churn(
        &ns,
        &servers.addrs,
        clients,
        Until::Count(o.timewait, Duration::from_secs(50)),
        None,
    )?;
    // One sweep interval, so silent FIN_WAIT2 -> TIME_WAIT changes are settled.
    std::thread::sleep(Duration::from_millis(1500));
    let in_ns = ns.sockstat_tw();
    let m1 = agent.scrape()?;
    let followed = m1.timewait();
    let after = agent.memory()?;
    let after_trimmed = trimmed.memory()?;
    let maps = agent.maps();
    println!(
        "created {} connections in {:.1} s ({:.0}/s){}; the namespace holds {in_ns} timewait \
         sockets (/proc/net/sockstat tw); the agent follows {followed:.0} (twmon_sockets time_wait \
         + fin_wait2, all namespaces)",
        churn.connections,
        churn.elapsed.as_secs_f64(),
        churn.rate(),
        note_errors(&churn)
    );
    println!(
        "| agent | RSS before the sockets | RSS with them | anon | file | of which ring buffer | \
         peak (VmHWM) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, m, b) in [
        ("as built", after, before),
        ("GLIBC_TUNABLES=glibc.malloc.trim_threshold=0", after_trimmed, before_trimmed),
    ] {
        println!(
            "| {label} | {:.1} MiB | {:.1} MiB | {:.1} | {:.1} | {:.1} | {:.1} MiB |",
            mib(b.rss),
            mib(m.rss),
            mib(m.anon),
            mib(m.file),
            mib(m.bpf_maps),
            mib(m.hwm)
        );
    }
    println!("\n| map | type | max entries | kernel memory before | with the sockets |");
    println!("|---|---|---|---|---|");
    let mut total = (0u64, 0u64);
    for map in &maps {
        let b = maps_before.iter().find(|x| x.id == map.id).map(|x| x.memlock).unwrap_or(0);
        total.0 += b;
        total.1 += map.memlock;
        if map.memlock < 4096 && b < 4096 {
            continue;
        }
        println!(
            "| {} | {} | {} | {:.2} MiB | {:.2} MiB |",
            map.name,
            map_type(map.map_type),
            map.max_entries,
            b as f64 / (1 << 20) as f64,
            map.memlock as f64 / (1 << 20) as f64
        );
    }
    println!(
        "| total (with the small arrays not listed) | | | {:.2} MiB | {:.2} MiB |",
        total.0 as f64 / (1 << 20) as f64,
        total.1 as f64 / (1 << 20) as f64
    );
    let sweep = m1.program("twmon_sweep").since(m0.program("twmon_sweep"));
    println!(
        "\ntimewait sweep (twmon_sweep, every second and on every scrape): {:.1} ms per run over the sockets followed",
        sweep.ns_per_run() / 1e6
    );
    // The check of every timewait entry runs at reconciles (every 10 s, spaced out when they are
    // slow), so the window may hold none.
    let all = m1.program("twmon_sweep_all").since(m0.program("twmon_sweep_all"));
    if all.run_cnt > 0 {
        println!(
            "check of every timewait entry (twmon_sweep_all, at each reconcile): {:.1} ms per run \
             ({} runs while the sockets were made; {followed:.0} entries at the end)",
            all.ns_per_run() / 1e6,
            all.run_cnt
        );
    } else {
        println!("check of every timewait entry (twmon_sweep_all): no reconcile in this window");
    }
    print!("/metrics with these sockets: ");
    let scrapes = time_scrapes(&agent, 50.min(o.scrapes));
    let scrape_median_ms = stats::median(&scrapes.ms);
    let scraped = scrapes.report();
    f.tw = Some(TwFindings {
        rss_before_mib: mib(before.rss),
        rss_mib: mib(after.rss),
        hwm_mib: mib(after.hwm),
        trimmed_rss_mib: mib(after_trimmed.rss),
        sockets: in_ns,
        maps_mib: total.1 as f64 / (1 << 20) as f64,
        sweep_ms: sweep.ns_per_run() / 1e6,
        scrape_median_ms,
    });
    scraped?;
    drop(trimmed);
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

/// A target's verdict where a measured floor may show it out of reach: missed, but bounded,
/// when even `floor` (what any design that keeps the numbers exact must do, measured in the
/// same run) misses it.
fn verdict_bounded(met: bool, floor_misses: bool) -> &'static str {
    match (met, floor_misses) {
        (true, _) => "met",
        (false, true) => "missed, bounded: the floor misses it too",
        (false, false) => "**missed**",
    }
}

/// What an exact design pays per connection at least, from the floors of the same run: on each
/// state change a per-socket hash map (its entry time, or its removal at CLOSE) and one more
/// program run (a twin, an empty program's cost), which keeps a state change nested in the
/// program from being lost; the empty programs on the timer tracepoints. It follows no
/// timewait socket, counts nothing and times nothing: a lower bound.
fn exact_floor_per_conn(f: &Findings) -> Option<f64> {
    Some(
        f.changes_per_conn? * (f.state_socket_floor_ns? + f.state_floor_ns?)
            + f.timer_floor_per_conn_ns?,
    )
}

/// Timewait sockets per namespace in the namespaces phase.
const TIMEWAIT_PER_NAMESPACE: usize = 20;

/// A reconcile reads every namespace through sock_diag, and a scrape reads each one's TcpExt
/// and sysctls: both against the number of namespaces, with the size of the host's established
/// hash table, which every sock_diag dump walks whatever the namespace holds.
fn namespaces_phase(twmon: &Path, o: &Options, work: &Path) -> Result<()> {
    println!(
        "\n## 8. {} namespaces with {TIMEWAIT_PER_NAMESPACE} timewait sockets each",
        o.namespaces
    );
    check_interrupted()?;
    let spaces: Vec<Netns> =
        (0..o.namespaces).map(|i| Netns::new(&format!("bench-many{i}"))).collect();
    let made = Instant::now();
    for ns in &spaces {
        ns.run(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            for _ in 0..TIMEWAIT_PER_NAMESPACE {
                let c = std::net::TcpStream::connect(l.local_addr()?)?;
                let (mut s, _) = l.accept()?;
                // The client closes first and keeps the timewait socket.
                drop(c);
                std::io::Read::read(&mut s, &mut [0u8; 1])?;
            }
            Ok::<_, std::io::Error>(())
        })?;
    }
    let config = work.join("namespaces.toml");
    fs::write(&config, "[reconcile]\ninterval = \"1s\"\nmax_cpu = 1.0\n")?;
    let agent = Agent::start(twmon, &["--config.file", &config.to_string_lossy()], work)?;
    // Timewait sockets live 60 s: measure well within that.
    let (mut reconcile_ms, mut scrape_ms, mut last) = (Vec::new(), Vec::new(), f64::NAN);
    while made.elapsed() < Duration::from_secs(45) && reconcile_ms.len() < 10 {
        check_interrupted()?;
        let t = Instant::now();
        let m = agent.scrape()?;
        scrape_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // Each reconcile sets a new duration: a changed value is a new reconcile.
        let r = m.get("twmon_reconcile_duration_seconds", &[]);
        if r != last && m.get("twmon_netns_sockets", &[("state", "time_wait")]) > 0.0 {
            reconcile_ms.push(r * 1e3);
            last = r;
        }
        std::thread::sleep(Duration::from_millis(600));
    }
    agent.stop()?;
    if reconcile_ms.is_empty() {
        bail!("no reconcile finished within 45 s");
    }
    let n = o.namespaces as f64;
    let buckets = fs::read_to_string("/proc/sys/net/ipv4/tcp_ehash_entries")
        .unwrap_or_else(|_| "unknown".into());
    println!(
        "the host's established hash table: {} buckets (net.ipv4.tcp_ehash_entries), walked by \
         sock_diag once per address family of each namespace that holds sockets of it",
        buckets.trim()
    );
    println!("| | median | per namespace | rounds |");
    println!("|---|---|---|---|");
    let (r, s) = (stats::median(&reconcile_ms), stats::median(&scrape_ms));
    println!(
        "| reconcile (sock_diag, sysctls, breakdowns) | {r:.0} ms | {:.2} ms | {} |",
        r / n,
        reconcile_ms.len()
    );
    println!(
        "| scrape (with TcpExt and sysctls of each) | {s:.1} ms | {:.3} ms | {} |",
        s / n,
        scrape_ms.len()
    );
    Ok(())
}

fn summary(o: &Options, f: &Findings, failed: &[String]) {
    let mut s = String::new();
    let _ =
        writeln!(s, "\n## Targets (this machine)\n| target | measured | verdict |\n|---|---|---|");
    if !f.ratios.is_empty() {
        let (med, empty) = (stats::median(&f.ratios), stats::median(&f.empty_ratios));
        // The churn keeps every CPU busy: what the exact design's floor spends above the empty
        // programs per connection, at twmon's rate, is the share of the machine it takes.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let floor = exact_floor_per_conn(f).zip(f.per_conn_ns).zip(f.on_rate).map(
            |((floor, (_, empty_ns)), rate)| {
                let share = (floor - empty_ns) * 1e-9 * rate / cpus;
                (share, empty * (1.0 - share))
            },
        );
        let _ = writeln!(
            s,
            "| churn with the agent on >= 0.97 of off, median of >= 8 rounds at the maximum rate | \
             on/off median {med:.3} over {} rounds (min {:.3}, max {:.3}); empty programs on the \
             same tracepoints {empty:.3}, so against them twmon reads {:.3}{} | {} |",
            f.ratios.len(),
            stats::min(&f.ratios),
            stats::max(&f.ratios),
            med / empty,
            floor
                .map(|(share, ratio)| format!(
                    "; an exact design's floor would take {:.1} % of the machine at this rate, \
                     so it reads at most {ratio:.3}",
                    share * 100.0
                ))
                .unwrap_or_default(),
            verdict_bounded(
                med >= 0.97 && f.ratios.len() >= 8,
                empty < 0.97 || floor.is_some_and(|(_, ratio)| ratio < 0.97)
            )
        );
    }
    for (label, ratios) in
        [("bulk transfer", &f.bulk_ratios), ("keep-alive request/response", &f.rr_ratios)]
    {
        if ratios.is_empty() {
            continue;
        }
        let med = stats::median(ratios);
        // The traffic keeps at least one core busy: twmon's CPU time under it, in shares of one
        // core, is at most the share of the work it can take away.
        let by_cpu = f.steady_cpu_pct.map(|c| 1.0 - c / 100.0);
        let met = med >= 0.99 && ratios.len() >= 8;
        let _ = writeln!(
            s,
            "| {label} with the agent on >= 0.99 of off, median of >= 8 rounds (1500-byte MTU) | \
             on/off median {med:.3} over {} rounds (min {:.3}, max {:.3}); twmon's CPU time under \
             this traffic {}, which bounds the ratio at {} | {} |",
            ratios.len(),
            stats::min(ratios),
            stats::max(ratios),
            f.steady_cpu_pct
                .map(|c| format!("{c:.2} % of one core"))
                .unwrap_or_else(|| "not measured".into()),
            by_cpu.map(|r| format!(">= {r:.4}")).unwrap_or_else(|| "?".into()),
            match by_cpu {
                Some(r) if !met && r >= 0.99 =>
                    "met by CPU time; the rounds do not resolve 1 % on this machine",
                _ => verdict(met),
            }
        );
    }
    if let Some((twmon, empty)) = f.per_conn_ns {
        let floor = exact_floor_per_conn(f).unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| kernel time of all programs per connection <= 2x empty programs' | {twmon:.0} ns \
             against {empty:.0} ns: {:.2}x; the floor of an exact design (a per-socket hash map \
             and a twin on each state change, empty timer programs, no TIME_WAIT followed) \
             {floor:.0} ns: {:.2}x | {} |",
            twmon / empty,
            floor / empty,
            verdict_bounded(twmon <= 2.0 * empty, floor > 2.0 * empty)
        );
    }
    if let (Some(ns), Some(floor)) = (f.state_ns, f.state_floor_ns) {
        let socket = f.state_socket_floor_ns.unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| per state change (program and twin) <= 3x the empty program | twmon_state {ns:.0} \
             ns against {floor:.0} ns: {:.2}x; {:.0} ns when it writes no records; a program that \
             only keeps each socket's entry time in a hash map {socket:.0} ns ({:.2}x), with a \
             twin {:.2}x; {}one ring-buffer record {:.0} ns with a wake-up, {:.0} ns without | {} \
             |",
            ns / floor,
            f.state_paused_ns.unwrap_or(f64::NAN),
            socket / floor,
            (socket + floor) / floor,
            f.state_reference_ns
                .map(|r| format!("the bpftrace reference script {r:.0} ns; "))
                .unwrap_or_default(),
            f.ring_wakeup_ns.unwrap_or(f64::NAN),
            f.ring_nowakeup_ns.unwrap_or(f64::NAN),
            verdict_bounded(ns <= 3.0 * floor, socket + floor > 3.0 * floor)
        );
    }
    for (prog, extra, rate) in &f.unrelated_timer_extra_ns {
        let _ = writeln!(
            s,
            "| {prog} on an unrelated timer <= the empty program's time + 10 ns | {extra:+.1} ns \
             at {rate:.0} runs/s | {} |",
            verdict(*extra <= 10.0)
        );
    }
    if let (Some((cpu, rate, idle)), Some((events_cpu, reconcile_avg))) = (f.cpu, f.cpu_parts) {
        // Long-run average: everything but reconciles scales with the rate; reconciles are
        // spaced to their average share, whatever the window happened to hold.
        let scaled = events_cpu / rate * o.rate.max(rate) + reconcile_avg;
        let _ = writeln!(
            s,
            "| agent CPU <= 1 % of a core at {:.0} conn/s | {cpu:.2} % in a {rate:.0} conn/s \
             window ({events_cpu:.2} % without reconciles); on average about {scaled:.1} % at \
             {:.0} conn/s with reconciles at {reconcile_avg:.2} %; {idle:.2} % with no load | {} |",
            o.rate,
            o.rate.max(rate),
            verdict(scaled <= 1.0)
        );
    }
    if f.cost_lost.is_some() || f.lost_at_max.is_some() {
        let lost = f.cost_lost.unwrap_or(0) + f.lost_at_max.unwrap_or(0);
        // The churn runs count no state changes themselves: connections/s times the state
        // changes per connection that the cost phase counted (10 for this load).
        let churn_rate = f.on_max_rate.map(|r| r * f.changes_per_conn.unwrap_or(10.0));
        let best = churn_rate.unwrap_or(0.0).max(f.state_changes_per_s.unwrap_or(0.0));
        let _ = writeln!(
            s,
            "| zero lost events at 100000 state changes/s | {lost} lost; fastest run with the \
             agent on about {best:.0} state changes/s (churn runs {}, cost window {}) | {} |",
            churn_rate.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "not run".into()),
            f.state_changes_per_s.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "not run".into()),
            if lost > 0 {
                "**missed**"
            } else if best >= 100_000.0 {
                "met"
            } else {
                "none lost, but 100000/s not reached with the agent on"
            }
        );
    }
    if let Some(t) = &f.tw {
        let _ = writeln!(
            s,
            "| agent RSS <= 32 MiB with {} timewait sockets | RSS {:.1} MiB with {} alive ({:.1} \
             MiB before them, peak {:.1} MiB; {:.1} MiB when glibc returns freed heap); kernel \
             maps {:.1} MiB | {} |",
            o.timewait,
            t.rss_mib,
            t.sockets,
            t.rss_before_mib,
            t.hwm_mib,
            t.trimmed_rss_mib,
            t.maps_mib,
            verdict(t.rss_mib <= 32.0 && t.sockets as f64 >= 0.99 * o.timewait as f64)
        );
    }
    for (label, v) in [("fresh agent", f.scrape_fresh_ms), ("after the load", f.scrape_loaded_ms)] {
        if let Some((med, p99, tw)) = v {
            let _ = writeln!(
                s,
                "| scrape < 10 ms ({label}, {tw:.0} timewait sockets followed) | median {med:.2} \
                 ms, p99 {p99:.2} ms | {} |",
                verdict(p99 < 10.0)
            );
        }
    }
    if let Some(t) = &f.tw {
        let _ = writeln!(
            s,
            "| scrape < 10 ms ({} timewait sockets followed) | median {:.2} ms; the sweep alone \
             {:.1} ms | {} |",
            t.sockets,
            t.scrape_median_ms,
            t.sweep_ms,
            verdict(t.scrape_median_ms < 10.0)
        );
    }
    for phase in failed {
        let _ = writeln!(s, "| (phase failed) | {phase} | not measured |");
    }
    print!("{s}");
}
