//! HTTP for talking to the agent in tests: one GET over a fresh connection, nothing cached,
//! nothing retried, so what the agent answers is what the caller sees.
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

/// How long a GET waits for the whole answer (a scrape of a busy agent included).
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// GET `http://addr/path` (HTTP/1.1, `Connection: close`); returns the status code and the body,
/// de-chunked when the answer was chunked.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("GET {path}: no complete answer within {READ_TIMEOUT:?}"),
        ),
        _ => io::Error::new(e.kind(), format!("GET {path}: {e}")),
    })?;
    let text = String::from_utf8_lossy(&raw);
    let bad = |what: &str| {
        io::Error::new(io::ErrorKind::InvalidData, format!("GET {path}: {what}: {text:?}"))
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| bad("no end of the header"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A TCP port on 127.0.0.1 that nothing listens on right now (another process may take it
/// before the caller binds it: callers that bind through a child process try again).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_joined() {
        assert_eq!(dechunk("5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"), "hello, world");
        assert_eq!(dechunk("0\r\n\r\n"), "");
    }
}
