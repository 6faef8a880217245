//! Checks of what ships beside the binary (dashboards, alert rules, deployment files), run as
//! `#[test]`s (`xtask/tests/checks.rs`) by `cargo xtask test`, as root. Each check drives the
//! real tool: promtool, a Prometheus server, systemd-analyze, kubectl's kustomize,
//! kubernetes-validate, hadolint, and the agent itself. Tools a fresh machine lacks are
//! installed first (see `tools`).
//!
//! Within a group (the deployment files, the end-to-end run) every check prints one line; all
//! of them run even when one fails, then the test fails with the failures repeated at the end.
pub mod dashboard;
pub mod deploy;
pub mod e2e;
pub mod tools;
pub mod util;
mod workload;

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Result, bail};

use self::{dashboard::Dashboard, tools::Tools};

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

/// The agent the checks run: the release build `cargo xtask test` makes first.
pub fn twmon() -> PathBuf {
    crate::root().join("target/release/twmon")
}

impl Report {
    /// Fails with every failed check, by name and first line, after all have run.
    pub fn assert_passed(self) {
        if !self.failed.is_empty() {
            let names: Vec<String> =
                self.failed.iter().map(|(n, why)| format!("{n}: {why}")).collect();
            panic!("{} check(s) failed:\n  {}", self.failed.len(), names.join("\n  "));
        }
    }
}

/// The tools the checks drive, installed once per process (`apt-get` must not run twice at
/// once).
pub fn tools() -> &'static Tools {
    static TOOLS: std::sync::OnceLock<Result<Tools, String>> = std::sync::OnceLock::new();
    match TOOLS.get_or_init(|| Tools::ensure().map_err(|e| format!("{e:#}"))) {
        Ok(t) => t,
        Err(e) => panic!("installing what the checks need: {e}"),
    }
}

/// The promtool checks of the alert and recording rules: their syntax, and their unit tests.
pub fn rules_check() -> Result<String> {
    let rules = crate::root().join("deploy/prometheus/twmon.rules.yml");
    let out = util::must(Command::new("promtool").args(["check", "rules"]).arg(&rules))?;
    Ok(out.lines().filter(|l| l.contains("SUCCESS")).map(str::trim).collect::<Vec<_>>().join("; "))
}

pub fn rules_test() -> Result<String> {
    let tests: Vec<PathBuf> = std::fs::read_dir(crate::root().join("deploy/prometheus/tests"))?
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
}

/// The dashboard's lint, and its queries for the end-to-end run.
pub fn dashboard_lint() -> Result<(String, Vec<dashboard::Query>)> {
    let l = Dashboard::load(&crate::root().join("dashboards/twmon.json"))?.lint()?;
    let planned = l.queries.iter().filter(|q| !q.may_be_empty().is_empty()).count();
    let detail = format!(
        "{} panels, {} queries ({planned} on metrics that may be empty): units, $__rate_interval, \
         ${{datasource}}, $job and $instance everywhere",
        l.panels,
        l.queries.len()
    );
    Ok((detail, l.queries))
}
