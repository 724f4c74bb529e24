//! Scenario: keystroke round trip over an established `tether shell` session. One byte
//! (a letter) is written to a terminal and timed until its echo comes back.
//!
//! - Baseline: a local pty whose slave is the stdin/stdout of `cat`, in the default
//!   canonical mode with ECHO: the byte is echoed by the local line discipline.
//! - tether: a socket daemon and `tether shell --socket S -- cat` with the slave of a
//!   local pty as its stdin and stdout (and as its controlling terminal), so the client
//!   puts the local terminal in raw mode and the daemon opens a pty for `cat`: the byte
//!   goes client -> daemon -> remote pty, whose line discipline echoes it back the same
//!   way.
//!
//! Only letters are sent (never a newline, so `cat` itself prints nothing); every
//! [`KILL_EVERY`] bytes a ^U (kill line) keeps the line buffer short, followed by a
//! sentinel whose echo marks the end of everything printed before it (untimed). The two
//! sides run in alternating blocks on terminals open side by side, so both see the same
//! machine state. A byte not back within [`SAMPLE_TIMEOUT`] is counted as lost (and left
//! out of the percentiles); more than [`MAX_LOST`] on either side fail the scenario.
//! At the end the local terminal is hung up (its master closed) and the bench checks that
//! the client, the daemon's `cat` and the daemon itself are gone.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{tcgetattr, LocalFlags};
use nix::unistd::Pid;

use crate::chart::Chart;
use crate::procs::{stop, wait_timeout, Captured};
use crate::report::{num, percentile, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::socket_daemon::SocketDaemon;

pub struct Keystroke;

/// A byte not echoed within this is lost.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Lost bytes tolerated on each side before the scenario fails.
const MAX_LOST: usize = 3;
/// For untimed round trips (warm-up, sentinels): the session must answer by then.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
const GOAL_P99_MS: f64 = 10.0;
/// Bytes typed between two kills of the line (the canonical line buffer holds 4095).
const KILL_EVERY: usize = 200;
/// ^U, the default VKILL.
const KILL_LINE: u8 = 0x15;
/// Never a sample: its echo is the end of everything printed before it.
const SENTINEL: u8 = b'Z';
/// Untimed round trips on each terminal before the first timed one.
const WARM_UP: usize = 50;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cloexec(fd: &OwnedFd) -> anyhow::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).context("cannot set FD_CLOEXEC on a pty")?;
    Ok(())
}

/// A process on the slave of a pty the bench holds the master of.
struct Terminal {
    what: &'static str,
    /// `None` once closed (the terminal hung up).
    master: Option<File>,
    child: Child,
    stderr: Captured,
    buf: Vec<u8>,
    /// Letters typed since the line was last killed.
    line: usize,
}

impl Terminal {
    /// Starts `cmd` with a new pty's slave as stdin and stdout (stderr captured); with
    /// `ctty`, in a new session whose controlling terminal the slave is, so that closing
    /// the master sends it SIGHUP. Otherwise in its own process group.
    fn spawn(mut cmd: Command, what: &'static str, ctty: bool) -> anyhow::Result<Terminal> {
        let pty = nix::pty::openpty(None, None).context("cannot open a pty")?;
        // No other child may inherit either end: a stray master keeps the terminal from
        // hanging up, a stray slave keeps it open.
        cloexec(&pty.master)?;
        cloexec(&pty.slave)?;
        let stderr = Captured::new()?;
        let slave = |fd: &OwnedFd| fd.try_clone().context("cannot duplicate the pty's slave");
        cmd.stdin(Stdio::from(slave(&pty.slave)?))
            .stdout(Stdio::from(slave(&pty.slave)?))
            .stderr(stderr.stdio()?);
        if ctty {
            // SAFETY: setsid and ioctl are async-signal-safe and touch no memory of ours.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            cmd.process_group(0);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
        // Only the child holds the slave now.
        drop(cmd);
        drop(pty.slave);
        Ok(Terminal {
            what,
            master: Some(File::from(pty.master)),
            child,
            stderr,
            buf: vec![0; 4096],
            line: 0,
        })
    }

    fn master(&mut self) -> anyhow::Result<&mut File> {
        self.master.as_mut().context("the terminal is closed")
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        if let Err(e) = self.master()?.write_all(bytes) {
            let why = self.stderr.suffix();
            return Err(anyhow!(e).context(format!("cannot write to {}'s terminal{why}", self.what)));
        }
        Ok(())
    }

    /// Reads the terminal until `byte` comes out (anything before it is dropped);
    /// `false` if `deadline` passed first.
    fn wait_for(&mut self, byte: u8, deadline: Instant) -> anyhow::Result<bool> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Round up, so that a wait never ends just before its deadline.
            let ms = u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
            let master = self.master.as_ref().context("the terminal is closed")?;
            let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) if Instant::now() >= deadline => return Ok(false),
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(anyhow!(e).context("cannot poll a pty")),
            }
            let mut master = master;
            match master.read(&mut self.buf) {
                Ok(0) => bail!("{}'s terminal ended{}", self.what, self.stderr.suffix()),
                Ok(n) if self.buf[..n].contains(&byte) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = self.stderr.suffix();
                    return Err(anyhow!(e).context(format!("cannot read {}'s terminal{why}", self.what)));
                }
            }
        }
    }

    /// Types `byte` and times it until its echo; `None` if that took over `timeout`.
    fn round_trip(&mut self, byte: u8, timeout: Duration) -> anyhow::Result<Option<Duration>> {
        let t0 = Instant::now();
        self.write(&[byte])?;
        self.line += 1;
        let echoed = self.wait_for(byte, t0 + timeout)?;
        Ok(echoed.then(|| t0.elapsed()))
    }

    /// Kills the line and waits for a sentinel typed after it: everything printed
    /// before (the kill's erasing, late echoes of lost bytes) is read and dropped.
    fn sync(&mut self) -> anyhow::Result<()> {
        self.write(&[KILL_LINE, SENTINEL])?;
        if !self.wait_for(SENTINEL, Instant::now() + SYNC_TIMEOUT)? {
            bail!(
                "{}: no echo of a sentinel within {SYNC_TIMEOUT:?}{}",
                self.what,
                self.stderr.suffix()
            );
        }
        self.line = 1;
        Ok(())
    }

    /// Untimed round trips, each of which must come back.
    fn warm_up(&mut self, n: usize) -> anyhow::Result<()> {
        for i in 0..n {
            if self.round_trip(b'a' + (i % 26) as u8, SYNC_TIMEOUT)?.is_none() {
                bail!(
                    "{}: no echo of warm-up byte {i} within {SYNC_TIMEOUT:?}{}",
                    self.what,
                    self.stderr.suffix()
                );
            }
        }
        self.sync()
    }

    /// `n` timed round trips of letters; lost ones are counted in `lost`.
    fn block(&mut self, n: usize, samples: &mut Vec<f64>, lost: &mut usize) -> anyhow::Result<()> {
        for i in 0..n {
            if self.line >= KILL_EVERY {
                self.sync()?;
            }
            match self.round_trip(b'a' + (i % 26) as u8, SAMPLE_TIMEOUT)? {
                Some(d) => samples.push(ms(d)),
                None => {
                    *lost += 1;
                    if *lost > MAX_LOST {
                        bail!(
                            "{}: {lost} bytes were not echoed within {SAMPLE_TIMEOUT:?}{}",
                            self.what,
                            self.stderr.suffix()
                        );
                    }
                    self.sync()?;
                }
            }
        }
        Ok(())
    }

    /// Hangs the terminal up (closes the master) and waits for the process to end;
    /// kills its group and fails if it outlives `timeout`.
    fn hang_up(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        drop(self.master.take());
        if let Some(st) = wait_timeout(&mut self.child, timeout)? {
            return Ok(st);
        }
        let _ = stop(&mut self.child, Signal::SIGKILL, true, Duration::from_secs(5));
        bail!(
            "{} outlived its terminal's hang-up by {timeout:?}; killed{}",
            self.what,
            self.stderr.suffix()
        )
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = stop(&mut self.child, Signal::SIGKILL, true, Duration::from_secs(5));
        }
    }
}

/// Every descendant of `pid`, from /proc/PID/task/TID/children.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.filter_map(Result::ok) {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// `tether shell -- cat` on a new terminal, in raw mode and echoing through the
/// daemon's pty. Returns it and the time from spawn to the first remote echo.
fn open_shell(ctx: &Ctx, daemon: &SocketDaemon) -> anyhow::Result<(Terminal, Duration)> {
    let mut cmd = daemon.client(ctx, "shell");
    cmd.args(["--", "cat"]);
    let t0 = Instant::now();
    let mut term = Terminal::spawn(cmd, "tether shell", true)?;
    // Nothing may be typed before the client switched its terminal to raw mode: the
    // local line discipline would echo it (and hold it until a newline).
    let deadline = t0 + Duration::from_secs(30);
    loop {
        let flags = tcgetattr(term.master()?.as_fd())
            .context("cannot read the terminal's settings")?
            .local_flags;
        if !flags.intersects(LocalFlags::ICANON | LocalFlags::ECHO) {
            break;
        }
        if let Some(st) = term.child.try_wait()? {
            bail!(
                "tether shell exited ({st}) before its terminal was raw{}",
                term.stderr.suffix()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "tether shell did not switch its terminal to raw mode within 30 s{}",
                term.stderr.suffix()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if term.round_trip(SENTINEL, SYNC_TIMEOUT)?.is_none() {
        bail!(
            "no echo from the remote pty within {SYNC_TIMEOUT:?}{}",
            term.stderr.suffix()
        );
    }
    let established = t0.elapsed();
    term.warm_up(WARM_UP)?;
    Ok((term, established))
}

/// p50, p99 and max of one side's samples.
fn summary(v: &[f64]) -> [f64; 3] {
    [
        percentile(v, 50.0),
        percentile(v, 99.0),
        v.iter().copied().fold(0.0, f64::max),
    ]
}

impl Scenario for Keystroke {
    fn id(&self) -> &'static str {
        "keystroke"
    }

    /// `2 * reps` blocks on each side, alternating (local first): 10 blocks of 200
    /// bytes in a full run, 4 of 75 with `--quick`.
    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let per_block: usize = if ctx.quick { 75 } else { 200 };
        let blocks = 2 * ctx.reps;
        let n = per_block * blocks;

        let mut local = Terminal::spawn(Command::new("cat"), "local cat", false)?;
        local.warm_up(WARM_UP)?;
        let daemon = SocketDaemon::start(ctx, "keystroke", &[])?;
        let (mut remote, established) = open_shell(ctx, &daemon)?;
        let remote_procs = descendants(daemon.pid());
        if !remote_procs.iter().any(|&p| comm(p) == "cat") {
            bail!(
                "no `cat` under the daemon once the shell echoed (its descendants: {:?})",
                remote_procs
                    .iter()
                    .map(|&p| format!("{p} {}", comm(p)))
                    .collect::<Vec<_>>()
            );
        }

        let (mut b, mut t) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut b_lost, mut t_lost) = (0usize, 0usize);
        let (mut b_block_p99, mut t_block_p99) = (vec![], vec![]);
        for i in 1..=blocks {
            let from = b.len();
            local.block(per_block, &mut b, &mut b_lost)?;
            let bl = &b[from..];
            let from = t.len();
            remote.block(per_block, &mut t, &mut t_lost)?;
            let tl = &t[from..];
            b_block_p99.push(percentile(bl, 99.0));
            t_block_p99.push(percentile(tl, 99.0));
            ctx.progress(
                self.id(),
                &format!(
                    "block {i}/{blocks}: local pty p50 {} ms p99 {} ms; tether p50 {} ms p99 {} ms",
                    num(percentile(bl, 50.0)),
                    num(percentile(bl, 99.0)),
                    num(percentile(tl, 50.0)),
                    num(percentile(tl, 99.0)),
                ),
            );
        }

        // The end: a hang-up of both terminals, and nothing left running.
        let hang_up_t0 = Instant::now();
        let client_status = remote.hang_up(Duration::from_secs(20))?;
        let client_gone = hang_up_t0.elapsed();
        let deadline = Instant::now() + Duration::from_secs(10);
        while remote_procs.iter().any(|&p| alive(p)) {
            if Instant::now() >= deadline {
                bail!(
                    "the daemon's shell processes {remote_procs:?} outlived the client's hang-up by 10 s ({:?})",
                    descendants(daemon.pid())
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        local.hang_up(Duration::from_secs(10))?;
        let daemon_left = descendants(daemon.pid());
        if !daemon_left.is_empty() {
            bail!("the daemon still has children after the shell ended: {daemon_left:?}");
        }
        daemon.stop().context("stopping the socket daemon")?;

        let [bp50, bp99, bmax] = summary(&b);
        let [tp50, tp99, tmax] = summary(&t);
        let range = |v: &[f64]| {
            let s = Stats::of(v.to_vec())
                .map(|s| (s.min, s.max))
                .unwrap_or((f64::NAN, f64::NAN));
            format!("{}-{}", num(s.0), num(s.1))
        };
        let mut notes = vec![
            format!(
                "{blocks} alternating blocks of {per_block} bytes per side; p99 of single blocks: tether {} ms, \
                 local pty {} ms",
                range(&t_block_p99),
                range(&b_block_p99)
            ),
            format!(
                "lost (no echo within {} ms, left out): tether {t_lost}, local pty {b_lost}",
                SAMPLE_TIMEOUT.as_millis()
            ),
            format!(
                "session established (spawn of `tether shell` to the first remote echo) in {} ms",
                num(ms(established))
            ),
            format!(
                "hang-up: the client exited ({client_status}) {} ms after its terminal closed; \
                 the daemon's `cat` and the daemon itself are gone",
                num(ms(client_gone))
            ),
        ];
        if !ctx.quick && n < 1000 {
            notes.push(format!("only {n} samples per side: the p99 is a coarse figure"));
        }
        let scenario = format!("keystroke round trip ({n} bytes each, `tether shell -- cat`)");
        let base = "local pty, `cat`".to_owned();
        // Every timed round trip of the run (lost bytes left out, as in the rows).
        ctx.chart(Chart::Distribution {
            id: "keystroke-latency".into(),
            title: format!("{scenario}: echo of one typed byte"),
            unit: "ms".into(),
            series: vec![("tether shell, remote pty".into(), t), (base.clone(), b)],
        });
        let one = |x: f64| Stats::of(vec![x]).context("no samples");
        let row = |metric: &str, tv: f64, bv: f64, goal: Goal, notes: Vec<String>| -> anyhow::Result<Row> {
            Ok(Row {
                scenario: scenario.clone(),
                metric: metric.into(),
                unit: "ms",
                tether: one(tv)?,
                baseline: Some((base.clone(), one(bv)?)),
                goal,
                notes,
            })
        };
        Ok(vec![
            row("p50", tp50, bp50, Goal::None, Vec::new())?,
            row("p99", tp99, bp99, Goal::AtMost(GOAL_P99_MS), notes)?,
            row("max", tmax, bmax, Goal::None, Vec::new())?,
        ])
    }
}
