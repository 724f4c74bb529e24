//! Scenario: the daemon's memory with a follower that stops reading. A build writes
//! 2 GiB (quick: 256 MiB) to a client whose stdout is a pipe nobody reads; the build is
//! paced by the daemon's disk spool, the client stalls after a pipe's worth. Reported:
//! the daemon's peak RSS (VmHWM) once the build finished, against the same daemon's
//! RSS when idle, before the build. The client is then drained and must deliver every
//! byte.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::report::{num, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::socket_daemon::{drain, spawn_piped, SocketDaemon};

pub struct StalledMemory;

const GOAL_MIB: f64 = 32.0;
const MIB: f64 = (1u64 << 20) as f64;

/// One repetition's readings, in KiB, and the build's time.
struct Reading {
    idle_rss: u64,
    idle_hwm: u64,
    hwm: u64,
    build: Duration,
}

fn one(ctx: &Ctx, rep: usize, bytes: u64) -> anyhow::Result<Reading> {
    let mut d = SocketDaemon::start(
        ctx,
        &format!("stalled-memory-{rep}"),
        &["--quota-build", "3GiB", "--quota-total", "3GiB"],
    )?;
    // Idle, after serving one client.
    d.ps_state(ctx, "none")?;
    std::thread::sleep(Duration::from_millis(300));
    let idle = d.status()?;

    let mut run = d.client(ctx, "run");
    let n = bytes.to_string();
    run.args(["--id", "big", "--", "head", "-c", &n, "/dev/zero"]);
    let t0 = Instant::now();
    let mut client = spawn_piped(run, "tether run")?;
    let timeout = Duration::from_secs(60).max(Duration::from_secs(bytes / (5 << 20)));
    let state = d.wait_finished(ctx, "big", timeout)?;
    let build = t0.elapsed();
    if state != "exited" {
        bail!("the build ended {state:?}");
    }
    let hwm = d.status()?.hwm_kib;
    if let Some(st) = client.child.try_wait()? {
        bail!(
            "the stalled client exited ({st}) before it was read{}",
            client.stderr.suffix()
        );
    }

    // Drained now, the client delivers everything.
    let reader = drain(client.out);
    let status = crate::procs::wait_timeout(&mut client.child, timeout)?
        .with_context(|| format!("the stalled client did not finish within {timeout:?} once drained"))?;
    let got = reader
        .join()
        .map_err(|_| anyhow!("the drain thread panicked"))?
        .context("cannot read the client's output")?;
    if !status.success() || got != bytes {
        bail!(
            "the stalled client ended {status} after delivering {got} of {bytes} bytes{}",
            client.stderr.suffix()
        );
    }
    d.stop()?;
    Ok(Reading {
        idle_rss: idle.rss_kib,
        idle_hwm: idle.hwm_kib,
        hwm,
        build,
    })
}

impl Scenario for StalledMemory {
    fn id(&self) -> &'static str {
        "stalled-memory"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let bytes: u64 = if ctx.quick { 256 << 20 } else { 2 << 30 };
        let (mut idle, mut peak, mut rates) = (vec![], vec![], vec![]);
        let mut idle_hwm = 0u64;
        for rep in 1..=ctx.reps {
            let r = one(ctx, rep, bytes).with_context(|| format!("repetition {rep}"))?;
            let rate = bytes as f64 / MIB / r.build.as_secs_f64();
            ctx.progress(
                self.id(),
                &format!(
                    "rep {rep}/{}: idle VmRSS {} KiB; with a stalled follower VmHWM {} KiB, build done in {:.1} s ({} MiB/s)",
                    ctx.reps,
                    r.idle_rss,
                    r.hwm,
                    r.build.as_secs_f64(),
                    num(rate)
                ),
            );
            idle.push(r.idle_rss as f64 / 1024.0);
            peak.push(r.hwm as f64 / 1024.0);
            rates.push(rate);
            idle_hwm = idle_hwm.max(r.idle_hwm);
        }
        let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
        let rate = stats(rates)?;
        let size = crate::report::size_label(bytes);
        Ok(vec![Row {
            scenario: format!("{size} build, its client stalled (socket)"),
            metric: "daemon VmHWM".into(),
            unit: "MiB",
            tether: stats(peak)?,
            baseline: Some(("idle daemon's VmRSS".to_owned(), stats(idle)?)),
            goal: Goal::AtMost(GOAL_MIB),
            notes: vec![
                format!(
                    "the build finished while its client stalled, at {} MiB/s [{}-{}] (run to end of build as `ps` saw it); \
                     the client then delivered every byte",
                    num(rate.median),
                    num(rate.min),
                    num(rate.max)
                ),
                format!("idle daemon's VmHWM before the build: at most {idle_hwm} KiB"),
            ],
        }])
    }
}
