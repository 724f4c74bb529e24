//! Scenario: control latency under a flood. One `tether serve` on a pipe, one session;
//! a build writes zeros at full speed (`cat /dev/zero`, followed by the session), and the
//! bench reads its output as fast as it can while it sends a Ping every 10 ms and times
//! each one until its Pong. Baseline: the same pings on the same session before the
//! flood starts. Afterwards the flood is cancelled and the time to the Cancel's Ack is
//! noted.
//!
//! Everything runs on the bench's one thread (as in `session.rs`): a Pong is timed when
//! the bench decodes it, behind whatever output the daemon wrote before it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use tether_protocol::{
    self as wire, decode, encode_frame, BuildId, ClientMessage, DaemonMessage, Decoded, FrameDecoder, RunSpec, PREAMBLE,
};

use crate::chart::Chart;
use crate::procs::{stop, wait_timeout, Captured};
use crate::report::{num, percentile, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::session::argv_spec;

pub struct PingUnderFlood;

const INTERVAL: Duration = Duration::from_millis(10);
const GOAL_P99_MS: f64 = 20.0;
const MIB: f64 = (1u64 << 20) as f64;
const FLOOD: &str = "flood";

/// A `tether serve` on pipes, read with deadlines that may pass without a message.
struct Link {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    stderr: Captured,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl Link {
    fn spawn(ctx: &Ctx) -> anyhow::Result<Link> {
        let stderr = Captured::new()?;
        let mut cmd = ctx.tether_cmd();
        cmd.args(["serve", "--exit-on-eof", "--log-level", "warn"])
            // The flood writes gigabytes: keep the spool's disk use small.
            .args(["--quota-build", "256MiB", "--quota-total", "256MiB"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.stdio()?)
            .process_group(0);
        let mut child = cmd.spawn().context("cannot start tether serve")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("tether serve has no stdio pipes");
        };
        Ok(Link {
            child,
            stdin: Some(stdin),
            stdout,
            stderr,
            dec: FrameDecoder::new(),
            buf: Vec::new(),
        })
    }

    fn send(&mut self, msg: &ClientMessage) -> anyhow::Result<()> {
        self.buf.clear();
        encode_frame(msg, &mut self.buf).context("cannot encode a message")?;
        self.write_buf()
    }

    fn write_buf(&mut self) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("the daemon's stdin is closed")?;
        if let Err(e) = stdin.write_all(&self.buf) {
            let why = self.stderr.suffix();
            return Err(anyhow!(e).context(format!("cannot write to the daemon{why}")));
        }
        Ok(())
    }

    /// The next message, or `None` once `deadline` passed without one. Preambles and
    /// `Channel` announcements are skipped; damage is an error (a local pipe must not damage anything).
    fn next(&mut self, deadline: Instant) -> anyhow::Result<Option<DaemonMessage>> {
        loop {
            match self.dec.decode() {
                Some(Decoded::Preamble) => continue,
                Some(Decoded::Frame(p)) => {
                    match decode::<DaemonMessage>(p).map_err(|e| anyhow!("undecodable frame from the daemon: {e}"))? {
                        // The stream's announcements of its holder, for other clients.
                        DaemonMessage::Channel(_) => continue,
                        m => return Ok(Some(m)),
                    }
                }
                Some(Decoded::Corrupt(c)) => bail!("damaged stream from the daemon: {c}"),
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // Round up, so that a wait never ends just before its deadline.
            let ms = u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.stdout.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) if Instant::now() >= deadline => return Ok(None),
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(anyhow!(e).context("cannot poll the daemon's stdout")),
            }
            match self.stdout.read(self.dec.read_buf()) {
                Ok(0) => bail!("the daemon closed its stdout{}", self.stderr.suffix()),
                Ok(n) => self.dec.commit(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(anyhow!(e).context("cannot read the daemon's stdout")),
            }
        }
    }

    /// Like [`Link::next`], failing at the deadline.
    fn expect(&mut self, deadline: Instant, what: &str) -> anyhow::Result<DaemonMessage> {
        match self.next(deadline)? {
            Some(m) => Ok(m),
            None => bail!("no {what} from the daemon in time{}", self.stderr.suffix()),
        }
    }

    fn handshake(&mut self) -> anyhow::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(PREAMBLE);
        let hello = ClientMessage::Hello(wire::Hello {
            protocol: wire::PROTOCOL_VERSION,
            client_version: concat!("bench-", env!("CARGO_PKG_VERSION")).to_owned(),
            capabilities: Vec::new(),
        });
        encode_frame(&hello, &mut self.buf).context("cannot encode Hello")?;
        self.write_buf()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        match self.expect(deadline, "Welcome")? {
            DaemonMessage::Welcome(_) => Ok(()),
            other => bail!("expected Welcome, got {other:?}"),
        }
    }

    fn close(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match wait_timeout(&mut self.child, Duration::from_secs(10))? {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!("tether serve exited with {st}{}", self.stderr.suffix()),
            None => bail!("tether serve did not exit at EOF{}", self.stderr.suffix()),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = stop(&mut self.child, Signal::SIGKILL, true, Duration::from_secs(5));
        }
    }
}

/// What one round of pings measured.
struct Pings {
    rtts_ms: Vec<f64>,
    /// Flood output (bytes, and positions skipped as gaps) read meanwhile.
    flood_bytes: u64,
    elapsed: Duration,
}

/// Handles one message that is not a Pong; adds flood output to `flood_bytes`.
fn other(link: &mut Link, msg: DaemonMessage, flood: &BuildId, flood_bytes: &mut u64) -> anyhow::Result<()> {
    match msg {
        DaemonMessage::Output { build, data, .. } if build == *flood => *flood_bytes += data.len() as u64,
        DaemonMessage::Gap { build, from, to, .. } if build == *flood => *flood_bytes += to - from,
        DaemonMessage::Exited(e) if e.build == *flood => bail!("the flood ended early: {e:?}"),
        DaemonMessage::Error(e) => bail!("the daemon reported an error: {:?}: {}", e.kind, e.message),
        DaemonMessage::Ping { nonce } => link.send(&ClientMessage::Pong { nonce })?,
        _ => {}
    }
    Ok(())
}

/// Sends `n` pings, one every [`INTERVAL`], reading everything meanwhile, until every
/// one was answered.
fn pings(link: &mut Link, n: usize, flood: &BuildId) -> anyhow::Result<Pings> {
    let t0 = Instant::now();
    let give_up = t0 + INTERVAL * n as u32 + Duration::from_secs(30);
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut rtts_ms = Vec::with_capacity(n);
    let mut flood_bytes = 0u64;
    let mut next_ping = t0;
    let mut nonce = 0u64;
    while (nonce as usize) < n || !sent.is_empty() {
        let now = Instant::now();
        if now >= give_up {
            bail!(
                "{} of {n} pings were never answered{}",
                sent.len(),
                link.stderr.suffix()
            );
        }
        if (nonce as usize) < n && now >= next_ping {
            nonce += 1;
            sent.insert(nonce, Instant::now());
            link.send(&ClientMessage::Ping { nonce })?;
            next_ping += INTERVAL;
            continue;
        }
        let deadline = if (nonce as usize) < n { next_ping } else { give_up };
        let Some(msg) = link.next(deadline)? else { continue };
        match msg {
            DaemonMessage::Pong { nonce } => {
                let t = sent
                    .remove(&nonce)
                    .with_context(|| format!("a Pong for nonce {nonce}, not an outstanding Ping"))?;
                rtts_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            m => other(link, m, flood, &mut flood_bytes)?,
        }
    }
    Ok(Pings {
        rtts_ms,
        flood_bytes,
        elapsed: t0.elapsed(),
    })
}

/// One repetition: idle pings, then pings under the flood, then the flood cancelled.
/// Returns (idle, flooded, time to the Cancel's Ack).
fn one(ctx: &Ctx, n: usize) -> anyhow::Result<(Pings, Pings, Duration)> {
    let flood = BuildId(FLOOD.to_owned());
    let mut link = Link::spawn(ctx)?;
    link.handshake()?;
    let idle = pings(&mut link, n, &flood).context("pings without a flood")?;

    link.send(&ClientMessage::Run {
        req: 1,
        spec: Box::new(RunSpec {
            id: Some(FLOOD.to_owned()),
            ..argv_spec(&["cat", "/dev/zero"])
        }),
        follow: true,
    })?;
    // Until the flood flows: 64 MiB read.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut warm = 0u64;
    while warm < 64 << 20 {
        let m = link.expect(deadline, "flood output")?;
        if let DaemonMessage::Error(e) = &m {
            if e.req == Some(1) {
                bail!("the flood did not start: {:?}: {}", e.kind, e.message);
            }
        }
        other(&mut link, m, &flood, &mut warm)?;
    }
    let flooded = pings(&mut link, n, &flood).context("pings under the flood")?;

    let t0 = Instant::now();
    link.send(&ClientMessage::Cancel {
        req: 2,
        build: flood.clone(),
        force: true,
    })?;
    let deadline = t0 + Duration::from_secs(60);
    let mut ack = None;
    loop {
        match link.expect(deadline, "Ack and Exited of the cancelled flood")? {
            DaemonMessage::Ack { req: 2 } => ack = Some(t0.elapsed()),
            DaemonMessage::Exited(e) if e.build == flood => break,
            DaemonMessage::Error(e) => bail!("the daemon reported an error: {:?}: {}", e.kind, e.message),
            DaemonMessage::Ping { nonce } => link.send(&ClientMessage::Pong { nonce })?,
            _ => {}
        }
    }
    let ack = ack.context("the Cancel was never acknowledged")?;
    link.close()?;
    Ok((idle, flooded, ack))
}

impl Scenario for PingUnderFlood {
    fn id(&self) -> &'static str {
        "ping-under-flood"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let n: usize = if ctx.quick { 100 } else { 500 };
        let (mut b50, mut b99, mut t50, mut t99) = (vec![], vec![], vec![], vec![]);
        let (mut rates, mut acks) = (vec![], vec![]);
        let (mut b_max, mut t_max) = (0f64, 0f64);
        // Every single round trip, for the distribution chart.
        let (mut all_b, mut all_t) = (vec![], vec![]);
        for rep in 1..=ctx.reps {
            let (idle, flooded, ack) = one(ctx, n).with_context(|| format!("repetition {rep}"))?;
            let rate = flooded.flood_bytes as f64 / MIB / flooded.elapsed.as_secs_f64();
            let (bp50, bp99) = (percentile(&idle.rtts_ms, 50.0), percentile(&idle.rtts_ms, 99.0));
            let (tp50, tp99) = (percentile(&flooded.rtts_ms, 50.0), percentile(&flooded.rtts_ms, 99.0));
            b_max = idle.rtts_ms.iter().copied().fold(b_max, f64::max);
            t_max = flooded.rtts_ms.iter().copied().fold(t_max, f64::max);
            all_b.extend_from_slice(&idle.rtts_ms);
            all_t.extend_from_slice(&flooded.rtts_ms);
            ctx.progress(
                self.id(),
                &format!(
                    "rep {rep}/{}: idle RTT p50 {} ms p99 {} ms; under a {} MiB/s flood p50 {} ms p99 {} ms; cancel acked in {} ms",
                    ctx.reps,
                    num(bp50),
                    num(bp99),
                    num(rate),
                    num(tp50),
                    num(tp99),
                    num(ack.as_secs_f64() * 1000.0)
                ),
            );
            b50.push(bp50);
            b99.push(bp99);
            t50.push(tp50);
            t99.push(tp99);
            rates.push(rate);
            acks.push(ack.as_secs_f64() * 1000.0);
        }
        let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
        let rate = stats(rates)?;
        let ack = stats(acks)?;
        let scenario = format!("{n} pings every 10 ms, a build flooding the session");
        let base = "same session, no flood".to_owned();
        ctx.chart(Chart::Distribution {
            id: "ping-under-flood".into(),
            title: format!("{scenario}: Ping to Pong"),
            unit: "ms".into(),
            series: vec![("tether, under the flood".into(), all_t), (base.clone(), all_b)],
        });
        Ok(vec![
            Row {
                scenario: scenario.clone(),
                metric: "RTT p50".into(),
                unit: "ms",
                tether: stats(t50)?,
                baseline: Some((base.clone(), stats(b50)?)),
                goal: Goal::None,
                notes: Vec::new(),
            },
            Row {
                scenario,
                metric: "RTT p99".into(),
                unit: "ms",
                tether: stats(t99)?,
                baseline: Some((base, stats(b99)?)),
                goal: Goal::AtMost(GOAL_P99_MS),
                notes: vec![
                    format!(
                        "flood output read by the bench while pinging: {} MiB/s [{}-{}]",
                        num(rate.median),
                        num(rate.min),
                        num(rate.max)
                    ),
                    format!(
                        "slowest single ping: {} ms under the flood, {} ms without",
                        num(t_max),
                        num(b_max)
                    ),
                    format!(
                        "Cancel of the flood acknowledged in {} ms [{}-{}]",
                        num(ack.median),
                        num(ack.min),
                        num(ack.max)
                    ),
                ],
            },
        ])
    }
}
