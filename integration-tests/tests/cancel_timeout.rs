//! Timeouts and cancellation: `--timeout`, SIGINT/SIGTERM to the client, `--grace`, and
//! that no process of a build survives its end.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use integration_tests::{pid_gone, run, signal, tether, wait_until, Proc, TIMEOUT};
use nix::sys::signal::Signal;

/// Starts `tether run ARGS` with piped output.
fn start(args: &[&str]) -> Proc {
    let mut cmd = tether(["run"]);
    cmd.args(args).stdin(Stdio::null());
    Proc::spawn(&mut cmd)
}

/// Waits until the client's stdout shows `marker` (the build is running).
fn await_output(p: &Proc, marker: &str) {
    assert!(
        p.stdout.wait_contains(TIMEOUT, marker),
        "no {marker:?} from the build; stdout: {:?}, stderr: {}",
        p.stdout.text(),
        p.stderr.text()
    );
}

/// The pid a build wrote into `file`.
fn read_pid(file: &Path) -> i32 {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.trim().parse().unwrap_or_else(|e| panic!("pid {text:?}: {e}"))
}

fn assert_gone_soon(pid: i32, what: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || pid_gone(pid)),
        "{what} (pid {pid}) still exists after the client exited"
    );
}

#[test]
fn timeout_is_124_and_quick() {
    let start = Instant::now();
    let r = run(&["--timeout", "300ms", "--", "sleep", "30"]);
    assert_eq!(r.code(), 124, "stderr: {}", r.stderr_text());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a 300ms timeout took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_build_that_finishes_before_its_timeout_keeps_its_code() {
    let r = run(&["--timeout", "30s", "--sh", "echo done; exit 4"]);
    assert_eq!(r.code(), 4);
    assert_eq!(r.stdout_text(), "done\n");
}

#[test]
fn timeout_kills_background_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let p = format!("PIDFILE={}", pidfile.display());
    let r = run(&[
        "--timeout",
        "1500ms",
        "--env",
        &p,
        "--sh",
        r#"sleep 1000 & echo $! > "$PIDFILE"; wait"#,
    ]);
    assert_eq!(r.code(), 124, "stderr: {}", r.stderr_text());
    assert_gone_soon(read_pid(&pidfile), "the background sleep");
}

#[test]
fn timeout_kills_grandchildren_that_ignore_sigterm_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let p = format!("PIDFILE={}", pidfile.display());
    let start = Instant::now();
    let r = run(&[
        "--timeout",
        "1500ms",
        "--grace",
        "300ms",
        "--env",
        &p,
        "--sh",
        r#"trap "" TERM; sleep 1000 & echo $! > "$PIDFILE"; wait"#,
    ]);
    assert_eq!(r.code(), 124, "stderr: {}", r.stderr_text());
    assert!(start.elapsed() < Duration::from_secs(8), "took {:?}", start.elapsed());
    assert_gone_soon(read_pid(&pidfile), "the TERM-ignoring background sleep");
}

#[test]
fn leftover_background_processes_are_ended_when_the_main_process_exits() {
    // The main process exits 0 at once, leaving a child behind: the build is over only
    // when that child is gone, and its code is the main process's.
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let p = format!("PIDFILE={}", pidfile.display());
    let start = Instant::now();
    let r = run(&[
        "--grace",
        "300ms",
        "--env",
        &p,
        "--sh",
        r#"sleep 1000 >/dev/null 2>&1 & echo $! > "$PIDFILE"; exit 0"#,
    ]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert!(start.elapsed() < Duration::from_secs(8), "took {:?}", start.elapsed());
    assert_gone_soon(read_pid(&pidfile), "the leftover sleep");
}

#[test]
fn sigint_cancels_the_build_with_sigterm() {
    let mut p = start(&["--sh", "echo ready; sleep 1000"]);
    await_output(&p, "ready");
    let sent = Instant::now();
    signal(p.pid(), Signal::SIGINT);
    let st = p.wait_timeout(Duration::from_secs(5));
    let st = st.unwrap_or_else(|| panic!("client still running 5s after SIGINT; stderr: {}", p.stderr.text()));
    assert_eq!(st.code(), Some(128 + 15), "stderr: {}", p.stderr.text());
    assert!(sent.elapsed() < Duration::from_secs(5));
}

#[test]
fn sigterm_to_the_client_cancels_too() {
    let mut p = start(&["--sh", "echo ready; sleep 1000"]);
    await_output(&p, "ready");
    signal(p.pid(), Signal::SIGTERM);
    let st = p
        .wait_timeout(Duration::from_secs(5))
        .expect("client exits after SIGTERM");
    assert_eq!(st.code(), Some(143), "stderr: {}", p.stderr.text());
}

#[test]
fn sigint_kills_a_build_that_ignores_sigterm_after_the_grace() {
    let mut p = start(&["--grace", "500ms", "--sh", r#"trap "" TERM; echo ready; sleep 1000"#]);
    await_output(&p, "ready");
    let sent = Instant::now();
    signal(p.pid(), Signal::SIGINT);
    let st = p
        .wait_timeout(Duration::from_secs(6))
        .unwrap_or_else(|| panic!("client still running 6s after SIGINT; stderr: {}", p.stderr.text()));
    let took = sent.elapsed();
    assert_eq!(st.code(), Some(128 + 9), "stderr: {}", p.stderr.text());
    // SIGKILL came after the grace period, not before it.
    assert!(
        took >= Duration::from_millis(450),
        "killed after {took:?}, before the grace"
    );
}

#[test]
fn second_sigint_forces_at_once() {
    // The build survives SIGTERM and says so; a second SIGINT must kill it without
    // waiting for the 60 s grace.
    let mut p = start(&[
        "--grace",
        "60s",
        "--sh",
        r#"trap 'echo got-term' TERM; echo ready; while :; do sleep 1; done"#,
    ]);
    await_output(&p, "ready");
    let sent = Instant::now();
    signal(p.pid(), Signal::SIGINT);
    await_output(&p, "got-term");
    assert!(p.child.try_wait().unwrap().is_none(), "the build ended on SIGTERM");
    signal(p.pid(), Signal::SIGINT);
    let st = p.wait_timeout(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "client still running after a second SIGINT; stderr: {}",
            p.stderr.text()
        )
    });
    assert_eq!(st.code(), Some(137), "stderr: {}", p.stderr.text());
    assert!(sent.elapsed() < Duration::from_secs(10), "took {:?}", sent.elapsed());
}

#[test]
fn sigint_cancel_kills_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let env = format!("PIDFILE={}", pidfile.display());
    let mut p = start(&[
        "--grace",
        "300ms",
        "--env",
        &env,
        "--sh",
        r#"sh -c 'trap "" TERM; exec sleep 1000' & echo $! > "$PIDFILE"; echo ready; wait"#,
    ]);
    await_output(&p, "ready");
    let pid = read_pid(&pidfile);
    assert!(!pid_gone(pid));
    signal(p.pid(), Signal::SIGINT);
    let st = p
        .wait_timeout(Duration::from_secs(6))
        .expect("client exits after SIGINT");
    assert_eq!(st.code(), Some(143), "stderr: {}", p.stderr.text());
    assert_gone_soon(pid, "the TERM-ignoring grandchild");
}

#[test]
fn sigint_while_output_streams_still_exits_with_the_cancel_status() {
    let mut p = start(&["--sh", "echo ready; yes tether-test-output"]);
    await_output(&p, "ready");
    signal(p.pid(), Signal::SIGINT);
    let st = p
        .wait_timeout(Duration::from_secs(8))
        .expect("client exits after SIGINT");
    // `yes` dies of SIGTERM; sh reports that or dies of it too.
    assert_eq!(st.code(), Some(143), "stderr: {}", p.stderr.text());
}

#[test]
fn killing_the_client_ends_the_build() {
    // The client dies without a word (SIGKILL): its daemon sees EOF, cancels the build and
    // exits; the build's processes are gone.
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let env = format!("PIDFILE={}", pidfile.display());
    let mut p = start(&[
        "--env",
        &env,
        "--sh",
        r#"echo $$ > "$PIDFILE"; echo ready; exec sleep 1000"#,
    ]);
    await_output(&p, "ready");
    let pid = read_pid(&pidfile);
    signal(p.pid(), Signal::SIGKILL);
    p.wait_timeout(Duration::from_secs(5)).expect("the client dies");
    assert!(
        wait_until(Duration::from_secs(8), || pid_gone(pid)),
        "the build (pid {pid}) survived its client"
    );
}

#[test]
fn sighup_to_the_client_cancels_too() {
    let mut p = start(&["--sh", "echo ready; sleep 1000"]);
    await_output(&p, "ready");
    signal(p.pid(), Signal::SIGHUP);
    let st = p
        .wait_timeout(Duration::from_secs(5))
        .expect("client exits after SIGHUP");
    assert_eq!(st.code(), Some(143), "stderr: {}", p.stderr.text());
}

#[test]
fn a_cancelled_build_through_via_leaves_no_dirs() {
    let state = tempfile::tempdir().unwrap();
    let via = integration_tests::via_serve(state.path());
    let mut p = start(&["--via", &via, "--sh", "echo ready; sleep 1000"]);
    await_output(&p, "ready");
    signal(p.pid(), Signal::SIGINT);
    let st = p
        .wait_timeout(Duration::from_secs(5))
        .expect("client exits after SIGINT");
    assert_eq!(st.code(), Some(143));
    assert_eq!(
        integration_tests::subdirs(&state.path().join("instances")),
        Vec::<std::path::PathBuf>::new()
    );
}
