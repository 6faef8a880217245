//! The kernel's own counters and limits for TCP teardown, from procfs, for the calling thread's
//! network namespace; and which processes hold given sockets.
//!
//! Per-namespace files are read through /proc/thread-self/net/ and /proc/sys/net/, which
//! follow the calling *thread's* namespace, so a thread started by
//! [`crate::view::netns::visit`] reads the namespace it entered. /proc/net (a link to
//! /proc/self/net) would not do: it follows the process's first thread.
use std::{
    collections::{HashMap, HashSet},
    io,
    os::unix::ffi::OsStrExt,
};

const NETSTAT: &str = "/proc/thread-self/net/netstat";
const SOCKSTAT: &str = "/proc/thread-self/net/sockstat";
const SOCKSTAT6: &str = "/proc/thread-self/net/sockstat6";
const MAX_TW_BUCKETS: &str = "/proc/sys/net/ipv4/tcp_max_tw_buckets";
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const FIN_TIMEOUT: &str = "/proc/sys/net/ipv4/tcp_fin_timeout";
const TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    #[error(
        "cannot read {path}: {source}; twmon needs /proc mounted (in a container: the host's \
         /proc, with hostPID) and runs as root"
    )]
    Read { path: &'static str, source: io::Error },
    #[error(
        "{path}: {what}; this kernel writes it in a way twmon does not know, please report it \
         with the file's content: {text:?}"
    )]
    Format { path: &'static str, what: &'static str, text: String },
}

impl From<ProcfsError> for io::Error {
    /// Keeps the kind of the underlying error (`NotFound`, `PermissionDenied`); a format the
    /// parser does not know is `InvalidData`. The message is [`ProcfsError`]'s.
    fn from(e: ProcfsError) -> Self {
        let kind = match &e {
            ProcfsError::Read { source, .. } => source.kind(),
            ProcfsError::Format { .. } => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

fn read(path: &'static str) -> Result<String, ProcfsError> {
    std::fs::read_to_string(path).map_err(|source| ProcfsError::Read { path, source })
}

fn format_error(path: &'static str, what: &'static str, text: &str) -> io::Error {
    let text = text.chars().take(200).collect();
    ProcfsError::Format { path, what, text }.into()
}

/// TcpExt counters of the calling thread's network namespace that concern teardown. All are
/// counts since the namespace was created.
///
/// What the kernel counts (net/ipv4/inet_timewait_sock.c, tcp.c, tcp_timer.c):
/// a timewait socket is counted when it is created and its timer first set, as `tw` when the
/// timer is longer than 4 s (TIME_WAIT's 60 s, or FIN_WAIT2 with tcp_fin_timeout above 4 s) and
/// as `tw_killed` otherwise; so `tw` is the number of connections that *entered* TIME_WAIT (or
/// orphaned FIN_WAIT2), not the number in it now (that is [`read_sockstat`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpExt {
    /// `TW`: timewait sockets created with a timer above 4 s.
    pub tw: u64,
    /// `TWRecycled`: timewait sockets reused for a new outgoing connection (tcp_tw_reuse).
    pub tw_recycled: u64,
    /// `TWKilled`: timewait sockets created with a timer of 4 s or less.
    pub tw_killed: u64,
    /// `TCPTimeWaitOverflow`: connections closed without a timewait socket because the
    /// namespace had tcp_max_tw_buckets of them already.
    pub timewait_overflow: u64,
    /// `TCPAbortOnClose`: reset sent because the application closed with unread data.
    pub tcp_abort_on_close: u64,
    /// `TCPAbortOnData`: reset sent on data arriving after close, or on close with SO_LINGER 0.
    pub tcp_abort_on_data: u64,
    /// `TCPAbortOnLinger`: reset sent when an orphaned FIN_WAIT2 ran out of tcp_fin_timeout
    /// (or a negative SO_LINGER2).
    pub tcp_abort_on_linger: u64,
    /// `TCPAbortOnTimeout`: connections dropped after too many retransmissions or probes.
    pub tcp_abort_on_timeout: u64,
}

/// The /proc/net/netstat format: each group is a header line of names and a line of values,
/// both starting with the group's name ("TcpExt:"). Counters missing from the text (older or
/// newer kernels) and values that are not numbers are left at 0.
pub fn parse_netstat(text: &str) -> TcpExt {
    let mut out = TcpExt::default();
    let mut lines = text.lines();
    while let Some(header) = lines.next() {
        let mut names = header.split_ascii_whitespace();
        if names.next() != Some("TcpExt:") {
            continue;
        }
        let Some(values) = lines.next() else { break };
        let mut values = values.split_ascii_whitespace();
        if values.next() != Some("TcpExt:") {
            continue;
        }
        for (name, value) in names.zip(values) {
            let Ok(value) = value.parse::<u64>() else { continue };
            let field = match name {
                "TW" => &mut out.tw,
                "TWRecycled" => &mut out.tw_recycled,
                "TWKilled" => &mut out.tw_killed,
                "TCPTimeWaitOverflow" => &mut out.timewait_overflow,
                "TCPAbortOnClose" => &mut out.tcp_abort_on_close,
                "TCPAbortOnData" => &mut out.tcp_abort_on_data,
                "TCPAbortOnLinger" => &mut out.tcp_abort_on_linger,
                "TCPAbortOnTimeout" => &mut out.tcp_abort_on_timeout,
                _ => continue,
            };
            *field = value;
        }
        break;
    }
    out
}

/// [`TcpExt`] of the calling thread's network namespace.
pub fn read_tcpext() -> io::Result<TcpExt> {
    let text = read(NETSTAT)?;
    // Every kernel twmon runs on has the group; without it all counters would read 0 silently.
    if !text.lines().any(|l| l.starts_with("TcpExt: TW ") || l.contains(" TW ")) {
        return Err(format_error(NETSTAT, "no TcpExt group with a TW counter", &text));
    }
    Ok(parse_netstat(&text))
}

/// Limits the teardown counters are measured against, for the calling thread's namespace (all
/// are per namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysctls {
    /// net.ipv4.tcp_max_tw_buckets: timewait sockets allowed at once (IPv4 and IPv6 together);
    /// beyond it connections close without one (`TCPTimeWaitOverflow`).
    pub tcp_max_tw_buckets: u64,
    /// net.ipv4.ip_local_port_range, inclusive (also used by IPv6).
    pub ip_local_port_range: (u16, u16),
    /// net.ipv4.tcp_fin_timeout, seconds an orphaned FIN_WAIT2 lives (not TIME_WAIT's length,
    /// which is fixed at 60 s).
    pub tcp_fin_timeout: u64,
    /// net.ipv4.tcp_tw_reuse: 0 off, 1 on, 2 on for loopback only.
    pub tcp_tw_reuse: u8,
    /// How many ports of net.ipv4.ip_local_reserved_ports fall inside `ip_local_port_range`:
    /// the ones that take ports away from outgoing connections. Reserved ports outside the
    /// range are not counted.
    pub ip_local_reserved_ports: usize,
}

impl Sysctls {
    /// Local ports outgoing connections can take: the range minus the reserved ports in it.
    pub fn ephemeral_ports(&self) -> u32 {
        let (lo, hi) = self.ip_local_port_range;
        let size = (u32::from(hi) + 1).saturating_sub(u32::from(lo));
        size.saturating_sub(u32::try_from(self.ip_local_reserved_ports).unwrap_or(u32::MAX))
    }
}

/// The sysctls of the calling thread's network namespace.
pub fn read_sysctls() -> io::Result<Sysctls> {
    fn number<T: std::str::FromStr>(path: &'static str) -> io::Result<T> {
        let text = read(path)?;
        text.trim().parse().map_err(|_| format_error(path, "not a number", &text))
    }
    let range_text = read(PORT_RANGE)?;
    let ip_local_port_range = parse_port_range(&range_text)
        .ok_or_else(|| format_error(PORT_RANGE, "not two port numbers", &range_text))?;
    let reserved_text = read(RESERVED_PORTS)?;
    let reserved = parse_port_list(&reserved_text).ok_or_else(|| {
        format_error(RESERVED_PORTS, "not a list of ports and port ranges", &reserved_text)
    })?;
    Ok(Sysctls {
        tcp_max_tw_buckets: number(MAX_TW_BUCKETS)?,
        ip_local_port_range,
        tcp_fin_timeout: number(FIN_TIMEOUT)?,
        tcp_tw_reuse: number(TW_REUSE)?,
        ip_local_reserved_ports: ports_within(&reserved, ip_local_port_range),
    })
}

/// "32768\t60999" -> (32768, 60999).
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut words = text.split_ascii_whitespace();
    let lo = words.next()?.parse().ok()?;
    let hi = words.next()?.parse().ok()?;
    words.next().is_none().then_some((lo, hi))
}

/// The ip_local_reserved_ports format, "8080,9000-9100" (empty when none), as inclusive ranges.
pub fn parse_port_list(text: &str) -> Option<Vec<(u16, u16)>> {
    let text = text.trim();
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|item| {
            let item = item.trim();
            match item.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => {
                    let p = item.parse().ok()?;
                    Some((p, p))
                }
            }
        })
        .collect()
}

/// How many distinct ports of `list` lie in the inclusive `range`.
pub fn ports_within(list: &[(u16, u16)], range: (u16, u16)) -> usize {
    let mut clipped: Vec<(u16, u16)> = list
        .iter()
        .map(|&(a, b)| (a.max(range.0), b.min(range.1)))
        .filter(|(a, b)| a <= b)
        .collect();
    clipped.sort_unstable();
    let mut count = 0usize;
    let mut next = 0u32; // first port not yet counted
    for (a, b) in clipped {
        let start = u32::from(a).max(next);
        if start <= u32::from(b) {
            count += (u32::from(b) - start + 1) as usize;
            next = u32::from(b) + 1;
        }
    }
    count
}

/// The TCP figures of /proc/net/sockstat and sockstat6 for the calling thread's namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sockstat {
    /// Full IPv4 TCP sockets in the kernel's hash tables (listening and connected).
    pub inuse4: u64,
    /// The same for IPv6 (0 where the kernel has no IPv6).
    pub inuse6: u64,
    /// Timewait sockets now, IPv4 and IPv6 together (the kernel keeps one count per namespace
    /// and sockstat6 has no such figure; verified with IPv6-only connections).
    pub tw: u64,
}

pub fn read_sockstat() -> io::Result<Sockstat> {
    let text = read(SOCKSTAT)?;
    let field = |name| {
        sockstat_field(&text, "TCP:", name)
            .ok_or_else(|| format_error(SOCKSTAT, "no \"TCP: ...\" line", &text))
    };
    let inuse6 = match read(SOCKSTAT6) {
        Ok(text6) => sockstat_field(&text6, "TCP6:", "inuse").unwrap_or(0),
        Err(ProcfsError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e.into()),
    };
    Ok(Sockstat { inuse4: field("inuse")?, inuse6, tw: field("tw")? })
}

/// A figure of a sockstat line: `name`'s value on the line that starts with `line`.
pub fn sockstat_field(text: &str, line: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(line))?;
    let mut words = line.split_ascii_whitespace();
    words.find(|w| *w == name)?;
    words.next()?.parse().ok()
}

/// Which processes hold the sockets with these inode numbers: scans every /proc/PID/fd/*
/// link for "socket:[INODE]" and returns inode -> (pid, comm) pairs, by pid, each pid once.
/// Inodes nobody holds are absent from the map.
///
/// Processes that exit during the scan, or whose fds cannot be read, are skipped. Threads
/// with an fd table of their own (clone without CLONE_FILES, rare) are not looked at. The cost
/// is one readlink per open fd on the machine (see the report in the module's tests), so call it
/// for a handful of sockets, not per scrape for all of them.
pub fn socket_owners(inodes: &HashSet<u64>) -> HashMap<u64, Vec<(i32, String)>> {
    let mut out: HashMap<u64, Vec<(i32, String)>> = HashMap::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(proc) = std::fs::read_dir("/proc") else { return out };
    for entry in proc.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let dir = format!("/proc/{pid}/fd");
        // The listing, and a handle to read each link relative to: a one-component lookup per
        // fd instead of resolving /proc/PID/fd/N from the root, which is most of the cost.
        let (Ok(fds), Ok(handle)) = (std::fs::read_dir(&dir), std::fs::File::open(&dir)) else {
            continue;
        };
        let mut comm: Option<Option<String>> = None;
        let mut target = [0u8; 64];
        for fd in fds.flatten() {
            let Some(target) = read_link_at(&handle, &fd.file_name(), &mut target) else {
                continue;
            };
            let Some(inode) = parse_socket_link(target) else { continue };
            if !inodes.contains(&inode) {
                continue;
            }
            // Read once per process, and only for processes that hold one of the sockets.
            let Some(name) = comm.get_or_insert_with(|| read_comm(pid)) else { break };
            let owners = out.entry(inode).or_default();
            if !owners.iter().any(|(p, _)| *p == pid) {
                owners.push((pid, name.clone()));
            }
        }
    }
    for owners in out.values_mut() {
        owners.sort_unstable();
    }
    out
}

/// readlinkat(2) into `buf`; None on error. A target longer than `buf` comes back cut short,
/// which is fine here: "socket:[N]" always fits and anything longer is not a socket.
fn read_link_at<'a>(
    dir: &std::fs::File,
    name: &std::ffi::OsStr,
    buf: &'a mut [u8],
) -> Option<&'a [u8]> {
    use std::os::fd::AsRawFd as _;
    let name = std::ffi::CString::new(name.as_bytes()).ok()?;
    // SAFETY: valid dir fd, NUL-terminated name, and a buffer with its length.
    let n = unsafe {
        libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    };
    usize::try_from(n).ok().map(|n| &buf[..n])
}

/// The process name, or None when the process has gone.
fn read_comm(pid: i32) -> Option<String> {
    let comm = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    Some(String::from_utf8_lossy(&comm).trim_end_matches('\n').trim().to_string())
}

/// "socket:[12345]" -> 12345.
pub fn parse_socket_link(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TcpExt and IpExt groups of /proc/net/netstat as a 6.18 kernel prints them (the
    /// teardown counters set to distinct values), then a shortened MPTcpExt group with a "TW" of
    /// its own: a group whose name ends in "TcpExt:" must not be read as TcpExt.
    const NETSTAT_FIXTURE: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv SyncookiesFailed EmbryonicRsts PruneCalled RcvPruned OfoPruned OutOfWindowIcmps LockDroppedIcmps ArpFilter TW TWRecycled TWKilled PAWSActive PAWSEstab BeyondWindow TSEcrRejected PAWSOldAck PAWSTimewait DelayedACKs DelayedACKLocked DelayedACKLost ListenOverflows ListenDrops TCPHPHits TCPPureAcks TCPHPAcks TCPRenoRecovery TCPSackRecovery TCPSACKReneging TCPSACKReorder TCPRenoReorder TCPTSReorder TCPFullUndo TCPPartialUndo TCPDSACKUndo TCPLossUndo TCPLostRetransmit TCPRenoFailures TCPSackFailures TCPLossFailures TCPFastRetrans TCPSlowStartRetrans TCPTimeouts TCPLossProbes TCPLossProbeRecovery TCPRenoRecoveryFail TCPSackRecoveryFail TCPRcvCollapsed TCPBacklogCoalesce TCPDSACKOldSent TCPDSACKOfoSent TCPDSACKRecv TCPDSACKOfoRecv TCPAbortOnData TCPAbortOnClose TCPAbortOnMemory TCPAbortOnTimeout TCPAbortOnLinger TCPAbortFailed TCPMemoryPressures TCPMemoryPressuresChrono TCPSACKDiscard TCPDSACKIgnoredOld TCPDSACKIgnoredNoUndo TCPSpuriousRTOs TCPMD5NotFound TCPMD5Unexpected TCPMD5Failure TCPSackShifted TCPSackMerged TCPSackShiftFallback TCPBacklogDrop PFMemallocDrop TCPMinTTLDrop TCPDeferAcceptDrop IPReversePathFilter TCPTimeWaitOverflow TCPReqQFullDoCookies TCPReqQFullDrop TCPRetransFail TCPRcvCoalesce TCPOFOQueue TCPOFODrop TCPOFOMerge TCPChallengeACK TCPSYNChallenge TCPFastOpenActive TCPFastOpenActiveFail TCPFastOpenPassive TCPFastOpenPassiveFail TCPFastOpenListenOverflow TCPFastOpenCookieReqd TCPFastOpenBlackhole TCPSpuriousRtxHostQueues BusyPollRxPackets TCPAutoCorking TCPFromZeroWindowAdv TCPToZeroWindowAdv TCPWantZeroWindowAdv TCPSynRetrans TCPOrigDataSent TCPHystartTrainDetect TCPHystartTrainCwnd TCPHystartDelayDetect TCPHystartDelayCwnd TCPACKSkippedSynRecv TCPACKSkippedPAWS TCPACKSkippedSeq TCPACKSkippedFinWait2 TCPACKSkippedTimeWait TCPACKSkippedChallenge TCPWinProbe TCPKeepAlive TCPMTUPFail TCPMTUPSuccess TCPDelivered TCPDeliveredCE TCPAckCompressed TCPZeroWindowDrop TCPRcvQDrop TCPWqueueTooBig TCPFastOpenPassiveAltKey TcpTimeoutRehash TcpDuplicateDataRehash TCPDSACKRecvSegs TCPDSACKIgnoredDubious TCPMigrateReqSuccess TCPMigrateReqFailure TCPPLBRehash TCPAORequired TCPAOBad TCPAOKeyNotFound TCPAOGood TCPAODroppedIcmps
TcpExt: 0 0 0 0 0 0 0 0 0 0 575 3 7 0 0 0 0 0 0 16 0 9 0 0 8606 3252 9936 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 2 1 0 0 0 0 342 9 0 1 0 17 6 0 4 9 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 12 0 0 0 16709 1 0 0 0 0 0 0 0 0 0 0 0 2 0 176 531 531 448 0 13888 0 0 0 0 0 0 0 0 0 0 0 48 0 0 14755 0 0 0 0 0 0 2 0 1 0 0 0 0 0 0 0 0 0
IpExt: InNoRoutes InTruncatedPkts InMcastPkts OutMcastPkts InBcastPkts OutBcastPkts InOctets OutOctets InMcastOctets OutMcastOctets InBcastOctets OutBcastOctets InCsumErrors InNoECTPkts InECT1Pkts InECT0Pkts InCEPkts ReasmOverlaps
IpExt: 0 0 0 0 0 0 384011131 9351517 0 0 0 0 0 37934 0 0 0 0
MPTcpExt: MPCapableSYNRX TW
MPTcpExt: 99 99
";

    #[test]
    fn netstat_fixture() {
        let t = parse_netstat(NETSTAT_FIXTURE);
        assert_eq!(
            t,
            TcpExt {
                tw: 575,
                tw_recycled: 3,
                tw_killed: 7,
                timewait_overflow: 12,
                tcp_abort_on_close: 6,
                tcp_abort_on_data: 17,
                tcp_abort_on_linger: 9,
                tcp_abort_on_timeout: 4,
            }
        );
    }

    #[test]
    fn netstat_odd_content() {
        assert_eq!(parse_netstat(""), TcpExt::default());
        // Header without values, values shorter than the header, a value that is not a number.
        assert_eq!(parse_netstat("TcpExt: TW TWKilled\n"), TcpExt::default());
        assert_eq!(parse_netstat("TcpExt: TW TWKilled TWRecycled\nTcpExt: 5 x\n").tw, 5);
        assert_eq!(parse_netstat("TcpExt: TW TWKilled\nTcpExt: 5 x\n").tw_killed, 0);
        // Values before headers, groups in another order.
        assert_eq!(parse_netstat("IpExt: A\nIpExt: 1\nTcpExt: TWKilled TW\nTcpExt: 1 2\n").tw, 2);
        assert_eq!(parse_netstat("TcpExt: 1 2\nTcpExt: TW\n").tw, 0);
    }

    #[test]
    fn sockstat() {
        let text =
            "sockets: used 24\nTCP: inuse 3 orphan 1 tw 4 alloc 6 mem 2\nUDP: inuse 0 mem 0\n";
        let tw = |text| sockstat_field(text, "TCP:", "tw");
        assert_eq!(tw(text), Some(4));
        assert_eq!(sockstat_field(text, "TCP:", "inuse"), Some(3));
        assert_eq!(tw("TCP: inuse 3\n"), None);
        assert_eq!(tw("TCP: inuse 3 tw\n"), None);
        assert_eq!(tw("TCP6: inuse 1\n"), None);
        assert_eq!(sockstat_field("TCP6: inuse 1\n", "TCP6:", "inuse"), Some(1));
        assert_eq!(tw(""), None);
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("32768\n"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("1 70000"), None);
        assert_eq!(parse_port_list("\n"), Some(vec![]));
        assert_eq!(parse_port_list("8080,9000-9100\n"), Some(vec![(8080, 8080), (9000, 9100)]));
        assert_eq!(parse_port_list("8080,x"), None);
        assert_eq!(ports_within(&[(8080, 8080), (9000, 9100)], (9050, 20000)), 51);
        // Overlaps are counted once; ranges outside do not count.
        assert_eq!(ports_within(&[(10, 20), (15, 25), (25, 25), (100, 200)], (0, 50)), 16);
        assert_eq!(ports_within(&[(0, 65535)], (32768, 60999)), 28232);
        assert_eq!(ports_within(&[], (32768, 60999)), 0);
    }

    #[test]
    fn ephemeral_ports() {
        let mut s = Sysctls {
            tcp_max_tw_buckets: 0,
            ip_local_port_range: (32768, 60999),
            tcp_fin_timeout: 60,
            tcp_tw_reuse: 2,
            ip_local_reserved_ports: 0,
        };
        assert_eq!(s.ephemeral_ports(), 28232);
        s.ip_local_reserved_ports = 32;
        assert_eq!(s.ephemeral_ports(), 28200);
        s.ip_local_port_range = (0, 65535);
        assert_eq!(s.ephemeral_ports(), 65536 - 32);
        s.ip_local_port_range = (100, 99);
        assert_eq!(s.ephemeral_ports(), 0);
    }

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link(b"socket:[12345]"), Some(12345));
        assert_eq!(parse_socket_link(b"pipe:[12345]"), None);
        assert_eq!(parse_socket_link(b"socket:[]"), None);
        assert_eq!(parse_socket_link(b"/dev/null"), None);
        assert_eq!(socket_owners(&HashSet::new()), HashMap::new());
    }
}
