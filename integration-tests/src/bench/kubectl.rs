//! Scenario `kubectl`: a build container reached through the real `kubectl`, against
//! the Kubernetes API server of `integration_tests::k8s` (attach and exec over
//! WebSocket, the CRI's stream semantics, tether as PID 1 of a runc container).
//!
//! 1. **Per step**, a `true` step, p50 and p99, per repetition: `kubectl exec POD -c CTR
//!    -- true` per step (the baseline: how Jenkins' `container()` runs each `sh` step)
//!    against `tether run --socket RELAY -- true` through one `tether relay --via
//!    'kubectl attach -i POD -c CTR'` (what parallel pipeline steps share), and against
//!    `tether run --via 'kubectl attach -i POD -c CTR' -- true`, a `kubectl attach` per
//!    step (which waits its turn on the daemon's stdin stream: at least the time the
//!    daemon takes to say it is free). Goal: the relay at least 20x faster than
//!    `kubectl exec` at p50.
//! 2. **Container log** bytes per byte of build output: a build printing text lines
//!    through the relay (its output travels over the daemon's stdout, which the container
//!    log keeps, in the CRI format with a record header per line) against the same build
//!    through the daemon's socket (which never touches stdout), and the log's growth
//!    while the daemon is idle with nobody attached (nothing at all).
//!
//! Needs root, runc, a static busybox, `scripts/build-static`'s binary and kubectl;
//! skipped (with the reason) without them. Limits: the API server runs on loopback and
//! does no authentication or admission, so every kubectl figure here is a floor: a real
//! cluster adds its round trips (API server, kubelet) to every exec and every attach, and
//! none to steps through a relay once it is connected.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use integration_tests::container::{runc_skip_reason, Bundle};
use integration_tests::k8s::{kubectl_skip_reason, ApiServer};

use crate::container_figures::guarded;
use crate::report::{Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::steps::{batch, latency_rows, speedup_row, Count, Series};

pub struct Kubectl;

const ID: &str = "kubectl";
const POD: &str = "agent-1";
const CTR: &str = "kaniko";
/// Steps per repetition (full, quick).
const STEPS: (usize, usize) = (100, 10);
/// ... of `kubectl attach` per step (each waits for the stream to be announced free).
const ATTACH_STEPS: (usize, usize) = (20, 3);
/// Output of the log-volume build (full, quick): lines of 100 bytes.
const LOG_LINES: (u64, u64) = (200_000, 20_000);
const LINE: u64 = 100;
/// How long the idle daemon's log is watched.
const IDLE: Duration = Duration::from_secs(3);

impl Scenario for Kubectl {
    fn id(&self) -> &'static str {
        ID
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        if let Some(why) = runc_skip_reason().or_else(kubectl_skip_reason) {
            ctx.progress(ID, &format!("skipped: {why}"));
            return Ok(Vec::new());
        }
        guarded(ID, || measure(ctx))
    }
}

fn pick<T: Copy>(ctx: &Ctx, v: (T, T)) -> T {
    if ctx.quick {
        v.1
    } else {
        v.0
    }
}

/// A running `tether relay`; stopped (SIGTERM: it says goodbye and frees the daemon's
/// stdin stream) when dropped.
struct Relay {
    child: std::process::Child,
}

impl Relay {
    fn start(ctx: &Ctx, attach: &str, sock: &std::path::Path) -> anyhow::Result<Relay> {
        let _ = std::fs::remove_file(sock);
        let child = ctx
            .tether_cmd()
            .args(["relay", "--via", attach, "--listen"])
            .arg(sock)
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start tether relay")?;
        let relay = Relay { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if Instant::now() > deadline {
                bail!("the relay never listened on {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(relay)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn measure(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let api = ApiServer::start();
    api.run_container(
        POD,
        CTR,
        Bundle::serve(&["--log-level", "warn", "--socket", "/kaniko/tether.sock"]),
    );
    let dir = tempfile::tempdir()?;
    let relay_sock = dir.path().join("relay.sock");
    let attach = api.kubectl_line(&format!("attach -i {POD} -c {CTR}"));
    let mut rows = steps(ctx, &api, &relay_sock, &attach)?;
    rows.extend(log_volume(ctx, &api, &relay_sock, &attach)?);
    Ok(rows)
}

fn steps(ctx: &Ctx, api: &ApiServer, relay_sock: &std::path::Path, attach: &str) -> anyhow::Result<Vec<Row>> {
    let mut exec = Series::new("kubectl exec per step");
    let mut relayed = Series::new("tether relay");
    let mut attached = Series::new("kubectl attach per step");
    for rep in 1..=ctx.reps {
        exec.reps
            .push(batch(Count::exact(pick(ctx, STEPS)), "kubectl exec", || {
                api.kubectl(["exec", POD, "-c", CTR, "--", "/busybox/true"])
            })?);
        attached.reps.push(batch(
            Count::exact(pick(ctx, ATTACH_STEPS)),
            "tether run over kubectl attach",
            || {
                let mut cmd = ctx.tether_cmd();
                cmd.args(["run", "--via", attach, "--", "true"]);
                cmd
            },
        )?);
        // The relay holds the daemon's stdin stream while it runs: attach steps above
        // ran without it, relay steps here (its start not timed: it is long-lived).
        let relay = Relay::start(ctx, attach, relay_sock)?;
        relayed.reps.push(batch(
            Count::exact(pick(ctx, STEPS)),
            "tether run through the relay",
            || {
                let mut cmd = ctx.tether_cmd();
                cmd.arg("run").arg("--socket").arg(relay_sock).args(["--", "true"]);
                cmd
            },
        )?);
        drop(relay);
        for s in [&exec, &relayed, &attached] {
            ctx.progress(ID, &format!("rep {rep}: {}", s.last()));
        }
    }
    let scenario = "step into a pod container (true)";
    let notes = vec![
        "loopback API server without authentication: a real cluster adds its round trips to every kubectl exec and attach, none to a step through a connected relay".to_owned(),
    ];
    let mut rows = latency_rows(
        &format!("{scenario}, relay vs kubectl exec"),
        &relayed,
        &exec,
        Goal::None,
        notes,
    )?;
    rows.push(speedup_row(
        &format!("{scenario}, relay vs kubectl exec"),
        &relayed,
        &exec,
    )?);
    rows.extend(latency_rows(
        &format!("{scenario}, kubectl attach per step vs kubectl exec"),
        &attached,
        &exec,
        Goal::None,
        vec!["each attach first listens until the daemon's stdin stream is announced free (up to 1.2 s, then a random turn of up to 0.4 s)".to_owned()],
    )?);
    Ok(rows)
}

/// Container-log bytes per output byte: through the relay, and through the socket.
fn log_volume(ctx: &Ctx, api: &ApiServer, relay_sock: &std::path::Path, attach: &str) -> anyhow::Result<Vec<Row>> {
    let lines = pick(ctx, LOG_LINES);
    let output = lines * LINE;
    // 99 characters and a newline per line.
    let script = format!("yes {} | head -n {lines}", "x".repeat(LINE as usize - 1));
    let mut via_relay = Vec::new();
    let mut via_socket = Vec::new();
    let mut idle = Vec::new();
    for rep in 1..=ctx.reps {
        let relay = Relay::start(ctx, attach, relay_sock)?;
        let before = api.log(POD, CTR).1;
        run_quiet(
            ctx.tether_cmd()
                .arg("run")
                .arg("--socket")
                .arg(relay_sock)
                .args(["--sh", &script]),
        )?;
        let relayed = api.log(POD, CTR).1 - before;
        drop(relay);
        // The socket is inside the container: reached with `kubectl exec ... dial-stdio`,
        // a private channel whose bytes never pass the daemon's stdout.
        let private = api.kubectl_line(&format!(
            "exec -i {POD} -c {CTR} -- /kaniko/tether dial-stdio --socket /kaniko/tether.sock"
        ));
        let before = api.log(POD, CTR).1;
        run_quiet(ctx.tether_cmd().args(["run", "--via", &private, "--sh", &script]))?;
        let socket = api.log(POD, CTR).1 - before;
        let before = api.log(POD, CTR).1;
        std::thread::sleep(IDLE);
        let quiet = api.log(POD, CTR).1 - before;
        ctx.progress(
            ID,
            &format!("rep {rep}: {output} output bytes: {relayed} log bytes through the relay, {socket} through the socket; {quiet} while idle"),
        );
        via_relay.push(relayed as f64 / output as f64);
        via_socket.push(socket as f64 / output as f64);
        idle.push(quiet as f64);
    }
    let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
    Ok(vec![
        Row {
            scenario: format!("container log, {lines} lines of {LINE} B"),
            metric: "log bytes per output byte".into(),
            unit: "B/B",
            tether: stats(via_relay)?,
            baseline: Some(("the same build through the socket".into(), stats(via_socket)?)),
            goal: Goal::None,
            notes: vec![
                "a build's output over the daemon's stdin stream is in the container log (the CRI format adds a timestamp, the stream and a tag to each line), as all output of an attached container is; through the socket it is not".into(),
            ],
        },
        Row {
            scenario: "container log, daemon idle with its stdin stream free".into(),
            metric: format!("bytes added in {} s", IDLE.as_secs()),
            unit: "B",
            tether: stats(idle)?,
            baseline: None,
            goal: Goal::AtMost(0.0),
            notes: Vec::new(),
        },
    ])
}

fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run tether")?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            cmd.get_program().to_string_lossy(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
