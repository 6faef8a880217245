//! The running kernel's layout: tracepoint field offsets from tracefs, struct member offsets from
//! BTF, and the address of `tw_timer_handler` from /proc/kallsyms. Nothing that differs between
//! kernel versions is compiled into the programs; it is all read here at load time.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use btf_rs::{Btf, Type};
use monitor_common::KernelLayout;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "tracefs is not available at /sys/kernel/tracing and could not be mounted ({0}); \
         run as root or mount it: `mount -t tracefs tracefs /sys/kernel/tracing`"
    )]
    Tracefs(String),
    #[error(
        "tracepoint {0} is missing from this kernel ({1}); twmon needs CONFIG_TRACEPOINTS and \
         the sock, tcp and timer trace events (Linux 5.15 or newer)"
    )]
    Tracepoint(String, String),
    #[error(
        "permission denied reading {0}: twmon needs root (or CAP_BPF, CAP_PERFMON, CAP_SYSLOG \
         and CAP_DAC_READ_SEARCH); run it with sudo"
    )]
    Permission(String),
    #[error(
        "tracepoint sock:inet_sock_set_state uses {0} bytes on this kernel, more than the {1} \
         twmon reads; please report the kernel version"
    )]
    Record(usize, usize),
    #[error("tracepoint {0} has no field `{1}` on this kernel; please report the kernel version")]
    Field(String, String),
    #[error(
        "kernel BTF is not readable at {0} ({1}); twmon needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 2020)"
    )]
    Btf(String, String),
    #[error("kernel BTF has no {0}; please report the kernel version")]
    Member(String),
    #[error(
        "symbol {0} not found in /proc/kallsyms (or shown as 0: run as root, or set \
         kernel.kptr_restrict=0)"
    )]
    Symbol(String),
}

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Finds tracefs, mounting it at /sys/kernel/tracing when it is not mounted yet.
pub fn tracefs() -> Result<PathBuf, LayoutError> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    let dir = "/sys/kernel/tracing";
    let (src, target, fstype) = (c"tracefs", c"/sys/kernel/tracing", c"tracefs");
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::PermissionDenied {
            return Err(LayoutError::Permission("tracefs (mount)".into()));
        }
        return Err(LayoutError::Tracefs(err.to_string()));
    }
    tracing::info!(path = dir, "mounted tracefs");
    Ok(PathBuf::from(dir))
}

/// Field offsets of one tracepoint, from its `format` file.
#[derive(Debug)]
pub struct Format {
    name: String,
    fields: HashMap<String, u32>,
}

impl Format {
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self, LayoutError> {
        let full = format!("{category}:{name}");
        let path = tracefs.join("events").join(category).join(name).join("format");
        let text = fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => LayoutError::Permission(path.display().to_string()),
            _ => LayoutError::Tracepoint(full.clone(), e.to_string()),
        })?;
        Ok(Self::parse(&full, &text))
    }

    /// Parses lines such as `\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;`.
    pub fn parse(name: &str, text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut decl = None;
            let mut offset = None;
            for part in line.split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse::<u32>().ok();
                }
            }
            if let (Some(decl), Some(offset)) = (decl, offset) {
                // The name is the last word, without any array suffix: `__u8 saddr[4]`.
                let last = decl.split_whitespace().last().unwrap_or_default();
                let field = last.split('[').next().unwrap_or_default().trim_start_matches('*');
                fields.insert(field.to_string(), offset);
            }
        }
        Self { name: name.to_string(), fields }
    }

    pub fn offset(&self, field: &str) -> Result<u32, LayoutError> {
        self.fields
            .get(field)
            .copied()
            .ok_or_else(|| LayoutError::Field(self.name.clone(), field.to_string()))
    }

    pub fn optional(&self, field: &str) -> Option<u32> {
        self.fields.get(field).copied()
    }
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

/// Everything the kernel programs need to know about this kernel.
pub fn read(netns_only: u32) -> Result<KernelLayout, LayoutError> {
    let tfs = tracefs()?;
    let btf = Btf::from_file(BTF_PATH)
        .map_err(|e| LayoutError::Btf(BTF_PATH.to_string(), e.to_string()))?;
    let ss = Format::read(&tfs, "sock", "inet_sock_set_state")?;
    let rt = Format::read(&tfs, "tcp", "tcp_retransmit_skb")?;
    let rs = Format::read(&tfs, "tcp", "tcp_send_reset")?;
    let rr = Format::read(&tfs, "tcp", "tcp_receive_reset")?;
    let ts = Format::read(&tfs, "timer", "timer_start")?;
    let tc = Format::read(&tfs, "timer", "timer_cancel")?;
    let skc = |m: &str| member_offset(&btf, "sock_common", m);
    // The state program copies the record once and reads its fields from the copy.
    let end = [
        ("skaddr", 8),
        ("oldstate", 4),
        ("newstate", 4),
        ("sport", 2),
        ("dport", 2),
        ("family", 2),
        ("protocol", 2),
        ("saddr", 4),
        ("daddr", 4),
        ("saddr_v6", 16),
        ("daddr_v6", 16),
    ]
    .iter()
    .map(|(f, size)| ss.offset(f).map(|o| o as usize + size))
    .collect::<Result<Vec<_>, _>>()?
    .into_iter()
    .max()
    .unwrap_or(0);
    if end > monitor_common::SET_STATE_RECORD {
        return Err(LayoutError::Record(end, monitor_common::SET_STATE_RECORD));
    }
    Ok(KernelLayout {
        ss_skaddr: ss.offset("skaddr")?,
        ss_oldstate: ss.offset("oldstate")?,
        ss_newstate: ss.offset("newstate")?,
        ss_sport: ss.offset("sport")?,
        ss_dport: ss.offset("dport")?,
        ss_family: ss.offset("family")?,
        ss_protocol: ss.offset("protocol")?,
        ss_saddr: ss.offset("saddr")?,
        ss_daddr: ss.offset("daddr")?,
        ss_saddr_v6: ss.offset("saddr_v6")?,
        ss_daddr_v6: ss.offset("daddr_v6")?,
        rt_state: rt.offset("state")?,
        rt_err: rt.optional("err").unwrap_or(0),
        rt_skaddr: rt.offset("skaddr")?,
        rs_state: rs.offset("state")?,
        rs_skaddr: rs.offset("skaddr")?,
        rr_skaddr: rr.offset("skaddr")?,
        ts_timer: ts.offset("timer")?,
        ts_function: ts.offset("function")?,
        ts_expires: ts.offset("expires")?,
        ts_now: ts.offset("now")?,
        tc_timer: tc.offset("timer")?,
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
        net_inum: member_offset(&btf, "net", "ns.inum")?,
        tw_substate: member_offset(&btf, "inet_timewait_sock", "tw_substate")?,
        tw_timer: member_offset(&btf, "inet_timewait_sock", "tw_timer")?,
        timer_expires: member_offset(&btf, "timer_list", "expires")?,
        timer_function: member_offset(&btf, "timer_list", "function")?,
        tw_timer_handler: kallsyms("tw_timer_handler")?,
        netns_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state\nID: 1455\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\
\nprint fmt: \"family=%s\"\n";

    #[test]
    fn parses_tracefs_format() {
        let f = Format::parse("sock:inet_sock_set_state", SET_STATE);
        assert_eq!(f.offset("skaddr").unwrap(), 8);
        assert_eq!(f.offset("oldstate").unwrap(), 16);
        assert_eq!(f.offset("saddr_v6").unwrap(), 40);
        assert_eq!(f.optional("err"), None);
        let err = f.offset("newstate").unwrap_err().to_string();
        assert!(err.contains("no field `newstate`"), "{err}");
    }
}
