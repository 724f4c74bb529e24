//! Scenario 1: streaming build output. `tether run -- head -c N /dev/zero` with its
//! stdout on /dev/null (build -> daemon -> client -> /dev/null), against
//! `head -c N /dev/zero | cat | cat >/dev/null`: the same two pipe hops without tether.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::procs::run_timed;
use crate::report::{num, size_label, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};

pub struct Stream;

const MIB: f64 = (1u64 << 20) as f64;

impl Scenario for Stream {
    fn id(&self) -> &'static str {
        "stream"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let bytes: u64 = if ctx.quick { 256 << 20 } else { 2 << 30 };
        // Generous: 5 MiB/s would be a broken tether, not a slow one.
        let timeout = Duration::from_secs(60).max(Duration::from_secs(bytes / (5 << 20)));
        let n = bytes.to_string();
        let pipeline = format!("head -c {bytes} /dev/zero | cat | cat >/dev/null");
        let (mut base_rate, mut base_cpu, mut teth_rate, mut teth_cpu) = (vec![], vec![], vec![], vec![]);
        let mut notes = Vec::new();
        for rep in 1..=ctx.reps {
            let mut base = Command::new("sh");
            base.args(["-c", &pipeline]);
            let b = run_timed(base, "the baseline pipeline", timeout).with_context(|| format!("repetition {rep}"))?;

            let mut teth = ctx.tether_cmd();
            teth.args(["run", "--", "head", "-c", &n, "/dev/zero"]);
            let t = run_timed(teth, "tether run", timeout).with_context(|| format!("repetition {rep}"))?;

            let rate = |d: Duration| bytes as f64 / MIB / d.as_secs_f64();
            ctx.progress(
                self.id(),
                &format!(
                    "rep {rep}/{}: baseline {} MiB/s, tether {} MiB/s",
                    ctx.reps,
                    num(rate(b.wall)),
                    num(rate(t.wall))
                ),
            );
            base_rate.push(rate(b.wall));
            base_cpu.push(b.cpu.as_secs_f64());
            teth_rate.push(rate(t.wall));
            teth_cpu.push(t.cpu.as_secs_f64());
            if !t.stderr.is_empty() && notes.is_empty() {
                notes.push(format!(
                    "tether run wrote to stderr: {}",
                    t.stderr.lines().next().unwrap_or("")
                ));
            }
        }
        let scenario = format!("stream {} to /dev/null", size_label(bytes));
        let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
        let baseline_name = "head|cat|cat".to_owned();
        Ok(vec![
            Row {
                scenario: scenario.clone(),
                metric: "throughput".into(),
                unit: "MiB/s",
                tether: stats(teth_rate)?,
                baseline: Some((baseline_name.clone(), stats(base_rate)?)),
                goal: Goal::RatioAtLeast(0.8),
                notes,
            },
            Row {
                scenario,
                metric: "CPU user+sys, all processes".into(),
                unit: "s",
                tether: stats(teth_cpu)?,
                baseline: Some((baseline_name, stats(base_cpu)?)),
                goal: Goal::None,
                notes: Vec::new(),
            },
        ])
    }
}
