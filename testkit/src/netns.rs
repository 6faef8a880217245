//! Network namespaces of a test's own (`ip netns add`), deleted on drop, and the kernel's view
//! from inside one: `ss`, /proc/net counters and sysctls.
use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// Every name starts so: `twmon-<pid>-<n>-<tag>`, so that one left by a killed run is known
/// ([`remove_stale`]).
const PREFIX: &str = "twmon-";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command that must succeed and returns its standard output.
fn run(cmd: &mut Command) -> String {
    let out =
        cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with its loopback up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name =
            format!("{PREFIX}{}-{}-{tag}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }

    /// Moves the calling thread into the namespace: sockets it makes from now on live there.
    pub fn enter(&self) -> std::io::Result<()> {
        let f = File::open(self.path())?;
        // SAFETY: setns on a descriptor we hold; a thread of a multi-threaded process may enter
        // a network namespace on its own.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread inside the namespace and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter().unwrap_or_else(|e| panic!("entering {}: {e}", self.name));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Sets the loopback's MTU: at 1500 bytes, segment and timer rates are an Ethernet NIC's.
    pub fn set_mtu(&self, mtu: u32) {
        self.exec(&["ip", "link", "set", "lo", "mtu", &mtu.to_string()]);
    }

    /// Sets per-namespace sysctls (`net/ipv4/...`, a path under /proc/sys) and reads them back.
    pub fn sysctls(&self, settings: &[(&str, &str)]) {
        self.run(|| {
            for (key, value) in settings {
                let p = format!("/proc/sys/{key}");
                fs::write(&p, value)
                    .unwrap_or_else(|e| panic!("writing {value} to {p} in {}: {e}", self.name));
                let got = fs::read_to_string(&p).unwrap_or_default();
                let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
                assert_eq!(
                    words(&got),
                    words(value),
                    "{p} in {} after writing {value:?}",
                    self.name
                );
            }
        })
    }

    /// A file under /proc/net as this namespace sees it (`sockstat`, `netstat`, `snmp`, ...).
    pub fn proc_net(&self, file: &str) -> String {
        self.run(|| fs::read_to_string(format!("/proc/thread-self/net/{file}")))
            .unwrap_or_else(|e| panic!("reading /proc/net/{file} in {}: {e}", self.name))
    }

    /// TCP sockets `ss` shows in a state (its names: TIME-WAIT, FIN-WAIT-2, CLOSE-WAIT ...), as
    /// (local, peer) address pairs.
    pub fn ss(&self, state: &str) -> Vec<(String, String)> {
        ss_in(&self.ss_all(), state)
    }

    /// Every TCP socket, as `ss -tanH` prints them. The full dump rather than `ss state X`: the
    /// kernel's sock_diag leaves timewait sockets out of a FIN-WAIT-2 query but reports the
    /// orphaned FIN_WAIT2 ones as FIN-WAIT-2 in a full dump.
    pub fn ss_all(&self) -> String {
        self.exec(&["ss", "-tanH"])
    }

    /// A counter of the kernel's own in this namespace: `group` is a line prefix of
    /// /proc/net/netstat (`TcpExt`) or /proc/net/snmp (`Tcp`), `key` a column of it.
    pub fn counter(&self, group: &str, key: &str) -> u64 {
        counter_in(&self.counters(), group, key)
    }

    /// /proc/net/netstat and /proc/net/snmp together, for [`counter_in`].
    pub fn counters(&self) -> String {
        self.proc_net("netstat") + &self.proc_net("snmp")
    }

    /// The `tw` count of /proc/net/sockstat: the timewait sockets of this namespace.
    pub fn sockstat_tw(&self) -> u64 {
        let text = self.proc_net("sockstat");
        let line = text.lines().find(|l| l.starts_with("TCP:")).expect("a TCP line in sockstat");
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words.iter().position(|w| *w == "tw").expect("tw in sockstat");
        words[i + 1].parse().expect("a tw count")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The sockets of an `ss -tanH` dump in `state`, as (local, peer) address pairs.
pub fn ss_in(dump: &str, state: &str) -> Vec<(String, String)> {
    dump.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 5 && w[0] == state).then(|| (w[3].to_string(), w[4].to_string()))
        })
        .collect()
}

/// A counter from the text of /proc/net/netstat and /proc/net/snmp: `group` is a line prefix
/// (`TcpExt`, `Tcp`), `key` a column of it.
pub fn counter_in(text: &str, group: &str, key: &str) -> u64 {
    let (_, v) = group_in(text, group)
        .into_iter()
        .find(|(n, _)| n == key)
        .unwrap_or_else(|| panic!("{group} {key} in /proc/net/netstat or snmp"));
    u64::try_from(v).unwrap_or_else(|_| panic!("{group} {key} is {v}, not a counter"))
}

/// Every counter of a group (`TcpExt`, `Tcp`) from the text of /proc/net/netstat and
/// /proc/net/snmp, by name, in the kernel's order. Signed: a few are not counters (`Tcp MaxConn`
/// is -1).
pub fn group_in(text: &str, group: &str) -> Vec<(String, i64)> {
    let prefix = format!("{group}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(lines.len(), 2, "{group} in /proc/net/netstat or snmp");
    let names = lines[0].split_whitespace().skip(1);
    let values = lines[1].split_whitespace().skip(1);
    names
        .zip(values)
        .map(|(n, v)| {
            (n.to_string(), v.parse().unwrap_or_else(|_| panic!("{group} {n}: {v} is no number")))
        })
        .collect()
}

/// Deletes the namespaces a run that is gone left behind (killed before its drops ran).
pub fn remove_stale() {
    let Ok(dir) = fs::read_dir("/run/netns") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("deleting network namespace {name}, left by a run that is gone");
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}
