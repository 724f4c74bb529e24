//! Scenario: cold start. `tether run -- true` as a whole process with no daemon
//! running: without `--socket`, `--via` or `TETHER_SOCKET` the client spawns its own
//! `tether serve --exit-on-eof` (agent/src/client/connect.rs), does the handshake, runs
//! the build, closes the daemon's stdin and waits for it to exit (it removes its state
//! dir on the way out). Timed from spawn to exit of the client, n times (full 200, quick
//! 30, after a few untimed warm-up runs), against spawning `true` and waiting for it;
//! the two alternate run by run (baseline first). Reported: median and p99 per
//! repetition, median [min-max] over repetitions, with the ratio. No goal is set; this
//! is what a one-off `tether run` in a fresh container costs.
//!
//! Every run is waited for in poll(2) on a pidfd, so no polling delay is added (where
//! pidfds are missing, exits are polled every millisecond). A note gives
//! `tether --version` spawned and waited for the same way: the floor of executing the
//! binary at all (loading and linking it), which a cold start pays twice (client and
//! daemon).
//!
//! What limits each figure: two executions of the tether binary (page-cache warm after
//! the warm-up), the daemon's start-up (its runtime, the state dir, and giving back the
//! pages start-up touched), the handshake, one build (dirs, spawn, reap) and the
//! daemon's shutdown, on a shared machine whose scheduling noise dominates a p99 of a
//! few hundred samples; with n = 30 (quick) the p99 is the slowest run.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::chart::Chart;
use crate::procs::{stop, wait_timeout, Captured};
use crate::report::{num, percentile, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};

pub struct ColdStart;

/// Untimed runs of each command before the first timed one.
const WARMUP: usize = 3;
/// A cold start taking this long is a broken one.
const TIMEOUT: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits for `child` to exit, at most `timeout`, blocked in poll(2) on a pidfd so that
/// the exit is seen at once; polls every millisecond where pidfd_open is missing.
fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd < 0 {
        return wait_timeout(child, timeout);
    }
    // SAFETY: `fd` is a descriptor just opened for us and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("cannot poll a pidfd");
        }
        if r > 0 {
            return Ok(Some(child.wait().context("cannot wait for a child")?));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

/// The pids of the processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid ..."
            let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1));
            ppid.and_then(|s| s.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

/// Kills `child`'s process group and the groups of its children (the daemon a tether
/// client spawned has its own), then reaps `child`.
fn kill_tree(child: &mut Child) {
    let kids = children_of(child.id());
    let _ = stop(child, Signal::SIGKILL, true, Duration::from_secs(5));
    for k in kids {
        let _ = killpg(Pid::from_raw(k), Signal::SIGKILL);
    }
}

/// One run of `cmd` (stdin and stdout /dev/null, stderr captured, its own process
/// group) from spawn to exit; fails if it fails or outlives [`TIMEOUT`]. Returns the
/// time and the first line of its stderr, if any.
fn timed(mut cmd: Command, what: &str) -> anyhow::Result<(Duration, Option<String>)> {
    let mut stderr = Captured::new()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.stdio()?)
        .process_group(0);
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
    let status = match wait_exit(&mut child, TIMEOUT) {
        Ok(Some(st)) => st,
        other => {
            kill_tree(&mut child);
            other?;
            bail!("{what} did not finish within {TIMEOUT:?}; killed{}", stderr.suffix());
        }
    };
    let wall = t0.elapsed();
    if !status.success() {
        bail!("{what} failed ({status}){}", stderr.suffix());
    }
    let first = stderr.tail(2000).lines().next().map(str::to_owned);
    Ok((wall, first))
}

/// `tether ARGS` with the bench's TMPDIR, never reaching an existing daemon.
fn tether(ctx: &Ctx, args: &[&str]) -> Command {
    let mut cmd = ctx.tether_cmd();
    cmd.env_remove("TETHER_SOCKET").args(args);
    cmd
}

impl Scenario for ColdStart {
    fn id(&self) -> &'static str {
        "cold-start"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let n: usize = if ctx.quick { 30 } else { 200 };
        let run_true = ["run", "--", "true"];
        let what = "tether run -- true (no daemon)";
        for _ in 0..WARMUP {
            timed(Command::new("true"), "true").context("warm-up")?;
            timed(tether(ctx, &run_true), what).context("warm-up")?;
            timed(tether(ctx, &["--version"]), "tether --version").context("warm-up")?;
        }
        let (mut b50, mut b99, mut t50, mut t99) = (vec![], vec![], vec![], vec![]);
        let (mut all_b, mut all_t, mut all_v) = (vec![], vec![], vec![]);
        let mut stderr_note = None;
        for rep in 1..=ctx.reps {
            let (mut b, mut t) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for i in 0..n {
                let (d, _) =
                    timed(Command::new("true"), "true").with_context(|| format!("repetition {rep}, run {i}"))?;
                b.push(ms(d));
                let (d, err) =
                    timed(tether(ctx, &run_true), what).with_context(|| format!("repetition {rep}, run {i}"))?;
                t.push(ms(d));
                if let (None, Some(line)) = (&stderr_note, err) {
                    stderr_note = Some(format!("tether run wrote to stderr: {line}"));
                }
                // The floor of executing the binary, every 4th run (a note, not a row).
                if i % 4 == 0 {
                    let (d, _) = timed(tether(ctx, &["--version"]), "tether --version")
                        .with_context(|| format!("repetition {rep}, run {i}"))?;
                    all_v.push(ms(d));
                }
            }
            let (bp50, bp99, tp50, tp99) = (
                percentile(&b, 50.0),
                percentile(&b, 99.0),
                percentile(&t, 50.0),
                percentile(&t, 99.0),
            );
            ctx.progress(
                self.id(),
                &format!(
                    "rep {rep}/{}: spawn+wait `true` p50 {} ms p99 {} ms; cold tether run p50 {} ms p99 {} ms",
                    ctx.reps,
                    num(bp50),
                    num(bp99),
                    num(tp50),
                    num(tp99)
                ),
            );
            b50.push(bp50);
            b99.push(bp99);
            t50.push(tp50);
            t99.push(tp99);
            all_b.extend(b);
            all_t.extend(t);
        }
        let max = |v: &[f64]| v.iter().copied().fold(0f64, f64::max);
        let mut notes = vec![
            format!(
                "{n} runs per repetition, alternating with the baseline, after {WARMUP} untimed ones; \
                 slowest single run: tether {} ms, `true` {} ms",
                num(max(&all_t)),
                num(max(&all_b))
            ),
            format!(
                "`tether --version` spawned and waited for the same way (exec and link of the binary, which a \
                 cold start pays twice): p50 {} ms over {} runs",
                num(percentile(&all_v, 50.0)),
                all_v.len()
            ),
        ];
        if n < 100 {
            notes.push(format!("with {n} runs per repetition, p99 is the slowest run"));
        }
        notes.extend(stderr_note);
        let scenario = "`tether run -- true`, no daemon running (spawns its own)".to_owned();
        ctx.chart(Chart::Distribution {
            id: "cold-start-latency".into(),
            title: format!("{scenario}: spawn to exit"),
            unit: "ms".into(),
            series: vec![
                ("tether run -- true, cold".into(), all_t),
                ("spawn and wait for `true`".into(), all_b),
            ],
        });
        let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
        let base = "spawn+wait `true`".to_owned();
        Ok(vec![
            Row {
                scenario: scenario.clone(),
                metric: "median spawn to exit".into(),
                unit: "ms",
                tether: stats(t50)?,
                baseline: Some((base.clone(), stats(b50)?)),
                goal: Goal::None,
                notes: Vec::new(),
            },
            Row {
                scenario,
                metric: "p99 spawn to exit".into(),
                unit: "ms",
                tether: stats(t99)?,
                baseline: Some((base, stats(b99)?)),
                goal: Goal::None,
                notes,
            },
        ])
    }
}
