//! `twmon`: the agent's command line.
use std::{
    net::{SocketAddr, ToSocketAddrs},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use twmon::{Config, Web, export::serve, kernel::Limits};

/// The most entries a kernel map may be given: 2^24, about 1.5 GiB of kernel memory reserved at
/// start-up (96 bytes an entry). The kernel's own bound is higher, the memory rarely there.
const MAX_MAP_ENTRIES: u32 = 1 << 24;

/// How TCP connections end, as Prometheus metrics: teardown states, TIME_WAIT and its end,
/// retransmitted FINs, from eBPF programs on kernel tracepoints.
#[derive(Parser, Debug)]
#[command(name = "twmon", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to serve /metrics on: HOST:PORT (a name such as localhost is resolved), or
    /// :PORT for every interface. Port 0 lets the kernel pick one; the log says which.
    #[arg(long = "web.listen-address", default_value = ":9864", value_parser = parse_listen)]
    listen: SocketAddr,
    /// Path the metrics are served at.
    #[arg(long = "web.telemetry-path", default_value = "/metrics", value_parser = parse_path)]
    telemetry_path: String,
    /// Scrapes (and snapshots) served at once; more get 503 (counted in twmon_http_refused_total).
    #[arg(
        long = "web.max-requests",
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..=1000)
    )]
    max_requests: u32,
    /// HTTP connections open at once; more are closed when accepted (counted in
    /// twmon_http_refused_total).
    #[arg(
        long = "web.max-connections",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..=65536)
    )]
    max_connections: u32,
    /// Time a client has to send a request's headers, and the longest a kept-alive connection
    /// waits for its next request (e.g. `10s`).
    #[arg(long = "web.read-header-timeout", default_value = "10s", value_parser = parse_duration)]
    read_header_timeout: Duration,
    /// TLS, client certificates, basic authentication and response headers, in the format of
    /// the Prometheus exporter-toolkit (node_exporter's --web.config.file); see README.
    #[arg(long = "web.config.file", value_name = "PATH")]
    web_config_file: Option<PathBuf>,
    /// Parse the configuration, load and attach the kernel programs, detach them and exit: 0 when
    /// all is well, 1 with the reason otherwise (for deployment pipelines).
    #[arg(long = "config.check")]
    config_check: bool,
    /// Log level: error, warn, info, debug or trace.
    #[arg(
        long = "log.level",
        default_value = "info",
        value_parser = ["error", "warn", "info", "debug", "trace"]
    )]
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
    #[arg(long = "bpf.max-sockets", default_value_t = 65_536, value_parser = parse_entries)]
    max_sockets: u32,
    /// Most timewait sockets followed at once, over all namespaces (tcp_max_tw_buckets is up to
    /// 262144 per namespace; kernel memory is reserved for all of them: about 96 bytes each).
    #[arg(long = "bpf.max-timewait", default_value_t = 262_144, value_parser = parse_entries)]
    max_timewait: u32,
    /// Size of the kernel-to-agent ring buffer in bytes: a power of two, at least 4096.
    #[arg(long = "bpf.ring-buffer-size", default_value_t = 4 << 20, value_parser = parse_ring)]
    ring_buffer_bytes: u32,
    /// How often to look for timewait sockets the kernel changed without a trace event
    /// (e.g. `500ms`, `2s`).
    #[arg(long = "timewait.sweep-interval", default_value = "1s", value_parser = parse_duration)]
    sweep_interval: Duration,
}

/// Commands that read a running agent; without one, twmon runs the agent.
#[derive(Subcommand, Debug)]
enum Command {
    /// Stream teardown events as they happen, one line each: time, namespace, process (where
    /// its close() made the change), both ends, `from -> to`, time spent in `from`, and how a
    /// timewait socket ended. Reads a running agent; filters are applied there.
    Trace {
        /// The agent to read.
        #[arg(long, default_value = "http://127.0.0.1:9864")]
        agent: String,
        /// Only connections with this port at either end.
        #[arg(long)]
        port: Option<u16>,
        /// Only connections with this address at either end.
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// Only this network namespace, named as the metrics name it (e.g. netns/NAME, a pod).
        #[arg(long)]
        netns: Option<String>,
        /// Only changes from or to this state (e.g. time_wait, close_wait).
        #[arg(long, value_parser = [
            "established", "fin_wait1", "fin_wait2", "close_wait", "closing", "last_ack", "time_wait",
            "close",
        ])]
        state: Option<String>,
        /// Only changes made by this process's close() (its name, as in twmon_closes_total).
        #[arg(long)]
        comm: Option<String>,
        /// JSON lines, as the agent sends them.
        #[arg(long)]
        json: bool,
    },
    /// A live view of teardown: sockets per state with their trend, transitions per second,
    /// the processes closing first, port pressure, CLOSE_WAIT leaks, how TIME_WAIT ends. Keys:
    /// q quits, s sorts the processes, n and p pick a namespace and a destination port. With no
    /// agent at the default address and root privileges, it runs one for as long as it runs.
    Top {
        /// The agent to read.
        #[arg(long, default_value = twmon::client::top::DEFAULT_AGENT)]
        agent: String,
        /// How often to read it (e.g. `1s`).
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
    },
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    // `:PORT` is every interface, IPv6 and IPv4 (a dual-stack socket; IPv4 alone where the
    // kernel has no IPv6).
    let full = if s.starts_with(':') { format!("[::]{s}") } else { s.to_string() };
    let bad = || {
        format!("`{s}` is not HOST:PORT or :PORT (e.g. 127.0.0.1:9864, localhost:9864 or :9864)")
    };
    if let Ok(addr) = full.parse() {
        return Ok(addr);
    }
    // A host name: the first address it resolves to (localhost: 127.0.0.1 or ::1).
    let (host, port) = full.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let mut addrs =
        full.to_socket_addrs().map_err(|e| format!("`{s}`: cannot resolve {host}: {e}"))?;
    addrs.next().ok_or_else(|| format!("`{s}`: {host} has no address"))
}

fn parse_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.contains(char::is_whitespace) {
        return Err(format!("`{s}` is not a path such as /metrics"));
    }
    Ok(s.to_string())
}

fn parse_entries(s: &str) -> Result<u32, String> {
    let n: u64 = s.parse().map_err(|_| format!("`{s}` is not a number of entries"))?;
    if !(1024..=MAX_MAP_ENTRIES as u64).contains(&n) {
        return Err(format!(
            "{n} is out of range: from 1024 to {MAX_MAP_ENTRIES} (each entry reserves about 96 \
             bytes of kernel memory at start-up; {MAX_MAP_ENTRIES} is 1.5 GiB)"
        ));
    }
    Ok(n as u32)
}

/// The inode of the network namespace at `path`, or why it is not one.
fn netns_inode(path: &Path) -> anyhow::Result<u32> {
    let what = || format!("--netns {}", path.display());
    let file = std::fs::File::open(path).map_err(|e| {
        anyhow::anyhow!("{}: {e}; give a namespace file such as /run/netns/NAME", what())
    })?;
    match twmon::view::netns::namespace_type(&file) {
        Ok(t) if t == libc::CLONE_NEWNET => {}
        Ok(_) => anyhow::bail!(
            "{}: a namespace, but not a network namespace; give /run/netns/NAME or \
             /proc/PID/ns/net",
            what()
        ),
        Err(_) => anyhow::bail!(
            "{}: not a network namespace; give /run/netns/NAME or /proc/PID/ns/net",
            what()
        ),
    }
    Ok(file.metadata()?.ino() as u32)
}

fn parse_ring(s: &str) -> Result<u32, String> {
    let n: u64 = s.parse().map_err(|_| format!("`{s}` is not a number of bytes"))?;
    if !(4096..=1 << 31).contains(&n) || !n.is_power_of_two() {
        return Err(format!(
            "{n} must be a power of two from 4096 to 2 GiB (2147483648), e.g. 4194304"
        ));
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
    match args.command {
        Some(Command::Trace { agent, port, address, netns, state, comm, json }) => {
            let opts =
                twmon::client::trace::Options { agent, port, address, netns, state, comm, json };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            return rt.block_on(twmon::client::trace::run(opts));
        }
        Some(Command::Top { agent, interval }) => {
            return twmon::client::top::run(twmon::client::top::Options { agent, interval });
        }
        None => {}
    }
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
        Some(p) => netns_inode(p)?,
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
        config_file: args.config_file.clone(),
        web: Web {
            telemetry_path: args.telemetry_path.clone(),
            max_requests: args.max_requests as usize,
            limits: serve::Limits {
                max_connections: args.max_connections as usize,
                read_header_timeout: args.read_header_timeout,
                shutdown_grace: Duration::from_secs(3),
            },
            config: match &args.web_config_file {
                Some(p) => twmon::export::webconfig::WebConfig::load(p)?,
                None => Default::default(),
            },
        },
    };
    if args.config_check {
        return twmon::check(&config);
    }
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
        let a = Args::try_parse_from([
            "twmon",
            "--web.listen-address",
            "127.0.0.1:9000",
            "--log.level",
            "debug",
        ])
        .unwrap();
        assert_eq!(a.listen.port(), 9000);
        assert!(Args::try_parse_from(["twmon", "--log.level", "loud"]).is_err());
        let e = Args::try_parse_from(["twmon", "--bpf.ring-buffer-size", "5000"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("power of two"), "{e}");
        let e = Args::try_parse_from(["twmon", "--bpf.ring-buffer-size", "1099511627776"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("to 2 GiB"), "{e}");
        let e = Args::try_parse_from(["twmon", "--web.listen-address", "nowhere"])
            .unwrap_err()
            .to_string();
        assert!(e.contains(":PORT"), "{e}");
        let local = parse_listen("localhost:9864").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 9864, "{local}");
        assert!(parse_listen("localhost:http").is_err());
        assert_eq!(parse_listen("127.0.0.1:0").unwrap().port(), 0);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("1ms").is_err());
        // Values that do not fit a duration are refused, not a panic.
        let e = parse_duration("99999999999999999999s").unwrap_err();
        assert!(e.contains("too long"), "{e}");
    }
}
