//! Connections and the ways they end, written once for the tests and the checks: a listener and
//! pairs connected to it, a request and its reply, the peer's FIN awaited, each kind of close,
//! and nftables rules that lose chosen segments for a while.
//!
//! A pair is `(client, server side)`. A socket lives in the network namespace of the thread that
//! makes it: make pairs inside [`Netns::run`] (or [`pairs`]), or on a thread that entered one.
//! Failures panic with what happened: this is test support, and a connection that cannot be made
//! on loopback fails the test that needed it.
use std::{
    fmt::Debug,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    time::Duration,
};

use socket2::{Domain, SockRef, Socket, Type};

use crate::netns::Netns;

/// A connection's two ends: the client, and the server side the listener accepted.
pub type Pair = (TcpStream, TcpStream);

/// How long a read waits for the peer's data, FIN or reset: milliseconds on loopback, seconds in
/// a software-emulated VM under load.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How one connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// The client closes, the server reads EOF and closes: TIME_WAIT on the client.
    ClientFirst,
    /// The server closes first (an HTTP server without keep-alive): TIME_WAIT on the server.
    ServerFirst,
    /// Both shut down at about the same time, from two threads (CLOSING when the FINs cross).
    Simultaneous,
    /// The client closes with SO_LINGER 0: a reset instead of a FIN, and no TIME_WAIT.
    Reset,
    /// The client closes with data it has not read: the kernel resets (if the data arrived
    /// before the close; otherwise the client's FIN goes first and the data is answered with a
    /// reset).
    Unread,
    /// The client closes, the server reads EOF and keeps its end in CLOSE_WAIT: the client is
    /// an orphan in FIN_WAIT2 until the server's end is dropped.
    Held,
}

impl Close {
    pub const ALL: [Close; 6] = [
        Close::ClientFirst,
        Close::ServerFirst,
        Close::Simultaneous,
        Close::Reset,
        Close::Unread,
        Close::Held,
    ];

    /// Ends `pair` this way. Returns the server's end when it is [`Close::Held`].
    pub fn run(self, (mut c, mut s): Pair) -> Option<TcpStream> {
        match self {
            Close::ClientFirst => {
                drop(c);
                eof(&mut s);
            }
            Close::ServerFirst => {
                drop(s);
                eof(&mut c);
            }
            Close::Simultaneous => {
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        // Either side's shutdown may find the connection already closing.
                        let _ = s.shutdown(Shutdown::Write);
                        eof(&mut s);
                    });
                    let _ = c.shutdown(Shutdown::Write);
                    eof(&mut c);
                });
            }
            Close::Reset => {
                SockRef::from(&c).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
                drop(c);
                reset(&mut s);
            }
            Close::Unread => {
                s.write_all(b"data the client never reads").expect("the server's write");
                // Until it has arrived: then the close resets.
                std::thread::sleep(Duration::from_millis(2));
                drop(c);
                let mut buf = [0u8; 64];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                        Err(e) => panic!("waiting for the client's reset or FIN: {e}"),
                    }
                }
            }
            Close::Held => {
                drop(c);
                eof(&mut s);
                return Some(s);
            }
        }
        None
    }
}

/// A listener in the namespace of the thread that bound it, and connections to it.
pub struct Server(TcpListener);

impl Server {
    pub fn bind(addr: impl ToSocketAddrs + Debug) -> Self {
        Self(TcpListener::bind(&addr).unwrap_or_else(|e| panic!("listening on {addr:?}: {e}")))
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.local_addr().expect("the listener's address")
    }

    /// A connection from an ephemeral port, accepted, with [`READ_TIMEOUT`] on both ends.
    pub fn connect(&self) -> Pair {
        let client = TcpStream::connect(self.addr())
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.addr()));
        self.accept(client)
    }

    /// A connection that may fail (a narrow port range with every port taken, a SYN left
    /// unanswered): the connect error is returned, as the caller may count it.
    pub fn try_connect(&self, timeout: Duration) -> std::io::Result<Pair> {
        let client = TcpStream::connect_timeout(&self.addr(), timeout)?;
        Ok(self.accept(client))
    }

    /// A connection from a client with SO_REUSEADDR, bound to `from` if given. A timewait
    /// socket keeps its socket's SO_REUSEADDR: when both have it, a later connection can bind
    /// the port the timewait socket holds and take its 4-tuple over (with tcp_tw_reuse).
    pub fn connect_reusable(&self, from: Option<SocketAddr>) -> Pair {
        let to = self.addr();
        let s = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("a socket");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        if let Some(from) = from {
            s.bind(&from.into()).unwrap_or_else(|e| panic!("binding {from} again: {e}"));
        }
        s.connect(&to.into()).unwrap_or_else(|e| panic!("connecting from {from:?} to {to}: {e}"));
        self.accept(s.into())
    }

    /// `n` connections from ephemeral ports.
    pub fn pairs(&self, n: usize) -> Vec<Pair> {
        (0..n).map(|_| self.connect()).collect()
    }

    fn accept(&self, client: TcpStream) -> Pair {
        let (server, _) = self.0.accept().expect("accepting a connection on loopback");
        for s in [&client, &server] {
            s.set_read_timeout(Some(READ_TIMEOUT)).expect("a read timeout");
        }
        (client, server)
    }
}

/// A listener on `bind` inside `ns` and `n` connections to it.
pub fn pairs(ns: &Netns, bind: &str, n: usize) -> (Server, Vec<Pair>) {
    ns.run(|| {
        let server = Server::bind(bind);
        let pairs = server.pairs(n);
        (server, pairs)
    })
}

/// A request and its reply, so that both sides have sent and read data before the close.
pub fn exchange((client, server): &mut Pair) {
    let mut buf = [0u8; 4];
    client.write_all(b"ping").expect("the client's request");
    server.read_exact(&mut buf).expect("the request at the server");
    server.write_all(b"pong").expect("the server's reply");
    client.read_exact(&mut buf).expect("the reply at the client");
}

/// Reads (and discards) until the peer's FIN.
pub fn eof(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => panic!("waiting for the peer's FIN: {e}"),
        }
    }
}

/// Reads until the peer's reset, which must come before any FIN.
pub fn reset(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the peer's reset (ECONNRESET), read {other:?}"),
    }
}

/// An nftables table in a namespace, deleted on drop (so that a failing test does not leave its
/// losses behind).
pub struct NftTable<'a> {
    ns: &'a Netns,
    name: String,
}

impl<'a> NftTable<'a> {
    /// Creates `table inet <name> { <body> }` in `ns`. Rules on the input hook lose segments
    /// after the sender sent them: to the sender that is loss on the path, repaired by
    /// retransmitting (a drop on output would be a local send error instead).
    pub fn new(ns: &'a Netns, name: &str, body: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-{name}.nft", ns.name));
        let rules = format!("table inet {name} {{\n{body}\n}}\n");
        std::fs::write(&path, &rules).unwrap_or_else(|e| panic!("writing {path:?}: {e}"));
        ns.exec(&["nft", "-f", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        Self { ns, name: name.to_string() }
    }

    /// `nft list table`: the rules with their counters.
    pub fn list(&self) -> String {
        self.ns.exec(&["nft", "list", "table", "inet", &self.name])
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "nft", "delete", "table", "inet", &self.name])
            .output();
    }
}
