//! The kernel's own numbers about BPF programs and maps, read with plain syscalls and procfs
//! (no bpftool or libbpf needed), and the floor programs the agent's are compared with.
//!
//! Run-time statistics: while a `BPF_ENABLE_STATS` fd is open (the same switch as
//! `sysctl kernel.bpf_stats_enabled=1`, but released when this process exits, even on a crash),
//! the kernel adds every program run's duration to its `run_time_ns` and `run_cnt`. Those are
//! the `run_time_ns` / `run_cnt` that `bpftool prog show` prints, and the agent's
//! `twmon_bpf_program_run_nanoseconds_total` / `twmon_bpf_program_runs_total`.
//!
//! Plain syscalls rather than aya: the floors are a few hand-written instructions, and aya loads
//! programs from ELF objects only; the rest reads another process's programs and maps (the
//! agent's) by id, a dozen lines each that a library would not shorten.
use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};

const BPF_MAP_CREATE: u32 = 0;
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_GET_NEXT_ID: u32 = 11;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_MAP_GET_FD_BY_ID: u32 = 14;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_RAW_TRACEPOINT_OPEN: u32 = 17;
const BPF_ENABLE_STATS: u32 = 32;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_STATS_RUN_TIME: u32 = 0;

/// `union bpf_attr` as a zeroed byte buffer; the kernel accepts any size up to its own as long
/// as the bytes it does not know are zero.
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(&mut self, off: usize, v: &[u8]) -> &mut Self {
        self.0[off..off + v.len()].copy_from_slice(v);
        self
    }
}

fn bpf(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable buffer of the size passed.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr.0.as_mut_ptr(), attr.0.len() as u32)
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn fd(rc: i64) -> OwnedFd {
    fd_of(rc as RawFd)
}

fn fd_of(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd to us.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Turns on per-program run-time statistics for as long as the returned fd is open.
pub fn enable_stats() -> Result<OwnedFd> {
    let rc = bpf(BPF_ENABLE_STATS, Attr::new().u32(0, BPF_STATS_RUN_TIME))
        .context("BPF_ENABLE_STATS failed; the kernel needs it (5.8+) for per-program run times")?;
    Ok(fd(rc))
}

/// `run_time_ns` and `run_cnt` of a program, from an fdinfo file of a process holding it.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl RunStats {
    pub fn since(self, before: RunStats) -> RunStats {
        RunStats {
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(before.run_cnt),
        }
    }
    pub fn ns_per_run(self) -> f64 {
        if self.run_cnt == 0 { f64::NAN } else { self.run_time_ns as f64 / self.run_cnt as f64 }
    }
}

/// Key/value pairs of one `/proc/PID/fdinfo/FD`.
fn fdinfo(path: &Path) -> Option<Vec<(String, String)>> {
    let text = fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}

fn field<'a>(info: &'a [(String, String)], key: &str) -> Option<&'a str> {
    info.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn num(info: &[(String, String)], key: &str) -> u64 {
    field(info, key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Statistics of a program fd this process holds.
pub fn prog_stats(prog: &OwnedFd) -> RunStats {
    let info =
        fdinfo(Path::new(&format!("/proc/self/fdinfo/{}", prog.as_raw_fd()))).unwrap_or_default();
    RunStats { run_time_ns: num(&info, "run_time_ns"), run_cnt: num(&info, "run_cnt") }
}

/// One BPF program a process holds, with the kernel's counters for it.
#[derive(Clone, Debug, Default)]
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    pub stats: RunStats,
    /// Runs the kernel skipped because another BPF program was already running on that CPU
    /// (e.g. a softirq that started a timer while a program ran): events the program missed.
    pub recursion_misses: u64,
}

/// Every BPF program another process holds (each once), named through `BPF_OBJ_GET_INFO_BY_FD`.
pub fn process_progs(pid: u32) -> Vec<ProgInfo> {
    let mut out: Vec<ProgInfo> = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return out };
    for entry in dir.flatten() {
        let Some(info) = fdinfo(&entry.path()) else { continue };
        if field(&info, "prog_type").is_none() {
            continue;
        }
        let id = num(&info, "prog_id") as u32;
        if out.iter().any(|p| p.id == id) {
            continue;
        }
        out.push(ProgInfo {
            id,
            name: prog_name(id).unwrap_or_default(),
            stats: RunStats {
                run_time_ns: num(&info, "run_time_ns"),
                run_cnt: num(&info, "run_cnt"),
            },
            recursion_misses: num(&info, "recursion_misses"),
        });
    }
    out
}

/// The (15-byte) name the kernel keeps for a program.
fn prog_name(id: u32) -> Option<String> {
    let prog = fd(bpf(BPF_PROG_GET_FD_BY_ID, Attr::new().u32(0, id)).ok()?);
    // struct bpf_prog_info: name[16] at offset 64.
    let mut info = [0u8; 96];
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        Attr::new()
            .u32(0, prog.as_raw_fd() as u32)
            .u32(4, info.len() as u32)
            .u64(8, info.as_mut_ptr() as u64),
    )
    .ok()?;
    let n = &info[64..80];
    let end = n.iter().position(|b| *b == 0).unwrap_or(n.len());
    Some(String::from_utf8_lossy(&n[..end]).into_owned())
}

/// One BPF map a process holds, with the kernel's account of its memory.
#[derive(Clone, Debug)]
pub struct MapMemory {
    pub id: u32,
    pub name: String,
    pub map_type: u32,
    pub max_entries: u64,
    /// `memlock` from fdinfo (bpftool's `bytes_memlock`): since Linux 6.4 the map's estimate
    /// of the memory it uses now (`map_mem_usage`), growing with the entries of a
    /// non-preallocated hash map.
    pub memlock: u64,
}

/// The maps a process holds (each once), named through `BPF_OBJ_GET_INFO_BY_FD`.
pub fn process_maps(pid: u32) -> Vec<MapMemory> {
    let mut out: Vec<MapMemory> = Vec::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return out };
    for entry in dir.flatten() {
        let Some(info) = fdinfo(&entry.path()) else { continue };
        if field(&info, "map_type").is_none() {
            continue;
        }
        let id = num(&info, "map_id") as u32;
        if out.iter().any(|m| m.id == id) {
            continue;
        }
        out.push(MapMemory {
            id,
            name: map_name(id).unwrap_or_else(|| format!("id {id}")),
            map_type: num(&info, "map_type") as u32,
            max_entries: num(&info, "max_entries"),
            memlock: num(&info, "memlock"),
        });
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.memlock));
    out
}

fn map_name(id: u32) -> Option<String> {
    let map = fd(bpf(BPF_MAP_GET_FD_BY_ID, Attr::new().u32(0, id)).ok()?);
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16], ...
    let mut info = [0u8; 96];
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        Attr::new()
            .u32(0, map.as_raw_fd() as u32)
            .u32(4, info.len() as u32)
            .u64(8, info.as_mut_ptr() as u64),
    )
    .ok()?;
    let name = &info[24..40];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Ids of every BPF program loaded on the machine with this name (the kernel keeps the first
/// 15 bytes of a name), whoever loaded it.
pub fn programs_named(name: &str) -> Vec<u32> {
    let want = &name[..name.len().min(15)];
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut a = Attr::new();
        a.u32(0, id);
        if bpf(BPF_PROG_GET_NEXT_ID, &mut a).is_err() {
            break;
        }
        // The kernel writes next_id back into the attr.
        id = u32::from_ne_bytes(a.0[4..8].try_into().expect("4 bytes"));
        if prog_name(id).as_deref() == Some(want) {
            out.push(id);
        }
    }
    out
}

/// What a floor program does on every event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloorKind {
    /// `return 0`: the cost of running any program at all on this tracepoint.
    Empty,
    /// Look up a per-CPU counter and add one (what bpftrace's `@c = count()` does).
    Count,
    /// The least a tool that times each socket's states must do on `inet_sock_set_state`: for a
    /// change into a teardown state or CLOSE, look the socket up in a hash map (its entry time
    /// would give the duration), then store the time now or, at CLOSE, delete the entry. A
    /// preallocated hash map of 262144 entries keyed by the socket's address, as twmon's.
    SocketMap,
    /// Copy a 72-byte record (the size of twmon's `Event`) into a ring buffer with flags 0, the
    /// default wake-up policy: when the reader has caught up, every record queues an irq_work
    /// that wakes it. A reader thread drains it as soon as epoll says it is readable.
    RingWakeup,
    /// The same with `BPF_RB_NO_WAKEUP`; the reader drains every 10 ms instead of being woken.
    RingNoWakeup,
}

impl FloorKind {
    pub fn label(self) -> &'static str {
        match self {
            FloorKind::Empty => "floor: empty program",
            FloorKind::Count => "floor: per-CPU count",
            FloorKind::SocketMap => {
                "floor: per-socket entry time in a hash map (lookup, then update or delete)"
            }
            FloorKind::RingWakeup => "ring buffer output, wake-up per record (flags 0)",
            FloorKind::RingNoWakeup => {
                "ring buffer output, BPF_RB_NO_WAKEUP, reader polls every 10 ms"
            }
        }
    }
}

/// Ring buffer size of the ring floors: the agent's default.
const RING_BYTES: u32 = 4 << 20;

/// A floor program attached to a raw tracepoint; detached on drop.
pub struct Floor {
    pub kind: FloorKind,
    pub tracepoint: String,
    // Field order is drop order: detach first, then stop the reader, then free the map.
    _link: OwnedFd,
    prog: OwnedFd,
    reader: Option<RingReader>,
    _map: Option<OwnedFd>,
}

impl Floor {
    pub fn stats(&self) -> RunStats {
        prog_stats(&self.prog)
    }

    /// Records the reader consumed so far (ring floors only).
    pub fn consumed(&self) -> u64 {
        self.reader.as_ref().map(|r| r.records.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// Drains a BPF ring buffer through its mmap()ed pages, the way libbpf and aya do.
struct RingReader {
    stop: Arc<AtomicBool>,
    records: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Mapping(*mut libc::c_void, usize);
// SAFETY: the pages are shared memory the reader thread alone touches after start.
unsafe impl Send for Mapping {}
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what mmap returned, once.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

fn map_pages(fd: RawFd, len: usize, prot: i32, offset: i64) -> Result<Mapping> {
    // SAFETY: a fresh shared mapping of a ring buffer map fd.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, offset) };
    if p == libc::MAP_FAILED {
        bail!("mmap of the ring buffer failed: {}", io::Error::last_os_error());
    }
    Ok(Mapping(p, len))
}

impl RingReader {
    fn start(map: &OwnedFd, wakeup: bool) -> Result<Self> {
        let page = 4096usize;
        let size = RING_BYTES as usize;
        let fd = map.as_raw_fd();
        let consumer = map_pages(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = map_pages(fd, page + 2 * size, libc::PROT_READ, page as i64)?;
        // SAFETY: epoll on the map fd; closed by the reader thread.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            bail!("epoll_create1: {}", io::Error::last_os_error());
        }
        let ep = fd_of(ep);
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
        // SAFETY: valid epoll fd, map fd and event.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            bail!("epoll_ctl on the ring buffer: {}", io::Error::last_os_error());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(AtomicU64::new(0));
        let (stop2, records2) = (stop.clone(), records.clone());
        let thread = std::thread::Builder::new().name("bench-ring".into()).spawn(move || {
            let (consumer, producer, ep) = (consumer, producer, ep);
            // SAFETY: positions are 8-byte aligned u64s at the start of their pages.
            let cons_pos = unsafe { &*(consumer.0 as *const AtomicU64) };
            let prod_pos = unsafe { &*(producer.0 as *const AtomicU64) };
            let data = unsafe { (producer.0 as *const u8).add(page) };
            while !stop2.load(Ordering::Relaxed) {
                if wakeup {
                    let mut out = libc::epoll_event { events: 0, u64: 0 };
                    // SAFETY: valid epoll fd and output buffer of one event.
                    unsafe { libc::epoll_wait(ep.as_raw_fd(), &mut out, 1, 100) };
                } else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                let mut cons = cons_pos.load(Ordering::Acquire);
                let prod = prod_pos.load(Ordering::Acquire);
                let mut n = 0;
                while cons < prod {
                    // SAFETY: the header of the record at cons, inside the double-mapped data.
                    let hdr =
                        unsafe { &*(data.add((cons as usize) & (size - 1)) as *const AtomicU32) };
                    let len = hdr.load(Ordering::Acquire);
                    if len & (1 << 31) != 0 {
                        break; // still being written
                    }
                    let len = (len & !(3 << 30)) as u64;
                    cons += (len + 8 + 7) & !7;
                    n += 1;
                }
                cons_pos.store(cons, Ordering::Release);
                records2.fetch_add(n, Ordering::Relaxed);
            }
        })?;
        Ok(RingReader { stop, records, thread: Some(thread) })
    }
}

impl Drop for RingReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `struct bpf_insn`.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0xf);
    b[2..4].copy_from_slice(&off.to_ne_bytes());
    b[4..8].copy_from_slice(&imm.to_ne_bytes());
    b
}

fn program(kind: FloorKind, map_fd: Option<i32>) -> Vec<[u8; 8]> {
    const MOV64_IMM: u8 = 0xb7;
    const EXIT: u8 = 0x95;
    let ld_map = |reg: u8| {
        [insn(0x18, reg, 1, 0, map_fd.expect("floor needs its map")), insn(0, 0, 0, 0, 0)]
    };
    match kind {
        FloorKind::Empty => vec![insn(MOV64_IMM, 0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)],
        FloorKind::Count => {
            let mut p = vec![
                insn(0x62, 10, 0, -4, 0), // *(u32 *)(r10 - 4) = 0       key
                insn(0xbf, 2, 10, 0, 0),  // r2 = r10
                insn(0x07, 2, 0, 0, -4),  // r2 += -4
            ];
            p.extend(ld_map(1)); // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
            p.extend([
                insn(0x85, 0, 0, 0, 1),      // call bpf_map_lookup_elem
                insn(0x15, 0, 0, 3, 0),      // if r0 == 0 goto +3
                insn(0x79, 1, 0, 0, 0),      // r1 = *(u64 *)(r0 + 0)
                insn(0x07, 1, 0, 0, 1),      // r1 += 1
                insn(0x7b, 0, 1, 0, 0),      // *(u64 *)(r0 + 0) = r1
                insn(MOV64_IMM, 0, 0, 0, 0), // r0 = 0
                insn(EXIT, 0, 0, 0, 0),
            ]);
            p
        }
        FloorKind::SocketMap => {
            // Raw tracepoint arguments: sk, oldstate, newstate.
            let mut p = vec![
                insn(0xbf, 6, 1, 0, 0),   // 0: r6 = ctx
                insn(0x79, 8, 6, 16, 0),  // 1: r8 = newstate
                insn(0x15, 8, 0, 27, 1),  // 2: ESTABLISHED: exit
                insn(0x15, 8, 0, 26, 2),  // 3: SYN_SENT: exit
                insn(0x15, 8, 0, 25, 3),  // 4: SYN_RECV: exit
                insn(0x15, 8, 0, 24, 10), // 5: LISTEN: exit
                insn(0x79, 7, 6, 0, 0),   // 6: r7 = sk
                insn(0x7b, 10, 7, -8, 0), // 7: key = sk
            ];
            p.extend(ld_map(1)); // 8-9
            p.extend([
                insn(0xbf, 2, 10, 0, 0),   // 10: r2 = &key
                insn(0x07, 2, 0, 0, -8),   // 11
                insn(0x85, 0, 0, 0, 1),    // 12: bpf_map_lookup_elem
                insn(0x15, 8, 0, 11, 7),   // 13: CLOSE: delete (25)
                insn(0x85, 0, 0, 0, 5),    // 14: bpf_ktime_get_ns
                insn(0x7b, 10, 0, -16, 0), // 15: value = now
            ]);
            p.extend(ld_map(1)); // 16-17
            p.extend([
                insn(0xbf, 2, 10, 0, 0),     // 18: r2 = &key
                insn(0x07, 2, 0, 0, -8),     // 19
                insn(0xbf, 3, 10, 0, 0),     // 20: r3 = &value
                insn(0x07, 3, 0, 0, -16),    // 21
                insn(MOV64_IMM, 4, 0, 0, 0), // 22: BPF_ANY
                insn(0x85, 0, 0, 0, 2),      // 23: bpf_map_update_elem
                insn(0x05, 0, 0, 5, 0),      // 24: exit (30)
            ]);
            p.extend(ld_map(1)); // 25-26
            p.extend([
                insn(0xbf, 2, 10, 0, 0),     // 27: r2 = &key
                insn(0x07, 2, 0, 0, -8),     // 28
                insn(0x85, 0, 0, 0, 3),      // 29: bpf_map_delete_elem
                insn(MOV64_IMM, 0, 0, 0, 0), // 30: r0 = 0
                insn(EXIT, 0, 0, 0, 0),      // 31
            ]);
            p
        }
        FloorKind::RingWakeup | FloorKind::RingNoWakeup => {
            const RECORD: i32 = 72;
            // A zeroed 72-byte record on the stack.
            let mut p: Vec<[u8; 8]> =
                (1..=RECORD / 8).map(|i| insn(0x7a, 10, 0, (-8 * i) as i16, 0)).collect();
            p.extend(ld_map(1)); // r1 = ring buffer
            p.extend([
                insn(0xbf, 2, 10, 0, 0),      // r2 = r10
                insn(0x07, 2, 0, 0, -RECORD), // r2 -= 72
                insn(MOV64_IMM, 3, 0, 0, RECORD),
                insn(MOV64_IMM, 4, 0, 0, if kind == FloorKind::RingNoWakeup { 1 } else { 0 }),
                insn(0x85, 0, 0, 0, 130), // call bpf_ringbuf_output
                insn(MOV64_IMM, 0, 0, 0, 0),
                insn(EXIT, 0, 0, 0, 0),
            ]);
            p
        }
    }
}

/// Loads a floor program and attaches it to `category:name`.
pub fn attach_floor(kind: FloorKind, category: &str, name: &str) -> Result<Floor> {
    let map = match kind {
        FloorKind::Empty => None,
        FloorKind::Count => {
            let mut a = Attr::new();
            a.u32(0, BPF_MAP_TYPE_PERCPU_ARRAY)
                .u32(4, 4)
                .u32(8, 8)
                .u32(12, 1)
                .bytes(28, b"bench_floor");
            Some(fd(bpf(BPF_MAP_CREATE, &mut a).context("creating the floor program's map")?))
        }
        FloorKind::SocketMap => {
            let mut a = Attr::new();
            a.u32(0, BPF_MAP_TYPE_HASH)
                .u32(4, 8)
                .u32(8, 8)
                .u32(12, 262_144)
                .bytes(28, b"bench_sockets");
            Some(fd(bpf(BPF_MAP_CREATE, &mut a).context("creating the floor program's hash map")?))
        }
        FloorKind::RingWakeup | FloorKind::RingNoWakeup => {
            let mut a = Attr::new();
            a.u32(0, BPF_MAP_TYPE_RINGBUF).u32(12, RING_BYTES).bytes(28, b"bench_ring");
            Some(fd(
                bpf(BPF_MAP_CREATE, &mut a).context("creating the floor program's ring buffer")?
            ))
        }
    };
    let reader = match (&map, kind) {
        (Some(m), FloorKind::RingWakeup) => Some(RingReader::start(m, true)?),
        (Some(m), FloorKind::RingNoWakeup) => Some(RingReader::start(m, false)?),
        _ => None,
    };
    let insns = program(kind, map.as_ref().map(|m| m.as_raw_fd()));
    let license = b"GPL\0";
    let mut log = vec![0u8; 4096];
    let prog_name: &[u8] = match kind {
        FloorKind::Empty => b"bench_empty",
        FloorKind::Count => b"bench_count",
        FloorKind::SocketMap => b"bench_sockets",
        FloorKind::RingWakeup => b"bench_ring_wake",
        FloorKind::RingNoWakeup => b"bench_ring_poll",
    };
    let mut a = Attr::new();
    a.u32(0, BPF_PROG_TYPE_RAW_TRACEPOINT)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .bytes(48, prog_name);
    let prog = match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(rc) => fd(rc),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            bail!(
                "loading the {kind:?} floor program failed: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            );
        }
    };

    // A raw tracepoint: the same kernel path (__bpf_trace_run) as twmon's BTF tracepoints.
    let tp = std::ffi::CString::new(name)?;
    let mut a = Attr::new();
    a.u64(0, tp.as_ptr() as u64).u32(8, prog.as_raw_fd() as u32);
    let link = fd(bpf(BPF_RAW_TRACEPOINT_OPEN, &mut a)
        .with_context(|| format!("attaching the floor program to raw tracepoint {name}"))?);
    Ok(Floor {
        kind,
        tracepoint: format!("{category}:{name}"),
        _link: link,
        prog,
        reader,
        _map: map,
    })
}
