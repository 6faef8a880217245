//! Traffic on connections that stay open, which closes nothing: a bulk transfer (clients write
//! as fast as they can, the server reads and discards) and keep-alive request/response (each
//! client sends 64 bytes and waits for the server's 64-byte answer, over and over). Neither
//! changes a socket's state while it runs, but both start and cancel kernel timers all the time
//! (retransmit, delayed ACK, keepalive, pacing): what twmon's timer programs see of them is
//! what twmon costs a host that is not closing anything.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use testkit::netns::Netns;

use super::interrupted;

/// Bytes per request and per answer.
const MESSAGE: usize = 64;
/// Bytes per write of a bulk client.
const CHUNK: usize = 128 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Bulk,
    RequestResponse,
}

impl Workload {
    pub fn label(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk transfer",
            Workload::RequestResponse => "request/response",
        }
    }

    /// The count of a run per second: Gbit/s for the bulk transfer, requests/s.
    pub fn rate(self, count: u64, elapsed: Duration) -> f64 {
        let per_s = count as f64 / elapsed.as_secs_f64().max(1e-9);
        match self {
            Workload::Bulk => per_s * 8.0 / 1e9,
            Workload::RequestResponse => per_s,
        }
    }
}

/// A listener inside a namespace serving one workload, a thread per connection.
pub struct Server {
    listener: TcpListener,
    acceptor: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pub addr: SocketAddr,
}

fn nodelay(s: &TcpStream) {
    // Small requests go out at once, as a request/response protocol's would.
    let _ = s.set_nodelay(true);
}

fn sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 << 10];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

fn answer(mut s: TcpStream) {
    nodelay(&s);
    let mut buf = [0u8; MESSAGE];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            break;
        }
    }
}

impl Server {
    pub fn start(ns: &Netns, workload: Workload) -> Result<Self> {
        let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (l, stop2) = (listener.try_clone()?, stop.clone());
        let acceptor =
            std::thread::Builder::new().name("bench-open-server".into()).spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let Ok((s, _)) = l.accept() else { continue };
                    let serve = match workload {
                        Workload::Bulk => sink,
                        Workload::RequestResponse => answer,
                    };
                    // The connection's thread ends when the client closes it.
                    let _ =
                        std::thread::Builder::new().stack_size(512 << 10).spawn(move || serve(s));
                }
            })?;
        Ok(Server { listener, acceptor: Some(acceptor), stop, addr })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: shutdown on a listening socket we own wakes the thread blocked in accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// `clients` connections to `dst` from inside `ns`, each on its own thread, made before the
/// clock starts and closed after it stops; returns bytes written (bulk) or requests answered,
/// and the time measured.
pub fn run(
    ns: &Netns,
    dst: SocketAddr,
    workload: Workload,
    clients: usize,
    d: Duration,
) -> Result<(u64, Duration)> {
    // All connected, then the clock starts.
    let (ready, go) = (Barrier::new(clients + 1), Barrier::new(clients + 1));
    let start = std::sync::OnceLock::<Instant>::new();
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (ready, go, start) = (&ready, &go, &start);
                s.spawn(move || -> Result<u64> {
                    let conn = ns.enter().and_then(|()| TcpStream::connect(dst));
                    ready.wait();
                    go.wait();
                    let mut conn = conn?;
                    nodelay(&conn);
                    let deadline = *start.get().expect("set before the barrier opens") + d;
                    let mut n = 0u64;
                    match workload {
                        Workload::Bulk => {
                            let buf = vec![0x5au8; CHUNK];
                            while Instant::now() < deadline && !interrupted() {
                                n += conn.write(&buf)? as u64;
                            }
                        }
                        Workload::RequestResponse => {
                            let mut buf = [0x5au8; MESSAGE];
                            while Instant::now() < deadline && !interrupted() {
                                conn.write_all(&buf)?;
                                conn.read_exact(&mut buf)?;
                                n += 1;
                            }
                        }
                    }
                    Ok(n)
                })
            })
            .collect();
        ready.wait();
        let t0 = Instant::now();
        start.set(t0).expect("set once");
        go.wait();
        let counts: Vec<Result<u64>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a client thread panicked")))
            .collect();
        (counts, t0.elapsed())
    });
    let (counts, elapsed) = counts;
    let mut total = 0;
    for c in counts {
        total += c?;
    }
    Ok((total, elapsed))
}
