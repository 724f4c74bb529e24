//! Builds in a shared workspace and with the client's environment, as a Jenkins step
//! needs them: `run --workdir ABS` (the build runs in an existing shared directory, keeps
//! its private TMPDIR and cleanup, never removes the workspace; the daemon's state dir
//! and kernel file systems are refused), and `--env NAME`, `--env-file`, `--env-prefix`
//! as `docker run` has them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use integration_tests::{run_cmd, run_on, serve_socket, tether, Finished, Proc, TIMEOUT};

fn refused(r: &Finished, needle: &str) {
    let err = r.stderr_text();
    assert_eq!(r.code(), 125, "stdout: {}\nstderr: {err}", r.stdout_text());
    assert!(err.starts_with("tether: ") && err.contains(needle), "{err}");
    assert!(r.stdout.is_empty(), "nothing ran: {}", r.stdout_text());
}

#[test]
fn an_absolute_workdir_is_the_shared_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, sock) = serve_socket(dir.path(), &["--log-level", "warn"]);
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("sources.c"), "int main;").unwrap();
    let wsp = ws.path().to_str().unwrap();
    let r = run_on(
        &sock,
        &[
            "--workdir",
            wsp,
            "--sh",
            r#"pwd; ls; echo "$TMPDIR"; echo scratch > "$TMPDIR/scratch"; echo built > out.o"#,
        ],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    let text = r.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(&lines[..2], &[wsp, "sources.c"], "{text}");
    // The build's own TMPDIR is private, in the state dir, and gone at its end; what it
    // made in the workspace stays, and so does the workspace.
    let tmp = Path::new(lines[2]);
    assert!(tmp.starts_with(dir.path().join("state")), "{}", tmp.display());
    assert!(!tmp.exists());
    assert_eq!(std::fs::read_to_string(ws.path().join("out.o")).unwrap(), "built\n");
    assert!(ws.path().join("sources.c").is_file());

    // Refused before anything runs: a missing directory, a file, the daemon's own state
    // (other builds' directories and records), kernel file systems.
    let missing = ws.path().join("missing");
    refused(
        &run_on(&sock, &["--workdir", missing.to_str().unwrap(), "--", "true"]),
        "missing",
    );
    let file = ws.path().join("sources.c");
    refused(
        &run_on(&sock, &["--workdir", file.to_str().unwrap(), "--", "true"]),
        "not a directory",
    );
    let state = dir.path().join("state");
    refused(
        &run_on(&sock, &["--workdir", state.to_str().unwrap(), "--", "true"]),
        "state dir",
    );
    refused(&run_on(&sock, &["--workdir", "/proc/self", "--", "true"]), "/proc");
    refused(&run_on(&sock, &["--workdir", "/sys", "--", "true"]), "/sys");
    // Transfers belong to the private work dir: said at once, by the client.
    let up = run_on(&sock, &["--workdir", wsp, "--upload", wsp, "--", "true"]);
    refused(&up, "--upload");
}

/// `pwd` in a piped `tether shell --build ID`.
fn shell_pwd(sock: &Path, id: &str) -> Finished {
    let mut shell = tether(["shell", "--socket", sock.to_str().unwrap(), "--build", id, "-T"]);
    shell.stdin(Stdio::piped());
    let mut p = Proc::spawn(&mut shell);
    {
        use std::io::Write;
        let mut stdin = p.stdin();
        stdin.write_all(b"pwd\n").unwrap();
    }
    p.finish(TIMEOUT)
}

#[test]
fn a_shell_into_a_build_in_the_workspace_opens_there() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, sock) = serve_socket(dir.path(), &["--log-level", "warn"]);
    let ws = tempfile::tempdir().unwrap();
    let wsp = ws.path().to_str().unwrap();
    // A running build, and one held before its command.
    let started = run_on(
        &sock,
        &["--workdir", wsp, "--id", "ws-running", "--detach", "--", "sleep", "30"],
    );
    assert_eq!(started.code(), 0, "{}", started.stderr_text());
    let held = Proc::spawn(&mut run_cmd(
        &sock,
        &["--workdir", wsp, "--id", "ws-held", "--hold-before", "--", "true"],
    ));
    assert!(
        integration_tests::wait_until(TIMEOUT, || held.stderr.text().contains("is held before its command")),
        "{}",
        held.stderr.text()
    );
    for id in ["ws-running", "ws-held"] {
        let r = shell_pwd(&sock, id);
        assert_eq!(
            (r.code(), r.stdout_text()),
            (0, format!("{wsp}\n")),
            "{id}: {}",
            r.stderr_text()
        );
        let cancel = Proc::spawn(tether(["cancel", "--socket", sock.to_str().unwrap(), id]).stdin(Stdio::null()))
            .finish(TIMEOUT);
        assert_eq!(cancel.code(), 0, "{}", cancel.stderr_text());
    }
    let r = held.finish(TIMEOUT);
    assert_eq!(
        r.code(),
        125,
        "a build cancelled before its command: {}",
        r.stderr_text()
    );
}

#[test]
fn a_user_build_gets_only_a_workspace_that_user_can_enter() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run builds as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_serve, sock) = serve_socket(dir.path(), &["--log-level", "warn"]);
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = base.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let r = run_on(
        &sock,
        &["--user", "4242", "--workdir", private.to_str().unwrap(), "--", "true"],
    );
    refused(&r, "not searchable by uid 4242");

    let ws = base.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::os::unix::fs::chown(&ws, Some(4242), Some(4242)).unwrap();
    let r = run_on(
        &sock,
        &[
            "--user",
            "4242",
            "--workdir",
            ws.to_str().unwrap(),
            "--sh",
            "id -u; pwd; touch mine",
        ],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    assert_eq!(r.stdout_text(), format!("4242\n{}\n", ws.display()));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(ws.join("mine")).unwrap().uid(), 4242);
}

#[test]
fn env_names_files_and_prefixes_pass_the_clients_variables() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("build.env");
    std::fs::write(
        &file,
        "# docker's env-file format\nFROM_FILE=file value \"kept\" as is\n\n  OVERRIDDEN=from-file\nPASSED_BY_FILE\nNOT_SET_HERE\n",
    )
    .unwrap();
    // A daemon of its own, started with none of these variables: the build gets only
    // what the client passes.
    let (_serve, sock) = serve_socket(dir.path(), &["--log-level", "warn"]);
    let mut cmd = tether([
        "run",
        "--socket",
        sock.to_str().unwrap(),
        "--env-prefix",
        "BUILD_",
        "--env-prefix",
        "GIT_",
        "--env-file",
        file.to_str().unwrap(),
        "--env",
        "JOB_NAME",
        "--env",
        "OVERRIDDEN=from-flag",
        "--env",
        "ALSO_NOT_SET",
        "--sh",
    ]);
    cmd.arg(
        r#"for v in BUILD_NUMBER BUILD_TAG GIT_COMMIT JOB_NAME FROM_FILE OVERRIDDEN PASSED_BY_FILE NOT_SET_HERE ALSO_NOT_SET OTHER; do
  eval "printf '%s=%s\n' $v \"\${$v-unset}\""
done"#,
    )
    .env("BUILD_NUMBER", "7")
    .env("BUILD_TAG", "jenkins-app-7")
    .env("GIT_COMMIT", "0123abcd")
    .env("JOB_NAME", "app")
    .env("PASSED_BY_FILE", "from the client")
    .env("OTHER", "not asked for")
    .env_remove("NOT_SET_HERE")
    .env_remove("ALSO_NOT_SET")
    .stdin(Stdio::null());
    let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "{}", r.stderr_text());
    assert_eq!(
        r.stdout_text(),
        "BUILD_NUMBER=7\nBUILD_TAG=jenkins-app-7\nGIT_COMMIT=0123abcd\nJOB_NAME=app\n\
         FROM_FILE=file value \"kept\" as is\nOVERRIDDEN=from-flag\nPASSED_BY_FILE=from the client\n\
         NOT_SET_HERE=unset\nALSO_NOT_SET=unset\nOTHER=unset\n"
    );
}

#[test]
fn a_bad_env_file_names_its_line_and_never_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.env");
    std::fs::write(&file, "GOOD=1\n=hunter2-secret\n").unwrap();
    let r = Proc::spawn(tether(["run", "--env-file", file.to_str().unwrap(), "--", "true"]).stdin(Stdio::null()))
        .finish(TIMEOUT);
    let err = r.stderr_text();
    assert_eq!(r.code(), 125, "{err}");
    assert!(err.contains("bad.env") && err.contains("line 2"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let missing = Proc::spawn(tether(["run", "--env-file", "/nonexistent.env", "--", "true"]).stdin(Stdio::null()))
        .finish(TIMEOUT);
    assert_eq!(missing.code(), 125);
    assert!(
        missing.stderr_text().contains("/nonexistent.env"),
        "{}",
        missing.stderr_text()
    );
}
