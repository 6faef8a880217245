//! Phase `steady`: what twmon costs traffic that closes nothing. A bulk transfer and keep-alive
//! request/response on a namespace loopback with a 1500-byte MTU run with the agent off, with
//! empty programs on its tracepoints, and on, in an order that rotates every round; then one
//! window with run-time statistics gives each timer program's cost per event, every one of them
//! an unrelated timer (no timewait socket is made), next to an empty program's in the same window.
use std::{path::Path, time::Duration};

use anyhow::{Result, bail};
use testkit::netns::Netns;

use super::{
    Findings, Mode, TRACEPOINTS,
    agent::Agent,
    bpf::{self, FloorKind},
    check_interrupted,
    open::{self, Server, Workload},
    stats,
};

const WORKLOADS: [Workload; 2] = [Workload::Bulk, Workload::RequestResponse];
/// Bulk streams and request/response connections.
const BULK_STREAMS: usize = 2;
const RR_CONNECTIONS: usize = 4;

fn clients(w: Workload) -> usize {
    match w {
        Workload::Bulk => BULK_STREAMS,
        Workload::RequestResponse => RR_CONNECTIONS,
    }
}

/// The rates of both workloads in one mode of one round.
fn both(ns: &Netns, servers: &[Server], d: Duration) -> Result<[f64; 2]> {
    let mut out = [0.0; 2];
    for (i, (w, s)) in WORKLOADS.iter().zip(servers).enumerate() {
        let (n, elapsed) = open::run(ns, s.addr, *w, clients(*w), d)?;
        out[i] = w.rate(n, elapsed);
    }
    Ok(out)
}

pub(super) fn steady_phase(
    twmon: &Path,
    rounds: usize,
    round: Duration,
    cost: Duration,
    work: &Path,
    f: &mut Findings,
) -> Result<()> {
    println!(
        "\n## 6. Traffic that closes nothing: {BULK_STREAMS}-stream bulk transfer and \
         {RR_CONNECTIONS}-connection keep-alive request/response ({MESSAGE} bytes each way) on \
         loopback with a 1500-byte MTU; agent off, empty programs, on ({rounds} rounds, {:.0} s \
         per workload and mode, order rotated every round)",
        round.as_secs_f64(),
        MESSAGE = 64,
    );
    let ns = Netns::new("bench-steady");
    ns.set_mtu(1500);
    let servers = WORKLOADS.iter().map(|w| Server::start(&ns, *w)).collect::<Result<Vec<_>>>()?;
    eprintln!("bench: steady warm-up");
    both(&ns, &servers, Duration::from_secs(1))?;
    println!(
        "| round | order | bulk Gbit/s off / empty / on | requests/s off / empty / on | bulk \
         on/off | requests on/off | bulk empty/off | requests empty/off |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let modes = [Mode::Off, Mode::Empty, Mode::On];
    let mut ratios: [Vec<f64>; 2] = [vec![], vec![]];
    let mut empty_ratios: [Vec<f64>; 2] = [vec![], vec![]];
    for r in 0..rounds {
        check_interrupted()?;
        let order: Vec<Mode> = (0..3).map(|i| modes[(i + r) % 3]).collect();
        let mut rates = [[0.0; 2]; 3];
        for mode in &order {
            eprintln!("bench: steady round {} {mode:?}", r + 1);
            rates[*mode as usize] = match mode {
                Mode::Off => both(&ns, &servers, round)?,
                Mode::Empty => {
                    let _floors = TRACEPOINTS
                        .iter()
                        .map(|(c, t)| bpf::attach_floor(FloorKind::Empty, c, t))
                        .collect::<Result<Vec<_>>>()?;
                    both(&ns, &servers, round)?
                }
                Mode::On => {
                    let agent = Agent::start(twmon, &[], work)?;
                    let run = both(&ns, &servers, round);
                    agent.stop()?;
                    run?
                }
            };
        }
        let [off, empty, on] = rates;
        for i in 0..2 {
            ratios[i].push(on[i] / off[i]);
            empty_ratios[i].push(empty[i] / off[i]);
        }
        println!(
            "| {} | {} | {:.2} / {:.2} / {:.2} | {:.0} / {:.0} / {:.0} | {:.3} | {:.3} | {:.3} | \
             {:.3} |",
            r + 1,
            order.iter().map(|m| format!("{m:?}").to_lowercase()).collect::<Vec<_>>().join(", "),
            off[0],
            empty[0],
            on[0],
            off[1],
            empty[1],
            on[1],
            on[0] / off[0],
            on[1] / off[1],
            empty[0] / off[0],
            empty[1] / off[1],
        );
    }
    for (i, w) in WORKLOADS.iter().enumerate() {
        println!(
            "{}: on/off min / median / max {:.3} / {:.3} / {:.3}; empty programs/off median {:.3}",
            w.label(),
            stats::min(&ratios[i]),
            stats::median(&ratios[i]),
            stats::max(&ratios[i]),
            stats::median(&empty_ratios[i])
        );
    }
    f.bulk_ratios = ratios[0].clone();
    f.rr_ratios = ratios[1].clone();

    // Per-event cost of the timer programs on unrelated timers: the agent and empty programs
    // side by side, both workloads, run-time statistics on.
    check_interrupted()?;
    // An empty program attached before the agent and one after it: a tracepoint runs its programs
    // in the order attached, and the later ones find what the earlier ones read in the cache.
    // Their difference shows what this measurement can resolve.
    let _stats = bpf::enable_stats()?;
    let empties = || {
        TRACEPOINTS[..3]
            .iter()
            .map(|(c, t)| bpf::attach_floor(FloorKind::Empty, c, t))
            .collect::<Result<Vec<_>>>()
    };
    let before = empties()?;
    let agent = Agent::start(twmon, &[], work)?;
    let after = empties()?;
    let floors: Vec<&bpf::Floor> = before.iter().chain(&after).collect();
    let d = (cost / 2).max(Duration::from_secs(3));
    eprintln!("bench: steady cost");
    let (m0, fl0, c0) =
        (agent.scrape()?, floors.iter().map(|x| x.stats()).collect::<Vec<_>>(), agent.cpu_ticks()?);
    let mut secs = 0.0;
    for (w, s) in WORKLOADS.iter().zip(&servers) {
        secs += open::run(&ns, s.addr, *w, clients(*w), d)?.1.as_secs_f64();
    }
    let (m1, fl1, c1) =
        (agent.scrape()?, floors.iter().map(|x| x.stats()).collect::<Vec<_>>(), agent.cpu_ticks()?);
    agent.stop()?;
    let agent_cpu = c1.since(c0).percent(secs).total();
    println!(
        "\nper event, both workloads ({:.0} s), run-time statistics on (timer events here are all \
         unrelated timers: no timewait socket was made):",
        secs
    );
    println!(
        "| tracepoint | twmon program | runs/s | twmon ns per run | empty program ns per run, \
         attached before / after twmon | twmon - empty (mean of both) | empty after - empty before \
         |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut added_ns_per_s = 0.0;
    for (i, (prog, (cat, tp))) in ["twmon_state", "twmon_timer_start", "twmon_timer_cancel"]
        .iter()
        .zip(&TRACEPOINTS[..3])
        .enumerate()
    {
        let s = m1.program(prog).since(m0.program(prog));
        let (e0, e1) =
            (fl1[i].since(fl0[i]).ns_per_run(), fl1[i + 3].since(fl0[i + 3]).ns_per_run());
        let empty = (e0 + e1) / 2.0;
        let extra = s.ns_per_run() - empty;
        if s.run_cnt > 0 {
            added_ns_per_s += (s.run_time_ns as f64 - empty * s.run_cnt as f64) / secs;
        }
        println!(
            "| {cat}:{tp} | {prog} | {:.0} | {:.1} | {e0:.1} / {e1:.1} | {extra:+.1} | {:+.1} |",
            s.run_cnt as f64 / secs,
            s.ns_per_run(),
            e1 - e0
        );
        if i > 0 {
            if s.run_cnt == 0 {
                bail!("{prog} did not run under traffic that starts timers all the time");
            }
            f.unrelated_timer_extra_ns.push((prog.to_string(), extra, s.run_cnt as f64 / secs));
        }
    }
    // What twmon takes from this traffic in CPU time, which bounds what it can take from its
    // throughput more finely than the on/off ratios, whose spread here is several percent.
    let kernel_pct = added_ns_per_s / 1e7;
    println!(
        "\ntwmon's CPU time under this traffic: its programs {kernel_pct:.3} % of one core above \
         empty programs', the agent {agent_cpu:.2} %; together {:.2} % of one core, at most that \
         share of the machine's throughput",
        kernel_pct + agent_cpu
    );
    f.steady_cpu_pct = Some(kernel_pct + agent_cpu);
    Ok(())
}
