//! `cargo xtask vm`: the real-kernel tests on the kernels users run. Each kernel is one of
//! Debian's own packages (5.10 from Debian 11, 6.1 and 6.12 from Debian 12), resolved by name so
//! that a newer point release is picked up, downloaded with a private apt configuration (the
//! machine's own sources stay untouched), cached, and booted under qemu with virtme-ng, which
//! shares this machine's root file system read-only: the guest runs the test binaries built
//! here, with this machine's `ip`, `ss` and `nft`. One line per kernel says how it went.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{output, run};

/// The kernels run when none is named: Debian 11's, Debian 12's and Debian 12's backport.
pub const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12"];
/// Test binaries (monitor/tests/*.rs) run in each guest: every kernel program and map is
/// exercised by `kernel` (states, timers, sweep, retransmits, resets, full maps, lost records)
/// and `ground` (seeding from sock_diag, untracked ends, the CLOSE_WAIT leak scan, drift).
/// The exact suite is not among them yet: under software emulation it still fails now and then
/// (README, "Exact against the kernel"); run it with `--suite exact`.
pub const DEFAULT_SUITES: &[&str] = &["kernel", "ground"];
const VIRTME_NG: &str = "1.42";
/// Debian packages the runner needs: qemu, kmod (depmod for the unpacked modules) and a static
/// busybox (virtme-ng's initramfs, which loads the 9p modules of a distribution kernel).
const APT: &[&str] = &["qemu-system-x86", "kmod", "busybox-static"];
/// Longest a guest may take (boot plus tests) before it is stopped.
const GUEST_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The guest prints this, then a suite's name and exit code, for each suite it ran (qemu's own
/// exit code says nothing: virtme-ng exits 255 here even when the guest ran fine).
const MARK: &str = "TWMON-VM-SUITE";

pub struct Options {
    pub kernels: Vec<String>,
    pub suites: Vec<String>,
    pub filter: Vec<String>,
}

/// One kernel's outcome.
struct Outcome {
    kernel: String,
    passed: usize,
    failed: usize,
    ok: bool,
    secs: f64,
    note: String,
}

pub fn run_matrix(opts: &Options) -> Result<()> {
    crate::setup::ensure()?;
    ensure_tools()?;
    let bins = build_tests(&opts.suites)?;
    let out_root = crate::root().join("target/vm");
    let mut outcomes = Vec::new();
    for k in &opts.kernels {
        let run = || {
            let start = Instant::now();
            let outcome = if k == "host" {
                run_host(&bins, &opts.filter, &out_root.join("host"))
            } else {
                kernel_image(k).and_then(|(release, image)| {
                    run_guest(&release, &image, &bins, &opts.filter, &out_root)
                })
            };
            outcome.unwrap_or_else(|e| Outcome {
                kernel: k.clone(),
                passed: 0,
                failed: 0,
                ok: false,
                secs: start.elapsed().as_secs_f64(),
                note: format!("{e:#}"),
            })
        };
        let mut outcome = run();
        // A guest kernel that panicked (seen twice on 6.12 under software emulation: an int3
        // in enqueue_timer, a double fault in kmalloc under a 9p read) says nothing about the
        // tests: that kernel is booted once more, and the crash is kept and said.
        if let Some(crash) = guest_panic(&out_root.join(&outcome.kernel)).filter(|_| !outcome.ok) {
            let kept = out_root.join(format!("{}-panicked-console.log", outcome.kernel));
            let _ = fs::copy(out_root.join(&outcome.kernel).join("console.log"), &kept);
            eprintln!(
                "vm: {}: the guest kernel panicked ({crash}); booting it once more",
                outcome.kernel
            );
            outcome = run();
            outcome.note = format!(
                "{} (booted twice: the first boot's kernel panicked, {})",
                outcome.note,
                kept.display()
            );
        }
        println!("{}", line(&outcome));
        outcomes.push(outcome);
    }
    println!("vm: kernel matrix");
    for o in &outcomes {
        println!("  {}", line(o));
    }
    let sum = |f: fn(&Outcome) -> usize| outcomes.iter().map(f).sum::<usize>();
    println!("vm: {} passed, {} failed", sum(|o| o.passed), sum(|o| o.failed));
    let failed: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.kernel.as_str()).collect();
    if !failed.is_empty() {
        bail!("the tests failed on {}; logs are under {}", failed.join(", "), out_root.display());
    }
    Ok(())
}

/// The first Oops line of a guest whose kernel panicked, from its console log.
fn guest_panic(out: &Path) -> Option<String> {
    let console = fs::read_to_string(out.join("console.log")).ok()?;
    if !console.contains("Kernel panic - not syncing") {
        return None;
    }
    let oops = console
        .lines()
        .find(|l| l.contains("Oops") || l.contains("BUG:"))
        .unwrap_or("Kernel panic");
    Some(oops.trim().to_string())
}

impl Outcome {
    /// Done: a kernel on which no test ran has not passed.
    fn finish(mut self, start: Instant) -> Self {
        self.secs = start.elapsed().as_secs_f64();
        if self.ok && self.passed == 0 {
            self.fail("no test ran (does the filter match any?)".into());
        }
        self
    }

    fn fail(&mut self, why: String) {
        self.ok = false;
        self.note = if self.note.is_empty() { why } else { format!("{}; {why}", self.note) };
    }
}

fn line(o: &Outcome) -> String {
    let verdict = if o.ok { "PASS" } else { "FAIL" };
    let note = if o.note.is_empty() { String::new() } else { format!(": {}", o.note) };
    format!(
        "vm {}: {verdict}: {} passed, {} failed in {:.0} s{note}",
        o.kernel, o.passed, o.failed, o.secs
    )
}

/// qemu, kmod, busybox from Debian; virtme-ng from PyPI.
fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> = APT.iter().copied().filter(|p| !crate::setup::installed(p)).collect();
    if !missing.is_empty() {
        crate::setup::apt_install(&missing)?;
    }
    if output(Command::new(vng()).arg("--version")).is_none() {
        eprintln!("vm: installing virtme-ng {VIRTME_NG}");
        run(Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--break-system-packages"])
            .arg(format!("virtme-ng=={VIRTME_NG}")))
        .context("installing virtme-ng with pip failed")?;
    }
    Ok(())
}

/// virtme-ng's command, from the scripts directory of the python3 that pip installed it for:
/// found even where that directory is not on PATH or a version manager's shims are stale.
fn vng() -> PathBuf {
    output(
        Command::new("python3")
            .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]),
    )
    .map(|dir| PathBuf::from(dir.trim()).join("vng"))
    .filter(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("vng"))
}

/// Builds the agent and the test binaries and returns (suite, executable) for each suite.
fn build_tests(suites: &[String]) -> Result<Vec<(String, PathBuf)>> {
    run(Command::new("cargo").args(["build", "--release", "--package", "monitor"]))?;
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--release", "--package", "monitor", "--no-run", "--message-format=json"]);
    for s in suites {
        cmd.args(["--test", s]);
    }
    eprintln!("+ {cmd:?}");
    let out = cmd.current_dir(crate::root()).stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut bins = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        if let Some(exe) = msg["executable"].as_str()
            && suites.iter().any(|s| s == name)
        {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if bins.len() != suites.len() {
        bail!("expected test binaries for {suites:?}, cargo built {bins:?}");
    }
    Ok(bins)
}

/// Where downloaded kernels are kept between runs (and between clones).
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("twmon/vm")
}

/// A private apt configuration over the machine's own Debian mirrors, with Debian 11's suites
/// beside Debian 12's: `apt-get` and `apt-cache` take these options to use it.
fn apt_options(cache: &Path) -> Result<Vec<String>> {
    let apt = cache.join("apt");
    for d in ["etc", "lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(apt.join(d))?;
    }
    let sources = private_sources()?;
    let file = apt.join("etc/twmon.sources");
    let changed = fs::read_to_string(&file).ok().as_deref() != Some(sources.as_str());
    fs::write(&file, &sources)?;
    let opts: Vec<String> = [
        "Dir::Etc::SourceList=/dev/null".to_string(),
        format!("Dir::Etc::SourceParts={}", apt.join("etc").display()),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        // The cache is root's; apt's download user could not write it.
        "APT::Sandbox::User=root".to_string(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_string(), o])
    .collect();
    let stamp = apt.join("lists/updated");
    let fresh = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(24 * 3600));
    if changed || !fresh {
        eprintln!(
            "vm: updating the package lists of Debian 11 and 12 (private apt state in {})",
            apt.display()
        );
        run(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
        fs::write(&stamp, b"")?;
    }
    Ok(opts)
}

/// The machine's Debian sources (deb822) with each suite of this release also given for
/// Debian 11 (bookworm -> bullseye, bookworm-security -> bullseye-security).
fn private_sources() -> Result<String> {
    let path = "/etc/apt/sources.list.d/debian.sources";
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "reading {path}: the VM runner reuses the machine's Debian mirrors (deb822 format, \
                 as on Debian 12)"
        )
    })?;
    Ok(rewrite_sources(&text))
}

fn rewrite_sources(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| match l.strip_prefix("Suites:") {
            Some(suites) => {
                let mut out: Vec<String> = Vec::new();
                for s in suites.split_whitespace().filter(|s| !s.ends_with("-updates")) {
                    out.push(s.to_string());
                    if s.starts_with("bookworm") {
                        out.push(s.replacen("bookworm", "bullseye", 1));
                    }
                }
                format!("Suites: {}", out.join(" "))
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The newest Debian package of kernel series `series` ("6.1") among `names`.
fn newest_package(series: &str, names: &str) -> Option<String> {
    let prefix = format!("linux-image-{series}.");
    names
        .lines()
        .map(str::trim)
        .filter_map(|n| {
            let middle = n.strip_prefix(&prefix)?.strip_suffix("-amd64-unsigned")?;
            // 6.1.0-57, 5.10.0-46, 6.12.117+deb12; not 6.1.0-0.deb11.52 (a backport), cloud or rt.
            let (patch, abi) = middle.split_once(['-', '+'])?;
            let abi = abi.strip_prefix("deb").unwrap_or(abi);
            let key = (patch.parse::<u32>().ok()?, abi.parse::<u32>().ok()?);
            Some((key, n.to_string()))
        })
        .max()
        .map(|(_, n)| n)
}

/// Downloads (once) and unpacks kernel series `series`; returns its release and image.
fn kernel_image(series: &str) -> Result<(String, PathBuf)> {
    let cache = cache_dir();
    let opts = apt_options(&cache)?;
    let names = output(
        Command::new("apt-cache").args(&opts).args(["pkgnames", &format!("linux-image-{series}.")]),
    )
    .unwrap_or_default();
    let pkg = newest_package(series, &names).with_context(|| {
        format!(
            "no Debian kernel package linux-image-{series}.*-amd64-unsigned; known series: \
                 5.10, 6.1, 6.12"
        )
    })?;
    let release = pkg.trim_start_matches("linux-image-").trim_end_matches("-unsigned").to_string();
    let root = cache.join("kernels").join(&release);
    let image = root.join(format!("boot/vmlinuz-{release}"));
    if !image.exists() {
        let dl = cache.join("downloads");
        fs::create_dir_all(&dl)?;
        eprintln!("vm: downloading {pkg}");
        // `apt-get download` writes to its working directory (so not through `run`, which sets it).
        let status = Command::new("apt-get")
            .args(&opts)
            .args(["download", "-qq", &pkg])
            .current_dir(&dl)
            .status()?;
        if !status.success() {
            bail!("apt-get download {pkg} failed: {status}");
        }
        let deb = fs::read_dir(&dl)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&format!("{pkg}_")))
            })
            .with_context(|| format!("apt-get download left no {pkg}_*.deb in {}", dl.display()))?;
        let tmp = cache.join("kernels").join(format!(".{release}.tmp"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        run(Command::new("depmod").arg("-b").arg(&tmp).arg(&release))?;
        fs::rename(&tmp, &root)?;
        fs::remove_file(&deb)?;
    }
    Ok((release, image))
}

/// The script the guest runs: each suite's binary with the filter, its output to a file, and a
/// marker line with its exit code.
fn guest_script(bins: &[(String, PathBuf)], filter: &[String], out: &Path) -> String {
    let mut s = String::from("#!/bin/bash\n# Written by cargo xtask vm; run inside the guest.\n");
    s += &format!("cd {}\n", crate::root().join("monitor").display());
    s += &format!("echo \"{MARK}-BOOTED $(uname -r)\"\n");
    for (suite, bin) in bins {
        let args: Vec<String> =
            filter.iter().map(|f| format!("'{}'", f.replace('\'', ""))).collect();
        s += &format!(
            "{} {} --test-threads 16 > {}/{suite}.log 2>&1\necho \"{MARK} {suite} $?\"\n",
            bin.display(),
            args.join(" "),
            out.display()
        );
    }
    // Kernel warnings and oopses during the run (a program the verifier warns about, a crash):
    // the agent must leave a kernel's log clean.
    s += &format!(
        "dmesg | grep -A3 -e 'cut here' -e 'BUG:' -e 'Oops' > {}/dmesg-warnings.log\n",
        out.display()
    );
    s += &format!(
        "echo \"{MARK}-DMESG $(grep -c -e 'cut here' -e 'BUG:' -e 'Oops' {}/dmesg-warnings.log)\"\n",
        out.display()
    );
    s
}

/// Boots `image` and runs the suites in it.
fn run_guest(
    release: &str,
    image: &Path,
    bins: &[(String, PathBuf)],
    filter: &[String],
    out_root: &Path,
) -> Result<Outcome> {
    let out = out_root.join(release);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let script = out.join("guest.sh");
    fs::write(&script, guest_script(bins, filter, &out))?;
    let start = Instant::now();
    // KVM where it works; some hosts have /dev/kvm but refuse what qemu asks of it (nested
    // virtualization), and the guest never starts: then software emulation.
    let mut console = String::new();
    let mut modes = vec![false];
    if Path::new("/dev/kvm").exists() {
        modes.insert(0, true);
    }
    for kvm in modes {
        console = boot(image, &script, &out, kvm)?;
        if console.contains(&format!("{MARK}-BOOTED")) {
            break;
        }
        if kvm {
            eprintln!("vm: {release} did not start with KVM; trying software emulation");
        }
    }
    fs::write(out.join("console.log"), &console)?;
    let mut outcome = Outcome {
        kernel: release.to_string(),
        passed: 0,
        failed: 0,
        ok: true,
        secs: 0.0,
        note: String::new(),
    };
    for (suite, _) in bins {
        let code = console
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix(MARK)?
                    .strip_prefix(' ')?
                    .strip_prefix(suite.as_str())?
                    .strip_prefix(' ')
            })
            .next()
            .and_then(|c| c.trim().parse::<i32>().ok());
        tally(&mut outcome, suite, code, &out.join(format!("{suite}.log")));
    }
    let warnings = console
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{MARK}-DMESG "))?.trim().parse::<u32>().ok());
    match warnings {
        Some(0) => {}
        Some(n) => outcome.fail(format!(
            "{n} kernel warnings (see {})",
            out.join("dmesg-warnings.log").display()
        )),
        None => outcome.fail("the guest did not report its kernel log".into()),
    }
    Ok(outcome.finish(start))
}

/// One boot of the guest; returns its console output.
fn boot(image: &Path, script: &Path, out: &Path, kvm: bool) -> Result<String> {
    let mut cmd = Command::new(vng());
    cmd.arg("--run").arg(image);
    if !kvm {
        cmd.arg("--disable-kvm");
    }
    // 9p for the shared root: virtme-ng's virtiofs needs a virtiofsd this machine lacks, and
    // waits for it first.
    cmd.args(["--cpus", "2", "--memory", "4G", "--force-9p", "--verbose"])
        .arg(format!("--rwdir={}", out.display()))
        .arg("--exec")
        .arg(format!("bash {}", script.display()))
        .stdin(Stdio::null());
    eprintln!("+ {cmd:?}");
    let log = out.join("vng.log");
    let file = fs::File::create(&log)?;
    cmd.stdout(file.try_clone()?).stderr(file);
    let mut child = cmd.spawn().context("starting vng (virtme-ng)")?;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(fs::read_to_string(&log).unwrap_or_default())
}

/// The suites on this machine's own kernel, the same way.
fn run_host(bins: &[(String, PathBuf)], filter: &[String], out: &Path) -> Result<Outcome> {
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out)?;
    let start = Instant::now();
    let release =
        fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let mut outcome = Outcome {
        kernel: format!("host {release}"),
        passed: 0,
        failed: 0,
        ok: true,
        secs: 0.0,
        note: String::new(),
    };
    for (suite, bin) in bins {
        let log = out.join(format!("{suite}.log"));
        let status = Command::new(bin)
            .args(filter)
            .args(["--test-threads", "16"])
            .current_dir(crate::root().join("monitor"))
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::options().append(true).open(&log)?)
            .status()?;
        tally(&mut outcome, suite, status.code(), &log);
    }
    Ok(outcome.finish(start))
}

/// Adds one suite's result (its exit code, None when it never reported, and its log).
fn tally(outcome: &mut Outcome, suite: &str, code: Option<i32>, log: &Path) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let (passed, failed) = counts(&text);
    outcome.passed += passed;
    outcome.failed += failed;
    let why = match code {
        // A filter may leave a suite with nothing to run; a kernel that ran none at all fails
        // (see `Outcome::finish`).
        Some(0) => return,
        Some(c) => {
            let names: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
                .collect();
            // The log stays behind on a machine that may be gone (CI): print why here.
            eprintln!("vm: {suite} failed; from {}:\n{}", log.display(), failures(&text));
            format!("{suite} exited {c} (failed: {}; see {})", names.join(", "), log.display())
        }
        None => {
            format!("{suite} did not report (see {})", log.with_file_name("console.log").display())
        }
    };
    outcome.fail(why);
}

/// libtest's account of the failures (each failed test's output and panic), at most 80 lines.
fn failures(log: &str) -> String {
    let lines: Vec<&str> = log.lines().skip_while(|l| *l != "failures:").take(80).collect();
    if lines.is_empty() { "(no failures section)".into() } else { lines.join("\n") }
}

/// Passed and failed counts from libtest's `test result:` line.
fn counts(log: &str) -> (usize, usize) {
    let Some(line) = log.lines().rev().find(|l| l.starts_with("test result:")) else {
        return (0, 0);
    };
    let num = |word: &str| {
        line.split(';')
            .find(|p| p.trim().ends_with(word))
            .and_then(|p| p.split_whitespace().rev().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (num("passed"), num("failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_package_of_a_series() {
        let names = "linux-image-6.1.0-9-amd64-unsigned\nlinux-image-6.1.0-57-amd64-unsigned\n\
                     linux-image-6.1.0-0.deb11.52-amd64-unsigned\nlinux-image-6.1.0-57-cloud-amd64-unsigned\n\
                     linux-image-6.12.117+deb12-amd64-unsigned\nlinux-image-6.12.99+deb12-amd64-unsigned\n\
                     linux-image-5.10.0-46-amd64-unsigned\nlinux-image-5.10.0-46-rt-amd64-unsigned\n";
        assert_eq!(newest_package("6.1", names).unwrap(), "linux-image-6.1.0-57-amd64-unsigned");
        assert_eq!(
            newest_package("6.12", names).unwrap(),
            "linux-image-6.12.117+deb12-amd64-unsigned"
        );
        assert_eq!(newest_package("5.10", names).unwrap(), "linux-image-5.10.0-46-amd64-unsigned");
        assert_eq!(newest_package("5.15", names), None);
    }

    #[test]
    fn sources_gain_debian_11_suites() {
        let machine = "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\n\
                       Suites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\n\
                       URIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n";
        let out = rewrite_sources(machine);
        assert!(out.contains("Suites: bookworm bullseye\n"), "{out}");
        assert!(out.contains("Suites: bookworm-security bullseye-security\n"), "{out}");
        assert!(!out.contains('#'));
    }

    #[test]
    fn reads_libtest_counts() {
        let log = "test a ... ok\ntest result: FAILED. 11 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(counts(log), (11, 1));
        assert_eq!(counts("nothing"), (0, 0));
    }
}
