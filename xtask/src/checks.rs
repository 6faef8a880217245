//! Checks of what ships beside the binary (dashboards, alert rules, deployment files), run by
//! `cargo xtask test` after the cargo tests, as root. Each check drives the real tool: promtool,
//! a Prometheus server, systemd-analyze, kubectl's kustomize, kubernetes-validate, hadolint, and
//! the agent itself. Tools a fresh machine lacks are installed first (see `tools`).
//!
//! Every check prints one line; all of them run even when one fails, then the run fails with
//! the failures repeated at the end.
mod dashboard;
mod deploy;
mod e2e;
mod tools;
mod util;
mod workload;

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Result, bail};

use self::{dashboard::Dashboard, tools::Tools, util::first_line};

/// The outcome of each check, printed as it goes.
#[derive(Default)]
pub struct Report {
    passed: usize,
    failed: Vec<(String, String)>,
}

impl Report {
    /// Runs one check; `f` returns the numbers to print on success.
    pub fn check(&mut self, name: &str, f: impl FnOnce() -> Result<String>) {
        let start = Instant::now();
        match f() {
            Ok(detail) => {
                self.passed += 1;
                println!("check {name}: ok ({:.1} s) {detail}", start.elapsed().as_secs_f64());
            }
            Err(e) => {
                let why = format!("{e:#}");
                println!(
                    "check {name}: FAILED ({:.1} s)\n  {}",
                    start.elapsed().as_secs_f64(),
                    why.replace('\n', "\n  ")
                );
                self.failed.push((name.to_string(), why));
            }
        }
    }
}

fn twmon() -> PathBuf {
    crate::root().join("target/release/twmon")
}

pub fn run() -> Result<()> {
    let start = Instant::now();
    println!("checks: dashboards, rules, deployment files and an end-to-end run");
    let tools = Tools::ensure()?;
    let root = crate::root();
    let mut report = Report::default();
    let rules = root.join("deploy/prometheus/twmon.rules.yml");

    report.check("promtool check rules", || {
        let out = util::must(Command::new("promtool").args(["check", "rules"]).arg(&rules))?;
        Ok(out.lines().filter(|l| l.contains("SUCCESS")).map(str::trim).collect::<Vec<_>>().join("; "))
    });
    report.check("promtool test rules", || {
        let tests: Vec<PathBuf> = std::fs::read_dir(root.join("deploy/prometheus/tests"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yml"))
            .collect();
        if tests.is_empty() {
            bail!("no tests in deploy/prometheus/tests");
        }
        let out = util::must(Command::new("promtool").args(["test", "rules"]).args(&tests))?;
        let cases = tests
            .iter()
            .map(|t| std::fs::read_to_string(t).map(|s| s.matches("- eval_time:").count()))
            .sum::<Result<usize, _>>()?;
        let ok = out.matches("SUCCESS").count();
        if ok != tests.len() {
            bail!("{ok} of {} files passed:\n{out}", tests.len());
        }
        Ok(format!("{} files, {cases} alert assertions, all SUCCESS", tests.len()))
    });

    let mut lint = None;
    report.check("dashboard lint", || {
        let l = Dashboard::load(&root.join("dashboards/twmon.json"))?.lint()?;
        let planned = l.queries.iter().filter(|q| !q.may_be_empty().is_empty()).count();
        let detail = format!(
            "{} panels, {} queries ({planned} on metrics that may be empty): units, $__rate_interval, \
             ${{datasource}}, $job and $instance everywhere",
            l.panels,
            l.queries.len()
        );
        lint = Some(l);
        Ok(detail)
    });
    report.check("grafana provisioning files", || deploy::grafana_provisioning(&tools));

    deploy::run(&mut report, &tools, &twmon());

    if !twmon().exists() {
        report.check("end to end", || bail!("{} is missing: cargo build --release -p monitor", twmon().display()));
    } else {
        let queries = lint.map(|l| l.queries).unwrap_or_default();
        if let Err(e) = e2e::run(&mut report, &tools, &twmon(), &queries) {
            report.check("end to end", || Err(e));
        }
    }

    println!(
        "checks: {} passed, {} failed in {:.0} s",
        report.passed,
        report.failed.len(),
        start.elapsed().as_secs_f64()
    );
    if !report.failed.is_empty() {
        let names: Vec<String> = report.failed.iter().map(|(n, why)| format!("{n}: {}", first_line(why))).collect();
        bail!("{} check(s) failed:\n  {}", report.failed.len(), names.join("\n  "));
    }
    Ok(())
}
