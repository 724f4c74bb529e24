//! Scenario: how tether's cost grows with the number of concurrent builds, all on one
//! socket daemon (`tether serve --socket`, [`SocketDaemon`]).
//!
//! - Streaming throughput: N = 1, 4, 16, 64 concurrent
//!   `tether run --socket S -- head -c B/N /dev/zero` clients (B = 2 GiB, quick 256 MiB,
//!   split evenly over the N builds), each client's stdout on /dev/null (build -> daemon
//!   -> client -> /dev/null, as in `stream`), against N concurrent
//!   `head -c B/N /dev/zero | cat | cat >/dev/null` pipelines: the same two pipe hops
//!   per build without tether. Aggregate MiB/s = B over the wall time from the first
//!   spawn to the last exit. Goal: >= 0.8x of the raw pipes at every N.
//! - Daemon memory while streaming: the daemon's peak RSS during each N's run (VmHWM,
//!   reset to the current RSS through `/proc/PID/clear_refs` just before the run, and
//!   VmRSS sampled every 50 ms besides), against the same daemon's VmRSS when idle
//!   (after serving one `tether ps`), before the first run of the repetition. Notes
//!   add the highest RssAnon sampled (heap, not mapped files) and the VmRSS right
//!   after the last client exited (what the allocator kept).
//! - Daemon memory with idle builds: a fresh daemon's VmRSS when idle, then with 1, 4,
//!   16 and 64 running `sleep` builds started by `tether run --detach` (each client
//!   returns once its build started, so no client lives on), and the increment per
//!   build, (RSS with 64 - idle RSS) / 64. Goal (not a number): flat memory as
//!   concurrency grows, except for per-build buffers of bounded size.
//!
//! What is counted: the daemon process alone (VmRSS/VmHWM of `tether serve`). The
//! builds (`head`, `sleep`) are processes of their own and not counted; neither are the
//! N streaming clients, whose summed VmRSS (sampled every 50 ms) is given in a note.
//! CPU notes: user+sys per GiB of every process on each side (tether: the daemon, the
//! builds it reaped, the clients; raw pipes: `sh`, `head` and both `cat`s).
//!
//! What limits each figure: on a machine with few cores all N pipelines share the same
//! CPUs, so the aggregate throughput measures the CPU cost per byte of each side more
//! than parallelism, and both sides move with whatever else the machine runs. Each
//! build's output is also spooled to disk by the daemon (see `stream`), so the page
//! cache and the disk weigh in; the quotas are raised so that no output is dropped. At
//! large N a build's share is small (quick: 4 MiB at N = 64), so per-build start-up
//! (client exec, connect, handshake, spawn) is a visible part of the time. The wall
//! time is measured by polling exits every 2 ms. Sampled VmRSS misses spikes shorter
//! than 50 ms; the reset VmHWM does not (when clear_refs is refused, a note says so).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::Signal;

use crate::chart::Chart;
use crate::procs::{children_cpu, proc_status, stop, wait_timeout, Captured};
use crate::report::{num, size_label, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::socket_daemon::SocketDaemon;

pub struct Concurrency;

/// Numbers of concurrent builds.
const LEVELS: [usize; 4] = [1, 4, 16, 64];
const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;
/// How often exits are polled.
const POLL: Duration = Duration::from_millis(2);
/// How often memory is sampled while builds stream.
const SAMPLE: Duration = Duration::from_millis(50);
/// Time for a daemon to settle after a client left, before its RSS is read.
const SETTLE: Duration = Duration::from_millis(200);
/// Deadline of short client commands (`ps`, `run --detach`).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the idle builds sleep: the daemon cancels them when it stops; should it
/// die without doing so, they end on their own soon after.
const IDLE_SLEEP: &str = "120";

/// One child of a [`Batch`].
struct Proc {
    child: Child,
    stderr: Captured,
    status: Option<ExitStatus>,
}

/// Children started together, each in its own process group with stdin and stdout on
/// /dev/null and stderr captured. Any still running when the batch is dropped are
/// killed (with their group) and reaped, on every exit path.
struct Batch {
    procs: Vec<Proc>,
}

impl Batch {
    fn spawn(cmds: Vec<Command>, what: &str) -> anyhow::Result<Batch> {
        let mut batch = Batch {
            procs: Vec::with_capacity(cmds.len()),
        };
        for (i, mut cmd) in cmds.into_iter().enumerate() {
            let stderr = Captured::new()?;
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr.stdio()?)
                .process_group(0);
            // On failure `batch` is dropped, which kills those already started.
            let child = cmd.spawn().with_context(|| format!("cannot start {what} #{}", i + 1))?;
            batch.procs.push(Proc {
                child,
                stderr,
                status: None,
            });
        }
        Ok(batch)
    }

    /// Waits until every child exited (polled every [`POLL`]), calling `sample` every
    /// [`SAMPLE`] with the pids still running; returns when the last exit was seen.
    /// Past `timeout` every child is killed and this fails.
    fn wait_all(&mut self, what: &str, timeout: Duration, mut sample: impl FnMut(&[u32])) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut next_sample = Instant::now();
        loop {
            let mut running = Vec::new();
            for p in &mut self.procs {
                if p.status.is_none() {
                    p.status = p.child.try_wait().context("cannot wait for a child")?;
                    if p.status.is_none() {
                        running.push(p.child.id());
                    }
                }
            }
            let now = Instant::now();
            if running.is_empty() {
                return Ok(now);
            }
            if now >= deadline {
                self.kill_all();
                let first = self.procs.iter_mut().find(|p| p.status.is_some_and(|s| !s.success()));
                let stderr = first.map(|p| p.stderr.suffix()).unwrap_or_default();
                bail!(
                    "{} of {} {what} did not finish within {timeout:?}; all killed{stderr}",
                    running.len(),
                    self.procs.len()
                );
            }
            if now >= next_sample {
                sample(&running);
                next_sample = now + SAMPLE;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Fails, quoting its stderr, when a child exited unsuccessfully.
    fn check(&mut self, what: &str) -> anyhow::Result<()> {
        let n = self.procs.len();
        for (i, p) in self.procs.iter_mut().enumerate() {
            match p.status {
                Some(st) if st.success() => {}
                Some(st) => bail!("{what} #{} of {n} failed ({st}){}", i + 1, p.stderr.suffix()),
                None => bail!("{what} #{} of {n} was not waited for", i + 1),
            }
        }
        Ok(())
    }

    /// The first line a child wrote to stderr, and how many children wrote any.
    fn stderr_lines(&mut self) -> Option<(String, usize)> {
        let mut first = None;
        let mut count = 0;
        for p in &mut self.procs {
            let t = p.stderr.tail(2000);
            if !t.is_empty() {
                count += 1;
                first.get_or_insert_with(|| t.lines().next().unwrap_or("").to_owned());
            }
        }
        first.map(|f| (f, count))
    }

    fn kill_all(&mut self) {
        for p in &mut self.procs {
            if p.status.is_none() {
                if let Ok((st, _)) = stop(&mut p.child, Signal::SIGKILL, true, Duration::from_secs(5)) {
                    p.status = Some(st);
                }
            }
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Runs `cmds` concurrently to their end; returns the wall time from before the first
/// spawn to the last exit.
fn run_batch(
    cmds: Vec<Command>,
    what: &str,
    timeout: Duration,
    sample: impl FnMut(&[u32]),
) -> anyhow::Result<(Duration, Batch)> {
    let t0 = Instant::now();
    let mut batch = Batch::spawn(cmds, what)?;
    let end = batch.wait_all(what, timeout, sample)?;
    batch.check(what)?;
    Ok((end - t0, batch))
}

/// CPU seconds (user + system) of process `pid` itself, and of its children it has
/// waited for, from /proc/PID/stat.
fn proc_cpu(pid: u32) -> anyhow::Result<(f64, f64)> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path} has no ')'"))?;
    // Fields from the 3rd (state) on: utime, stime, cutime, cstime are the 14th-17th.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| -> anyhow::Result<f64> {
        fields
            .get(field - 3)
            .and_then(|s| s.parse::<u64>().ok())
            .map(|t| t as f64)
            .with_context(|| format!("cannot parse field {field} of {path}"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    Ok(((ticks(14)? + ticks(15)?) / hz, (ticks(16)? + ticks(17)?) / hz))
}

/// Fields of /proc/PID/status, in KiB (`None` when the process is gone or a field
/// is missing).
fn status_kib<const N: usize>(pid: u32, names: [&str; N]) -> Option<[u64; N]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut out = [0u64; N];
    for (v, name) in out.iter_mut().zip(names) {
        let line = text.lines().find(|l| l.starts_with(name))?;
        *v = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    }
    Some(out)
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS; false if refused.
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), b"5").is_ok()
}

/// Runs a short client command to its end (with a deadline), returning its stdout.
fn client_output(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let mut out = Captured::new()?;
    let mut err = Captured::new()?;
    cmd.stdin(Stdio::null())
        .stdout(out.stdio()?)
        .stderr(err.stdio()?)
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
    let status = match wait_timeout(&mut child, CLIENT_TIMEOUT) {
        Ok(Some(st)) => st,
        other => {
            let _ = stop(&mut child, Signal::SIGKILL, true, Duration::from_secs(5));
            other?;
            bail!(
                "{what} did not finish within {CLIENT_TIMEOUT:?}; killed{}",
                err.suffix()
            );
        }
    };
    if !status.success() {
        bail!("{what} failed ({status}){}", err.suffix());
    }
    Ok(out.tail(usize::MAX))
}

/// The running builds of the daemon, as (id, pid), from `tether ps --json`.
fn running_builds(ctx: &Ctx, d: &SocketDaemon) -> anyhow::Result<Vec<(String, u32)>> {
    let mut cmd = d.client(ctx, "ps");
    cmd.arg("--json");
    let text = client_output(cmd, "tether ps --json")?;
    let mut builds = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("tether ps printed {line:?}"))?;
        if v["state"] == "running" {
            let id = v["build"].as_str().unwrap_or_default().to_owned();
            let pid = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
            builds.push((id, pid));
        }
    }
    Ok(builds)
}

/// The daemon's VmRSS once it has served one client and settled, in KiB.
fn idle_rss(ctx: &Ctx, d: &SocketDaemon) -> anyhow::Result<u64> {
    running_builds(ctx, d).context("serving one `tether ps`")?;
    std::thread::sleep(SETTLE);
    Ok(d.status()?.rss_kib)
}

/// Whether `pid` is a live (not zombie) process running `sleep`.
fn live_sleep(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    // A zombie has an empty cmdline.
    argv0 == b"sleep" || argv0.ends_with(b"/sleep")
}

/// After the daemon stopped: the idle builds must be gone (the daemon cancels them on
/// SIGTERM). Waits up to 5 s; any left are killed, and this fails.
fn check_builds_gone(pids: &[u32]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| p > 0 && live_sleep(p)).collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            for &p in &left {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), Signal::SIGKILL);
            }
            bail!(
                "{} idle builds outlived the stopped daemon (killed): pids {left:?}",
                left.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds the pids of `running` builds to `pids`.
fn remember(pids: &mut Vec<u32>, running: &[(String, u32)]) {
    for (_, p) in running {
        if !pids.contains(p) {
            pids.push(*p);
        }
    }
}

/// One repetition's readings of the idle-builds part, in KiB.
struct IdleReading {
    idle: u64,
    /// (builds running, VmRSS), for each of [`LEVELS`].
    with_builds: Vec<(usize, u64)>,
    hwm: u64,
}

fn idle_builds(ctx: &Ctx, rep: usize) -> anyhow::Result<IdleReading> {
    let d = SocketDaemon::start(ctx, &format!("concurrency-idle-{rep}"), &[])?;
    let mut pids = Vec::new();
    let measured = measure_idle_builds(ctx, &d, &mut pids);
    let stopped = d.stop().context("stopping the daemon that ran the idle builds");
    let gone = check_builds_gone(&pids);
    let r = measured?;
    stopped?;
    gone?;
    Ok(r)
}

fn measure_idle_builds(ctx: &Ctx, d: &SocketDaemon, pids: &mut Vec<u32>) -> anyhow::Result<IdleReading> {
    let idle = idle_rss(ctx, d)?;
    let mut with_builds = Vec::new();
    let mut started = 0;
    for &n in &LEVELS {
        let cmds = (started..n)
            .map(|i| {
                let mut cmd = d.client(ctx, "run");
                cmd.args(["--detach", "--id", &format!("idle-{i}"), "--", "sleep", IDLE_SLEEP]);
                cmd
            })
            .collect();
        let what = "tether run --detach -- sleep";
        let result = run_batch(cmds, what, CLIENT_TIMEOUT, |_| {});
        if result.is_err() {
            // Known for the check after the daemon stopped, if they can be.
            if let Ok(running) = running_builds(ctx, d) {
                remember(pids, &running);
            }
        }
        result?;
        started = n;
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        loop {
            let running = running_builds(ctx, d)?;
            remember(pids, &running);
            if running.len() == n {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} builds running instead of {n} after {CLIENT_TIMEOUT:?}",
                    running.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(SETTLE);
        with_builds.push((n, d.status()?.rss_kib));
    }
    Ok(IdleReading {
        idle,
        with_builds,
        hwm: d.status()?.hwm_kib,
    })
}

/// Readings at one level of concurrency, one entry per repetition.
#[derive(Default)]
struct Level {
    base_rate: Vec<f64>,
    teth_rate: Vec<f64>,
    /// Daemon's peak RSS, MiB.
    peak: Vec<f64>,
    /// CPU seconds per GiB.
    base_cpu: Vec<f64>,
    daemon_cpu: Vec<f64>,
    build_cpu: Vec<f64>,
    client_cpu: Vec<f64>,
    /// Peak of the clients' summed VmRSS, MiB.
    clients_rss: Vec<f64>,
    /// Highest RssAnon of the daemon sampled, MiB.
    anon: Vec<f64>,
    /// The daemon's VmRSS right after the last client exited, MiB.
    after: Vec<f64>,
    stderr: Option<String>,
}

/// One repetition of the streaming part on a fresh daemon; returns its idle VmRSS (KiB)
/// and whether the peak RSS could be reset.
fn streaming(
    ctx: &Ctx,
    id: &str,
    rep: usize,
    bytes: u64,
    timeout: Duration,
    levels: &mut [Level],
) -> anyhow::Result<(u64, bool)> {
    let quota = format!("{}", bytes + (1 << 30));
    let d = SocketDaemon::start(
        ctx,
        &format!("concurrency-stream-{rep}"),
        &["--quota-build", &quota, "--quota-total", &quota],
    )?;
    let measured = measure_streaming(ctx, id, rep, &d, bytes, timeout, levels);
    let stopped = d.stop().context("stopping the streaming daemon");
    let r = measured?;
    stopped?;
    Ok(r)
}

fn measure_streaming(
    ctx: &Ctx,
    id: &str,
    rep: usize,
    d: &SocketDaemon,
    bytes: u64,
    timeout: Duration,
    levels: &mut [Level],
) -> anyhow::Result<(u64, bool)> {
    let idle = idle_rss(ctx, d)?;
    let mut reset_ok = true;
    let gib = bytes as f64 / GIB;
    for (&n, lv) in LEVELS.iter().zip(levels.iter_mut()) {
        let each = (bytes / n as u64).to_string();
        let total = bytes / n as u64 * n as u64;
        let rate = |wall: Duration| total as f64 / MIB / wall.as_secs_f64();

        let pipeline = format!("head -c {each} /dev/zero | cat | cat >/dev/null");
        let cmds = (0..n)
            .map(|_| {
                let mut c = Command::new("sh");
                c.args(["-c", &pipeline]);
                c
            })
            .collect();
        let cpu0 = children_cpu();
        let (b_wall, _) = run_batch(cmds, "raw pipeline", timeout, |_| {})
            .with_context(|| format!("{n} concurrent raw pipelines"))?;
        let b_cpu = children_cpu().saturating_sub(cpu0).as_secs_f64();

        let cmds = (0..n)
            .map(|_| {
                let mut c = d.client(ctx, "run");
                c.args(["--", "head", "-c", &each, "/dev/zero"]);
                c
            })
            .collect();
        reset_ok &= reset_hwm(d.pid());
        let (d_cpu0, b_cpu0) = proc_cpu(d.pid())?;
        let cpu0 = children_cpu();
        let (mut sampled, mut anon, mut clients) = (0u64, 0u64, 0u64);
        let (t_wall, mut batch) = run_batch(cmds, "tether run", timeout, |pids| {
            if let Some([rss, a]) = status_kib(d.pid(), ["VmRSS:", "RssAnon:"]) {
                sampled = sampled.max(rss);
                anon = anon.max(a);
            }
            let sum: u64 = pids
                .iter()
                .filter_map(|&p| proc_status(p).ok())
                .map(|s| s.rss_kib)
                .sum();
            clients = clients.max(sum);
        })
        .with_context(|| format!("{n} concurrent tether clients"))?;
        let c_cpu = children_cpu().saturating_sub(cpu0).as_secs_f64();
        let (d_cpu1, b_cpu1) = proc_cpu(d.pid())?;
        let st = d.status()?;
        let peak = if reset_ok {
            st.hwm_kib.max(sampled)
        } else {
            sampled.max(st.rss_kib)
        };
        if lv.stderr.is_none() {
            if let Some((line, count)) = batch.stderr_lines() {
                lv.stderr = Some(format!("{count} of {n} tether clients wrote to stderr, e.g.: {line}"));
            }
        }

        lv.base_rate.push(rate(b_wall));
        lv.teth_rate.push(rate(t_wall));
        lv.peak.push(peak as f64 / 1024.0);
        lv.base_cpu.push(b_cpu / gib);
        lv.daemon_cpu.push((d_cpu1 - d_cpu0) / gib);
        lv.build_cpu.push((b_cpu1 - b_cpu0) / gib);
        lv.client_cpu.push(c_cpu / gib);
        lv.clients_rss.push(clients as f64 / 1024.0);
        lv.anon.push(anon as f64 / 1024.0);
        lv.after.push(st.rss_kib as f64 / 1024.0);
        ctx.progress(
            id,
            &format!(
                "rep {rep}/{}: {n} builds: raw pipes {} MiB/s, tether {} MiB/s, daemon peak RSS {} MiB (idle {} MiB)",
                ctx.reps,
                num(rate(b_wall)),
                num(rate(t_wall)),
                num(peak as f64 / 1024.0),
                num(idle as f64 / 1024.0)
            ),
        );
    }
    Ok((idle, reset_ok))
}

/// (concurrent builds, median of the readings `f` picks) at each level.
fn points(levels: &[Level], f: impl Fn(&Level) -> &[f64]) -> Vec<(f64, f64)> {
    LEVELS
        .iter()
        .zip(levels)
        .map(|(&n, lv)| (n as f64, median(f(lv))))
        .collect()
}

fn median(v: &[f64]) -> f64 {
    Stats::of(v.to_vec()).map(|s| s.median).unwrap_or(f64::NAN)
}

impl Scenario for Concurrency {
    fn id(&self) -> &'static str {
        "concurrency"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let bytes: u64 = if ctx.quick { 256 << 20 } else { 2 << 30 };
        // Generous: 5 MiB/s in all would be a broken tether, not a slow one.
        let timeout = Duration::from_secs(60).max(Duration::from_secs(bytes / (5 << 20)));
        let mut levels: Vec<Level> = LEVELS.iter().map(|_| Level::default()).collect();
        let mut stream_idle = Vec::new();
        let mut reset_ok = true;
        let (mut idle, mut rss64, mut per_build, mut idle_hwm) = (vec![], vec![], vec![], 0u64);
        let mut by_level: Vec<Vec<f64>> = LEVELS.iter().map(|_| Vec::new()).collect();
        for rep in 1..=ctx.reps {
            let (i, ok) = streaming(ctx, self.id(), rep, bytes, timeout, &mut levels)
                .with_context(|| format!("repetition {rep}: streaming"))?;
            stream_idle.push(i as f64 / 1024.0);
            reset_ok &= ok;

            let r = idle_builds(ctx, rep).with_context(|| format!("repetition {rep}: idle builds"))?;
            let &(n_max, top) = r.with_builds.last().context("no idle-build readings")?;
            idle.push(r.idle as f64 / 1024.0);
            rss64.push(top as f64 / 1024.0);
            per_build.push((top as f64 - r.idle as f64) / n_max as f64);
            idle_hwm = idle_hwm.max(r.hwm);
            for (v, &(_, rss)) in by_level.iter_mut().zip(&r.with_builds) {
                v.push(rss as f64 / 1024.0);
            }
            let steps: Vec<String> = r
                .with_builds
                .iter()
                .map(|(n, rss)| format!("{n}: {} MiB", num(*rss as f64 / 1024.0)))
                .collect();
            ctx.progress(
                self.id(),
                &format!(
                    "rep {rep}/{}: idle daemon {} MiB; with idle builds {}; {} KiB per build",
                    ctx.reps,
                    num(r.idle as f64 / 1024.0),
                    steps.join(", "),
                    num((top as f64 - r.idle as f64) / n_max as f64)
                ),
            );
        }

        let xs: Vec<f64> = LEVELS.iter().map(|&n| n as f64).collect();
        let size = size_label(bytes);
        ctx.chart(Chart::Lines {
            id: "concurrency-throughput".into(),
            title: format!("Streaming {size} in all, split over N concurrent builds"),
            x_label: "concurrent builds".into(),
            y_label: "aggregate MiB/s".into(),
            log_x: true,
            series: vec![
                ("tether".into(), points(&levels, |lv| &lv.teth_rate)),
                ("raw pipes, 2 hops".into(), points(&levels, |lv| &lv.base_rate)),
            ],
        });
        let idle_ref = median(&stream_idle);
        ctx.chart(Chart::Lines {
            id: "concurrency-memory".into(),
            title: "tether serve's RSS against concurrent builds".into(),
            x_label: "concurrent builds".into(),
            y_label: "daemon RSS, MiB".into(),
            log_x: true,
            series: vec![
                ("tether".into(), points(&levels, |lv| &lv.peak)),
                (
                    "tether, idle `sleep` builds".into(),
                    xs.iter().zip(&by_level).map(|(&x, v)| (x, median(v))).collect(),
                ),
                ("idle daemon".into(), xs.iter().map(|&x| (x, idle_ref)).collect()),
            ],
        });

        let stats = |v: &[f64]| Stats::of(v.to_vec()).context("no repetitions");
        let scenario = |n: usize| {
            let s = if n == 1 { "" } else { "s" };
            format!("{n} concurrent build{s} streaming {size} in all (socket)")
        };
        let mut rows = Vec::new();
        for (&n, lv) in LEVELS.iter().zip(&levels) {
            let tether_cpu: Vec<f64> = (0..lv.daemon_cpu.len())
                .map(|i| lv.daemon_cpu[i] + lv.build_cpu[i] + lv.client_cpu[i])
                .collect();
            let mut notes = vec![format!(
                "CPU user+sys per GiB: tether {} s (daemon {}, builds {}, clients {}), raw pipes {} s",
                num(median(&tether_cpu)),
                num(median(&lv.daemon_cpu)),
                num(median(&lv.build_cpu)),
                num(median(&lv.client_cpu)),
                num(median(&lv.base_cpu))
            )];
            notes.extend(lv.stderr.clone());
            rows.push(Row {
                scenario: scenario(n),
                metric: "aggregate throughput".into(),
                unit: "MiB/s",
                tether: stats(&lv.teth_rate)?,
                baseline: Some(("raw pipes, 2 hops".to_owned(), stats(&lv.base_rate)?)),
                goal: Goal::RatioAtLeast(0.8),
                notes,
            });
        }
        for (&n, lv) in LEVELS.iter().zip(&levels) {
            let increment: Vec<f64> = lv
                .peak
                .iter()
                .zip(&stream_idle)
                .map(|(p, i)| (p - i) * 1024.0 / n as f64)
                .collect();
            let clients = if n == 1 {
                "the client".to_owned()
            } else {
                format!("the {n} clients together")
            };
            let mut notes = vec![format!(
                "(peak - idle) / {n} = {} KiB per streaming build; highest RssAnon sampled {} MiB; VmRSS right after \
                 the last client exited {} MiB; {clients} (not counted) peaked at {} MiB of VmRSS",
                num(median(&increment)),
                num(median(&lv.anon)),
                num(median(&lv.after)),
                num(median(&lv.clients_rss))
            )];
            if n == 1 {
                notes.push(if reset_ok {
                    "peak = the higher of VmHWM (reset through clear_refs before each N's run) and the highest VmRSS \
                     sampled every 50 ms"
                        .into()
                } else {
                    "clear_refs was refused: peak = highest VmRSS sampled every 50 ms (spikes may be missed)".into()
                });
            }
            rows.push(Row {
                scenario: scenario(n),
                metric: "daemon peak RSS".into(),
                unit: "MiB",
                tether: stats(&lv.peak)?,
                baseline: Some(("idle daemon's VmRSS".to_owned(), stats(&stream_idle)?)),
                goal: Goal::None,
                notes,
            });
        }
        let n_max = LEVELS[LEVELS.len() - 1];
        let steps: Vec<String> = LEVELS
            .iter()
            .zip(&by_level)
            .map(|(n, v)| format!("{n}: {} MiB", num(median(v))))
            .collect();
        let idle_scenario = format!("{n_max} idle `sleep` builds (socket, run --detach)");
        rows.push(Row {
            scenario: idle_scenario.clone(),
            metric: "daemon VmRSS".into(),
            unit: "MiB",
            tether: stats(&rss64)?,
            baseline: Some(("idle daemon's VmRSS".to_owned(), stats(&idle)?)),
            goal: Goal::None,
            notes: vec![
                format!("daemon VmRSS by running builds (median): {}", steps.join(", ")),
                format!(
                    "counted: the daemon process only; the `sleep` builds are processes of their own, and no client \
                     lives on (--detach returns once the build started); the daemon's VmHWM over it all: {idle_hwm} KiB"
                ),
            ],
        });
        rows.push(Row {
            scenario: idle_scenario,
            metric: format!("daemon RSS per build, (RSS{n_max} - idle) / {n_max}"),
            unit: "KiB",
            tether: stats(&per_build)?,
            baseline: None,
            goal: Goal::None,
            notes: Vec::new(),
        });
        Ok(rows)
    }
}
