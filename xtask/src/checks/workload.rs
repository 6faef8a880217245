//! A bounded TCP workload on loopback that walks every teardown path twmon reports, inside a
//! private network namespace so that its drop rules and leftovers stay out of the host's way.
//!
//! The namespace belongs to one thread (network namespaces are per task), and the commands that
//! thread starts (`ip`, `nft`) inherit it. When the thread ends nothing holds the namespace any
//! more: the kernel tears it down and kills its remaining timewait sockets, which is how the
//! workload gets TIME_WAIT endings without waiting 2MSL.
use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// How many connections ended each way.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Client sent the first FIN.
    pub client_closed: u32,
    /// Server sent the first FIN.
    pub server_closed: u32,
    /// Client aborted with SO_LINGER 0 (RST from ESTABLISHED).
    pub reset: u32,
    /// Server left in CLOSE_WAIT until the end of the workload.
    pub held_close_wait: u32,
    /// Simultaneous close (CLOSING), forced by dropping one FIN for a while.
    pub closing: u32,
    /// Server's FIN retransmitted in LAST_ACK after the client's ACKs were dropped; the
    /// client's TIME_WAIT restarts its timer each time the FIN comes back.
    pub last_ack_retransmit: u32,
    /// Client TIME_WAIT taken over by a new connect() on the same 4-tuple (tcp_tw_reuse).
    pub reused: u32,
    /// The namespace's own TcpExt counters at the end (TW, TWRecycled, TWKilled, ...).
    pub kernel: BTreeMap<String, u64>,
}

impl Summary {
    pub fn total(&self) -> u32 {
        self.client_closed
            + self.server_closed
            + self.reset
            + self.held_close_wait
            + self.closing
            + self.last_ack_retransmit
            + self.reused * 2
    }
}

/// Opens `n` connections on loopback in the caller's network namespace whose client closes and
/// whose server side stays in CLOSE_WAIT until the returned pairs are dropped.
pub fn hold_close_wait(n: usize) -> Result<Vec<(TcpStream, TcpStream)>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut held = Vec::new();
    for _ in 0..n {
        let client = TcpStream::connect(addr)?;
        let (mut server, _) = listener.accept()?;
        server.set_read_timeout(Some(Duration::from_secs(5)))?;
        client.shutdown(Shutdown::Write)?;
        Workload::eof(&mut server)?;
        held.push((client, server));
    }
    Ok(held)
}

/// What to run: `rounds` rounds `pause` apart.
pub struct Plan {
    pub rounds: u32,
    pub pause: Duration,
}

/// Runs the workload on its own thread in a new network namespace and waits for it.
pub fn run(plan: Plan) -> Result<Summary> {
    thread::Builder::new()
        .name("twmon-workload".into())
        .spawn(move || -> Result<Summary> {
            // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWNET moves only this
            // thread into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "unshare(CLONE_NEWNET): {} (the checks run as root)",
                    std::io::Error::last_os_error()
                );
            }
            sh("ip", &["link", "set", "lo", "up"])?;
            let result = Workload::new()?.run(&plan);
            // Drop rules must not outlive a failure; the namespace goes away with this thread.
            let _ = Command::new("nft").args(["delete", "table", "inet", "twmon_check"]).output();
            result
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the workload thread panicked"))?
}

fn sh(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// TcpExt counters of this thread's network namespace (/proc/net/netstat as seen from it).
fn tcpext() -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    ensure!(lines.len() == 2, "no TcpExt lines in /proc/thread-self/net/netstat");
    let names = lines[0].split_whitespace().skip(1);
    let values = lines[1].split_whitespace().skip(1).map(|v| v.parse::<u64>().unwrap_or(0));
    Ok(names
        .zip(values)
        .filter(|(n, _)| {
            n.starts_with("TW") || n.starts_with("TCPAbortOn") || *n == "TCPTimeWaitOverflow"
        })
        .map(|(n, v)| (n.to_string(), v))
        .collect())
}

/// nftables rules in the workload's namespace: lose chosen segments for a while. They are
/// dropped on input, after the sender has sent them: to the sender this is loss on the path,
/// which it repairs by retransmitting (a drop on output would be a local send error instead).
struct DropRule;

impl DropRule {
    /// Drops segments sent from any of `ports` that match `what` (an nft expression).
    fn from_ports(ports: &[u16], what: &str) -> Result<Self> {
        let set = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let rules = format!(
            "table inet twmon_check {{\n chain out {{\n type filter hook input priority 0;\n tcp \
             sport {{ {set} }} {what} drop\n }}\n}}\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running nft (apt-get install nftables)")?;
        child.stdin.take().expect("piped").write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "nft -f: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Self)
    }

    fn lift(self) -> Result<()> {
        sh("nft", &["delete", "table", "inet", "twmon_check"])
    }
}

struct Workload {
    listener: TcpListener,
    addr: SocketAddr,
    summary: Summary,
    /// Server sides kept in CLOSE_WAIT, and their clients, until the end.
    held: Vec<(TcpStream, TcpStream)>,
    /// Client ports left in TIME_WAIT, to be reused by a new connect().
    to_reuse: Vec<(SocketAddr, Instant)>,
}

/// A connected pair: (client, server side).
type Pair = (TcpStream, TcpStream);

impl Workload {
    fn new() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        Ok(Self {
            listener,
            addr,
            summary: Summary::default(),
            held: Vec::new(),
            to_reuse: Vec::new(),
        })
    }

    fn connect(&self, from: Option<SocketAddr>) -> Result<Pair> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if let Some(from) = from {
            s.bind(&SockAddr::from(from)).with_context(|| format!("binding {from} again"))?;
        }
        s.connect(&SockAddr::from(self.addr))
            .with_context(|| format!("connecting to {}", self.addr))?;
        let client: TcpStream = s.into();
        let (server, _) = self.listener.accept()?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
        }
        Ok((client, server))
    }

    /// Request and reply, so that both sides have sent data before the close.
    fn exchange((client, server): &mut Pair) -> Result<()> {
        let mut buf = [0u8; 4];
        client.write_all(b"ping")?;
        server.read_exact(&mut buf)?;
        server.write_all(b"pong")?;
        client.read_exact(&mut buf)?;
        Ok(())
    }

    fn eof(s: &mut TcpStream) -> Result<()> {
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        ensure!(n == 0, "expected the peer's FIN, read {n} bytes");
        Ok(())
    }

    fn client_closes(&mut self) -> Result<SocketAddr> {
        let mut pair = self.connect(None)?;
        Self::exchange(&mut pair)?;
        let (client, mut server) = pair;
        let port = client.local_addr()?;
        drop(client);
        Self::eof(&mut server)?;
        drop(server);
        self.summary.client_closed += 1;
        Ok(port)
    }

    fn server_closes(&mut self) -> Result<()> {
        let mut pair = self.connect(None)?;
        Self::exchange(&mut pair)?;
        let (mut client, server) = pair;
        drop(server);
        Self::eof(&mut client)?;
        drop(client);
        self.summary.server_closed += 1;
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        let mut pair = self.connect(None)?;
        Self::exchange(&mut pair)?;
        let (client, mut server) = pair;
        Socket::from(client).set_linger(Some(Duration::ZERO))?;
        // Dropping the socket2 handle closes the fd: RST.
        let mut buf = [0u8; 4];
        match server.read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => bail!("expected ECONNRESET after SO_LINGER 0, got {other:?}"),
        }
        self.summary.reset += 1;
        Ok(())
    }

    fn hold_close_wait(&mut self) -> Result<()> {
        let mut pair = self.connect(None)?;
        Self::exchange(&mut pair)?;
        pair.0.shutdown(Shutdown::Write)?;
        Self::eof(&mut pair.1)?;
        self.held.push(pair);
        self.summary.held_close_wait += 1;
        Ok(())
    }

    /// Both sides send a FIN before either FIN is acknowledged: the client's FIN is dropped
    /// (retransmitted from FIN_WAIT1), the server closes meanwhile, the client receives that FIN
    /// while its own is unacknowledged (CLOSING, retransmitting again), then the drop is lifted.
    fn closing(&mut self, n: usize) -> Result<()> {
        let mut pairs = Vec::new();
        for _ in 0..n {
            let mut p = self.connect(None)?;
            Self::exchange(&mut p)?;
            pairs.push(p);
        }
        let ports: Vec<u16> = pairs
            .iter()
            .map(|(c, _)| c.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        let rule = DropRule::from_ports(&ports, "tcp flags & fin == fin")?;
        for (c, _) in &pairs {
            c.shutdown(Shutdown::Write)?;
        }
        // At least one retransmission in FIN_WAIT1 (the minimum RTO is 200 ms).
        thread::sleep(Duration::from_millis(500));
        for (_, s) in &pairs {
            s.shutdown(Shutdown::Write)?;
        }
        thread::sleep(Duration::from_millis(300));
        rule.lift()?;
        for (c, s) in &mut pairs {
            Self::eof(c)?;
            Self::eof(s)?;
        }
        // The retransmission that got through has reached the server: both sides are in
        // TIME_WAIT once its ACK is back.
        thread::sleep(Duration::from_millis(300));
        self.summary.closing += n as u32;
        Ok(())
    }

    /// The client's last ACK is dropped: the server retransmits its FIN from LAST_ACK and the
    /// client's TIME_WAIT socket restarts 2MSL on each copy.
    fn last_ack_retransmit(&mut self, n: usize) -> Result<()> {
        let mut pairs = Vec::new();
        for _ in 0..n {
            let mut p = self.connect(None)?;
            Self::exchange(&mut p)?;
            p.0.shutdown(Shutdown::Write)?;
            Self::eof(&mut p.1)?;
            pairs.push(p);
        }
        let ports: Vec<u16> = pairs
            .iter()
            .map(|(c, _)| c.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        let rule = DropRule::from_ports(&ports, "")?;
        for (c, s) in pairs.iter_mut() {
            s.shutdown(Shutdown::Write)?;
            Self::eof(c)?;
        }
        thread::sleep(Duration::from_millis(700));
        rule.lift()?;
        thread::sleep(Duration::from_millis(1500));
        self.summary.last_ack_retransmit += n as u32;
        Ok(())
    }

    /// connect() from a client port whose TIME_WAIT is older than a second (tcp_tw_reuse, on for
    /// loopback by default) takes the 4-tuple over.
    fn reuse_ready(&mut self) -> Result<()> {
        let ready: Vec<SocketAddr> = self
            .to_reuse
            .iter()
            .filter(|(_, at)| at.elapsed() > Duration::from_millis(2200))
            .map(|(a, _)| *a)
            .collect();
        self.to_reuse.retain(|(_, at)| at.elapsed() <= Duration::from_millis(2200));
        for from in ready {
            let mut pair = self.connect(Some(from))?;
            Self::exchange(&mut pair)?;
            let (client, mut server) = pair;
            drop(client);
            Self::eof(&mut server)?;
            self.summary.reused += 1;
        }
        Ok(())
    }

    fn run(mut self, plan: &Plan) -> Result<Summary> {
        for round in 0..plan.rounds {
            let start = Instant::now();
            for _ in 0..6 {
                self.client_closes()?;
            }
            for _ in 0..4 {
                self.server_closes()?;
            }
            for _ in 0..2 {
                self.reset()?;
            }
            self.hold_close_wait()?;
            if round % 4 == 0 {
                let port = self.client_closes()?;
                self.to_reuse.push((port, Instant::now()));
            }
            self.reuse_ready()?;
            match round {
                2 => self.closing(3)?,
                5 => self.last_ack_retransmit(3)?,
                _ => {}
            }
            thread::sleep(plan.pause.saturating_sub(start.elapsed()));
        }
        // Release the CLOSE_WAIT sockets; their clients' FIN_WAIT2 turns into TIME_WAIT.
        for (mut client, server) in self.held.drain(..) {
            drop(server);
            Self::eof(&mut client)?;
        }
        self.summary.kernel = tcpext()?;
        Ok(self.summary)
    }
}
