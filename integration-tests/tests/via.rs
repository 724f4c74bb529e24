//! `tether run --via CMD`: a daemon reached through a command's stdin/stdout, as through
//! `kubectl attach -i` or `ssh`, including the junk such transports print first.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use integration_tests::{pseudo_random, run, shell_quote, subdirs, tether_bin, via_serve};

/// Writes an executable wrapper script that prints `junk` to stdout and then execs
/// `tether serve --exit-on-eof --state-dir STATE`. Returns its path.
fn wrapper(dir: &Path, junk: &[u8], state: &Path) -> PathBuf {
    let junk_file = dir.join("junk");
    fs::write(&junk_file, junk).unwrap();
    let script = dir.join("wrapper.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat {}\nexec {} serve --exit-on-eof --log-level warn --state-dir {}\n",
            shell_quote(junk_file.as_os_str()),
            shell_quote(tether_bin().as_os_str()),
            shell_quote(state.as_os_str()),
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// What a shell or `kubectl attach` may print before the daemon gets the stream.
fn banner_junk() -> Vec<u8> {
    let mut junk = b"Welcome to Ubuntu 24.04 LTS (GNU/Linux x86_64)\n\n * Documentation:  https://help.ubuntu.com\n\
                    $ \nIf you don't see a command prompt, try pressing enter.\n\r\n"
        .to_vec();
    let noise: Vec<u8> = pseudo_random(4096, 7)
        .into_iter()
        .filter(|&b| b != 0xF4 && b != b'<')
        .collect();
    junk.extend_from_slice(&noise);
    junk.extend_from_slice(b"\nno newline at the end");
    junk
}

/// The build's output: every byte value on stdout, text on stderr, no trailing newline.
fn check_build_through(via: &str, state: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let out: Vec<u8> = (0..=255u8).chain(pseudo_random(100_000, 3)).collect();
    fs::write(dir.path().join("out"), &out).unwrap();
    let d = format!("D={}", dir.path().display());
    let r = run(&[
        "--via",
        via,
        "--env",
        &d,
        "--sh",
        r#"cat "$D/out"; printf 'to stderr' >&2; exit 42"#,
    ]);
    assert_eq!(r.code(), 42, "stderr: {}", r.stderr_text());
    assert!(
        r.stdout == out,
        "stdout differs: {} bytes, expected {}",
        r.stdout.len(),
        out.len()
    );
    assert_eq!(r.stderr_text(), "to stderr");
    // The daemon exited at EOF and removed its instance dir.
    assert_eq!(subdirs(&state.join("instances")), Vec::<PathBuf>::new());
}

#[test]
fn via_plain_serve_command() {
    let state = tempfile::tempdir().unwrap();
    check_build_through(&via_serve(state.path()), state.path());
}

#[test]
fn via_wrapper_that_prints_banners_and_binary_junk_first() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let script = wrapper(dir.path(), &banner_junk(), &state);
    check_build_through(&shell_quote(script.as_os_str()), &state);
}

#[test]
fn via_wrapper_whose_junk_holds_partial_preambles_and_magic_bytes() {
    // Before the first complete preamble a reader skips everything (PROTOCOL.md §2),
    // including partial preambles and bytes that start a frame's magic.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut junk: Vec<u8> = (0..=255u8).collect();
    junk.extend_from_slice(b"<===[TET\n<<===[TETHER]==\xF4THR\x05\x00\x00\x00junk<");
    junk.extend_from_slice(&pseudo_random(10_000, 11));
    junk.extend_from_slice(b"\xF4THR");
    let script = wrapper(dir.path(), &junk, &state);
    check_build_through(&shell_quote(script.as_os_str()), &state);
}

#[test]
fn via_start_errors_keep_their_exit_codes() {
    let state = tempfile::tempdir().unwrap();
    let via = via_serve(state.path());
    let r = run(&["--via", &via, "--", "tether-test-no-such-command-xyz"]);
    assert_eq!(r.code(), 127, "stderr: {}", r.stderr_text());
    let r = run(&["--via", &via, "--sh", "kill -9 $$"]);
    assert_eq!(r.code(), 137, "stderr: {}", r.stderr_text());
    let r = run(&["--via", &via, "--timeout", "200ms", "--", "sleep", "30"]);
    assert_eq!(r.code(), 124, "stderr: {}", r.stderr_text());
}

#[test]
fn via_command_that_dies_mid_build_is_125() {
    // The transport drops while the build runs: tether's own failure, one-line reason.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let via = format!(
        "{} serve --exit-on-eof --log-level warn --state-dir {} & wait $!",
        shell_quote(tether_bin().as_os_str()),
        shell_quote(state.as_os_str())
    );
    // The build kills its daemon (its parent) with SIGKILL: the connection is lost.
    let r = run(&["--via", &via, "--sh", "echo started; kill -9 $PPID; sleep 2"]);
    assert_eq!(r.code(), 125, "stderr: {}", r.stderr_text());
    let err = r.stderr_text();
    assert!(err.lines().any(|l| l.starts_with("tether: ")), "stderr: {err}");
}

#[test]
fn via_a_command_that_prints_no_preamble_is_125() {
    let r = run(&["--via", "echo hello; echo world", "--", "true"]);
    assert_eq!(r.code(), 125, "stderr: {}", r.stderr_text());
    assert!(r.stderr_text().starts_with("tether: "), "stderr: {}", r.stderr_text());
    assert!(r.stdout.is_empty());
}

#[test]
fn via_passes_argv_verbatim() {
    // Argument vectors with spaces survive the trip through --via.
    let state = tempfile::tempdir().unwrap();
    let via = via_serve(state.path());
    let r = run(&["--via", &via, "--", "printf", "%s;", "two words", "", "x"]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout_text(), "two words;;x;");
}

#[test]
fn tether_bin_is_a_file() {
    assert!(tether_bin().is_file());
}
