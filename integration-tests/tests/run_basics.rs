//! `tether run` basics: output separation, exit codes, environment, workdir, JSON events.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use integration_tests::{base64_decode, pseudo_random, run, tether, Proc, TIMEOUT};
use serde_json::Value;

/// Every byte value, then some text: no trailing newline.
fn all_bytes() -> Vec<u8> {
    let mut v: Vec<u8> = (0..=255u8).collect();
    v.extend_from_slice(b"\r\n\0end-of-stdout");
    v
}

#[test]
fn stdout_and_stderr_are_separate_and_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let out = all_bytes();
    let err: Vec<u8> = (0..=255u8).rev().chain(*b"\nstderr without newline").collect();
    fs::write(dir.path().join("out"), &out).unwrap();
    fs::write(dir.path().join("err"), &err).unwrap();
    let script = r#"cat "$D/out"; cat "$D/err" >&2; cat "$D/out"; cat "$D/err" >&2"#;
    let d = format!("D={}", dir.path().display());
    let r = run(&["--env", &d, "--sh", script]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout, [out.as_slice(), out.as_slice()].concat());
    assert_eq!(r.stderr, [err.as_slice(), err.as_slice()].concat());
}

#[test]
fn large_concurrent_stdout_and_stderr_are_byte_exact() {
    // Both streams written at once, 3 MiB each, into a file (not a pipe) on the client.
    let dir = tempfile::tempdir().unwrap();
    let out = pseudo_random(3 << 20, 1);
    let err = pseudo_random(3 << 20, 2);
    fs::write(dir.path().join("out"), &out).unwrap();
    fs::write(dir.path().join("err"), &err).unwrap();
    let stdout_file = dir.path().join("client-stdout");
    let d = format!("D={}", dir.path().display());
    let mut cmd = tether(["run", "--env", &d, "--sh", r#"cat "$D/out" & cat "$D/err" >&2; wait"#]);
    cmd.stdin(Stdio::null()).stdout(fs::File::create(&stdout_file).unwrap());
    let r = Proc::spawn_with(&mut cmd, false).finish(TIMEOUT);
    assert_eq!(r.code(), 0);
    let got = fs::read(&stdout_file).unwrap();
    assert!(
        got == out,
        "stdout differs ({} bytes, expected {})",
        got.len(),
        out.len()
    );
    assert!(
        r.stderr == err,
        "stderr differs ({} bytes, expected {})",
        r.stderr.len(),
        err.len()
    );
}

#[test]
fn argv_is_passed_verbatim_without_a_shell() {
    let r = run(&["--", "printf", "%s|", "a b", "$HOME", "*", "", "'q'"]);
    assert_eq!(r.code(), 0);
    assert_eq!(r.stdout_text(), "a b|$HOME|*||'q'|");
    assert!(r.stderr.is_empty(), "stderr: {}", r.stderr_text());
}

#[test]
fn exit_codes_are_the_builds() {
    for (args, want) in [
        (&["--", "true"][..], 0),
        (&["--", "false"][..], 1),
        (&["--sh", "exit 3"][..], 3),
        (&["--sh", "exit 255"][..], 255),
    ] {
        let r = run(args);
        assert_eq!(r.code(), want, "tether run {args:?}; stderr: {}", r.stderr_text());
        assert!(r.stderr.is_empty(), "tether run {args:?}: stderr: {}", r.stderr_text());
    }
}

#[test]
fn signal_deaths_are_128_plus_the_signal() {
    let r = run(&["--sh", "kill -9 $$"]);
    assert_eq!(r.code(), 137, "stderr: {}", r.stderr_text());
    let r = run(&["--sh", "kill -SEGV $$"]);
    assert_eq!(r.code(), 139, "stderr: {}", r.stderr_text());
    let r = run(&["--sh", "kill -TERM $$"]);
    assert_eq!(r.code(), 143, "stderr: {}", r.stderr_text());
}

#[test]
fn missing_command_is_127_with_a_reason() {
    let r = run(&["--", "tether-test-no-such-command-xyz"]);
    assert_eq!(r.code(), 127);
    let err = r.stderr_text();
    assert!(err.starts_with("tether: "), "stderr: {err}");
    assert!(err.contains("tether-test-no-such-command-xyz"), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(r.stdout.is_empty());
}

#[test]
fn non_executable_file_is_126_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-executable");
    fs::write(&file, "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let r = run(&["--", file.to_str().unwrap()]);
    assert_eq!(r.code(), 126);
    let err = r.stderr_text();
    assert!(err.starts_with("tether: "), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(r.stdout.is_empty(), "stdout: {}", r.stdout_text());
}

#[test]
fn a_directory_as_command_is_126() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&["--", dir.path().to_str().unwrap()]);
    assert_eq!(r.code(), 126, "stderr: {}", r.stderr_text());
}

#[test]
fn a_shell_that_does_not_exist_is_127() {
    let r = run(&["--shell", "/nonexistent/tether-test-sh", "--sh", "echo hi"]);
    assert_eq!(r.code(), 127, "stderr: {}", r.stderr_text());
    assert!(r.stdout.is_empty());
}

#[test]
fn unusable_via_command_is_125_with_a_one_line_reason() {
    let start = Instant::now();
    let r = run(&["--via", "false", "--", "true"]);
    assert_eq!(r.code(), 125);
    let err = r.stderr_text();
    assert!(err.starts_with("tether: "), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(r.stdout.is_empty());
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

#[test]
fn env_is_passed_and_tether_variables_are_set() {
    let r = run(&[
        "--env",
        "GREETING=hello world",
        "-e",
        "EQ=a=b",
        "--name",
        "my-build",
        "--sh",
        r#"printf '%s\n' "$GREETING" "$EQ" "$TETHER_BUILD_ID""#,
    ]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    let text = r.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "hello world");
    assert_eq!(lines[1], "a=b");
    assert!(lines[2].starts_with("my-build"), "TETHER_BUILD_ID={}", lines[2]);
}

#[test]
fn stdin_is_empty_without_i() {
    // The client's stdin stays open (a pipe nobody writes to): the build must not wait on it.
    let mut cmd = tether(["run", "--", "cat"]);
    cmd.stdin(Stdio::piped());
    let mut p = Proc::spawn(&mut cmd);
    let _keep_open = p.stdin();
    let r = p.finish(TIMEOUT);
    assert_eq!(r.code(), 0);
    assert!(r.stdout.is_empty());
}

#[test]
fn workdir_inside_the_work_dir_is_created_and_used() {
    let r = run(&["--workdir", "sub/dir", "--sh", r#"pwd -P; ls -a ..; echo "$TMPDIR""#]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    let text = r.stdout_text();
    let mut lines = text.lines();
    let pwd = lines.next().unwrap();
    assert!(pwd.ends_with("/work/sub/dir"), "pwd: {pwd}");
    let tmpdir = text.lines().last().unwrap();
    let build_dir = pwd.strip_suffix("/work/sub/dir").unwrap();
    assert_eq!(tmpdir, format!("{build_dir}/tmp"));
}

#[test]
fn workdir_escaping_the_work_dir_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    for workdir in ["../x", "/nonexistent-tether-workdir", "/proc/self", "a/../../b"] {
        let m = format!("M={}", marker.display());
        let r = run(&["--workdir", workdir, "--env", &m, "--sh", r#"touch "$M"; echo ran"#]);
        assert_eq!(r.code(), 125, "--workdir {workdir}: stderr: {}", r.stderr_text());
        let err = r.stderr_text();
        assert!(err.starts_with("tether: "), "stderr: {err}");
        assert!(err.contains("workdir"), "stderr: {err}");
        assert!(r.stdout.is_empty(), "stdout: {}", r.stdout_text());
        assert!(!marker.exists(), "the build ran with --workdir {workdir}");
    }
}

/// Parses `--json` output into events.
fn json_events(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8(stdout.to_vec())
        .expect("--json output is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// The bytes of one stream from output events, checking that offsets (build-wide
/// positions over both streams) are contiguous.
fn json_stream(events: &[Value], stream: &str) -> Vec<u8> {
    let mut data = Vec::new();
    let mut position = 0u64;
    for ev in events.iter().filter(|e| e["event"] == "output") {
        assert_eq!(ev["offset"].as_u64(), Some(position), "offset of {ev}");
        let bytes = match (ev.get("data"), ev.get("data_base64")) {
            (Some(Value::String(s)), None) => s.as_bytes().to_vec(),
            (None, Some(Value::String(b))) => base64_decode(b),
            _ => panic!("output event without data: {ev}"),
        };
        position += bytes.len() as u64;
        if ev["stream"] == stream {
            data.extend_from_slice(&bytes);
        }
    }
    data
}

#[test]
fn json_emits_started_output_and_exited_events() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("bin"), all_bytes()).unwrap();
    let d = format!("D={}", dir.path().display());
    let r = run(&[
        "--json",
        "--env",
        &d,
        "--sh",
        r#"echo hello; printf 'oops' >&2; cat "$D/bin" >&2; exit 3"#,
    ]);
    assert_eq!(r.code(), 3, "stderr: {}", r.stderr_text());
    assert!(
        r.stderr.is_empty(),
        "with --json nothing goes to stderr: {}",
        r.stderr_text()
    );
    let events = json_events(&r.stdout);
    assert_eq!(events.first().unwrap()["event"], "started", "{events:?}");
    assert!(events[0]["pid"].as_u64().is_some_and(|p| p > 0), "{}", events[0]);
    let build = events[0]["build"].as_str().unwrap().to_owned();
    let last = events.last().unwrap();
    assert_eq!(last["event"], "exited", "{events:?}");
    assert_eq!(last["exit_code"], 3);
    assert_eq!(last["status"]["code"], 3);
    assert_eq!(last["cause"], "completed");
    assert_eq!(last["stdout_bytes"], 6);
    assert_eq!(last["stderr_bytes"], 4 + all_bytes().len() as u64);
    for ev in &events {
        assert_eq!(ev["build"], build.as_str(), "{ev}");
    }
    assert!(events[1..events.len() - 1].iter().all(|e| e["event"] == "output"));
    assert_eq!(json_stream(&events, "stdout"), b"hello\n");
    assert_eq!(
        json_stream(&events, "stderr"),
        [b"oops".as_slice(), &all_bytes()].concat()
    );
}

#[test]
fn json_reports_signal_deaths_and_timeouts() {
    let r = run(&["--json", "--sh", "kill -9 $$"]);
    assert_eq!(r.code(), 137);
    let events = json_events(&r.stdout);
    let last = events.last().unwrap();
    assert_eq!(last["event"], "exited");
    assert_eq!(last["exit_code"], 137);
    assert_eq!(last["status"]["signal"], 9);
    assert_eq!(last["cause"], "completed");

    let r = run(&["--json", "--timeout", "200ms", "--", "sleep", "30"]);
    assert_eq!(r.code(), 124);
    let events = json_events(&r.stdout);
    let last = events.last().unwrap();
    assert_eq!(last["exit_code"], 124);
    assert_eq!(last["cause"], "timed_out");
}

#[test]
fn json_reports_start_errors() {
    let r = run(&["--json", "--", "tether-test-no-such-command-xyz"]);
    assert_eq!(r.code(), 127);
    let events = json_events(&r.stdout);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "error");
    assert!(events[0]["message"]
        .as_str()
        .unwrap()
        .contains("tether-test-no-such-command-xyz"));
}

#[test]
fn non_utf8_argv_and_workdir_pass_through_unchanged() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = tether(["run", "--workdir"]);
    cmd.arg(OsStr::from_bytes(b"dir-\xff"))
        .args(["--", "sh", "-c", r#"printf '%s|' "$1"; basename "$(pwd -P)""#, "sh"])
        .arg(OsStr::from_bytes(b"\xff\xfe-arg"))
        .stdin(Stdio::null());
    let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout, b"\xff\xfe-arg|dir-\xff\n");
}

#[test]
fn non_utf8_env_and_script_pass_through_unchanged() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = tether(["run", "--env"]);
    cmd.arg(OsStr::from_bytes(b"V=\xc3\x28-value"))
        .arg("--sh")
        .arg(OsStr::from_bytes(b"printf '%s|%s' \"$V\" '\xff'"))
        .stdin(Stdio::null());
    let r = Proc::spawn(&mut cmd).finish(TIMEOUT);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout, b"\xc3\x28-value|\xff");
}

#[test]
fn command_line_errors_are_125_not_a_build_status() {
    for args in [
        &["--bogus-flag", "--", "true"][..],
        &["--timeout", "soon", "--", "true"],
        &[],
    ] {
        let r = run(args);
        assert_eq!(r.code(), 125, "tether run {args:?}: stderr: {}", r.stderr_text());
        assert!(r.stderr_text().starts_with("tether: "), "stderr: {}", r.stderr_text());
    }
}

#[test]
fn empty_output_and_exact_chunk_sizes() {
    let r = run(&["--sh", "exit 0"]);
    assert_eq!(r.code(), 0);
    assert!(r.stdout.is_empty() && r.stderr.is_empty());
    for len in [1usize, 65535, 65536, 65537, 131072] {
        let script = format!("head -c {len} /dev/zero | tr '\\0' 'z'");
        let r = run(&["--sh", &script]);
        assert_eq!(r.code(), 0);
        assert_eq!(r.stdout.len(), len);
        assert!(r.stdout.iter().all(|&b| b == b'z'));
    }
}

#[test]
fn a_build_that_closes_its_output_early_keeps_its_status() {
    let start = Instant::now();
    let r = run(&["--sh", "echo before; exec >&- 2>&-; sleep 0.2; exit 6"]);
    assert_eq!(r.code(), 6, "stderr: {}", r.stderr_text());
    assert_eq!(r.stdout_text(), "before\n");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_clients_stdout_pipe_is_not_made_non_blocking() {
    // Sharing a pipe with other processes (a shell's `|`) must not change its file
    // status flags for them.
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let keep = wr.try_clone().unwrap();
    let mut cmd = tether(["run", "--sh", "head -c 300000 /dev/zero"]);
    cmd.stdin(Stdio::null()).stdout(wr);
    let reader = std::thread::spawn(move || {
        let mut f = fs::File::from(rd);
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut v).unwrap();
        v.len()
    });
    let p = Proc::spawn_with(&mut cmd, false);
    drop(cmd); // holds the write end
    let r = p.finish(TIMEOUT);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr_text());
    let flags = OFlag::from_bits_truncate(fcntl(&keep, FcntlArg::F_GETFL).unwrap());
    assert!(
        !flags.contains(OFlag::O_NONBLOCK),
        "the shared pipe was left O_NONBLOCK"
    );
    drop(keep);
    assert_eq!(reader.join().unwrap(), 300000);
}

#[test]
fn closing_the_clients_stdout_early_keeps_the_builds_status() {
    let mut cmd = tether(["run", "--sh", "echo ready; yes | head -c 50000000; exit 7"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let err = integration_tests::Collector::spawn(child.stderr.take().unwrap());
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"ready\n");
    drop(out); // like `| head -n 1`
    let mut p = Proc {
        child,
        stdout: integration_tests::Collector::default(),
        stderr: err,
    };
    let st = p.wait_timeout(TIMEOUT).expect("the client exits");
    assert_eq!(st.code(), Some(7), "stderr: {}", p.stderr.text());
}

#[test]
fn a_reader_that_goes_away_ends_the_build_with_sigpipe_as_in_a_local_pipeline() {
    // `tether run -- yes | head -1`: once our stdout is closed, the daemon closes the
    // build's stdout pipe, and `yes` dies of SIGPIPE instead of running forever.
    let mut cmd = tether(["run", "--", "yes"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let err = integration_tests::Collector::spawn(child.stderr.take().unwrap());
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 2];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"y\n");
    drop(out);
    let mut p = Proc {
        child,
        stdout: integration_tests::Collector::default(),
        stderr: err,
    };
    let st = p
        .wait_timeout(TIMEOUT)
        .expect("the client exits once the build died of SIGPIPE");
    assert_eq!(st.code(), Some(128 + 13), "stderr: {}", p.stderr.text());
}
