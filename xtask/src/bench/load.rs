//! Connection churn on loopback inside a namespace: clients connect, send one byte, read the
//! echo and close; servers echo the byte, wait for the client's FIN and close. The client closes
//! first, so every connection goes ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2 -> TIME_WAIT on the
//! client side and CLOSE_WAIT -> LAST_ACK -> CLOSE on the server side: the full close path.
use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use testkit::netns::Netns;

use super::interrupted;

/// Listeners inside a namespace with acceptor threads that serve one connection at a time.
pub struct Servers {
    listeners: Vec<TcpListener>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pub addrs: Vec<SocketAddr>,
}

fn serve(mut s: TcpStream) {
    let mut b = [0u8; 1];
    if s.read_exact(&mut b).is_err() || s.write_all(&b).is_err() {
        return;
    }
    // Wait for the client's FIN, then close: the server side takes the passive close.
    while let Ok(n) = s.read(&mut b) {
        if n == 0 {
            break;
        }
    }
}

impl Servers {
    /// `ports` listeners on 127.0.0.1, `acceptors` threads on each.
    pub fn start(ns: &Netns, ports: usize, acceptors: usize) -> Result<Self> {
        let listeners: Vec<TcpListener> = ns.run(|| {
            (0..ports)
                .map(|_| {
                    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
                    // A deep accept queue: std listens with a smaller backlog.
                    // SAFETY: listen on a socket we own; calling it again only changes the backlog.
                    unsafe { libc::listen(l.as_raw_fd(), 4096) };
                    Ok(l)
                })
                .collect::<Result<_>>()
        })?;
        let addrs = listeners.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for l in &listeners {
            for _ in 0..acceptors {
                let l = l.try_clone()?;
                let stop = stop.clone();
                threads.push(
                    std::thread::Builder::new()
                        .stack_size(128 << 10)
                        .name("bench-server".into())
                        .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok((s, _)) = l.accept() {
                                serve(s);
                            }
                        }
                    })?,
                );
            }
        }
        Ok(Servers { listeners, threads, stop, addrs })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in &self.listeners {
            // SAFETY: shutdown on a listening socket we own wakes every thread blocked in accept().
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// When a churn run ends.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// After this long.
    Time(Duration),
    /// After this many connections, or this long, whichever comes first.
    Count(u64, Duration),
}

#[derive(Clone, Debug, Default)]
pub struct Churn {
    pub connections: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Churn {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn one_connection(dst: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(dst)?;
    let mut b = [b'x'];
    s.write_all(&b)?;
    s.read_exact(&mut b)?;
    Ok(())
}

/// Runs `clients` client threads inside `ns` against `dsts` (spread round-robin), as fast as
/// they can or, with `pace`, at that many connections per second in total.
pub fn churn(
    ns: &Netns,
    dsts: &[SocketAddr],
    clients: usize,
    until: Until,
    pace: Option<f64>,
) -> Result<Churn> {
    let ns_file: OwnedFd =
        File::open(ns.path()).with_context(|| format!("opening {}", ns.path()))?.into();
    let (limit, budget) = match until {
        Until::Time(d) => (d, i64::MAX),
        Until::Count(n, d) => (d, n as i64),
    };
    let remaining = AtomicI64::new(budget);
    let start_line = Barrier::new(clients + 1);
    let start = std::sync::OnceLock::<Instant>::new();
    let results: Vec<Result<(u64, u64, Option<String>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let dst = dsts[i % dsts.len()];
                let (ns_file, remaining, start_line, start) =
                    (&ns_file, &remaining, &start_line, &start);
                std::thread::Builder::new()
                    .stack_size(128 << 10)
                    .name("bench-client".into())
                    .spawn_scoped(s, move || -> Result<(u64, u64, Option<String>)> {
                        // SAFETY: setns on a namespace fd we hold, for this thread only.
                        let entered =
                            unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
                        start_line.wait();
                        if !entered {
                            bail!("setns into {} failed", ns.name);
                        }
                        let t0 = *start.get().expect("start set before the barrier opens");
                        let deadline = t0 + limit;
                        let period = pace.map(|r| Duration::from_secs_f64(clients as f64 / r));
                        // Stagger paced clients across one period.
                        let mut due = t0
                            + period
                                .map(|p| p.mul_f64(i as f64 / clients as f64))
                                .unwrap_or_default();
                        let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
                        loop {
                            let now = Instant::now();
                            if now >= deadline || interrupted() {
                                break;
                            }
                            if let Some(p) = period {
                                if due > now {
                                    std::thread::sleep(due - now);
                                }
                                due += p;
                            }
                            if remaining.fetch_sub(1, Ordering::Relaxed) <= 0 {
                                break;
                            }
                            match one_connection(dst) {
                                Ok(()) => ok += 1,
                                Err(e) => {
                                    remaining.fetch_add(1, Ordering::Relaxed);
                                    errors += 1;
                                    if first_error.is_none() {
                                        first_error = Some(format!("{dst}: {e}"));
                                    }
                                    // Out of ports or a full queue: back off a little.
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                            }
                        }
                        Ok((ok, errors, first_error))
                    })
                    .expect("spawning a client thread")
            })
            .collect();
        start.set(Instant::now()).expect("set once");
        start_line.wait();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a client thread panicked")))
            .collect()
    });
    let elapsed = start.get().expect("set").elapsed();
    let mut out = Churn { elapsed, ..Churn::default() };
    for r in results {
        let (ok, errors, first) = r?;
        out.connections += ok;
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first;
        }
    }
    Ok(out)
}
