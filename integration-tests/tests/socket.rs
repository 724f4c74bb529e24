//! The Unix socket transport, `tether ps` and `tether cancel`, with the real binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use integration_tests::{run_on, tether, tether_bin, wait_until, Proc, Serve, TIMEOUT};

/// A daemon serving on `<dir>/tether.sock` (and its stdin, kept open by the test).
fn serve_socket(dir: &Path, extra: &[&str]) -> (Serve, PathBuf) {
    let mut args = vec!["--log-level", "info"];
    args.extend_from_slice(extra);
    integration_tests::serve_socket(dir, &args)
}

#[test]
fn builds_run_through_the_socket_and_clients_share_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, sock) = serve_socket(dir.path(), &[]);
    let spawn = |script: &str| {
        let mut cmd = tether(["run", "--socket", sock.to_str().unwrap(), "--sh", script]);
        cmd.stdin(Stdio::null());
        Proc::spawn(&mut cmd)
    };
    let a = spawn("echo from-a; sleep 0.2; exit 3");
    let b = spawn("echo from-b >&2; exit 4");
    let (a, b) = (a.finish(TIMEOUT), b.finish(TIMEOUT));
    assert_eq!(
        (a.code(), a.stdout_text()),
        (3, "from-a\n".to_owned()),
        "{}",
        a.stderr_text()
    );
    assert_eq!((b.code(), b.stderr_text()), (4, "from-b\n".to_owned()));

    // TETHER_SOCKET selects the socket as well.
    let mut cmd = tether(["run", "--", "true"]);
    cmd.env("TETHER_SOCKET", &sock).stdin(Stdio::null());
    assert_eq!(Proc::spawn(&mut cmd).finish(TIMEOUT).code(), 0);
}

#[test]
fn ps_lists_a_running_build_and_cancel_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, sock) = serve_socket(dir.path(), &[]);
    let s = sock.to_str().unwrap();
    let mut cmd = tether([
        "run",
        "--socket",
        s,
        "--name",
        "longjob",
        "--sh",
        "echo ready; sleep 1000",
    ]);
    cmd.stdin(Stdio::null());
    let mut job = Proc::spawn(&mut cmd);
    assert!(job.stdout.wait_contains(TIMEOUT, "ready"));

    let ps = Proc::spawn(tether(["ps", "--socket", s, "--json"]).stdin(Stdio::null())).finish(TIMEOUT);
    assert_eq!(ps.code(), 0, "{}", ps.stderr_text());
    let lines: Vec<serde_json::Value> = ps
        .stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let id = lines[0]["build"].as_str().unwrap().to_owned();
    assert!(
        id.starts_with("longjob-"),
        "a client that reconnects names its build: {id}"
    );
    assert_eq!(lines[0]["state"], "running");
    assert!(lines[0]["command"].as_str().unwrap().contains("sleep 1000"));

    let table = Proc::spawn(tether(["ps", "--socket", s]).stdin(Stdio::null())).finish(TIMEOUT);
    assert!(table.stdout_text().contains(&id), "{}", table.stdout_text());

    let cancel = Proc::spawn(tether(["cancel", "--socket", s, &id]).stdin(Stdio::null())).finish(TIMEOUT);
    assert_eq!(cancel.code(), 0, "{}", cancel.stderr_text());
    let st = job
        .wait_timeout(TIMEOUT)
        .expect("the build's client exits after the cancel");
    assert_eq!(st.code(), Some(143), "SIGTERM ended the build's shell");

    let again = Proc::spawn(tether(["cancel", "--socket", s, &id]).stdin(Stdio::null())).finish(TIMEOUT);
    assert_eq!(again.code(), 125);
    assert!(
        again.stderr_text().contains("has already finished"),
        "{}",
        again.stderr_text()
    );

    let empty = Proc::spawn(tether(["ps", "--socket", s, "--json"]).stdin(Stdio::null())).finish(TIMEOUT);
    assert_eq!(empty.stdout_text(), "");
    // The finished build is retained: `ps --all` shows how it ended.
    let all = Proc::spawn(tether(["ps", "--socket", s, "--all", "--json"]).stdin(Stdio::null())).finish(TIMEOUT);
    let line: serde_json::Value = serde_json::from_str(all.stdout_text().trim()).unwrap();
    assert_eq!(
        (line["build"].as_str(), line["state"].as_str()),
        (Some(id.as_str()), Some("cancelled"))
    );
    assert_eq!(line["exit_code"], 143);
}

#[test]
fn ps_and_cancel_need_a_daemon_to_talk_to() {
    let r = Proc::spawn(tether(["ps"]).env_remove("TETHER_SOCKET").stdin(Stdio::null())).finish(TIMEOUT);
    assert_eq!(r.code(), 125);
    assert!(r.stderr_text().contains("--socket"), "{}", r.stderr_text());
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tether.sock");
    // A socket file nobody listens on: what a daemon that was SIGKILLed leaves.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let (_serve, sock) = serve_socket(dir.path(), &[]);
    assert_eq!(run_on(&sock, &["--", "true"]).code(), 0);

    // A second daemon must not steal the live socket.
    let mut second = tether(["serve", "--socket", sock.to_str().unwrap(), "--state-dir"]);
    second.arg(dir.path().join("state2")).stdin(Stdio::null());
    let r = Proc::spawn(&mut second).finish(TIMEOUT);
    assert_ne!(r.code(), 0);
    assert!(r.stderr_text().contains("already listening"), "{}", r.stderr_text());
    assert_eq!(
        run_on(&sock, &["--sh", "exit 5"]).code(),
        5,
        "the first daemon still serves"
    );
}

/// Runs `tether run --socket SOCK -- true` as uid/gid 65534 through setpriv.
fn run_as_nobody(sock: &Path) -> integration_tests::Finished {
    as_user(
        65534,
        65534,
        &[],
        &["run", "--socket", sock.to_str().unwrap(), "--", "true"],
    )
}

#[test]
fn a_peer_with_another_uid_is_refused_unless_allowed() {
    if !nix::unistd::geteuid().is_root() || std::process::Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: needs root and setpriv to connect as another uid");
        return;
    }
    // The socket's directory must be reachable by the other uid; access control is the
    // daemon's, by peer credentials.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = run_as_nobody(&dir.path().join("none"));
    if probe.stderr_text().contains("Permission denied") && !probe.stderr_text().contains("socket") {
        eprintln!("skipped: uid 65534 cannot execute the tether binary here");
        return;
    }

    let (serve, sock) = serve_socket(dir.path(), &[]);
    let refused = run_as_nobody(&sock);
    assert_eq!(refused.code(), 125, "{}", refused.stderr_text());
    assert!(refused.stderr_text().contains("uid 65534"), "{}", refused.stderr_text());
    assert!(
        wait_until(TIMEOUT, || serve.stderr.text().contains("refused")),
        "the refusal is logged: {}",
        serve.stderr.text()
    );
    drop(serve);

    let allowed_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(allowed_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_serve, sock) = serve_socket(allowed_dir.path(), &["--allow-uid", "65534"]);
    let ok = run_as_nobody(&sock);
    assert_eq!(ok.code(), 0, "{}", ok.stderr_text());
}

/// `tether ARGS` as `uid:gid` with the supplementary `groups`, through setpriv.
fn as_user(uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> integration_tests::Finished {
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.args(["--groups", &list.join(",")]);
    }
    cmd.arg(tether_bin()).args(args).stdin(Stdio::null());
    Proc::spawn(&mut cmd).finish(TIMEOUT)
}

#[test]
fn a_fresh_volume_gets_the_socket_dir_and_the_client_reachable_by_the_allowed_group() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() || std::process::Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: needs root and setpriv to connect as other users");
        return;
    }
    // A fresh emptyDir: world-writable, nothing in it.
    let vol = tempfile::tempdir().unwrap();
    std::fs::set_permissions(vol.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let tether_dir = vol.path().join("agent/.tether");
    let sock = tether_dir.join("kaniko.sock");
    let state = tempfile::tempdir().unwrap();
    let serve = Serve::with_state_dir(
        &state.path().join("state"),
        &[
            "--log-level",
            "info",
            "--socket",
            sock.to_str().unwrap(),
            "--allow-gid",
            "4300",
            "--publish-client",
            tether_dir.to_str().unwrap(),
        ],
    );
    assert!(
        wait_until(TIMEOUT, || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
        "{}",
        serve.stderr.text()
    );
    for d in [vol.path().join("agent"), tether_dir.clone()] {
        let m = std::fs::metadata(&d).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (0, 4300, 0o750),
            "{}",
            d.display()
        );
    }
    assert_eq!(
        std::fs::metadata(tether_dir.join("tether")).unwrap().mode() & 0o777,
        0o755
    );
    let client = tether_dir.join("tether");
    let ps = ["ps", "--socket", sock.to_str().unwrap()];
    // A member of the group by a supplementary group only (a pod's fsGroup), with an
    // arbitrary uid and gid 0 (as OpenShift runs pods): admitted. Its client is the copy.
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid", "1000680000", "--regid", "0", "--groups", "4300"])
        .arg(&client)
        .args(ps)
        .stdin(Stdio::null());
    let member = Proc::spawn(&mut cmd).finish(TIMEOUT);
    assert_eq!(member.code(), 0, "{}", member.stderr_text());
    assert!(member.stdout_text().starts_with("ID "), "{}", member.stdout_text());
    // Someone else cannot even reach the directory.
    let outsider = as_user(4242, 4242, &[], &ps);
    assert_eq!(outsider.code(), 125, "{}", outsider.stderr_text());
    assert!(
        outsider.stderr_text().contains("Permission denied"),
        "{}",
        outsider.stderr_text()
    );
}

#[test]
fn a_supplementary_group_is_admitted_by_allow_gid() {
    if !nix::unistd::geteuid().is_root() || std::process::Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: needs root and setpriv to connect as other users");
        return;
    }
    // A directory everyone may pass: the daemon's peer check alone decides.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (serve, sock) = serve_socket(dir.path(), &["--allow-gid", "4300"]);
    let ps = ["ps", "--socket", sock.to_str().unwrap()];
    let by_primary = as_user(4242, 4300, &[], &ps);
    assert_eq!(by_primary.code(), 0, "{}", by_primary.stderr_text());
    let by_supplementary = as_user(4242, 4242, &[4300], &ps);
    assert_eq!(by_supplementary.code(), 0, "{}", by_supplementary.stderr_text());
    let neither = as_user(4242, 4242, &[4301], &ps);
    assert_eq!(neither.code(), 125, "{}", neither.stderr_text());
    assert!(
        neither.stderr_text().contains("uid 4242 may not use"),
        "{}",
        neither.stderr_text()
    );
    drop(serve);
}
