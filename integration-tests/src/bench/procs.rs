//! Process helpers: bounded waits, stopping, captured stderr, /proc readings.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// A child's stderr, kept in an anonymous temporary file so that it can neither block
/// the child nor clutter the bench's own output, and can be quoted in errors.
pub struct Captured {
    file: File,
}

impl Captured {
    pub fn new() -> anyhow::Result<Captured> {
        let file = tempfile::tempfile().context("cannot create a temporary file for a child's stderr")?;
        Ok(Captured { file })
    }

    /// A handle to give to the child as its stderr.
    pub fn stdio(&self) -> anyhow::Result<Stdio> {
        let f = self
            .file
            .try_clone()
            .context("cannot duplicate the stderr capture file")?;
        Ok(Stdio::from(f))
    }

    /// Everything written so far (lossy UTF-8), at most the last `max` bytes.
    pub fn tail(&mut self, max: usize) -> String {
        let mut all = Vec::new();
        if self.file.seek(SeekFrom::Start(0)).is_err() || self.file.read_to_end(&mut all).is_err() {
            return "(stderr unreadable)".to_owned();
        }
        let from = all.len().saturating_sub(max);
        String::from_utf8_lossy(&all[from..]).trim().to_owned()
    }

    /// ", stderr: ..." when the child wrote anything, for error messages.
    pub fn suffix(&mut self) -> String {
        let t = self.tail(2000);
        if t.is_empty() {
            String::new()
        } else {
            format!("; its stderr: {t}")
        }
    }
}

/// Waits for `child` at most `timeout`; `None` if it is still running. Polls every
/// millisecond, so a measured duration is at most that much too long.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().context("cannot wait for a child")? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends `signal` to the child (to its whole process group with `group`), waits up to
/// `timeout`, then SIGKILLs it. Returns the status and whether SIGKILL was needed.
pub fn stop(child: &mut Child, signal: Signal, group: bool, timeout: Duration) -> anyhow::Result<(ExitStatus, bool)> {
    if let Some(st) = child.try_wait().context("cannot wait for a child")? {
        return Ok((st, false));
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = if group { killpg(pid, signal) } else { kill(pid, signal) };
    if let Some(st) = wait_timeout(child, timeout)? {
        return Ok((st, false));
    }
    if group {
        let _ = killpg(pid, Signal::SIGKILL);
    }
    child.kill().context("cannot kill a child")?;
    Ok((child.wait().context("cannot wait for a killed child")?, true))
}

/// Memory and threads of a running process, from /proc/PID/status.
#[derive(Debug, Clone, Copy)]
pub struct ProcStatus {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub threads: u64,
}

pub fn proc_status(pid: u32) -> anyhow::Result<ProcStatus> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let Some(line) = text.lines().find(|l| l.starts_with(name)) else {
            bail!("{path} has no {name} line");
        };
        let value = line[name.len()..].split_whitespace().next().unwrap_or("");
        value
            .parse()
            .with_context(|| format!("cannot parse {name} {value:?} in {path}"))
    };
    Ok(ProcStatus {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
        threads: field("Threads:")?,
    })
}

/// Whether `name` is an executable file in a directory of $PATH.
pub fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path)
        .any(|dir| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// CPU time (user + system) of all waited-for children of this process so far.
pub fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One timed run of a command to its end.
pub struct Timed {
    pub wall: Duration,
    /// CPU time of the command and every descendant it waited for.
    pub cpu: Duration,
    pub stderr: String,
}

/// Runs `cmd` (stdin and stdout /dev/null, stderr captured) in its
/// own process group, timing it from spawn to exit. Fails if it exits unsuccessfully or
/// runs longer than `timeout` (then its group is killed).
pub fn run_timed(mut cmd: std::process::Command, what: &str, timeout: Duration) -> anyhow::Result<Timed> {
    use std::os::unix::process::CommandExt;
    let mut stderr = Captured::new()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.stdio()?)
        .process_group(0);
    let cpu0 = children_cpu();
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
    let status = match wait_timeout(&mut child, timeout)? {
        Some(st) => st,
        None => {
            let _ = stop(&mut child, Signal::SIGKILL, true, Duration::from_secs(5));
            bail!("{what} did not finish within {timeout:?}; killed{}", stderr.suffix());
        }
    };
    let wall = t0.elapsed();
    let cpu = children_cpu().saturating_sub(cpu0);
    if !status.success() {
        bail!("{what} failed ({status}){}", stderr.suffix());
    }
    Ok(Timed {
        wall,
        cpu,
        stderr: stderr.tail(4000),
    })
}
