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
    id: u64,
    pub lines: broadcast::Receiver<Arc<TraceLine>>,
}

impl Drop for TraceClient {
    fn drop(&mut self) {
        self.agent.tracer.leave(self.id);
        self.agent.retrace();
    }
}

impl Agent {
    /// A new trace client that wants only connections with `port` at either end, if given; `None`
    /// when [`trace::MAX_CLIENTS`] stream already.
    pub fn trace(self: &Arc<Self>, port: Option<u16>) -> Option<TraceClient> {
        let (lines, id) = self.tracer.join(port)?;
        self.retrace();
        Some(TraceClient { agent: self.clone(), id, lines })
    }

    /// Has the programs write trace records while anyone traces, and not otherwise: only those
    /// of the port every client filters on, when they all do. Records left from an earlier
    /// trace are dropped first: they are not this one's.
    fn retrace(&self) {
        let mut tracing = lock(&self.trace_switch);
        let (on, port) = (self.tracer.active(), self.tracer.common_port());
        if on != *tracing {
            if on {
                let mut ring = lock(&self.trace_ring);
                while ring.next().is_some() {}
            }
            lock(&self.tracker).set_tracing(on);
            *tracing = on;
        }
        lock(&self.kernel).set_trace(on, port);
        self.metrics.trace_clients.set(self.tracer.clients() as i64);
        tracing::debug!(clients = self.tracer.clients(), on, ?port, "trace switched");
    }

    /// The trace records written since the last drain, then the early ends just decided.
    pub(super) fn drain_trace(&self, ended_early: &[Event]) {
        let names: HashMap<u32, String> =
            lock(&self.namespaces_read).iter().map(|n| (n.inode, n.name.clone())).collect();
        let clock = sys::unix_minus_monotonic();
        let mut ring = lock(&self.trace_ring);
        while let Some(item) = ring.next() {
            self.metrics.trace_records.inc();
            match trace::decode(&item) {
                Some(r) => {
                    self.tracer.publish(TraceLine::new(&r.event, &r.comm, r.pid, clock, &names))
                }
                None => self.metrics.events_invalid.inc(),
            }
        }
        drop(ring);
        for ev in ended_early {
            self.tracer.publish(TraceLine::new(ev, &[0; 16], 0, clock, &names));
        }
    }
}
