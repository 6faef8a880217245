//! The HTTP endpoints of a real agent, a real `promtool check metrics` on its scrape, and the
//! messages a user gets for bad input.
mod common;

use std::{net::TcpListener, process::Command};

use common::{Agent, Netns};

#[test]
fn metrics_healthz_and_index() {
    let ns = Netns::new("http");
    let agent = Agent::start(&ns);
    let (status, body) = agent.get("/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = agent.get("/").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("href=\"metrics\"") && body.contains("href=\"healthz\""), "{body}");
    let (status, body) = agent.get("/nope").unwrap();
    assert_eq!(status, 404, "{body}");

    let m = agent.metrics();
    // twmon's own, and the process metrics every exporter has under their standard names.
    for line in m.text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            line.starts_with("twmon_") || line.starts_with("process_"),
            "metric outside the twmon_ namespace: {line}"
        );
    }
    assert_eq!(m.get("twmon_bpf_programs_attached", &[]), 6.0);
    for state in ["fin_wait1", "fin_wait2", "close_wait", "closing", "last_ack", "time_wait"] {
        assert!(m.text.contains(&format!("twmon_sockets{{state=\"{state}\"}} 0")), "{state} gauge missing");
    }
    assert!(m.text.contains("twmon_build_info{"), "build info missing");

    // Debian's promtool lints the exposition exactly as Prometheus will parse it.
    let mut child =
        Command::new("promtool").args(["check", "metrics"]).stdin(std::process::Stdio::piped()).output_with(&m.text);
    assert!(child.0.success(), "promtool check metrics failed:\n{}", child.1);
    child.1.clear();

    // SIGTERM detaches and exits 0.
    let status = agent.stop();
    assert!(status.success(), "twmon exited with {status} on SIGTERM");
}

/// SIGINT detaches everything: once the agent exited 0, none of its programs is left in the
/// kernel (an attached program is held by its link, which only the agent holds).
#[test]
fn sigint_detaches_and_exits_0() {
    let ns = Netns::new("sigint");
    let agent = Agent::start(&ns);
    let ids = agent.program_ids();
    // Six tracepoints (the state one with a twin) and the three programs the agent runs
    // itself: the sweeps of orphans and of every timewait entry, and the CLOSE_WAIT scan.
    assert_eq!(ids.len(), 10, "program ids {ids:?}");
    assert!(ids.iter().all(|id| common::program_exists(*id)));
    let status = agent.signal(libc::SIGINT);
    assert!(status.success(), "twmon exited with {status} on SIGINT");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let left = loop {
        let left: Vec<u32> = ids.iter().copied().filter(|id| common::program_exists(*id)).collect();
        if left.is_empty() || std::time::Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(left, Vec::<u32>::new(), "programs still in the kernel after exit");
}

trait OutputWith {
    fn output_with(&mut self, stdin: &str) -> (std::process::ExitStatus, String);
}

impl OutputWith for Command {
    fn output_with(&mut self, stdin: &str) -> (std::process::ExitStatus, String) {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status, text)
    }
}

fn twmon(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twmon")).args(args).output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_flag_says_what_is_wrong() {
    let (status, err) = twmon(&["--web.listen-adress", ":9"]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--web.listen-address"), "clap suggests the right flag: {err}");
    let (status, err) = twmon(&["--timewait.sweep-interval", "soon"]);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("is not a duration such as \"500ms\""), "{err}");
}

#[test]
fn port_in_use_fails_before_attaching() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (status, err) = twmon(&["--web.listen-address", &addr]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")) && err.contains("--web.listen-address"), "{err}");
    assert!(!err.contains("kernel programs attached"), "attached before failing: {err}");
}

/// Runs the agent as nobody with exactly `caps` (setpriv's syntax, e.g. ",+bpf,+syslog"): it
/// must fail; returns its stderr.
fn as_nobody_with(caps: &str) -> String {
    let caps = format!("-all{caps}");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([format!("--inh-caps={caps}"), format!("--ambient-caps={caps}"), format!("--bounding-set={caps}")])
        .arg(env!("CARGO_BIN_EXE_twmon"))
        .args(["--web.listen-address", "127.0.0.1:0"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

#[test]
fn unprivileged_user_is_told_to_use_root() {
    let err = as_nobody_with("");
    assert!(err.contains("sudo") || err.contains("root"), "no hint to run as root: {err}");
    assert!(err.contains("lacks CAP_BPF, CAP_PERFMON, CAP_SYSLOG"), "missing capabilities not named: {err}");
}

/// Without one of the three capabilities, the agent names that one.
#[test]
fn missing_capability_is_named() {
    for (without, keep) in
        [("CAP_PERFMON", ",+bpf,+syslog"), ("CAP_BPF", ",+perfmon,+syslog"), ("CAP_SYSLOG", ",+bpf,+perfmon")]
    {
        let err = as_nobody_with(keep);
        assert!(err.contains(&format!("lacks {without}:")), "without {without}: {err}");
    }
}
