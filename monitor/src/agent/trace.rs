//! The agent's side of a trace: switching the programs' trace records on for the first client
//! and off after the last, and turning records (and the early timewait ends the agent decides)
//! into lines for the clients.
use std::{collections::HashMap, sync::Arc};

use monitor_common::Event;
use tokio::sync::broadcast;

use super::{Agent, lock};
use crate::{
    export::trace::{self, TraceLine},
    sys,
};

/// A client streaming the trace; the programs stop tracing when the last one is dropped.
pub struct TraceClient {
    agent: Arc<Agent>,
    pub lines: broadcast::Receiver<Arc<TraceLine>>,
}

impl Drop for TraceClient {
    fn drop(&mut self) {
        if self.agent.tracer.leave() {
            self.agent.retrace();
        }
        self.agent.metrics.trace_clients.set(self.agent.tracer.clients() as i64);
    }
}

impl Agent {
    /// A new trace client, or `None` when [`trace::MAX_CLIENTS`] stream already.
    pub fn trace(self: &Arc<Self>) -> Option<TraceClient> {
        let (lines, first) = self.tracer.join()?;
        if first {
            self.retrace();
        }
        self.metrics.trace_clients.set(self.tracer.clients() as i64);
        Some(TraceClient { agent: self.clone(), lines })
    }

    /// Has the programs write trace records while anyone traces, and not otherwise. Records
    /// left from an earlier trace are dropped first: they are not this one's.
    fn retrace(&self) {
        let _switch = lock(&self.trace_switch);
        let on = self.tracer.active();
        if on {
            let mut ring = lock(&self.trace_ring);
            while ring.next().is_some() {}
        }
        lock(&self.tracker).set_tracing(on);
        lock(&self.kernel).set_trace(on);
        tracing::debug!(clients = self.tracer.clients(), on, "trace switched");
    }

    /// The trace records written since the last drain, then the early ends just decided.
    pub(super) fn drain_trace(&self, ended_early: &[Event]) {
        let names: HashMap<u32, String> =
            lock(&self.namespaces_read).iter().map(|n| (n.inode, n.name.clone())).collect();
        let clock = sys::unix_minus_monotonic();
        let mut ring = lock(&self.trace_ring);
        while let Some(item) = ring.next() {
            match trace::decode(&item) {
                Some(r) => self.tracer.publish(TraceLine::new(&r.event, &r.comm, r.pid, clock, &names)),
                None => self.metrics.events_invalid.inc(),
            }
        }
        drop(ring);
        for ev in ended_early {
            self.tracer.publish(TraceLine::new(ev, &[0; 16], 0, clock, &names));
        }
    }
}
