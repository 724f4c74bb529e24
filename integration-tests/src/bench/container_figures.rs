//! Scenario `container`: tether as a build container's command.
//!
//! * Idle memory of tether as PID 1 of a runc container (after one session and one
//!   build), next to `cat` and `busybox cat` as PID 1 of the same kind of container
//!   (VmRSS of the container's init, read on the host).
//! * Exec to Welcome: from spawning `tether serve --exit-on-eof` (preamble and Hello
//!   written at once) to decoding its Welcome, next to spawning `cat` and reading back
//!   the byte written to it. Median and p99 over many fresh processes.
//! * The static binary's size.
//!
//! The containers need root, runc and a static busybox, and the static binary
//! (`scripts/build-static`); without them that part is skipped with the reason shown.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use integration_tests::container::{runc_skip_reason, Bundle, STATE_DIR, TETHER_PATH};
use integration_tests::DaemonLink;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tether_protocol::{
    decode, encode_frame, ClientMessage, CommandSpec, DaemonMessage, Decoded, ExitStatus, FrameDecoder, Hello, RunSpec,
    PREAMBLE, PROTOCOL_VERSION,
};

use crate::procs::{proc_status, stop, wait_timeout, Captured, ProcStatus};
use crate::report::{percentile, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};

pub struct ContainerFigures;

/// How long a process idles before its memory is read.
const IDLE: Duration = Duration::from_millis(500);
const RSS_GOAL_KIB: f64 = 5.0 * 1024.0;
const WELCOME_GOAL_MS: f64 = 5.0;
const SIZE_GOAL_MIB: f64 = 10.0;
/// Fresh processes per exec-to-first-answer series (full, quick).
const SPAWNS: (usize, usize) = (200, 30);
/// Untimed rounds first (page cache, lazy kernel state).
const WARMUP: usize = 3;
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// `scripts/build-static`'s output (under `$CARGO_TARGET_DIR` if set).
pub fn static_tether() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest);
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => root.join(t),
        None => root.join("target"),
    };
    target.join(TARGET).join("release").join("tether")
}

/// Runs `f`, turning a panic of the test helpers it uses into an error.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            bail!("{what} panicked: {msg}")
        }
    }
}

// ---------------------------------------------------------------------------------------
// (a) Idle memory as PID 1
// ---------------------------------------------------------------------------------------

/// The command of a baseline container.
#[derive(Clone, Copy)]
enum Baseline {
    /// The host's `cat` (coreutils, dynamically linked), with its libraries copied in.
    Cat,
    /// The rootfs's static busybox, as `cat`.
    BusyboxCat,
}

impl Baseline {
    fn name(self) -> &'static str {
        match self {
            Baseline::Cat => "cat",
            Baseline::BusyboxCat => "busybox cat",
        }
    }
}

/// The host's `cat` executable.
fn host_cat() -> anyhow::Result<PathBuf> {
    ["/usr/bin/cat", "/bin/cat"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("no cat in /usr/bin or /bin")
}

/// Copies `exe` and every library `ldd` lists for it into `rootfs`, at the same paths.
fn copy_with_libraries(exe: &Path, rootfs: &Path) -> anyhow::Result<()> {
    let out = Command::new("ldd")
        .arg(exe)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ldd")?;
    let mut files = vec![exe.to_path_buf()];
    if out.status.success() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = line.split_whitespace().find(|w| w.starts_with('/')).map(PathBuf::from);
            files.extend(path);
        }
    }
    for f in files {
        let dst = rootfs.join(f.strip_prefix("/").unwrap_or(&f));
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::copy(&f, &dst).with_context(|| format!("cannot copy {} into the rootfs", f.display()))?;
    }
    Ok(())
}

/// Runs a baseline as PID 1 of a container, has it echo one line, idles, and reads the
/// memory of the container's init.
fn idle_baseline(which: Baseline) -> anyhow::Result<ProcStatus> {
    guarded(which.name(), || {
        let argv: Vec<String> = match which {
            Baseline::Cat => vec![host_cat()?.display().to_string()],
            Baseline::BusyboxCat => vec!["/busybox/cat".to_owned()],
        };
        let bundle = Bundle::builder().without_tether().args(argv.clone()).build();
        if let Baseline::Cat = which {
            copy_with_libraries(Path::new(&argv[0]), &bundle.rootfs())?;
        }
        let mut cmd = bundle.run_command();
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().context("cannot start runc run")?;
        let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("runc run has no stdio pipes");
        };
        let result = (|| {
            stdin.write_all(b"x\n").context("cannot write to the container")?;
            let mut echo = [0u8; 2];
            stdout.read_exact(&mut echo).context("the container did not echo")?;
            std::thread::sleep(IDLE);
            let pid = bundle.host_pid().context("the container is not running")?;
            proc_status(pid as u32)
        })();
        drop(stdin);
        if wait_timeout(&mut child, Duration::from_secs(10))?.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        result
    })
}

/// tether as PID 1 (`serve` on the container's stdio): one session and one build, idle,
/// memory, then SIGTERM (`runc kill`) and a clean exit.
fn idle_tether(static_bin: &Path) -> anyhow::Result<ProcStatus> {
    guarded("tether as PID 1", || {
        let args = [TETHER_PATH, "serve", "--state-dir", STATE_DIR, "--log-level", "warn"];
        let bundle = Bundle::builder().without_tether().args(args).build();
        let dst = bundle.rootfs().join(TETHER_PATH.trim_start_matches('/'));
        std::fs::copy(static_bin, &dst).with_context(|| format!("cannot copy {}", static_bin.display()))?;
        let mut s = bundle.start();
        s.expect_preamble();
        s.hello();
        let build = s.start_build(1, RunSpec::new(CommandSpec::argv(["true"]))).build;
        let exited = s.wait_exited(&build).exited.context("no Exited")?;
        if exited.status != ExitStatus::Code(0) {
            bail!("`true` ended {:?}", exited.status);
        }
        std::thread::sleep(IDLE);
        let pid = bundle.host_pid().context("the container is not running")?;
        let status = proc_status(pid as u32)?;
        bundle.kill("TERM");
        match s.wait_timeout(Duration::from_secs(10)) {
            Some(st) if st.success() => Ok(status),
            Some(st) => bail!("tether as PID 1 exited with {st} on SIGTERM: {}", s.stderr.text()),
            None => bail!("tether as PID 1 still runs 10 s after SIGTERM"),
        }
    })
}

fn idle_rows(ctx: &Ctx, static_bin: &Path) -> anyhow::Result<Vec<Row>> {
    let id = "container";
    let (mut cat, mut bb, mut teth) = (vec![], vec![], vec![]);
    let (mut hwm, mut threads) = (0u64, 0u64);
    for rep in 1..=ctx.reps {
        let c = idle_baseline(Baseline::Cat).with_context(|| format!("repetition {rep}: cat as PID 1"))?;
        let b = idle_baseline(Baseline::BusyboxCat).with_context(|| format!("repetition {rep}: busybox cat"))?;
        let t = idle_tether(static_bin).with_context(|| format!("repetition {rep}: tether as PID 1"))?;
        cat.push(c.rss_kib as f64);
        bb.push(b.rss_kib as f64);
        teth.push(t.rss_kib as f64);
        hwm = hwm.max(t.hwm_kib);
        threads = threads.max(t.threads);
        ctx.progress(
            id,
            &format!(
                "rep {rep}/{}: PID 1 VmRSS: cat {} KiB, busybox cat {} KiB, tether {} KiB",
                ctx.reps, c.rss_kib, b.rss_kib, t.rss_kib
            ),
        );
    }
    let scenario = "tether as PID 1 of a runc container, idle (after 1 session + 1 build)".to_owned();
    let stats = |v: Vec<f64>| Stats::of(v).context("no repetitions");
    let tether = stats(teth)?;
    Ok(vec![
        Row {
            scenario: scenario.clone(),
            metric: "VmRSS".into(),
            unit: "KiB",
            tether: tether.clone(),
            baseline: Some(("cat as PID 1".to_owned(), stats(cat)?)),
            goal: Goal::AtMost(RSS_GOAL_KIB),
            notes: vec![format!(
                "tether as PID 1: peak VmHWM {hwm} KiB, {threads} threads; static binary {}",
                static_bin.display()
            )],
        },
        Row {
            scenario,
            metric: "VmRSS".into(),
            unit: "KiB",
            tether,
            baseline: Some(("busybox cat as PID 1".to_owned(), stats(bb)?)),
            goal: Goal::None,
            notes: Vec::new(),
        },
    ])
}

// ---------------------------------------------------------------------------------------
// (b) Exec to the first answer
// ---------------------------------------------------------------------------------------

/// Reads at least one byte from `out` into `buf`, or fails at EOF or the deadline.
fn read_some(out: &mut ChildStdout, buf: &mut [u8], deadline: Instant) -> anyhow::Result<usize> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer in time");
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(anyhow!(e).context("cannot poll")),
        }
        match out.read(buf) {
            Ok(0) => bail!("the process closed its stdout"),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow!(e).context("cannot read")),
        }
    }
}

/// Closes the child's stdin and waits for its exit (killing it after 10 s).
fn finish(mut child: Child, what: &str, stderr: Option<&mut Captured>) -> anyhow::Result<()> {
    drop(child.stdin.take());
    let (st, killed) = stop_after_eof(&mut child)?;
    if killed || !st.success() {
        let why = stderr.map(|s| s.suffix()).unwrap_or_default();
        bail!("{what} ended with {st} after its stdin closed (killed: {killed}){why}");
    }
    Ok(())
}

fn stop_after_eof(child: &mut Child) -> anyhow::Result<(std::process::ExitStatus, bool)> {
    if let Some(st) = wait_timeout(child, Duration::from_secs(10))? {
        return Ok((st, false));
    }
    stop(child, nix::sys::signal::Signal::SIGKILL, false, Duration::from_secs(5))
}

/// From spawning `cat` to reading back the byte written to it.
fn cat_first_byte() -> anyhow::Result<Duration> {
    let mut cmd = Command::new("cat");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("cannot start cat")?;
    let (Some(stdin), Some(stdout)) = (child.stdin.as_mut(), child.stdout.as_mut()) else {
        bail!("cat has no stdio pipes");
    };
    stdin.write_all(b"x").context("cannot write to cat")?;
    let mut b = [0u8; 1];
    read_some(stdout, &mut b, t0 + Duration::from_secs(10)).context("waiting for cat's echo")?;
    let took = t0.elapsed();
    finish(child, "cat", None)?;
    Ok(took)
}

/// From spawning `tether serve --exit-on-eof` (preamble and Hello written at once) to
/// decoding its Welcome.
fn tether_welcome(ctx: &Ctx, bin: &Path, hello: &[u8]) -> anyhow::Result<Duration> {
    let mut stderr = Captured::new()?;
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--exit-on-eof", "--log-level", "warn"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr.stdio()?);
    for (k, v) in ctx.tether_env() {
        cmd.env(k, v);
    }
    let mut dec = FrameDecoder::new();
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
    let deadline = t0 + Duration::from_secs(10);
    let result = (|| {
        let (Some(stdin), Some(stdout)) = (child.stdin.as_mut(), child.stdout.as_mut()) else {
            bail!("tether serve has no stdio pipes");
        };
        stdin.write_all(hello).context("cannot send the preamble and Hello")?;
        loop {
            while let Some(item) = dec.decode() {
                match item {
                    Decoded::Preamble => {}
                    Decoded::Frame(p) => match decode::<DaemonMessage>(p)? {
                        DaemonMessage::Welcome(_) => return Ok(t0.elapsed()),
                        // The stream's announcement of its holder, for other clients.
                        DaemonMessage::Channel(_) => {}
                        DaemonMessage::Error(e) => bail!("Hello refused: {:?}: {}", e.kind, e.message),
                        m => bail!("unexpected message before Welcome: {m:?}"),
                    },
                    Decoded::Corrupt(c) => bail!("damaged stream: {c}"),
                }
            }
            let n = read_some(stdout, dec.read_buf(), deadline).context("waiting for Welcome")?;
            dec.commit(n);
        }
    })();
    let took = match result {
        Ok(t) => t,
        Err(e) => {
            let _ = stop(
                &mut child,
                nix::sys::signal::Signal::SIGKILL,
                false,
                Duration::from_secs(5),
            );
            return Err(e.context(format!("tether serve{}", stderr.suffix())));
        }
    };
    finish(child, "tether serve --exit-on-eof", Some(&mut stderr))?;
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn welcome_rows(ctx: &Ctx, bin: &Path) -> anyhow::Result<Vec<Row>> {
    let id = "container";
    let n = if ctx.quick { SPAWNS.1 } else { SPAWNS.0 };
    let mut hello = PREAMBLE.to_vec();
    let msg = ClientMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        client_version: concat!("bench-", env!("CARGO_PKG_VERSION")).to_owned(),
        capabilities: Vec::new(),
    });
    encode_frame(&msg, &mut hello).context("cannot encode Hello")?;
    for _ in 0..WARMUP {
        cat_first_byte().context("warm-up: cat")?;
        tether_welcome(ctx, bin, &hello).context("warm-up: tether")?;
    }
    let (mut cat, mut teth) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 1..=n {
        cat.push(ms(cat_first_byte().with_context(|| format!("spawn {i}: cat"))?));
        teth.push(ms(
            tether_welcome(ctx, bin, &hello).with_context(|| format!("spawn {i}: tether"))?
        ));
        if i % 50 == 0 || i == n {
            ctx.progress(id, &format!("exec to first answer: {i}/{n}"));
        }
    }
    let (cat_p99, teth_p99) = (percentile(&cat, 99.0), percentile(&teth, 99.0));
    let scenario = format!("exec to Welcome, fresh tether serve --exit-on-eof (n={n})");
    let baseline = format!("cat, exec to echo of 1 byte (n={n})");
    let stats = |v: Vec<f64>| Stats::of(v).context("no samples");
    Ok(vec![
        Row {
            scenario: scenario.clone(),
            metric: "median".into(),
            unit: "ms",
            tether: stats(teth)?,
            baseline: Some((baseline.clone(), stats(cat)?)),
            goal: Goal::AtMost(WELCOME_GOAL_MS),
            notes: vec![format!(
                "timed from just before spawn to Welcome decoded (preamble and Hello written at once); \
                 p99 is the 99th percentile of the same samples; binary {}",
                bin.display()
            )],
        },
        Row {
            scenario,
            metric: "p99".into(),
            unit: "ms",
            tether: stats(vec![teth_p99])?,
            baseline: Some((baseline, stats(vec![cat_p99])?)),
            goal: Goal::None,
            notes: Vec::new(),
        },
    ])
}

// ---------------------------------------------------------------------------------------
// (c) Size
// ---------------------------------------------------------------------------------------

fn size_row(bin: &Path, is_static: bool, dynamic: &Path) -> anyhow::Result<Row> {
    let mib = |p: &Path| -> anyhow::Result<f64> {
        let len = std::fs::metadata(p)
            .with_context(|| format!("cannot stat {}", p.display()))?
            .len();
        Ok(len as f64 / (1024.0 * 1024.0))
    };
    let mut notes = vec![format!("{}", bin.display())];
    if !is_static {
        notes.push("the static binary is missing (scripts/build-static): this is the dynamic one".to_owned());
    } else if let Ok(d) = mib(dynamic) {
        notes.push(format!(
            "the dynamic release binary ({}) is {d:.2} MiB",
            dynamic.display()
        ));
    }
    Ok(Row {
        scenario: if is_static {
            "static tether binary"
        } else {
            "tether binary (dynamic)"
        }
        .to_owned(),
        metric: "size".into(),
        unit: "MiB",
        tether: Stats::of(vec![mib(bin)?]).context("no size")?,
        baseline: None,
        goal: Goal::AtMost(SIZE_GOAL_MIB),
        notes,
    })
}

impl Scenario for ContainerFigures {
    fn id(&self) -> &'static str {
        "container"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let static_bin = static_tether();
        let is_static = static_bin.is_file();
        let bin = if is_static {
            static_bin.clone()
        } else {
            ctx.tether.clone()
        };
        let mut rows = Vec::new();

        // (a) Needs root, runc, a static busybox and the static binary.
        let skip = match runc_skip_reason() {
            Some(why) => Some(why.to_owned()),
            None if !is_static => Some(format!("{} is missing (scripts/build-static)", static_bin.display())),
            None => None,
        };
        let mut skipped_note = None;
        match skip {
            Some(why) => {
                ctx.progress(self.id(), &format!("PID 1 memory skipped: {why}"));
                skipped_note = Some(format!("PID 1 memory in a runc container skipped: {why}"));
            }
            None => rows.extend(idle_rows(ctx, &static_bin)?),
        }

        // (b)
        let mut welcome = welcome_rows(ctx, &bin)?;
        if let Some(note) = skipped_note {
            welcome[0].notes.push(note);
        }
        rows.extend(welcome);

        // (c)
        rows.push(size_row(&bin, is_static, &ctx.tether)?);
        Ok(rows)
    }
}
