//! Sockets through their `sock_common`, the start of full and timewait sockets alike, read
//! either with plain BTF-checked loads or with helper calls.

use monitor_common::Event;

use crate::{
    kernel::{field, kread},
    maps::layout,
};

pub(crate) const AF_INET6: u16 = 10;
pub(crate) const IPPROTO_TCP: u16 = 6;

/// A `sock_common`, the start of full and timewait sockets alike.
pub(crate) trait SockCommon {
    fn get<T: Copy>(&self, offset: u32) -> Result<T, i64>;

    /// Network namespace inode.
    #[inline(always)]
    fn netns(&self) -> Result<u32, i64> {
        kread(self.get::<u64>(layout!(skc_net))? + layout!(net_inum) as u64)
    }

    #[inline(always)]
    fn addr16(&self, offset: u32) -> Result<[u8; 16], i64> {
        self.get(offset)
    }

    /// What identifies a connection across the hand-off from full socket to timewait socket:
    /// its namespace, remote port and established-hash (a hash of the whole 4-tuple). Not the
    /// local port: by the time the full socket moves to CLOSE the kernel has zeroed `skc_num`.
    #[inline(always)]
    fn identity(&self) -> Result<(u64, u32, u32), i64> {
        let dport: u16 = self.get(layout!(skc_dport))?;
        Ok((self.get(layout!(skc_net))?, dport as u32, self.get(layout!(skc_hash))?))
    }

    /// Family, remote port and both addresses into `ev`; the local port is the caller's.
    #[inline(always)]
    fn fill(&self, ev: &mut Event) -> Result<(), i64> {
        ev.family = self.get(layout!(skc_family))?;
        ev.dport = u16::from_be(self.get(layout!(skc_dport))?);
        if ev.family == AF_INET6 {
            ev.saddr = self.addr16(layout!(skc_v6_rcv_saddr))?;
            ev.daddr = self.addr16(layout!(skc_v6_daddr))?;
        } else {
            let s: [u8; 4] = self.get(layout!(skc_rcv_saddr))?;
            let d: [u8; 4] = self.get(layout!(skc_daddr))?;
            ev.saddr[..4].copy_from_slice(&s);
            ev.daddr[..4].copy_from_slice(&d);
        }
        Ok(())
    }
}

/// A socket read where it lies, one helper call per field.
pub(crate) struct Live(pub(crate) u64);

impl SockCommon for Live {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: u32) -> Result<T, i64> {
        kread(self.0 + offset as u64)
    }
}

/// A socket the verifier knows the type of (the state tracepoint's `struct sock *`): plain
/// loads, checked against BTF at load time.
pub(crate) struct Btf(pub(crate) u64);

impl SockCommon for Btf {
    #[inline(always)]
    fn get<T: Copy>(&self, offset: u32) -> Result<T, i64> {
        Ok(field(self.0, offset))
    }

    #[inline(always)]
    fn netns(&self) -> Result<u32, i64> {
        Ok(field(field::<u64>(self.0, layout!(skc_net)), layout!(net_inum)))
    }

    /// `struct in6_addr` is a union of arrays: read it the way BTF allows, a word at a time.
    #[inline(always)]
    fn addr16(&self, offset: u32) -> Result<[u8; 16], i64> {
        let mut a = [0u8; 16];
        for i in 0..4 {
            let w: u32 = field(self.0, offset + 4 * i as u32);
            a[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ok(a)
    }
}

#[inline(always)]
pub(crate) fn netns_of(sk: u64) -> Result<u32, i64> {
    Live(sk).netns()
}

/// False when the agent watches one namespace and this is not it.
#[inline(always)]
pub(crate) fn wanted(netns: u32) -> bool {
    let only = layout!(netns_only);
    only == 0 || only == netns
}

#[inline(always)]
pub(crate) fn in_scope(sk: u64) -> bool {
    layout!(netns_only) == 0 || Btf(sk).netns().map(wanted).unwrap_or(false)
}
