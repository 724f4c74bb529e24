//! A blocking client of `tether serve` over the daemon's stdin/stdout, for benchmarks.
//!
//! No async runtime: frames are written with `write_all` on the child's stdin and read
//! by polling its stdout (so every wait is bounded by a deadline) and feeding a
//! [`FrameDecoder`]. Everything happens on the calling thread, so a measured latency
//! contains tether's work and the pipe hops, and no thread hand-offs of the bench.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use tether_protocol::{
    self as wire, check_welcome, decode, encode_frame, BuildId, ClientMessage, DaemonMessage, Decoded, Exited,
    FrameDecoder, RequestId, RunSpec, Started, Welcome, PREAMBLE,
};

use crate::procs::{stop, wait_timeout, Captured};

/// The version the bench claims in Hello (the protocol version is what matters).
const CLIENT_VERSION: &str = concat!("bench-", env!("CARGO_PKG_VERSION"));

/// One item from the daemon.
#[derive(Debug)]
pub enum Incoming {
    /// The daemon (re)started its side of a session.
    Preamble,
    Message(DaemonMessage),
}

/// A running `tether serve` and the client end of its stdio.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    stderr: Captured,
    dec: FrameDecoder,
    out: Vec<u8>,
    /// Exited messages, and output byte counts, that arrived before the Started of
    /// their build (Started travels in the daemon's control queue, the others in its
    /// data queue).
    early_exits: Vec<Exited>,
    early_output: HashMap<BuildId, u64>,
}

/// One build run to its end through [`Session::run_build`].
#[derive(Debug)]
pub struct BuildRun {
    pub started: Started,
    pub exited: Exited,
    /// From just before writing Run to just after decoding Started (or Exited, when
    /// that came first).
    pub to_started: Duration,
    /// From just before writing Run to just after decoding Exited.
    pub latency: Duration,
    /// Output bytes received for the build (stdout and stderr).
    pub output_bytes: u64,
    /// The Exited message came before Started.
    pub exited_before_started: bool,
}

/// A spec that runs `argv` directly, without stdin, with the daemon's defaults.
pub fn argv_spec(argv: &[&str]) -> RunSpec {
    RunSpec::new(wire::CommandSpec::argv(argv))
}

impl Session {
    /// Starts `tether ARGS` (normally `serve ...`) with piped stdin and stdout, stderr
    /// captured, in its own process group; `env` is added to its environment.
    pub fn spawn(tether: &Path, args: &[&str], env: &[(&str, &Path)]) -> anyhow::Result<Session> {
        let mut cmd = Command::new(tether);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Session::spawn_command(cmd, &format!("{} {}", tether.display(), args.join(" ")))
    }

    /// Starts `cmd`, a `tether serve` or a command that runs one elsewhere and relays its
    /// stdio (`ssh HOST tether serve --exit-on-eof`), with piped stdin and stdout, stderr
    /// captured, in its own process group; `what` names it in errors.
    pub fn spawn_command(mut cmd: Command, what: &str) -> anyhow::Result<Session> {
        let stderr = Captured::new()?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(stderr.stdio()?);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("{what} has no stdio pipes");
        };
        Ok(Session {
            child,
            stdin: Some(stdin),
            stdout,
            stderr,
            dec: FrameDecoder::new(),
            out: Vec::new(),
            early_exits: Vec::new(),
            early_output: HashMap::new(),
        })
    }

    /// [`spawn`](Self::spawn), then [`handshake`](Self::handshake).
    pub fn connect(tether: &Path, args: &[&str], env: &[(&str, &Path)], timeout: Duration) -> anyhow::Result<Session> {
        let mut s = Session::spawn(tether, args, env)?;
        s.handshake(timeout)?;
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the daemon's own preamble, which it writes once it is up, before any
    /// client has spoken.
    pub fn wait_preamble(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        match self.recv(deadline).context("waiting for the daemon's preamble")? {
            Incoming::Preamble => Ok(()),
            Incoming::Message(m) => bail!("the daemon sent {m:?} before its preamble"),
        }
    }

    /// Opens a session: preamble and Hello, then waits for Welcome (skipping the
    /// daemon's preambles).
    pub fn handshake(&mut self, timeout: Duration) -> anyhow::Result<Welcome> {
        let deadline = Instant::now() + timeout;
        self.out.clear();
        self.out.extend_from_slice(PREAMBLE);
        let hello = ClientMessage::Hello(wire::Hello {
            protocol: wire::PROTOCOL_VERSION,
            client_version: CLIENT_VERSION.to_owned(),
            capabilities: Vec::new(),
        });
        encode_frame(&hello, &mut self.out).context("cannot encode Hello")?;
        self.write_out().context("sending the preamble and Hello")?;
        loop {
            match self.recv(deadline).context("waiting for Welcome")? {
                Incoming::Preamble => {}
                Incoming::Message(DaemonMessage::Welcome(w)) => {
                    check_welcome(&w, CLIENT_VERSION)?;
                    return Ok(w);
                }
                Incoming::Message(DaemonMessage::Error(e)) => {
                    bail!("the daemon refused the session: {:?}: {}", e.kind, e.message)
                }
                Incoming::Message(m) => bail!("unexpected message before Welcome: {m:?}"),
            }
        }
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &ClientMessage) -> anyhow::Result<()> {
        self.out.clear();
        encode_frame(msg, &mut self.out).context("cannot encode a message")?;
        self.write_out()
    }

    fn write_out(&mut self) -> anyhow::Result<()> {
        let Some(stdin) = &mut self.stdin else {
            bail!("the session's input is already closed");
        };
        if let Err(e) = stdin.write_all(&self.out) {
            let why = self.stderr.suffix();
            return Err(anyhow!(e).context(format!("cannot write to the daemon{why}")));
        }
        Ok(())
    }

    /// The next item from the daemon, waiting until `deadline`. Damaged or undecodable
    /// frames are errors: a local pipe must not damage anything. `Channel`
    /// announcements (who holds a stdin stream) are for other clients: skipped.
    pub fn recv(&mut self, deadline: Instant) -> anyhow::Result<Incoming> {
        loop {
            let item = match self.dec.decode() {
                None => None,
                Some(Decoded::Preamble) => Some(Ok(Incoming::Preamble)),
                Some(Decoded::Frame(payload)) => match decode::<DaemonMessage>(payload) {
                    // The stream's announcements of its holder, for other clients.
                    Ok(DaemonMessage::Channel(_)) => None,
                    Ok(m) => Some(Ok(Incoming::Message(m))),
                    Err(e) => Some(Err(anyhow!("undecodable frame from the daemon: {e}"))),
                },
                Some(Decoded::Corrupt(c)) => Some(Err(anyhow!("damaged stream from the daemon: {c}"))),
            };
            if let Some(item) = item {
                return item;
            }
            self.fill(deadline)?;
        }
    }

    /// Reads at least one byte into the decoder, or fails at EOF or the deadline.
    fn fill(&mut self, deadline: Instant) -> anyhow::Result<()> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = self.stderr.suffix();
                bail!("no answer from the daemon in time{why}");
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.stdout.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(anyhow!(e).context("cannot poll the daemon's stdout")),
            }
            match self.stdout.read(self.dec.read_buf()) {
                Ok(0) => {
                    let status = wait_timeout(&mut self.child, Duration::from_secs(2))
                        .ok()
                        .flatten()
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default();
                    let why = self.stderr.suffix();
                    bail!("the daemon closed its stdout{status}{why}");
                }
                Ok(n) => {
                    self.dec.commit(n);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow!(e).context("cannot read the daemon's stdout")),
            }
        }
    }

    /// Runs one build and waits for its end; answers the daemon's pings meanwhile. The
    /// build must be the only one this session starts concurrently (output and exits of
    /// other builds are ignored).
    pub fn run_build(&mut self, req: RequestId, spec: RunSpec, timeout: Duration) -> anyhow::Result<BuildRun> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        self.send(&ClientMessage::Run {
            req,
            spec: Box::new(spec),
            follow: true,
        })
        .with_context(|| format!("sending Run {req}"))?;
        let mut build: Option<Started> = None;
        let mut output_bytes = 0u64;
        let mut to_started = Duration::ZERO;
        loop {
            let msg = match self
                .recv(deadline)
                .with_context(|| format!("waiting for build {req}"))?
            {
                // Announcements to the stream (each with a preamble) go on around a
                // session: they are not its end.
                Incoming::Preamble => continue,
                Incoming::Message(m) => m,
            };
            match msg {
                DaemonMessage::Started(s) if s.req == req => {
                    to_started = t0.elapsed();
                    output_bytes += self.early_output.remove(&s.build).unwrap_or(0);
                    if let Some(i) = self.early_exits.iter().position(|e| e.build == s.build) {
                        let exited = self.early_exits.swap_remove(i);
                        return Ok(finish(s, exited, [to_started, t0.elapsed()], output_bytes, true));
                    }
                    build = Some(s);
                }
                DaemonMessage::Output { build: b, data, .. } if is(&build, &b) => output_bytes += data.len() as u64,
                DaemonMessage::Exited(e) if is(&build, &e.build) => {
                    let started = build.take().context("Exited matched no Started")?;
                    return Ok(finish(started, e, [to_started, t0.elapsed()], output_bytes, false));
                }
                DaemonMessage::Output { build: b, data, .. } if build.is_none() => {
                    *self.early_output.entry(b).or_default() += data.len() as u64;
                }
                DaemonMessage::Exited(e) if build.is_none() => self.early_exits.push(e),
                DaemonMessage::Error(e)
                    if e.req == Some(req) || build.as_ref().is_some_and(|s| e.build.as_ref() == Some(&s.build)) =>
                {
                    bail!("build {req} failed: {:?}: {}", e.kind, e.message)
                }
                DaemonMessage::Error(e) => bail!("the daemon reported an error: {:?}: {}", e.kind, e.message),
                DaemonMessage::Ping { nonce } => self.send(&ClientMessage::Pong { nonce })?,
                _ => {}
            }
        }
    }

    /// Closes the daemon's stdin and waits (at most `timeout`) for it to exit; kills it
    /// after that. Fails if it had to be killed.
    pub fn close(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        drop(self.stdin.take());
        if let Some(st) = wait_timeout(&mut self.child, timeout)? {
            return Ok(st);
        }
        let (st, _) = stop(&mut self.child, Signal::SIGKILL, true, Duration::from_secs(5))?;
        let why = self.stderr.suffix();
        bail!("the daemon did not exit within {timeout:?} of its stdin closing; killed ({st}){why}")
    }

    /// SIGTERMs the daemon and waits (at most `timeout`) for it, then SIGKILLs it. Fails
    /// if it had to be killed.
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let (st, killed) = stop(&mut self.child, Signal::SIGTERM, false, timeout)?;
        if killed {
            let why = self.stderr.suffix();
            bail!("the daemon did not exit within {timeout:?} of SIGTERM; killed{why}");
        }
        Ok(st)
    }

    /// What the daemon wrote to its stderr so far (its logs).
    pub fn stderr(&mut self) -> String {
        self.stderr.tail(64 * 1024)
    }
}

fn is(started: &Option<Started>, build: &BuildId) -> bool {
    started.as_ref().is_some_and(|s| &s.build == build)
}

fn finish(started: Started, exited: Exited, times: [Duration; 2], output_bytes: u64, early: bool) -> BuildRun {
    BuildRun {
        started,
        exited,
        to_started: times[0],
        latency: times[1],
        output_bytes,
        exited_before_started: early,
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session dropped on an error path must not leave a daemon behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = stop(&mut self.child, Signal::SIGKILL, true, Duration::from_secs(5));
        }
    }
}
