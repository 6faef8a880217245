//! CLOSE_WAIT leaks: sockets past the threshold, found by the kernel programs (which know when
//! each entered the state), attributed to the processes that hold them through procfs.
use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Agent, lock};
use crate::{
    agent::tracker::Tuple,
    export::metrics::Leak,
    sys::monotonic_ns,
    view::{ground::NsView, procfs},
};

impl Agent {
    /// CLOSE_WAIT sockets older than the threshold, attributed to the processes that hold them.
    pub(crate) fn leaks(&self, views: &[NsView]) -> Vec<Leak> {
        let settings = self.settings();
        let cfg = &settings.close_wait;
        let now = monotonic_ns();
        let before = now.saturating_sub(cfg.leak_threshold.as_nanos() as u64);
        // The kernel programs know when each socket entered CLOSE_WAIT; ask for the old ones.
        self.drain();
        lock(&self.tracker).begin_close_wait_scan();
        if let Err(e) = lock(&self.kernel).scan_close_wait(before) {
            // What was logged stays logged: nothing is known about those sockets this time.
            tracing::warn!("CLOSE_WAIT scan failed: {e}");
            return Vec::new();
        }
        self.drain();
        let old = lock(&self.tracker).close_wait_older_than(before);
        // A leak is logged and counted once for as long as the kernel programs see the socket in
        // CLOSE_WAIT, even when a reconcile's sock_diag view misses it.
        let mut logged = lock(&self.logged);
        let still: HashSet<Tuple> = old.iter().map(|(t, _)| *t).collect();
        logged.retain(|t| still.contains(t));
        if old.is_empty() {
            return Vec::new();
        }
        let mut sockets: HashMap<Tuple, (u64, &str)> = HashMap::new();
        for v in views {
            for s in v
                .sockets
                .iter()
                .filter(|s| s.state == monitor_common::tcp::CLOSE_WAIT && s.inode != 0)
            {
                sockets.insert(
                    Tuple::new(v.inode, s.local, s.remote),
                    (s.inode as u64, v.name.as_str()),
                );
            }
        }
        let inodes: HashSet<u64> =
            old.iter().filter_map(|(t, _)| sockets.get(t).map(|(i, _)| *i)).collect();
        let owners = procfs::socket_owners(&inodes);
        let mut by_process: BTreeMap<(String, i32, String), Leak> = BTreeMap::new();
        for (t, since) in old {
            let Some((inode, ns)) = sockets.get(&t) else { continue };
            let age = now.saturating_sub(since) as f64 / 1e9;
            for (pid, comm) in owners.get(inode).into_iter().flatten() {
                let leak =
                    by_process.entry((ns.to_string(), *pid, comm.clone())).or_insert_with(|| {
                        Leak {
                            netns: ns.to_string(),
                            pid: *pid,
                            comm: comm.clone(),
                            sockets: 0,
                            oldest_seconds: 0.0,
                            examples: Vec::new(),
                        }
                    });
                leak.sockets += 1;
                leak.oldest_seconds = leak.oldest_seconds.max(age);
                if leak.examples.len() < 3 {
                    leak.examples.push(format!("{} <- {}", t.local_addr(), t.remote_addr()));
                }
                if logged.insert(t) {
                    self.metrics.leaks_total.inc();
                    tracing::warn!(
                        pid,
                        comm = %comm,
                        netns = %ns,
                        local = %t.local_addr(),
                        remote = %t.remote_addr(),
                        seconds = age.round(),
                        "CLOSE_WAIT leak: the peer closed, this process has not called close()"
                    );
                }
            }
        }
        let mut leaks: Vec<Leak> = by_process.into_values().collect();
        leaks.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.pid.cmp(&b.pid)));
        leaks.truncate(cfg.top_k);
        leaks
    }
}
