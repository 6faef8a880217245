//! End to end: a real agent, a real Prometheus scraping it every second with the shipped rules
//! loaded, a real TCP workload, then every dashboard query through Prometheus' HTTP API.
use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{
    Report,
    dashboard::{self, Query},
    tools::Tools,
    util::{self, Proc, free_port, http_get, url_encode, wait_for},
    workload::{self, Plan, Summary},
};

/// One scrape of the agent, parsed.
pub type Scrape = testkit::exposition::Metrics;

/// The sum of the series of `name` with `labels`; 0 before any (a counter of a label set that
/// has not happened yet).
fn total(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.sum(name, labels).unwrap_or(0.0)
}

fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics")?;
    ensure!(status == 200, "GET /metrics answered {status}: {body}");
    Scrape::parse(&body).map_err(anyhow::Error::msg)
}

struct Prometheus {
    addr: SocketAddr,
}

impl Prometheus {
    fn api(&self, path_and_query: &str) -> Result<Value> {
        let (status, body) = http_get(self.addr, path_and_query)?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("{path_and_query}: answered {status}: {body}"))?;
        if v["status"] != "success" {
            bail!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("error"),
                v["error"].as_str().unwrap_or(&body)
            );
        }
        Ok(v["data"].clone())
    }

    /// Instant query; returns the result vector.
    fn query(&self, q: &str) -> Result<Vec<Value>> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(q)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Range query over the last `span` with `step`, as Grafana sends a panel's query.
    fn query_range(&self, q: &str, span: Duration, step: Duration) -> Result<Vec<Value>> {
        let end = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        let start = end - span.as_secs_f64();
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={}",
            url_encode(q),
            step.as_secs_f64()
        ))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

/// Prometheus on a port free when picked. The host's own connections may take that port before
/// Prometheus binds it (seen once, with every other test running beside this one): then again
/// on another.
fn start_prometheus(dir: &Path) -> Result<(Proc, SocketAddr)> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut prom = Proc::spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn"),
            &dir.join(format!("prometheus-{attempt}.log")),
        )?;
        let ready = wait_for("prometheus /-/ready", Duration::from_secs(30), || {
            prom.alive()?;
            Ok(http_get(addr, "/-/ready").map(|(c, _)| c == 200).unwrap_or(false))
        });
        match ready {
            Ok(()) => return Ok((prom, addr)),
            Err(_) if attempt < ATTEMPTS && prom.log_tail(5).contains("address already in use") => {
                println!(
                    "  prometheus lost port {addr} to another socket before it bound it; another port"
                );
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn run(report: &mut Report, tools: &Tools, twmon: &Path, queries: &[Query]) -> Result<()> {
    let dir = tools.scratch("e2e")?;

    // A short leak threshold, so that CLOSE_WAIT sockets held for the length of the workload
    // are named as leaked at the reconcile 10 s in.
    let config = dir.join("twmon.toml");
    std::fs::write(&config, "[close_wait]\nleak_threshold = \"3s\"\n")?;
    let mut agent = Proc::spawn(
        "twmon",
        Command::new(twmon)
            .args(["--web.listen-address", "127.0.0.1:0", "--log.level", "info", "--config.file"])
            .arg(&config),
        &dir.join("twmon.log"),
    )?;
    let agent_addr = util::wait_healthy(&mut agent, Duration::from_secs(30))?;

    let rules = crate::root().join("deploy/prometheus/twmon.rules.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: twmon\n    static_configs:\n      - targets: ['{agent_addr}']\n",
        rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let (mut prom, prom_addr) = start_prometheus(&dir)?;
    let p = Prometheus { addr: prom_addr };
    wait_for("first scrape of the agent", Duration::from_secs(20), || {
        Ok(!p.query(r#"up{job="twmon"} == 1"#)?.is_empty())
    })?;
    println!(
        "  agent on {agent_addr} (pid {}), prometheus on {prom_addr} (pid {})",
        agent.pid(),
        prom.pid()
    );

    let before = scrape(agent_addr)?;
    let started = Instant::now();
    // Leaked sockets are attributed to processes through /proc/PID/fd and the namespace of
    // /proc/PID/ns/net: these are held by this process, in its own (the host's) namespace.
    let leaked = workload::hold_close_wait(LEAKED);
    let summary = workload::run(Plan { rounds: 24, pause: Duration::from_millis(500) });
    println!(
        "workload: {} connections in {:.1} s: {} closed by the client, {} by the server, {} reset, \
         {} held in CLOSE_WAIT, {} through CLOSING, {} with FINs retransmitted from LAST_ACK, {} \
         TIME_WAIT reused",
        summary.total(),
        started.elapsed().as_secs_f64(),
        summary.client_closed,
        summary.server_closed,
        summary.reset,
        summary.held_close_wait,
        summary.closing,
        summary.last_ack_retransmit,
        summary.reused,
    );
    println!(
        "  the workload namespace's own counters: {}",
        summary.kernel.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    );
    // The workload's namespace is gone: the kernel kills its timewait sockets, the agent settles
    // them after its grace period.
    let killed_before = total(&before, "twmon_timewait_ends_total", &[("reason", "killed")]);
    let killed_wanted = f64::from(summary.client_closed / 2);
    let waited = Instant::now();
    wait_for(
        "TIME_WAIT sockets of the torn-down namespace ending",
        Duration::from_secs(40),
        || {
            let now = scrape(agent_addr).with_context(|| {
                format!(
                    "scraping the agent (its threads wait in: {})",
                    util::thread_waits(agent.pid())
                )
            })?;
            Ok(total(&now, "twmon_timewait_ends_total", &[("reason", "killed")]) - killed_before
                >= killed_wanted)
        },
    )?;
    println!("  namespace teardown seen after {:.1} s", waited.elapsed().as_secs_f64());
    // Two more scrapes, so that Prometheus has the end state too.
    thread::sleep(Duration::from_millis(2500));
    drop(leaked);
    agent.alive()?;
    prom.alive()?;
    let after = scrape(agent_addr)?;

    report.check("promtool check metrics (live scrape)", || check_metrics(&after.text));
    report.check("agent counted the workload", || counts(&before, &after, &summary));
    report.check("CLOSE_WAIT leak named", || leak(&p));
    report.check("rules evaluate on live data", || rules_healthy(&p));
    report.check("dashboard variables", || variables(&p, &agent_addr.to_string()));
    report.check("dashboard queries (Prometheus HTTP API)", || {
        panel_queries(&p, queries, &agent_addr.to_string())
    });

    drop(prom);
    report.check("agent stops cleanly on SIGTERM", || {
        let status = agent.stop()?;
        ensure!(status.success(), "twmon exited with {status}; log:\n{}", agent.log_tail(20));
        Ok(format!("{status}"))
    });
    Ok(())
}

fn check_metrics(text: &str) -> Result<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().expect("piped"), text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Clean means exit 0 and no lint finding at all.
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics ({}):\n{}",
        out.status,
        said.trim_end()
    );
    let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let samples = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    Ok(format!("{families} metric families, {samples} samples, no findings"))
}

/// The agent's counters moved by at least what the workload did (other programs on the host
/// can only add to them).
fn counts(before: &Scrape, after: &Scrape, s: &Summary) -> Result<String> {
    let d = |name: &str, labels: &[(&str, &str)]| {
        total(after, name, labels) - total(before, name, labels)
    };
    let rows: Vec<(&str, f64, u32)> = vec![
        (
            "established -> fin_wait1",
            d("twmon_state_transitions_total", &[("from", "established"), ("to", "fin_wait1")]),
            s.client_closed
                + s.server_closed
                + s.held_close_wait
                + s.closing
                + s.last_ack_retransmit,
        ),
        (
            "close_wait -> last_ack",
            d("twmon_state_transitions_total", &[("from", "close_wait"), ("to", "last_ack")]),
            s.client_closed + s.server_closed + s.held_close_wait + s.last_ack_retransmit,
        ),
        (
            "fin_wait1 -> closing",
            d("twmon_state_transitions_total", &[("from", "fin_wait1"), ("to", "closing")]),
            s.closing,
        ),
        // SO_LINGER 0 moves the socket to CLOSE before the RST goes out.
        ("resets sent (any state)", d("twmon_resets_total", &[("direction", "sent")]), s.reset),
        (
            "resets received in established",
            d("twmon_resets_total", &[("direction", "received"), ("state", "established")]),
            s.reset,
        ),
        (
            "FIN retransmits in fin_wait1",
            d("twmon_retransmits_total", &[("state", "fin_wait1")]),
            s.closing,
        ),
        (
            "FIN retransmits in closing",
            d("twmon_retransmits_total", &[("state", "closing")]),
            s.closing,
        ),
        (
            "FIN retransmits in last_ack",
            d("twmon_retransmits_total", &[("state", "last_ack")]),
            s.last_ack_retransmit,
        ),
        ("TIME_WAIT re-arms", d("twmon_timewait_rearms_total", &[]), s.last_ack_retransmit),
        // Not all: between 2 and 6 of 5 takeovers have been counted as reuse here (the kernel's
        // TWRecycled is printed with the workload), the rest as killed.
        ("TIME_WAIT ended by reuse", d("twmon_timewait_ends_total", &[("reason", "reuse")]), 1),
        (
            "TIME_WAIT killed",
            d("twmon_timewait_ends_total", &[("reason", "killed")]),
            s.client_closed / 2,
        ),
        (
            "closing durations observed",
            d("twmon_state_duration_seconds_count", &[("state", "closing")]),
            s.closing,
        ),
        (
            "time_wait durations observed",
            d("twmon_state_duration_seconds_count", &[("state", "time_wait")]),
            s.client_closed / 2,
        ),
    ];
    let mut lines = Vec::new();
    let mut short = Vec::new();
    for (what, got, want) in &rows {
        lines.push(format!("{what} +{got} (at least {want})"));
        if *got < f64::from(*want) {
            short.push(format!("{what}: +{got}, want at least {want}"));
        }
    }
    if !short.is_empty() {
        let families = [
            "twmon_state_transitions_total",
            "twmon_retransmits_total",
            "twmon_resets_total",
            "twmon_timewait_ends_total",
        ];
        let changed: Vec<String> = families
            .iter()
            .map(|f| format!("{f}: {}", after.changed(before, f).join(" ")))
            .collect();
        bail!(
            "{}\n  all: {}\n  changed: {}",
            short.join("\n  "),
            lines.join("; "),
            changed.join("\n    ")
        );
    }
    Ok(lines.join("; "))
}

/// CLOSE_WAIT sockets this process holds through the workload.
const LEAKED: usize = 5;

/// The agent names this process as holding the leaked sockets, with its pid and command.
fn leak(p: &Prometheus) -> Result<String> {
    let pid = std::process::id();
    let q = format!(
        r#"max_over_time(twmon_close_wait_leaked_sockets{{job="twmon", pid="{pid}"}}[5m])"#
    );
    let r = p.query(&q)?;
    let got: f64 =
        r.first().and_then(|v| v["value"][1].as_str()).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    if got < LEAKED as f64 {
        let all = p.query("max_over_time(twmon_close_wait_leaked_sockets[5m])")?;
        bail!(
            "{got} leaked sockets attributed to pid {pid}, want at least {LEAKED}; all leak \
             series: {all:?}"
        );
    }
    let m = &r[0]["metric"];
    Ok(format!(
        "{got} sockets, pid {pid}, comm {}, netns {}",
        m["comm"].as_str().unwrap_or("?"),
        m["netns"].as_str().unwrap_or("?")
    ))
}

fn rules_healthy(p: &Prometheus) -> Result<String> {
    let data = p.api("/api/v1/rules")?;
    let mut n = 0;
    let mut bad = Vec::new();
    for g in data["groups"].as_array().cloned().unwrap_or_default() {
        for r in g["rules"].as_array().cloned().unwrap_or_default() {
            n += 1;
            let name = r["name"].as_str().unwrap_or("?");
            if r["health"] != "ok" {
                bad.push(format!("{name}: health {} {}", r["health"], r["lastError"]));
            }
        }
    }
    ensure!(n > 0, "Prometheus loaded no rules");
    ensure!(bad.is_empty(), "{}", bad.join("\n  "));
    let firing = p.query(r#"ALERTS{alertstate="firing"}"#)?;
    let names: Vec<String> = firing
        .iter()
        .map(|a| a["metric"]["alertname"].as_str().unwrap_or("?").to_string())
        .collect();
    ensure!(
        !names
            .iter()
            .any(|n| n == "TwmonDown" || n == "TwmonAbsent" || n == "TwmonProgramsDetached"),
        "agent alerts firing while the agent runs: {names:?}"
    );
    let recorded = p.query(r#"count({__name__=~"instance.*:twmon_.*|job_state:twmon_.*"})"#)?;
    let series = recorded.first().and_then(|r| r["value"][1].as_str()).unwrap_or("0").to_string();
    Ok(format!("{n} rules healthy, {series} recorded series, alerts firing: {names:?}"))
}

fn variables(p: &Prometheus, instance: &str) -> Result<String> {
    // label_values(twmon_build_info, job) and label_values(twmon_build_info{job=~"$job"}, instance)
    let jobs =
        p.api(&format!("/api/v1/label/job/values?match[]={}", url_encode("twmon_build_info")))?;
    ensure!(jobs.as_array().is_some_and(|a| a.iter().any(|j| j == "twmon")), "job values: {jobs}");
    let inst = p.api(&format!(
        "/api/v1/label/instance/values?match[]={}",
        url_encode(r#"twmon_build_info{job=~"twmon"}"#)
    ))?;
    ensure!(
        inst.as_array().is_some_and(|a| a.iter().any(|i| i == instance)),
        "instance values: {inst}"
    );
    Ok(format!("job = {jobs}, instance = {inst}"))
}

fn panel_queries(p: &Prometheus, queries: &[Query], instance: &str) -> Result<String> {
    let mut failed = Vec::new();
    let (mut with_data, mut planned_empty) = (0, 0);
    for q in queries {
        let expr = dashboard::substitute(&q.expr, "twmon", instance, "1m");
        let result = if q.instant {
            p.query(&expr)
        } else {
            p.query_range(&expr, Duration::from_secs(90), Duration::from_secs(2))
        };
        let planned = q.may_be_empty();
        let at = format!("panel {} '{}' {}", q.panel_id, q.panel, q.ref_id);
        match result {
            Err(e) => failed.push(format!("{at}: {e:#}\n      {expr}")),
            Ok(r) if r.is_empty() && planned.is_empty() => {
                failed.push(format!("{at}: no data\n      {expr}"))
            }
            Ok(r) if r.is_empty() => {
                planned_empty += 1;
                println!("    {at}: no data (may be empty: {})", planned.join(", "));
            }
            Ok(r) => {
                with_data += 1;
                println!("    {at}: {} series", r.len());
            }
        }
    }
    ensure!(
        failed.is_empty(),
        "{} of {} queries failed:\n  {}",
        failed.len(),
        queries.len(),
        failed.join("\n  ")
    );
    let allowed: Vec<&str> = dashboard::MAY_BE_EMPTY.iter().map(|(m, _)| *m).collect();
    let allowed = if allowed.is_empty() {
        "none may be".to_string()
    } else {
        format!("allowed only on {}", allowed.join(", "))
    };
    Ok(format!(
        "{} queries: {with_data} returned data, {planned_empty} empty ({allowed})",
        queries.len()
    ))
}
