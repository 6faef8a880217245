//! The kernel's own view of TCP sockets through netlink sock_diag (what `ss` uses), for the
//! calling thread's network namespace. Used to seed the agent at start-up and to reconcile.
use std::{net::IpAddr, time::Duration};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
pub use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::IPPROTO_TCP,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("sock_diag netlink socket: {0}; twmon needs root (CAP_NET_ADMIN is not required)")]
    Socket(std::io::Error),
    #[error("sock_diag dump failed: {0}")]
    Dump(String),
}

/// One TCP socket as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DiagSocket {
    /// Kernel TCP state; timewait sockets report their substate (TIME_WAIT or FIN_WAIT2), as
    /// `ss` shows them.
    pub state: u8,
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
    /// Socket inode (0 for timewait and orphaned sockets).
    pub inode: u32,
    /// For a timewait socket: time left on its timer.
    pub timewait_left: Option<Duration>,
    /// Whether it is a timewait socket (an `inet_timewait_sock`), not a full socket.
    pub timewait: bool,
}

/// Offset of `idiag_expires` in `struct inet_diag_msg` (UAPI: family, state, timer, retrans,
/// a 48-byte `inet_diag_sockid`, then expires). The crate parses the header but drops this field
/// for timewait sockets, so it is read from the payload.
const IDIAG_EXPIRES: usize = 4 + 48;
const IDIAG_TIMER_TIMEWAIT: u8 = 3;

/// Every TCP socket of `families` (`AF_INET`, `AF_INET6`) in one of `states` (bit
/// `1 << state`) of the calling thread's network namespace.
pub fn dump(states: u32, families: &[u8]) -> Result<Vec<DiagSocket>, DiagError> {
    let mut out = Vec::new();
    for family in families {
        dump_family(*family, states, &mut out)?;
    }
    Ok(out)
}

fn dump_family(family: u8, states: u32, out: &mut Vec<DiagSocket>) -> Result<(), DiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DiagError::Socket)?;
    socket.bind_auto().map_err(DiagError::Socket)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(DiagError::Socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::from_bits_truncate(states),
            socket_id: if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket.send(&buf[..], 0).map_err(DiagError::Socket)?;

    let mut rx = Vec::with_capacity(1 << 16);
    loop {
        rx.clear();
        let n = socket.recv(&mut rx, 0).map_err(DiagError::Socket)?;
        if n == 0 {
            return Err(DiagError::Dump("netlink closed before the end of the dump".into()));
        }
        let mut offset = 0;
        while offset < n {
            let bytes = &rx[offset..n];
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(bytes)
                .map_err(|e| DiagError::Dump(e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(DiagError::Dump(format!("{e:?}"))),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let payload = &bytes[16..len.min(bytes.len())];
                    let h = &r.header;
                    let raw_timer = payload.get(2).copied().unwrap_or(0);
                    let expires = payload
                        .get(IDIAG_EXPIRES..IDIAG_EXPIRES + 4)
                        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    let timewait = raw_timer == IDIAG_TIMER_TIMEWAIT;
                    out.push(DiagSocket {
                        state: h.state,
                        local: (h.socket_id.source_address, h.socket_id.source_port),
                        remote: (h.socket_id.destination_address, h.socket_id.destination_port),
                        inode: h.inode,
                        timewait_left: timewait.then(|| Duration::from_millis(expires as u64)),
                        timewait,
                    });
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}
