//! A client always yields, and never changes what it only watches: SIGTERM (Jenkins'
//! Abort) and Ctrl-C end it within a second whatever its build does, a reconnecting
//! client gives up at `--reconnect-timeout` whatever the failure, and a follower whose
//! stdout closes (`attach ID | head -1`) leaves the build alone.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use integration_tests::{run_on, serve_socket, shell_quote, signal, tether, tether_bin, wait_until, Proc, TIMEOUT};
use nix::sys::signal::Signal;

#[test]
fn a_run_leaves_within_a_second_even_when_its_build_ignores_sigterm() {
    let mut cmd = tether(["run", "--grace", "30s", "--sh", "trap '' TERM; echo ready; sleep 100"]);
    cmd.stdin(Stdio::null());
    let mut p = Proc::spawn(&mut cmd);
    assert!(
        wait_until(TIMEOUT, || p.stdout.text().contains("ready")),
        "{}",
        p.stderr.text()
    );
    let sent = Instant::now();
    signal(p.pid(), Signal::SIGTERM);
    let st = p.wait_timeout(Duration::from_secs(5)).expect("the client exits");
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(integration_tests::code(st), 143);
    let r = p.finish(TIMEOUT);
    assert!(r.stderr_text().contains("is being cancelled"), "{}", r.stderr_text());
}

#[test]
fn reconnecting_stops_at_the_reconnect_timeout_against_a_daemon_that_drops_every_connection() {
    let via = format!(
        "exec {} --archive /dev/null --drop-on-run",
        shell_quote(OsStr::new(env!("CARGO_BIN_EXE_fake-daemon")))
    );
    let started = Instant::now();
    let r = Proc::spawn(
        tether([
            "run",
            "--via",
            &via,
            "--reconnect",
            "--reconnect-timeout",
            "2s",
            "--",
            "true",
        ])
        .stdin(Stdio::null()),
    )
    .finish(TIMEOUT);
    let took = started.elapsed();
    assert_eq!(r.code(), 125, "{}", r.stderr_text());
    assert!(
        r.stderr_text().contains("could not get it back within 2s"),
        "{}",
        r.stderr_text()
    );
    // Within one backoff step of the timeout (the steps are 100 ms doubling).
    assert!(took < Duration::from_secs(4), "gave up after {took:?}");
}

#[test]
fn a_follower_whose_stdout_closes_leaves_the_build_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, sock) = serve_socket(dir.path(), &["--log-level", "warn"]);
    let script = "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done; echo done";
    let started = run_on(&sock, &["--id", "watched", "--detach", "--sh", script]);
    assert_eq!(started.code(), 0, "{}", started.stderr_text());
    // `attach | head -1`: the follower's stdout closes after one line.
    let line = format!(
        "{} attach --socket {} --from-start watched | head -1",
        shell_quote(tether_bin().as_os_str()),
        shell_quote(sock.as_os_str())
    );
    let piped = Proc::spawn(
        std::process::Command::new("sh")
            .args(["-c", &line])
            .stdin(Stdio::null()),
    )
    .finish(TIMEOUT);
    assert_eq!(piped.stdout_text(), "line 0\n", "{}", piped.stderr_text());
    // The build was not touched: it ran to its end and exited 0, not 141 (SIGPIPE).
    let all = Proc::spawn(
        tether(["attach", "--socket", sock.to_str().unwrap(), "--from-start", "watched"]).stdin(Stdio::null()),
    )
    .finish(TIMEOUT);
    assert_eq!(all.code(), 0, "{}", all.stderr_text());
    assert!(all.stdout_text().ends_with("line 19999\ndone\n"));
}
