//! Network namespaces: finding them, naming them for people, and entering them.
//!
//! The kernel programs see every namespace at once and tag what they report with the namespace's
//! inode number (`net->ns.inum`); this module turns such a number into something an operator
//! recognises ("host", "netns/blue", "pod/shop/web-7d9f8b6c5-x2k4q", "container/3f2a9c1b7e4d") and
//! gives the agent a way to read a namespace's own view (/proc, sysctls, sock_diag) by running
//! code on a thread that has entered it.
//!
//! Naming reads only local files (/proc/PID/cgroup, /proc/PID/environ, a file inside the
//! container's root); it never asks the container runtime or the Kubernetes API. The parsing is
//! done by pure functions ([`workload_from_cgroup`], [`environ_get`], [`pod_label`]) so every
//! runtime's layout is covered by fixtures in the tests below.
//!
//! Over 400 lines on purpose: finding, naming and entering are one concern (a namespace is
//! found through a process, and named and entered through the same one), and the naming
//! parsers stay beside the lookups that feed them.
use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

/// Where iproute2 (`ip netns add`) and CNI plugins bind-mount named namespaces.
pub const NAMED_DIR: &str = "/run/netns";

/// `statfs.f_type` of nsfs, the file system namespace files live on.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// How many processes of one namespace are looked at to name it. A pod or container has a
/// handful; the cap only bounds the work for a namespace with thousands of processes.
const NAMING_PIDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "cannot open network namespace {path}: {source}; the namespace may be gone (its last \
         process exited, or `ip netns del` removed it), or twmon is not running as root"
    )]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not a namespace file (it is not on nsfs); give a /run/netns/NAME or a \
         /proc/PID/ns/net path"
    )]
    NotNamespace { path: PathBuf },
    #[error(
        "{path} now opens network namespace {found}, not {expected}: the process that held it \
         exited and its pid was reused; list the namespaces again"
    )]
    Replaced { path: PathBuf, expected: u32, found: u32 },
    #[error(
        "cannot enter network namespace {path}: {source}; entering a namespace needs \
         CAP_SYS_ADMIN: run twmon as root"
    )]
    Enter { path: PathBuf, source: io::Error },
    #[error(
        "cannot start a thread to enter network namespace {path}: {source}; the system is out \
         of threads or memory (see ulimit -u and /proc/sys/kernel/threads-max)"
    )]
    Thread { path: PathBuf, source: io::Error },
}

impl From<NetnsError> for io::Error {
    /// Keeps the kind of the underlying error, so callers can still match on `NotFound` or
    /// `PermissionDenied`; the message is [`NetnsError`]'s, which says what to do.
    fn from(e: NetnsError) -> Self {
        let kind = match &e {
            NetnsError::Open { source, .. }
            | NetnsError::Enter { source, .. }
            | NetnsError::Thread { source, .. } => source.kind(),
            NetnsError::NotNamespace { .. } => io::ErrorKind::InvalidInput,
            NetnsError::Replaced { .. } => io::ErrorKind::NotFound,
        };
        io::Error::new(kind, e)
    }
}

/// A network namespace the agent can enter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// `st_ino` of the nsfs file: the number the kernel reports as `net->ns.inum`.
    pub inode: u32,
    /// A file that opens it: /run/netns/NAME, or /proc/PID/ns/net.
    pub path: PathBuf,
    /// Human name, see [`name_for`].
    pub name: String,
    /// A process living in it (the lowest pid), if any.
    pub pid: Option<i32>,
}

/// Every network namespace reachable from here: /proc/*/ns/net of every process (deduplicated
/// by inode, the lowest pid kept) plus /run/netns/* (iproute2 and CNI named namespaces, also
/// those with no process). The host's namespace (the one of /proc/1/ns/net) is named "host" and
/// comes first; the others follow in inode order.
///
/// Only thread-group leaders are looked at (/proc/PID, not /proc/PID/task/TID): a namespace
/// that only a single thread has entered, with no name in /run/netns, is not found. Entries
/// that cannot be read (processes that exit meanwhile, stale /run/netns files whose namespace
/// is gone) are skipped.
pub fn discover() -> Vec<Namespace> {
    discover_counting_hidden().0
}

/// [`discover`], and how many processes' network namespaces could not be seen (their
/// /proc/PID/ns/net needs CAP_SYS_PTRACE when they belong to another user).
pub fn discover_counting_hidden() -> (Vec<Namespace>, usize) {
    let mut hidden = 0;
    let host = host_inode().unwrap_or_else(|e| {
        tracing::debug!(
            "cannot tell the host's network namespace, none will be named \"host\": {e}"
        );
        0
    });
    // inode -> pids living in it, ascending (/proc lists pids in order, but do not rely on it).
    let mut pids: HashMap<u32, Vec<i32>> = HashMap::new();
    for pid in proc_pids() {
        match std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| u32::try_from(m.ino())) {
            Ok(Ok(inode)) => pids.entry(inode).or_default().push(pid),
            // Kernel threads live in the initial namespace; another user's process may not.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !is_kthread(pid) => {
                hidden += 1
            }
            // Gone, or a kernel thread / zombie without namespaces.
            _ => continue,
        }
    }
    for list in pids.values_mut() {
        list.sort_unstable();
    }
    // inode -> the first name in /run/netns that opens it.
    let mut named: HashMap<u32, String> = HashMap::new();
    for (name, inode) in self::named() {
        named.entry(inode).or_insert(name);
    }

    let mut inodes: Vec<u32> = pids.keys().chain(named.keys()).copied().collect();
    inodes.sort_unstable();
    inodes.dedup();
    let mut out: Vec<Namespace> = inodes
        .into_iter()
        .filter_map(|inode| {
            let own = pids.get(&inode).map(Vec::as_slice).unwrap_or(&[]);
            let name = named.get(&inode).map(String::as_str);
            let path = match (name, own.first()) {
                // The named file outlives any process, so it is the better handle.
                (Some(n), _) => Path::new(NAMED_DIR).join(n),
                (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
                // Every inode came from a pid or a name.
                (None, None) => return None,
            };
            let name = name_from_pids(own, name, inode, host);
            Some(Namespace { inode, path, name, pid: own.first().copied() })
        })
        .collect();
    out.sort_by_key(|ns| (ns.inode != host, ns.inode));
    (out, hidden)
}

fn is_kthread(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_flags(&s))
        .is_some_and(|f| f & PF_KTHREAD != 0)
}

/// Inode of the calling thread's network namespace.
pub fn own_inode() -> io::Result<u32> {
    inode_of(Path::new("/proc/thread-self/ns/net"))
}

/// Inode of the host's network namespace: PID 1's. When PID 1's cannot be read (the agent
/// has fewer capabilities than PID 1, as under some sandboxes), that of PID 2 if it is a kernel
/// thread (kthreadd, when /proc shows the host's pids): kernel threads always live in the
/// initial network namespace.
pub fn host_inode() -> io::Result<u32> {
    inode_of(Path::new("/proc/1/ns/net")).or_else(|first| {
        if is_kthread(2) {
            inode_of(Path::new("/proc/2/ns/net")).map_err(|_| first)
        } else {
            Err(first)
        }
    })
}

/// `task->flags` bit of kernel threads.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The flags field of a /proc/PID/stat line (the 9th; the command name before it is in
/// parentheses and may hold spaces and parentheses itself).
fn stat_flags(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(6)?.parse().ok()
}

fn proc_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
}

/// Name for a namespace, tried in this order:
///
/// 1. `host` when `inode == host_inode` (PID 1's namespace);
/// 2. a Kubernetes pod, when the cgroup of `pid` lies under `kubepods`:
///    `pod/<k8s-namespace>/<pod-name>`, or `pod/<pod-name>` when the namespace is unknown, or
///    `pod/<pod-uid>` when the name is too. The pod name is the process's `HOSTNAME`
///    environment variable, which the container runtimes set to the pod's hostname: the pod name
///    unless the pod sets `spec.hostname`. The namespace is `POD_NAMESPACE` from the environment
///    (the usual Downward API variable) or else the `namespace` file of the service account
///    Kubernetes mounts into containers (read inside the container's root). Pods are named ahead
///    of `/run/netns` names because CNI plugins name pod namespaces `cni-<uuid>`, which tells an
///    operator nothing;
/// 3. `netns/<NAME>` when `named` is given (the namespace is /run/netns/NAME);
/// 4. `container/<first 12 characters of the id>` when the cgroup is a container's (Docker,
///    containerd, CRI-O, Podman; systemd and cgroupfs drivers; cgroup v1 and v2);
/// 5. `inode/<inode>`.
///
/// [`discover`] looks at several processes of a namespace (a pod's pause process has no
/// `HOSTNAME`; its application containers do); this function looks at `pid` only.
pub fn name_for(pid: Option<i32>, named: Option<&str>, inode: u32, host_inode: u32) -> String {
    name_from_pids(pid.as_slice(), named, inode, host_inode)
}

fn name_from_pids(pids: &[i32], named: Option<&str>, inode: u32, host_inode: u32) -> String {
    if inode == host_inode {
        return "host".into();
    }
    let pids = &pids[..pids.len().min(NAMING_PIDS)];
    let workloads: Vec<(i32, Workload)> = pids
        .iter()
        .filter_map(|&pid| {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
            Some((pid, workload_from_cgroup(&cgroup)?))
        })
        .collect();
    let pod_uid = workloads.iter().find_map(|(_, w)| match w {
        Workload::Pod { uid, .. } => Some(uid.as_str()),
        Workload::Container { .. } => None,
    });
    if let Some(uid) = pod_uid {
        let mut pod_name = None;
        let mut k8s_namespace = None;
        for (pid, w) in &workloads {
            if !matches!(w, Workload::Pod { uid: u, .. } if u == uid) {
                continue;
            }
            let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
            if pod_name.is_none() {
                pod_name = environ_get(&environ, "HOSTNAME")
                    .filter(|n| is_dns_subdomain(n))
                    .map(String::from);
            }
            if k8s_namespace.is_none() {
                k8s_namespace = environ_get(&environ, "POD_NAMESPACE")
                    .filter(|n| is_dns_label(n))
                    .map(String::from)
                    .or_else(|| service_account_namespace(*pid));
            }
            if pod_name.is_some() && k8s_namespace.is_some() {
                break;
            }
        }
        return pod_label(uid, pod_name.as_deref(), k8s_namespace.as_deref());
    }
    if let Some(name) = named {
        return format!("netns/{name}");
    }
    if let Some(id) = workloads.iter().find_map(|(_, w)| match w {
        Workload::Container { id } => Some(id),
        Workload::Pod { .. } => None,
    }) {
        return format!("container/{}", &id[..12]);
    }
    format!("inode/{inode}")
}

/// The `namespace` file Kubernetes mounts with a pod's service account token, read inside the
/// process's root: `openat2(RESOLVE_IN_ROOT)` resolves the image's absolute symlinks (often
/// /var/run -> /run) inside the container instead of on the host, where a file of the same
/// path (the agent's own, when it runs in a pod) would give a wrong answer.
fn service_account_namespace(pid: i32) -> Option<String> {
    let root = File::open(format!("/proc/{pid}/root")).ok()?;
    [
        "var/run/secrets/kubernetes.io/serviceaccount/namespace",
        "run/secrets/kubernetes.io/serviceaccount/namespace",
    ]
    .into_iter()
    .find_map(|path| {
        let text = read_in_root(&root, path).ok()?;
        let ns = text.trim();
        is_dns_label(ns).then(|| ns.to_string())
    })
}

fn read_in_root(root: &File, path: &str) -> io::Result<String> {
    use std::io::Read as _;
    let path = CString::new(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    // Symlinks are followed, inside the root: the file is a link to ..data/namespace in the
    // projected volume.
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid fd, NUL-terminated path, and a pointer to `how` with its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let mut text = String::new();
    // A namespace name is at most 63 bytes; do not read more than a page of anything.
    (&mut file).take(4096).read_to_string(&mut text)?;
    Ok(text)
}

/// What a process's cgroup says about the workload it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// A Kubernetes pod; `container` is the container's full id when the cgroup names it (not
    /// for a pod's own cgroup or for CRI-O's `conmon`).
    Pod { uid: String, container: Option<String> },
    /// A container outside Kubernetes; the full 64-character id.
    Container { id: String },
}

/// The workload a /proc/PID/cgroup text (every line, cgroup v1 or v2) belongs to, if any.
///
/// Recognised layouts, by the path's segments:
/// - pods: a segment `pod<UID>` under `kubepods` (cgroupfs driver), or `kubepods-pod<UID>.slice`
///   / `kubepods-<qos>-pod<UID>.slice` (systemd driver, where the UID's dashes are underscores);
/// - containers: `docker-<ID>.scope`, `cri-containerd-<ID>.scope`, `crio-<ID>.scope`,
///   `libpod-<ID>.scope` (systemd driver), `/docker/<ID>` and a bare `<ID>` under `kubepods`
///   (cgroupfs driver), and runc's `<slice>:<prefix>:<ID>` notation.
///
/// IDs are 64 hexadecimal characters; anything else (a 32-character directory of some other
/// manager, `crio-conmon-<ID>.scope`) is not taken for a container.
pub fn workload_from_cgroup(cgroup: &str) -> Option<Workload> {
    let mut container_only = None;
    for line in cgroup.lines() {
        // hierarchy-ID:controller-list:cgroup-path; the path may itself hold colons.
        let Some(path) = line.splitn(3, ':').nth(2) else { continue };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let kube = segments.iter().any(|s| s.starts_with("kubepods"));
        let mut uid = None;
        let mut container = None;
        for (i, seg) in segments.iter().enumerate() {
            // runc's systemd notation puts several names in one segment.
            for part in seg.split(':') {
                if kube && uid.is_none() {
                    uid = pod_uid(part);
                }
                if container.is_none() {
                    let parent = i.checked_sub(1).map(|p| segments[p]);
                    container = container_id(part, parent, kube);
                }
            }
        }
        match (uid, container) {
            (Some(uid), container) => return Some(Workload::Pod { uid, container }),
            (None, Some(id)) if container_only.is_none() => container_only = Some(id),
            _ => {}
        }
    }
    container_only.map(|id| Workload::Container { id })
}

/// The pod UID in one cgroup path segment, with dashes.
fn pod_uid(seg: &str) -> Option<String> {
    let raw = if let Some(rest) = seg.strip_suffix(".slice") {
        // kubepods-pod<UID>.slice, kubepods-burstable-pod<UID>.slice
        rest.starts_with("kubepods").then(|| rest.rsplit_once("-pod").map(|(_, uid)| uid))??
    } else {
        seg.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    // A UUID, or the 32-hex-digit hash kubelet gives static pods.
    let ok = (32..=36).contains(&uid.len())
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && uid.bytes().filter(|b| b.is_ascii_hexdigit()).count() == 32;
    ok.then_some(uid)
}

/// The container id in one cgroup path segment (a part of it, in runc's colon notation).
fn container_id(seg: &str, parent: Option<&str>, kube: bool) -> Option<String> {
    let name = seg.strip_suffix(".scope").unwrap_or(seg);
    for prefix in ["docker-", "cri-containerd-", "crio-", "libpod-"] {
        if let Some(id) = name.strip_prefix(prefix) {
            return is_container_id(id).then(|| id.to_string());
        }
    }
    // cgroupfs driver: /docker/<ID>, /kubepods/<qos>/pod<UID>/<ID>; runc's "slice:prefix:<ID>".
    (is_container_id(name) && (kube || parent == Some("docker"))).then(|| name.to_string())
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The value of `key` in a /proc/PID/environ buffer (NUL-separated `KEY=value` entries), if
/// present and UTF-8.
pub fn environ_get<'a>(environ: &'a [u8], key: &str) -> Option<&'a str> {
    environ.split(|&b| b == 0).find_map(|entry| {
        let value = entry.strip_prefix(key.as_bytes())?.strip_prefix(b"=")?;
        std::str::from_utf8(value).ok()
    })
}

/// The name of a pod namespace, as [`name_for`] documents: `pod/<namespace>/<name>`,
/// `pod/<name>` or `pod/<uid>`.
pub fn pod_label(uid: &str, name: Option<&str>, k8s_namespace: Option<&str>) -> String {
    match (name, k8s_namespace) {
        (Some(name), Some(ns)) => format!("pod/{ns}/{name}"),
        (Some(name), None) => format!("pod/{name}"),
        (None, _) => format!("pod/{uid}"),
    }
}

/// A Kubernetes object name (RFC 1123 subdomain): what a pod name can be. Anything else in
/// `HOSTNAME` is not taken for one.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A Kubernetes namespace name (RFC 1123 label).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Runs `f` inside each namespace in turn and returns its result for each, or why that one
/// could not be entered: the sockets, netlink sockets, /proc/thread-self/net/* and
/// /proc/sys/net/* that `f` opens are those of the namespace it runs in. All on one thread of
/// its own, entering each namespace with setns(2):
/// the agent's threads stay where they are, and hundreds of namespaces cost one thread, not one
/// each. If `f` panics, the panic is resumed on the calling thread.
///
/// Note that /proc/net (= /proc/self/net) follows the *process's* first thread, not the calling
/// thread: code in `f` must read /proc/thread-self/net/*, as [`crate::view::procfs`] does.
pub fn visit<T: Send + 'static>(
    namespaces: Vec<Namespace>,
    mut f: impl FnMut(&Namespace) -> T + Send + 'static,
) -> io::Result<Vec<(Namespace, io::Result<T>)>> {
    let path = namespaces.first().map(|n| n.path.clone()).unwrap_or_default();
    let handle = std::thread::Builder::new()
        .name("twmon-netns".into())
        .spawn(move || {
            namespaces
                .into_iter()
                .map(|ns| {
                    let r = enter(&ns).map(|()| f(&ns));
                    (ns, r)
                })
                .collect()
        })
        .map_err(|source| NetnsError::Thread { path, source })?;
    match handle.join() {
        Ok(results) => Ok(results),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Moves the calling thread into `ns`, after checking that `ns.path` still opens the namespace
/// `ns.inode` (a /proc/PID/ns/net path can change owner when the pid is reused).
fn enter(ns: &Namespace) -> io::Result<()> {
    let path = &ns.path;
    let file =
        File::open(path).map_err(|source| NetnsError::Open { path: path.clone(), source })?;
    let found = file
        .metadata()
        .map_err(|source| NetnsError::Open { path: path.clone(), source })
        .and_then(|m| check_nsfs(path, &file, m.ino()))?;
    if found != ns.inode {
        return Err(NetnsError::Replaced { path: path.clone(), expected: ns.inode, found }.into());
    }
    // Already there: no setns, which needs CAP_SYS_ADMIN (the agent's own namespace, under a
    // unit or a hostNetwork pod that grants only what the kernel programs need).
    if own_inode().is_ok_and(|own| own == found) {
        return Ok(());
    }
    // SAFETY: a valid namespace fd; setns changes only the calling thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let source = io::Error::last_os_error();
        return Err(NetnsError::Enter { path: path.clone(), source }.into());
    }
    Ok(())
}

/// The kind of namespace `file` is (`libc::CLONE_NEWNET` for a network namespace), from the
/// NS_GET_NSTYPE ioctl (Linux 4.11); an error for a file that is not a namespace.
pub fn namespace_type(file: &File) -> io::Result<i32> {
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703; // _IO(0xb7, 0x3)
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads which namespace the fd is.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Inode of the namespace at a path (a /run/netns/NAME bind mount or a /proc/PID/ns/* link).
/// Fails with `InvalidInput` when the path is not a namespace file (for example a /run/netns
/// entry whose namespace was unmounted).
pub fn inode_of(path: &Path) -> io::Result<u32> {
    let file =
        File::open(path).map_err(|source| NetnsError::Open { path: path.to_path_buf(), source })?;
    let ino = file
        .metadata()
        .map_err(|source| NetnsError::Open { path: path.to_path_buf(), source })?
        .ino();
    Ok(check_nsfs(path, &file, ino)?)
}

fn check_nsfs(path: &Path, file: &File, ino: u64) -> Result<u32, NetnsError> {
    // SAFETY: statfs is plain data; fstatfs fills it from a valid fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if rc != 0 {
        return Err(NetnsError::Open {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between architectures
    if st.f_type as i64 != NSFS_MAGIC {
        return Err(NetnsError::NotNamespace { path: path.to_path_buf() });
    }
    // nsfs inode numbers are the kernel's 32-bit `ns.inum`.
    u32::try_from(ino).map_err(|_| NetnsError::NotNamespace { path: path.to_path_buf() })
}

/// The names in /run/netns and the inode each opens, by name; entries that do not open a
/// namespace (left behind after the namespace was unmounted) are skipped. For callers that
/// resolve a `--netns NAME` flag, and for [`discover`].
pub fn named() -> BTreeMap<String, u32> {
    let Ok(dir) = std::fs::read_dir(NAMED_DIR) else { return BTreeMap::new() };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            match inode_of(&e.path()) {
                Ok(inode) => Some((name, inode)),
                Err(err) => {
                    tracing::debug!("skipping {}: {err}", e.path().display());
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b7e4d5a6b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d";
    const UID: &str = "0f1c2d3e-4a5b-6c7d-8e9f-a0b1c2d3e4f5";
    const UID_SYSTEMD: &str = "0f1c2d3e_4a5b_6c7d_8e9f_a0b1c2d3e4f5";

    fn pod(container: Option<&str>) -> Option<Workload> {
        Some(Workload::Pod { uid: UID.into(), container: container.map(String::from) })
    }

    fn container() -> Option<Workload> {
        Some(Workload::Container { id: ID.into() })
    }

    #[test]
    fn docker_cgroupfs_v1() {
        let text = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n4:cpu,cpuacct:/docker/{ID}\n\
             1:name=systemd:/docker/{ID}\n0::/system.slice/containerd.service\n"
        );
        assert_eq!(workload_from_cgroup(&text), container());
    }

    #[test]
    fn docker_systemd_v2() {
        assert_eq!(
            workload_from_cgroup(&format!("0::/system.slice/docker-{ID}.scope\n")),
            container()
        );
        // systemd running inside the container moves itself into a child cgroup.
        assert_eq!(
            workload_from_cgroup(&format!("0::/system.slice/docker-{ID}.scope/init.scope\n")),
            container()
        );
    }

    #[test]
    fn podman_v2() {
        let text = format!("0::/machine.slice/libpod-{ID}.scope/container\n");
        assert_eq!(workload_from_cgroup(&text), container());
    }

    #[test]
    fn containerd_systemd_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/\
             cri-containerd-{ID}.scope\n"
        );
        assert_eq!(workload_from_cgroup(&text), pod(Some(ID)));
    }

    #[test]
    fn containerd_cgroupfs_v1() {
        let text = format!(
            "11:memory:/kubepods/burstable/pod{UID}/{ID}\n5:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n"
        );
        assert_eq!(workload_from_cgroup(&text), pod(Some(ID)));
        // Guaranteed pods have no QoS level in the path.
        assert_eq!(workload_from_cgroup(&format!("0::/kubepods/pod{UID}/{ID}\n")), pod(Some(ID)));
    }

    #[test]
    fn containerd_systemd_v1_runc_notation() {
        let text = format!(
            "11:memory:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/\
             cri-containerd-{ID}.scope\n\
             1:name=systemd:/system.slice/containerd.service/\
             kubepods-besteffort-pod{UID_SYSTEMD}.slice:cri-containerd:{ID}\n"
        );
        assert_eq!(workload_from_cgroup(&text), pod(Some(ID)));
        let only_systemd = format!(
            "1:name=systemd:/system.slice/containerd.service/kubepods-pod{UID_SYSTEMD}.slice:cri-containerd:{ID}\n"
        );
        assert_eq!(workload_from_cgroup(&only_systemd), pod(Some(ID)));
    }

    #[test]
    fn crio_systemd_v2() {
        let text = format!("0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-{ID}.scope\n");
        assert_eq!(workload_from_cgroup(&text), pod(Some(ID)));
        // conmon lives in the pod's cgroup but is not a container.
        let conmon =
            format!("0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope\n");
        assert_eq!(workload_from_cgroup(&conmon), pod(None));
    }

    #[test]
    fn crio_cgroupfs_v1() {
        let text = format!("10:memory:/kubepods/besteffort/pod{UID}/crio-{ID}\n");
        assert_eq!(workload_from_cgroup(&text), pod(Some(ID)));
    }

    #[test]
    fn static_pod_uid_is_a_hash() {
        let hash = "8d3ac6c2b1e04f6f9b1d2c3e4f5a6b7c";
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(
            workload_from_cgroup(&text),
            Some(Workload::Pod { uid: hash.into(), container: Some(ID.into()) })
        );
    }

    #[test]
    fn host_processes_are_no_workload() {
        for text in [
            "0::/\n",
            "0::/system.slice/sshd.service\n",
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "0::/init.scope\n",
            // Another manager's 32-character directory: not a container id.
            "9:name=systemd:/\n4:memory:/process_api/4928b82033ebd2220775e7346a8c9caa\n0::/\n",
            // A 64-hex directory outside docker and kubepods.
            &format!("0::/system.slice/{ID}\n"),
            // A pod-looking segment outside kubepods.
            &format!("0::/system.slice/pod{UID}\n"),
            // Odd content must not panic.
            "garbage\n::\n0::\n\n",
            "",
        ] {
            assert_eq!(workload_from_cgroup(text), None, "{text:?}");
        }
    }

    #[test]
    fn environ() {
        let env =
            b"PATH=/usr/bin\0HOSTNAME=web-7d9f8b6c5-x2k4q\0KUBERNETES_SERVICE_HOST=10.96.0.1\0\
                    POD_NAMESPACE=shop\0EMPTY=\0BAD=\xff\0";
        assert_eq!(environ_get(env, "HOSTNAME"), Some("web-7d9f8b6c5-x2k4q"));
        assert_eq!(environ_get(env, "POD_NAMESPACE"), Some("shop"));
        assert_eq!(environ_get(env, "EMPTY"), Some(""));
        assert_eq!(environ_get(env, "BAD"), None);
        assert_eq!(environ_get(env, "HOST"), None);
        assert_eq!(environ_get(env, "PATH"), Some("/usr/bin"));
        assert_eq!(environ_get(b"", "PATH"), None);
    }

    #[test]
    fn pod_labels() {
        assert_eq!(pod_label(UID, Some("web-0"), Some("shop")), "pod/shop/web-0");
        assert_eq!(pod_label(UID, Some("web-0"), None), "pod/web-0");
        assert_eq!(pod_label(UID, None, Some("shop")), format!("pod/{UID}"));
        assert!(is_dns_subdomain("web-7d9f8b6c5-x2k4q"));
        assert!(is_dns_subdomain("etcd-node1.example"));
        assert!(!is_dns_subdomain("Web_1"));
        assert!(!is_dns_subdomain(""));
        assert!(is_dns_label("kube-system"));
        assert!(!is_dns_label("-x"));
        assert!(!is_dns_label("a.b"));
    }

    #[test]
    fn names() {
        // The host wins over everything, even a name.
        assert_eq!(name_for(None, Some("blue"), 7, 7), "host");
        assert_eq!(name_for(None, Some("blue"), 8, 7), "netns/blue");
        assert_eq!(name_for(None, None, 8, 7), "inode/8");
        // A process that is not a container or pod.
        let me = std::process::id() as i32;
        if workload_from_cgroup(&std::fs::read_to_string("/proc/self/cgroup").unwrap()).is_none() {
            assert_eq!(name_for(Some(me), None, 9, 7), "inode/9");
            assert_eq!(name_for(Some(me), Some("red"), 9, 7), "netns/red");
        }
        // A pid that does not exist.
        assert_eq!(name_for(Some(i32::MAX), None, 10, 7), "inode/10");
    }

    #[test]
    fn stat() {
        let kthreadd = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 6 0 0";
        assert_eq!(stat_flags(kthreadd), Some(2129984));
        assert_ne!(stat_flags(kthreadd).unwrap() & PF_KTHREAD, 0);
        let odd_name = "29897 (a) b (c) R 29893 29893 17926 0 -1 4194304 91 0 0 0";
        assert_eq!(stat_flags(odd_name).map(|f| f & PF_KTHREAD), Some(0));
        assert_eq!(stat_flags("29897 (cat"), None);
        assert_eq!(stat_flags(""), None);
    }

    #[test]
    fn inode_of_checks_the_file_system() {
        let own = inode_of(Path::new("/proc/self/ns/net")).expect("own namespace");
        assert_ne!(own, 0);
        let e = inode_of(Path::new("/proc/self/status")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        let e = inode_of(Path::new("/run/netns/twmon-does-not-exist")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("root"), "{e}");
    }

    #[test]
    fn visit_refuses_a_replaced_namespace() {
        let own = inode_of(Path::new("/proc/self/ns/net")).unwrap();
        let ns = Namespace {
            inode: own + 1,
            path: "/proc/self/ns/net".into(),
            name: "x".into(),
            pid: None,
        };
        let mut results = visit(vec![ns], |_| ()).unwrap();
        let e = results.pop().unwrap().1.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("list the namespaces again"), "{e}");
    }
}
