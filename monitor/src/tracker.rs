//! Turns lifecycle events into counters and histograms. Plain Rust: no BPF in here, so every
//! sequence the kernel can produce is unit-tested from hand-written events.
use std::collections::{HashMap, HashSet};

use monitor_common::{Event, flags, kind, reason, tcp};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

/// How long a cancelled timewait timer may wait for the re-arm that would follow it at once.
/// The kernel re-arms within microseconds on the same CPU; past this the socket ended early.
pub const CANCEL_GRACE_NS: u64 = 100_000_000;

/// Bucket bounds of `twmon_state_duration_seconds`: 1 ms to 10 min, dense around 2MSL
/// (60 s on Linux; the timer wheel fires up to a few seconds late).
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 59.0, 61.0,
    63.0, 66.0, 90.0, 120.0, 300.0, 600.0,
];

/// RFC 793 state names as label values (lowercase, underscores).
pub fn state_name(state: u8) -> &'static str {
    match state {
        tcp::ESTABLISHED => "established",
        tcp::SYN_SENT => "syn_sent",
        tcp::SYN_RECV => "syn_recv",
        tcp::FIN_WAIT1 => "fin_wait1",
        tcp::FIN_WAIT2 => "fin_wait2",
        tcp::TIME_WAIT => "time_wait",
        tcp::CLOSE => "close",
        tcp::CLOSE_WAIT => "close_wait",
        tcp::LAST_ACK => "last_ack",
        tcp::LISTEN => "listen",
        tcp::CLOSING => "closing",
        tcp::NEW_SYN_RECV => "new_syn_recv",
        _ => "unknown",
    }
}

pub fn reason_name(r: u8) -> &'static str {
    match r {
        reason::EXPIRED => "expired",
        reason::REUSE => "reuse",
        reason::KILLED => "killed",
        reason::FIN_TIMEOUT => "fin_timeout",
        _ => "unknown",
    }
}

/// A connection's identity: namespace and both endpoints. IPv4 addresses sit in the first 4
/// bytes, as in [`Event`].
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tuple {
    pub netns: u32,
    pub local: [u8; 16],
    pub lport: u16,
    pub remote: [u8; 16],
    pub rport: u16,
}

impl Tuple {
    pub fn of(ev: &Event) -> Self {
        Self { netns: ev.netns, local: ev.saddr, lport: ev.sport, remote: ev.daddr, rport: ev.dport }
    }

    pub fn new(netns: u32, local: (std::net::IpAddr, u16), remote: (std::net::IpAddr, u16)) -> Self {
        Self { netns, local: octets(local.0), lport: local.1, remote: octets(remote.0), rport: remote.1 }
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        (addr(&self.local), self.lport).into()
    }

    pub fn remote_addr(&self) -> std::net::SocketAddr {
        (addr(&self.remote), self.rport).into()
    }
}

fn octets(a: std::net::IpAddr) -> [u8; 16] {
    match a {
        std::net::IpAddr::V4(v4) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v4.octets());
            o
        }
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

fn addr(o: &[u8; 16]) -> std::net::IpAddr {
    if o[4..].iter().all(|b| *b == 0) {
        std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3]).into()
    } else {
        std::net::Ipv6Addr::from(*o).into()
    }
}

/// Most CLOSE_WAIT sockets whose age the tracker keeps; past it they are counted, not aged.
pub const MAX_CLOSE_WAIT_AGES: usize = 262_144;

pub struct Tracker {
    transitions: IntCounterVec,
    durations: HistogramVec,
    /// Children of the two above by state number, made on first use: no label lookup per event.
    transition_of: Vec<Option<IntCounter>>,
    duration_of: Vec<Option<prometheus::Histogram>>,
    timewait_ends: IntCounterVec,
    rearms: IntCounter,
    /// Timewait sockets whose timer was cancelled before it was due, by address.
    pending: HashMap<u64, Event>,
    events: IntCounter,
    /// Sockets that were in a teardown state before the agent started, which the kernel
    /// programs do not follow: their state, until an event or a reconcile says they left it.
    seed: HashMap<Tuple, u8>,
    /// While seeding: connections events have spoken of since the programs were attached.
    window: Option<HashSet<Tuple>>,
    /// When each CLOSE_WAIT socket entered the state (CLOCK_MONOTONIC ns).
    close_wait_since: HashMap<Tuple, u64>,
    close_wait_unaged: u64,
}

impl Tracker {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let transitions = IntCounterVec::new(
            Opts::new(
                "twmon_state_transitions_total",
                "TCP state transitions on the close path, as RFC 793 names them.",
            ),
            &["from", "to"],
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "twmon_state_duration_seconds",
                "Time a socket spent in a state, observed when it left it.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["state"],
        )?;
        let timewait_ends = IntCounterVec::new(
            Opts::new(
                "twmon_timewait_ends_total",
                "Timewait sockets that ended, by why: expired (2MSL ran out), fin_timeout (an \
                 orphaned FIN_WAIT2 got no FIN within tcp_fin_timeout), reuse (a connect() took \
                 the 4-tuple), killed (RST, a reopening SYN, or namespace teardown).",
            ),
            &["reason"],
        )?;
        let rearms = IntCounter::new(
            "twmon_timewait_rearms_total",
            "Times a TIME_WAIT socket's 2MSL timer restarted because a segment reached it, \
             normally a FIN retransmitted after the final ACK was lost.",
        )?;
        let events = IntCounter::new("twmon_events_total", "Events received from the kernel programs.")?;
        registry.register(Box::new(transitions.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        registry.register(Box::new(timewait_ends.clone()))?;
        registry.register(Box::new(rearms.clone()))?;
        registry.register(Box::new(events.clone()))?;
        for r in [reason::EXPIRED, reason::REUSE, reason::KILLED, reason::FIN_TIMEOUT] {
            timewait_ends.with_label_values(&[reason_name(r)]);
        }
        let n = tcp::MAX_STATES as usize;
        Ok(Self {
            transitions,
            durations,
            transition_of: vec![None; n * n],
            duration_of: vec![None; n],
            timewait_ends,
            rearms,
            pending: HashMap::new(),
            events,
            seed: HashMap::new(),
            window: None,
            close_wait_since: HashMap::new(),
            close_wait_unaged: 0,
        })
    }

    pub fn apply(&mut self, ev: &Event) {
        self.events.inc();
        if !self.seed.is_empty() || self.window.is_some() || ev.to == tcp::CLOSE_WAIT || ev.from == tcp::CLOSE_WAIT {
            self.connection_event(ev);
        }
        if ev.kind == kind::UNTRACKED_END {
            return;
        }
        if ev.kind == kind::TW_CANCEL {
            self.pending.insert(ev.obj, *ev);
            return;
        }
        // Anything else about a cancelled timewait socket means the kernel kept it.
        if ev.flags & flags::TIMEWAIT != 0 {
            self.pending.remove(&ev.obj);
        }
        match ev.kind {
            kind::TRANSITION => {
                self.transition(ev.from, ev.to, ev);
                if ev.reason != reason::NONE {
                    self.timewait_ends.with_label_values(&[reason_name(ev.reason)]).inc();
                }
            }
            kind::REARM => self.rearms.inc(),
            _ => {}
        }
    }

    fn transition(&mut self, from: u8, to: u8, ev: &Event) {
        let n = tcp::MAX_STATES as usize;
        let (f, t) = ((from as usize).min(n - 1), (to as usize).min(n - 1));
        let vec = &self.transitions;
        self.transition_of[f * n + t]
            .get_or_insert_with(|| vec.with_label_values(&[state_name(from), state_name(to)]))
            .inc();
        if ev.flags & flags::DURATION != 0 {
            let vec = &self.durations;
            self.duration_of[f]
                .get_or_insert_with(|| vec.with_label_values(&[state_name(from)]))
                .observe(ev.duration_ns as f64 / 1e9);
        }
    }

    /// Settles cancelled timewait timers that no re-arm followed: those sockets ended early.
    /// `now_ns` is CLOCK_MONOTONIC, the clock of the events.
    pub fn settle(&mut self, now_ns: u64) {
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, ev)| ev.ts_ns.saturating_add(CANCEL_GRACE_NS) <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            if let Some(ev) = self.pending.remove(&k) {
                self.transition(ev.from, tcp::CLOSE, &ev);
                self.timewait_ends.with_label_values(&[reason_name(ev.reason)]).inc();
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// What an event says about a connection: it is no longer a seeded socket (the kernel
    /// follows it from here, or it is gone), and when it entered or left CLOSE_WAIT.
    fn connection_event(&mut self, ev: &Event) {
        let t = Tuple::of(ev);
        if let Some(w) = self.window.as_mut() {
            w.insert(t);
        }
        self.seed.remove(&t);
        if ev.kind != kind::TRANSITION {
            return;
        }
        if ev.to == tcp::CLOSE_WAIT {
            if self.close_wait_since.len() < MAX_CLOSE_WAIT_AGES {
                self.close_wait_since.insert(t, ev.ts_ns);
            } else {
                self.close_wait_unaged += 1;
            }
        } else if ev.from == tcp::CLOSE_WAIT {
            self.close_wait_since.remove(&t);
        }
    }

    /// Starts remembering which connections events speak of, so that seeding can leave out
    /// the sockets the kernel programs already follow.
    pub fn begin_seed(&mut self) {
        self.window = Some(HashSet::new());
    }

    /// Takes the kernel's view of sockets in teardown states at start-up (`at` is when it was
    /// read). Sockets that events have spoken of since [`Self::begin_seed`] are left out: the
    /// kernel programs follow them. Returns how many were seeded.
    pub fn seed(&mut self, sockets: impl IntoIterator<Item = (Tuple, u8)>, at: u64) -> usize {
        let seen = self.window.take().unwrap_or_default();
        let before = self.seed.len();
        for (t, state) in sockets {
            if seen.contains(&t) || !tcp::is_teardown(state) {
                continue;
            }
            self.seed.insert(t, state);
            if state == tcp::CLOSE_WAIT {
                // Its age is at least this; when it entered CLOSE_WAIT is not known.
                self.close_wait_since.entry(t).or_insert(at);
            }
        }
        self.seed.len() - before
    }

    /// Brings seeded sockets in line with the kernel's current view of them: gone ones are
    /// dropped, changed ones (an orphaned FIN_WAIT2 that got its FIN) take their new state.
    pub fn reconcile_seed(&mut self, now: &HashMap<Tuple, u8>) {
        self.seed.retain(|t, state| match now.get(t) {
            Some(s) if tcp::is_teardown(*s) => {
                *state = *s;
                true
            }
            _ => false,
        });
        self.close_wait_since.retain(|t, _| now.get(t) == Some(&tcp::CLOSE_WAIT));
    }

    /// Seeded sockets per state.
    pub fn seeded(&self) -> [i64; tcp::MAX_STATES as usize] {
        let mut out = [0i64; tcp::MAX_STATES as usize];
        for s in self.seed.values() {
            out[*s as usize] += 1;
        }
        out
    }

    /// Whether seeded timewait sockets remain (the kernel programs then report their end).
    pub fn seeded_timewait(&self) -> bool {
        self.seed.values().any(|s| *s == tcp::TIME_WAIT || *s == tcp::FIN_WAIT2)
    }

    /// CLOSE_WAIT sockets that entered the state at or before `before` (ns), oldest first.
    pub fn close_wait_older_than(&self, before: u64) -> Vec<(Tuple, u64)> {
        let mut v: Vec<(Tuple, u64)> =
            self.close_wait_since.iter().filter(|(_, t)| **t <= before).map(|(k, t)| (*k, *t)).collect();
        v.sort_by_key(|(_, t)| *t);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: u8, from: u8, to: u8, obj: u64, ts_ms: u64) -> Event {
        Event { ts_ns: ts_ms * 1_000_000, kind, from, to, obj, ..Event::default() }
    }
    fn timed(mut e: Event, ms: u64) -> Event {
        e.duration_ns = ms * 1_000_000;
        e.flags |= flags::DURATION;
        e
    }
    fn tw(mut e: Event) -> Event {
        e.flags |= flags::TIMEWAIT;
        e
    }

    struct T {
        reg: Registry,
        t: Tracker,
    }
    impl T {
        fn new() -> Self {
            let reg = Registry::new();
            let t = Tracker::new(&reg).unwrap();
            Self { reg, t }
        }
        fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
            for mf in self.reg.gather() {
                if mf.name() != name {
                    continue;
                }
                for m in mf.get_metric() {
                    let ok = labels.iter().all(|(k, v)| {
                        m.get_label().iter().any(|l| l.name() == *k && l.value() == *v)
                    });
                    if ok {
                        return m.get_counter().get_value();
                    }
                }
            }
            0.0
        }
        fn hist(&self, state: &str) -> (u64, f64) {
            for mf in self.reg.gather() {
                if mf.name() != "twmon_state_duration_seconds" {
                    continue;
                }
                for m in mf.get_metric() {
                    if m.get_label().iter().any(|l| l.value() == state) {
                        let h = m.get_histogram();
                        return (h.get_sample_count(), h.get_sample_sum());
                    }
                }
            }
            (0, 0.0)
        }
        fn trans(&self, from: &str, to: &str) -> f64 {
            self.counter("twmon_state_transitions_total", &[("from", from), ("to", to)])
        }
        fn ends(&self, reason: &str) -> f64 {
            self.counter("twmon_timewait_ends_total", &[("reason", reason)])
        }
    }

    /// The active closer: FIN_WAIT1 -> FIN_WAIT2 -> (hand-off) TIME_WAIT -> 2MSL expiry.
    #[test]
    fn active_close_to_expiry() {
        let mut t = T::new();
        t.t.apply(&ev(kind::TRANSITION, tcp::ESTABLISHED, tcp::FIN_WAIT1, 1, 0));
        t.t.apply(&timed(ev(kind::TRANSITION, tcp::FIN_WAIT1, tcp::FIN_WAIT2, 1, 1), 1));
        t.t.apply(&timed(ev(kind::TRANSITION, tcp::FIN_WAIT2, tcp::TIME_WAIT, 1, 3), 2));
        let mut end = tw(timed(ev(kind::TRANSITION, tcp::TIME_WAIT, tcp::CLOSE, 9, 60_003), 60_000));
        end.reason = reason::EXPIRED;
        t.t.apply(&end);
        assert_eq!(t.trans("established", "fin_wait1"), 1.0);
        assert_eq!(t.trans("fin_wait1", "fin_wait2"), 1.0);
        assert_eq!(t.trans("fin_wait2", "time_wait"), 1.0);
        assert_eq!(t.trans("time_wait", "close"), 1.0);
        assert_eq!(t.ends("expired"), 1.0);
        assert_eq!(t.hist("time_wait"), (1, 60.0));
        assert_eq!(t.hist("fin_wait2"), (1, 0.002));
        // Nothing was observed for ESTABLISHED: its entry time is not kept.
        assert_eq!(t.hist("established").0, 0);
    }

    /// A cancel followed by a re-arm of the same timer is a restart of 2MSL, not an end.
    #[test]
    fn cancel_then_rearm_is_not_an_end() {
        let mut t = T::new();
        let mut c = tw(timed(ev(kind::TW_CANCEL, tcp::TIME_WAIT, tcp::CLOSE, 7, 1000), 500));
        c.reason = reason::KILLED;
        t.t.apply(&c);
        assert_eq!(t.t.pending(), 1);
        t.t.apply(&tw(ev(kind::REARM, tcp::TIME_WAIT, tcp::TIME_WAIT, 7, 1000)));
        t.t.settle(10_000_000_000);
        assert_eq!(t.t.pending(), 0);
        assert_eq!(t.counter("twmon_timewait_rearms_total", &[]), 1.0);
        assert_eq!(t.trans("time_wait", "close"), 0.0);
        assert_eq!(t.ends("killed"), 0.0);
    }

    /// A cancel with nothing after it ends the socket early, with the kernel's reason, but only
    /// once the grace period has passed.
    #[test]
    fn cancel_alone_is_an_early_end_after_grace() {
        let mut t = T::new();
        let mut c = tw(timed(ev(kind::TW_CANCEL, tcp::TIME_WAIT, tcp::CLOSE, 7, 1000), 2500));
        c.reason = reason::REUSE;
        t.t.apply(&c);
        t.t.settle(1000 * 1_000_000 + CANCEL_GRACE_NS - 1);
        assert_eq!(t.ends("reuse"), 0.0, "settled before the grace period");
        t.t.settle(1000 * 1_000_000 + CANCEL_GRACE_NS);
        assert_eq!(t.ends("reuse"), 1.0);
        assert_eq!(t.trans("time_wait", "close"), 1.0);
        assert_eq!(t.hist("time_wait"), (1, 2.5));
        assert_eq!(t.t.pending(), 0);
    }

    /// An orphaned FIN_WAIT2 timewait socket that got its FIN while its timer was being
    /// re-armed: the FIN_WAIT2 -> TIME_WAIT transition settles the cancel.
    #[test]
    fn orphan_fin_wait2_becomes_time_wait() {
        let mut t = T::new();
        let mut c = tw(ev(kind::TW_CANCEL, tcp::FIN_WAIT2, tcp::CLOSE, 5, 10));
        c.reason = reason::KILLED;
        t.t.apply(&c);
        t.t.apply(&tw(timed(ev(kind::TRANSITION, tcp::FIN_WAIT2, tcp::TIME_WAIT, 5, 10), 7)));
        t.t.settle(u64::MAX);
        assert_eq!(t.trans("fin_wait2", "time_wait"), 1.0);
        assert_eq!(t.trans("fin_wait2", "close"), 0.0);
        assert_eq!(t.hist("fin_wait2"), (1, 0.007));
    }

    /// The passive closer and an abort: no timewait involvement, durations only when known.
    #[test]
    fn passive_close_and_abort() {
        let mut t = T::new();
        t.t.apply(&ev(kind::TRANSITION, tcp::ESTABLISHED, tcp::CLOSE_WAIT, 2, 0));
        t.t.apply(&timed(ev(kind::TRANSITION, tcp::CLOSE_WAIT, tcp::LAST_ACK, 2, 30), 30));
        t.t.apply(&timed(ev(kind::TRANSITION, tcp::LAST_ACK, tcp::CLOSE, 2, 31), 1));
        t.t.apply(&ev(kind::TRANSITION, tcp::ESTABLISHED, tcp::CLOSE, 3, 40));
        assert_eq!(t.trans("close_wait", "last_ack"), 1.0);
        assert_eq!(t.trans("last_ack", "close"), 1.0);
        assert_eq!(t.trans("established", "close"), 1.0);
        assert_eq!(t.hist("close_wait"), (1, 0.03));
        assert_eq!(t.hist("last_ack"), (1, 0.001));
        assert_eq!(t.ends("expired") + t.ends("killed") + t.ends("reuse"), 0.0);
    }

    fn tuple(port: u16) -> Tuple {
        Tuple::new(7, ("127.0.0.1".parse().unwrap(), port), ("127.0.0.1".parse().unwrap(), 80))
    }

    fn conn(mut e: Event, port: u16) -> Event {
        let t = tuple(port);
        e.netns = t.netns;
        e.saddr = t.local;
        e.sport = t.lport;
        e.daddr = t.remote;
        e.dport = t.rport;
        e
    }

    /// Seeding leaves out what events already spoke of; seeded sockets leave on their first
    /// event or when the kernel no longer shows them.
    #[test]
    fn seeding_and_its_end() {
        let mut t = T::new();
        t.t.begin_seed();
        // This one moved after the programs were attached: the kernel follows it.
        t.t.apply(&conn(ev(kind::TRANSITION, tcp::CLOSE_WAIT, tcp::LAST_ACK, 1, 5), 1001));
        let n = t.t.seed(
            [
                (tuple(1001), tcp::CLOSE_WAIT),
                (tuple(1002), tcp::TIME_WAIT),
                (tuple(1003), tcp::FIN_WAIT2),
                (tuple(1004), tcp::CLOSE_WAIT),
                (tuple(1005), tcp::ESTABLISHED),
            ],
            100,
        );
        assert_eq!(n, 3);
        let s = t.t.seeded();
        assert_eq!((s[tcp::TIME_WAIT as usize], s[tcp::FIN_WAIT2 as usize], s[tcp::CLOSE_WAIT as usize]), (1, 1, 1));
        assert!(t.t.seeded_timewait());
        // The seeded TIME_WAIT socket's timer ran out.
        t.t.apply(&conn(tw(ev(kind::UNTRACKED_END, tcp::TIME_WAIT, tcp::CLOSE, 9, 60_000)), 1002));
        assert_eq!(t.t.seeded()[tcp::TIME_WAIT as usize], 0);
        assert_eq!(t.trans("time_wait", "close"), 0.0, "an untracked end is not a transition");
        // The orphaned FIN_WAIT2 got its FIN (no event: the kernel does not follow it).
        let now: HashMap<Tuple, u8> = [(tuple(1003), tcp::TIME_WAIT), (tuple(1004), tcp::CLOSE_WAIT)].into();
        t.t.reconcile_seed(&now);
        let s = t.t.seeded();
        assert_eq!((s[tcp::TIME_WAIT as usize], s[tcp::FIN_WAIT2 as usize]), (1, 0));
        // The seeded CLOSE_WAIT is aged from the seeding.
        assert_eq!(t.t.close_wait_older_than(100), vec![(tuple(1004), 100)]);
        t.t.reconcile_seed(&HashMap::new());
        assert_eq!(t.t.seeded().iter().sum::<i64>(), 0);
        assert!(!t.t.seeded_timewait());
    }

    #[test]
    fn close_wait_ages() {
        let mut t = T::new();
        t.t.apply(&conn(ev(kind::TRANSITION, tcp::ESTABLISHED, tcp::CLOSE_WAIT, 1, 10), 2001));
        t.t.apply(&conn(ev(kind::TRANSITION, tcp::ESTABLISHED, tcp::CLOSE_WAIT, 2, 20), 2002));
        t.t.apply(&conn(ev(kind::TRANSITION, tcp::ESTABLISHED, tcp::CLOSE_WAIT, 3, 30), 2003));
        t.t.apply(&conn(ev(kind::TRANSITION, tcp::CLOSE_WAIT, tcp::LAST_ACK, 2, 40), 2002));
        let old = t.t.close_wait_older_than(25_000_000);
        assert_eq!(old, vec![(tuple(2001), 10_000_000)]);
        assert_eq!(t.t.close_wait_older_than(u64::MAX).len(), 2);
    }

    #[test]
    fn tuple_addresses_round_trip() {
        let t = Tuple::new(1, ("10.1.2.3".parse().unwrap(), 5), ("::1".parse().unwrap(), 6));
        assert_eq!(t.local_addr().to_string(), "10.1.2.3:5");
        assert_eq!(t.remote_addr().to_string(), "[::1]:6");
    }

    #[test]
    fn buckets_bracket_two_msl() {
        assert!(DURATION_BUCKETS.contains(&59.0) && DURATION_BUCKETS.contains(&61.0));
        assert!(DURATION_BUCKETS[0] <= 0.001 && *DURATION_BUCKETS.last().unwrap() >= 300.0);
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
