//! What every harness of the agent needs from its process: where it listens, and when it is
//! ready. Agents started by tests, checks and the benchmark listen on port 0, so nothing can take
//! their port between a pick and a bind; the agent says where it listens in its log.
use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{http, process::Process};

/// The address in the agent's `serving /metrics address=...` log line (level info).
pub fn served_address(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("serving /metrics"))?;
    line.split_whitespace().find_map(|w| w.strip_prefix("address=")?.parse().ok())
}

/// Waits until the agent says where it listens and, unless it serves TLS only (`tls`), answers
/// `/healthz` with 200; returns the address. Fails when it exits first or `within` passes.
pub fn wait_healthy(agent: &mut Process, within: Duration, tls: bool) -> io::Result<SocketAddr> {
    let deadline = Instant::now() + within;
    loop {
        agent.alive()?;
        if let Some(addr) = agent.served_address()
            && (tls || matches!(http::get(addr, "/healthz"), Ok((200, _))))
        {
            return Ok(addr);
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "{} not healthy after {within:?}; its log ends with:\n{}",
                agent.name,
                agent.log_tail(20)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_read_from_the_log() {
        let log = "2026-12-03T09:00:00Z  INFO twmon: kernel programs attached programs=9\n\
                   2026-12-03T09:00:00Z  INFO twmon::run: serving /metrics address=127.0.0.1:40123 \
                   path=/metrics\n";
        assert_eq!(served_address(log), Some("127.0.0.1:40123".parse().unwrap()));
        assert_eq!(served_address("nothing yet\n"), None);
    }
}
