//! Scenario `steps`: the latency of one trivial build step (`true`), p50 and p99, through
//! each mechanism a Jenkins pipeline could use to run an `sh` step in a build container,
//! each next to its baseline measured in the same run (per repetition: the baseline's
//! steps, then tether's).
//!
//! 1. **Fresh client per step** (`tether run --socket SOCK -- true` against a socket
//!    daemon on the host), from spawning the client to its exit: what an `sh` step
//!    through tether costs, the client's own exec included. Baseline: spawning `true`
//!    and waiting for it, the floor every mechanism pays (one fork and exec).
//! 2. **Into a container**: `runc exec ID true` into a running runc container whose
//!    PID 1 is `cat` (busybox rootfs), the container runtime's floor and what
//!    `kubectl exec` builds on, against `tether run --socket HOSTDIR/tether.sock -- true`
//!    on the host, reaching the static tether running as PID 1 of the same kind of
//!    container through a socket on a bind-mounted host directory (a pod's shared
//!    volume). Needs root, runc, a static busybox and `scripts/build-static`'s binary;
//!    skipped (with the reason in a note) without them.
//! 3. **Over ssh** to a private OpenSSH server on 127.0.0.1 started by the bench (its own
//!    host key, client key and config; skipped without sshd or ssh, or when it cannot
//!    start): `ssh host true` per step (baseline), against `tether run --via 'ssh host
//!    tether serve --exit-on-eof' -- true` per step, and against steps run one after
//!    another over ONE kept `ssh host tether serve` session (the bench's in-process
//!    client: from writing Run to decoding Exited).
//! 4. **A file-polling keep-alive loop** like the one Jenkins' "active containers" mode
//!    uses (written here from its description): a `sh` loop that looks for a script file
//!    every second, runs it with its output redirected to files and writes its exit
//!    status to a file; a step writes the script atomically, polls for the status file
//!    every 10 ms, reads the three files and removes them. Against tether's fresh client
//!    per step (mechanism 1, from the same repetition). Far fewer steps: each one waits
//!    for the loop's next turn.
//!
//! Goal rows: tether into a container at least 20x faster than `runc exec`, and tether
//! over a kept ssh session at least 20x faster than ssh per step with a p50 of at most
//! 2 ms. Ratios in this harness are tether over baseline, so the speed-ups are rows of
//! step rates at p50 (1000 / p50 latency, steps per second), whose ratio is the
//! baseline's p50 over tether's.
//!
//! Limits: every latency is wall time on a machine that may be busy, timed by the bench
//! (its own spawn and reaping included, the same for baseline and tether). Batches of
//! `runc exec`, ssh and `--via ssh` steps stop early (at 20 steps in full mode, 3 in
//! quick mode) once they ran for 30 s (quick: 1.5 s), so that a slow login keeps the run
//! bounded; the rows say how many steps each repetition had, and the p99 of a few steps
//! is their maximum. The ssh server runs on loopback, so no network latency is in its
//! figures (a real one adds round trips per connection, so per step, to ssh and to
//! `--via ssh`, and none per step to the kept session); sshd runs every command through
//! the user's login shell, whose startup files are in every ssh figure (a note says how
//! long that shell takes here). The kept session's figure has no client process exec per
//! step (a pipeline that keeps a tether session open has none), so it is a lower bound
//! for a client-per-step pipeline. Steps to the polling loop run back to back, so each
//! one waits almost a whole polling period (a step that arrives at a random moment waits
//! half of one on average).

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use integration_tests::container::{runc_skip_reason, Bundle, STATE_DIR, TETHER_PATH};
use integration_tests::shell_quote;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use tether_protocol::{EndCause, ExitStatus as BuildStatus};

use crate::chart::Chart;
use crate::container_figures::{guarded, static_tether};
use crate::procs::{on_path, run_timed, stop, wait_timeout, Captured};
use crate::report::{num, percentile, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::session::{argv_spec, Session};
use crate::socket_daemon::SocketDaemon;

pub struct Steps;

const ID: &str = "steps";
/// Steps per repetition (full, quick): tether's mechanisms and spawn+wait...
const FAST_STEPS: (usize, usize) = (1000, 50);
/// ... `runc exec`, ssh per step and `tether run --via ssh`: this many, or fewer (but
/// at least `SLOW_MIN`) once a batch ran for `SLOW_BUDGET` (an ssh login can take a
/// quarter of a second on a busy machine, more with a slow login shell) ...
const SLOW_STEPS: (usize, usize) = (200, 20);
const SLOW_MIN: (usize, usize) = (20, 3);
const SLOW_BUDGET: (Duration, Duration) = (Duration::from_secs(30), Duration::from_millis(1500));
/// ... and the file-polling loop (about a second each).
const POLL_STEPS: (usize, usize) = (20, 3);
/// How long one step may take before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long anything may take to come up (a daemon, a container, sshd).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The polling loop's period, and how often the bench looks for a step's status file.
const LOOP_PERIOD_S: u32 = 1;
const STATUS_POLL: Duration = Duration::from_millis(10);
/// tether at least this many times faster than `runc exec`, and than ssh per step.
const SPEEDUP_GOAL: f64 = 20.0;
/// tether's p50 per step over a kept ssh session, at most (ms).
const KEPT_P50_GOAL_MS: f64 = 2.0;
/// `scripts/build-static`'s target.
const SSHD: &str = "/usr/sbin/sshd";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------
// Timing one step
// ---------------------------------------------------------------------------------------

/// Waits for `child` until `deadline`; `None` if it still runs then. Sleeps on a pidfd
/// (readable once the child exits), so the measured time has no polling slack; where
/// pidfds are missing, falls back to [`wait_timeout`] (1 ms polling).
fn wait_deadline(child: &mut Child, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
    let pid = libc::pid_t::try_from(child.id()).context("a child pid out of range")?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if raw < 0 {
        return wait_timeout(child, deadline.saturating_duration_since(Instant::now()));
    }
    let raw = RawFd::try_from(raw).context("pidfd_open returned an out-of-range descriptor")?;
    // SAFETY: `raw` is a new descriptor nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return child.try_wait().context("cannot wait for a child");
        }
        let wait_ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(wait_ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => return child.wait().map(Some).context("cannot wait for a child"),
            Err(e) => return Err(anyhow!(e).context("cannot poll a pidfd")),
        }
    }
}

/// Runs one step's command (stdin as the caller set it, stdout /dev/null, stderr into
/// `stderr`, in its own process group) and returns its latency in ms: from just before
/// the spawn to its exit reaped. Fails if it fails or outlives
/// [`STEP_TIMEOUT`] (its group is killed then).
pub(crate) fn time_command(mut cmd: Command, what: &str, stderr: &mut Captured) -> anyhow::Result<f64> {
    cmd.stdout(Stdio::null()).stderr(stderr.stdio()?).process_group(0);
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
    let status = wait_deadline(&mut child, t0 + STEP_TIMEOUT);
    let took = t0.elapsed();
    let status = match status {
        Ok(Some(st)) => st,
        Ok(None) => {
            let _ = stop(&mut child, Signal::SIGKILL, true, Duration::from_secs(5));
            bail!(
                "{what} did not finish within {STEP_TIMEOUT:?}; killed{}",
                stderr.suffix()
            )
        }
        Err(e) => {
            let _ = stop(&mut child, Signal::SIGKILL, true, Duration::from_secs(5));
            return Err(e.context(format!("waiting for {what}")));
        }
    };
    if !status.success() {
        bail!("{what} failed ({status}){}", stderr.suffix());
    }
    Ok(ms(took))
}

/// How many steps a batch runs: `n`, or fewer (at least `min`) once `budget` is spent.
#[derive(Clone, Copy)]
pub(crate) struct Count {
    pub(crate) n: usize,
    pub(crate) min: usize,
    pub(crate) budget: Option<Duration>,
}

impl Count {
    pub(crate) fn exact(n: usize) -> Count {
        Count {
            n,
            min: n,
            budget: None,
        }
    }
}

/// Steps, each a fresh command from `make` (stdin /dev/null); their latencies in ms.
pub(crate) fn batch(count: Count, what: &str, mut make: impl FnMut() -> Command) -> anyhow::Result<Vec<f64>> {
    let mut stderr = Captured::new()?;
    let t0 = Instant::now();
    let mut lat = Vec::with_capacity(count.n);
    for i in 1..=count.n {
        if i > count.min && count.budget.is_some_and(|b| t0.elapsed() >= b) {
            break;
        }
        let mut cmd = make();
        cmd.stdin(Stdio::null());
        lat.push(time_command(cmd, what, &mut stderr).with_context(|| format!("step {i}/{}: {what}", count.n))?);
    }
    Ok(lat)
}

// ---------------------------------------------------------------------------------------
// What a mechanism measured, and its rows
// ---------------------------------------------------------------------------------------

/// The per-step latencies (ms) of one mechanism, one list per repetition.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) reps: Vec<Vec<f64>>,
}

impl Series {
    pub(crate) fn new(name: impl Into<String>) -> Series {
        Series {
            name: name.into(),
            reps: Vec::new(),
        }
    }

    /// The `p`-th percentile of each repetition.
    fn pct(&self, p: f64) -> Vec<f64> {
        self.reps.iter().map(|r| percentile(r, p)).collect()
    }

    /// Steps per second at each repetition's p50.
    fn rate(&self) -> Vec<f64> {
        self.pct(50.0).into_iter().map(|p| 1000.0 / p).collect()
    }

    fn all(&self) -> Vec<f64> {
        self.reps.concat()
    }

    /// Steps per repetition ("20", or "5-7" when batches stopped at their time budget).
    fn per_rep(&self) -> String {
        let lo = self.reps.iter().map(Vec::len).min().unwrap_or(0);
        let hi = self.reps.iter().map(Vec::len).max().unwrap_or(0);
        if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo}-{hi}")
        }
    }

    /// "p50 X ms p99 Y ms" of the last repetition, for progress lines.
    pub(crate) fn last(&self) -> String {
        match self.reps.last() {
            Some(r) => format!(
                "{} (n={}) p50 {} ms p99 {} ms",
                self.name,
                r.len(),
                num(percentile(r, 50.0)),
                num(percentile(r, 99.0))
            ),
            None => format!("{}: nothing measured", self.name),
        }
    }
}

fn stats(v: Vec<f64>) -> anyhow::Result<Stats> {
    Stats::of(v).context("no repetitions")
}

/// p50 and p99 latency rows (per repetition, then median [min-max] over them); `notes`
/// go on the first.
pub(crate) fn latency_rows(
    scenario: &str,
    tether: &Series,
    base: &Series,
    p50_goal: Goal,
    notes: Vec<String>,
) -> anyhow::Result<Vec<Row>> {
    let baseline = |p: f64| -> anyhow::Result<Option<(String, Stats)>> {
        Ok(Some((
            format!("{}, n={}/rep", base.name, base.per_rep()),
            stats(base.pct(p))?,
        )))
    };
    Ok(vec![
        Row {
            scenario: scenario.to_owned(),
            metric: "p50 latency".into(),
            unit: "ms",
            tether: stats(tether.pct(50.0))?,
            baseline: baseline(50.0)?,
            goal: p50_goal,
            notes,
        },
        Row {
            scenario: scenario.to_owned(),
            metric: "p99 latency".into(),
            unit: "ms",
            tether: stats(tether.pct(99.0))?,
            baseline: baseline(99.0)?,
            goal: Goal::None,
            notes: Vec::new(),
        },
    ])
}

/// The speed-up row: step rates at p50 (1000 / p50), so that the ratio (tether over the
/// baseline, per repetition) is the baseline's p50 over tether's.
pub(crate) fn speedup_row(scenario: &str, tether: &Series, base: &Series) -> anyhow::Result<Row> {
    Ok(Row {
        scenario: scenario.to_owned(),
        metric: format!("steps/s at p50 (ratio = {} p50 / tether p50)", base.name),
        unit: "steps/s",
        tether: stats(tether.rate())?,
        baseline: Some((base.name.clone(), stats(base.rate())?)),
        goal: Goal::RatioAtLeast(SPEEDUP_GOAL),
        notes: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------
// 4. The file-polling loop
// ---------------------------------------------------------------------------------------

/// The "container" side: every period, run a script that appeared in the directory,
/// output to files, exit status to a file (written aside, then renamed into place).
const POLL_LOOP: &str = r#"d=$1
period=$2
while :; do
  if [ -f "$d/step.sh" ]; then
    mv "$d/step.sh" "$d/running.sh"
    sh "$d/running.sh" >"$d/out" 2>"$d/err"
    echo "$?" >"$d/status.new"
    mv "$d/status.new" "$d/status"
  fi
  sleep "$period"
done
"#;

/// The polling loop, a `sh` process in its own group, killed (group and all) on drop.
struct PollLoop {
    child: Child,
    dir: PathBuf,
    stderr: Captured,
}

impl PollLoop {
    fn start(dir: PathBuf) -> anyhow::Result<PollLoop> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let stderr = Captured::new()?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(POLL_LOOP)
            .arg("sh")
            .arg(&dir)
            .arg(LOOP_PERIOD_S.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr.stdio()?)
            .process_group(0)
            .spawn()
            .context("cannot start the polling loop (sh)")?;
        Ok(PollLoop { child, dir, stderr })
    }

    /// One step: the script in place atomically, its status polled for, the results
    /// read and removed. Its latency in ms.
    fn step(&mut self, script: &str) -> anyhow::Result<f64> {
        let (tmp, target) = (self.dir.join("step.tmp"), self.dir.join("step.sh"));
        let status = self.dir.join("status");
        let t0 = Instant::now();
        std::fs::write(&tmp, script).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &target).with_context(|| format!("cannot rename {}", tmp.display()))?;
        let deadline = t0 + STEP_TIMEOUT;
        while !status.exists() {
            if let Some(st) = self.child.try_wait().context("cannot wait for the polling loop")? {
                bail!("the polling loop exited ({st}){}", self.stderr.suffix());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no status file within {STEP_TIMEOUT:?} of writing the script{}",
                    self.stderr.suffix()
                );
            }
            std::thread::sleep(STATUS_POLL);
        }
        let read = |name: &str| {
            let p = self.dir.join(name);
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        let (out, err, code) = (read("out")?, read("err")?, read("status")?);
        for name in ["out", "err", "status", "running.sh"] {
            let p = self.dir.join(name);
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
        let took = ms(t0.elapsed());
        if code.trim() != "0" || !out.is_empty() || !err.is_empty() {
            bail!("the step ended with status {code:?}, stdout {out:?}, stderr {err:?}");
        }
        Ok(took)
    }
}

impl Drop for PollLoop {
    fn drop(&mut self) {
        let _ = stop(&mut self.child, Signal::SIGKILL, true, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// 2. runc containers
// ---------------------------------------------------------------------------------------

/// A container run in the foreground (`runc run`) as a child of the bench. Dropped, it
/// is killed (`runc kill KILL`, then its `runc run`), and its bundle drops after that
/// (`runc delete -f`, the directory removed).
struct Container {
    child: Child,
    /// Its PID 1's stdin, when kept open (`cat` waits on it).
    stdin: Option<ChildStdin>,
    stderr: Captured,
    bundle: Bundle,
    what: &'static str,
}

impl Container {
    fn start(bundle: Bundle, keep_stdin: bool, what: &'static str) -> anyhow::Result<Container> {
        let stderr = Captured::new()?;
        let mut cmd = bundle.run_command();
        cmd.stdin(if keep_stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::null())
            .stderr(stderr.stdio()?)
            .process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("cannot start runc run ({what})"))?;
        let stdin = child.stdin.take();
        Ok(Container {
            child,
            stdin,
            stderr,
            bundle,
            what,
        })
    }

    /// Fails (with what runc said) if `runc run` has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait().context("cannot wait for runc run")? {
            bail!("the container ({}) exited ({st}){}", self.what, self.stderr.suffix());
        }
        Ok(())
    }

    /// `runc state`'s status field (`None` when runc knows no such container).
    fn runc_status(&self) -> anyhow::Result<Option<String>> {
        let out = Captured::new()?;
        let mut cmd = self.bundle.runc();
        cmd.arg("state")
            .arg(self.bundle.id())
            .stdin(Stdio::null())
            .stdout(out.stdio()?)
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = cmd.spawn().context("cannot run runc state")?;
        let Some(st) = wait_timeout(&mut child, Duration::from_secs(10))? else {
            let _ = stop(&mut child, Signal::SIGKILL, true, Duration::from_secs(5));
            bail!("runc state still runs after 10 s; killed");
        };
        if !st.success() {
            return Ok(None);
        }
        let mut out = out;
        let text = out.tail(1 << 20);
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("runc state printed {text:?}"))?;
        Ok(v["status"].as_str().map(str::to_owned))
    }

    /// Waits until runc says the container is running.
    fn wait_running(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_running()?;
            if self.runc_status()?.as_deref() == Some("running") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the container ({}) is not running after {START_TIMEOUT:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the container: closes its PID 1's stdin, or sends it `signal` (`runc kill`);
    /// then a clean exit within 10 s.
    fn stop(mut self, signal: Option<&str>) -> anyhow::Result<()> {
        drop(self.stdin.take());
        if let Some(sig) = signal {
            let mut cmd = self.bundle.runc();
            cmd.arg("kill").arg(self.bundle.id()).arg(sig);
            run_timed(cmd, "runc kill", Duration::from_secs(10))?;
        }
        match wait_timeout(&mut self.child, Duration::from_secs(10))? {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!("the container ({}) ended with {st}{}", self.what, self.stderr.suffix()),
            None => bail!(
                "the container ({}) still runs 10 s after it was told to stop",
                self.what
            ),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let mut cmd = self.bundle.runc();
            cmd.arg("kill").arg(self.bundle.id()).arg("KILL");
            let _ = run_timed(cmd, "runc kill", Duration::from_secs(10));
            let _ = stop(&mut self.child, Signal::SIGKILL, true, Duration::from_secs(5));
        }
    }
}

/// A running container whose PID 1 is busybox `cat`.
fn cat_container() -> anyhow::Result<Container> {
    let bundle = guarded("laying out a bundle", || {
        Ok(Bundle::builder().without_tether().args(["/busybox/cat"]).build())
    })?;
    let mut c = Container::start(bundle, true, "cat as PID 1")?;
    c.wait_running()?;
    Ok(c)
}

/// A running container whose PID 1 is the static tether serving on
/// `/shared/tether.sock`, `/shared` being the host's `shared`; waits until the socket
/// accepts connections.
fn tether_container(static_bin: &Path, shared: &Path) -> anyhow::Result<Container> {
    let bundle = guarded("laying out a bundle", || {
        let args = [
            TETHER_PATH,
            "serve",
            "--socket",
            "/shared/tether.sock",
            "--state-dir",
            STATE_DIR,
            "--log-level",
            "warn",
        ];
        Ok(Bundle::builder()
            .without_tether()
            .args(args)
            .bind_mount(shared, "/shared")
            .build())
    })?;
    let dst = bundle.rootfs().join(TETHER_PATH.trim_start_matches('/'));
    std::fs::copy(static_bin, &dst).with_context(|| format!("cannot copy {} into the rootfs", static_bin.display()))?;
    let mut c = Container::start(bundle, false, "tether as PID 1")?;
    let sock = shared.join("tether.sock");
    let deadline = Instant::now() + START_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        c.check_running()?;
        if Instant::now() >= deadline {
            bail!(
                "tether in the container: {} never answered{}",
                sock.display(),
                c.stderr.suffix()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(c)
}

/// Mechanism 2: `runc exec` into a `cat` container, and tether as PID 1 of another.
fn containers(ctx: &Ctx, n_fast: usize, slow: Count) -> anyhow::Result<(Series, Series)> {
    let static_bin = static_tether();
    let shared = ctx.tmpdir.join("steps-shared");
    std::fs::create_dir_all(&shared).with_context(|| format!("cannot create {}", shared.display()))?;
    let cat = cat_container().context("starting the runc container with cat as PID 1")?;
    let teth = tether_container(&static_bin, &shared).context("starting the runc container with tether as PID 1")?;
    let sock = shared.join("tether.sock");
    let exec = || {
        let mut cmd = cat.bundle.runc();
        cmd.arg("exec").arg(cat.bundle.id()).arg("true");
        cmd
    };
    let client = || {
        let mut cmd = ctx.tether_cmd();
        cmd.arg("run").arg("--socket").arg(&sock).args(["--", "true"]);
        cmd
    };
    // One untimed step each: first use of the runtime's and the daemon's paths.
    batch(Count::exact(1), "warm-up: runc exec", exec)?;
    batch(Count::exact(1), "warm-up: tether run into the container", client)?;
    let mut runc = Series::new("runc exec");
    let mut tether = Series::new("tether run into the container");
    for rep in 1..=ctx.reps {
        runc.reps
            .push(batch(slow, "runc exec ID true", exec).with_context(|| format!("repetition {rep}"))?);
        tether.reps.push(
            batch(
                Count::exact(n_fast),
                "tether run --socket SHARED/tether.sock -- true",
                client,
            )
            .with_context(|| format!("repetition {rep}"))?,
        );
        ctx.progress(
            ID,
            &format!("container rep {rep}/{}: {}; {}", ctx.reps, runc.last(), tether.last()),
        );
    }
    cat.stop(None)?;
    teth.stop(Some("TERM"))?;
    Ok((tether, runc))
}

// ---------------------------------------------------------------------------------------
// 3. ssh
// ---------------------------------------------------------------------------------------

/// A private sshd on 127.0.0.1, killed (and its directory removed) on drop.
struct Sshd {
    child: Child,
    stderr: Captured,
    dir: PathBuf,
    port: u16,
    user: String,
    /// The user's home and login shell (sshd runs every command with `SHELL -c`).
    home: PathBuf,
    shell: PathBuf,
    key: PathBuf,
}

/// A port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr().context("cannot read a bound port")?.port())
}

impl Sshd {
    /// Starts one, or says why it cannot (`Ok(Err(reason))`: the ssh part is skipped).
    fn start(ctx: &Ctx) -> anyhow::Result<Result<Sshd, String>> {
        if !Path::new(SSHD).is_file() {
            return Ok(Err(format!("{SSHD} is missing (Debian package openssh-server)")));
        }
        for tool in ["ssh", "ssh-keygen"] {
            if !on_path(tool) {
                return Ok(Err(format!("no {tool} on PATH (Debian package openssh-client)")));
            }
        }
        let euid = nix::unistd::geteuid();
        let (user, home, shell) = match nix::unistd::User::from_uid(euid) {
            Ok(Some(u)) => (u.name, u.dir, u.shell),
            _ => return Ok(Err(format!("uid {euid} has no user name to log in as"))),
        };
        // sshd's privilege separation dir, needed when it runs as root.
        let privsep = Path::new("/run/sshd");
        if euid.is_root() && !privsep.is_dir() {
            if let Err(e) = std::fs::create_dir_all(privsep) {
                return Ok(Err(format!("cannot create {}: {e}", privsep.display())));
            }
        }
        let dir = ctx.tmpdir.join("steps-sshd");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let (host_key, key) = (dir.join("host_key"), dir.join("client_key"));
        for k in [&host_key, &key] {
            let mut cmd = Command::new("ssh-keygen");
            cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", "tether-bench", "-f"])
                .arg(k);
            if let Err(e) = run_timed(cmd, "ssh-keygen", START_TIMEOUT) {
                return Ok(Err(format!("{e:#}")));
            }
        }
        let public = std::fs::read(dir.join("client_key.pub")).context("cannot read the client's public key")?;
        let authorized = dir.join("authorized_keys");
        std::fs::write(&authorized, public).with_context(|| format!("cannot write {}", authorized.display()))?;
        let mut why = String::new();
        for _attempt in 0..3 {
            let port = free_port()?;
            let config = dir.join("sshd_config");
            let text = format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {host}\nPidFile {pid}\n\
                 AuthorizedKeysFile {auth}\nStrictModes no\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 X11Forwarding no\nPrintMotd no\nUseDNS no\nLogLevel INFO\n",
                host = host_key.display(),
                pid = dir.join("sshd.pid").display(),
                auth = authorized.display(),
            );
            std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
            let stderr = Captured::new()?;
            let child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr.stdio()?)
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start {SSHD}"))?;
            let mut sshd = Sshd {
                child,
                stderr,
                dir: dir.clone(),
                port,
                user: user.clone(),
                home: home.clone(),
                shell: shell.clone(),
                key: key.clone(),
            };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                // Its log says when it listens (a probing connection that does not log in
                // could count against the address in newer sshds' PerSourcePenalties).
                if sshd.stderr.tail(64 * 1024).contains("Server listening on") {
                    // The first login: checks keys and config (and warms sshd up).
                    return Ok(
                        match batch(Count::exact(1), "ssh 127.0.0.1 true", || sshd.command("true")) {
                            Ok(_) => Ok(sshd),
                            Err(e) => Err(format!("{e:#}; sshd's log: {}", sshd.stderr.tail(2000))),
                        },
                    );
                }
                if let Some(st) = sshd.child.try_wait().context("cannot wait for sshd")? {
                    why = format!("sshd exited ({st}): {}", sshd.stderr.tail(2000));
                    // Not dropped as a whole: the next attempt reuses the directory.
                    sshd.dir = PathBuf::new();
                    break;
                }
                if Instant::now() >= deadline {
                    return Ok(Err(format!(
                        "sshd did not listen on port {port} within {START_TIMEOUT:?}: {}",
                        sshd.stderr.tail(2000)
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Err(why))
    }

    fn ssh_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["-F".into(), "/dev/null".into(), "-i".into()];
        a.push(self.key.display().to_string());
        a.extend(["-p".into(), self.port.to_string()]);
        for o in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
        ] {
            a.extend(["-o".into(), o.into()]);
        }
        a.push(format!("{}@127.0.0.1", self.user));
        a
    }

    /// `ssh ... USER@127.0.0.1 REMOTE` (REMOTE is one string for the remote shell).
    fn command(&self, remote: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_args()).arg(remote);
        cmd
    }

    /// The same as a `--via` command line (run with `sh -c`).
    fn via(&self, remote: &str) -> String {
        let mut words = vec!["exec".to_owned(), "ssh".to_owned()];
        words.extend(self.ssh_args().iter().map(|a| shell_quote(a.as_ref())));
        words.push(shell_quote(remote.as_ref()));
        words.join(" ")
    }
}

impl Sshd {
    /// How long the login shell takes to run `true` started as sshd starts it (SSH_CLIENT
    /// set, no SHLVL: bash then reads ~/.bashrc), one run (ms). Part of every ssh step.
    fn login_shell_ms(&self) -> anyhow::Result<f64> {
        let runs = batch(Count::exact(1), "the login shell", || {
            let mut cmd = Command::new(&self.shell);
            cmd.args(["-c", "true"])
                .env("SSH_CLIENT", "127.0.0.1 50000 22")
                .env("HOME", &self.home)
                .env_remove("SHLVL");
            cmd
        })?;
        runs.first().copied().context("the login shell did not run")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = stop(&mut self.child, Signal::SIGTERM, true, Duration::from_secs(5));
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Instance dirs that daemons which stopped left in `state` (each removes its own on
/// exit), after giving the last ones 2 s to finish exiting.
fn leftovers(state: &Path) -> usize {
    let count = || std::fs::read_dir(state.join("instances")).map_or(0, |d| d.count());
    let deadline = Instant::now() + Duration::from_secs(2);
    while count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    count()
}

/// What the ssh part measured.
struct SshSeries {
    /// tether over one kept ssh session.
    kept: Series,
    /// `tether run --via ssh` per step.
    per_step: Series,
    /// The baseline: `ssh host true` per step.
    ssh: Series,
    notes: Vec<String>,
}

/// Mechanism 3: ssh per step, `tether run --via ssh` per step, tether over one kept ssh
/// session. `Ok(Err(reason))` when there is no usable sshd.
fn over_ssh(ctx: &Ctx, n_fast: usize, slow: Count) -> anyhow::Result<Result<SshSeries, String>> {
    let sshd = match Sshd::start(ctx)? {
        Ok(s) => s,
        Err(why) => return Ok(Err(why)),
    };
    let tether =
        std::fs::canonicalize(&ctx.tether).with_context(|| format!("cannot resolve {}", ctx.tether.display()))?;
    let state = ctx.tmpdir.join("steps-ssh-state");
    let remote = format!(
        "exec {} serve --exit-on-eof --log-level warn --state-dir {}",
        shell_quote(tether.as_os_str()),
        shell_quote(state.as_os_str())
    );
    let via = sshd.via(&remote);
    let ssh_true = || sshd.command("true");
    let via_true = || {
        let mut cmd = ctx.tether_cmd();
        cmd.arg("run").arg("--via").arg(&via).args(["--", "true"]);
        cmd
    };
    batch(Count::exact(1), "warm-up: tether run --via ssh", via_true)?;
    let mut ssh = Series::new("ssh per step");
    let mut per_step = Series::new("tether run --via ssh per step");
    let mut kept = Series::new("tether, one kept ssh session");
    for rep in 1..=ctx.reps {
        let r = |e: anyhow::Error| e.context(format!("repetition {rep}"));
        ssh.reps.push(batch(slow, "ssh 127.0.0.1 true", ssh_true).map_err(r)?);
        per_step
            .reps
            .push(batch(slow, "tether run --via 'ssh 127.0.0.1 tether serve' -- true", via_true).map_err(r)?);
        kept.reps.push(kept_session(&sshd, &remote, n_fast).map_err(r)?);
        ctx.progress(
            ID,
            &format!(
                "ssh rep {rep}/{}: {}; {}; {}",
                ctx.reps,
                ssh.last(),
                per_step.last(),
                kept.last()
            ),
        );
    }
    let mut notes = vec![format!(
        "sshd runs every command with {}'s login shell {}, which starts (as sshd starts it) in {} ms here: \
         in every ssh and --via ssh step, in none of the kept session's",
        sshd.user,
        sshd.shell.display(),
        num(sshd.login_shell_ms()?)
    )];
    let left = leftovers(&state);
    if left > 0 {
        notes.push(format!(
            "daemons started over ssh left {left} instance dirs in {}",
            state.display()
        ));
    }
    drop(sshd);
    Ok(Ok(SshSeries {
        kept,
        per_step,
        ssh,
        notes,
    }))
}

/// `n` builds of `true`, one after another over one `ssh host tether serve` session
/// opened for them (untimed; a session idle longer than the daemon's heartbeat timeout
/// would be dropped, so it is not kept across the other batches); each from writing Run
/// to decoding Exited (ms).
fn kept_session(sshd: &Sshd, remote: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut s = Session::spawn_command(sshd.command(remote), "ssh 127.0.0.1 tether serve")?;
    s.handshake(START_TIMEOUT).context("opening a session over ssh")?;
    let mut lat = Vec::with_capacity(n);
    for i in 1..=n {
        let r = s
            .run_build(i as u64, argv_spec(&["true"]), STEP_TIMEOUT)
            .with_context(|| format!("build {i}/{n} over the kept ssh session"))?;
        if r.exited.status != BuildStatus::Code(0) || r.exited.cause != EndCause::Completed {
            bail!(
                "build {i}/{n}: `true` ended {:?} ({:?})",
                r.exited.status,
                r.exited.cause
            );
        }
        lat.push(ms(r.latency));
    }
    let log = s.stderr();
    let st = s.close(Duration::from_secs(10))?;
    if !st.success() {
        bail!("ssh ... tether serve exited with {st} after its stdin closed: {log}");
    }
    Ok(lat)
}

// ---------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------

impl Scenario for Steps {
    fn id(&self) -> &'static str {
        ID
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let pick = |(full, quick)| if ctx.quick { quick } else { full };
        let (n_fast, n_poll) = (pick(FAST_STEPS), pick(POLL_STEPS));
        let slow = Count {
            n: pick(SLOW_STEPS),
            min: pick(SLOW_MIN),
            budget: Some(if ctx.quick { SLOW_BUDGET.1 } else { SLOW_BUDGET.0 }),
        };

        // 1 and 4: on the host, one socket daemon and one polling loop for all repetitions.
        let part = Instant::now();
        let daemon = SocketDaemon::start(ctx, "steps-daemon", &[])?;
        let mut poller = PollLoop::start(ctx.tmpdir.join("steps-poll"))?;
        let client = || {
            let mut cmd = daemon.client(ctx, "run");
            cmd.args(["--", "true"]);
            cmd
        };
        batch(Count::exact(1), "warm-up: tether run --socket", client)?;
        let mut spawn = Series::new("spawn+wait `true`");
        let mut polled = Series::new(format!("file-polling loop ({LOOP_PERIOD_S} s)"));
        let mut socket = Series::new("tether run --socket per step");
        for rep in 1..=ctx.reps {
            let r = |e: anyhow::Error| e.context(format!("repetition {rep}"));
            spawn
                .reps
                .push(batch(Count::exact(n_fast), "true", || Command::new("true")).map_err(r)?);
            let steps: anyhow::Result<Vec<f64>> = (1..=n_poll)
                .map(|i| {
                    poller
                        .step("true\n")
                        .with_context(|| format!("polling-loop step {i}/{n_poll}"))
                })
                .collect();
            polled.reps.push(steps.map_err(r)?);
            socket
                .reps
                .push(batch(Count::exact(n_fast), "tether run --socket SOCK -- true", client).map_err(r)?);
            ctx.progress(
                ID,
                &format!(
                    "host rep {rep}/{}: {}; {}; {}",
                    ctx.reps,
                    spawn.last(),
                    polled.last(),
                    socket.last()
                ),
            );
        }
        drop(poller);
        daemon.stop()?;
        ctx.progress(ID, &format!("host part done in {:.1} s", part.elapsed().as_secs_f64()));

        let mut host_notes = vec![format!(
            "a step: from spawning its command to its exit reaped (stdin, stdout /dev/null); tether: a fresh \
             `tether run --socket SOCK -- true` client per step against a host daemon (client exec, connect, \
             handshake, Run, the daemon's spawn of `true`, Exited); per repetition the baseline's steps, then \
             tether's; p50/p99 per repetition, median [min-max] over {} repetitions",
            ctx.reps
        )];

        // 2: containers.
        let skip = match runc_skip_reason() {
            Some(why) => Some(why.to_owned()),
            None if !static_tether().is_file() => Some(format!(
                "{} is missing (scripts/build-static)",
                static_tether().display()
            )),
            None => None,
        };
        let containers = match skip {
            Some(why) => {
                ctx.progress(ID, &format!("runc containers skipped: {why}"));
                host_notes.push(format!("runc exec vs tether into a container skipped: {why}"));
                None
            }
            None => {
                let part = Instant::now();
                let c = containers(ctx, n_fast, slow)?;
                ctx.progress(
                    ID,
                    &format!("container part done in {:.1} s", part.elapsed().as_secs_f64()),
                );
                Some(c)
            }
        };

        // 3: ssh.
        let part = Instant::now();
        let ssh = match over_ssh(ctx, n_fast, slow)? {
            Ok(s) => {
                ctx.progress(ID, &format!("ssh part done in {:.1} s", part.elapsed().as_secs_f64()));
                Some(s)
            }
            Err(why) => {
                ctx.progress(ID, &format!("ssh skipped: {why}"));
                host_notes.push(format!("ssh mechanisms skipped: {why}"));
                None
            }
        };

        // Rows: tether next to its baseline.
        let mut rows = latency_rows(
            &format!("step: tether client per step (n={})", socket.per_rep()),
            &socket,
            &spawn,
            Goal::None,
            host_notes,
        )?;
        if let Some((tether, runc)) = &containers {
            let scenario = format!(
                "step into runc container: tether client per step (n={})",
                tether.per_rep()
            );
            rows.extend(latency_rows(
                &scenario,
                tether,
                runc,
                Goal::None,
                vec![format!(
                    "tether: the static binary as PID 1 of a runc container (busybox rootfs) serving on \
                     /shared/tether.sock, /shared a bind-mounted host dir (a pod's shared volume); a fresh host \
                     client `tether run --socket HOSTDIR/tether.sock -- true` per step. Baseline: `runc exec ID \
                     true` into a running container whose PID 1 is busybox cat (the runtime's floor, under \
                     kubectl exec). Goal: tether >= {SPEEDUP_GOAL}x faster at p50 (the steps/s row)"
                )],
            )?);
            rows.push(speedup_row(&scenario, tether, runc)?);
        }
        if let Some(s) = &ssh {
            let mut notes = vec![
                "a private sshd on 127.0.0.1 (loopback: no network round trips), ed25519 keys; baseline: \
                 `ssh host true` per step; tether: `tether run --via 'ssh host tether serve --exit-on-eof' -- \
                 true` per step (a daemon started per step over its own ssh connection)"
                    .to_owned(),
            ];
            notes.extend(s.notes.iter().cloned());
            rows.extend(latency_rows(
                &format!("step over ssh: tether run --via ssh (n={})", s.per_step.per_rep()),
                &s.per_step,
                &s.ssh,
                Goal::None,
                notes,
            )?);
            let scenario = format!("step over ssh: tether, one kept session (n={})", s.kept.per_rep());
            rows.extend(latency_rows(
                &scenario,
                &s.kept,
                &s.ssh,
                Goal::AtMost(KEPT_P50_GOAL_MS),
                vec![format!(
                    "one `ssh host tether serve --exit-on-eof` session per repetition (its setup untimed); builds one after \
                     another by the bench's in-process client, each from writing Run to decoding Exited (no client \
                     exec per step). Goals: p50 <= {KEPT_P50_GOAL_MS} ms, and >= {SPEEDUP_GOAL}x ssh per step at \
                     p50 (the steps/s row)"
                )],
            )?);
            rows.push(speedup_row(&scenario, &s.kept, &s.ssh)?);
        }
        rows.extend(latency_rows(
            &format!("step: tether client per step (n={})", socket.per_rep()),
            &socket,
            &polled,
            Goal::None,
            vec![format!(
                "baseline: a `sh` loop looks for a script file every {LOOP_PERIOD_S} s, runs it with stdout/stderr \
                 to files and writes its exit status to a file; a step writes the script (temp + rename), polls \
                 for the status file every {} ms, reads out/err/status and removes them. Only {n_poll} steps per \
                 repetition (each waits for the loop's next turn), back to back, so each waits almost a whole \
                 period. tether: the client-per-step steps of the first rows (same repetitions)",
                STATUS_POLL.as_millis()
            )],
        )?);

        // The chart: every step of every mechanism, tether's first.
        let mut chart: Vec<&Series> = Vec::new();
        if let Some(s) = &ssh {
            chart.push(&s.kept);
        }
        chart.push(&socket);
        if let Some((tether, _)) = &containers {
            chart.push(tether);
        }
        if let Some(s) = &ssh {
            chart.push(&s.per_step);
        }
        chart.push(&spawn);
        if let Some((_, runc)) = &containers {
            chart.push(runc);
        }
        if let Some(s) = &ssh {
            chart.push(&s.ssh);
        }
        chart.push(&polled);
        ctx.chart(Chart::Distribution {
            id: "steps-latency".into(),
            title: "one `true` step, per mechanism".into(),
            unit: "ms".into(),
            series: chart.into_iter().map(|s| (s.name.clone(), s.all())).collect(),
        });
        Ok(rows)
    }
}
