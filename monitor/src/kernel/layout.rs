//! The running kernel's layout: tracepoint arguments and struct member offsets from BTF, and the
//! address of `tw_timer_handler` from /proc/kallsyms. Nothing that differs between kernel
//! versions is compiled into the programs; it is all read here at load time.
use std::fs;

use btf_rs::{Btf, Type};
use monitor_common::KernelLayout;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "tracepoint {0} is missing from this kernel's BTF; twmon needs CONFIG_TRACEPOINTS and \
         the sock, tcp and timer trace events (Linux 5.10 or newer)"
    )]
    Tracepoint(String),
    #[error(
        "tracepoint {0} passes ({1}) on this kernel, not what twmon reads ({2}); please report \
         the kernel version"
    )]
    Arguments(String, String, String),
    #[error(
        "kernel BTF is not readable at {0} ({1}); twmon needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 2020)"
    )]
    Btf(String, String),
    #[error(
        "this kernel ({release}) has no {missing}; twmon needs Linux 5.10 or newer (or a \
         kernel with these BPF features backported)"
    )]
    TooOld { release: String, missing: String },
    #[error("kernel BTF has no {0}; please report the kernel version")]
    Member(String),
    #[error(
        "symbol {0} not found in /proc/kallsyms (or shown as 0): twmon needs root or CAP_SYSLOG \
         to read kernel addresses (or kernel.kptr_restrict=0)"
    )]
    Symbol(String),
}

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The programs attach to BTF tracepoints: the kernel hands them the tracepoint's arguments
/// (`btf_trace_<name>`), and a program nested in an interrupt is only skipped when the same
/// program is already running on that CPU (classic tracepoints skip every program while any
/// other runs). What each program reads: the first argument's struct, then how many
/// arguments there must be at least.
pub const TRACEPOINTS: &[(&str, &str, &str, usize)] = &[
    ("twmon_state", "inet_sock_set_state", "sock", 3),
    ("twmon_timer_start", "timer_start", "timer_list", 1),
    ("twmon_timer_cancel", "timer_cancel", "timer_list", 1),
    ("twmon_retransmit", "tcp_retransmit_skb", "sock", 1),
    ("twmon_send_reset", "tcp_send_reset", "sock", 1),
    ("twmon_receive_reset", "tcp_receive_reset", "sock", 1),
];

/// The argument types of tracepoint `name`, as C-like names (`struct sock *`, `int`).
pub fn tracepoint_args(btf: &Btf, name: &str) -> Result<Vec<String>, LayoutError> {
    let missing = || LayoutError::Tracepoint(name.to_string());
    let typedef = btf
        .resolve_types_by_name(&format!("btf_trace_{name}"))
        .map_err(|_| missing())?
        .into_iter()
        .find(|t| matches!(t, Type::Typedef(_)))
        .ok_or_else(missing)?;
    let proto = match strip(btf, typedef) {
        Some(Type::Ptr(p)) => btf.resolve_chained_type(&p).ok().and_then(|t| strip(btf, t)),
        _ => None,
    };
    let Some(Type::FuncProto(proto)) = proto else { return Err(missing()) };
    // The first parameter is the tracepoint's own context pointer.
    Ok(proto.parameters.iter().skip(1).map(|p| type_name(btf, p)).collect())
}

fn type_name(btf: &Btf, t: &dyn btf_rs::BtfType) -> String {
    let Some(ty) = btf.resolve_chained_type(t).ok().and_then(|ty| strip(btf, ty)) else {
        return "?".into();
    };
    match &ty {
        Type::Ptr(p) => format!("{} *", type_name(btf, p)),
        Type::Struct(s) => format!("struct {}", btf.resolve_name(s).unwrap_or_default()),
        Type::Int(i) => btf.resolve_name(i).unwrap_or_default(),
        Type::Enum(e) => format!("enum {}", btf.resolve_name(e).unwrap_or_default()),
        Type::Void => "void".into(),
        _ => "?".into(),
    }
}

/// Checks that tracepoint `name` passes a `struct first *` first and at least `count` arguments.
fn check_tracepoint(
    btf: &Btf,
    name: &str,
    first: &str,
    count: usize,
) -> Result<Vec<String>, LayoutError> {
    let args = tracepoint_args(btf, name)?;
    let want = format!("struct {first} *");
    if args.len() < count || args[0] != want {
        return Err(LayoutError::Arguments(
            name.into(),
            args.join(", "),
            format!("{want}, ... ({count} arguments)"),
        ));
    }
    Ok(args)
}

/// Byte offset of `path` (members separated by dots, anonymous structs and unions looked
/// through) inside `struct ty`.
pub fn member_offset(btf: &Btf, ty: &str, path: &str) -> Result<u32, LayoutError> {
    let missing = || LayoutError::Member(format!("struct {ty}.{path}"));
    let mut current = btf
        .resolve_types_by_name(ty)
        .map_err(|_| missing())?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .ok_or_else(missing)?;
    let mut bits = 0u32;
    for name in path.split('.') {
        let (off, ty) = find_member(btf, &current, name).ok_or_else(missing)?;
        bits += off;
        current = ty;
    }
    Ok(bits / 8)
}

/// Finds `name` among the members of a struct or union, descending into anonymous members.
/// Returns its bit offset and its type with typedefs and qualifiers stripped.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Option<(u32, Type)> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return None,
    };
    for m in members {
        let member_name = btf.resolve_name(m).unwrap_or_default();
        let member_ty = strip(btf, btf.resolve_chained_type(m).ok()?)?;
        if member_name == name {
            return Some((m.bit_offset(), member_ty));
        }
        if member_name.is_empty()
            && let Some((off, t)) = find_member(btf, &member_ty, name)
        {
            return Some((m.bit_offset() + off, t));
        }
    }
    None
}

fn strip(btf: &Btf, mut ty: Type) -> Option<Type> {
    loop {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t).ok()?,
            Type::Volatile(t) => btf.resolve_chained_type(t).ok()?,
            Type::Const(t) => btf.resolve_chained_type(t).ok()?,
            Type::Restrict(t) => btf.resolve_chained_type(t).ok()?,
            Type::TypeTag(t) => btf.resolve_chained_type(t).ok()?,
            _ => return Some(ty),
        };
    }
}

/// Address of a kernel symbol from /proc/kallsyms.
pub fn kallsyms(symbol: &str) -> Result<u64, LayoutError> {
    let text = fs::read_to_string("/proc/kallsyms")
        .map_err(|_| LayoutError::Symbol(symbol.to_string()))?;
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (addr, _kind, name) = (it.next()?, it.next()?, it.next()?);
            (name == symbol).then(|| u64::from_str_radix(addr, 16).ok()).flatten()
        })
        .find(|a| *a != 0)
        .ok_or_else(|| LayoutError::Symbol(symbol.to_string()))
}

/// What twmon needs of the kernel's BPF, by the enumerator its BTF has when the kernel has it:
/// (enum, enumerator, what it is and the version that brought it).
const REQUIRED: &[(&str, &str, &str)] = &[
    ("bpf_attach_type", "BPF_TRACE_RAW_TP", "BTF tracepoints (BPF_TRACE_RAW_TP, 5.5+)"),
    ("bpf_map_type", "BPF_MAP_TYPE_RINGBUF", "BPF ring buffer (5.8+)"),
    // Test runs of raw tracepoint programs (the sweep, the leak scan, the clock) came in 5.10
    // with no enumerator of their own; bpf_d_path came in the same release.
    ("bpf_func_id", "BPF_FUNC_d_path", "BPF_PROG_TEST_RUN for raw tracepoints (5.10+)"),
];

/// Optional features, used when the kernel has them.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    /// `bpf_for_each_map_elem` (5.13+): the sweep and the leak scan walk their map in one
    /// program run; without it the agent walks the map and runs the program per entry.
    pub for_each_map_elem: bool,
}

/// Whether `enum name` in the kernel's BTF has `enumerator`.
fn has_enumerator(btf: &Btf, name: &str, enumerator: &str) -> bool {
    btf.resolve_types_by_name(name).unwrap_or_default().iter().any(|t| match t {
        Type::Enum(e) => {
            e.members.iter().any(|m| btf.resolve_name(m).is_ok_and(|n| n == enumerator))
        }
        Type::Enum64(e) => {
            e.members.iter().any(|m| btf.resolve_name(m).is_ok_and(|n| n == enumerator))
        }
        _ => false,
    })
}

/// The value of `enumerator` in `enum name` (a bit number below 32 here).
fn enumerator(btf: &Btf, name: &str, enumerator: &str) -> Result<u32, LayoutError> {
    btf.resolve_types_by_name(name)
        .unwrap_or_default()
        .iter()
        .find_map(|t| match t {
            Type::Enum(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == enumerator))
                .map(|m| m.val()),
            _ => None,
        })
        .filter(|v| *v < 32)
        .ok_or_else(|| LayoutError::Member(format!("enum {name}.{enumerator}")))
}

/// The features in `required` this kernel lacks, by their description.
fn missing_features(btf: &Btf, required: &[(&str, &str, &str)]) -> Vec<String> {
    required
        .iter()
        .filter(|(ty, e, _)| !has_enumerator(btf, ty, e))
        .map(|(_, _, what)| what.to_string())
        .collect()
}

/// Fails with one line naming what this kernel lacks and which version brings it.
fn check_features(btf: &Btf) -> Result<Features, LayoutError> {
    let missing = missing_features(btf, REQUIRED);
    if !missing.is_empty() {
        let release =
            fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        return Err(LayoutError::TooOld { release, missing: missing.join(", nor ") });
    }
    Ok(Features {
        for_each_map_elem: has_enumerator(btf, "bpf_func_id", "BPF_FUNC_for_each_map_elem"),
    })
}

/// The kernel's BTF, read at once: parsing from the file seeks once per type (over 100000
/// system calls).
fn parse_btf(path: &str) -> Result<Btf, LayoutError> {
    fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| Btf::from_bytes(&bytes).map_err(|e| e.to_string()))
        .map_err(|e| LayoutError::Btf(path.to_string(), e))
}

/// Everything the kernel programs need to know about this kernel, and what it can do.
pub fn read(netns_only: u32) -> Result<(KernelLayout, Features), LayoutError> {
    let btf = parse_btf(BTF_PATH)?;
    let features = check_features(&btf)?;
    let mut retransmit_args = Vec::new();
    for (_, tp, first, count) in TRACEPOINTS {
        let args = check_tracepoint(&btf, tp, first, *count)?;
        if *tp == "tcp_retransmit_skb" {
            retransmit_args = args;
        }
    }
    let skc = |m: &str| member_offset(&btf, "sock_common", m);
    let layout = KernelLayout {
        skc_daddr: skc("skc_daddr")?,
        skc_rcv_saddr: skc("skc_rcv_saddr")?,
        skc_hash: skc("skc_hash")?,
        skc_dport: skc("skc_dport")?,
        skc_num: skc("skc_num")?,
        skc_family: skc("skc_family")?,
        skc_state: skc("skc_state")?,
        skc_net: skc("skc_net")?,
        skc_v6_daddr: skc("skc_v6_daddr")?,
        skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
        sk_protocol: member_offset(&btf, "sock", "sk_protocol")?,
        inet_sport: member_offset(&btf, "inet_sock", "inet_sport")?,
        net_inum: member_offset(&btf, "net", "ns.inum")?,
        tw_substate: member_offset(&btf, "inet_timewait_sock", "tw_substate")?,
        tw_timer: member_offset(&btf, "inet_timewait_sock", "tw_timer")?,
        tw_snd_nxt: skc("skc_tw_snd_nxt")?,
        timer_expires: member_offset(&btf, "timer_list", "expires")?,
        timer_function: member_offset(&btf, "timer_list", "function")?,
        timer_pprev: member_offset(&btf, "timer_list", "entry.pprev")?,
        // (sk, skb, err) since 6.17; (sk, skb) before.
        retransmit_has_err: (retransmit_args.len() >= 3 && retransmit_args[2] == "int") as u32,
        tw_timer_handler: kallsyms("tw_timer_handler")?,
        netns_only,
        sk_err: member_offset(&btf, "sock", "sk_err")?,
        skc_nulls_pprev: skc("skc_nulls_node.pprev")?,
        sk_flags: skc("skc_flags")?,
        sk_flags_dead_or_done: 1 << enumerator(&btf, "sock_flags", "SOCK_DEAD")?
            | 1 << enumerator(&btf, "sock_flags", "SOCK_DONE")?,
        task_group_leader: member_offset(&btf, "task_struct", "group_leader")?,
        task_comm: member_offset(&btf, "task_struct", "comm")?,
        _pad: 0,
    };
    Ok((layout, features))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs where the build runs: this machine's own kernel BTF.
    #[test]
    fn reads_tracepoint_arguments_from_btf() {
        let Ok(btf) = Btf::from_file(BTF_PATH) else {
            panic!("{BTF_PATH} is not readable; twmon's build machines have kernel BTF");
        };
        let args = tracepoint_args(&btf, "inet_sock_set_state").unwrap();
        assert_eq!(args, ["struct sock *", "int", "int"]);
        assert_eq!(tracepoint_args(&btf, "timer_cancel").unwrap(), ["struct timer_list *"]);
        let err = tracepoint_args(&btf, "no_such_tracepoint").unwrap_err().to_string();
        assert!(err.contains("no_such_tracepoint is missing"), "{err}");
        let err = check_tracepoint(&btf, "timer_cancel", "sock", 1).unwrap_err().to_string();
        assert!(err.contains("passes (struct timer_list *)"), "{err}");
        assert!(member_offset(&btf, "sock_common", "skc_v6_rcv_saddr").unwrap() < 96);
    }

    /// Features are found by their enumerators; a missing one is named with its version.
    #[test]
    fn features_from_btf_enums() {
        let btf = parse_btf(BTF_PATH).unwrap();
        assert!(missing_features(&btf, REQUIRED).is_empty());
        assert!(check_features(&btf).unwrap().for_each_map_elem, "this machine's kernel is 6.x");
        let old = [("bpf_map_type", "BPF_MAP_TYPE_NO_SUCH_MAP", "BPF ring buffer (5.8+)")];
        assert_eq!(missing_features(&btf, &old), ["BPF ring buffer (5.8+)"]);
        let err = LayoutError::TooOld {
            release: "4.19.0".into(),
            missing: "BPF ring buffer (5.8+)".into(),
        };
        assert!(err.to_string().starts_with(
            "this kernel (4.19.0) has no BPF ring buffer (5.8+); twmon needs Linux 5.10"
        ));
    }

    /// A kernel without BTF (no file, or not BTF) is told what it needs.
    #[test]
    fn no_btf_says_what_is_needed() {
        let garbage = std::env::temp_dir().join(format!("twmon-not-btf-{}", std::process::id()));
        fs::write(&garbage, b"not BTF").unwrap();
        for path in ["/nonexistent/vmlinux", garbage.to_str().unwrap()] {
            let err = parse_btf(path).err().expect("an error").to_string();
            assert!(err.contains(path) && err.contains("CONFIG_DEBUG_INFO_BTF=y"), "{err}");
        }
        let _ = fs::remove_file(garbage);
    }
}
