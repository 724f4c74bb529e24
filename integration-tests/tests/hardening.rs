//! Builds stay inside their lines, through the real binary: `--user` (the build owns its
//! directory and cannot read another's), `--limit` (a fork bomb under `nproc` is
//! contained while the daemon keeps answering pings), processes that escape the build's
//! process group (setsid + double fork) are hunted down by their cookie, `--max-builds`
//! and `--max-sessions` refuse with a clear error, a full state dir becomes a reported
//! gap while other builds go on, and path-like ids and names never name a file outside
//! the state dir.
//!
//! Switching users, mounting a tmpfs and counting another uid's processes need root: the
//! tests that do say so and return early elsewhere (CI runs them as root).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{pid_gone, run_cmd, run_on, tether, wait_until, DaemonLink, Proc, Serve, TIMEOUT};
use tether_protocol::{ClientMessage, DaemonMessage};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A temp dir that other users may pass through (builds running as them reach their own
/// directories in the state dir inside it).
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn serve_socket(dir: &Path, extra: &[&str]) -> (Serve, PathBuf) {
    let mut args = vec!["--log-level", "info"];
    args.extend_from_slice(extra);
    integration_tests::serve_socket(dir, &args)
}

/// The pids of every process whose real uid is `uid` (zombies included).
fn processes_of(uid: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid))
        .collect()
}

/// Round trips of `count` pings on the daemon's stdin stream.
fn ping_round_trips(serve: &mut Serve, count: u64) -> Vec<Duration> {
    (0..count)
        .map(|nonce| {
            let start = Instant::now();
            serve.send(&ClientMessage::Ping { nonce });
            serve.wait_message(|m| matches!(m, DaemonMessage::Pong { nonce: n } if *n == nonce).then_some(()));
            start.elapsed()
        })
        .collect()
}

#[test]
fn a_build_runs_as_its_user_owns_its_directory_and_cannot_read_another_builds() {
    if !is_root() {
        eprintln!("skipped: only a root daemon can switch users");
        return;
    }
    let dir = open_tempdir();
    let (_serve, sock) = serve_socket(dir.path(), &[]);
    let upload = dir.path().join("upload");
    std::fs::create_dir(&upload).unwrap();
    std::fs::write(upload.join("given.txt"), "from the client\n").unwrap();

    // Another build (root's) that keeps a file in its directory and tells where it is.
    let other = Proc::spawn(&mut run_cmd(
        &sock,
        &[
            "--sh",
            "echo private > mine; chmod 644 mine; echo \"$PWD\"; exec sleep 1000",
        ],
    ));
    assert!(other.stdout.wait_contains(TIMEOUT, "\n"), "{}", other.stderr.text());
    let other_work = other.stdout.text().trim().to_owned();
    assert!(Path::new(&other_work).join("mine").is_file());

    let upload_arg = format!("{}:.", upload.display());
    let script = format!(
        r#"
        echo "ids $(id -u) $(id -g) $(id -G)"
        given=$(find . -name given.txt)
        echo "owner $(stat -c '%u:%g' . "$TMPDIR" "$given" | tr '\n' ' ')"
        echo more >> "$given" && echo "upload writable"
        touch "$TMPDIR/t" && echo "tmp writable"
        cat '{other_work}/mine' 2>/dev/null && echo "READ ANOTHER BUILD'S FILE"
        ls "$(dirname "$(dirname "$PWD")")" >/dev/null 2>&1 && echo "LISTED THE BUILDS"
        exit 0
        "#
    );
    let r = run_on(
        &sock,
        &["--user", "64002:64003", "--upload", &upload_arg, "--sh", &script],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    let out = r.stdout_text();
    // Groups reset: the gid alone, none of root's supplementary groups.
    assert!(out.contains("ids 64002 64003 64003\n"), "{out}");
    assert!(
        out.contains("owner 64002:64003 64002:64003 64002:64003 "),
        "the directory and the upload are the build user's: {out}"
    );
    assert!(out.contains("upload writable") && out.contains("tmp writable"), "{out}");
    assert!(!out.contains("READ ANOTHER") && !out.contains("LISTED"), "{out}");

    // Without a gid: the user's primary group from /etc/passwd (nobody's here).
    let nobody_gid = std::fs::read_to_string("/etc/passwd").unwrap().lines().find_map(|l| {
        l.strip_prefix("nobody:x:65534:")
            .map(|rest| rest.split(':').next().unwrap().to_owned())
    });
    if let Some(gid) = nobody_gid {
        let r = run_on(&sock, &["--user", "65534", "--sh", "id -g"]);
        assert_eq!(r.stdout_text().trim(), gid, "{}", r.stderr_text());
    }
    drop(other);
}

#[test]
fn a_daemon_that_cannot_switch_users_refuses_user_and_nproc_clearly() {
    let dir = open_tempdir();
    let (_serve, sock) = serve_socket(dir.path(), &[]);
    let r = run_on(&sock, &["--limit", "nproc=10", "--", "true"]);
    if is_root() {
        assert_eq!(r.code(), 125, "{}", r.stderr_text());
        assert!(
            r.stderr_text()
                .contains("nproc limit does not hold for a build running as root"),
            "{}",
            r.stderr_text()
        );
    }
    let bad = run_on(&sock, &["--user", "jenkins", "--", "true"]);
    assert_eq!(bad.code(), 125, "a usage error: {}", bad.stderr_text());
    assert!(bad.stderr_text().contains("numeric"), "{}", bad.stderr_text());

    if !is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped the non-root daemon: needs root and setpriv");
        return;
    }
    // A daemon running as uid 65534, in a directory of its own.
    let home = dir.path().join("nobody");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let sock = home.join("tether.sock");
    let state = home.join("state");
    let mut daemon = Command::new("setpriv");
    daemon
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(integration_tests::tether_bin())
        .args(["serve", "--log-level", "warn", "--socket"])
        .arg(&sock)
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::piped());
    let _daemon = Proc::spawn(&mut daemon);
    if !wait_until(TIMEOUT, || std::os::unix::net::UnixStream::connect(&sock).is_ok()) {
        eprintln!("skipped the non-root daemon: uid 65534 cannot run the tether binary here");
        return;
    }
    let mut client = tether([
        "run",
        "--socket",
        sock.to_str().unwrap(),
        "--user",
        "1000",
        "--",
        "true",
    ]);
    client.stdin(Stdio::null());
    // The client must be the daemon's uid to be admitted.
    let mut as_nobody = Command::new("setpriv");
    as_nobody
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(client.get_program())
        .args(client.get_args())
        .stdin(Stdio::null());
    let r = Proc::spawn(&mut as_nobody).finish(TIMEOUT);
    assert_eq!(r.code(), 125, "{}", r.stderr_text());
    assert!(
        r.stderr_text()
            .contains("only a daemon running as root can switch users"),
        "{}",
        r.stderr_text()
    );
}

#[test]
fn limits_apply_to_the_build_and_a_fork_bomb_under_nproc_is_contained() {
    if !is_root() {
        eprintln!("skipped: nproc needs a build user other than the daemon's (root only)");
        return;
    }
    let dir = open_tempdir();
    // The stdin stream answers the pings; the socket carries the runs.
    let (mut serve, sock) = serve_socket(dir.path(), &[]);
    serve.expect_preamble();
    serve.hello();

    // Each limit reaches the build, soft and hard.
    let r = run_on(
        &sock,
        &[
            "--limit",
            "nofile=40,cpu=7",
            "--limit",
            "fsize=4KiB,as=unlimited",
            "--sh",
            "ulimit -n; ulimit -Hn; ulimit -t; ulimit -f; head -c 10000 /dev/zero > big; echo \"written $(wc -c < big)\"",
        ],
    );
    // 4 KiB = 8 blocks of 512 bytes for `ulimit -f`; the write stops there (SIGXFSZ).
    assert_eq!(r.stdout_text(), "40\n40\n7\n8\nwritten 4096\n", "{}", r.stderr_text());

    const BOMB_UID: u32 = 64010;
    assert!(processes_of(BOMB_UID).is_empty(), "uid {BOMB_UID} is in use here");
    // The bomb forks until nproc refuses, over and over; the main process then waits
    // (exec: no fork needed) until the timeout ends the whole group.
    let mut bomb = Proc::spawn(&mut run_cmd(
        &sock,
        &[
            "--user",
            &BOMB_UID.to_string(),
            "--limit",
            "nproc=40",
            "--timeout",
            "4s",
            "--grace",
            "1s",
            "--sh",
            "bomb() { bomb | bomb & }; bomb; echo bombed; exec sleep 1000",
        ],
    ));
    assert!(bomb.stdout.wait_contains(TIMEOUT, "bombed"), "{}", bomb.stderr.text());
    let mut peak = 0;
    let mut latencies = Vec::new();
    while bomb.wait_timeout(Duration::ZERO).is_none() {
        peak = peak.max(processes_of(BOMB_UID).len());
        latencies.extend(ping_round_trips(&mut serve, 20));
    }
    let r = bomb.finish(TIMEOUT);
    assert_eq!(r.code(), 124, "the timeout ended it: {}", r.stderr_text());
    assert!(peak <= 40, "at most nproc processes of the build's user, saw {peak}");
    assert!(peak > 1, "the bomb did fork ({peak})");
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "ping round trip during the fork bomb: {} pings, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
    assert!(latencies.len() >= 20, "the daemon kept answering pings");
    // Nothing of the build is left once its run returned.
    assert_eq!(processes_of(BOMB_UID), Vec::<i32>::new());
}

/// A script that starts a double-forked, setsid'd sleeper (out of the build's process
/// group and session, re-parented away from it) and writes its pid to `pidfile`.
fn escape_script(pidfile: &Path, then: &str) -> String {
    format!(
        "setsid sh -c 'sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > {p}.tmp; mv {p}.tmp {p}' </dev/null >/dev/null 2>&1 &\n\
         while [ ! -s {p} ]; do sleep 0.01; done\n{then}",
        p = pidfile.display()
    )
}

fn read_pid(pidfile: &Path) -> i32 {
    std::fs::read_to_string(pidfile).unwrap().trim().parse().unwrap()
}

#[test]
fn processes_that_escape_the_group_are_ended_at_build_end_timeout_and_cancel() {
    let dir = open_tempdir();
    let (serve, sock) = serve_socket(dir.path(), &[]);

    // Build end.
    let pidfile = dir.path().join("end.pid");
    let r = run_on(&sock, &["--sh", &escape_script(&pidfile, "exit 3")]);
    assert_eq!(r.code(), 3, "{}", r.stderr_text());
    let escaped = read_pid(&pidfile);
    assert!(pid_gone(escaped), "the escaped sleeper {escaped} outlived its build");

    // Timeout.
    let pidfile = dir.path().join("timeout.pid");
    let r = run_on(
        &sock,
        &["--timeout", "1s", "--sh", &escape_script(&pidfile, "exec sleep 1000")],
    );
    assert_eq!(r.code(), 124, "{}", r.stderr_text());
    assert!(pid_gone(read_pid(&pidfile)));

    // Cancel, by another client.
    let pidfile = dir.path().join("cancel.pid");
    let run = Proc::spawn(&mut run_cmd(
        &sock,
        &[
            "--id",
            "to-cancel",
            "--sh",
            &escape_script(&pidfile, "echo started; exec sleep 1000"),
        ],
    ));
    assert!(run.stdout.wait_contains(TIMEOUT, "started"), "{}", run.stderr.text());
    let cancel = Proc::spawn(tether(["cancel", "--socket", sock.to_str().unwrap(), "to-cancel"]).stdin(Stdio::null()))
        .finish(TIMEOUT);
    assert_eq!(cancel.code(), 0, "{}", cancel.stderr_text());
    let r = run.finish(TIMEOUT);
    assert_eq!(r.code(), 143, "{}", r.stderr_text());
    assert!(pid_gone(read_pid(&pidfile)));

    assert!(
        serve
            .stderr
            .text()
            .contains("killed processes that escaped the build's process group"),
        "{}",
        serve.stderr.text()
    );
}

#[test]
fn max_builds_refuses_one_more_with_a_busy_error_and_the_daemon_stays_responsive() {
    let dir = open_tempdir();
    let (_serve, sock) = serve_socket(dir.path(), &["--max-builds", "2"]);
    let long = |id: &str| {
        let p = Proc::spawn(&mut run_cmd(&sock, &["--id", id, "--sh", "echo up; exec sleep 1000"]));
        assert!(p.stdout.wait_contains(TIMEOUT, "up"), "{}", p.stderr.text());
        p
    };
    let (a, _b) = (long("first"), long("second"));
    let r = run_on(&sock, &["--", "true"]);
    assert_eq!(r.code(), 125, "{}", r.stderr_text());
    assert!(
        r.stderr_text().contains("already has 2 builds (--max-builds)"),
        "{}",
        r.stderr_text()
    );
    // Following a build that exists is not a new build: never refused.
    let follow = Proc::spawn(&mut run_cmd(
        &sock,
        &["--id", "first", "--sh", "echo up; exec sleep 1000"],
    ));
    assert!(follow.stdout.wait_contains(TIMEOUT, "up"), "{}", follow.stderr.text());
    // Listing works, and a finished build frees its place.
    let ps = Proc::spawn(tether(["ps", "--socket", sock.to_str().unwrap()]).stdin(Stdio::null())).finish(TIMEOUT);
    assert!(
        ps.stdout_text().contains("first") && ps.stdout_text().contains("second"),
        "{}",
        ps.stdout_text()
    );
    let cancel = Proc::spawn(tether(["cancel", "--socket", sock.to_str().unwrap(), "first"]).stdin(Stdio::null()))
        .finish(TIMEOUT);
    assert_eq!(cancel.code(), 0, "{}", cancel.stderr_text());
    a.finish(TIMEOUT);
    let r = run_on(&sock, &["--sh", "echo third"]);
    assert_eq!(
        (r.code(), r.stdout_text().as_str()),
        (0, "third\n"),
        "{}",
        r.stderr_text()
    );
}

#[test]
fn socket_connections_past_max_sessions_are_refused_and_the_others_go_on() {
    let dir = open_tempdir();
    let (_serve, sock) = serve_socket(dir.path(), &["--max-sessions", "2"]);
    // Two connections held open by a slow client (say) fill the places.
    let mut first = Proc::spawn(&mut run_cmd(&sock, &["--sh", "echo one; exec sleep 1000"]));
    assert!(first.stdout.wait_contains(TIMEOUT, "one"), "{}", first.stderr.text());
    let idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let refused = run_on(&sock, &["--", "true"]);
    assert_eq!(refused.code(), 125, "{}", refused.stderr_text());
    assert!(
        refused
            .stderr_text()
            .contains("already serves 2 socket connections (--max-sessions)"),
        "{}",
        refused.stderr_text()
    );
    // The connection already served is unaffected: its build still streams.
    assert!(first.wait_timeout(Duration::ZERO).is_none());
    // A closed connection frees its place.
    drop(idle);
    let mut ran = None;
    assert!(
        wait_until(TIMEOUT, || {
            let r = run_on(&sock, &["--sh", "echo two"]);
            let ok = r.code() == 0;
            ran = Some(r);
            ok
        }),
        "{:?}",
        ran.map(|r| r.stderr_text())
    );
    assert_eq!(ran.unwrap().stdout_text(), "two\n");
}

/// Mounts a tmpfs of `size` at `at`; unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros into `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    let mut written = 0;
    loop {
        match f.write(&block) {
            Ok(0) => return written,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return written,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[test]
fn a_full_state_dir_becomes_a_reported_gap_and_other_builds_go_on() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = open_tempdir();
    let Some(_tmpfs) = Tmpfs::mount(&dir.path().join("state"), "4m") else {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    };
    let (mut serve, sock) = serve_socket(dir.path(), &[]);
    serve.expect_preamble();
    serve.hello();
    let filler = dir.path().join("state/filler");
    assert!(fill(&filler) > 0);

    // 256 KiB of output that cannot be spooled: the client is told, the status is exact.
    const LINE: &str = "a line of output that the disk has no room for";
    const LINES: usize = 4096;
    const TOTAL: usize = LINES * (LINE.len() + 1);
    let script = format!("i=0; while [ $i -lt {LINES} ]; do echo '{LINE}'; i=$((i+1)); done; exit 5");
    let script = script.as_str();
    let r = run_on(&sock, &["--id", "on-full-disk", "--sh", script]);
    assert_eq!(r.code(), 5, "{}", r.stderr_text());
    let err = r.stderr_text();
    assert!(
        err.contains("missing here") && err.contains("the daemon could not write it to disk"),
        "the client is told of the gap: {err}"
    );
    // What arrived is whole lines or nothing: a gap never cuts into a chunk.
    let lost: usize = err
        .lines()
        .filter(|l| l.contains("missing here"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(
        r.stdout.len() + lost,
        TOTAL,
        "every byte is either shown or reported lost: {err}"
    );
    assert!(
        wait_until(TIMEOUT, || serve
            .stderr_text()
            .contains("cannot write build output to the spool")),
        "{}",
        serve.stderr_text()
    );
    // A later reader sees the same gap.
    let logs = Proc::spawn(tether(["logs", "--socket", sock.to_str().unwrap(), "on-full-disk"]).stdin(Stdio::null()))
        .finish(TIMEOUT);
    assert!(
        logs.stderr_text().contains("could not write it to disk"),
        "{}",
        logs.stderr_text()
    );

    // The daemon still answers, and with room again a build's output is whole.
    assert_eq!(ping_round_trips(&mut serve, 3).len(), 3);
    std::fs::remove_file(&filler).unwrap();
    let r = run_on(&sock, &["--sh", script]);
    assert_eq!(r.code(), 5);
    assert_eq!(r.stdout.len(), TOTAL, "{}", r.stderr_text());
    assert!(!r.stderr_text().contains("missing"), "{}", r.stderr_text());
}

#[test]
fn path_like_ids_and_names_never_reach_outside_the_state_dir() {
    let dir = open_tempdir();
    let (_serve, sock) = serve_socket(dir.path(), &[]);
    let s = sock.to_str().unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), "keep").unwrap();

    for id in ["../outside", "../../../../etc/passwd", "a/b", ".hidden", "-flag", ""] {
        let r = run_on(&sock, &["--id", id, "--", "true"]);
        assert_ne!(r.code(), 0, "id {id:?} was accepted");
        for sub in [&["logs"][..], &["attach"], &["cancel"], &["release"]] {
            let mut cmd = tether(sub.iter().copied());
            cmd.args(["--socket", s, id]).stdin(Stdio::null());
            let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
            assert_ne!(r.code(), 0, "{sub:?} {id:?}: {}", r.stdout_text());
            assert!(
                !r.stdout_text().contains("root:"),
                "{sub:?} read a file: {}",
                r.stdout_text()
            );
        }
    }
    // A name is only a hint: sanitised into the directory name, inside builds/.
    let r = run_on(
        &sock,
        &["--name", "../../outside/x", "--sh", "echo \"$PWD\"; echo made > here"],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    let pwd = PathBuf::from(r.stdout_text().trim());
    let state = std::fs::canonicalize(dir.path().join("state")).unwrap();
    assert!(
        pwd.starts_with(&state),
        "{} is outside {}",
        pwd.display(),
        state.display()
    );
    assert!(!pwd.components().any(|c| c == std::path::Component::ParentDir));
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        1,
        "nothing was written outside"
    );
    assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "keep");
}

#[test]
fn a_shell_in_a_build_runs_as_its_user_and_its_output_is_masked() {
    let dir = open_tempdir();
    let (_serve, sock) = serve_socket(dir.path(), &[]);
    let s = sock.to_str().unwrap();
    const TOKEN: &str = "registry-T0ken-for-shells";
    let mut args = vec!["--id", "with-shell", "--secret-env", "TOKEN"];
    if is_root() {
        args.extend(["--user", "64004"]);
    }
    args.extend(["--sh", "echo up; exec sleep 1000"]);
    let mut cmd = run_cmd(&sock, &args);
    cmd.env("TOKEN", TOKEN);
    let build = Proc::spawn(&mut cmd);
    assert!(build.stdout.wait_contains(TIMEOUT, "up"), "{}", build.stderr.text());

    let mut shell = tether(["shell", "--socket", s, "--build", "with-shell"]);
    shell.stdin(Stdio::piped());
    let mut shell = Proc::spawn(&mut shell);
    {
        use std::io::Write;
        let mut stdin = shell.stdin();
        // The value, then in two writes by two commands: both are masked.
        stdin
            .write_all(
                b"echo \"t=$TOKEN\"; printf '%s' \"${TOKEN%%T0ken*}\"; echo \"T0ken${TOKEN#*T0ken}\"; id -u; exit 0\n",
            )
            .unwrap();
    }
    let r = shell.finish(TIMEOUT);
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    let out = r.stdout_text();
    assert!(!out.contains(TOKEN), "{out}");
    assert!(out.starts_with("t=****\n****\n"), "{out}");
    if is_root() {
        assert!(out.ends_with("64004\n"), "the shell runs as the build's user: {out}");
    }
    drop(build);
}
