//! The HTTP endpoints of a real agent, a real `promtool check metrics` on its scrape, and the
//! messages a user gets for bad input.
mod common;

use std::{net::TcpListener, process::Command};

use common::{Agent, Netns};
use testkit::workload::{Close, Server};

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
        assert!(
            m.text.contains(&format!("twmon_sockets{{state=\"{state}\"}} 0")),
            "{state} gauge missing"
        );
    }
    assert!(m.text.contains("twmon_build_info{"), "build info missing");

    // Debian's promtool lints the exposition exactly as Prometheus will parse it.
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with(&m.text);
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
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("--web.listen-address"),
        "{err}"
    );
    assert!(!err.contains("kernel programs attached"), "attached before failing: {err}");
}

/// Runs the agent as nobody with exactly `caps` (setpriv's syntax, e.g. ",+bpf,+syslog"): it
/// must fail; returns its stderr.
fn as_nobody_with(caps: &str) -> String {
    let caps = format!("-all{caps}");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([
            format!("--inh-caps={caps}"),
            format!("--ambient-caps={caps}"),
            format!("--bounding-set={caps}"),
        ])
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
    assert!(
        err.contains("lacks CAP_BPF, CAP_PERFMON, CAP_SYSLOG"),
        "missing capabilities not named: {err}"
    );
}

/// Without one of the three capabilities, the agent names that one.
#[test]
fn missing_capability_is_named() {
    for (without, keep) in [
        ("CAP_PERFMON", ",+bpf,+syslog"),
        ("CAP_BPF", ",+perfmon,+syslog"),
        ("CAP_SYSLOG", ",+bpf,+perfmon"),
    ] {
        let err = as_nobody_with(keep);
        assert!(err.contains(&format!("lacks {without}:")), "without {without}: {err}");
    }
}

/// The shape of the exposition: every metric's name, type, HELP text and label names, compared
/// with `tests/golden/metrics.txt`, so that no metric changes name, type, meaning or labels
/// unnoticed (values are the other tests' business). After a change that is meant, write the
/// file again with `TWMON_GOLDEN=update cargo test --release --test endpoints golden`, and review
/// its diff.
#[test]
fn metrics_match_the_golden_file() {
    let golden_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/metrics.txt");
    let ns = Netns::new("golden");
    let config = Agent::config_file(
        "golden",
        &format!("{}[close_wait]\nleak_threshold = \"1s\"\n", common::FAST_RECONCILE),
    );
    let agent = Agent::start_with(&ns, &["--config.file", &config]);
    // Traffic that gives every family series: closes by either side, a reset, durations,
    // TIME_WAIT for the reconcile's breakdowns, and a CLOSE_WAIT held past the leak threshold.
    let _held = ns.run(|| {
        let server = Server::bind("127.0.0.1:0");
        for how in [Close::ClientFirst, Close::ServerFirst, Close::Reset] {
            how.run(server.connect());
            how.run(server.connect());
        }
        let held = Close::Held.run(server.connect());
        (server, held)
    });
    let expected = std::fs::read_to_string(golden_path).unwrap_or_default();
    let wanted: Vec<&str> =
        expected.lines().filter_map(|l| l.strip_prefix("# ")?.split_whitespace().next()).collect();
    if std::env::var("TWMON_GOLDEN").as_deref() == Ok("update") {
        // Until the shape has stood still for 5 s: the leak and the breakdowns come with
        // reconciles, a second apart.
        let (mut got, mut since) = (String::new(), std::time::Instant::now());
        while since.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let now = shape(&agent.metrics().text);
            if now != got {
                (got, since) = (now, std::time::Instant::now());
            }
        }
        std::fs::write(golden_path, &got).unwrap();
        return;
    }
    // Families appear with their first series: wait until the golden file's all have.
    let m = agent.wait_for(std::time::Duration::from_secs(30), |m| {
        let now = shape(&m.text);
        wanted.iter().all(|name| now.contains(&format!("# {name} ")))
    });
    let got = shape(&m.text);
    let diff: Vec<String> = {
        let (e, g): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), got.lines().collect());
        e.iter()
            .filter(|l| !g.contains(l))
            .map(|l| format!("- {l}"))
            .chain(g.iter().filter(|l| !e.contains(l)).map(|l| format!("+ {l}")))
            .collect()
    };
    assert!(
        diff.is_empty(),
        "the exposition differs from {golden_path} (- expected, + scraped). If the change is \
         meant, write the file again: TWMON_GOLDEN=update cargo test --release --test endpoints \
         golden\n{}",
        diff.join("\n")
    );
}

/// A text exposition reduced to its shape: per family `# name type help`, then one line per
/// distinct sample name and label-name set, `name{label,...}`; sorted.
fn shape(text: &str) -> String {
    use std::collections::{BTreeMap, BTreeSet};
    let mut families: BTreeMap<String, (String, String, BTreeSet<String>)> = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_string()).or_default().1 = help.to_string();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            families.entry(name.to_string()).or_default().0 = kind.to_string();
        } else if !line.is_empty() && !line.starts_with('#') {
            samples.push(line.to_string());
        }
    }
    for line in samples {
        let series = line.rsplit_once(' ').map_or(line.as_str(), |(s, _)| s);
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let mut names = label_names(labels);
        names.sort();
        // The longest family name the sample's is, or starts with before a suffix (`_bucket`).
        let family = families
            .keys()
            .filter(|f| {
                name == f.as_str()
                    || name.strip_prefix(f.as_str()).is_some_and(|s| s.starts_with('_'))
            })
            .max_by_key(|f| f.len())
            .cloned()
            .unwrap_or_else(|| panic!("sample without a family: {line}"));
        families.get_mut(&family).unwrap().2.insert(format!("{name}{{{}}}", names.join(",")));
    }
    families
        .iter()
        .map(|(name, (kind, help, samples))| {
            let lines: Vec<&str> = samples.iter().map(String::as_str).collect();
            format!("# {name} {kind} {help}\n{}\n", lines.join("\n"))
        })
        .collect()
}

/// The label names of `k="v",k2="v2"}`: values may hold commas, equals signs and escaped quotes.
fn label_names(mut rest: &str) -> Vec<&str> {
    let mut names = Vec::new();
    while let Some((name, value)) = rest.split_once("=\"") {
        names.push(name.trim_start_matches(','));
        let mut escaped = false;
        let end = value
            .char_indices()
            .find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })
            .map_or(value.len(), |(i, _)| i + 1);
        rest = &value[end..];
    }
    names
}

/// `twmon top` in a real terminal (tmux): the sockets it shows equal `ss` in the namespace, a
/// key changes the view, and `q` quits with 0.
#[test]
fn top_shows_what_ss_shows() {
    use std::time::Duration;
    let ns = Netns::new("top");
    let agent = Agent::start(&ns);
    // TIME_WAIT on the clients' side, and CLOSE_WAIT held by the server.
    let _held = ns.run(|| {
        let server = Server::bind("127.0.0.1:0");
        let held: Vec<_> = (0..10)
            .filter_map(|i| {
                if i < 7 { Close::ClientFirst } else { Close::Held }.run(server.connect())
            })
            .collect();
        (server, held)
    });
    let session = format!("twmon-top-{}", std::process::id());
    let exit = std::env::temp_dir().join(format!("{session}.exit"));
    let _ = std::fs::remove_file(&exit);
    let command = format!(
        "{} top --agent http://{} --interval 1s; echo $? > {}",
        env!("CARGO_BIN_EXE_twmon"),
        agent.addr,
        exit.display()
    );
    let tmux = |args: &[&str]| {
        Command::new("tmux").args(args).output().expect("tmux (Debian package tmux)")
    };
    let out = tmux(&["new-session", "-d", "-s", &session, "-x", "160", "-y", "45", &command]);
    assert!(out.status.success(), "tmux: {}", String::from_utf8_lossy(&out.stderr));
    let screen = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned()
    };
    // The `now` column of a state's row in the Sockets panel.
    let shown = |screen: &str, state: &str| -> Option<u64> {
        screen.lines().find_map(|l| {
            let cell = l.split('│').nth(1)?;
            let mut words = cell.split_whitespace();
            (words.next()? == state).then(|| words.next()?.parse().ok()).flatten()
        })
    };
    let wait = |what: &str, ok: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let s = screen();
            if ok(&s) {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "{what}; the screen:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let ss = |state: &str| ns.ss(state).len() as u64;
    let s = wait("twmon top never showed what ss shows", &|s| {
        shown(s, "time_wait") == Some(ss("TIME-WAIT"))
            && shown(s, "close_wait") == Some(ss("CLOSE-WAIT"))
    });
    assert_eq!((shown(&s, "time_wait"), shown(&s, "close_wait")), (Some(7), Some(3)), "{s}");
    assert!(s.contains("Who closes first (sorted by active)"), "{s}");
    tmux(&["send-keys", "-t", &session, "s"]);
    wait("the s key did not sort by passive closes", &|s| {
        s.contains("Who closes first (sorted by passive)")
    });
    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !exit.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tmux(&["kill-session", "-t", &session]);
    let status = std::fs::read_to_string(&exit).unwrap_or_default();
    let _ = std::fs::remove_file(&exit);
    assert_eq!(status.trim(), "0", "twmon top did not quit with 0 on q");
}
