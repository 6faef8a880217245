//! Checks of the deployment files: the systemd unit (verified, scored, and the agent actually
//! run with only its capabilities and syscalls), the Kubernetes manifests (built by kustomize,
//! validated against real schemas, and their cross-references), the plain Prometheus scrape
//! configuration, the Grafana provisioning files and the Dockerfile.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use super::{
    Report,
    tools::Tools,
    util::{self, Proc, first_line, http_get, must, output, wait_for},
};

/// The systemd unit: verified, its sandbox scored, and the agent run under it (as the unit's
/// user, with its capabilities and system call filter).
pub fn systemd(report: &mut Report, tools: &Tools, twmon: &Path) {
    let unit_path = crate::root().join("deploy/systemd/twmon.service");
    let unit = Unit::load(&unit_path);
    report.check("systemd-analyze verify", || verify_unit(tools, &unit_path, twmon));
    report.check("systemd-analyze security", || security(tools, &unit_path, twmon));
    report.check("least capabilities (agent as a non-root user)", || {
        least_capabilities(tools, unit.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?, twmon)
    });
    report.check("system calls within SystemCallFilter", || {
        syscalls(tools, unit.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?, twmon)
    });
}

/// The Kubernetes manifests (built, validated, fitting together, scraped) and the Dockerfile.
pub fn kubernetes(report: &mut Report, tools: &Tools) {
    let mut docs = None;
    report.check("kustomize build", || {
        let (base, privileged) = kustomize(tools)?;
        let detail = format!(
            "base: {}; with components/privileged: {} documents",
            kinds(&base),
            privileged.len()
        );
        docs = Some((base, privileged));
        Ok(detail)
    });
    let (base, privileged) = docs.unwrap_or_default();
    report.check("kubernetes-validate --strict", || kubernetes_validate(tools, &base, &privileged));
    report.check("PodMonitor against the Prometheus operator's types", || podmonitor(tools, &base));
    report
        .check("DaemonSet, Service and PodMonitor fit together", || manifests(&base, &privileged));
    report.check("Prometheus scrape config for Kubernetes", || scrape_config(tools, &base));
    report.check("hadolint Dockerfile", || hadolint(tools));
}

fn kinds(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// systemd

/// The [Service] settings of the unit, in file order.
struct Unit {
    settings: Vec<(String, String)>,
}

impl Unit {
    fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut settings = Vec::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if line.starts_with('[') {
                section = line.to_string();
            } else if section == "[Service]"
                && let Some((k, v)) = line.split_once('=')
            {
                settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ok(Self { settings })
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }

    fn caps(&self, key: &str) -> BTreeSet<String> {
        self.all(key).iter().flat_map(|v| v.split_whitespace()).map(str::to_string).collect()
    }
}

/// The unit with ExecStart pointing at the binary just built (verify checks it is executable).
fn unit_for_test(tools: &Tools, unit: &Path, twmon: &Path) -> Result<PathBuf> {
    let dir = tools.scratch("systemd")?;
    let text = std::fs::read_to_string(unit)?;
    ensure!(
        text.contains("ExecStart=/usr/local/bin/twmon "),
        "ExecStart is not /usr/local/bin/twmon"
    );
    let copy = dir.join("twmon.service");
    std::fs::write(
        &copy,
        text.replace("ExecStart=/usr/local/bin/twmon ", &format!("ExecStart={} ", twmon.display())),
    )?;
    Ok(copy)
}

fn verify_unit(tools: &Tools, unit: &Path, twmon: &Path) -> Result<String> {
    let copy = unit_for_test(tools, unit, twmon)?;
    let out = output(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy))?;
    // A clean unit prints nothing; unknown keys are only warnings, but warnings here are bugs.
    ensure!(
        out.ok && out.text.trim().is_empty(),
        "systemd-analyze verify ({}):\n{}",
        out.status,
        out.text.trim_end()
    );
    Ok("no findings".into())
}

fn security(tools: &Tools, unit: &Path, twmon: &Path) -> Result<String> {
    let copy = unit_for_test(tools, unit, twmon)?;
    let text = must(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&copy),
    )?;
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .context("no exposure level in the output")?;
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("cannot read the score in: {line}"))?;
    // 10 is a plain root service; below 3 is the best band that a BPF loader can reach.
    ensure!(score <= 3.0, "exposure {score} is above 3.0:\n{text}");
    Ok(format!("exposure {score} (0 = fully sandboxed, 10 = unrestricted root)"))
}

fn cap_number(name: &str) -> Result<u32> {
    Ok(match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_SYSLOG" => 34,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => bail!("capability {other} is not in this check's table"),
    })
}

/// A directory everyone can enter, removed when dropped.
struct OpenDir(PathBuf);

impl OpenDir {
    fn new(name: &str) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let d = std::env::temp_dir().join(format!("twmon-checks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self(d))
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the agent fared when started like the unit starts it.
struct Sandboxed {
    healthy: bool,
    log: String,
    status: String,
    attached: f64,
    /// `twmon_sysctl{name="tcp_max_tw_buckets"}` over the namespaces it read.
    tw_buckets: f64,
}

/// A uid from systemd's DynamicUser range, owning nothing on the host.
const DYNAMIC_UID: u32 = 61953;

/// Starts the agent the way the unit does, as far as that can be done without systemd as PID 1:
/// in a private mount namespace with every mount outside /proc and /dev read-only
/// (ProtectSystem=strict, ProtectKernelTunables), as an unprivileged uid with no_new_privs and
/// exactly `caps` as ambient, inheritable and bounding sets.
fn sandboxed(bin: &Path, caps: &BTreeSet<String>, log: &Path, wait: Duration) -> Result<Sandboxed> {
    let list = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let set = if list.is_empty() { "-all".to_string() } else { format!("-all,{list}") };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut script = String::from("n=0; f=0\n");
    for mp in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
        let mp = mp.replace("\\040", " ");
        if mp.starts_with("/proc") || mp.starts_with("/dev") || mp.contains('\'') {
            continue;
        }
        script.push_str(&format!(
            "if mount -o remount,bind,ro '{mp}' 2>/dev/null; then n=$((n+1)); else f=$((f+1)); fi\n"
        ));
    }
    script.push_str(&format!(
        "echo \"sandbox: $n mounts read-only, $f not remountable\"\n\
         exec setpriv --reuid={DYNAMIC_UID} --regid={DYNAMIC_UID} --clear-groups --no-new-privs \
         --inh-caps={set} --ambient-caps={set} --bounding-set={set} -- '{}' --web.listen-address 127.0.0.1:0\n",
        bin.display()
    ));
    let mut agent = Proc::spawn(
        "twmon (sandboxed)",
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]),
        log,
    )?;
    let deadline = Instant::now() + wait;
    let mut healthy = false;
    let mut addr = None;
    while Instant::now() < deadline {
        if agent.alive().is_err() {
            break;
        }
        addr = agent.served_address();
        if addr.is_some_and(|a| http_get(a, "/healthz").is_ok_and(|(c, _)| c == 200)) {
            healthy = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut attached = 0.0;
    let mut tw_buckets = 0.0;
    let mut status = String::new();
    if healthy {
        // The process is the agent itself (unshare, sh and setpriv exec into it).
        let st = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
        let field = |k: &str| {
            st.lines().find(|l| l.starts_with(k)).map(|l| l[k.len()..].trim().to_string())
        };
        let want: u64 =
            caps.iter().map(|c| cap_number(c).map(|n| 1u64 << n)).sum::<Result<u64>>()?;
        let eff = u64::from_str_radix(&field("CapEff:").unwrap_or_default(), 16)?;
        let uid = field("Uid:").unwrap_or_default();
        let nnp = field("NoNewPrivs:").unwrap_or_default();
        ensure!(eff == want, "effective capabilities {eff:#x}, expected {want:#x}");
        ensure!(uid.split_whitespace().all(|u| u == DYNAMIC_UID.to_string()), "uids {uid}");
        ensure!(nnp == "1", "NoNewPrivs is {nnp}");
        status = format!("uid {DYNAMIC_UID}, CapEff {eff:#x}, NoNewPrivs 1");
        let (code, body) = http_get(addr.context("no address")?, "/metrics")?;
        ensure!(code == 200, "/metrics answered {code}");
        let scrape = super::e2e::Scrape::parse(&body).map_err(anyhow::Error::msg)?;
        let value = |name: &str, labels: &[(&str, &str)]| {
            scrape.sum(name, labels).with_context(|| format!("no {name} {labels:?} in the scrape"))
        };
        attached = value("twmon_bpf_programs_attached", &[])?;
        tw_buckets = value("twmon_sysctl", &[("name", "tcp_max_tw_buckets")])?;
    }
    agent.stop()?;
    Ok(Sandboxed { healthy, log: agent.log_tail(6), status, attached, tw_buckets })
}

fn least_capabilities(tools: &Tools, unit: &Unit, twmon: &Path) -> Result<String> {
    let ambient = unit.caps("AmbientCapabilities");
    let bounding = unit.caps("CapabilityBoundingSet");
    ensure!(!ambient.is_empty(), "the unit sets no AmbientCapabilities");
    ensure!(
        ambient == bounding,
        "AmbientCapabilities {ambient:?} and CapabilityBoundingSet {bounding:?} differ"
    );
    ensure!(unit.all("DynamicUser") == ["yes"], "the unit does not run as a DynamicUser");
    ensure!(!ambient.contains("CAP_SYS_ADMIN"), "CAP_SYS_ADMIN is granted");

    let dir = OpenDir::new("caps")?;
    let bin = dir.0.join("twmon");
    std::fs::copy(twmon, &bin)?;
    let logs = tools.scratch("caps")?;

    let full = sandboxed(&bin, &ambient, &logs.join("all.log"), Duration::from_secs(30))?;
    ensure!(full.healthy, "the agent did not become healthy with {ambient:?}:\n{}", full.log);
    ensure!(full.attached == 6.0, "{} programs attached with {ambient:?}", full.attached);
    // Its own namespace (the host's) is read without entering it: the kernel's view works too.
    let host: f64 =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")?.trim().parse()?;
    ensure!(
        full.tw_buckets == host,
        "with {ambient:?} the agent read tcp_max_tw_buckets {} (host: {host}): it does not read \
         its own namespace",
        full.tw_buckets
    );
    // Each capability is needed: without any one of them the agent must fail to start.
    let mut needed = Vec::new();
    for cap in &ambient {
        let mut fewer = ambient.clone();
        fewer.remove(cap);
        let r = sandboxed(
            &bin,
            &fewer,
            &logs.join(format!("without-{cap}.log")),
            Duration::from_secs(10),
        )?;
        ensure!(
            !r.healthy,
            "the agent also runs without {cap}: the unit grants more than it needs"
        );
        let why = r.log.lines().rev().find(|l| l.contains("ERROR")).unwrap_or("exited").to_string();
        let why =
            why.split("ERROR").nth(1).unwrap_or(&why).trim().chars().take(90).collect::<String>();
        needed.push(format!("without {cap}: {why}"));
    }
    Ok(format!(
        "{} programs attached with {} ({}); {}",
        full.attached,
        ambient.iter().cloned().collect::<Vec<_>>().join(" "),
        full.status,
        needed.join("; ")
    ))
}

/// The system calls an allow-list of SystemCallFilter= lines permits, groups expanded with
/// `systemd-analyze syscall-filter`.
fn allowed_syscalls(filters: &[&str]) -> Result<BTreeSet<String>> {
    fn expand(
        group: &str,
        cache: &mut BTreeMap<String, BTreeSet<String>>,
    ) -> Result<BTreeSet<String>> {
        if let Some(s) = cache.get(group) {
            return Ok(s.clone());
        }
        let text = must(Command::new("systemd-analyze").args(["syscall-filter", group]))?;
        let mut set = BTreeSet::new();
        for item in
            text.lines().skip(1).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if item.starts_with('@') {
                set.extend(expand(item, cache)?);
            } else {
                set.insert(item.to_string());
            }
        }
        cache.insert(group.to_string(), set.clone());
        Ok(set)
    }
    let mut cache = BTreeMap::new();
    let mut allowed = BTreeSet::new();
    ensure!(
        filters.first().is_some_and(|f| !f.starts_with('~')),
        "the first SystemCallFilter= must be an allow list"
    );
    for line in filters {
        let (deny, items) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, *line),
        };
        for item in items.split_whitespace() {
            let set = if item.starts_with('@') {
                expand(item, &mut cache)?
            } else {
                BTreeSet::from([item.to_string()])
            };
            if deny {
                allowed.retain(|s| !set.contains(s));
            } else {
                allowed.extend(set);
            }
        }
    }
    Ok(allowed)
}

fn syscalls(tools: &Tools, unit: &Unit, twmon: &Path) -> Result<String> {
    let allowed = allowed_syscalls(&unit.all("SystemCallFilter"))?;
    ensure!(allowed.contains("bpf"), "bpf is not allowed");
    let dir = tools.scratch("syscalls")?;
    let summary = dir.join("strace.txt");
    let mut traced = Proc::spawn(
        "strace twmon",
        Command::new("strace")
            .args(["-f", "-qq", "-c", "-o"])
            .arg(&summary)
            .arg("--")
            .arg(twmon)
            .args(["--web.listen-address", "127.0.0.1:0"]),
        &dir.join("twmon.log"),
    )?;
    let addr = util::wait_healthy(&mut traced, Duration::from_secs(60))?;
    for path in ["/metrics", "/", "/metrics", "/healthz"] {
        http_get(addr, path)?;
    }
    // Stop the agent itself (strace's child); strace then writes its summary and exits.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", traced.pid()))?;
    let agent: i32 = children.split_whitespace().next().context("strace has no child")?.parse()?;
    // SAFETY: kill(2) on the pid of a process this check started.
    unsafe { libc::kill(agent, libc::SIGTERM) };
    wait_for("strace to finish", Duration::from_secs(20), || Ok(traced.alive().is_err()))?;
    let text = std::fs::read_to_string(&summary)?;
    let mut used = BTreeSet::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors,] syscall
        if cols.len() >= 5 && cols[0].parse::<f64>().is_ok() && cols.last() != Some(&"total") {
            used.insert(cols.last().expect("non-empty").to_string());
        }
    }
    ensure!(used.contains("bpf"), "strace saw no bpf:\n{text}");
    let denied: Vec<&String> = used.iter().filter(|s| !allowed.contains(*s)).collect();
    ensure!(
        denied.is_empty(),
        "the agent makes system calls the unit's SystemCallFilter refuses: {denied:?}"
    );
    Ok(format!(
        "{} distinct system calls from start to clean exit, all among the {} allowed",
        used.len(),
        allowed.len()
    ))
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

fn kustomize(tools: &Tools) -> Result<(Vec<Value>, Vec<Value>)> {
    let kubectl = tools.py("kubectl");
    let base_dir = crate::root().join("deploy/kubernetes");
    let base = must(Command::new(&kubectl).arg("kustomize").arg(&base_dir))?;
    // An overlay as a user would write it, with the privileged component.
    let overlay = tools.scratch("kustomize-privileged")?;
    let rel = pathdiff(&base_dir, &overlay);
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources: [{rel}]\ncomponents: [{rel}/components/privileged]\n"
        ),
    )?;
    let privileged = must(Command::new(&kubectl).arg("kustomize").arg(&overlay))?;
    std::fs::write(overlay.join("base.yaml"), &base)?;
    std::fs::write(overlay.join("privileged.yaml"), &privileged)?;
    Ok((tools.yaml_docs(&base)?, tools.yaml_docs(&privileged)?))
}

/// `to` relative to `from` (kustomize refuses absolute paths).
fn pathdiff(to: &Path, from: &Path) -> String {
    let to: Vec<_> = to.components().collect();
    let from: Vec<_> = from.components().collect();
    let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_string(); from.len() - common];
    parts.extend(to[common..].iter().map(|c| c.as_os_str().to_string_lossy().into_owned()));
    parts.join("/")
}

fn is_crd(d: &Value) -> bool {
    d["apiVersion"].as_str().is_some_and(|a| a.starts_with("monitoring.coreos.com/"))
}

fn kubernetes_validate(tools: &Tools, base: &[Value], privileged: &[Value]) -> Result<String> {
    let dir = tools.scratch("kubernetes-validate")?;
    let mut lines = Vec::new();
    for (name, docs) in [("base", base), ("privileged", privileged)] {
        let core: Vec<&Value> = docs.iter().filter(|d| !is_crd(d)).collect();
        ensure!(!core.is_empty(), "{name}: nothing to validate");
        // JSON documents are YAML documents.
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            core.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n---\n"),
        )?;
        let out = output(
            Command::new(tools.py("kubernetes-validate"))
                .args(["--strict", "--no-warn"])
                .arg(&file),
        )?;
        let passed = out.text.lines().filter(|l| l.contains("passed")).count();
        ensure!(
            out.ok && passed == core.len(),
            "{name} ({}):\n{}",
            out.status,
            out.text.trim_end()
        );
        lines.push(format!("{name}: {passed} resources passed"));
    }
    let version = must(Command::new(tools.py("kubernetes-validate")).arg("--version"))?;
    Ok(format!(
        "{} against Kubernetes {} schemas (kubernetes-validate {})",
        lines.join(", "),
        "1.37",
        first_line(&version)
    ))
}

/// Validates PodMonitors with the validators generated from the operator's Go types, and
/// refuses fields those types do not have (the API server would reject them too).
const PODMONITOR_JS: &str = r#"
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
const require = createRequire(import.meta.url);
const schemas = process.env.SCHEMAS;
const fields = (type) => new Set(
  [...readFileSync(`${schemas}/ComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1${type}.js`, "utf8")
    .matchAll(/data\.([A-Za-z_][A-Za-z0-9_]*)/g)].map((m) => m[1]));
const known = { root: fields("PodMonitor"), spec: fields("PodMonitorSpec"),
  endpoint: fields("PodMetricsEndpoint"), relabel: fields("RelabelConfig") };
const unknown = (obj, set, at) => Object.keys(obj ?? {}).filter((k) => !set.has(k)).map((k) => `${at}.${k}`);
const docs = JSON.parse(readFileSync(0, "utf8"));
let bad = 0;
for (const d of docs) {
  const problems = [];
  try { new PodMonitor(d).validate(); } catch (e) { problems.push(e.message); }
  problems.push(...unknown(d, known.root, ""), ...unknown(d.spec, known.spec, ".spec"));
  (d.spec?.podMetricsEndpoints ?? []).forEach((ep, i) => {
    const at = `.spec.podMetricsEndpoints[${i}]`;
    problems.push(...unknown(ep, known.endpoint, at));
    for (const k of ["relabelings", "metricRelabelings"])
      (ep[k] ?? []).forEach((r, j) => problems.push(...unknown(r, known.relabel, `${at}.${k}[${j}]`)));
  });
  if (problems.length) { bad++; console.log(`invalid PodMonitor/${d.metadata?.name}: ${problems.join("; ")}`); }
  else console.log(`valid PodMonitor/${d.metadata.name}: ${d.spec.podMetricsEndpoints.length} endpoint(s)`);
}
process.exit(bad ? 1 : 0);
"#;

fn podmonitor(tools: &Tools, base: &[Value]) -> Result<String> {
    let monitors: Vec<&Value> = base.iter().filter(|d| d["kind"] == "PodMonitor").collect();
    ensure!(monitors.len() == 1, "{} PodMonitors in the base, want 1", monitors.len());
    let dir = tools.scratch("podmonitor")?;
    // Next to node_modules so that the import resolves.
    let script = tools.npm_prefix().join("validate-podmonitor.mjs");
    std::fs::write(&script, PODMONITOR_JS)?;
    let input = dir.join("podmonitors.json");
    std::fs::write(&input, serde_json::to_string(&monitors)?)?;
    let schemas =
        tools.npm_prefix().join("node_modules/@kubernetes-models/prometheus-operator/_schemas");
    let run = Command::new("node")
        .arg(&script)
        .env("SCHEMAS", &schemas)
        .stdin(std::fs::File::open(&input)?)
        .output()?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    ensure!(run.status.success(), "{}", text.trim_end());
    Ok(format!("{} (@kubernetes-models/prometheus-operator)", first_line(&text)))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind).with_context(|| format!("no {kind} in the build"))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

/// What the schemas cannot see: the DaemonSet is unprivileged but has what the agent needs, and
/// the probes, ports, labels and names of the Service and PodMonitor point at it.
fn manifests(base: &[Value], privileged: &[Value]) -> Result<String> {
    let mut problems = Vec::new();
    let mut need = |ok: bool, what: &str| {
        if !ok {
            problems.push(what.to_string());
        }
    };
    let ds = find(base, "DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    need(pod["hostNetwork"] == true, "hostNetwork: true");
    need(pod["hostPID"] == true, "hostPID: true");
    need(pod["automountServiceAccountToken"] == false, "automountServiceAccountToken: false");
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    need(sc["privileged"] != true, "not privileged");
    need(sc["allowPrivilegeEscalation"] == false, "allowPrivilegeEscalation: false");
    need(sc["readOnlyRootFilesystem"] == true, "readOnlyRootFilesystem: true");
    need(
        strings(&sc["capabilities"]["drop"]) == BTreeSet::from(["ALL".to_string()]),
        "capabilities.drop: [ALL]",
    );
    let add = strings(&sc["capabilities"]["add"]);
    need(
        add == ["BPF", "PERFMON", "SYSLOG", "SYS_ADMIN", "SYS_PTRACE"]
            .into_iter()
            .map(String::from)
            .collect(),
        "capabilities.add: exactly BPF, PERFMON, SYSLOG (the programs), SYS_ADMIN, SYS_PTRACE \
         (pods' namespaces)",
    );
    for r in ["requests", "limits"] {
        for k in ["cpu", "memory"] {
            need(c["resources"][r][k].is_string(), &format!("resources.{r}.{k}"));
        }
    }
    let port = c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "metrics"))
        .cloned()
        .unwrap_or(json!({}));
    let listen = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix("--web.listen-address="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u64>().ok());
    need(
        listen.is_some() && port["containerPort"].as_u64() == listen,
        "containerPort `metrics` = --web.listen-address port",
    );
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        need(
            c[probe]["httpGet"]["path"] == "/healthz" && c[probe]["httpGet"]["port"] == "metrics",
            &format!("{probe} on /healthz, port metrics"),
        );
    }
    let mounts: BTreeMap<String, &Value> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["mountPath"].as_str().unwrap_or("").to_string(), m))
        .collect();
    let volumes: BTreeMap<String, &Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap_or("").to_string(), v))
        .collect();
    let path = "/sys/kernel/btf";
    let ok = mounts.get(path).is_some_and(|m| {
        m["readOnly"] == true
            && volumes
                .get(m["name"].as_str().unwrap_or(""))
                .is_some_and(|v| v["hostPath"]["path"] == path)
    });
    need(ok, &format!("{path} from the host, read-only"));
    let matches = |sel: &Value| {
        sel.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
    };
    let svc = find(base, "Service")?;
    need(matches(&svc["spec"]["selector"]), "Service selects the DaemonSet's pods");
    need(svc["spec"]["ports"][0]["targetPort"] == "metrics", "Service targetPort metrics");
    let pm = find(base, "PodMonitor")?;
    need(
        matches(&pm["spec"]["selector"]["matchLabels"]),
        "PodMonitor selects the DaemonSet's pods",
    );
    need(
        pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics",
        "PodMonitor scrapes port metrics",
    );
    let job_label = pm["spec"]["jobLabel"].as_str().unwrap_or("");
    need(
        labels[job_label] == "twmon",
        "PodMonitor jobLabel gives job=\"twmon\", as the rules expect",
    );
    for d in base.iter().filter(|d| d["kind"] != "Namespace") {
        need(d["metadata"]["namespace"] == "twmon", &format!("{} in namespace twmon", d["kind"]));
    }
    let pds = find(privileged, "DaemonSet")?;
    need(
        pds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] == true,
        "components/privileged makes the container privileged",
    );
    ensure!(problems.is_empty(), "missing: {}", problems.join("; "));
    Ok(format!(
        "unprivileged with {}, probes on /healthz, port {}, {} host paths read-only, job=\"twmon\"",
        add.into_iter().collect::<Vec<_>>().join("+"),
        listen.unwrap_or(0),
        2
    ))
}

/// Meta labels Prometheus' Kubernetes discovery sets for role `pod` (prefixes end with `_`).
const POD_META: &[&str] = &[
    "__meta_kubernetes_namespace",
    "__meta_kubernetes_pod_name",
    "__meta_kubernetes_pod_ip",
    "__meta_kubernetes_pod_label_",
    "__meta_kubernetes_pod_labelpresent_",
    "__meta_kubernetes_pod_annotation_",
    "__meta_kubernetes_pod_annotationpresent_",
    "__meta_kubernetes_pod_container_init",
    "__meta_kubernetes_pod_container_name",
    "__meta_kubernetes_pod_container_id",
    "__meta_kubernetes_pod_container_image",
    "__meta_kubernetes_pod_container_port_name",
    "__meta_kubernetes_pod_container_port_number",
    "__meta_kubernetes_pod_container_port_protocol",
    "__meta_kubernetes_pod_ready",
    "__meta_kubernetes_pod_phase",
    "__meta_kubernetes_pod_node_name",
    "__meta_kubernetes_pod_host_ip",
    "__meta_kubernetes_pod_uid",
    "__meta_kubernetes_pod_controller_kind",
    "__meta_kubernetes_pod_controller_name",
];

/// Debian's Prometheus is built without Kubernetes discovery, so `promtool check config` runs on
/// a copy whose kubernetes_sd_configs are replaced by a static target (that checks everything
/// else: relabelling, intervals, the rule file); the discovery block is checked here against the
/// fields of Prometheus' kubernetes.SDConfig.
fn scrape_config(tools: &Tools, base: &[Value]) -> Result<String> {
    let path = crate::root().join("deploy/kubernetes/prometheus-scrape-config.yml");
    let mut docs = tools.yaml_docs(&std::fs::read_to_string(&path)?)?;
    ensure!(docs.len() == 1, "{} YAML documents, want 1", docs.len());
    let mut config = docs.remove(0);
    let at = config["scrape_configs"]
        .as_array()
        .context("no scrape_configs")?
        .iter()
        .position(|j| j["job_name"] == "twmon")
        .context("no job_name: twmon")?;
    let job = &mut config["scrape_configs"][at];
    let sd = job
        .as_object_mut()
        .expect("object")
        .remove("kubernetes_sd_configs")
        .context("no kubernetes_sd_configs")?;
    let mut problems = Vec::new();
    const SD_KEYS: &[&str] = &[
        "api_server",
        "role",
        "kubeconfig_file",
        "namespaces",
        "selectors",
        "attach_metadata",
        "basic_auth",
        "authorization",
        "oauth2",
        "bearer_token",
        "bearer_token_file",
        "tls_config",
        "proxy_url",
        "no_proxy",
        "proxy_from_environment",
        "proxy_connect_header",
        "follow_redirects",
        "enable_http2",
    ];
    const ROLES: &[&str] = &["pod", "node", "service", "endpoints", "endpointslice", "ingress"];
    for s in sd.as_array().context("kubernetes_sd_configs is not a list")? {
        for k in s.as_object().context("kubernetes_sd_configs entry is not a map")?.keys() {
            if !SD_KEYS.contains(&k.as_str()) {
                problems.push(format!("unknown kubernetes_sd_configs field {k}"));
            }
        }
        if s["role"] != "pod" {
            problems.push(format!("role {} (this config relabels pod meta labels)", s["role"]));
        }
        for k in s["namespaces"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_else(Vec::new)
        {
            if !["names", "own_namespace"].contains(&k.as_str()) {
                problems.push(format!("unknown namespaces field {k}"));
            }
        }
        for sel in s["selectors"].as_array().into_iter().flatten() {
            for (k, v) in sel.as_object().into_iter().flatten() {
                let ok = match k.as_str() {
                    "role" => v.as_str().is_some_and(|r| ROLES.contains(&r)),
                    "label" | "field" => v.is_string(),
                    _ => false,
                };
                if !ok {
                    problems.push(format!("bad selector field {k}: {v}"));
                }
            }
            // The label selector must select the DaemonSet's pods.
            if let Some(sel) = sel["label"].as_str() {
                let labels = &find(base, "DaemonSet")?["spec"]["template"]["metadata"]["labels"];
                for term in sel.split(',') {
                    let (k, v) = term.split_once('=').unwrap_or((term, ""));
                    if labels[k.trim()] != v.trim() {
                        problems.push(format!(
                            "selector {term} does not match the DaemonSet's pod labels"
                        ));
                    }
                }
            }
        }
    }
    for r in job["relabel_configs"].as_array().into_iter().flatten() {
        for l in strings(&r["source_labels"]) {
            if l.starts_with("__meta_kubernetes_")
                && !POD_META.iter().any(|m| l == *m || (m.ends_with('_') && l.starts_with(m)))
            {
                problems.push(format!("{l} is not a pod meta label"));
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    job["static_configs"] = json!([{ "targets": ["127.0.0.1:9864"] }]);
    let relabels = job["relabel_configs"].as_array().map_or(0, Vec::len);
    let dir = tools.scratch("scrape-config")?;
    std::fs::copy(
        crate::root().join("deploy/prometheus/twmon.rules.yml"),
        dir.join("twmon.rules.yml"),
    )?;
    let copy = dir.join("prometheus.yml");
    std::fs::write(&copy, serde_json::to_string_pretty(&config)?)?;
    let out = must(Command::new("promtool").args(["check", "config"]).arg(&copy))?;
    ensure!(out.contains("SUCCESS"), "{out}");
    Ok(format!(
        "promtool check config: {}; kubernetes_sd_configs: role pod, {} relabel rules on pod meta \
         labels",
        out.lines().filter(|l| l.contains("SUCCESS")).map(str::trim).collect::<Vec<_>>().join(", "),
        relabels
    ))
}

fn hadolint(tools: &Tools) -> Result<String> {
    let file = crate::root().join("Dockerfile");
    let text = std::fs::read_to_string(&file)?;
    let stages =
        text.lines().filter(|l| l.trim_start().to_uppercase().starts_with("FROM ")).count();
    ensure!(
        stages >= 2,
        "{stages} stage(s); the image should be built in one stage and shipped from another"
    );
    let out = output(Command::new(tools.py("hadolint")).arg("--no-color").arg(&file))?;
    ensure!(out.ok, "hadolint ({}):\n{}", out.status, out.text.trim_end());
    let version = must(Command::new(tools.py("hadolint")).arg("--version"))?;
    Ok(format!(
        "no findings, {stages} stages ({}); the image is not built here (no container engine)",
        first_line(&version)
    ))
}

// ---------------------------------------------------------------------------------------------
// Grafana

/// No Grafana here and no published schema for provisioning files: the structure Grafana
/// reads is checked field by field.
pub fn grafana_provisioning(tools: &Tools) -> Result<String> {
    let dir = crate::root().join("dashboards/provisioning");
    let read = |name: &str| -> Result<Value> {
        let mut docs = tools.yaml_docs(
            &std::fs::read_to_string(dir.join(name)).with_context(|| format!("reading {name}"))?,
        )?;
        ensure!(docs.len() == 1, "{name}: {} documents", docs.len());
        Ok(docs.remove(0))
    };
    let d = read("dashboards.yaml")?;
    ensure!(d["apiVersion"] == 1, "dashboards.yaml: apiVersion must be 1");
    let providers = d["providers"].as_array().context("dashboards.yaml: no providers")?;
    for p in providers {
        ensure!(
            p["name"].is_string() && p["type"] == "file",
            "dashboards.yaml: provider needs a name and type: file"
        );
        ensure!(
            p["options"]["path"].as_str().is_some_and(|s| s.starts_with('/')),
            "dashboards.yaml: options.path must be absolute"
        );
    }
    let ds = read("datasource.example.yaml")?;
    ensure!(ds["apiVersion"] == 1, "datasource.example.yaml: apiVersion must be 1");
    let sources =
        ds["datasources"].as_array().context("datasource.example.yaml: no datasources")?;
    for s in sources {
        ensure!(
            s["type"] == "prometheus",
            "datasource type must be prometheus (the dashboard's variable asks for it)"
        );
        ensure!(s["url"].as_str().is_some_and(|u| u.starts_with("http")), "datasource url");
        ensure!(
            ["proxy", "direct"].contains(&s["access"].as_str().unwrap_or("")),
            "datasource access"
        );
    }
    Ok(format!(
        "{} dashboard provider(s), {} Prometheus data source(s)",
        providers.len(),
        sources.len()
    ))
}
