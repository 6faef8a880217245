//! The agent as a network service: slow, idle and excess clients, signals, compression,
//! process metrics, and the flags and files an operator can get wrong. Each test runs the real
//! agent and talks to it over real TCP.
mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use common::{Agent, Netns};

fn twmon(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twmon")).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// Whether the server closed `s` (a read returns end of file or a reset) within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Idle clients, clients that send a header a byte at a time, and more connections than the
/// limit: the excess is closed at once and counted, the slow and idle ones after the header
/// timeout, and the service answers throughout once they are gone.
#[test]
fn slow_idle_and_excess_clients_are_closed() {
    const LIMIT: usize = 20;
    let ns = Netns::new("slow");
    let agent = Agent::start_with(
        &ns,
        &["--web.max-connections", &LIMIT.to_string(), "--web.read-header-timeout", "2s"],
    );
    let start = Instant::now();
    let mut idle: Vec<TcpStream> =
        (0..LIMIT - 5).map(|_| TcpStream::connect(agent.addr).unwrap()).collect();
    let mut slow: Vec<TcpStream> =
        (0..5).map(|_| TcpStream::connect(agent.addr).unwrap()).collect();
    for s in &mut slow {
        s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    }
    // The limit is reached: 15 more are closed as soon as they are accepted.
    std::thread::sleep(Duration::from_millis(300));
    let mut excess: Vec<TcpStream> =
        (0..15).map(|_| TcpStream::connect(agent.addr).unwrap()).collect();
    for s in &mut excess {
        assert!(
            closed_by_server(s, Duration::from_secs(1)),
            "a connection over the limit was kept"
        );
    }
    // A slowloris keeps sending header bytes; it is closed at the header timeout all the same.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        for s in &mut slow {
            let _ = s.write_all(b"X");
        }
    }
    for s in idle.iter_mut().chain(slow.iter_mut()) {
        assert!(
            closed_by_server(s, Duration::from_secs(4)),
            "a slow or idle client kept its connection"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(10), "closing took {:?}", start.elapsed());
    assert_eq!(agent.get("/healthz").unwrap().0, 200);
    let m = agent.metrics();
    assert_eq!(m.get("twmon_http_refused_total", &[("reason", "connections")]), 15.0);
    assert_eq!(m.get("twmon_http_refused_total", &[("reason", "requests")]), 0.0);
    // A kept-alive scraper that goes quiet is closed at the same timeout.
    let mut keep = TcpStream::connect(agent.addr).unwrap();
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = [0u8; 64];
    let n = keep.read(&mut head).unwrap();
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    assert!(
        closed_by_server(&mut keep, Duration::from_secs(4)),
        "an idle kept-alive connection stayed open"
    );
}

/// SIGTERM while a client has sent half a request: exit 0 within the 3 s grace.
#[test]
fn sigterm_with_a_half_sent_request_exits_promptly() {
    let ns = Netns::new("halfreq");
    let agent = Agent::start(&ns);
    let mut s = TcpStream::connect(agent.addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let status = agent.stop();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(start.elapsed() < Duration::from_secs(5), "exit took {:?}", start.elapsed());
}

/// SIGHUP reloads the configuration file; a file that does not parse is reported and the
/// running configuration stays; the agent keeps running either way.
#[test]
fn sighup_reloads_the_configuration() {
    let ns = Netns::new("hup");
    let config = Agent::config_file("hup", "[breakdown]\ntop_k = 10\n");
    let mut agent = Agent::start_with(&ns, &["--config.file", &config]);
    let reloads =
        |m: &common::Metrics, r: &str| m.get("twmon_config_reloads_total", &[("result", r)]);
    std::fs::write(&config, "[breakdown]\ntop_k = 3\n").unwrap();
    agent.send(libc::SIGHUP);
    let m = agent.wait_for(Duration::from_secs(5), |m| reloads(m, "success") == 1.0);
    assert_eq!(reloads(&m, "success"), 1.0);
    std::fs::write(&config, "[breakdown]\ntop_k = \"many\"\n").unwrap();
    agent.send(libc::SIGHUP);
    let m = agent.wait_for(Duration::from_secs(5), |m| reloads(m, "failure") == 1.0);
    assert_eq!((reloads(&m, "success"), reloads(&m, "failure")), (1.0, 1.0));
    assert!(agent.alive(), "SIGHUP ended the agent");
    let log = agent.wait_log(Duration::from_secs(2), "configuration not reloaded");
    assert!(log.contains("configuration not reloaded") && log.contains("top_k"), "{log}");
    assert_eq!(agent.stop().code(), Some(0));
}

/// Prometheus asks for gzip and gets it; the telemetry path moves; the process metrics every
/// exporter has are there.
#[test]
fn gzip_telemetry_path_and_process_metrics() {
    let ns = Netns::new("gzip");
    let agent = Agent::start_with(&ns, &["--web.telemetry-path", "/prom"]);
    let mut s = TcpStream::connect(agent.addr).unwrap();
    s.write_all(b"GET /prom HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers") + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    assert!(head.starts_with("http/1.0 200") && head.contains("content-encoding: gzip"), "{head}");
    assert_eq!(&raw[split..split + 2], [0x1f, 0x8b], "the body is not gzip");
    assert_eq!(agent.get("/metrics").unwrap().0, 404, "metrics still at /metrics");
    let (status, body) = agent.get("/prom").unwrap();
    assert_eq!(status, 200);
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(body.lines().any(|l| l.starts_with(name)), "{name} missing");
    }
    let (status, index) = agent.get("/").unwrap();
    assert!(status == 200 && index.contains("href=\"prom\""), "{index}");
}

/// `--config.check` loads and attaches the programs, detaches them and says so.
#[test]
fn config_check_attaches_and_exits() {
    let (code, out) = twmon(&["--config.check"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration and kernel ok: 6 of 6 tracepoints attached"), "{out}");
    let bad =
        Agent::config_file("check", "[close_wait]\nleak_threshold = \"99999999999999999999s\"\n");
    let (code, out) = twmon(&["--config.check", "--config.file", &bad]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("too long: at most 24h"), "{out}");
}

/// What an operator can get wrong, each refused with what is wrong and no panic.
#[test]
fn bad_values_are_refused_with_the_reason() {
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--netns", "/etc/passwd"], 1, "not a network namespace"),
        (&["--netns", "/dev/null"], 1, "not a network namespace"),
        (&["--netns", "/proc/self/ns/mnt"], 1, "not a network namespace"),
        (&["--bpf.max-sockets", "4294967295"], 2, "from 1024 to 16777216"),
        (&["--bpf.max-timewait", "100"], 2, "from 1024 to 16777216"),
        (&["--bpf.ring-buffer-size", "1099511627776"], 2, "to 2 GiB"),
        (&["--timewait.sweep-interval", "99999999999999999999s"], 2, "too long"),
        (&["--config.file", "/dev/zero"], 1, "larger than 1024 KiB"),
        (&["--web.listen-address", "192.0.2.1:9864"], 1, "not one of this host's"),
        (&["--web.telemetry-path", "metrics"], 2, "not a path"),
    ];
    for (args, want, text) in cases {
        let (code, out) = twmon(args);
        assert_eq!(code, Some(*want), "{args:?}: {out}");
        assert!(out.contains(text), "{args:?}: {out}");
        assert!(!out.contains("panicked"), "{args:?}: {out}");
    }
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `--web.config.file` in exporter-toolkit's format, with a real CA made by openssl and real
/// clients (curl): TLS serves, a client certificate from another CA is refused, a wrong password
/// gets 401, the right one the metrics, `/healthz` answers without a password, headers are set.
#[test]
fn web_config_tls_client_certificates_and_basic_auth() {
    let dir = std::env::temp_dir().join(format!("twmon-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2";
    let run = |cmd: String| openssl(&dir, &cmd.split_whitespace().collect::<Vec<_>>());
    for ca in ["ca", "other-ca"] {
        run(format!("req -x509 {ec} -keyout {ca}.key -out {ca}.crt -subj /CN=twmon-test-{ca}"));
    }
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ca, ext) in
        [("server", "ca", "server"), ("client", "ca", "client"), ("stranger", "other-ca", "client")]
    {
        run(format!("req {ec} -keyout {name}.key -out {name}.csr -subj /CN={name}"));
        run(format!(
            "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial -days 2 \
             -extfile {ext}.ext -out {name}.crt"
        ));
    }
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  min_version: TLS12\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\nbasic_auth_users:\n  alice: {hash}\n"
        ),
    )
    .unwrap();

    let ns = Netns::new("tls");
    let agent = Agent::start_with(&ns, &["--web.config.file", web.to_str().unwrap()]);
    let url = |path: &str| format!("https://{}{path}", agent.addr);
    let curl = |extra: &[&str], path: &str| -> (String, String) {
        let out = Command::new("curl")
            .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5", "--cacert"])
            .arg(dir.join("ca.crt"))
            .args(extra)
            .arg(url(path))
            .current_dir(&dir)
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let client = ["--cert", "client.crt", "--key", "client.key"];
    // The right certificate and password: the metrics, with the configured header.
    let (code, body) =
        curl(&[&client[..], &["-u", "alice:s3cret", "-D", "headers.txt"]].concat(), "/metrics");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("twmon_sockets{state=\"time_wait\"}"), "{body}");
    let headers = std::fs::read_to_string(dir.join("headers.txt")).unwrap().to_lowercase();
    assert!(headers.contains("x-frame-options: deny"), "{headers}");
    // A wrong password, and none: 401 with a Basic challenge.
    for auth in [&["-u", "alice:wrong"][..], &[]] {
        let (code, body) = curl(&[&client[..], auth].concat(), "/metrics");
        assert_eq!(code, "401", "{auth:?}: {body}");
    }
    // /healthz needs the certificate (TLS) but no password: probes have none.
    let (code, body) = curl(&client, "/healthz");
    assert_eq!((code.as_str(), body.trim()), ("200", "ok"));
    // No client certificate, or one from another CA: the handshake fails.
    for cert in [&[][..], &["--cert", "stranger.crt", "--key", "stranger.key"]] {
        let (code, body) = curl(&[cert, &["-u", "alice:s3cret"]].concat(), "/metrics");
        assert_eq!(code, "000", "{cert:?} was let in: {body}");
    }
    // Plain HTTP on the TLS port gets nothing.
    assert!(agent.get("/healthz").map(|(s, _)| s != 200).unwrap_or(true), "plain HTTP answered");
    let m = {
        let (_, body) = curl(&[&client[..], &["-u", "alice:s3cret"]].concat(), "/metrics");
        common::Metrics::parse(&body).unwrap()
    };
    assert_eq!(m.get("twmon_http_refused_total", &[("reason", "unauthorized")]), 2.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A web configuration file with what twmon does not do is refused by name, not ignored.
#[test]
fn web_config_mistakes_are_named() {
    let dir = std::env::temp_dir().join(format!("twmon-webbad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, want) in [
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n", "cert_file"),
        ("basic_auth_users:\n  alice: plaintext\n", "not a bcrypt hash"),
        (
            "tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
            "unknown field `cipher_suites`",
        ),
        ("tls_servr_config: {}\n", "unknown field `tls_servr_config`"),
    ] {
        let path = dir.join("web.yml");
        std::fs::write(&path, text).unwrap();
        let (code, out) = twmon(&[
            "--web.config.file",
            path.to_str().unwrap(),
            "--web.listen-address",
            "127.0.0.1:0",
        ]);
        assert_eq!(code, Some(1), "{text}: {out}");
        assert!(out.contains("--web.config.file") && out.contains(want), "{text}: {out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Root without CAP_SYS_PTRACE (a sandbox) cannot see other users' processes' namespaces: the
/// message says it runs as root in a sandbox, not "run it as root".
#[test]
fn root_in_a_sandbox_is_told_so() {
    // A process of another user, whose namespace root cannot see without CAP_SYS_PTRACE.
    let mut other = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "30"])
        .spawn()
        .expect("setpriv (util-linux)");
    let log = std::env::temp_dir().join(format!("twmon-sandbox-{}.log", std::process::id()));
    let mut agent = Command::new("setpriv")
        .args(["--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace"])
        .arg(env!("CARGO_BIN_EXE_twmon"))
        .args(["--web.listen-address", "127.0.0.1:0"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while Instant::now() < deadline && !text.contains("cannot read every network namespace") {
        std::thread::sleep(Duration::from_millis(200));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    // SAFETY: signalling children of this test.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    let _ = other.kill();
    let _ = other.wait();
    assert!(text.contains("twmon runs as root but in a sandbox"), "{text}");
    assert!(!text.contains("or run twmon as root"), "{text}");
    assert_eq!(status.code(), Some(0), "{text}");
    let _ = std::fs::remove_file(log);
}

/// Past `--web.max-requests` scrapes at once, the rest get 503 and are counted, exactly.
#[test]
fn scrapes_past_max_requests_get_503() {
    let ns = Netns::new("maxreq");
    let agent = Agent::start_with(&ns, &["--web.max-requests", "1"]);
    let addr = agent.addr;
    let threads: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                (0..20)
                    .map(|_| {
                        common::http_get(addr, "/api/v1/snapshot").map(|(s, _)| s).unwrap_or(0)
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let codes: Vec<u16> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let busy = codes.iter().filter(|c| **c == 503).count();
    assert!(codes.iter().all(|c| *c == 200 || *c == 503), "{codes:?}");
    assert!(busy > 0 && busy < codes.len(), "{busy} of {} answered 503", codes.len());
    let m = agent.metrics();
    assert_eq!(m.get("twmon_http_refused_total", &[("reason", "requests")]), busy as f64);
}
