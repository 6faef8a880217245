//! Start-up and shutdown: binds the listener, loads the kernel programs, builds the agent,
//! seeds it, and runs the drain thread, the reconcile timer, SIGHUP reloads and the HTTP
//! server until SIGINT or SIGTERM.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    Config,
    agent::{Agent, DRAIN_INTERVAL, Parts, reconcile_wait, tracker::Tracker},
    export::{closers::Closers, family::Shared, http, metrics::Metrics, netns_counters, serve},
    kernel::{self, Kernel},
    sys,
};

/// `--config.check`: the flags and the configuration file were read already; this loads and
/// attaches the kernel programs, detaches them and says what it found.
pub fn check(config: &Config) -> anyhow::Result<()> {
    let (kernel, _ring, _logger) = Kernel::load(config.netns, &config.limits)?;
    println!(
        "twmon: configuration and kernel ok: {} of {} tracepoints attached (HZ {}, kernel {}){}",
        kernel.attached,
        kernel::TRACEPOINTS.len(),
        kernel.hz,
        sys::kernel_release(),
        config.config_file.as_ref().map(|p| format!(", {} read", p.display())).unwrap_or_default()
    );
    if kernel.attached != kernel::TRACEPOINTS.len() {
        anyhow::bail!("not every kernel program attached");
    }
    Ok(())
}

/// Runs the agent until SIGINT or SIGTERM, then detaches everything.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Signals first: from here on SIGHUP reloads rather than kills (its default), and SIGINT or
    // SIGTERM stop the agent through its shutdown.
    let mut hangup = signal(SignalKind::hangup())?;
    let stop = shutdown()?;
    // Bind first: a busy port should fail before anything is attached to the kernel.
    let mut bound = tokio::net::TcpListener::bind(config.listen).await;
    if let Err(e) = &bound
        && config.listen.ip() == std::net::Ipv6Addr::UNSPECIFIED
        && e.raw_os_error() == Some(libc::EAFNOSUPPORT)
    {
        bound =
            tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, config.listen.port()))
                .await;
    }
    let listener = bound.map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => "the port is taken: is another twmon or exporter using it?",
            Some(libc::EADDRNOTAVAIL) => {
                "that address is not one of this host's: give one it has, or :PORT for all"
            }
            Some(libc::EACCES) => "ports below 1024 need CAP_NET_BIND_SERVICE",
            _ => "",
        };
        anyhow::anyhow!("cannot listen on {}: {e}; {why} (--web.listen-address)", config.listen)
    })?;
    let (mut kernel, ring, logger) = Kernel::load(config.netns, &config.limits)?;
    let namespaces_read = netns_counters::Watched::default();
    let closers_map = kernel
        .take_closers()
        .ok_or_else(|| anyhow::anyhow!("the closers map was taken already"))?;
    let closers = Arc::new(Closers::new(
        closers_map,
        namespaces_read.clone(),
        config.settings.breakdown.top_k,
    )?);
    let trace_ring = kernel
        .take_trace()
        .ok_or_else(|| anyhow::anyhow!("the trace ring buffer was taken already"))?;
    let metrics = Metrics::new(&sys::kernel_release(), kernel.hz, namespaces_read.clone())?;
    metrics.registry.register(Box::new(Shared(closers.clone())))?;
    let tracker = Tracker::new(&metrics.registry)?;
    tracing::info!(
        programs = kernel.attached,
        hz = kernel.hz,
        netns = config.netns,
        "kernel programs attached"
    );
    let agent = Arc::new(Agent::new(
        config.clone(),
        kernel,
        ring,
        Parts { tracker, metrics, namespaces_read, closers, trace_ring },
    ));
    let seeded = agent.seed();
    sys::trim();
    tracing::info!(sockets = seeded, "seeded sockets already in teardown states from sock_diag");
    agent.reconcile();

    // The ring drain and the sweep run on a thread of their own, off the async runtime: waiting
    // for the kernel (a scrape's sweep, a reconcile) never delays an HTTP response.
    let stop_drain = Arc::new(AtomicBool::new(false));
    let drainer = {
        let (a, stop, every) = (agent.clone(), stop_drain.clone(), config.sweep_interval);
        std::thread::Builder::new()
            .name("twmon-drain".into())
            .spawn(move || drain_loop(&a, &stop, every))?
    };
    let mut tasks = tokio::task::JoinSet::new();
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
    tasks.spawn(async move {
        let mut wait = a.settings().reconcile.interval;
        loop {
            tokio::time::sleep(wait).await;
            let r = a.clone();
            let took = tokio::task::spawn_blocking(move || r.reconcile()).await;
            // Read each time: a reload may have changed them.
            let s = a.settings();
            match took {
                Ok(took) => wait = reconcile_wait(s.reconcile.interval, took, s.reconcile.max_cpu),
                Err(e) => tracing::warn!("reconcile failed: {e}"),
            }
        }
    });
    let a = agent.clone();
    tasks.spawn(async move {
        while hangup.recv().await.is_some() {
            a.reload();
        }
    });

    // The address bound, not the one asked for: with port 0 the kernel picks it.
    let address = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(
        %address,
        path = %config.web.telemetry_path,
        tls = config.web.config.tls.is_some(),
        basic_auth = !config.web.config.users.is_empty(),
        "serving /metrics"
    );
    let app = http::router(agent.clone(), &config.web);
    // At SIGINT or SIGTERM the trace streams end first: a client must not hold the shutdown up.
    let stop = {
        let agent = agent.clone();
        async move {
            stop.await;
            agent.tracer.close();
        }
    };
    serve::serve(
        listener,
        app,
        config.web.limits,
        config.web.config.tls.clone(),
        agent.clone(),
        stop,
    )
    .await;
    tasks.shutdown().await;
    stop_drain.store(true, Ordering::Relaxed);
    if drainer.join().is_err() {
        tracing::error!("the drain thread panicked");
    }
    // The last reference: the programs are detached here.
    drop(agent);
    tracing::info!("kernel programs detached; exiting");
    Ok(())
}

/// Completes at the first SIGINT or SIGTERM.
pub(crate) fn shutdown() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// The kernel programs write without waking the agent (see monitor-ebpf): the ring is drained
/// on a timer, and swept every `sweep_every`, until `stop`.
fn drain_loop(agent: &Agent, stop: &AtomicBool, sweep_every: Duration) {
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(DRAIN_INTERVAL);
        agent.drain();
        if last_sweep.elapsed() >= sweep_every {
            last_sweep = Instant::now();
            agent.sweep();
        }
    }
}
