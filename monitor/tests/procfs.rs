//! `netns` and `procfs` against the real kernel, as root: namespaces of the test's own with
//! different sysctls and different traffic, read from threads that entered them, compared with
//! what `ip netns exec ... sysctl` and `ss` say.
use std::{
    collections::HashSet,
    io::Write,
    net::TcpListener,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use testkit::{
    netns::Netns,
    workload::{Close, Server},
};
use twmon::view::{
    netns::{self, Namespace},
    procfs::{self, Sysctls, TcpExt},
};

/// The agent's own way into a namespace ([`netns::visit`]), which these tests exercise.
trait Visit {
    fn namespace(&self) -> Namespace;
    fn visit<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T;
}

impl Visit for Netns {
    fn namespace(&self) -> Namespace {
        let inode =
            netns::inode_of(Path::new(&self.path())).expect("inode of a namespace just made");
        Namespace {
            inode,
            path: self.path().into(),
            name: format!("netns/{}", self.name),
            pid: None,
        }
    }

    fn visit<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let mut f = Some(f);
        let mut done =
            netns::visit(vec![self.namespace()], move |_| f.take().map(|f| f())).expect("a thread");
        let (_, r) = done.pop().expect("one namespace");
        r.unwrap_or_else(|e| panic!("entering {}: {e}", self.name)).expect("run once")
    }
}

/// A file, removed on drop.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A child process, killed on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sysctls_are_those_of_the_entered_namespace() {
    let (a, b) = (Netns::new("procfs"), Netns::new("procfs"));
    a.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.tcp_max_tw_buckets=1111",
        "net.ipv4.ip_local_port_range=20000 20999",
        "net.ipv4.ip_local_reserved_ports=20010-20019,20500,40000",
        "net.ipv4.tcp_fin_timeout=17",
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    b.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.tcp_max_tw_buckets=2222",
        "net.ipv4.ip_local_port_range=30000 30499",
        "net.ipv4.tcp_fin_timeout=23",
        "net.ipv4.tcp_tw_reuse=0",
    ]);
    // One thread visits a, b and a again: each reading is the namespace entered last.
    let visited =
        netns::visit(vec![a.namespace(), b.namespace(), a.namespace()], |_| procfs::read_sysctls());
    let mut read: Vec<Sysctls> = visited
        .expect("a thread")
        .into_iter()
        .map(|(ns, r)| r.expect("entered").expect(&ns.name))
        .collect();
    let (in_a, in_b) = (read.remove(0), read.remove(0));
    assert_eq!(read, vec![in_a.clone()], "a's sysctls after b's");
    assert_eq!(
        in_a,
        Sysctls {
            tcp_max_tw_buckets: 1111,
            ip_local_port_range: (20000, 20999),
            tcp_fin_timeout: 17,
            tcp_tw_reuse: 1,
            // 10 + 1 inside the range; 40000 is outside it.
            ip_local_reserved_ports: 11,
        }
    );
    assert_eq!(in_a.ephemeral_ports(), 989, "{in_a:?}");
    assert_eq!(
        in_b,
        Sysctls {
            tcp_max_tw_buckets: 2222,
            ip_local_port_range: (30000, 30499),
            tcp_fin_timeout: 23,
            tcp_tw_reuse: 0,
            ip_local_reserved_ports: 0,
        }
    );
    assert_eq!(in_b.ephemeral_ports(), 500, "{in_b:?}");

    // The calling thread never left its own namespace.
    let here = procfs::read_sysctls().expect("sysctls here");
    let want = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets")
        .expect("the host's sysctl");
    assert_eq!(here.tcp_max_tw_buckets.to_string(), want.trim(), "{here:?}");
}

/// `n` connections closed by the client first (which keeps the timewait socket), and one where
/// the server closes with unread data (a reset, `TCPAbortOnClose`). Client and server both live
/// in the calling thread's namespace.
fn close_connections(n: usize) {
    let server = Server::bind("127.0.0.1:0");
    for _ in 0..n {
        Close::ClientFirst.run(server.connect());
    }
    let (mut client, server) = server.connect();
    client.write_all(b"unread").expect("write");
    // Wait until the data is queued at the server, then close without reading it.
    let mut buf = [0u8; 6];
    assert_eq!(server.peek(&mut buf).expect("peek"), 6);
    drop(server);
}

#[test]
fn timewait_is_counted_in_its_own_namespace() {
    const N: usize = 5;
    let (a, b) = (Netns::new("procfs"), Netns::new("procfs"));
    let before = a.visit(|| procfs::read_tcpext().expect("TcpExt in a"));
    assert_eq!(before, TcpExt::default(), "a new namespace starts at zero");
    a.visit(|| close_connections(N));

    // TIME_WAIT begins when the server's FIN arrives; on loopback that is at once, but allow
    // the softirq a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tw_a = loop {
        let tw = a.visit(|| procfs::read_sockstat().expect("sockstat in a").tw);
        if tw >= N as u64 || Instant::now() > deadline {
            break tw;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ss_a = a.exec(&["ss", "-tanH", "state", "time-wait"]).lines().count();
    let ext_a = a.visit(|| procfs::read_tcpext().expect("TcpExt in a"));
    let tw_b = b.visit(|| procfs::read_sockstat().expect("sockstat in b").tw);
    let ext_b = b.visit(|| procfs::read_tcpext().expect("TcpExt in b"));
    eprintln!("a: sockstat tw {tw_a}, ss {ss_a}, {ext_a:?}\nb: sockstat tw {tw_b}, {ext_b:?}");

    assert_eq!(tw_a, N as u64, "sockstat tw in a");
    assert_eq!(ss_a, N, "TIME-WAIT sockets ss shows in a");
    assert_eq!(ext_a.tw, N as u64, "TcpExt TW in a: {ext_a:?}");
    assert_eq!(ext_a.tcp_abort_on_close, 1, "TcpExt TCPAbortOnClose in a: {ext_a:?}");
    assert_eq!(tw_b, 0, "sockstat tw in b");
    assert_eq!(ext_b, TcpExt::default(), "TcpExt in b");
}

#[test]
fn discover_lists_named_namespaces() {
    let (a, b) = (Netns::new("procfs"), Netns::new("procfs"));
    // A process living in a: discover reports it as a's pid.
    let sleeper = Reaped(
        Command::new("ip")
            .args(["netns", "exec", &a.name, "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start a process in a"),
    );
    let sleeper_pid = sleeper.0.id() as i32;
    let want_ns = a.namespace().inode;
    let deadline = Instant::now() + Duration::from_secs(5);
    // `ip netns exec` enters the namespace, then execs sleep under the same pid.
    while netns::inode_of(Path::new(&format!("/proc/{sleeper_pid}/ns/net"))).ok() != Some(want_ns) {
        assert!(Instant::now() < deadline, "the process never entered {}", a.name);
        std::thread::sleep(Duration::from_millis(10));
    }

    // What `ip netns add` leaves when interrupted before the bind mount: a plain file.
    let stale =
        Removed(PathBuf::from(format!("/run/netns/twmon-procfs-{}-stale", std::process::id())));
    std::fs::write(&stale.0, b"").expect("a stale file in /run/netns");

    let start = Instant::now();
    let found = netns::discover();
    let took = start.elapsed();
    let processes = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|s| s.parse::<u32>().is_ok()))
        .count();
    eprintln!("discover: {} namespaces, {processes} processes, {took:?}", found.len());
    for ns in &found {
        eprintln!("  {:>10} {:<40} pid {:?} {}", ns.inode, ns.name, ns.pid, ns.path.display());
    }

    // PID 1's namespace; PID 1 may be out of reach (a sandbox's init with more capabilities
    // than root has here), then kthreadd's, which is the same initial namespace.
    let host = netns::inode_of(Path::new("/proc/1/ns/net"))
        .or_else(|_| netns::inode_of(Path::new("/proc/2/ns/net")))
        .expect("the host's namespace");
    assert_eq!(netns::host_inode().ok(), Some(host));
    assert_eq!(
        found.first().map(|n| (n.inode, n.name.as_str())),
        Some((host, "host")),
        "{found:#?}"
    );
    let unique: HashSet<u32> = found.iter().map(|n| n.inode).collect();
    assert_eq!(unique.len(), found.len(), "an inode listed twice: {found:#?}");
    for (ns, pid) in [(&a, Some(sleeper_pid)), (&b, None)] {
        let inode = netns::inode_of(Path::new(&ns.path())).unwrap();
        let got = found.iter().find(|n| n.inode == inode);
        let want =
            Namespace { inode, path: ns.path().into(), name: format!("netns/{}", ns.name), pid };
        assert_eq!(got, Some(&want), "{found:#?}");
        // Entering what discover found lands in that namespace.
        let mut visited = netns::visit(vec![want.clone()], |_| {
            netns::inode_of(Path::new("/proc/thread-self/ns/net"))
        })
        .expect("a thread");
        let inside = visited.pop().expect("one").1.expect("enter").expect("inode inside");
        assert_eq!(inside, inode);
    }
    assert!(!found.iter().any(|n| n.path == stale.0), "{found:#?}");
    let names = netns::named();
    assert_eq!(names.get(&a.name), Some(&a.namespace().inode), "{names:?}");
    let stale_name = stale.0.file_name().unwrap().to_str().unwrap();
    assert!(!names.contains_key(stale_name), "{names:?}");
    // Entering moved only the helper thread.
    let process = netns::inode_of(Path::new("/proc/self/ns/net")).unwrap();
    let thread = netns::inode_of(Path::new("/proc/thread-self/ns/net")).unwrap();
    assert_eq!((process, thread), (host, host));
    drop(sleeper);
}

/// A cgroup of the test's own, made in the cgroup v2 hierarchy (the unified one of a hybrid
/// setup); removed on drop, deepest first, once its processes are gone. The leaf is the last
/// of `dirs`.
struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Makes `relative` (a/b/c) and every level above it; removes on drop the levels it made.
    fn new(relative: &str) -> Self {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
            .expect("a cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
        let mut dirs = Vec::new();
        let mut dir = root;
        for part in relative.split('/') {
            dir.push(part);
            match std::fs::create_dir(&dir) {
                Ok(()) => dirs.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("mkdir {}: {e}", dir.display()),
            }
        }
        Self { dirs }
    }

    fn add(&self, pid: u32) {
        let procs = self.dirs.last().expect("a cgroup made by this test").join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", procs.display()));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // A cgroup can only go once its last process has been reaped.
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `args` run in the background with exactly `env`; waits until it lives in the network
/// namespace `ns` (an inode), then moves it into `cgroup`.
fn start_in(args: &[&str], env: &[(&str, &str)], ns: Option<u32>, cgroup: &Cgroup) -> Reaped {
    let child = Reaped(
        Command::new(args[0])
            .args(&args[1..])
            .env_clear()
            .envs(env.iter().copied())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    let host = netns::inode_of(Path::new("/proc/self/ns/net")).unwrap();
    loop {
        // `ip netns exec` and `unshare` enter the namespace, then exec under the same pid.
        let now = netns::inode_of(Path::new(&format!("/proc/{pid}/ns/net"))).ok();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let entered = match ns {
            Some(ns) => now == Some(ns),
            None => now.is_some_and(|n| n != host),
        };
        if entered && exe.is_some_and(|e| e.ends_with("sleep")) {
            break;
        }
        assert!(Instant::now() < deadline, "{args:?} never entered its namespace");
        std::thread::sleep(Duration::from_millis(10));
    }
    cgroup.add(pid);
    child
}

/// Pods and containers named from real /proc: processes in cgroups laid out as kubelet's
/// cgroupfs driver and Docker's systemd driver lay them out, with the environment a container
/// runtime gives them.
#[test]
fn discover_names_pods_and_containers() {
    let me = std::process::id();
    let uid = format!("{:08x}-4a5b-6c7d-8e9f-a0b1c2d3e4f5", me);
    let id = |n: u32| format!("{me:08x}{n:056x}");
    let top = format!("kubepods-twmon-test-{me}");
    let pod = Netns::new("procfs");
    // The pod's pause process: no HOSTNAME. Its application container: HOSTNAME and
    // POD_NAMESPACE, as the runtime and the Downward API set them.
    let pause_cg = Cgroup::new(&format!("{top}/pod{uid}/{}", id(1)));
    let app_cg = Cgroup::new(&format!("{top}/pod{uid}/{}", id(2)));
    let pod_inode = pod.namespace().inode;
    let sleep = ["ip", "netns", "exec", &pod.name, "sleep", "60"];
    let pause = start_in(&sleep, &[("PATH", "/usr/bin:/bin")], Some(pod_inode), &pause_cg);
    let app = start_in(
        &sleep,
        &[("PATH", "/usr/bin:/bin"), ("HOSTNAME", "web-0"), ("POD_NAMESPACE", "shop")],
        Some(pod_inode),
        &app_cg,
    );
    // A Docker container (systemd driver) in a namespace with no name.
    let docker_cg = Cgroup::new(&format!("docker-{}.scope", id(3)));
    let container = start_in(
        &["unshare", "--net", "sleep", "60"],
        &[("PATH", "/usr/bin:/bin")],
        None,
        &docker_cg,
    );
    let container_pid = container.0.id() as i32;
    let container_inode =
        netns::inode_of(Path::new(&format!("/proc/{container_pid}/ns/net"))).unwrap();

    let found = netns::discover();
    let got_pod = found.iter().find(|n| n.inode == pod_inode);
    let want_pod = Namespace {
        inode: pod_inode,
        path: pod.path().into(),
        name: "pod/shop/web-0".into(),
        pid: Some(pause.0.id().min(app.0.id()) as i32),
    };
    assert_eq!(got_pod, Some(&want_pod), "{found:#?}");
    let got_container = found.iter().find(|n| n.inode == container_inode);
    let want_container = Namespace {
        inode: container_inode,
        path: format!("/proc/{container_pid}/ns/net").into(),
        name: format!("container/{}", &id(3)[..12]),
        pid: Some(container_pid),
    };
    assert_eq!(got_container, Some(&want_container), "{found:#?}");
    // name_for looks at one process: the pause process alone gives only the pod's UID.
    let pause_pid = Some(pause.0.id() as i32);
    assert_eq!(netns::name_for(pause_pid, Some(&pod.name), pod_inode, 1), format!("pod/{uid}"));
    drop((pause, app, container));
}

#[test]
fn socket_owners_finds_this_process() {
    let a = Netns::new("procfs");
    // A socket made inside a namespace, held here: its owner is this process all the same.
    let listener = a.visit(|| TcpListener::bind("127.0.0.1:0").expect("listen in a"));
    let here = TcpListener::bind("127.0.0.1:0").expect("listen here");
    let inode_of = |fd: i32| {
        // SAFETY: a valid fd and a stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::fstat(fd, &mut st) },
            0,
            "fstat: {}",
            std::io::Error::last_os_error()
        );
        st.st_ino as u64
    };
    let (ia, ih) = (inode_of(listener.as_raw_fd()), inode_of(here.as_raw_fd()));
    // The same number as /proc/self/fd shows.
    let link = std::fs::read_link(format!("/proc/self/fd/{}", here.as_raw_fd())).unwrap();
    assert_eq!(link.to_str(), Some(format!("socket:[{ih}]").as_str()));
    let nobody = u64::MAX;

    let fds: usize = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|s| s.parse::<u32>().is_ok()))
        .filter_map(|e| std::fs::read_dir(e.path().join("fd")).ok())
        .map(|d| d.count())
        .sum();
    let start = Instant::now();
    let owners = procfs::socket_owners(&HashSet::from([ia, ih, nobody]));
    let took = start.elapsed();
    eprintln!("socket_owners: {fds} fds on the machine, {took:?}: {owners:?}");

    let pid = std::process::id() as i32;
    // comm is the executable's name cut to 15 bytes.
    let exe = std::env::current_exe().unwrap();
    let comm: String = exe.file_name().unwrap().to_str().unwrap().chars().take(15).collect();
    // Besides this process, a child another test is starting at this moment holds every fd
    // until its exec closes the close-on-exec ones: extra owners are possible, this one is sure.
    for inode in [ia, ih] {
        let found = owners.get(&inode).cloned().unwrap_or_default();
        assert!(found.contains(&(pid, comm.clone())), "{owners:?}");
    }
    assert_eq!(owners.get(&nobody), None, "{owners:?}");
    assert_eq!(owners.len(), 2, "{owners:?}");

    // A second process holding the same socket (inherited across fork/exec) is listed too.
    let fd = here.as_raw_fd();
    let mut sleep = Command::new("sleep");
    sleep.arg("60").stdin(Stdio::null());
    // SAFETY: fcntl is async-signal-safe; clearing FD_CLOEXEC in the forked child only, so
    // processes other tests start meanwhile do not inherit the socket.
    unsafe {
        sleep.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    let child = Reaped(sleep.spawn().expect("start sleep"));
    let child_pid = child.0.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    let owners = loop {
        let owners = procfs::socket_owners(&HashSet::from([ih]));
        let done =
            owners.get(&ih).is_some_and(|o| o.iter().any(|(p, c)| *p == child_pid && c == "sleep"));
        if done || Instant::now() > deadline {
            break owners;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let found = owners.get(&ih).cloned().unwrap_or_default();
    assert!(
        found.contains(&(pid, comm.clone())) && found.contains(&(child_pid, "sleep".to_string())),
        "{owners:?}"
    );
    drop(child);
    drop(listener);
}
