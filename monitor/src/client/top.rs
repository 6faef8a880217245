//! `twmon top`: a live terminal view of connection teardown, read from a running agent's
//! `/api/v1/snapshot` every interval: sockets per state with their trend, transitions per
//! second, the processes closing first, port pressure, CLOSE_WAIT leaks, how TIME_WAIT ends, and
//! what may make a number wrong. With no agent at the default address and root privileges it
//! starts one of its own for as long as it runs.
//!
//! Over 400 lines on purpose: one function per panel, each short, all reading the same
//! snapshot pair; a module per panel would only pass that pair around.
use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph, Row, Table},
};
use serde_json::Value;

use super::http::Agent;

pub const DEFAULT_AGENT: &str = "http://127.0.0.1:9864";

#[derive(Debug, Clone)]
pub struct Options {
    pub agent: String,
    pub interval: Duration,
}

/// How the closers are ordered (`s` cycles).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Sort {
    Active,
    Passive,
    /// The TIME_WAIT sockets each holds now.
    TimeWait,
    Total,
}

impl Sort {
    fn next(self) -> Self {
        match self {
            Sort::Active => Sort::Passive,
            Sort::Passive => Sort::TimeWait,
            Sort::TimeWait => Sort::Total,
            Sort::Total => Sort::Active,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Sort::Active => "active",
            Sort::Passive => "passive",
            Sort::TimeWait => "time_wait",
            Sort::Total => "total",
        }
    }
}

/// Trend points kept per state.
const TREND: usize = 30;

struct View {
    url: String,
    interval: Duration,
    now: Option<(Instant, Value)>,
    before: Option<(Instant, Value)>,
    trend: HashMap<String, VecDeque<i64>>,
    sort: Sort,
    netns: Option<String>,
    port: Option<u16>,
    error: Option<String>,
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut own: Option<Child> = None;
    let agent = rt.block_on(Agent::locate(&opts.agent))?;
    let agent = match rt.block_on(agent.json("/api/v1/snapshot")) {
        Ok(_) => agent,
        Err(e) if opts.agent == DEFAULT_AGENT && crate::sys::is_root() => {
            eprintln!("twmon top: no agent at {DEFAULT_AGENT} ({e:#}); starting one");
            let (child, url) = start_agent()?;
            own = Some(child);
            rt.block_on(Agent::locate(&url))?
        }
        Err(e) => return Err(e.context("no agent to read (start twmon, or give --agent)")),
    };
    let result = show(&rt, &agent, opts.interval);
    if let Some(mut child) = own {
        // SAFETY: kill with our own child's pid, not yet waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    result
}

/// Starts this executable as an agent on a port the kernel picks; returns it and its URL once
/// it serves.
fn start_agent() -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["--web.listen-address", "127.0.0.1:0", "--log.level", "info"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting an agent")?;
    let stderr = child.stderr.take().context("the agent's log")?;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if let Some(addr) = line.split_whitespace().find_map(|w| w.strip_prefix("address=")) {
            // The agent's log goes nowhere from here on: it would draw over the view.
            return Ok((child, format!("http://{addr}")));
        }
    }
    let status = child.wait()?;
    anyhow::bail!("the agent exited ({status}) before it served; run `twmon` alone to see why")
}

fn show(rt: &tokio::runtime::Runtime, agent: &Agent, interval: Duration) -> anyhow::Result<()> {
    let mut view = View {
        url: agent.url.clone(),
        interval,
        now: None,
        before: None,
        trend: HashMap::new(),
        sort: Sort::Active,
        netns: None,
        port: None,
        error: None,
    };
    let mut terminal = ratatui::init();
    let mut next = Instant::now();
    let result = loop {
        if Instant::now() >= next {
            next = Instant::now() + interval;
            match rt.block_on(agent.json("/api/v1/snapshot")) {
                Ok(snap) => view.update(snap),
                Err(e) => view.error = Some(format!("{e:#}")),
            }
        }
        if let Err(e) = terminal.draw(|f| view.draw(f)) {
            break Err(e.into());
        }
        match event::poll(
            next.saturating_duration_since(Instant::now()).min(Duration::from_millis(250)),
        ) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => break Err(e.into()),
        }
        let Ok(Event::Key(key)) = event::read() else { continue };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => break Ok(()),
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => break Ok(()),
            KeyCode::Char('s') => view.sort = view.sort.next(),
            KeyCode::Char('n') => view.netns = cycle(&view.namespaces(), &view.netns),
            KeyCode::Char('p') => view.port = cycle(&view.ports(), &view.port),
            _ => {}
        }
    };
    ratatui::restore();
    result
}

/// The value after `current` in `all`, `None` (everything) after the last.
fn cycle<T: Clone + PartialEq>(all: &[T], current: &Option<T>) -> Option<T> {
    match current.as_ref().and_then(|c| all.iter().position(|x| x == c)) {
        None => all.first().cloned(),
        Some(i) => all.get(i + 1).cloned(),
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A sparkline of `points`, scaled to its own range.
fn spark(points: &VecDeque<i64>) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let (lo, hi) =
        (points.iter().min().copied().unwrap_or(0), points.iter().max().copied().unwrap_or(0));
    points
        .iter()
        .map(|p| if hi == lo { BARS[0] } else { BARS[((p - lo) * 7 / (hi - lo)) as usize] })
        .collect()
}

impl View {
    fn update(&mut self, snap: Value) {
        if let Some(sockets) = snap["sockets"].as_object() {
            for (state, n) in sockets {
                let t = self.trend.entry(state.clone()).or_default();
                t.push_back(n.as_i64().unwrap_or(0));
                if t.len() > TREND {
                    t.pop_front();
                }
            }
        }
        self.before = self.now.take();
        self.now = Some((Instant::now(), snap));
        self.error = None;
    }

    fn snap(&self) -> &Value {
        self.now.as_ref().map(|(_, v)| v).unwrap_or(&Value::Null)
    }

    /// Per second between the last two snapshots, of the number `at` finds in each.
    /// A counter's: an agent restarted meanwhile reads as 0, not as a negative rate.
    fn rate(&self, at: impl Fn(&Value) -> u64) -> f64 {
        self.change(|v| at(v) as i64).max(0.0)
    }

    /// Change per second between the last two snapshots, either way.
    fn change(&self, at: impl Fn(&Value) -> i64) -> f64 {
        match (&self.now, &self.before) {
            (Some((t1, a)), Some((t0, b))) => {
                (at(a) - at(b)) as f64 / t1.duration_since(*t0).as_secs_f64().max(1e-3)
            }
            _ => 0.0,
        }
    }

    fn namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self.snap()["closers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(self.snap()["reconcile"]["namespaces"].as_array().into_iter().flatten())
            .map(|r| s(&r["netns"]))
            .collect();
        all.sort();
        all.dedup();
        all
    }

    fn ports(&self) -> Vec<u16> {
        let mut all: Vec<u16> = self.snap()["reconcile"]["pressure"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["destination"].as_str()?.rsplit_once(':')?.1.parse().ok())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    fn in_netns(&self, row: &Value) -> bool {
        self.netns.as_ref().is_none_or(|n| row["netns"].as_str() == Some(n))
    }

    fn draw(&self, f: &mut Frame) {
        let [head, top, middle, bottom] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Percentage(34),
            Constraint::Percentage(33),
            Constraint::Percentage(33),
        ])
        .areas(f.area());
        let status = match &self.error {
            Some(e) => format!("  error: {e}"),
            None => String::new(),
        };
        let header = format!(
            "twmon top  {}  every {:?}  netns: {}  port: {}  sort: {}  \
             [q quit  s sort  n namespace  p port]{status}",
            self.url,
            self.interval,
            self.netns.as_deref().unwrap_or("all"),
            self.port.map_or("all".to_string(), |p| p.to_string()),
            self.sort.name(),
        );
        f.render_widget(
            Paragraph::new(header).style(Style::new().add_modifier(Modifier::REVERSED)),
            head,
        );
        let halves = |r: Rect| {
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(r)
        };
        let [a, b]: [Rect; 2] = halves(top);
        let [c, d]: [Rect; 2] = halves(middle);
        let [e, g]: [Rect; 2] = halves(bottom);
        self.sockets(f, a);
        self.transitions(f, b);
        self.closers(f, c);
        self.pressure(f, d);
        self.leaks(f, e);
        self.ends(f, g);
    }

    fn table(
        f: &mut Frame,
        area: Rect,
        title: &str,
        header: &[&str],
        widths: &[u16],
        rows: Vec<Vec<String>>,
    ) {
        let rows: Vec<Row> = rows.into_iter().map(Row::new).collect();
        // The last column takes what is left, and gives way first when the terminal is narrow.
        let last = widths.len().saturating_sub(1);
        let widths: Vec<Constraint> = widths
            .iter()
            .enumerate()
            .map(|(i, w)| if i == last { Constraint::Fill(1) } else { Constraint::Length(*w) })
            .collect();
        let table = Table::new(rows, widths)
            .header(Row::new(header.to_vec()).style(Style::new().add_modifier(Modifier::BOLD)))
            .block(Block::default().borders(Borders::ALL).title(title.to_string()));
        f.render_widget(table, area);
    }

    fn sockets(&self, f: &mut Frame, area: Rect) {
        let snap = self.snap();
        let states = ["fin_wait1", "fin_wait2", "close_wait", "closing", "last_ack", "time_wait"];
        let rows = match &self.netns {
            None => states
                .iter()
                .map(|st| {
                    let now = snap["sockets"][st].as_i64().unwrap_or(0);
                    let change = self.change(|v| v["sockets"][st].as_i64().unwrap_or(0));
                    let trend = self.trend.get(*st).map(spark).unwrap_or_default();
                    vec![st.to_string(), now.to_string(), format!("{change:.1}"), trend]
                })
                .collect(),
            Some(ns) => {
                let of = |st: &str| {
                    snap["reconcile"]["namespaces"].as_array().into_iter().flatten().find(|r| {
                        r["netns"].as_str() == Some(ns.as_str()) && r["state"].as_str() == Some(st)
                    })
                };
                states
                    .iter()
                    .map(|st| {
                        let n = of(st).map_or(0, |r| u(&r["sockets"]));
                        vec![
                            st.to_string(),
                            n.to_string(),
                            "-".into(),
                            "at the last reconcile".into(),
                        ]
                    })
                    .collect()
            }
        };
        Self::table(
            f,
            area,
            "Sockets",
            &["state", "now", "change/s", "trend"],
            &[11, 8, 9, TREND as u16],
            rows,
        );
    }

    fn transitions(&self, f: &mut Frame, area: Rect) {
        let snap = self.snap();
        let mut rows: Vec<(String, f64, u64)> = snap["counts"]["transitions"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), self.rate(|s| u(&s["counts"]["transitions"][k])), u(v)))
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)));
        let rows =
            rows.into_iter().map(|(k, r, t)| vec![k, format!("{r:.1}"), t.to_string()]).collect();
        Self::table(f, area, "Transitions", &["from -> to", "/s", "total"], &[28, 9, 12], rows);
    }

    fn closers(&self, f: &mut Frame, area: Rect) {
        let key = |r: &Value| (s(&r["netns"]), s(&r["comm"]));
        let find = |snap: &Value, k: &(String, String), field: &str| {
            snap["closers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| key(r) == *k)
                .map_or(0, |r| u(&r[field]))
        };
        struct Row {
            netns: String,
            comm: String,
            active: f64,
            passive: f64,
            time_wait: u64,
            total: u64,
        }
        let mut rows: Vec<Row> = self.snap()["closers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| self.in_netns(r))
            .map(|r| {
                let k = key(r);
                Row {
                    active: self.rate(|s| find(s, &k, "active")),
                    passive: self.rate(|s| find(s, &k, "passive")),
                    time_wait: u(&r["timewait"]),
                    total: u(&r["active"]) + u(&r["passive"]),
                    netns: k.0,
                    comm: k.1,
                }
            })
            .collect();
        let by = |r: &Row| match self.sort {
            Sort::Active => r.active,
            Sort::Passive => r.passive,
            Sort::TimeWait => r.time_wait as f64,
            Sort::Total => r.total as f64,
        };
        rows.sort_by(|a, b| by(b).total_cmp(&by(a)).then(b.total.cmp(&a.total)));
        let rows = rows
            .into_iter()
            .map(|r| {
                let (a, p) = (r.active, r.passive);
                vec![
                    r.netns,
                    r.comm,
                    format!("{a:.1}"),
                    r.time_wait.to_string(),
                    format!("{p:.1}"),
                    r.total.to_string(),
                ]
            })
            .collect();
        let title = format!("Who closes first (sorted by {})", self.sort.name());
        // Beside the active closes, what they leave: the TIME_WAIT sockets the process holds now.
        let columns = ["netns", "process", "active/s", "timewait", "passive/s", "total"];
        Self::table(f, area, &title, &columns, &[14, 15, 8, 8, 9, 7], rows);
    }

    fn pressure(&self, f: &mut Frame, area: Rect) {
        let rows = self.snap()["reconcile"]["pressure"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| self.in_netns(r))
            .filter(|r| {
                let port = r["destination"]
                    .as_str()
                    .and_then(|d| d.rsplit_once(':')?.1.parse::<u16>().ok());
                self.port.is_none_or(|p| port == Some(p))
            })
            .map(|r| {
                let ratio = r["ratio"].as_f64().unwrap_or(0.0) * 100.0;
                vec![
                    s(&r["netns"]),
                    s(&r["destination"]),
                    u(&r["sockets"]).to_string(),
                    format!("{ratio:.1}%"),
                ]
            })
            .collect();
        Self::table(
            f,
            area,
            "Ephemeral ports by destination",
            &["netns", "destination", "sockets", "used"],
            &[18, 24, 9, 7],
            rows,
        );
    }

    fn leaks(&self, f: &mut Frame, area: Rect) {
        let rows = self.snap()["reconcile"]["leaks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| self.in_netns(r))
            .map(|r| {
                let oldest = r["oldest_seconds"].as_f64().unwrap_or(0.0);
                vec![
                    s(&r["netns"]),
                    s(&r["pid"]),
                    s(&r["comm"]),
                    u(&r["sockets"]).to_string(),
                    format!("{oldest:.0} s"),
                ]
            })
            .collect();
        Self::table(
            f,
            area,
            "CLOSE_WAIT leaks",
            &["netns", "pid", "process", "sockets", "oldest"],
            &[18, 8, 15, 8, 8],
            rows,
        );
    }

    fn ends(&self, f: &mut Frame, area: Rect) {
        let snap = self.snap();
        let mut lines: Vec<Line> = vec![Line::from("TIME_WAIT ended, per second:")];
        for reason in ["expired", "reuse", "killed", "fin_timeout"] {
            let r = self.rate(|s| u(&s["counts"]["timewait_ends"][reason]));
            let total = u(&snap["counts"]["timewait_ends"][reason]);
            lines.push(Line::from(format!("  {reason:<12} {r:>9.1}/s {total:>12} in all")));
        }
        let drift: Vec<String> = snap["reconcile"]["drift"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_i64().unwrap_or(0) != 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        lines.push(Line::from(""));
        lines.push(Line::from(format!(
            "drift at the last reconcile: {}",
            if drift.is_empty() { "none".to_string() } else { drift.join(", ") }
        )));
        let c = &snap["counts"];
        lines.push(Line::from(format!(
            "records lost {}  map entries lost {}  ends unseen {}",
            u(&c["events_lost"]),
            u(&c["map_full"]),
            u(&c["timewait_end_missed"])
        )));
        let block =
            Block::default().borders(Borders::ALL).title("How TIME_WAIT ends; what may be off");
        f.render_widget(Paragraph::new(lines).block(block), area);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cycle_through_everything_then_all() {
        let all = vec![1, 2];
        assert_eq!(cycle(&all, &None), Some(1));
        assert_eq!(cycle(&all, &Some(1)), Some(2));
        assert_eq!(cycle(&all, &Some(2)), None);
        assert_eq!(cycle::<u16>(&[], &None), None);
        assert_eq!(Sort::Active.next().next().next().next(), Sort::Active);
        assert_eq!(spark(&VecDeque::from([0, 7, 14])), "▁▄█");
    }
}
