//! Seeding and reconciling: the kernel's own view of every namespace the agent can read (see
//! [`crate::view`]), taken at start-up to seed the sockets the programs did not see enter their
//! state, and every reconcile interval to measure drift and refresh the breakdowns.
use std::{
    collections::HashSet,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::{Agent, lock};
use crate::{
    export::{ground_metrics::Reconciled, metrics::GAUGE_STATES, snapshot::Report},
    sys::{self, monotonic_ns, process_cpu},
    view::{
        ground::{self, NsView},
        netns::{self, Namespace},
    },
};

impl Agent {
    /// The network namespaces the kernel programs watch (the --netns one, or all reachable),
    /// and how many processes' namespaces could not be seen.
    pub fn namespaces(&self) -> (Vec<Namespace>, usize) {
        let (all, hidden) = netns::discover_counting_hidden();
        let found = match &self.config.netns_path {
            None => return (all, hidden),
            Some(path) => {
                let mut found: Vec<Namespace> =
                    all.into_iter().filter(|n| n.inode == self.config.netns).collect();
                if found.is_empty() {
                    found.push(Namespace {
                        inode: self.config.netns,
                        path: path.clone(),
                        name: format!("inode/{}", self.config.netns),
                        pid: None,
                    });
                }
                found.truncate(1);
                found
            }
        };
        (found, 0)
    }

    /// The kernel's own view of every namespace the agent can read. What it cannot read is
    /// exported (`twmon_netns_unreadable`) and said once, with what to grant.
    fn read_ground(&self) -> Vec<NsView> {
        let (namespaces, hidden) = self.namespaces();
        let mut denied = 0;
        let views = ground::read(&namespaces, &mut denied);
        let read: HashSet<u32> = views.iter().map(|v| v.inode).collect();
        let settings = self.settings();
        *lock(&self.namespaces_read) = namespaces
            .into_iter()
            .filter(|n| read.contains(&n.inode) && settings.watches(n.inode, &n.name))
            .collect();
        self.metrics.set_unreadable(denied, hidden);
        if (denied > 0 || hidden > 0) && !self.warned_unreadable.swap(true, Ordering::Relaxed) {
            // Root that still cannot read them runs in a sandbox: capabilities are not the cure.
            let cure = if sys::is_root() {
                "twmon runs as root but in a sandbox that hides them (a container without the \
                 host's PID namespace, a systemd unit with ProtectProc= or PrivatePIDs=, a user \
                 namespace): run it in the host's PID namespace (hostPID: true in Kubernetes)"
            } else {
                "entering a namespace needs CAP_SYS_ADMIN, seeing another user's process's \
                 namespace CAP_SYS_PTRACE (or run twmon as root)"
            };
            tracing::warn!(
                namespaces_not_entered = denied,
                processes_not_seen = hidden,
                "cannot read every network namespace: per-namespace counts, breakdowns, leaks and \
                 seeding cover only those read, and twmon_reconcile_drift counts the sockets of \
                 the others; {cure}"
            );
        }
        views
    }

    /// Seeds the agent with the sockets already in teardown states, from the kernel's own view.
    /// Called once, right after the programs are attached.
    pub(crate) fn seed(&self) -> usize {
        lock(&self.tracker).begin_seed();
        // Before the reading: this plus a timer's time left is at or before its end.
        let at = monotonic_ns();
        let views = self.read_ground();
        // Events since the programs were attached: those connections are followed already.
        self.drain();
        let (n, timewait) = {
            let mut tracker = lock(&self.tracker);
            let n = tracker.seed(ground::seeds(&views), at);
            (n, tracker.seeded_timewait())
        };
        let mut kernel = lock(&self.kernel);
        kernel.set_seeded(timewait);
        // From here on the programs report only what the agent decides on.
        kernel.set_report_all(false);
        n
    }

    /// Compares with the kernel's own view and refreshes what comes from it. Returns how long
    /// it took.
    pub fn reconcile(&self) -> Duration {
        let start = Instant::now();
        let cpu_start = process_cpu();
        let views = self.read_ground();
        let totals = ground::totals(&views);
        // A seeded socket missing from `views` ended before the reading, and the kernel program
        // wrote its end (say, an expiry) before the kernel unhashed it: drain first, so that end
        // is counted before the socket is let go of as gone.
        self.drain();
        let (seeded, timewait) = {
            let mut tracker = lock(&self.tracker);
            if tracker.seeded().iter().any(|n| *n > 0) {
                tracker.reconcile_seed(&ground::teardown(&views));
            }
            (tracker.seeded(), tracker.seeded_timewait())
        };
        let readout = {
            let mut kernel = lock(&self.kernel);
            kernel.set_seeded(timewait);
            // The sweep first, so orphaned FIN_WAIT2 sockets that got their FIN count as TIME_WAIT,
            // and every timewait entry whose socket is gone (one whose end no program saw) is
            // ended. Checking every entry is one program run where the kernel walks maps itself;
            // where the agent walks them (a run per entry), only when the counts are above the
            // kernel's, as such entries make them.
            let all = kernel.walks_in_kernel();
            let _ = kernel.run_sweep(all);
            let readout = kernel.read();
            let above =
                |s: u8| readout.sockets[s as usize] + seeded[s as usize] > totals[s as usize];
            if !all
                && (above(monitor_common::tcp::TIME_WAIT) || above(monitor_common::tcp::FIN_WAIT2))
            {
                let _ = kernel.run_sweep(true);
                kernel.read()
            } else {
                readout
            }
        };
        self.note_lost(readout.counter(monitor_common::counter::EVENTS_LOST));
        let mut drift = [0i64; monitor_common::tcp::MAX_STATES as usize];
        for s in GAUGE_STATES {
            let s = s as usize;
            drift[s] = readout.sockets[s] + seeded[s] - totals[s];
        }
        let watched: Vec<NsView> =
            views.into_iter().filter(|v| self.settings().watches(v.inode, &v.name)).collect();
        let b = ground::breakdown(&watched, &self.settings());
        let leaks = self.leaks(&watched);
        let took = start.elapsed();
        *lock(&self.report) = Report::new(&drift, &b, leaks.clone());
        let reconciled = Reconciled { drift: drift.to_vec(), breakdowns: b, leaks };
        self.metrics.set_reconciled(reconciled, took, process_cpu().saturating_sub(cpu_start));
        sys::trim();
        took
    }

    /// Removes the series of namespaces deleted since the last reconcile: one stat of a file
    /// that opened each (/run/netns/NAME, or /proc/PID/ns/net of a process in it). A namespace
    /// whose process exited while others still hold it is dropped until the next reconcile
    /// finds it again.
    pub(crate) fn forget_gone_namespaces(&self) {
        use std::os::unix::fs::MetadataExt as _;
        let mut read = lock(&self.namespaces_read);
        let (gone, alive): (Vec<_>, Vec<_>) = read
            .drain(..)
            .partition(|n| !std::fs::metadata(&n.path).is_ok_and(|m| m.ino() as u32 == n.inode));
        *read = alive;
        drop(read);
        for n in gone {
            tracing::debug!(netns = %n.name, "network namespace gone: its series are removed");
            self.metrics.forget_netns(&n.name);
        }
    }
}

/// How long to wait before the next reconcile: the configured interval, stretched so that
/// reconciling takes at most `max_cpu` of a core on average (at the default 0.5 %, a 200 ms
/// reconcile waits 39.8 s). A reconcile reads every socket of every namespace through sock_diag,
/// whose cost grows with the sockets the host holds (the kernel walks its whole connection table
/// once per namespace), not with the connections it churns.
pub fn reconcile_wait(interval: Duration, took: Duration, max_cpu: f64) -> Duration {
    let stretched = took.div_f64(max_cpu).saturating_sub(took);
    if stretched > interval {
        tracing::debug!(?took, wait = ?stretched, max_cpu, "reconcile is slow; waiting longer to \
                                                            stay within reconcile.max_cpu");
    }
    interval.max(stretched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_reconciles_wait_longer() {
        let s = Duration::from_secs;
        assert_eq!(reconcile_wait(s(10), Duration::from_millis(20), 0.01), s(10));
        assert_eq!(
            reconcile_wait(s(10), Duration::from_millis(200), 0.01),
            Duration::from_millis(19_800)
        );
        assert_eq!(reconcile_wait(s(60), Duration::from_millis(200), 0.01), s(60));
        assert_eq!(
            reconcile_wait(s(1), Duration::from_millis(1500), 0.5),
            Duration::from_millis(1500)
        );
    }
}
