//! The build lifecycle against real processes: dirs, statuses, process groups, output.
//!
//! Every test here spawns only through the executor: the executor's reaper waits for
//! all children of this test process.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use tether_executor::{
    Build, BuildEvent, BuildOutcome, BuildSpec, ChildStatus, CommandSpec, EndCause, Executor, ExecutorConfig,
    StartError, Stream,
};

fn executor(root: &Path) -> Executor {
    let mut config = ExecutorConfig::new();
    config.state_root = root.to_path_buf();
    config.default_grace = Duration::from_secs(5);
    Executor::new(config).expect("executor").0
}

fn script(s: &str) -> BuildSpec {
    BuildSpec {
        id: None,
        name: None,
        command: CommandSpec::Script {
            script: s.into(),
            shell: None,
        },
        env: Vec::new(),
        workdir: None,
        timeout: None,
        grace: None,
        stdin: false,
        hold_after: None,
        hold_on_failure: None,
        secrets: Default::default(),
        confine: Default::default(),
    }
}

fn argv(args: &[&str]) -> BuildSpec {
    BuildSpec {
        command: CommandSpec::Argv(args.iter().map(OsString::from).collect()),
        ..script("")
    }
}

struct Finished {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    outcome: BuildOutcome,
}

/// Collects a build's events, checking that positions are contiguous across both
/// streams and that the spool holds exactly what the events carried.
async fn finish(mut build: Build) -> Finished {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut events: Vec<(Stream, Vec<u8>)> = Vec::new();
    // Where the next chunk starts (unknown when a test consumed the first events).
    let mut next: Option<u64> = None;
    while let Some(ev) = build.events.recv().await {
        match ev {
            BuildEvent::Output(c) => {
                if let Some(n) = next {
                    assert_eq!(c.offset, n, "positions are contiguous");
                }
                next = Some(c.offset + c.data.len() as u64);
                let buf = match c.stream {
                    Stream::Stdout => &mut stdout,
                    Stream::Stderr => &mut stderr,
                };
                buf.extend_from_slice(&c.data);
                events.push((c.stream, c.data));
            }
            BuildEvent::Held(h) => panic!("a build without hold_after was held: {h:?}"),
            BuildEvent::Gap { from, to } => panic!("output {from}..{to} could not be spooled"),
            BuildEvent::Finished(outcome) => {
                assert!(build.events.recv().await.is_none(), "Finished is the last event");
                assert_spooled(&build, &events, &outcome);
                return Finished {
                    stdout,
                    stderr,
                    outcome,
                };
            }
        }
    }
    panic!("event stream ended without Finished");
}

/// The spool replays the events' bytes in order, stream by stream, and holds the status.
/// `events` are the build's last events (a test may have consumed earlier ones): they
/// must be the spool's tail.
fn assert_spooled(build: &Build, events: &[(Stream, Vec<u8>)], outcome: &BuildOutcome) {
    let seen: u64 = events.iter().map(|(_, d)| d.len() as u64).sum();
    let total = build.spool.end();
    assert_eq!(total, outcome.stdout_bytes + outcome.stderr_bytes);
    assert!(build.spool.finished(), "the status is written before Finished is sent");
    let status = build.spool.status().expect("status written");
    assert!(
        status.contains(&format!("\"stdout_bytes\":{}", outcome.stdout_bytes)),
        "{status}"
    );
    let mut reader = build.spool.reader();
    let mut spooled: Vec<(Stream, Vec<u8>)> = Vec::new();
    let mut pos = total - seen;
    while pos < total {
        for item in reader.read(pos, total, 1 << 20).expect("spool read") {
            match item {
                tether_executor::spool::SpoolItem::Data { stream, position, data } => {
                    assert_eq!(position, pos);
                    pos += data.len() as u64;
                    match spooled.last_mut() {
                        Some((s, d)) if *s == stream => d.extend_from_slice(&data),
                        _ => spooled.push((stream, data)),
                    }
                }
                gap => panic!("unexpected {gap:?}"),
            }
        }
    }
    let mut merged: Vec<(Stream, Vec<u8>)> = Vec::new();
    for (stream, data) in events {
        match merged.last_mut() {
            Some((s, d)) if s == stream => d.extend_from_slice(data),
            _ => merged.push((*stream, data.clone())),
        }
    }
    assert_eq!(spooled, merged);
}

/// Reads output until `needle` appears on stdout, returning the build for more.
async fn wait_for_stdout(build: &mut Build, needle: &str) -> String {
    let mut seen = Vec::new();
    while let Some(ev) = build.events.recv().await {
        if let BuildEvent::Output(c) = ev {
            if c.stream == Stream::Stdout {
                seen.extend_from_slice(&c.data);
                let text = String::from_utf8_lossy(&seen).into_owned();
                if text.contains(needle) {
                    return text;
                }
            }
        }
    }
    panic!("build ended before printing {needle:?}");
}

fn alive(pid: i32) -> bool {
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

async fn gone_within(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_and_streams_are_exact() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let f = finish(ex.start(script("printf 'out'; printf 'err' >&2; exit 42")).unwrap()).await;
    assert_eq!(f.stdout, b"out");
    assert_eq!(f.stderr, b"err");
    assert_eq!(f.outcome.status, Some(ChildStatus::Exited(42)));
    assert_eq!(f.outcome.cause, EndCause::Completed);
    assert_eq!((f.outcome.stdout_bytes, f.outcome.stderr_bytes), (3, 3));
}

fn with_secret(mut spec: BuildSpec, value: &str) -> BuildSpec {
    spec.secrets = tether_executor::mask::Secrets::new([("TOKEN", value.as_bytes())]).unwrap();
    spec.env.push(("TOKEN".into(), value.into()));
    spec
}

/// The secret, written in pieces by separate writes, quoted by `set -x` and base64'd, on
/// both streams: only masks reach the events and the spool (`finish` checks the spool
/// holds what the events carried).
#[tokio::test(flavor = "multi_thread")]
async fn secrets_are_masked_in_every_form_on_both_streams() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let secret = "s3cr3t 'tok'";
    let script_text = r#"
        printf 'a=s3c'; printf 'r3t '; printf "'tok'\n"
        printf '%s' "$TOKEN" | base64
        printf 'x%s' "$TOKEN" | base64
        printf 'xy%s' "$TOKEN" | base64
        set -x; : "$TOKEN"
        echo "err=$TOKEN" >&2
    "#;
    let f = finish(ex.start(with_secret(script(script_text), secret)).unwrap()).await;
    let (out, err) = (String::from_utf8_lossy(&f.stdout), String::from_utf8_lossy(&f.stderr));
    assert!(out.starts_with("a=****\n"), "{out}");
    assert_eq!(out.matches("****").count(), 4, "every base64 alignment: {out}");
    // The trace quotes the value as the shell chooses to (dash: not at all, bash: '\'').
    assert!(
        err.lines().any(|l| l.starts_with("+ : ") && l.contains("****")),
        "{err}"
    );
    assert!(err.lines().any(|l| l == "err=****"), "{err}");
    for text in [&out, &err] {
        assert!(!text.contains("s3cr3t") && !text.contains("czNjcjN0"), "{text}");
    }
    assert_eq!(f.outcome.status, Some(ChildStatus::Exited(0)));
    assert_eq!(
        f.outcome.stdout_bytes,
        f.stdout.len() as u64,
        "counts are of masked output"
    );
}

/// Output that may be the start of a secret is held back only briefly: a prompt
/// without a newline shows while the build waits.
#[tokio::test(flavor = "multi_thread")]
async fn output_held_back_for_masking_is_let_out_when_the_build_goes_quiet() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut b = ex
        .start(with_secret(
            script("printf 'password: s3c'; exec sleep 600"),
            "s3cr3t-value",
        ))
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(20), wait_for_stdout(&mut b, "password: s3c"))
        .await
        .expect("the held prefix is let out");
    assert_eq!(seen, "password: s3c");
    b.control.cancel(false);
    let f = finish(b).await;
    assert_eq!(f.outcome.cause, EndCause::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn signal_deaths_are_reported_as_signals() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    for (sig, name) in [(15, "TERM"), (9, "KILL"), (6, "ABRT")] {
        let f = finish(ex.start(script(&format!("kill -{name} $$"))).unwrap()).await;
        match f.outcome.status {
            Some(ChildStatus::Signaled { signal, .. }) => assert_eq!(signal, sig),
            other => panic!("kill -{name}: expected a signal death, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn not_found_and_not_executable_are_distinct() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let err = ex.start(argv(&["definitely-not-a-command-xyz"])).unwrap_err();
    assert!(matches!(err, StartError::NotFound { .. }), "{err:?}");

    let file = t.path().join("not-executable");
    std::fs::write(&file, "echo hi\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ex.start(argv(&[file.to_str().unwrap()])).unwrap_err();
    assert!(matches!(err, StartError::NotExecutable { .. }), "{err:?}");

    let err = ex.start(argv(&[t.path().to_str().unwrap()])).unwrap_err();
    assert!(matches!(err, StartError::NotExecutable { .. }), "a directory: {err:?}");

    // A failed start leaves no build directory behind.
    assert_eq!(build_dirs(&ex).len(), 0);
}

fn build_dirs(ex: &Executor) -> Vec<PathBuf> {
    std::fs::read_dir(ex.state().builds_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_builds_never_share_a_directory_and_leave_none() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut builds = Vec::new();
    for _ in 0..4 {
        let mut spec = script("echo \"$PWD $TMPDIR $TETHER_BUILD_ID\"; touch mine; cat - </dev/null");
        spec.name = Some("same-name".into());
        builds.push(ex.start(spec).unwrap());
    }
    let ids: Vec<String> = builds.iter().map(|b| b.id.clone()).collect();
    let mut lines = Vec::new();
    for b in builds {
        let f = finish(b).await;
        assert_eq!(f.outcome.status, Some(ChildStatus::Exited(0)));
        lines.push(String::from_utf8(f.stdout).unwrap());
    }
    let mut dirs: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    dirs.sort();
    dirs.dedup();
    assert_eq!(dirs.len(), 4, "each build has its own work dir: {lines:?}");
    for (line, id) in lines.iter().zip(&ids) {
        let parts: Vec<&str> = line.trim().split(' ').collect();
        assert!(parts[0].ends_with("/work") && parts[1].ends_with("/tmp"), "{line}");
        assert_eq!(parts[2], id);
        assert!(id.starts_with("same-name."));
    }
    assert!(
        build_dirs(&ex).is_empty(),
        "all build dirs removed: {:?}",
        build_dirs(&ex)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn build_dirs_are_private_and_read_only_trees_are_removed() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut b = ex
        .start(script(
            "mkdir -p ro/deeper && echo x > ro/deeper/f && chmod -R a-w ro && chmod 000 ro/deeper; \
             stat -c %a . \"$TMPDIR\" ..; echo ready; exec sleep 100",
        ))
        .unwrap();
    let text = wait_for_stdout(&mut b, "ready").await;
    assert_eq!(text.lines().take(3).collect::<Vec<_>>(), ["700", "700", "700"]);
    let root = b.work_dir.parent().unwrap().to_path_buf();
    assert!(root.exists());
    b.control.cancel(true);
    finish(b).await;
    assert!(!root.exists(), "the build dir with read-only contents is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_the_whole_group_including_grandchildren() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("sleep 1000 & echo $!; sh -c 'sleep 1000' & echo $!; echo ready; wait");
    spec.timeout = Some(Duration::from_millis(300));
    spec.grace = Some(Duration::from_secs(5));
    let mut b = ex.start(spec).unwrap();
    let text = wait_for_stdout(&mut b, "ready").await;
    let pids: Vec<i32> = text.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(pids.len(), 2);
    let f = finish(b).await;
    assert_eq!(f.outcome.cause, EndCause::TimedOut);
    assert_eq!(
        f.outcome.status,
        Some(ChildStatus::Signaled {
            signal: 15,
            core_dumped: false
        })
    );
    for pid in pids {
        assert!(!alive(pid), "grandchild {pid} survived the timeout");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_escalates_to_sigkill_after_the_grace_period() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("trap '' TERM; sleep 1000 & echo $!; echo ready; while :; do sleep 1; done");
    spec.grace = Some(Duration::from_millis(300));
    let mut b = ex.start(spec).unwrap();
    let text = wait_for_stdout(&mut b, "ready").await;
    let grandchild: i32 = text.lines().next().unwrap().parse().unwrap();
    let started = Instant::now();
    b.control.cancel(false);
    let f = finish(b).await;
    assert_eq!(f.outcome.cause, EndCause::Cancelled);
    assert_eq!(
        f.outcome.status,
        Some(ChildStatus::Signaled {
            signal: 9,
            core_dumped: false
        }),
        "the TERM-ignoring shell is killed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "SIGKILL waited for the grace period"
    );
    assert!(!alive(grandchild));
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_cancel_kills_at_once() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("trap '' TERM; echo ready; while :; do sleep 1; done");
    spec.grace = Some(Duration::from_secs(600));
    let mut b = ex.start(spec).unwrap();
    wait_for_stdout(&mut b, "ready").await;
    b.control.cancel(false);
    b.control.cancel(true);
    let f = tokio::time::timeout(Duration::from_secs(30), finish(b))
        .await
        .expect("a forced cancel does not wait for the 600 s grace");
    assert_eq!(
        f.outcome.status,
        Some(ChildStatus::Signaled {
            signal: 9,
            core_dumped: false
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn background_process_holding_the_pipe_does_not_hang_the_build() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let f = tokio::time::timeout(
        Duration::from_secs(30),
        finish(ex.start(script("sleep 1000 & echo $!; echo done")).unwrap()),
    )
    .await
    .expect("the build finishes although a grandchild holds stdout open");
    let text = String::from_utf8(f.stdout).unwrap();
    assert!(text.ends_with("done\n"), "all output before exit arrived: {text:?}");
    assert_eq!(f.outcome.status, Some(ChildStatus::Exited(0)));
    assert!(f.outcome.leftovers_killed);
    let pid: i32 = text.lines().next().unwrap().parse().unwrap();
    assert!(
        gone_within(pid, Duration::from_secs(5)).await,
        "leftover {pid} was ended"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn workdir_stays_inside_the_work_dir() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("pwd");
    spec.workdir = Some("sub/dir".into());
    let f = finish(ex.start(spec).unwrap()).await;
    assert!(String::from_utf8(f.stdout)
        .unwrap()
        .trim_end()
        .ends_with("/work/sub/dir"));

    let state = t.path().to_path_buf();
    for bad in [
        PathBuf::from("../escape"),
        PathBuf::from("a/../../b"),
        t.path().join("no-such-dir"),
        state.clone(),
        PathBuf::from("/proc"),
    ] {
        let mut spec = script("pwd");
        spec.workdir = Some(bad.clone());
        let err = ex.start(spec).unwrap_err();
        assert!(
            matches!(err, StartError::BadWorkdir { .. }),
            "{}: {err:?}",
            bad.display()
        );
    }
    assert!(build_dirs(&ex).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absolute_workdir_is_used_as_it_is_and_left_in_place() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let shared = tempfile::tempdir().unwrap();
    let ws = shared.path().join("workspace");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("sources"), "x").unwrap();
    let mut spec = script(r#"pwd; ls; echo "$TMPDIR"; touch "$TMPDIR/scratch" out"#);
    spec.workdir = Some(ws.clone());
    let f = finish(ex.start(spec).unwrap()).await;
    let out = String::from_utf8(f.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], ws.to_str().unwrap());
    assert_eq!(lines[1], "sources");
    let tmp = PathBuf::from(lines[2]);
    assert!(tmp.starts_with(t.path()), "private TMPDIR: {}", tmp.display());
    assert_eq!(f.outcome.status, Some(ChildStatus::Exited(0)));
    // The shared dir keeps what the build made there; its private dir is gone.
    assert!(ws.join("out").is_file() && ws.join("sources").is_file());
    assert!(!tmp.exists());
    assert!(build_dirs(&ex).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_pipe_reaches_the_build_and_closes() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = argv(&["wc", "-c"]);
    spec.stdin = true;
    let mut b = ex.start(spec).unwrap();
    let mut stdin = b.stdin.take().unwrap();
    let block = vec![b'x'; 100_000];
    for _ in 0..10 {
        stdin.write_all(&block).await.unwrap();
    }
    drop(stdin);
    let f = finish(b).await;
    assert_eq!(String::from_utf8(f.stdout).unwrap().trim(), "1000000");
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_is_dev_null_unless_asked_for() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let f = finish(ex.start(script("cat; readlink /proc/self/fd/0")).unwrap()).await;
    assert_eq!(String::from_utf8(f.stdout).unwrap(), "/dev/null\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn script_runs_with_a_busybox_only_path() {
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        eprintln!("skipped: busybox is not installed (CI installs busybox-static)");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let bb = t.path().join("busybox-root");
    std::fs::create_dir(&bb).unwrap();
    std::fs::copy(busybox, bb.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bb.join("sh")).unwrap();
    std::os::unix::fs::symlink("busybox", bb.join("echo")).unwrap();
    let mut config = ExecutorConfig::new();
    config.state_root = t.path().join("state");
    config.base_env = vec![("PATH".into(), bb.clone().into_os_string())];
    config.fallback_shells = vec![t.path().join("no-bin-sh")];
    let ex = Executor::new(config).unwrap().0;
    let b = ex.start(script("echo from $0")).unwrap();
    assert_eq!(b.shell.as_deref(), Some(bb.join("sh").as_path()));
    let f = finish(b).await;
    assert_eq!(f.outcome.status, Some(ChildStatus::Exited(0)));
    assert_eq!(
        String::from_utf8(f.stdout).unwrap().trim(),
        format!("from {}", bb.join("sh").display())
    );

    // No shell anywhere: a clear error, not a crash.
    let mut config = ExecutorConfig::new();
    config.state_root = t.path().join("state2");
    config.base_env = vec![("PATH".into(), "/nonexistent".into())];
    config.fallback_shells = vec![t.path().join("no-bin-sh")];
    let ex = Executor::new(config).unwrap().0;
    assert!(matches!(ex.start(script("true")).unwrap_err(), StartError::NoShell));
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_are_reaped_and_do_not_confuse_statuses() {
    // The build double-forks children that exit on their own; the reaper collects
    // whatever is re-parented to this process, and the build's own status stays exact.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let f = finish(
        ex.start(script(
            "for i in 1 2 3 4 5 6 7 8 9 10; do (sh -c 'exit 3' &); done; exit 7",
        ))
        .unwrap(),
    )
    .await;
    assert_eq!(f.outcome.status, Some(ChildStatus::Exited(7)));
}

/// Reads events up to `Held`, returning the output before it.
async fn until_held(build: &mut Build) -> (Vec<u8>, tether_executor::Held) {
    let mut out = Vec::new();
    while let Some(ev) = build.events.recv().await {
        match ev {
            BuildEvent::Output(c) => out.extend_from_slice(&c.data),
            BuildEvent::Held(h) => return (out, h),
            BuildEvent::Gap { from, to } => panic!("output {from}..{to} could not be spooled"),
            BuildEvent::Finished(o) => panic!("finished without a hold: {o:?}"),
        }
    }
    panic!("event stream ended before Held");
}

async fn outcome_after_hold(build: &mut Build) -> BuildOutcome {
    match build.events.recv().await {
        Some(BuildEvent::Finished(o)) => o,
        other => panic!("expected Finished after Held, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_build_keeps_its_directory_until_released_with_a_new_status() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("echo made > out.txt; echo done; exit 3");
    spec.hold_after = Some(Duration::from_secs(600));
    let mut build = ex.start(spec).unwrap();
    let work = build.work_root.clone();
    let (out, held) = until_held(&mut build).await;
    assert_eq!(out, b"done\n", "all output comes before Held");
    assert_eq!(held.status, Some(ChildStatus::Exited(3)));
    assert_eq!(held.cause, EndCause::Completed);
    assert_eq!(std::fs::read(work.join("out.txt")).unwrap(), b"made\n");
    build.control.release(Some(ChildStatus::Exited(0)));
    let outcome = outcome_after_hold(&mut build).await;
    assert_eq!(outcome.status, Some(ChildStatus::Exited(0)));
    assert!(!work.exists(), "released: the directory is removed");
    assert!(build_dirs(&ex).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hold_ends_with_the_original_status_on_cancel_and_when_it_runs_out() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("exit 5");
    spec.hold_after = Some(Duration::from_secs(600));
    let mut build = ex.start(spec).unwrap();
    until_held(&mut build).await;
    build.control.cancel(false);
    assert_eq!(
        outcome_after_hold(&mut build).await.status,
        Some(ChildStatus::Exited(5))
    );

    let mut spec = script("exit 6");
    spec.hold_after = Some(Duration::from_millis(50));
    let mut build = ex.start(spec).unwrap();
    let work = build.work_root.clone();
    until_held(&mut build).await;
    // Nobody releases it: the hold runs out on its own.
    let outcome = outcome_after_hold(&mut build).await;
    assert_eq!(outcome.status, Some(ChildStatus::Exited(6)));
    assert!(!work.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_build_runs_with_what_was_put_into_its_work_dir() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let prepared = ex.prepare(script("cat input.txt")).unwrap();
    std::fs::write(prepared.work_dir().join("input.txt"), b"uploaded\n").unwrap();
    let f = finish(prepared.start().unwrap()).await;
    assert_eq!(f.stdout, b"uploaded\n");
    assert!(build_dirs(&ex).is_empty());

    // One that is dropped (or discarded) without starting leaves nothing behind.
    let prepared = ex.prepare(script("true")).unwrap();
    std::fs::create_dir_all(prepared.work_dir().join("a/b")).unwrap();
    assert_eq!(build_dirs(&ex).len(), 1);
    drop(prepared);
    let prepared = ex.prepare(script("true")).unwrap();
    prepared.discard();
    assert!(build_dirs(&ex).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_on_failure_skips_a_build_that_succeeded() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("echo fine");
    spec.hold_on_failure = Some(Duration::from_secs(600));
    // `finish` fails on a Held event.
    let f = finish(ex.start(spec).unwrap()).await;
    assert_eq!(f.outcome.status, Some(ChildStatus::Exited(0)));
    assert!(build_dirs(&ex).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_on_failure_holds_a_failed_build_until_released() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("echo partial > log.txt; exit 3");
    spec.hold_on_failure = Some(Duration::from_secs(600));
    let mut build = ex.start(spec).unwrap();
    let work = build.work_root.clone();
    let (_, held) = until_held(&mut build).await;
    assert_eq!(held.status, Some(ChildStatus::Exited(3)));
    assert_eq!(held.cause, EndCause::Completed);
    assert_eq!(held.hold, Duration::from_secs(600));
    assert_eq!(std::fs::read(work.join("log.txt")).unwrap(), b"partial\n");
    build.control.release(None);
    let outcome = outcome_after_hold(&mut build).await;
    assert_eq!(outcome.status, Some(ChildStatus::Exited(3)));
    assert!(!work.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn hold_on_failure_holds_a_timed_out_build_but_not_a_cancelled_one() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("exec sleep 100");
    spec.timeout = Some(Duration::from_millis(100));
    spec.hold_on_failure = Some(Duration::from_secs(600));
    let mut build = ex.start(spec).unwrap();
    let (_, held) = until_held(&mut build).await;
    assert_eq!(held.cause, EndCause::TimedOut);
    build.control.release(None);
    assert_eq!(outcome_after_hold(&mut build).await.cause, EndCause::TimedOut);

    let mut spec = script("echo ready; exec sleep 100");
    spec.hold_on_failure = Some(Duration::from_secs(600));
    let mut build = ex.start(spec).unwrap();
    wait_for_stdout(&mut build, "ready").await;
    build.control.cancel(false);
    // `finish` fails on a Held event: the user stopped it, nothing is kept.
    let f = finish(build).await;
    assert_eq!(f.outcome.cause, EndCause::Cancelled);
    assert!(build_dirs(&ex).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_both_holds_the_longer_one_applies() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("exit 1");
    spec.hold_after = Some(Duration::from_millis(10));
    spec.hold_on_failure = Some(Duration::from_secs(600));
    let mut build = ex.start(spec).unwrap();
    let (_, held) = until_held(&mut build).await;
    assert_eq!(held.hold, Duration::from_secs(600));
    build.control.release(None);
    assert_eq!(
        outcome_after_hold(&mut build).await.status,
        Some(ChildStatus::Exited(1))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_build_env_is_what_the_command_got() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = script("printf '%s %s %s' \"$TETHER_BUILD_ID\" \"$TMPDIR\" \"$MINE\"");
    spec.env = vec![("MINE".into(), "from-spec".into())];
    let prepared = ex.prepare(spec).unwrap();
    let env = prepared.env();
    let build = prepared.start().unwrap();
    assert_eq!(&*build.env, env.as_slice(), "computed once, shared");
    let get = |k: &str| {
        env.iter()
            .find(|(ek, _)| ek == k)
            .map(|(_, v)| v.to_string_lossy().into_owned())
            .unwrap()
    };
    let expected = format!("{} {} {}", get("TETHER_BUILD_ID"), get("TMPDIR"), get("MINE"));
    assert_eq!(get("TETHER_BUILD_ID"), build.id);
    let f = finish(build).await;
    assert_eq!(String::from_utf8(f.stdout).unwrap(), expected);
}
