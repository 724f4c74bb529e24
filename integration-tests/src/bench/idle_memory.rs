//! Scenario 3: resident memory of an idle daemon that has served one session and one
//! build, against `cat` (and `busybox cat` when there is one) idling on a pipe.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tether_protocol::ExitStatus;

use crate::procs::{on_path, proc_status, wait_timeout, ProcStatus};
use crate::report::{Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::session::{argv_spec, Session};

pub struct IdleMemory;

const IDLE: Duration = Duration::from_millis(500);
const GOAL_KIB: f64 = 5.0 * 1024.0;

/// Starts `argv` with pipes, has it echo one line (so it is up and has done its work),
/// idles, and reads its memory.
fn idle_cat(argv: &[&str]) -> anyhow::Result<ProcStatus> {
    let what = argv.join(" ");
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        bail!("{what} has no stdio pipes");
    };
    let result = (|| {
        stdin
            .write_all(b"x\n")
            .with_context(|| format!("cannot write to {what}"))?;
        let mut echo = [0u8; 2];
        stdout
            .read_exact(&mut echo)
            .with_context(|| format!("{what} did not echo"))?;
        std::thread::sleep(IDLE);
        proc_status(child.id())
    })();
    drop(stdin);
    if wait_timeout(&mut child, Duration::from_secs(5))?.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn idle_tether(ctx: &Ctx) -> anyhow::Result<ProcStatus> {
    let mut s = Session::spawn(&ctx.tether, &["serve", "--log-level", "warn"], &ctx.tether_env())?;
    s.wait_preamble(Duration::from_secs(30))?;
    s.handshake(Duration::from_secs(30))?;
    let r = s.run_build(0, argv_spec(&["true"]), Duration::from_secs(30))?;
    if r.exited.status != ExitStatus::Code(0) {
        bail!("`true` ended {:?}", r.exited.status);
    }
    std::thread::sleep(IDLE);
    let status = proc_status(s.pid())?;
    let st = s.terminate(Duration::from_secs(10))?;
    if !st.success() {
        bail!("tether serve exited with {st} on SIGTERM");
    }
    Ok(status)
}

impl Scenario for IdleMemory {
    fn id(&self) -> &'static str {
        "idle-memory"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let busybox = on_path("busybox");
        let (mut cat, mut bb, mut teth) = (vec![], vec![], vec![]);
        let (mut hwm, mut threads) = (0u64, 0u64);
        for rep in 1..=ctx.reps {
            let c = idle_cat(&["cat"]).with_context(|| format!("repetition {rep}"))?;
            cat.push(c.rss_kib as f64);
            let mut line = format!("rep {rep}/{}: cat {} KiB", ctx.reps, c.rss_kib);
            if busybox {
                let b = idle_cat(&["busybox", "cat"]).with_context(|| format!("repetition {rep}"))?;
                bb.push(b.rss_kib as f64);
                line += &format!(", busybox cat {} KiB", b.rss_kib);
            }
            let t = idle_tether(ctx).with_context(|| format!("repetition {rep}: tether serve"))?;
            teth.push(t.rss_kib as f64);
            hwm = hwm.max(t.hwm_kib);
            threads = threads.max(t.threads);
            ctx.progress(self.id(), &format!("{line}, tether serve {} KiB", t.rss_kib));
        }
        let scenario = "idle tether serve (after 1 session + 1 build)".to_owned();
        let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
        let tether = stats(teth)?;
        let mut notes = vec![format!("tether serve: peak VmHWM {hwm} KiB, {threads} threads")];
        if !busybox {
            notes.push("busybox is not on PATH: the busybox cat baseline was skipped".to_owned());
        }
        let mut rows = vec![Row {
            scenario: scenario.clone(),
            metric: "VmRSS".into(),
            unit: "KiB",
            tether: tether.clone(),
            baseline: Some(("cat".to_owned(), stats(cat)?)),
            goal: Goal::AtMost(GOAL_KIB),
            notes,
        }];
        if busybox {
            rows.push(Row {
                scenario,
                metric: "VmRSS".into(),
                unit: "KiB",
                tether,
                baseline: Some(("busybox cat".to_owned(), stats(bb)?)),
                goal: Goal::None,
                notes: Vec::new(),
            });
        }
        Ok(rows)
    }
}
