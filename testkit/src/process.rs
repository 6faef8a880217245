//! A process a test, a check or the benchmark started (the agent, Prometheus): its output kept
//! in a log file, and stopped on every path, a panic included.
use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// How long a process has to exit on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> io::Result<Self> {
        let out = File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name} ({cmd:?}): {e}")))?;
        Ok(Self { name: name.to_string(), child, log: log.to_path_buf() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it has.
    pub fn exited(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// An error with the end of the log if it has exited.
    pub fn alive(&mut self) -> io::Result<()> {
        match self.exited()? {
            None => Ok(()),
            Some(status) => Err(io::Error::other(format!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail(20)
            ))),
        }
    }

    /// Where the agent this is says it listens (see [`crate::agent::served_address`]).
    pub fn served_address(&self) -> Option<std::net::SocketAddr> {
        crate::agent::served_address(&self.log_text())
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `sig` and does not wait.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, which is reaped only through `self`.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait()
    }

    /// SIGTERM (after SIGCONT, should it be paused), then SIGKILL if it has not exited within
    /// 10 s; how it ended.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM within {STOP_GRACE:?}; killing it", self.name);
        self.child.kill()?;
        self.child.wait()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping {}: {e}", self.name);
        }
    }
}
