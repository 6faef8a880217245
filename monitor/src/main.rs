//! `twmon`: the agent's command line.
use std::{net::SocketAddr, os::unix::fs::MetadataExt, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use twmon::{Config, kernel::Limits};

/// How TCP connections end, as Prometheus metrics: teardown states, TIME_WAIT and its end,
/// retransmitted FINs, from eBPF programs on kernel tracepoints.
#[derive(Parser, Debug)]
#[command(name = "twmon", version)]
struct Args {
    /// Address to serve /metrics on (`:PORT` means all interfaces).
    #[arg(long = "web.listen-address", default_value = ":9864", value_parser = parse_listen)]
    listen: SocketAddr,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long = "log.level", default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
    /// Configuration file (TOML) for breakdowns, leak threshold, namespaces and reconcile
    /// interval; see README. Without it every key has its default.
    #[arg(long = "config.file", value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Print an example configuration file with every key and its default, and exit.
    #[arg(long = "config.example")]
    config_example: bool,
    /// Watch only the network namespace at this path (/run/netns/NAME, /proc/PID/ns/net).
    #[arg(long = "netns", value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Most full sockets in teardown states followed at once (kernel memory is reserved for
    /// all of them: about 96 bytes each).
    #[arg(long = "bpf.max-sockets", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1024..))]
    max_sockets: u32,
    /// Most timewait sockets followed at once, over all namespaces (tcp_max_tw_buckets is up to
    /// 262144 per namespace; kernel memory is reserved for all of them: about 96 bytes each).
    #[arg(long = "bpf.max-timewait", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1024..))]
    max_timewait: u32,
    /// Size of the kernel-to-agent ring buffer in bytes: a power of two, at least 4096.
    #[arg(long = "bpf.ring-buffer-size", default_value_t = 4 << 20, value_parser = parse_ring)]
    ring_buffer_bytes: u32,
    /// How often to look for timewait sockets the kernel changed without a trace event
    /// (e.g. `500ms`, `2s`).
    #[arg(long = "timewait.sweep-interval", default_value = "1s", value_parser = parse_duration)]
    sweep_interval: Duration,
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    // `:PORT` is every interface, IPv6 and IPv4 (a dual-stack socket; IPv4 alone where the
    // kernel has no IPv6).
    let full = if s.starts_with(':') { format!("[::]{s}") } else { s.to_string() };
    full.parse().map_err(|_| format!("`{s}` is not HOST:PORT or :PORT (e.g. 127.0.0.1:9864 or :9864)"))
}

fn parse_ring(s: &str) -> Result<u32, String> {
    let n: u64 = s.parse().map_err(|_| format!("`{s}` is not a number of bytes"))?;
    if !(4096..=1 << 31).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} must be a power of two from 4096 to 2 GiB (2147483648), e.g. 4194304"));
    }
    Ok(n as u32)
}

/// The configuration file's durations (`500ms`, `2s`, `1m`), at least 10 ms.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = twmon::config::parse_duration(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s} is too short: at least 10ms"));
    }
    Ok(d)
}

fn main() -> ExitCode {
    twmon::bound_heap();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!("{},aya=warn", args.log_level)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.config_example {
        print!("{}", twmon::config::EXAMPLE);
        return Ok(());
    }
    let settings = match &args.config_file {
        Some(p) => twmon::config::Config::load(p)?,
        None => twmon::config::Config::default(),
    };
    let netns = match &args.netns {
        None => 0,
        Some(p) => std::fs::metadata(p)
            .map_err(|e| anyhow::anyhow!("--netns {}: {e}; give a namespace file such as /run/netns/NAME", p.display()))?
            .ino() as u32,
    };
    let config = Config {
        listen: args.listen,
        netns,
        limits: Limits {
            max_sockets: args.max_sockets,
            max_timewait: args.max_timewait,
            ring_buffer_bytes: args.ring_buffer_bytes,
        },
        sweep_interval: args.sweep_interval,
        netns_path: args.netns.clone(),
        settings,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(twmon::run(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_like_an_exporter() {
        let a = Args::try_parse_from(["twmon"]).unwrap();
        assert_eq!(a.listen, "[::]:9864".parse().unwrap());
        let a = Args::try_parse_from(["twmon", "--web.listen-address", "127.0.0.1:9000", "--log.level", "debug"]).unwrap();
        assert_eq!(a.listen.port(), 9000);
        assert!(Args::try_parse_from(["twmon", "--log.level", "loud"]).is_err());
        let e = Args::try_parse_from(["twmon", "--bpf.ring-buffer-size", "5000"]).unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
        let e = Args::try_parse_from(["twmon", "--bpf.ring-buffer-size", "1099511627776"]).unwrap_err().to_string();
        assert!(e.contains("to 2 GiB"), "{e}");
        let e = Args::try_parse_from(["twmon", "--web.listen-address", "nowhere"]).unwrap_err().to_string();
        assert!(e.contains(":PORT"), "{e}");
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("1ms").is_err());
        // Values that do not fit a duration are refused, not a panic.
        let e = parse_duration("99999999999999999999s").unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }
}
