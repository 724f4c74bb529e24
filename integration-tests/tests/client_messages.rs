//! What tether prints of its own, as a Jenkins console or `kubectl logs` shows it: no
//! ANSI codes unless stderr is a terminal (and `NO_COLOR` is unset), client messages as
//! `tether: ...` lines, usage errors that name what is missing or suggest the flag
//! meant, and a client whose daemon is stopped (a pod's deletion) saying so.

use std::io::Read;
use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::Duration;

use integration_tests::{serve_socket, signal, tether, wait_until, Proc, TIMEOUT};
use nix::sys::signal::Signal;

fn usage(args: &[&str]) -> (i32, String) {
    let r = Proc::spawn(tether(args).stdin(Stdio::null())).finish(TIMEOUT);
    (r.code(), r.stderr_text())
}

#[test]
fn usage_errors_name_what_is_missing_and_suggest_what_was_meant() {
    let (code, err) = usage(&["attach"]);
    assert_eq!(code, 125, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("tether: ") && err.contains("<ID>"), "{err}");
    let (code, err) = usage(&["ps", "--jsno"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("'--jsno'") && err.contains("'--json'"), "{err}");
    let (code, err) = usage(&["run", "--env", "=x", "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("--env"), "{err}");
}

#[test]
fn messages_off_a_terminal_are_plain_tether_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (mut serve, sock) = serve_socket(dir.path(), &["--log-level", "info"]);
    let mut attach = tether([
        "attach",
        "--socket",
        sock.to_str().unwrap(),
        "-vv",
        "--reconnect-timeout",
        "1s",
        "lost-build",
    ]);
    attach.stdin(Stdio::null());
    let started = Proc::spawn(
        tether([
            "run",
            "--socket",
            sock.to_str().unwrap(),
            "--id",
            "lost-build",
            "--detach",
            "--",
            "sleep",
            "30",
        ])
        .stdin(Stdio::null()),
    )
    .finish(TIMEOUT);
    assert_eq!(started.code(), 0, "{}", started.stderr_text());
    let p = Proc::spawn(&mut attach);
    assert!(
        wait_until(TIMEOUT, || p.stderr.text().contains("attached")),
        "{}",
        p.stderr.text()
    );
    // The daemon vanishes (an OOM kill): the client warns, retries, gives up.
    serve.child.kill().unwrap();
    let r = p.finish(TIMEOUT);
    let err = r.stderr_text();
    assert_eq!(r.code(), 125, "{err}");
    assert!(err.contains("reconnecting"), "{err}");
    for line in err.lines() {
        assert!(line.starts_with("tether: "), "not a tether line: {line:?}\n{err}");
        assert!(!line.contains('\x1b'), "colour off a terminal: {line:?}");
    }
    let log = serve.stderr.text();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "colour in a log that is not a terminal: {log:?}");
}

/// The daemon's log when its stderr is a terminal, with `extra_env` set.
fn log_on_a_terminal(no_color: Option<&str>) -> String {
    let pty = nix::pty::openpty(None, None).unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut cmd = tether(["serve", "--exit-on-eof", "--state-dir"]);
    cmd.arg(state.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(pty.slave.as_fd().try_clone_to_owned().unwrap()));
    match no_color {
        Some(v) => cmd.env("NO_COLOR", v),
        None => cmd.env_remove("NO_COLOR"),
    };
    cmd.env_remove("RUST_LOG");
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    drop(pty.slave);
    let status = integration_tests::wait_child(&mut child, TIMEOUT).expect("serve exits at EOF");
    assert!(status.success());
    let mut master = std::fs::File::from(pty.master);
    let mut out = Vec::new();
    // EIO once the terminal's last writer is gone: everything was read.
    let _ = master.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let coloured = log_on_a_terminal(None);
    assert!(coloured.contains("tether serve started"), "{coloured:?}");
    assert!(coloured.contains('\x1b'), "a terminal gets colour: {coloured:?}");
    let plain = log_on_a_terminal(Some("1"));
    assert!(plain.contains("tether serve started"), "{plain:?}");
    assert!(!plain.contains('\x1b'), "NO_COLOR is honoured: {plain:?}");
}

#[test]
fn a_client_whose_daemon_is_stopped_says_so_and_exits_143() {
    let dir = tempfile::tempdir().unwrap();
    let (serve, sock) = serve_socket(dir.path(), &["--log-level", "warn", "--grace", "5s"]);
    // One build dies of the SIGTERM; the other handles it and exits 0, which must not
    // read as a success: the build did not get to finish.
    let scripts = [
        "echo started; sleep 30",
        "trap 'echo handled; exit 0' TERM; echo started; while :; do sleep 0.1; done",
    ];
    let clients: Vec<Proc> = scripts
        .iter()
        .map(|s| Proc::spawn(tether(["run", "--socket", sock.to_str().unwrap(), "--sh", s]).stdin(Stdio::null())))
        .collect();
    for c in &clients {
        assert!(
            wait_until(TIMEOUT, || c.stdout.text().contains("started")),
            "{}",
            c.stderr.text()
        );
    }
    signal(serve.pid(), Signal::SIGTERM);
    for c in clients {
        let r = c.finish(TIMEOUT);
        let err = r.stderr_text();
        assert_eq!(r.code(), 143, "stdout: {}\nstderr: {err}", r.stdout_text());
        assert!(err.contains("the daemon is shutting down: received SIGTERM"), "{err}");
        assert!(
            err.contains("did not finish: the daemon shut down and cancelled it"),
            "{err}"
        );
    }
    let mut serve = serve;
    assert!(serve.wait_timeout(Duration::from_secs(10)).is_some_and(|s| s.success()));
}
