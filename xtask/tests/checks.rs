//! What ships beside the binary, checked with the real tools: the alert rules (promtool), the
//! dashboard, Grafana's provisioning, the systemd unit, the Kubernetes manifests and the
//! Dockerfile, and an end-to-end run of the agent scraped by a real Prometheus with the rules
//! loaded and every dashboard query asked. Root, because the tools are installed when missing
//! and the agent loads kernel programs; a test without root fails and says so, it never skips.
use std::sync::Mutex;

use xtask::checks::{self, Report, e2e, tools, twmon};

fn as_root() {
    assert!(
        xtask::is_root(),
        "the checks install tools and load kernel programs: run as root (cargo xtask test)"
    );
}

/// The checks that run the agent, one at a time: each reads what its own agent counts.
static AGENT: Mutex<()> = Mutex::new(());

fn ok(name: &str, result: anyhow::Result<String>) {
    match result {
        Ok(detail) => println!("check {name}: ok {detail}"),
        Err(e) => panic!("check {name}: {e:#}"),
    }
}

fn agent_built() {
    assert!(twmon().exists(), "{} is missing: cargo build --release -p monitor", twmon().display());
}

#[test]
fn rules_pass_promtool_check() {
    as_root();
    tools();
    ok("promtool check rules", checks::rules_check());
}

#[test]
fn rules_pass_their_unit_tests() {
    as_root();
    tools();
    ok("promtool test rules", checks::rules_test());
}

#[test]
fn dashboard_passes_lint() {
    ok("dashboard lint", checks::dashboard_lint().map(|(detail, _)| detail));
}

#[test]
fn grafana_provisioning_loads() {
    as_root();
    ok("grafana provisioning files", checks::deploy::grafana_provisioning(tools()));
}

#[test]
fn systemd_unit_runs_the_agent_sandboxed() {
    as_root();
    agent_built();
    let _one = AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let mut report = Report::default();
    checks::deploy::systemd(&mut report, tools(), &twmon());
    report.assert_passed();
}

#[test]
fn kubernetes_manifests_and_dockerfile() {
    as_root();
    let mut report = Report::default();
    checks::deploy::kubernetes(&mut report, tools());
    report.assert_passed();
}

#[test]
fn end_to_end_with_prometheus_and_every_dashboard_query() {
    as_root();
    agent_built();
    let (_, queries) = checks::dashboard_lint().expect("the dashboard's queries");
    let _one = AGENT.lock().unwrap_or_else(|e| e.into_inner());
    let mut report = Report::default();
    if let Err(e) = e2e::run(&mut report, tools(), &twmon(), &queries) {
        report.check("end to end", || Err(e));
    }
    report.assert_passed();
}
