//! A `tether serve` on a Unix socket with a private state dir, and the client-side
//! plumbing the socket scenarios share: pipes nobody else holds, pipes the bench drains,
//! `tether ps` polling.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;

use crate::procs::{proc_status, stop, wait_timeout, Captured, ProcStatus};
use crate::scenario::Ctx;

/// A daemon serving on `<state>/tether.sock`; stopped (and its state dir removed) on
/// drop if [`SocketDaemon::stop`] was not called.
pub struct SocketDaemon {
    child: Child,
    pub sock: PathBuf,
    state: PathBuf,
    stderr: Captured,
}

impl SocketDaemon {
    /// Starts `tether serve --socket ... --state-dir ...` plus `extra` in a fresh dir
    /// `name` under the bench's tmpdir, and waits until the socket accepts connections.
    pub fn start(ctx: &Ctx, name: &str, extra: &[&str]) -> anyhow::Result<SocketDaemon> {
        let state = ctx.tmpdir.join(name);
        if state.exists() {
            std::fs::remove_dir_all(&state).with_context(|| format!("cannot remove {}", state.display()))?;
        }
        std::fs::create_dir_all(&state).with_context(|| format!("cannot create {}", state.display()))?;
        let sock = state.join("tether.sock");
        let stderr = Captured::new()?;
        let mut cmd = ctx.tether_cmd();
        cmd.arg("serve")
            .arg("--socket")
            .arg(&sock)
            .arg("--state-dir")
            .arg(state.join("state"))
            .args(["--log-level", "warn"])
            .args(extra)
            // Its stdin ends at once: without --exit-on-eof it serves on (the socket).
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr.stdio()?)
            .process_group(0);
        let child = cmd.spawn().context("cannot start tether serve --socket")?;
        let mut d = SocketDaemon {
            child,
            sock,
            state,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&d.sock).is_err() {
            if let Some(st) = d.child.try_wait()? {
                bail!("tether serve --socket exited ({st}){}", d.stderr.suffix());
            }
            if Instant::now() >= deadline {
                bail!("tether serve's socket never answered{}", d.stderr.suffix());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(d)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn status(&self) -> anyhow::Result<ProcStatus> {
        proc_status(self.pid())
    }

    /// A tether client command (`tether SUBCOMMAND --socket SOCK`).
    pub fn client(&self, ctx: &Ctx, subcommand: &str) -> Command {
        let mut cmd = ctx.tether_cmd();
        cmd.arg(subcommand).arg("--socket").arg(&self.sock);
        cmd
    }

    /// The `state` field of build `id` in `tether ps --all --json`, if it is listed.
    pub fn ps_state(&self, ctx: &Ctx, id: &str) -> anyhow::Result<Option<String>> {
        let mut cmd = self.client(ctx, "ps");
        cmd.args(["--all", "--json"]).stdin(Stdio::null());
        let out = cmd.output().context("cannot run tether ps")?;
        if !out.status.success() {
            bail!(
                "tether ps failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("tether ps printed {line:?}"))?;
            if v["build"] == id {
                return Ok(Some(v["state"].as_str().unwrap_or_default().to_owned()));
            }
        }
        Ok(None)
    }

    /// Polls `tether ps` until build `id` is no longer running; returns its end state.
    pub fn wait_finished(&mut self, ctx: &Ctx, id: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ps_state(ctx, id)? {
                Some(s) if s != "running" => return Ok(s),
                _ => {}
            }
            if Instant::now() >= deadline {
                bail!("build {id} did not finish within {timeout:?}{}", self.stderr.suffix());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, a clean exit within 10 s, and the state dir removed.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let (st, killed) = stop(&mut self.child, Signal::SIGTERM, false, Duration::from_secs(10))?;
        if killed {
            bail!(
                "tether serve did not exit within 10 s of SIGTERM; killed{}",
                self.stderr.suffix()
            );
        }
        if !st.success() {
            bail!("tether serve exited with {st} on SIGTERM{}", self.stderr.suffix());
        }
        Ok(())
    }
}

impl Drop for SocketDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = stop(&mut self.child, Signal::SIGKILL, true, Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A pipe whose ends are close-on-exec, so that no other child inherits them (a stray
/// write end would keep its reader from seeing EOF). Returns (read, write).
pub fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| anyhow!(e).context("cannot create a pipe"))
}

/// Reads `fd` to its end on a thread, discarding the bytes; returns how many there were.
pub fn drain(fd: OwnedFd) -> JoinHandle<std::io::Result<u64>> {
    std::thread::spawn(move || {
        let mut f = File::from(fd);
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            match f.read(&mut buf) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })
}

/// A child whose stdout is a pipe the caller holds the read end of.
pub struct Piped {
    pub child: Child,
    pub out: OwnedFd,
    pub stderr: Captured,
}

/// Starts `cmd` (stdin /dev/null, own process group) with its stdout on a new pipe.
pub fn spawn_piped(mut cmd: Command, what: &str) -> anyhow::Result<Piped> {
    let (r, w) = pipe()?;
    let stderr = Captured::new()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(stderr.stdio()?)
        .process_group(0);
    let child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
    // Our copy of the write end goes with the command: only the child holds it now.
    drop(cmd);
    Ok(Piped { child, out: r, stderr })
}

/// One run of a command whose stdout the bench drained.
pub struct Drained {
    /// From spawn to both its exit and the end of its output.
    pub wall: Duration,
    pub bytes: u64,
}

/// Runs `cmd` with its stdout drained by the bench, timing it; fails if it runs longer
/// than `timeout` (its group is killed then) or exits unsuccessfully.
pub fn run_drained(cmd: Command, what: &str, timeout: Duration) -> anyhow::Result<Drained> {
    let t0 = Instant::now();
    let mut p = spawn_piped(cmd, what)?;
    let reader = drain(p.out);
    let status = match wait_timeout(&mut p.child, timeout)? {
        Some(st) => st,
        None => {
            let _ = stop(&mut p.child, Signal::SIGKILL, true, Duration::from_secs(5));
            bail!("{what} did not finish within {timeout:?}; killed{}", p.stderr.suffix());
        }
    };
    let bytes = reader
        .join()
        .map_err(|_| anyhow!("the reader of {what}'s output panicked"))?
        .with_context(|| format!("cannot read {what}'s output"))?;
    let wall = t0.elapsed();
    if !status.success() {
        bail!("{what} failed ({status}){}", p.stderr.suffix());
    }
    Ok(Drained { wall, bytes })
}
