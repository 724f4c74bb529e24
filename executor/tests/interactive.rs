//! Interactive shells against real processes: ptys, pipes, hang-ups, leftovers, and
//! shells attached to builds.
//!
//! Every test here spawns only through the executor: the executor's reaper waits for
//! all children of this test process. The process is a child subreaper, as the daemon
//! is (or it is PID 1), so orphans of the shells are reaped here too.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether_executor::procs::{live_session_members, session_members};
use tether_executor::{
    BuildEvent, BuildSpec, ChildStatus, CommandSpec, EndCause, Executor, ExecutorConfig, Shell, ShellEvent, ShellSpec,
    StartError, Stream, WindowSize,
};

/// Generous: a failing test should say so rather than hang.
const LIMIT: Duration = Duration::from_secs(30);

fn executor(root: &Path) -> Executor {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut config = ExecutorConfig::new();
    config.state_root = root.to_path_buf();
    config.default_grace = Duration::from_secs(5);
    config.base_env = env();
    Executor::new(config).expect("executor").0
}

fn env() -> Vec<(OsString, OsString)> {
    [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("TERM", "dumb"),
        ("HOME", "/"),
        ("PS1", "$ "),
    ]
    .iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect()
}

const SIZE: WindowSize = WindowSize { rows: 33, cols: 101 };

fn pty_spec(cwd: &Path) -> ShellSpec {
    ShellSpec {
        argv: None,
        shell: Some("/bin/sh".into()),
        env: env(),
        cwd: cwd.to_path_buf(),
        tty: Some(SIZE),
        grace: Duration::from_secs(5),
        confine: Default::default(),
    }
}

fn pipe_spec(cwd: &Path, argv: &[&str]) -> ShellSpec {
    ShellSpec {
        argv: Some(argv.iter().map(OsString::from).collect()),
        tty: None,
        ..pty_spec(cwd)
    }
}

/// A shell and what it printed so far that no expectation consumed yet.
struct Term {
    shell: Shell,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    markers: u32,
}

impl Term {
    fn new(shell: Shell) -> Term {
        Term {
            shell,
            stdout: Vec::new(),
            stderr: Vec::new(),
            markers: 0,
        }
    }

    async fn send(&mut self, text: &str) {
        self.shell.input.write_all(text.as_bytes()).await.expect("input");
    }

    /// Reads until `needle` appears on `stream`; returns the text up to and including it
    /// and forgets it.
    async fn expect_on(&mut self, stream: Stream, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let seen = match stream {
                Stream::Stdout => &mut self.stdout,
                Stream::Stderr => &mut self.stderr,
            };
            let text = String::from_utf8_lossy(seen).into_owned();
            if let Some(at) = text.find(needle) {
                let end = at + needle.len();
                seen.drain(..end);
                return text[..end].to_owned();
            }
            match tokio::time::timeout_at(deadline, self.shell.events.recv()).await {
                Ok(Some(ShellEvent::Output { stream, data })) => match stream {
                    Stream::Stdout => self.stdout.extend_from_slice(&data),
                    Stream::Stderr => self.stderr.extend_from_slice(&data),
                },
                Ok(Some(ShellEvent::Exited(st))) => panic!("exited ({st:?}) before printing {needle:?}: {text:?}"),
                Ok(None) => panic!("events ended before {needle:?}"),
                Err(_) => panic!("no {needle:?} within {LIMIT:?}; seen {text:?}"),
            }
        }
    }

    async fn expect(&mut self, needle: &str) -> String {
        self.expect_on(Stream::Stdout, needle).await
    }

    /// Has the shell print `value` (shell syntax) behind a marker that its echo of the
    /// command line does not contain, and returns what it printed.
    async fn value(&mut self, value: &str) -> String {
        self.markers += 1;
        let tag = format!("v{}=", self.markers);
        self.send(&format!("printf '%s=%s\\n' v{} \"{value}\"\n", self.markers))
            .await;
        self.expect(&tag).await;
        let line = self.expect("\n").await;
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Reads to the end: the status of `Exited`, which must be the last event.
    async fn exited(&mut self) -> ChildStatus {
        let status = tokio::time::timeout(LIMIT, async {
            loop {
                match self.shell.events.recv().await {
                    Some(ShellEvent::Output { stream, data }) => match stream {
                        Stream::Stdout => self.stdout.extend_from_slice(&data),
                        Stream::Stderr => self.stderr.extend_from_slice(&data),
                    },
                    Some(ShellEvent::Exited(status)) => return status,
                    None => panic!("events ended without Exited"),
                }
            }
        })
        .await
        .expect("the shell exits");
        assert!(self.shell.events.recv().await.is_none(), "Exited is the last event");
        status
    }
}

/// Fields of /proc/PID/stat after the command name.
fn stat(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Runs code: exists and is not a zombie.
fn running(pid: i32) -> bool {
    stat(pid).is_some_and(|f| f[0] != "Z")
}

/// Asserts that nothing of the session runs, at the moment of the call.
fn assert_session_gone(sid: i32, pids: &[i32]) {
    assert_eq!(live_session_members(sid), Vec::<i32>::new(), "session {sid} still runs");
    for &pid in pids {
        assert!(!running(pid), "{pid} of session {sid} still runs");
    }
}

const SIGHUP: ChildStatus = ChildStatus::Signaled {
    signal: 1,
    core_dumped: false,
};
const SIGKILL: ChildStatus = ChildStatus::Signaled {
    signal: 9,
    core_dumped: false,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_pty_shell_computes_sizes_and_owns_its_terminal() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let shell = ex.shell(pty_spec(t.path()), None).unwrap();
    assert_eq!(shell.program, PathBuf::from("/bin/sh"));
    let pid = shell.pid as i32;
    let mut term = Term::new(shell);

    term.send("echo $((6*7))\n").await;
    term.expect("42").await;

    // A session leader with a controlling terminal, the pty it reads from.
    let fields = stat(pid).unwrap();
    assert_eq!(fields[3], pid.to_string(), "session id (field 6) is its pid");
    assert_eq!(fields[2], pid.to_string(), "process group (field 5) is its pid");
    assert_ne!(fields[4], "0", "it has a controlling terminal (tty_nr, field 7)");
    let tty = term.value("$(tty)").await;
    assert!(tty.starts_with("/dev/pts/"), "{tty:?}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(),
        PathBuf::from(&tty)
    );
    // /dev/tty opens only for a process that has a controlling terminal.
    assert_eq!(term.value("$(: </dev/tty && echo ctty)").await, "ctty");

    assert_eq!(term.value("$(stty size)").await, "33 101");
    term.shell.control.resize(WindowSize { rows: 50, cols: 132 });
    assert_eq!(term.value("$(stty size)").await, "50 132");

    term.send("echo bye$((2+2)); exit 3\n").await;
    assert_eq!(term.exited().await, ChildStatus::Exited(3));
    let rest = String::from_utf8_lossy(&term.stdout).into_owned();
    assert!(
        rest.contains("bye4"),
        "output written just before the exit arrives: {rest:?}"
    );
    assert_session_gone(pid, &[]);
    // Resizing a shell that ended is harmless.
    term.shell.control.resize(WindowSize { rows: 1, cols: 1 });
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_interrupts_the_foreground_job_and_the_shell_stays() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = pty_spec(t.path());
    // Found on PATH as builds find theirs.
    spec.shell = None;
    let shell = ex.shell(spec, None).unwrap();
    assert!(shell.program.ends_with("sh"), "{:?}", shell.program);
    let mut term = Term::new(shell);

    // The marker is printed by the job itself, so the job runs when it arrives.
    term.send("sh -c 'echo SLEEP$((1+1)); exec sleep 100'\n").await;
    term.expect("SLEEP2").await;
    let started = Instant::now();
    term.send("\x03").await;
    assert_eq!(term.value("after").await, "after");
    assert!(started.elapsed() < Duration::from_secs(50), "the sleep was interrupted");

    term.send("exit\n").await;
    assert_eq!(term.exited().await, ChildStatus::Exited(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn pipes_carry_input_eof_and_both_streams() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let shell = ex
        .shell(pipe_spec(t.path(), &["sh", "-c", "cat; echo done >&2"]), None)
        .unwrap();
    assert_eq!(
        shell.program,
        PathBuf::from("/usr/bin/sh"),
        "argv[0] resolved on the env's PATH"
    );
    let mut term = Term::new(shell);
    term.send("hello\n").await;
    assert_eq!(term.expect("hello\n").await, "hello\n");
    // No terminal: stdin is a pipe, and closing it is the end of the input.
    term.shell.input.close();
    assert!(term.shell.input.write_all(b"late").await.is_err());
    term.expect_on(Stream::Stderr, "done\n").await;
    assert_eq!(term.exited().await, ChildStatus::Exited(0));
    assert!(term.stdout.is_empty() && term.stderr.is_empty());
    // A resize means nothing without a terminal.
    term.shell.control.resize(WindowSize { rows: 10, cols: 10 });
}

#[tokio::test(flavor = "multi_thread")]
async fn piped_output_arrives_complete_and_in_order() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut shell = ex
        .shell(pipe_spec(t.path(), &["sh", "-c", "seq 1 200000"]), None)
        .unwrap();
    let mut out = Vec::new();
    let status = loop {
        match shell.events.recv().await.expect("events") {
            ShellEvent::Output { data, .. } => out.extend_from_slice(&data),
            ShellEvent::Exited(status) => break status,
        }
    };
    assert_eq!(status, ChildStatus::Exited(0));
    let expected: String = (1..=200000).map(|i| format!("{i}\n")).collect();
    assert!(out == expected.as_bytes(), "all output, in order");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_that_does_not_read_blocks_the_shell() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    const TOTAL: usize = 20_000_000;
    let mut shell = ex
        .shell(
            pipe_spec(t.path(), &["head", "-c", &TOTAL.to_string(), "/dev/zero"]),
            None,
        )
        .unwrap();
    let pid = shell.pid;
    // Nobody reads the events: the writer must end up blocked on its full pipe, having
    // written no more than the queue, a read buffer and the pipe hold.
    let deadline = Instant::now() + LIMIT;
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("pipe_write") {
            break;
        }
        assert!(
            running(pid as i32),
            "the writer finished: output was read ahead without limit"
        );
        assert!(Instant::now() < deadline, "the writer never blocked (wchan {wchan:?})");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    let written: usize = io
        .lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(written < 4 << 20, "{written} bytes written while nobody read");
    let mut total = 0;
    let status = loop {
        match shell.events.recv().await.expect("events") {
            ShellEvent::Output { data, .. } => total += data.len(),
            ShellEvent::Exited(status) => break status,
        }
    };
    assert_eq!((status, total), (ChildStatus::Exited(0), TOTAL));
}

#[tokio::test(flavor = "multi_thread")]
async fn start_errors_are_typed() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let err = ex
        .shell(pipe_spec(t.path(), &["definitely-not-a-command-xyz"]), None)
        .unwrap_err();
    assert!(matches!(err, StartError::NotFound { .. }), "{err:?}");
    let err = ex.shell(pipe_spec(t.path(), &["/etc/passwd"]), None).unwrap_err();
    assert!(matches!(err, StartError::NotExecutable { .. }), "{err:?}");
    let err = ex.shell(pipe_spec(t.path(), &[]), None).unwrap_err();
    assert!(matches!(err, StartError::EmptyCommand), "{err:?}");
    let err = ex.shell(pipe_spec(t.path(), &["echo", "a\0b"]), None).unwrap_err();
    assert!(matches!(err, StartError::Nul), "{err:?}");
    let err = ex
        .shell(pipe_spec(&t.path().join("missing"), &["true"]), None)
        .unwrap_err();
    assert!(matches!(err, StartError::BadWorkdir { .. }), "{err:?}");
    let mut spec = pty_spec(t.path());
    spec.shell = None;
    spec.env = vec![("PATH".into(), "/nonexistent".into())];
    let mut config = ExecutorConfig::new();
    config.state_root = t.path().join("state2");
    config.fallback_shells = vec![t.path().join("no-sh")];
    let ex = Executor::new(config).unwrap().0;
    assert!(matches!(ex.shell(spec, None).unwrap_err(), StartError::NoShell));
}

/// Starts `sleep 1000` in the background of an interactive shell (a job in a process
/// group of its own) and returns its pid.
async fn background_sleep(term: &mut Term) -> i32 {
    term.send("sleep 1000 &\n").await;
    let pid: i32 = term.value("$!").await.parse().unwrap();
    assert!(running(pid));
    pid
}

#[tokio::test(flavor = "multi_thread")]
async fn hang_up_ends_the_shell_and_its_background_jobs() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let shell = ex.shell(pty_spec(t.path()), None).unwrap();
    let sid = shell.pid as i32;
    let mut term = Term::new(shell);
    let sleeper = background_sleep(&mut term).await;
    let mut members = session_members(sid);
    members.sort();
    let mut expected = vec![sid, sleeper];
    expected.sort();
    assert_eq!(members, expected);
    let fields = stat(sleeper).unwrap();
    assert_ne!(fields[2], sid.to_string(), "the job has a process group of its own");

    term.shell.control.hang_up();
    assert_eq!(term.exited().await, SIGHUP);
    assert_session_gone(sid, &[sleeper]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shell_ignoring_sighup_is_killed_after_the_grace_period() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut spec = pty_spec(t.path());
    spec.grace = Duration::from_millis(300);
    let shell = ex.shell(spec, None).unwrap();
    let sid = shell.pid as i32;
    let mut term = Term::new(shell);
    term.send("trap '' HUP\n").await;
    // The job inherits the ignored SIGHUP.
    let sleeper = background_sleep(&mut term).await;
    let started = Instant::now();
    term.shell.control.hang_up();
    assert_eq!(term.exited().await, SIGKILL);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "SIGKILL waited for the grace"
    );
    assert_session_gone(sid, &[sleeper]);
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_are_ended_after_the_main_process_exits() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());

    // A pty: the kernel hangs up only the foreground job when the shell exits; a
    // background job of an interactive shell is left to tether.
    let shell = ex.shell(pty_spec(t.path()), None).unwrap();
    let sid = shell.pid as i32;
    let mut term = Term::new(shell);
    let sleeper = background_sleep(&mut term).await;
    term.send("exit 0\n").await;
    assert_eq!(term.exited().await, ChildStatus::Exited(0));
    assert_session_gone(sid, &[sleeper]);

    // Pipes: the leftover holds stdout open, which must not hang the shell's end.
    let shell = ex
        .shell(pipe_spec(t.path(), &["sh", "-c", "sleep 1000 & echo $!"]), None)
        .unwrap();
    let sid = shell.pid as i32;
    let mut term = Term::new(shell);
    let line = term.expect("\n").await;
    let sleeper: i32 = line.trim().parse().unwrap();
    assert_eq!(term.exited().await, ChildStatus::Exited(0));
    assert_session_gone(sid, &[sleeper]);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_events_hangs_the_shell_up() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let shell = ex.shell(pty_spec(t.path()), None).unwrap();
    let sid = shell.pid as i32;
    let mut term = Term::new(shell);
    let sleeper = background_sleep(&mut term).await;
    let Term { shell, .. } = term;
    let Shell { events, control, .. } = shell;
    drop(events);
    tokio::time::timeout(LIMIT, control.gone()).await.expect("hung up");
    assert_session_gone(sid, &[sleeper]);
}

fn held_build_spec(script: &str) -> BuildSpec {
    BuildSpec {
        id: None,
        name: None,
        command: CommandSpec::Script {
            script: script.into(),
            shell: None,
        },
        env: vec![("FROM_SPEC".into(), "yes".into())],
        workdir: None,
        timeout: None,
        grace: None,
        stdin: false,
        hold_after: Some(Duration::from_secs(600)),
        hold_on_failure: None,
        secrets: Default::default(),
        confine: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shell_attached_to_a_held_build_ends_before_the_build_does() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let mut build = ex.start(held_build_spec("echo built > result.txt")).unwrap();
    loop {
        match tokio::time::timeout(LIMIT, build.events.recv()).await.unwrap() {
            Some(BuildEvent::Held(h)) => {
                assert_eq!(h.status, Some(ChildStatus::Exited(0)));
                break;
            }
            Some(BuildEvent::Output(_)) => {}
            other => panic!("expected Held, got {other:?}"),
        }
    }
    let spec = ShellSpec {
        env: build.env.to_vec(),
        cwd: build.work_dir.clone(),
        ..pty_spec(t.path())
    };
    let shell = ex.shell(spec.clone(), Some(&build.attachments)).unwrap();
    assert_eq!(build.attachments.live(), 1);
    let sid = shell.pid as i32;
    let mut term = Term::new(shell);
    assert_eq!(term.value("$(cat result.txt) $FROM_SPEC").await, "built yes");
    assert_eq!(term.value("$TETHER_BUILD_ID").await, build.id);
    let sleeper = background_sleep(&mut term).await;

    let work = build.work_root.clone();
    build.control.release(None);
    match tokio::time::timeout(LIMIT, build.events.recv()).await.unwrap() {
        Some(BuildEvent::Finished(outcome)) => {
            assert_eq!(outcome.cause, EndCause::Completed);
            assert_eq!(outcome.cleanup_error, None);
        }
        other => panic!("expected Finished, got {other:?}"),
    }
    // Before Finished: the shell was hung up and is gone, then the directory removed.
    assert_session_gone(sid, &[sleeper]);
    assert!(!work.exists());
    assert_eq!(term.exited().await, SIGHUP);

    // The build ended: no shell attaches any more.
    assert!(build.attachments.is_closed());
    assert_eq!(build.attachments.live(), 0);
    let err = ex.shell(spec, Some(&build.attachments)).unwrap_err();
    assert!(matches!(err, StartError::BadWorkdir { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_prepared_build_kills_its_shells_first() {
    let t = tempfile::tempdir().unwrap();
    let ex = executor(t.path());
    let prepared = ex.prepare(held_build_spec("true")).unwrap();
    let spec = ShellSpec {
        env: prepared.env(),
        cwd: prepared.work_dir().to_path_buf(),
        ..pty_spec(t.path())
    };
    let work = prepared.work_dir().to_path_buf();
    let shell = ex.shell(spec, Some(&prepared.attachments())).unwrap();
    let sid = shell.pid as i32;
    let mut term = Term::new(shell);
    term.send("trap '' HUP\n").await;
    let sleeper = background_sleep(&mut term).await;
    drop(prepared);
    // Synchronous: gone when the drop returns.
    assert_session_gone(sid, &[sleeper]);
    assert!(!work.exists());
    assert_eq!(term.exited().await, SIGKILL);
}
