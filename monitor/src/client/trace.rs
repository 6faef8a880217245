//! `twmon trace`: streams a running agent's `/api/v1/trace` and prints one line per teardown
//! event, or the JSON lines as they come (`--json`). The agent does the filtering.
use std::io::Write;

use anyhow::bail;
use http_body_util::BodyExt;

use super::http::Agent;
use crate::export::trace::TraceLine;

/// What `twmon trace` was asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The agent's address, `http://HOST:PORT`.
    pub agent: String,
    pub port: Option<u16>,
    pub address: Option<std::net::IpAddr>,
    pub netns: Option<String>,
    pub state: Option<String>,
    pub comm: Option<String>,
    pub json: bool,
}

impl Options {
    fn path(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let pairs = [
            ("port", self.port.map(|p| p.to_string())),
            ("address", self.address.map(|a| a.to_string())),
            ("netns", self.netns.clone()),
            ("state", self.state.clone()),
            ("comm", self.comm.clone()),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                q.append_pair(k, &v);
            }
        }
        let q = q.finish();
        if q.is_empty() { "/api/v1/trace".into() } else { format!("/api/v1/trace?{q}") }
    }
}

/// Streams until the agent stops, stdout closes (`| head`), or SIGINT or SIGTERM.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let agent = Agent::locate(&opts.agent).await?;
    let mut response = agent.get(&opts.path()).await?;
    let addr = agent.addr();
    eprintln!("twmon trace: streaming from {addr}; Ctrl-C stops");
    let mut out = std::io::stdout().lock();
    if !opts.json {
        let _ = writeln!(
            out,
            "{:<12} {:<16} {:<22} {:<22} {:<22} {:>11}    TO",
            "TIME", "NETNS", "PROCESS", "LOCAL", "REMOTE", "FROM"
        );
    }
    let stop = crate::run::shutdown()?;
    tokio::pin!(stop);
    let mut pending = Vec::new();
    loop {
        let frame = tokio::select! {
            _ = &mut stop => return Ok(()),
            f = response.body_mut().frame() => f,
        };
        let Some(frame) = frame else { bail!("the agent ended the stream (it stopped?)") };
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]);
            if writeln!(out, "{}", render(&line, opts.json)).and_then(|_| out.flush()).is_err() {
                // Whoever read stdout is gone (`| head`): done.
                return Ok(());
            }
        }
    }
}

/// A JSON line as it came, or for people.
fn render(line: &str, json: bool) -> String {
    if json {
        return line.to_string();
    }
    if let Ok(l) = serde_json::from_str::<TraceLine>(line) {
        return l.text();
    }
    match serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v.get("lost")?.as_u64())
    {
        Some(n) => {
            format!(
                "... {n} lines lost: this terminal read more slowly than they came; filter \
                 (--port, --netns)"
            )
        }
        None => line.to_string(),
    }
}
