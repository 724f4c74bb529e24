//! Scenario: replaying a finished build's retained output. The build `cat`s a 1 GiB
//! file (quick: 128 MiB) into the daemon's disk spool; then `tether logs ID` (spool ->
//! daemon -> socket -> client -> pipe) is timed against `cat FILE` into the same kind of
//! pipe, both drained by the bench. Each is run once untimed first, so that the file
//! and the spool are in the page cache for both.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::report::{num, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::socket_daemon::{run_drained, Drained, SocketDaemon};

pub struct LogsReplay;

const MIB: f64 = (1u64 << 20) as f64;
const ID: &str = "replay";

/// A file of `bytes` bytes (a 1 MiB xorshift block, repeated).
fn write_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut block = Vec::with_capacity(1 << 20);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while block.len() < 1 << 20 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        block.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    let mut f = BufWriter::new(File::create(path).with_context(|| format!("cannot create {}", path.display()))?);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("cannot write {}", path.display()))
}

impl Scenario for LogsReplay {
    fn id(&self) -> &'static str {
        "logs-replay"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let bytes: u64 = if ctx.quick { 128 << 20 } else { 1 << 30 };
        let reps = ctx.reps.min(if ctx.quick { 1 } else { 3 });
        let timeout = Duration::from_secs(60).max(Duration::from_secs(bytes / (5 << 20)));
        let file = ctx.tmpdir.join("logs-replay.data");
        write_file(&file, bytes)?;
        let result = (|| {
            let mut d = SocketDaemon::start(ctx, "logs-replay", &["--quota-build", "2GiB", "--quota-total", "2GiB"])?;
            let mut build = d.client(ctx, "run");
            build.args(["--id", ID, "--", "cat"]).arg(&file);
            let r = run_drained(build, "the build (tether run)", timeout)?;
            if r.bytes != bytes {
                bail!("the build printed {} of {bytes} bytes", r.bytes);
            }
            let state = d.wait_finished(ctx, ID, timeout)?;
            if state != "exited" {
                bail!("the build ended {state:?}");
            }
            let baseline = || {
                let mut cmd = Command::new("cat");
                cmd.arg(&file);
                cmd
            };
            let logs = || {
                let mut cmd = d.client(ctx, "logs");
                cmd.arg(ID);
                cmd
            };
            let check = |r: Drained, what: &str| -> anyhow::Result<Duration> {
                if r.bytes != bytes {
                    bail!("{what} printed {} of {bytes} bytes", r.bytes);
                }
                Ok(r.wall)
            };
            // Warm: the file and the spool in the page cache.
            check(run_drained(baseline(), "cat FILE", timeout)?, "cat FILE")?;
            check(run_drained(logs(), "tether logs", timeout)?, "tether logs")?;
            let rate = |d: Duration| bytes as f64 / MIB / d.as_secs_f64();
            let (mut base, mut teth) = (vec![], vec![]);
            for rep in 1..=reps {
                let b = check(run_drained(baseline(), "cat FILE", timeout)?, "cat FILE")
                    .with_context(|| format!("repetition {rep}"))?;
                let t = check(run_drained(logs(), "tether logs", timeout)?, "tether logs")
                    .with_context(|| format!("repetition {rep}"))?;
                ctx.progress(
                    self.id(),
                    &format!(
                        "rep {rep}/{reps}: cat FILE {} MiB/s, tether logs {} MiB/s",
                        num(rate(b)),
                        num(rate(t))
                    ),
                );
                base.push(rate(b));
                teth.push(rate(t));
            }
            d.stop()?;
            Ok((base, teth))
        })();
        let _ = std::fs::remove_file(&file);
        let (base, teth) = result?;
        let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
        let size = crate::report::size_label(bytes);
        Ok(vec![Row {
            scenario: format!("logs of a finished {size} build (socket, warm cache)"),
            metric: "throughput".into(),
            unit: "MiB/s",
            tether: stats(teth)?,
            baseline: Some(("cat FILE|pipe".to_owned(), stats(base)?)),
            goal: Goal::RatioAtLeast(0.8),
            notes: vec![format!(
                "{reps} interleaved repetitions after one untimed run of each; both outputs go into a pipe the bench drains"
            )],
        }])
    }
}
