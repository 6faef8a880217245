//! A bounded TCP workload on loopback that walks every teardown path twmon reports, inside a
//! network namespace of its own so that its drop rules and leftovers stay out of the host's way.
//! Its connections and closes are `testkit`'s, as in the tests; a failure panics there, which
//! fails the check that runs it.
//!
//! When the workload ends its namespace is deleted and nothing holds it any more: the kernel
//! tears it down and kills its remaining timewait sockets, which is how the workload gets
//! TIME_WAIT endings without waiting 2MSL.
use std::{
    collections::BTreeMap,
    net::{Shutdown, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use testkit::{
    netns::{self, Netns},
    workload::{self, Close, NftTable, Pair, Server},
};

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

/// Opens `n` connections on loopback in the caller's network namespace whose client shuts down
/// its side and whose server side stays in CLOSE_WAIT until the returned pairs are dropped.
pub fn hold_close_wait(n: usize) -> Vec<Pair> {
    let server = Server::bind("127.0.0.1:0");
    (0..n)
        .map(|_| {
            let mut pair = server.connect();
            pair.0.shutdown(Shutdown::Write).expect("the client's shutdown");
            workload::eof(&mut pair.1);
            pair
        })
        .collect()
}

/// What to run: `rounds` rounds `pause` apart.
pub struct Plan {
    pub rounds: u32,
    pub pause: Duration,
}

/// Runs the workload in a new network namespace, which is gone when this returns.
pub fn run(plan: Plan) -> Summary {
    let ns = Netns::new("check");
    ns.run(|| Workload::new(&ns).run(&plan))
}

/// TcpExt counters of the namespace about TIME_WAIT and aborts.
fn tcpext(ns: &Netns) -> BTreeMap<String, u64> {
    netns::group_in(&ns.proc_net("netstat"), "TcpExt")
        .into_iter()
        .filter(|(n, _)| {
            n.starts_with("TW") || n.starts_with("TCPAbortOn") || n == "TCPTimeWaitOverflow"
        })
        .map(|(n, v)| (n, v as u64))
        .collect()
}

/// Loses segments sent from any of `ports` that match `what` (an nft expression), until the
/// table is dropped.
fn lose<'a>(ns: &'a Netns, ports: &[u16], what: &str) -> NftTable<'a> {
    let set = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    NftTable::new(
        ns,
        "twmon_check",
        &format!(
            "chain in {{ type filter hook input priority 0; tcp sport {{ {set} }} {what} drop; }}"
        ),
    )
}

struct Workload<'a> {
    ns: &'a Netns,
    server: Server,
    summary: Summary,
    /// Server sides kept in CLOSE_WAIT, and their clients, until the end.
    held: Vec<Pair>,
    /// Client ports left in TIME_WAIT, to be reused by a new connect().
    to_reuse: Vec<(SocketAddr, Instant)>,
}

impl<'a> Workload<'a> {
    /// Made on a thread inside `ns`.
    fn new(ns: &'a Netns) -> Self {
        Self {
            ns,
            server: Server::bind("127.0.0.1:0"),
            summary: Summary::default(),
            held: Vec::new(),
            to_reuse: Vec::new(),
        }
    }

    /// A connection whose client port may be taken over once it is in TIME_WAIT, with a request
    /// and its reply, so that both sides have sent data before the close.
    fn connect(&self, from: Option<SocketAddr>) -> Pair {
        let mut pair = self.server.connect_reusable(from);
        workload::exchange(&mut pair);
        pair
    }

    fn client_closes(&mut self) -> SocketAddr {
        let pair = self.connect(None);
        let port = pair.0.local_addr().expect("the client's address");
        Close::ClientFirst.run(pair);
        self.summary.client_closed += 1;
        port
    }

    fn server_closes(&mut self) {
        Close::ServerFirst.run(self.connect(None));
        self.summary.server_closed += 1;
    }

    fn reset(&mut self) {
        Close::Reset.run(self.connect(None));
        self.summary.reset += 1;
    }

    fn hold_close_wait(&mut self) {
        let mut pair = self.connect(None);
        pair.0.shutdown(Shutdown::Write).expect("the client's shutdown");
        workload::eof(&mut pair.1);
        self.held.push(pair);
        self.summary.held_close_wait += 1;
    }

    fn ports(pairs: &[Pair]) -> Vec<u16> {
        pairs.iter().map(|(c, _)| c.local_addr().expect("the client's address").port()).collect()
    }

    /// Both sides send a FIN before either FIN is acknowledged: the client's FIN is dropped
    /// (retransmitted from FIN_WAIT1), the server closes meanwhile, the client receives that FIN
    /// while its own is unacknowledged (CLOSING, retransmitting again), then the drop is lifted.
    fn closing(&mut self, n: usize) {
        let mut pairs: Vec<Pair> = (0..n).map(|_| self.connect(None)).collect();
        let rule = lose(self.ns, &Self::ports(&pairs), "tcp flags & fin == fin");
        for (c, _) in &pairs {
            c.shutdown(Shutdown::Write).expect("the client's shutdown");
        }
        // At least one retransmission in FIN_WAIT1 (the minimum RTO is 200 ms).
        thread::sleep(Duration::from_millis(500));
        for (_, s) in &pairs {
            s.shutdown(Shutdown::Write).expect("the server's shutdown");
        }
        thread::sleep(Duration::from_millis(300));
        drop(rule);
        for (c, s) in &mut pairs {
            workload::eof(c);
            workload::eof(s);
        }
        // The retransmission that got through has reached the server: both sides are in
        // TIME_WAIT once its ACK is back.
        thread::sleep(Duration::from_millis(300));
        self.summary.closing += n as u32;
    }

    /// The client's last ACK is dropped: the server retransmits its FIN from LAST_ACK and the
    /// client's TIME_WAIT socket restarts 2MSL on each copy.
    fn last_ack_retransmit(&mut self, n: usize) {
        let mut pairs: Vec<Pair> = (0..n)
            .map(|_| {
                let mut p = self.connect(None);
                p.0.shutdown(Shutdown::Write).expect("the client's shutdown");
                workload::eof(&mut p.1);
                p
            })
            .collect();
        let rule = lose(self.ns, &Self::ports(&pairs), "");
        for (c, s) in pairs.iter_mut() {
            s.shutdown(Shutdown::Write).expect("the server's shutdown");
            workload::eof(c);
        }
        thread::sleep(Duration::from_millis(700));
        drop(rule);
        thread::sleep(Duration::from_millis(1500));
        self.summary.last_ack_retransmit += n as u32;
    }

    /// connect() from a client port whose TIME_WAIT is older than a second (tcp_tw_reuse, on for
    /// loopback by default) takes the 4-tuple over.
    fn reuse_ready(&mut self) {
        let ready = |at: &Instant| at.elapsed() > Duration::from_millis(2200);
        let from: Vec<SocketAddr> =
            self.to_reuse.iter().filter(|(_, at)| ready(at)).map(|(a, _)| *a).collect();
        self.to_reuse.retain(|(_, at)| !ready(at));
        for from in from {
            Close::ClientFirst.run(self.connect(Some(from)));
            self.summary.reused += 1;
        }
    }

    fn run(mut self, plan: &Plan) -> Summary {
        for round in 0..plan.rounds {
            let start = Instant::now();
            for _ in 0..6 {
                self.client_closes();
            }
            for _ in 0..4 {
                self.server_closes();
            }
            for _ in 0..2 {
                self.reset();
            }
            self.hold_close_wait();
            if round % 4 == 0 {
                let port = self.client_closes();
                self.to_reuse.push((port, Instant::now()));
            }
            self.reuse_ready();
            match round {
                2 => self.closing(3),
                5 => self.last_ack_retransmit(3),
                _ => {}
            }
            thread::sleep(plan.pause.saturating_sub(start.elapsed()));
        }
        // Release the CLOSE_WAIT sockets; their clients' FIN_WAIT2 turns into TIME_WAIT.
        for (mut client, server) in self.held.drain(..) {
            drop(server);
            workload::eof(&mut client);
        }
        self.summary.kernel = tcpext(self.ns);
        self.summary
    }
}
