//! The agent's decisions: what the kernel programs cannot decide on their own, and keeping
//! their numbers honest against the kernel's own view.
//!
//! [`tracker`] turns the programs' records into counts (no BPF in it); [`reconcile`] seeds the
//! agent from sock_diag at start-up and compares with it every reconcile interval; [`leaks`]
//! names the processes that hold CLOSE_WAIT sockets too long. This module holds the [`Agent`]
//! they share, the ring drain and what the HTTP side asks of it.
mod leaks;
mod reconcile;
mod trace;
pub mod tracker;

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
pub use reconcile::reconcile_wait;

use crate::{
    Config, config,
    export::{
        closers::Closers,
        kernel_metrics::Reading,
        metrics::Metrics,
        netns_counters::Watched,
        serve,
        snapshot::{self, Report},
        trace::Tracer,
    },
    kernel::{self, Kernel, event},
    sys::{self, monotonic_ns},
};
use tracker::{Tracker, Tuple};

/// The running agent, shared by the drain thread, the timers and the HTTP handlers.
pub struct Agent {
    /// Lock order: `ring`, then `tracker`; `kernel` is never held with either.
    ring: Mutex<RingBuf<MapData>>,
    kernel: Mutex<Kernel>,
    tracker: Mutex<Tracker>,
    pub(crate) metrics: Metrics,
    /// When the ring buffer was last drained (CLOCK_MONOTONIC ns).
    last_drain: AtomicU64,
    config: Config,
    report: Mutex<Report>,
    /// Leaked CLOSE_WAIT sockets already logged.
    logged: Mutex<HashSet<Tuple>>,
    /// Whether the agent said it cannot read every network namespace.
    warned_unreadable: std::sync::atomic::AtomicBool,
    /// Records lost to a full ring buffer, as of the last reconcile.
    lost_seen: AtomicU64,
    /// Tracepoints with programs attached (fixed after start-up; read by /healthz without a lock).
    attached: AtomicUsize,
    /// `config.settings`, as reloaded on SIGHUP.
    settings: RwLock<Arc<config::Config>>,
    /// The namespaces the last reconcile read and watches. TcpExt and sysctls are read from them
    /// at each scrape, and they are checked every sweep interval, so that a deleted one's other
    /// series go within seconds.
    namespaces_read: Watched,
    /// Closes by process, read from the kernel at each scrape and snapshot.
    closers: Arc<Closers>,
    /// The kernel's trace records, read while someone traces, and the clients they go to.
    trace_ring: Mutex<RingBuf<MapData>>,
    pub(crate) tracer: Tracer,
    /// Whether the programs write trace records now; held while switching them.
    trace_switch: Mutex<bool>,
}

/// What the agent is built from besides the kernel: the export side, made first so that the
/// tracker can register its series.
pub struct Parts {
    pub tracker: Tracker,
    pub metrics: Metrics,
    pub namespaces_read: Watched,
    pub closers: Arc<Closers>,
    pub trace_ring: RingBuf<MapData>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often the agent drains the ring buffer between scrapes (a scrape drains it too).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

impl Agent {
    /// The agent around loaded programs, before it has seeded or reconciled.
    pub fn new(config: Config, kernel: Kernel, ring: RingBuf<MapData>, parts: Parts) -> Self {
        let attached = kernel.attached;
        Self {
            ring: Mutex::new(ring),
            kernel: Mutex::new(kernel),
            tracker: Mutex::new(parts.tracker),
            metrics: parts.metrics,
            last_drain: AtomicU64::new(monotonic_ns()),
            settings: RwLock::new(Arc::new(config.settings.clone())),
            config,
            report: Mutex::new(Report::default()),
            logged: Mutex::new(HashSet::new()),
            warned_unreadable: Default::default(),
            lost_seen: AtomicU64::new(0),
            attached: AtomicUsize::new(attached),
            namespaces_read: parts.namespaces_read,
            closers: parts.closers,
            trace_ring: Mutex::new(parts.trace_ring),
            tracer: Tracer::default(),
            trace_switch: Mutex::new(false),
        }
    }

    /// Collects and encodes the metrics for one scrape.
    pub fn render(&self) -> anyhow::Result<String> {
        let start = Instant::now();
        // Every event committed before the scrape is counted in it.
        self.drain();
        let (seeded, decided) = {
            let tracker = lock(&self.tracker);
            (tracker.seeded(), tracker.decided().clone())
        };
        {
            let kernel = lock(&self.kernel);
            // Sweep first, so an orphaned FIN_WAIT2 that got its FIN counts as TIME_WAIT, as ss
            // shows it: every scrape equals the kernel's view.
            if let Err(e) = kernel.run_sweep(false) {
                tracing::warn!("timewait sweep failed: {e}");
            }
            self.metrics.set_reading(Reading {
                readout: kernel.read(),
                decided,
                seeded: seeded.to_vec(),
                attached: kernel.attached,
                programs: kernel.program_stats(),
            });
        }
        self.metrics.scrape_seconds.set(start.elapsed().as_secs_f64());
        let mut out = String::new();
        prometheus::TextEncoder::new().encode_utf8(&self.metrics.registry.gather(), &mut out)?;
        Ok(out)
    }

    /// The configuration file's settings now in force.
    pub(crate) fn settings(&self) -> Arc<config::Config> {
        self.settings.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads `--config.file` again (SIGHUP). A file that does not parse leaves the running
    /// configuration as it is, and says why.
    pub fn reload(&self) {
        let Some(path) = &self.config.config_file else {
            tracing::info!("SIGHUP: no --config.file to reload");
            return;
        };
        match config::Config::load(path) {
            Ok(new) => {
                *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
                self.metrics.reloads.with_label_values(&["success"]).inc();
                tracing::info!(file = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                tracing::error!("configuration not reloaded, the previous one stays: {e}");
            }
        }
    }

    pub fn health(&self) -> Result<(), String> {
        let attached = self.attached.load(Ordering::Relaxed);
        if attached != kernel::TRACEPOINTS.len() {
            return Err(format!(
                "{attached} of {} kernel programs attached",
                kernel::TRACEPOINTS.len()
            ));
        }
        let idle = monotonic_ns().saturating_sub(self.last_drain.load(Ordering::Relaxed));
        if idle > 5_000_000_000 {
            return Err(format!("events not drained for {} s", idle / 1_000_000_000));
        }
        Ok(())
    }

    /// JSON for `/api/v1/snapshot`: live socket counts and the last reconcile.
    pub fn snapshot(&self) -> serde_json::Value {
        self.drain();
        let (seeded, decided) = {
            let tracker = lock(&self.tracker);
            (tracker.seeded(), tracker.decided().clone())
        };
        let readout = {
            let kernel = lock(&self.kernel);
            let _ = kernel.run_sweep(false);
            kernel.read()
        };
        let sockets: Vec<i64> = readout.sockets.iter().zip(&seeded).map(|(k, s)| k + s).collect();
        let counts = snapshot::Counts::new(&readout, &decided);
        snapshot::json(&sockets, counts, lock(&self.report).clone(), self.closers.rows())
    }

    /// Between reconciles, every sweep interval: brings orphaned FIN_WAIT2 entries up to date,
    /// says what the ring buffer lost, and drops the series of namespaces deleted meanwhile.
    pub(crate) fn sweep(&self) {
        let lost = {
            let kernel = lock(&self.kernel);
            if let Err(e) = kernel.run_sweep(false) {
                tracing::warn!("timewait sweep failed: {e}");
            }
            kernel.counter(monitor_common::counter::EVENTS_LOST)
        };
        // Said within a sweep interval, not at the next reconcile (which may be minutes away on
        // a busy host).
        self.note_lost(lost);
        self.forget_gone_namespaces();
        sys::trim();
    }

    /// Logs records lost since the last call (`lost` is the kernel's running count).
    fn note_lost(&self, lost: u64) {
        let before = self.lost_seen.swap(lost, Ordering::Relaxed);
        if lost > before {
            tracing::warn!(
                lost = lost - before,
                "kernel records lost: the ring buffer was full (early timewait ends among them are \
                 not counted); raise --bpf.ring-buffer-size"
            );
        }
    }

    /// Takes every record off the ring buffer into the tracker, then settles cancelled timewait
    /// timers that no re-arm followed.
    pub(crate) fn drain(&self) {
        let mut ring = lock(&self.ring);
        self.last_drain.store(monotonic_ns(), Ordering::Relaxed);
        let mut tracker = lock(&self.tracker);
        while let Some(item) = ring.next() {
            match event::decode(&item) {
                Ok(ev) => tracker.apply(&ev),
                Err(e) => {
                    self.metrics.events_invalid.inc();
                    tracing::debug!("dropping record: {e}");
                }
            }
        }
        // Safe: the re-arm that would follow a cancel is on the ring already, and was just read.
        tracker.settle(monotonic_ns());
        let ended_early = tracker.take_ended_early();
        drop(tracker);
        drop(ring);
        if self.tracer.active() {
            self.drain_trace(&ended_early);
        }
    }
}

impl serve::Counters for Agent {
    fn refused(&self) {
        self.metrics.http_refused.with_label_values(&["connections"]).inc();
    }
}
