//! What the agent decides from the kernel programs' records. The programs count transitions,
//! durations and the timewait ends they can tell on their own; the agent decides what they
//! cannot: whether a cancelled timewait timer was an early end (no re-arm followed), how long
//! CLOSE_WAIT sockets have been there (leaks), and which sockets seeded from sock_diag are gone.
//! Plain Rust: no BPF in here, so every sequence the kernel can produce is unit-tested from
//! hand-written events.
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use monitor_common::{Event, Lifecycle, flags, found, kind, reason, tcp};
use prometheus::{IntCounter, Registry};

/// How long a cancelled timewait timer may wait for the re-arm that would follow it at once.
/// The kernel re-arms within microseconds on the same CPU; past this the socket ended early.
pub const CANCEL_GRACE_NS: u64 = 100_000_000;

/// TCP_TIMEWAIT_LEN: 2MSL on Linux.
pub const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;

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
        Self {
            netns: ev.netns,
            local: ev.saddr,
            lport: ev.sport,
            remote: ev.daddr,
            rport: ev.dport,
        }
    }

    pub fn new(
        netns: u32,
        local: (std::net::IpAddr, u16),
        remote: (std::net::IpAddr, u16),
    ) -> Self {
        Self {
            netns,
            local: octets(local.0),
            lport: local.1,
            remote: octets(remote.0),
            rport: remote.1,
        }
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

/// What the agent counts itself, added to the kernel programs' counts at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Decided {
    /// Timewait sockets that ended early: `time_wait -> close` (or `fin_wait2 -> close`).
    pub lifecycle: Lifecycle,
    /// Those ends by reason ([`reason`]).
    pub ends: [u64; reason::COUNT as usize],
}

/// A socket seeded from sock_diag.
#[derive(Clone, Copy, Debug)]
struct Seeded {
    state: u8,
    /// For a timewait socket: when its timer runs out (CLOCK_MONOTONIC ns), from the time
    /// sock_diag said was left; `None` once its state changed (the timer was set anew).
    due: Option<u64>,
}

pub struct Tracker {
    decided: Decided,
    /// Timewait sockets whose timer was cancelled before it was due, by address.
    pending: HashMap<u64, Event>,
    events: IntCounter,
    /// Sockets that were in a teardown state before the agent started, which the kernel
    /// programs do not follow: their state, until an event or a reconcile says they left it.
    seed: HashMap<Tuple, Seeded>,
    /// While seeding: connections events have spoken of since the programs were attached.
    window: Option<HashSet<Tuple>>,
    /// When seeding happened: seeded CLOSE_WAIT sockets are at least this old.
    seeded_at: u64,
    /// CLOSE_WAIT sockets past the leak threshold, from the last leak scan, with when they
    /// entered the state (CLOCK_MONOTONIC ns).
    close_wait_since: HashMap<Tuple, u64>,
    /// While someone traces: the early ends decided since the last drain, for the trace.
    ended_early: Option<Vec<Event>>,
}

impl Tracker {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let events =
            IntCounter::new("twmon_events_total", "Records received from the kernel programs.")?;
        registry.register(Box::new(events.clone()))?;
        Ok(Self {
            decided: Decided::default(),
            pending: HashMap::new(),
            events,
            seed: HashMap::new(),
            window: None,
            seeded_at: 0,
            close_wait_since: HashMap::new(),
            ended_early: None,
        })
    }

    /// Takes one record. Transitions and re-arms are counted in the kernel already; here they
    /// only settle cancels and end seeded sockets.
    pub fn apply(&mut self, ev: &Event) {
        self.events.inc();
        if ev.kind == kind::MISSED_END {
            let state = state_name(ev.from);
            let (at, age) = (found::name(ev.reason), ev.duration_ns as f64 / 1e9);
            tracing::warn!(
                "a {state} timewait socket ended unseen (found by {at}, {age:.3} s after it \
                 entered {state}); counted in twmon_timewait_end_missed_total: please report it \
                 with the kernel version"
            );
            return;
        }
        if ev.kind == kind::CLOSE_WAIT_AGE {
            if self.close_wait_since.len() < MAX_CLOSE_WAIT_AGES {
                self.close_wait_since.insert(Tuple::of(ev), ev.ts_ns);
            }
            return;
        }
        if !self.seed.is_empty() || self.window.is_some() {
            self.connection_event(ev);
        }
        match ev.kind {
            kind::TW_CANCEL => {
                // A cancel still pending at this address was an end: its re-arm would have come
                // at once, before its memory could be freed and become this socket (a SYN that
                // reopens a 4-tuple ends one timewait socket and soon makes the next there).
                if let Some(earlier) = self.pending.insert(ev.obj, *ev) {
                    self.end_early(&earlier);
                }
            }
            // Anything else about a cancelled timewait socket means the kernel kept it.
            kind::TRANSITION | kind::REARM if ev.flags & flags::TIMEWAIT != 0 => {
                self.pending.remove(&ev.obj);
            }
            _ => {}
        }
    }

    /// The agent's own counts.
    pub fn decided(&self) -> &Decided {
        &self.decided
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
                self.end_early(&ev);
            }
        }
    }

    /// Counts a cancelled timewait timer that no re-arm followed as the socket's end.
    fn end_early(&mut self, ev: &Event) {
        if let Some(ended) = self.ended_early.as_mut() {
            ended.push(*ev);
        }
        let d = (ev.flags & flags::DURATION != 0).then_some(ev.duration_ns);
        self.decided.lifecycle.count(ev.from, tcp::CLOSE, d);
        if let Some(n) = self.decided.ends.get_mut(ev.reason as usize) {
            *n += 1;
        }
    }

    /// Keeps the early ends for the trace (`on`), or stops.
    pub fn set_tracing(&mut self, on: bool) {
        self.ended_early = on.then(Vec::new);
    }

    /// The early ends decided since the last call, while tracing.
    pub fn take_ended_early(&mut self) -> Vec<Event> {
        self.ended_early.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// What an event says about a connection: it is no longer a seeded socket (the kernel
    /// follows it from here, or it is gone).
    fn connection_event(&mut self, ev: &Event) {
        let t = Tuple::of(ev);
        if let Some(w) = self.window.as_mut() {
            w.insert(t);
        }
        if let Some(seeded) = self.seed.remove(&t)
            && ev.kind == kind::UNTRACKED_END
        {
            self.seeded_timer_end(seeded, ev);
        }
    }

    /// A seeded timewait socket ended. The kernel program says whether its timer ran out (an
    /// expiry, counted here) or not (a kill, or a re-arm after which the kernel follows the
    /// socket: not counted). Time in TIME_WAIT: from the time left at seeding (its timer
    /// ends 2MSL after it entered the state), or, when the socket changed since (an orphaned
    /// FIN_WAIT2 got its FIN), from its timer as the kernel program read it.
    fn seeded_timer_end(&mut self, seeded: Seeded, ev: &Event) {
        if !matches!(
            (ev.from, ev.reason),
            (tcp::TIME_WAIT, reason::EXPIRED) | (tcp::FIN_WAIT2, reason::FIN_TIMEOUT)
        ) {
            return;
        }
        let duration = match (ev.from, seeded.due) {
            (tcp::TIME_WAIT, Some(due)) if seeded.state == tcp::TIME_WAIT && ev.ts_ns >= due => {
                Some(ev.ts_ns - due + TIMEWAIT_LEN_NS)
            }
            (tcp::TIME_WAIT, _) => (ev.flags & flags::DURATION != 0).then_some(ev.duration_ns),
            _ => None,
        };
        self.decided.lifecycle.count(ev.from, tcp::CLOSE, duration);
        self.decided.ends[ev.reason as usize] += 1;
    }

    /// Forgets the last leak scan: the records of the next one follow.
    pub fn begin_close_wait_scan(&mut self) {
        self.close_wait_since.clear();
    }

    /// Starts remembering which connections events speak of, so that seeding can leave out
    /// the sockets the kernel programs already follow.
    pub fn begin_seed(&mut self) {
        self.window = Some(HashSet::new());
    }

    /// Takes the kernel's view of sockets in teardown states at start-up, with the time left on
    /// timewait sockets' timers (`at` is when the reading started, so `at` + time left is at
    /// or before the timer's end). Sockets that events have spoken of since
    /// [`Self::begin_seed`] are left out: the kernel programs follow them. Returns how many
    /// were seeded.
    pub fn seed(
        &mut self,
        sockets: impl IntoIterator<Item = (Tuple, u8, Option<Duration>)>,
        at: u64,
    ) -> usize {
        let seen = self.window.take().unwrap_or_default();
        let before = self.seed.len();
        for (t, state, left) in sockets {
            if seen.contains(&t) || !tcp::is_teardown(state) {
                continue;
            }
            self.seed.insert(t, Seeded { state, due: left.map(|l| at + l.as_nanos() as u64) });
        }
        // A seeded CLOSE_WAIT socket's age is at least this; when it entered is not known.
        self.seeded_at = at;
        self.seed.len() - before
    }

    /// Brings seeded sockets in line with the kernel's current view of them: gone ones are
    /// dropped, changed ones (an orphaned FIN_WAIT2 that got its FIN) take their new state.
    /// Every record written before `now` was read must have been applied: a gone socket's end
    /// (an expiry the agent counts) is otherwise lost with it.
    pub fn reconcile_seed(&mut self, now: &HashMap<Tuple, u8>) {
        self.seed.retain(|t, seeded| match now.get(t) {
            Some(s) if tcp::is_teardown(*s) => {
                if *s != seeded.state {
                    // An orphaned FIN_WAIT2 that got its FIN: its timer was set anew.
                    *seeded = Seeded { state: *s, due: None };
                }
                true
            }
            _ => false,
        });
    }

    /// Seeded sockets per state.
    pub fn seeded(&self) -> [i64; tcp::MAX_STATES as usize] {
        let mut out = [0i64; tcp::MAX_STATES as usize];
        for s in self.seed.values() {
            out[s.state as usize] += 1;
        }
        out
    }

    /// Whether seeded timewait sockets remain (the kernel programs then report their end).
    pub fn seeded_timewait(&self) -> bool {
        self.seed.values().any(|s| s.state == tcp::TIME_WAIT || s.state == tcp::FIN_WAIT2)
    }

    /// CLOSE_WAIT sockets that entered the state at or before `before` (ns), oldest first:
    /// those of the last leak scan and the seeded ones.
    pub fn close_wait_older_than(&self, before: u64) -> Vec<(Tuple, u64)> {
        let seeded = self
            .seed
            .iter()
            .filter(|(_, s)| s.state == tcp::CLOSE_WAIT)
            .map(|(t, _)| (*t, self.seeded_at));
        let mut v: Vec<(Tuple, u64)> = self
            .close_wait_since
            .iter()
            .map(|(k, t)| (*k, *t))
            .chain(seeded)
            .filter(|(_, t)| *t <= before)
            .collect();
        v.sort_by_key(|(_, t)| *t);
        v
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::{DURATION_BOUNDS_NS, DURATION_SLOTS, duration_bucket};

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
    /// A timewait socket's end that the kernel program saw as due.
    fn expired(e: Event) -> Event {
        Event { reason: reason::EXPIRED, ..tw(e) }
    }

    struct T {
        t: Tracker,
    }
    impl T {
        fn new() -> Self {
            Self { t: Tracker::new(&Registry::new()).unwrap() }
        }
        fn trans(&self, from: u8, to: u8) -> u64 {
            self.t.decided().lifecycle.transitions
                [from as usize * monitor_common::STATES + to as usize]
        }
        fn ends(&self, r: u8) -> u64 {
            self.t.decided().ends[r as usize]
        }
        /// Observations and their sum (s) of the time spent in `state`.
        fn hist(&self, state: u8) -> (u64, f64) {
            let slots = &self.t.decided().lifecycle.durations;
            let base = state as usize * DURATION_SLOTS;
            let count = slots[base..base + DURATION_SLOTS - 1].iter().sum();
            (count, slots[base + DURATION_SLOTS - 1] as f64 / 1e9)
        }
        fn nothing_decided(&self) -> bool {
            let d = self.t.decided();
            d.lifecycle
                .transitions
                .iter()
                .chain(d.lifecycle.durations.iter())
                .chain(d.ends.iter())
                .all(|n| *n == 0)
        }
    }

    /// Transitions, expiries and re-arms are counted by the kernel programs: records of them
    /// (sent while the agent seeds, or for CLOSE_WAIT) must not be counted a second time.
    #[test]
    fn kernel_counted_records_are_not_counted_again() {
        let mut t = T::new();
        t.t.apply(&ev(kind::TRANSITION, tcp::ESTABLISHED, tcp::FIN_WAIT1, 1, 0));
        t.t.apply(&timed(ev(kind::TRANSITION, tcp::FIN_WAIT1, tcp::FIN_WAIT2, 1, 1), 1));
        t.t.apply(&timed(ev(kind::TRANSITION, tcp::FIN_WAIT2, tcp::TIME_WAIT, 1, 3), 2));
        let mut end =
            tw(timed(ev(kind::TRANSITION, tcp::TIME_WAIT, tcp::CLOSE, 9, 60_003), 60_000));
        end.reason = reason::EXPIRED;
        t.t.apply(&end);
        t.t.apply(&tw(ev(kind::REARM, tcp::TIME_WAIT, tcp::TIME_WAIT, 8, 10)));
        t.t.settle(u64::MAX);
        assert!(t.nothing_decided());
        assert_eq!(t.t.pending(), 0);
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
        assert!(t.nothing_decided());
    }

    /// A cancel with nothing after it ends the socket early, with the kernel's reason, but only
    /// once the grace period has passed.
    #[test]
    fn cancel_alone_is_an_early_end_after_grace() {
        let mut t = T::new();
        let mut c = tw(timed(ev(kind::TW_CANCEL, tcp::TIME_WAIT, tcp::CLOSE, 7, 1000), 2500));
        // An RST or a namespace's teardown: the kernel programs leave those to the agent (they
        // decide reuse themselves).
        c.reason = reason::KILLED;
        t.t.apply(&c);
        // Another socket's record does not settle it.
        t.t.apply(&tw(ev(kind::REARM, tcp::TIME_WAIT, tcp::TIME_WAIT, 8, 1000)));
        t.t.settle(1000 * 1_000_000 + CANCEL_GRACE_NS - 1);
        assert_eq!(t.ends(reason::KILLED), 0, "settled before the grace period");
        t.t.settle(1000 * 1_000_000 + CANCEL_GRACE_NS);
        assert_eq!(t.ends(reason::KILLED), 1);
        assert_eq!(t.trans(tcp::TIME_WAIT, tcp::CLOSE), 1);
        assert_eq!(t.hist(tcp::TIME_WAIT), (1, 2.5));
        // In the bucket the kernel programs would have used: le=2.5 s, its bound.
        let bucket = duration_bucket(2_500_000_000);
        assert_eq!(DURATION_BOUNDS_NS[bucket], 2_500_000_000);
        assert_eq!(
            t.t.decided().lifecycle.durations[tcp::TIME_WAIT as usize * DURATION_SLOTS + bucket],
            1
        );
        assert_eq!(t.t.pending(), 0);
    }

    /// Two cancels at one address within the grace period: two sockets (the memory of the
    /// first ended one is the second's), two ends, not one.
    #[test]
    fn second_cancel_at_an_address_ends_the_first() {
        let mut t = T::new();
        let mut c = tw(timed(ev(kind::TW_CANCEL, tcp::TIME_WAIT, tcp::CLOSE, 7, 1000), 30));
        c.reason = reason::KILLED;
        t.t.apply(&c);
        t.t.apply(&Event { ts_ns: 1_010_000_000, ..c });
        assert_eq!((t.ends(reason::KILLED), t.t.pending()), (1, 1), "the first ended at once");
        t.t.apply(&tw(ev(kind::REARM, tcp::TIME_WAIT, tcp::TIME_WAIT, 7, 1010)));
        t.t.settle(u64::MAX);
        assert_eq!(t.ends(reason::KILLED), 1, "the second was re-armed");
        assert_eq!(t.trans(tcp::TIME_WAIT, tcp::CLOSE), 1);
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
        assert!(t.nothing_decided());
    }

    /// A cancelled orphan that nothing follows ended early in FIN_WAIT2, without a duration
    /// when the kernel programs did not know when it entered.
    #[test]
    fn early_end_without_duration() {
        let mut t = T::new();
        let mut c = tw(ev(kind::TW_CANCEL, tcp::FIN_WAIT2, tcp::CLOSE, 5, 10));
        c.reason = reason::KILLED;
        t.t.apply(&c);
        t.t.settle(u64::MAX);
        assert_eq!(t.trans(tcp::FIN_WAIT2, tcp::CLOSE), 1);
        assert_eq!(t.ends(reason::KILLED), 1);
        assert_eq!(t.hist(tcp::FIN_WAIT2), (0, 0.0));
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
        let left = |s| Some(Duration::from_secs(s));
        let n = t.t.seed(
            [
                (tuple(1001), tcp::CLOSE_WAIT, None),
                (tuple(1002), tcp::TIME_WAIT, left(20)),
                (tuple(1003), tcp::FIN_WAIT2, left(40)),
                (tuple(1004), tcp::CLOSE_WAIT, None),
                (tuple(1005), tcp::ESTABLISHED, None),
            ],
            100,
        );
        assert_eq!(n, 3);
        let s = t.t.seeded();
        assert_eq!(
            (s[tcp::TIME_WAIT as usize], s[tcp::FIN_WAIT2 as usize], s[tcp::CLOSE_WAIT as usize]),
            (1, 1, 1)
        );
        assert!(t.t.seeded_timewait());
        // The seeded TIME_WAIT socket's timer ran out 20 s after seeding (and 450 ms late): it
        // expired after 2MSL in TIME_WAIT.
        t.t.apply(&conn(
            expired(ev(kind::UNTRACKED_END, tcp::TIME_WAIT, tcp::CLOSE, 9, 20_450)),
            1002,
        ));
        assert_eq!(t.t.seeded()[tcp::TIME_WAIT as usize], 0);
        assert_eq!((t.trans(tcp::TIME_WAIT, tcp::CLOSE), t.ends(reason::EXPIRED)), (1, 1));
        let (n, sum) = t.hist(tcp::TIME_WAIT);
        assert_eq!(n, 1);
        assert!((sum - 60.45).abs() < 1e-6, "time in TIME_WAIT: {sum}");
        // The orphaned FIN_WAIT2 got its FIN (no event: the kernel does not follow it).
        let now: HashMap<Tuple, u8> =
            [(tuple(1003), tcp::TIME_WAIT), (tuple(1004), tcp::CLOSE_WAIT)].into();
        t.t.reconcile_seed(&now);
        let s = t.t.seeded();
        assert_eq!((s[tcp::TIME_WAIT as usize], s[tcp::FIN_WAIT2 as usize]), (1, 0));
        // The seeded CLOSE_WAIT is aged from the seeding.
        assert_eq!(t.t.close_wait_older_than(100), vec![(tuple(1004), 100)]);
        // Its timer was set anew when the FIN came: the kernel program measured its time in
        // TIME_WAIT from the timer.
        t.t.apply(&conn(
            timed(expired(ev(kind::UNTRACKED_END, tcp::TIME_WAIT, tcp::CLOSE, 9, 62_000)), 60_100),
            1003,
        ));
        assert_eq!(
            (
                t.trans(tcp::TIME_WAIT, tcp::CLOSE),
                t.ends(reason::EXPIRED),
                t.ends(reason::FIN_TIMEOUT)
            ),
            (2, 2, 0)
        );
        assert_eq!(t.hist(tcp::TIME_WAIT).0, 2);
        t.t.reconcile_seed(&HashMap::new());
        assert_eq!(t.t.seeded().iter().sum::<i64>(), 0);
        assert!(!t.t.seeded_timewait());
    }

    /// A seeded timewait socket that ends before its timer runs out (a kill, or a re-arm that
    /// the kernel follows from there) is not counted; an orphaned FIN_WAIT2 at its timer's end
    /// is a fin_timeout, with no duration (when it entered FIN_WAIT2 is not known).
    #[test]
    fn seeded_timewait_ends() {
        let mut t = T::new();
        t.t.begin_seed();
        let left = |s| Some(Duration::from_secs(s));
        t.t.seed(
            [(tuple(3001), tcp::TIME_WAIT, left(30)), (tuple(3002), tcp::FIN_WAIT2, left(10))],
            0,
        );
        t.t.apply(&conn(tw(ev(kind::UNTRACKED_END, tcp::TIME_WAIT, tcp::CLOSE, 9, 29_000)), 3001));
        let mut fin_timeout = tw(ev(kind::UNTRACKED_END, tcp::FIN_WAIT2, tcp::CLOSE, 8, 10_000));
        fin_timeout.reason = reason::FIN_TIMEOUT;
        t.t.apply(&conn(fin_timeout, 3002));
        assert_eq!(t.t.seeded().iter().sum::<i64>(), 0);
        assert_eq!((t.trans(tcp::TIME_WAIT, tcp::CLOSE), t.ends(reason::EXPIRED)), (0, 0));
        assert_eq!((t.trans(tcp::FIN_WAIT2, tcp::CLOSE), t.ends(reason::FIN_TIMEOUT)), (1, 1));
        assert_eq!(t.hist(tcp::FIN_WAIT2).0, 0);
    }

    #[test]
    fn close_wait_ages() {
        let mut t = T::new();
        let age = |port, since_ms| {
            conn(ev(kind::CLOSE_WAIT_AGE, tcp::CLOSE_WAIT, tcp::CLOSE_WAIT, 1, since_ms), port)
        };
        // Transitions into and out of CLOSE_WAIT are the kernel's business, not aged here.
        t.t.apply(&conn(ev(kind::TRANSITION, tcp::ESTABLISHED, tcp::CLOSE_WAIT, 1, 5), 2000));
        assert!(t.t.close_wait_older_than(u64::MAX).is_empty());
        // A scan reports the sockets past the threshold.
        t.t.begin_close_wait_scan();
        t.t.apply(&age(2001, 10));
        t.t.apply(&age(2003, 30));
        t.t.apply(&age(2002, 20));
        assert_eq!(
            t.t.close_wait_older_than(25_000_000),
            vec![(tuple(2001), 10_000_000), (tuple(2002), 20_000_000)]
        );
        assert_eq!(t.t.close_wait_older_than(u64::MAX).len(), 3);
        // The next scan replaces it: 2002 left CLOSE_WAIT meanwhile.
        t.t.begin_close_wait_scan();
        t.t.apply(&age(2001, 10));
        t.t.apply(&age(2003, 30));
        assert_eq!(
            t.t.close_wait_older_than(u64::MAX),
            vec![(tuple(2001), 10_000_000), (tuple(2003), 30_000_000)]
        );
        assert_eq!(t.t.decided().lifecycle.transitions.iter().sum::<u64>(), 0);
    }

    #[test]
    fn tuple_addresses_round_trip() {
        let t = Tuple::new(1, ("10.1.2.3".parse().unwrap(), 5), ("::1".parse().unwrap(), 6));
        assert_eq!(t.local_addr().to_string(), "10.1.2.3:5");
        assert_eq!(t.remote_addr().to_string(), "[::1]:6");
    }

    #[test]
    fn buckets_bracket_two_msl() {
        let b = &DURATION_BOUNDS_NS;
        assert!(b.contains(&59_000_000_000) && b.contains(&61_000_000_000));
        assert!(b[0] <= 1_000_000 && *b.last().unwrap() >= 300_000_000_000);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        // A bound belongs to its own bucket (Prometheus' le), one past it to the next.
        assert_eq!(duration_bucket(0), 0);
        assert_eq!(duration_bucket(b[0]), 0);
        assert_eq!(duration_bucket(b[0] + 1), 1);
        assert_eq!(
            duration_bucket(60_000_000_000),
            b.iter().position(|x| *x == 61_000_000_000).unwrap()
        );
        assert_eq!(duration_bucket(u64::MAX), b.len());
    }
}
