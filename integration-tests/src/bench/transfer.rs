//! Scenario: moving a mixed tree of 1 GiB (quick: 128 MiB) into and out of a build's
//! work dir. The tree is about 40% one large file, 30% medium files of ~10 MiB and 30%
//! small files of 1-64 KiB over nested directories, plus a few empty dirs and symlinks.
//!
//! - upload: `tether run --upload SRC/. --sh true` (the whole client's wall time)
//!   against `tar -C SRC -cf - . | tar -C DST -xf -` into an empty DST;
//! - download: the time of `--download .:DST`, as B - A where A is
//!   `tether run --sh 'cp -a SRC/. .'` and B the same with the download, against the
//!   same baseline;
//! - memory: the client's peak RSS (`ru_maxrss` of that very child, from `wait4`) and
//!   the daemon's (VmHWM after all the runs).
//!
//! Each command is run once untimed first (the tree in the page cache); then the
//! repetitions are interleaved, the baseline first. The first downloaded DST is checked
//! against the source (counts, bytes, sha256 of the large file).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

use crate::procs::Captured;
use crate::report::{num, size_label, Goal, Row, Stats};
use crate::scenario::{Ctx, Scenario};
use crate::socket_daemon::SocketDaemon;

pub struct Transfer;

const MIB: f64 = (1u64 << 20) as f64;
const KIB: u64 = 1 << 10;
/// The memory goal, for the client and the daemon alike.
const RSS_GOAL_MIB: f64 = 64.0;
/// Small files per directory.
const PER_DIR: usize = 40;

/// xorshift64*: fast, deterministic, incompressible enough.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// Writes a file of `bytes` fresh pseudo-random bytes (no block repeats).
fn write_random(path: &Path, bytes: u64, rng: &mut Rng, buf: &mut [u8]) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

fn mkdirs(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))
}

fn symlink(target: &str, link: &Path) -> anyhow::Result<()> {
    std::os::unix::fs::symlink(target, link).with_context(|| format!("cannot create the symlink {}", link.display()))
}

/// Builds the tree of about `total` bytes in `root` (which must not exist).
fn build_tree(root: &Path, total: u64, quick: bool) -> anyhow::Result<()> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut buf = vec![0u8; 1 << 20];
    mkdirs(root)?;

    // 40%: one large file.
    let large = total * 4 / 10;
    write_random(&root.join("large.bin"), large, &mut rng, &mut buf)?;

    // 30%: medium files of ~10 MiB (sizes vary by +-5%, their sum is kept).
    let media = root.join("media");
    mkdirs(&media)?;
    let count: u64 = if quick { 4 } else { 30 };
    let medium_total = total * 3 / 10;
    let base = medium_total / count;
    let mut written = 0;
    for i in 0..count {
        let size = if i + 1 == count {
            medium_total - written
        } else {
            base - base / 20 + rng.next() % (base / 10)
        };
        write_random(&media.join(format!("m{i:02}.bin")), size, &mut rng, &mut buf)?;
        written += size;
    }

    // The rest: small files of 1-64 KiB, PER_DIR per directory, some of them nested deeper.
    let small_total = total - large - medium_total;
    let small = root.join("small");
    let mut written = 0;
    let mut i = 0usize;
    let mut made = None;
    while written < small_total {
        let k = i / PER_DIR;
        let mut dir = small.join(format!("d{:02}", k % 16)).join(format!("e{:02}", k / 16));
        if k % 3 == 1 {
            dir.push("deeper/still");
        }
        if made.as_ref() != Some(&dir) {
            mkdirs(&dir)?;
            made = Some(dir.clone());
        }
        let size = rng.between(KIB, 64 * KIB).min(small_total - written);
        write_random(&dir.join(format!("f{i:05}.dat")), size, &mut rng, &mut buf)?;
        written += size;
        i += 1;
    }

    // A few empty dirs and symlinks (to a file, to a directory, across directories).
    for d in ["empty", "small/d00/empty", "nested/a/b/c/empty"] {
        mkdirs(&root.join(d))?;
    }
    symlink("large.bin", &root.join("large.link"))?;
    symlink("m00.bin", &media.join("first.link"))?;
    symlink("d01", &small.join("d01.link"))?;
    symlink("../../../large.bin", &small.join("d00/e00/large.link"))?;
    Ok(())
}

/// A cheap fingerprint of a tree: what is in it, and the large file's sha256.
#[derive(Debug, Default, PartialEq, Eq, Clone)]
struct Fingerprint {
    files: u64,
    dirs: u64,
    symlinks: u64,
    bytes: u64,
    large_sha256: String,
}

impl Fingerprint {
    fn of(root: &Path) -> anyhow::Result<Fingerprint> {
        let mut fp = Fingerprint::default();
        let mut todo = vec![root.to_path_buf()];
        while let Some(dir) = todo.pop() {
            for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
                let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
                let t = e
                    .file_type()
                    .with_context(|| format!("cannot stat {}", e.path().display()))?;
                if t.is_dir() {
                    fp.dirs += 1;
                    todo.push(e.path());
                } else if t.is_symlink() {
                    fp.symlinks += 1;
                } else if t.is_file() {
                    fp.files += 1;
                    let m = e
                        .metadata()
                        .with_context(|| format!("cannot stat {}", e.path().display()))?;
                    fp.bytes += m.len();
                }
            }
        }
        let large = root.join("large.bin");
        if large.is_file() {
            fp.large_sha256 = sha256_file(&large)?;
        }
        Ok(fp)
    }

    fn describe(&self) -> String {
        format!(
            "{} files ({} bytes), {} dirs, {} symlinks",
            self.files, self.bytes, self.dirs, self.symlinks
        )
    }
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `'path'` for sh.
fn sh_quote(p: &Path) -> anyhow::Result<String> {
    let s = p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))?;
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

/// One run of a command, reaped by the bench itself.
struct Reaped {
    wall: Duration,
    /// Peak RSS of the command's own process (`ru_maxrss` from `wait4`; it also covers
    /// descendants it waited for, and the tether client starts none).
    maxrss_kib: u64,
}

/// Runs `cmd` (stdin and stdout /dev/null, stderr captured, its own process group),
/// timing it from spawn to exit, and reaps it with `wait4` to read its own rusage.
/// Fails if it exits unsuccessfully, runs longer than `timeout` (its group is killed),
/// or, when `quiet`, writes anything to stderr (a tether client says so when a transfer
/// failed, even when the build's own status stands).
fn run_reaped(mut cmd: Command, what: &str, quiet: bool, timeout: Duration) -> anyhow::Result<Reaped> {
    let mut stderr = Captured::new()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr.stdio()?)
        .process_group(0);
    let t0 = Instant::now();
    // std's Child never reaps on its own (nor on drop): the pid stays ours to wait4 for.
    let child = cmd.spawn().with_context(|| format!("cannot start {what}"))?;
    let pid = child.id() as libc::pid_t;
    drop(child);
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 only writes the status and the rusage it is given.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            break;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).with_context(|| format!("cannot wait for {what}"));
        }
        if t0.elapsed() >= timeout {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            // SAFETY: as above; blocking until the killed child is reaped.
            unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            bail!("{what} did not finish within {timeout:?}; killed{}", stderr.suffix());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = t0.elapsed();
    let st = ExitStatus::from_raw(status);
    if !st.success() {
        bail!("{what} failed ({st}){}", stderr.suffix());
    }
    let said = stderr.tail(2000);
    if quiet && !said.is_empty() {
        bail!("{what} exited 0 but wrote to stderr: {said}");
    }
    Ok(Reaped {
        wall,
        maxrss_kib: ru.ru_maxrss as u64,
    })
}

/// Removes `dst` if it is there and creates it empty; then flushes dirty pages, so that
/// the write-back of a previous run does not land inside the next timed one.
fn fresh_dir(dst: &Path) -> anyhow::Result<()> {
    if dst.exists() {
        std::fs::remove_dir_all(dst).with_context(|| format!("cannot remove {}", dst.display()))?;
    }
    std::fs::create_dir(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    Ok(())
}

/// What the runs measured.
struct Measured {
    tree: Fingerprint,
    /// MiB/s per repetition.
    base: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
    /// Seconds per repetition of the download's two runs (A without, B with).
    a_secs: Vec<f64>,
    b_secs: Vec<f64>,
    /// The client's peak RSS (MiB) per repetition.
    up_rss: Vec<f64>,
    down_rss: Vec<f64>,
    /// Largest client peak of any run, warm-ups included (MiB).
    client_max: f64,
    daemon_hwm: f64,
    build_secs: f64,
}

fn measure(ctx: &Ctx, id: &str, total: u64, src: &Path, dst: &Path) -> anyhow::Result<Measured> {
    let reps = ctx.reps.min(if ctx.quick { 1 } else { 3 });
    let timeout = Duration::from_secs(60).max(Duration::from_secs(total / (5 << 20)));
    let t0 = Instant::now();
    build_tree(src, total, ctx.quick)?;
    let tree = Fingerprint::of(src)?;
    let build_secs = t0.elapsed().as_secs_f64();
    ctx.progress(id, &format!("built the tree in {build_secs:.1} s: {}", tree.describe()));
    let (qsrc, qdst) = (sh_quote(src)?, sh_quote(dst)?);
    let src_contents = format!("{}/.", src.to_str().context("the tree's path is not UTF-8")?);
    let dst_str = dst.to_str().context("the destination's path is not UTF-8")?;

    let d = SocketDaemon::start(ctx, "transfer", &[])?;
    let baseline = || {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("tar -C {qsrc} -cf - . | tar -C {qdst} -xf -"));
        cmd
    };
    let upload = |script: &str| {
        let mut cmd = d.client(ctx, "run");
        cmd.args(["--no-progress", "--upload", &src_contents, "--sh", script]);
        cmd
    };
    let copy = |download: bool| {
        let mut cmd = d.client(ctx, "run");
        cmd.arg("--no-progress");
        if download {
            cmd.arg("--download").arg(format!(".:{dst_str}"));
        }
        cmd.args(["--sh", &format!("cp -a {qsrc}/. .")]);
        cmd
    };
    let (up_what, a_what, b_what) = (
        "tether run --upload SRC/.",
        "tether run --sh 'cp -a SRC/. .'",
        "tether run --sh 'cp -a SRC/. .' --download .:DST",
    );
    let compare = |what: &str| -> anyhow::Result<()> {
        let got = Fingerprint::of(dst)?;
        if got != tree {
            bail!(
                "{what} does not match the source: {} and large.bin sha256 {:?} instead of {} and {}",
                got.describe(),
                got.large_sha256,
                tree.describe(),
                tree.large_sha256
            );
        }
        Ok(())
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut client_max: f64 = 0.0;

    // Untimed warm-ups, each checked: the tree in the page cache, the daemon's first
    // allocations made.
    fresh_dir(dst)?;
    run_reaped(baseline(), "tar|tar", false, timeout)?;
    compare("the tree tar|tar copied")?;
    let check = format!(
        "test \"$(find . -type f | wc -l)\" -eq {} && test \"$(find . -type l | wc -l)\" -eq {} \
         && cmp -s large.bin {qsrc}/large.bin || {{ echo 'the uploaded tree differs from the source' >&2; exit 1; }}",
        tree.files, tree.symlinks
    );
    client_max = client_max.max(mib(run_reaped(upload(&check), up_what, true, timeout)?.maxrss_kib));
    run_reaped(copy(false), a_what, true, timeout)?;
    fresh_dir(dst)?;
    client_max = client_max.max(mib(run_reaped(copy(true), b_what, true, timeout)?.maxrss_kib));
    compare("the downloaded tree")?;
    ctx.progress(
        id,
        "warm-up done; the uploaded and the downloaded trees match the source",
    );

    let rate = |secs: f64| tree.bytes as f64 / MIB / secs;
    let mut m = Measured {
        tree: tree.clone(),
        base: vec![],
        up: vec![],
        down: vec![],
        a_secs: vec![],
        b_secs: vec![],
        up_rss: vec![],
        down_rss: vec![],
        client_max: 0.0,
        daemon_hwm: 0.0,
        build_secs,
    };
    for rep in 1..=reps {
        let r = (|| -> anyhow::Result<()> {
            fresh_dir(dst)?;
            let b = run_reaped(baseline(), "tar|tar", false, timeout)?;
            fresh_dir(dst)?;
            let u = run_reaped(upload("true"), up_what, true, timeout)?;
            let a = run_reaped(copy(false), a_what, true, timeout)?;
            fresh_dir(dst)?;
            let bb = run_reaped(copy(true), b_what, true, timeout)?;
            let (a_s, b_s) = (a.wall.as_secs_f64(), bb.wall.as_secs_f64());
            if b_s <= a_s {
                bail!("the run with the download ({b_s:.3} s) was not slower than the one without ({a_s:.3} s)");
            }
            let (base, up, down) = (rate(b.wall.as_secs_f64()), rate(u.wall.as_secs_f64()), rate(b_s - a_s));
            ctx.progress(
                id,
                &format!(
                    "rep {rep}/{reps}: tar|tar {} MiB/s, upload {} MiB/s, download {} MiB/s ({b_s:.2} s - {a_s:.2} s); \
                     client peak {} / {} MiB",
                    num(base),
                    num(up),
                    num(down),
                    num(mib(u.maxrss_kib)),
                    num(mib(bb.maxrss_kib))
                ),
            );
            m.base.push(base);
            m.up.push(up);
            m.down.push(down);
            m.a_secs.push(a_s);
            m.b_secs.push(b_s);
            m.up_rss.push(mib(u.maxrss_kib));
            m.down_rss.push(mib(bb.maxrss_kib));
            client_max = client_max.max(mib(u.maxrss_kib)).max(mib(bb.maxrss_kib));
            Ok(())
        })();
        r.with_context(|| format!("repetition {rep}"))?;
    }
    m.client_max = client_max;
    m.daemon_hwm = mib(d.status()?.hwm_kib);
    d.stop()?;
    Ok(m)
}

impl Scenario for Transfer {
    fn id(&self) -> &'static str {
        "transfer"
    }

    fn run(&self, ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
        let total: u64 = if ctx.quick { 128 << 20 } else { 1 << 30 };
        let src = ctx.tmpdir.join("transfer-src");
        let dst = ctx.tmpdir.join("transfer-dst");
        for p in [&src, &dst] {
            if p.exists() {
                std::fs::remove_dir_all(p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        let result = measure(ctx, self.id(), total, &src, &dst);
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(&dst);
        let m = result?;

        let stats = |v: &[f64]| Stats::of(v.to_vec()).context("no repetitions");
        let size = size_label(total);
        let reps = m.base.len();
        let tree = format!("{size} tree of {} files", m.tree.files);
        let base = || -> anyhow::Result<Option<(String, Stats)>> { Ok(Some(("tar|tar".to_owned(), stats(&m.base)?))) };
        let common = format!(
            "{reps} interleaved repetitions after one untimed run of each (warm cache); baseline \
             `tar -C SRC -cf - . | tar -C DST -xf -` into an empty DST; the tree: 40% one file, 30% in ~10 MiB \
             files, 30% in 1-64 KiB files over nested dirs, plus empty dirs and symlinks (built in {:.1} s)",
            m.build_secs
        );
        let verdict = |x: f64| if x < RSS_GOAL_MIB { "met" } else { "NOT met" };
        let mem_note = |v: &[f64]| {
            let max = v.iter().copied().fold(0.0, f64::max);
            format!(
                "ru_maxrss of the tether client itself (wait4 on its pid); goal < {RSS_GOAL_MIB} MiB: largest of the {reps} timed runs {} MiB ({}); largest of any client run \
                 (warm-ups included) {} MiB",
                num(max),
                verdict(max),
                num(m.client_max)
            )
        };
        Ok(vec![
            Row {
                scenario: format!("upload a {tree} (socket, warm cache)"),
                metric: "throughput".into(),
                unit: "MiB/s",
                tether: stats(&m.up)?,
                baseline: base()?,
                goal: Goal::RatioAtLeast(0.7),
                notes: vec![
                    "`tether run --upload SRC/. --sh true`: the whole client's wall time (build start, upload, \
                     the command, the work dir's removal)"
                        .to_owned(),
                    common.clone(),
                ],
            },
            Row {
                scenario: format!("download a {tree} (socket, warm cache)"),
                metric: "throughput".into(),
                unit: "MiB/s",
                tether: stats(&m.down)?,
                baseline: base()?,
                goal: Goal::RatioAtLeast(0.7),
                notes: vec![
                    format!(
                        "the time of `--download .:DST` is B - A, B = `tether run --sh 'cp -a SRC/. .' --download .:DST` \
                         (median {} s), A = the same without the download (median {} s); the first download matched \
                         the source (counts, bytes, sha256 of the large file)",
                        num(stats(&m.b_secs)?.median),
                        num(stats(&m.a_secs)?.median)
                    ),
                    common,
                ],
            },
            Row {
                scenario: format!("upload a {size} tree"),
                metric: "client peak RSS".into(),
                unit: "MiB",
                tether: stats(&m.up_rss)?,
                baseline: None,
                goal: Goal::AtMost(RSS_GOAL_MIB),
                notes: vec![mem_note(&m.up_rss)],
            },
            Row {
                scenario: format!("download a {size} tree"),
                metric: "client peak RSS".into(),
                unit: "MiB",
                tether: stats(&m.down_rss)?,
                baseline: None,
                goal: Goal::AtMost(RSS_GOAL_MIB),
                notes: vec![mem_note(&m.down_rss)],
            },
            Row {
                scenario: format!("upload and download a {size} tree"),
                metric: "daemon peak RSS".into(),
                unit: "MiB",
                tether: stats(&[m.daemon_hwm])?,
                baseline: None,
                goal: Goal::AtMost(RSS_GOAL_MIB),
                notes: vec![format!(
                    "VmHWM of the socket daemon after every run (warm-ups included); goal < {RSS_GOAL_MIB} MiB: {}",
                    verdict(m.daemon_hwm)
                )],
            },
        ])
    }
}
