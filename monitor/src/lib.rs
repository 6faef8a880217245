//! twmon: an eBPF monitor of how TCP connections end.
//!
//! Modules, one concern each: [`layout`] reads the running kernel's offsets, [`kernel`] loads
//! and attaches the programs and reads their maps, [`event`] decodes ring-buffer records,
//! [`tracker`] turns events into counters and histograms (no BPF in it), [`metrics`] holds the
//! registry, [`http`] serves it.
pub mod event;
pub mod http;
pub mod kernel;
pub mod layout;
pub mod metrics;
pub mod netns;
pub mod procfs;
pub mod tracker;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{kernel::Kernel, metrics::Metrics, tracker::Tracker};

/// Everything the agent runs with; the CLI fills it in.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Inode of the only network namespace to watch, 0 for all.
    pub netns: u32,
    pub limits: kernel::Limits,
    pub sweep_interval: Duration,
}

/// The running agent, shared by the event loop, the timers and the HTTP handlers.
pub struct Agent {
    kernel: Mutex<Kernel>,
    tracker: Mutex<Tracker>,
    metrics: Metrics,
    consuming: AtomicBool,
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

impl Agent {
    /// Collects and encodes the metrics for one scrape.
    pub fn render(&self) -> anyhow::Result<String> {
        let start = Instant::now();
        {
            let kernel = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = kernel.run_sweep() {
                tracing::warn!("timewait sweep failed: {e}");
            }
            self.metrics.refresh(&kernel.read(), kernel.attached, &kernel.program_stats());
        }
        self.tracker.lock().unwrap_or_else(|e| e.into_inner()).settle(monotonic_ns());
        self.metrics.scrape_seconds.set(start.elapsed().as_secs_f64());
        let mut out = String::new();
        prometheus::TextEncoder::new().encode_utf8(&self.metrics.registry.gather(), &mut out)?;
        Ok(out)
    }

    pub fn health(&self) -> Result<(), String> {
        let attached = self.kernel.lock().unwrap_or_else(|e| e.into_inner()).attached;
        if attached != kernel::TRACEPOINTS.len() {
            return Err(format!("{attached} of {} kernel programs attached", kernel::TRACEPOINTS.len()));
        }
        if !self.consuming.load(Ordering::Relaxed) {
            return Err("the event loop has stopped".into());
        }
        Ok(())
    }

    fn consume(&self, ring: &mut RingBuf<MapData>) {
        let mut tracker = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(item) = ring.next() {
            match event::decode(&item) {
                Ok(ev) => tracker.apply(&ev),
                Err(e) => {
                    self.metrics.events_invalid.inc();
                    tracing::debug!("dropping record: {e}");
                }
            }
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM, then detaches everything.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Bind first: a busy port should fail before anything is attached to the kernel.
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {}; is another twmon or exporter using it? Pick another with \
             --web.listen-address",
            config.listen
        )
    })?;
    let (kernel, ring, logger) = Kernel::load(config.netns, &config.limits)?;
    let metrics = Metrics::new(&kernel_release(), kernel.hz)?;
    let tracker = Tracker::new(&metrics.registry)?;
    tracing::info!(
        programs = kernel.attached,
        hz = kernel.hz,
        netns = config.netns,
        "kernel programs attached"
    );
    let agent = Arc::new(Agent {
        kernel: Mutex::new(kernel),
        tracker: Mutex::new(tracker),
        metrics,
        consuming: AtomicBool::new(true),
    });

    let mut tasks = tokio::task::JoinSet::new();
    let a = agent.clone();
    tasks.spawn(async move {
        let result = async {
            // The ring buffer owns its fd for as long as the AsyncFd lives.
            #[allow(deprecated)]
            let mut fd = AsyncFd::new(ring)?;
            loop {
                let mut guard = fd.readable_mut().await?;
                a.consume(guard.get_inner_mut());
                guard.clear_ready();
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        }
        .await;
        a.consuming.store(false, Ordering::Relaxed);
        if let Err(e) = result {
            tracing::error!("event loop stopped: {e}");
        }
    });
    if let Some(logger) = logger {
        tasks.spawn(async move {
            #[allow(deprecated)]
            let Ok(mut fd) = AsyncFd::new(logger) else { return };
            while let Ok(mut guard) = fd.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    let a = agent.clone();
    let sweep_every = config.sweep_interval;
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep = Instant::now();
        loop {
            tick.tick().await;
            a.tracker.lock().unwrap_or_else(|e| e.into_inner()).settle(monotonic_ns());
            if last_sweep.elapsed() >= sweep_every {
                last_sweep = Instant::now();
                if let Err(e) = a.kernel.lock().unwrap_or_else(|e| e.into_inner()).run_sweep() {
                    tracing::warn!("timewait sweep failed: {e}");
                }
            }
        }
    });

    tracing::info!(address = %config.listen, "serving /metrics");
    axum::serve(listener, http::router(agent.clone()))
        .with_graceful_shutdown(shutdown())
        .await
        .context("HTTP server failed")?;
    tasks.shutdown().await;
    drop(agent);
    tracing::info!("kernel programs detached; exiting");
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
