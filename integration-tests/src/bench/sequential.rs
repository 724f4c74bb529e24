//! Scenario 2: many short builds, one after another, over one established session.
//! Per build: from writing Run to decoding its Exited. Baseline: spawning `true` and
//! waiting for it from the bench itself.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tether_protocol::{EndCause, ExitStatus};

use crate::chart::Chart;
use crate::report::{num, percentile, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::session::{argv_spec, Session};

pub struct Sequential;

const BUILD_TIMEOUT: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Scenario for Sequential {
    fn id(&self) -> &'static str {
        "sequential"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let n: usize = if ctx.quick { 200 } else { 1000 };
        let (mut b50, mut b99, mut t50, mut t99) = (vec![], vec![], vec![], vec![]);
        let (mut b_max, mut t_max) = (0f64, 0f64);
        let mut early = 0usize;
        // Where a build's time goes, over all repetitions: Run to Started, and the
        // daemon's own account (spawn to end of cleanup).
        let (mut to_started, mut daemon_ms) = (vec![], vec![]);
        let mut notes = Vec::new();
        // Every single latency, for the distribution chart.
        let (mut all_b, mut all_t) = (vec![], vec![]);
        for rep in 1..=ctx.reps {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t0 = Instant::now();
                let st = Command::new("true").status().context("cannot run `true`")?;
                lat.push(ms(t0.elapsed()));
                if !st.success() {
                    bail!("`true` failed: {st}");
                }
            }
            let (bp50, bp99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
            b_max = lat.iter().copied().fold(b_max, f64::max);
            all_b.extend_from_slice(&lat);

            let args = ["serve", "--exit-on-eof", "--log-level", "warn"];
            let mut s = Session::connect(&ctx.tether, &args, &ctx.tether_env(), Duration::from_secs(30))
                .with_context(|| format!("repetition {rep}: starting tether serve"))?;
            lat.clear();
            for i in 0..n {
                let r = s
                    .run_build(i as u64, argv_spec(&["true"]), BUILD_TIMEOUT)
                    .with_context(|| format!("repetition {rep}, build {i}"))?;
                if r.exited.status != ExitStatus::Code(0) || r.exited.cause != EndCause::Completed {
                    bail!(
                        "repetition {rep}, build {i}: `true` ended {:?} ({:?})",
                        r.exited.status,
                        r.exited.cause
                    );
                }
                if r.output_bytes != r.exited.stdout_bytes + r.exited.stderr_bytes {
                    bail!(
                        "repetition {rep}, build {i} ({}): received {} output bytes, Exited claims {} + {}",
                        r.started.build,
                        r.output_bytes,
                        r.exited.stdout_bytes,
                        r.exited.stderr_bytes
                    );
                }
                early += usize::from(r.exited_before_started);
                lat.push(ms(r.latency));
                to_started.push(ms(r.to_started));
                daemon_ms.push(r.exited.duration_ms as f64);
            }
            let log = s.stderr();
            let st = s
                .close(Duration::from_secs(10))
                .with_context(|| format!("repetition {rep}"))?;
            if !st.success() {
                bail!("repetition {rep}: tether serve exited with {st} after stdin closed: {log}");
            }
            if let Some(line) = log.lines().next().filter(|_| notes.is_empty()) {
                notes.push(format!("tether serve logged (at warn): {line}"));
            }
            let (tp50, tp99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
            t_max = lat.iter().copied().fold(t_max, f64::max);
            all_t.extend_from_slice(&lat);
            ctx.progress(
                self.id(),
                &format!(
                    "rep {rep}/{}: spawn+wait p50 {} ms p99 {} ms; tether p50 {} ms p99 {} ms",
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
        }
        notes.push(format!(
            "slowest single build: tether {} ms, spawn+wait {} ms",
            num(t_max),
            num(b_max)
        ));
        notes.push(format!(
            "tether breakdown (p50 over all builds): Run->Started {} ms, Exited.duration_ms {} ms",
            num(percentile(&to_started, 50.0)),
            num(percentile(&daemon_ms, 50.0))
        ));
        if early > 0 {
            notes.push(format!("{early} builds' Exited arrived before their Started"));
        }
        let scenario = format!("{n} sequential `true` builds, one session");
        ctx.chart(Chart::Distribution {
            id: "sequential-latency".into(),
            title: format!("{scenario}: latency per build"),
            unit: "ms".into(),
            series: vec![
                ("tether: Run to Exited".into(), all_t),
                ("spawn and wait for `true`".into(), all_b),
            ],
        });
        let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
        let base = "spawn+wait".to_owned();
        Ok(vec![
            Row {
                scenario: scenario.clone(),
                metric: "p50 latency".into(),
                unit: "ms",
                tether: stats(t50)?,
                baseline: Some((base.clone(), stats(b50)?)),
                goal: Goal::AtMost(2.0),
                notes: Vec::new(),
            },
            Row {
                scenario,
                metric: "p99 latency".into(),
                unit: "ms",
                tether: stats(t99)?,
                baseline: Some((base, stats(b99)?)),
                goal: Goal::AtMost(5.0),
                notes,
            },
        ])
    }
}
