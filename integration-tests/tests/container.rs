//! `tether serve` as PID 1 of a real runc container laid out like kaniko's debug image
//! (busybox at /busybox, no /bin/sh), with the static binary: `--via runc run`, orphan
//! reaping, `runc kill`, stray signals and a terminal as stdin. Skipped without root,
//! runc or a static busybox (see `integration_tests::container`). The stray-signal tests
//! also run a plain `tether serve` child (not PID 1) for comparison; those need nothing.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::container::{
    host_proc, pty_termios, runc_usable, serve_in_own_process_group, BuildOutput, Bundle, ProcInfo,
};
use integration_tests::DaemonLink;
use integration_tests::{script_spec, signal, subdirs, wait_until, Event, Serve, TIMEOUT};
use nix::sys::signal::Signal;
use nix::sys::termios::LocalFlags;
use tether_protocol::{BuildId, ClientMessage, CommandSpec, DaemonMessage, EndCause, ExitStatus, RunSpec};

#[test]
fn a_script_runs_with_busybox_sh_under_tether_as_pid_1_through_via_runc() {
    if !runc_usable() {
        return;
    }
    let bundle = Bundle::serve(&["--log-level", "warn"]);
    assert!(!bundle.rootfs().join("bin").exists(), "no /bin in the image");
    let script = r#"echo "shell=$0"
echo "pid1=$(tr '\0' ' ' < /proc/1/cmdline)"
echo "ppid=$PPID"
[ -e /bin/sh ] && echo "/bin/sh exists"
printf 'to stderr\n' >&2
exit 7"#;
    let started = Instant::now();
    let r = bundle.tether_run(&["--sh", script]);
    let took = started.elapsed();
    assert_eq!(r.code(), 7, "stdout: {}\nstderr: {}", r.stdout_text(), r.stderr_text());
    assert_eq!(
        r.stdout_text(),
        "shell=/busybox/sh\n\
         pid1=/kaniko/tether serve --state-dir /kaniko/state --log-level warn \n\
         ppid=1\n",
        "stderr: {}",
        r.stderr_text()
    );
    assert_eq!(r.stderr_text(), "to stderr\n");
    // The client ended the container (stdin closed, then SIGTERM to runc, which forwards
    // it to tether); `runc run` removed it.
    assert_eq!(bundle.state(), None, "the container is gone");
    assert!(
        bundle.build_dirs().is_empty(),
        "build dirs left: {:?}",
        bundle.build_dirs()
    );
    eprintln!("tether run --via runc took {took:?}");
}

/// Zombies and `sleep`s among the container's processes.
fn zombies_and_sleeps(procs: &[ProcInfo]) -> (Vec<&ProcInfo>, Vec<&ProcInfo>) {
    let zombies = procs.iter().filter(|p| p.state == 'Z').collect();
    let sleeps = procs.iter().filter(|p| p.comm == "sleep").collect();
    (zombies, sleeps)
}

#[test]
fn orphans_of_a_build_are_reaped_by_tether_as_pid_1() {
    if !runc_usable() {
        return;
    }
    let bundle = Bundle::serve(&["--log-level", "warn", "--grace", "2s"]);
    let mut s = bundle.start();
    s.expect_preamble();
    s.hello();

    // 200 grandchildren orphaned inside the build's process group (tether ends what is
    // left of them when the build exits); 50 that escape it with setsid and are hunted
    // down by the build's cookie at its end; and 50 that also clear their environment
    // (which the hunt cannot see through) and outlive the build. All are re-parented to
    // PID 1, which must reap them.
    let script = r#"i=0
while [ $i -lt 200 ]; do (sleep 0.3 &); i=$((i+1)); done
i=0
while [ $i -lt 50 ]; do (setsid sleep 1000 </dev/null >/dev/null 2>&1 &); i=$((i+1)); done
i=0
while [ $i -lt 50 ]; do (setsid env -i PATH="$PATH" sleep 3 </dev/null >/dev/null 2>&1 &); i=$((i+1)); done
echo spawned"#;
    let started = Instant::now();
    let build = s.start_build(1, script_spec(script)).build;
    let out = s.wait_exited(&build);
    let exited = out.exited.clone().unwrap();
    eprintln!("orphan-making build took {:?}", started.elapsed());
    assert_eq!(exited.status, ExitStatus::Code(0), "{exited:?}");
    assert_eq!(exited.cause, EndCause::Completed);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "spawned\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");

    // The hunted sleeps are gone with the build; those without its environment run on,
    // re-parented to tether.
    let procs = bundle.processes();
    let (_, sleeps) = zombies_and_sleeps(&procs);
    let live: Vec<_> = sleeps.iter().filter(|p| p.state != 'Z').collect();
    assert_eq!(live.len(), 50, "only the sleeps without the cookie run on: {procs:?}");
    assert!(
        sleeps.iter().all(|p| p.ppid == 1),
        "orphans are re-parented to PID 1: {sleeps:?}"
    );
    let pid1 = procs.iter().find(|p| p.pid == 1).expect("PID 1");
    assert_eq!(pid1.comm, "tether");

    // Once they exit, nothing is left: no sleep, and no zombie.
    let mut last = Vec::new();
    let clean = wait_until(Duration::from_secs(10), || {
        last = bundle.processes();
        let (zombies, sleeps) = zombies_and_sleeps(&last);
        zombies.is_empty() && sleeps.is_empty()
    });
    assert!(clean, "zombies or sleeps remain after 10 s: {last:?}");
    eprintln!("no orphan left {:?} after the build started", started.elapsed());

    // The daemon serves on, and stops cleanly.
    let build = s.start_build(2, script_spec("echo still serving")).build;
    let out = s.wait_exited(&build);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still serving\n");
    bundle.kill("TERM");
    let st = s
        .wait_timeout(Duration::from_secs(5))
        .expect("runc run exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "stderr: {}", s.stderr.text());
}

#[test]
fn runc_kill_term_cancels_running_builds_and_the_container_exits_cleanly() {
    if !runc_usable() {
        return;
    }
    let grace = Duration::from_secs(2);
    let bundle = Bundle::serve(&["--log-level", "warn", "--grace", "2s"]);
    let mut s = bundle.start();
    s.expect_preamble();
    s.hello();

    // One build ends at SIGTERM; the other ignores it (and so does its sleep), so it
    // needs the SIGKILL at the end of the grace period.
    let plain = s
        .start_build(1, RunSpec::new(CommandSpec::argv(["sleep", "1000"])))
        .build;
    let stubborn = s.start_build(2, script_spec("trap '' TERM; sleep 1000")).build;
    assert_ne!(plain, stubborn);
    assert_eq!(bundle.build_dirs().len(), 2, "{:?}", bundle.build_dirs());

    // tether must be gone well before an orchestrator's own SIGKILL: within its grace
    // period plus 3 s, measured from the kill to the container being gone.
    let bound = grace + Duration::from_secs(3);
    let killed_at = Instant::now();
    bundle.kill("TERM");
    s.wait_eof();
    let st = s.wait_timeout(bound).unwrap_or_else(|| {
        panic!(
            "runc run still runs {:?} after runc kill TERM; stderr: {}",
            killed_at.elapsed(),
            s.stderr.text()
        )
    });
    let took = killed_at.elapsed();
    // runc run exits with its container's PID 1, then deletes the container.
    let left = bound.saturating_sub(killed_at.elapsed());
    assert!(
        wait_until(left, || bundle.state().is_none()),
        "the container still exists {:?} after runc kill TERM: {:?}",
        killed_at.elapsed(),
        bundle.state()
    );
    let gone = killed_at.elapsed();
    eprintln!("runc run exited {took:?}, the container was gone {gone:?} after runc kill TERM");
    assert!(gone <= bound, "gone after {gone:?}, more than {bound:?}");
    assert_eq!(st.code(), Some(0), "tether's exit status; stderr: {}", s.stderr.text());

    let plain_exit = s.output(&plain).exited.expect("Exited for the plain build");
    let stubborn_exit = s.output(&stubborn).exited.expect("Exited for the stubborn build");
    assert_eq!(plain_exit.cause, EndCause::Shutdown, "{plain_exit:?}");
    assert_eq!(stubborn_exit.cause, EndCause::Shutdown, "{stubborn_exit:?}");
    assert_eq!(
        plain_exit.status,
        ExitStatus::Signal {
            signal: 15,
            core_dumped: false
        }
    );
    assert_eq!(
        stubborn_exit.status,
        ExitStatus::Signal {
            signal: 9,
            core_dumped: false
        }
    );
    assert!(
        took >= grace - Duration::from_millis(100),
        "the grace period applies at shutdown: exited after {took:?}"
    );
    assert!(
        bundle.build_dirs().is_empty(),
        "build dirs left: {:?}",
        bundle.build_dirs()
    );
    assert_eq!(bundle.state(), None, "the container is gone");
}

#[test]
fn frames_pass_a_terminal_on_the_containers_stdin() {
    if !runc_usable() {
        return;
    }
    let bundle = Bundle::serve(&["--log-level", "warn"]);
    let mut s = bundle.start_detached_on_pty();
    let original = s.pty_initial.clone().unwrap();
    assert!(original.local_flags.contains(LocalFlags::ICANON));
    // tether writes its preamble after switching its stdin to raw mode.
    s.expect_preamble();
    let raw = pty_termios(&s);
    assert!(
        !raw.local_flags
            .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG),
        "tether put the terminal in raw mode: {:?}; stderr: {}",
        raw.local_flags,
        s.stderr.text()
    );
    s.hello();

    // Bytes a line discipline would eat or rewrite, and a line longer than its buffer.
    let nasty: &[u8] = &[0x03, 0x04, 0x1a, 0x1c, 0x11, 0x13, b'\r', 0x7f, b'\n', 0x15, 0x17];
    let long_line = "x".repeat(5000);
    let mut script = b"printf '%s' '".to_vec();
    script.extend_from_slice(nasty);
    script.extend_from_slice(format!("{long_line}'; echo err >&2; exit 3").as_bytes());
    let build = s.start_build(1, RunSpec::new(CommandSpec::script(&script))).build;
    let out = s.wait_exited(&build);
    let exited = out.exited.clone().unwrap();
    assert_eq!(exited.status, ExitStatus::Code(3), "{exited:?}");
    let mut expected = nasty.to_vec();
    expected.extend_from_slice(long_line.as_bytes());
    assert!(
        out.stdout == expected,
        "stdout differs: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.stderr, b"err\n");

    // Several builds at once over the same terminal.
    let ids: Vec<_> = (0..3)
        .map(|i| s.start_build(10 + i, script_spec(&format!("echo build {i}"))).build)
        .collect();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3);
    for (i, id) in ids.iter().enumerate() {
        let out = s.wait_exited(id);
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("build {i}\n"));
    }

    // Detached, so there is no runc process whose status is tether's: the end of its
    // stdout and its restored terminal show that it went through its orderly exit.
    bundle.kill("TERM");
    s.wait_eof();
    assert!(
        bundle.wait_stopped(Duration::from_secs(5)),
        "the container stops after SIGTERM"
    );
    assert_eq!(pty_termios(&s), original, "tether restored the terminal at exit");
    assert!(
        s.stderr.wait_contains(TIMEOUT, "tty: false"),
        "the recommendation is logged: {}",
        s.stderr.text()
    );
}

// ---------------------------------------------------------------------------------------
// Stray signals
// ---------------------------------------------------------------------------------------

/// Signals a daemon may get from its surroundings (a terminal hanging up, a supervisor, a
/// stray `kill`, job control). tether handles only SIGTERM and SIGINT (the Rust runtime
/// ignores SIGPIPE), so every other one meets its default action: ignored for SIGCHLD,
/// SIGWINCH and SIGCONT, termination or a stop for the rest, unless the kernel drops it.
const STRAY_SIGNALS: [Signal; 12] = [
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGPIPE,
    Signal::SIGQUIT,
    Signal::SIGALRM,
    Signal::SIGWINCH,
    Signal::SIGCHLD,
    Signal::SIGCONT,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGTSTP,
];

/// A build that is running while the signals arrive.
const IN_FLIGHT: &str = "sleep 1; echo in flight; exit 4";
/// A build started after them.
const AFTER: &str = r#"echo "after $((6 * 7))"; echo err >&2; exit 3"#;

fn check_in_flight(out: &BuildOutput) {
    let exited = out.exited.clone().expect("Exited");
    assert_eq!(exited.status, ExitStatus::Code(4), "{exited:?}");
    assert_eq!(exited.cause, EndCause::Completed, "{exited:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in flight\n");
}

fn check_after(out: &BuildOutput) {
    let exited = out.exited.clone().expect("Exited");
    assert_eq!(exited.status, ExitStatus::Code(3), "{exited:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after 42\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
}

/// Running (not stopped, not a zombie).
fn running(p: &Option<ProcInfo>) -> bool {
    p.as_ref().is_some_and(|p| !matches!(p.state, 'T' | 't' | 'Z' | 'X'))
}

#[test]
fn stray_signals_neither_kill_nor_stop_tether_as_pid_1() {
    if !runc_usable() {
        return;
    }
    let bundle = Bundle::serve(&["--log-level", "warn", "--grace", "2s"]);
    let mut s = bundle.start();
    s.expect_preamble();
    s.hello();
    let pid = bundle.host_pid().expect("the container runs");
    let in_flight = s.start_build(1, script_spec(IN_FLIGHT)).build;

    // A PID 1 gets only the signals it has a handler for (from the host, SIGKILL and
    // SIGSTOP too): the kernel drops the others, whatever their default action.
    for sig in STRAY_SIGNALS {
        bundle.kill(sig.as_str());
        let p = host_proc(pid);
        assert!(running(&p), "tether after runc kill {sig}: {p:?}");
    }
    // The build in flight finished undisturbed (a second, in which a default action
    // would have shown).
    check_in_flight(&s.wait_exited(&in_flight));
    let p = host_proc(pid);
    assert!(running(&p), "tether after the signals: {p:?}");
    let state = bundle.state().expect("the container exists");
    assert_eq!(state["status"].as_str(), Some("running"), "{state}");
    assert_eq!(bundle.host_pid(), Some(pid), "the same PID 1");

    // It answers: a new build runs, with the right output and status.
    let after = s.start_build(2, script_spec(AFTER)).build;
    check_after(&s.wait_exited(&after));

    // And SIGTERM is still the orderly way out.
    bundle.kill("TERM");
    let st = s
        .wait_timeout(Duration::from_secs(5))
        .expect("runc run exits after SIGTERM");
    assert_eq!(st.code(), Some(0), "stderr: {}", s.stderr.text());
    assert!(
        bundle.build_dirs().is_empty(),
        "build dirs left: {:?}",
        bundle.build_dirs()
    );
    eprintln!("tether as PID 1 ignored {} signals and served on", STRAY_SIGNALS.len());
}

/// A plain `tether serve` child of the test (not PID 1), its builds' output recorded.
struct PlainDaemon {
    serve: Serve,
    state: tempfile::TempDir,
    builds: HashMap<BuildId, BuildOutput>,
    eof: bool,
}

impl PlainDaemon {
    fn start() -> PlainDaemon {
        // The state dir, and the daemon's working directory (for a SIGQUIT core dump).
        let state = tempfile::tempdir().unwrap();
        let args = ["--log-level", "warn", "--grace", "2s", "--state-dir"];
        let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        args.push(state.path().as_os_str());
        let mut serve = serve_in_own_process_group(state.path(), &args);
        serve.expect_preamble();
        serve.hello();
        PlainDaemon {
            serve,
            state,
            builds: HashMap::new(),
            eof: false,
        }
    }

    fn pid(&self) -> i32 {
        self.serve.pid() as i32
    }

    /// The daemon's instance dirs (it removes its own at an orderly exit).
    fn instance_dirs(&self) -> Vec<PathBuf> {
        subdirs(&self.state.path().join("instances"))
    }

    /// The next message (recorded; pings answered), or `None` at the end of its stdout.
    fn next(&mut self) -> Option<DaemonMessage> {
        while !self.eof {
            let m = match self.serve.next_event() {
                Event::Preamble => continue,
                Event::Eof => {
                    self.eof = true;
                    return None;
                }
                Event::Message(m) => m,
                other => panic!("expected a message, got {other:?}"),
            };
            match &m {
                DaemonMessage::Output {
                    build, stream, data, ..
                } => {
                    let b = self.builds.entry(build.clone()).or_default();
                    match stream {
                        tether_protocol::OutputStream::Stdout => b.stdout.extend_from_slice(data),
                        tether_protocol::OutputStream::Stderr => b.stderr.extend_from_slice(data),
                    }
                }
                DaemonMessage::Exited(e) => {
                    self.builds.entry(e.build.clone()).or_default().exited = Some(e.clone());
                }
                DaemonMessage::Ping { nonce } => {
                    let nonce = *nonce;
                    self.serve.send(&ClientMessage::Pong { nonce });
                }
                _ => {}
            }
            return Some(m);
        }
        None
    }

    fn start_build(&mut self, req: u64, script: &str) -> BuildId {
        self.serve.send(&ClientMessage::Run {
            req,
            spec: Box::new(script_spec(script)),
            follow: true,
        });
        loop {
            match self.next().expect("the daemon's stdout ended before Started") {
                DaemonMessage::Started(s) if s.req == req => return s.build,
                DaemonMessage::Error(e) if e.req == Some(req) => panic!("Run {req} refused: {e:?}"),
                _ => {}
            }
        }
    }

    /// Everything `build` sent once its Exited came (or the daemon's stdout ended).
    fn wait_exited(&mut self, build: &BuildId) -> BuildOutput {
        while self.builds.get(build).is_none_or(|b| b.exited.is_none()) && self.next().is_some() {}
        self.builds.get(build).cloned().unwrap_or_default()
    }
}

/// What stray signals did to a plain `tether serve`.
#[derive(Debug, PartialEq)]
enum Fate {
    /// Still running: the build in flight finished normally, a new one ran, and
    /// SIGTERM then ended the daemon in order.
    ServedOn,
    /// Exited 0 after reporting the build in flight and removing its state: an orderly
    /// shutdown, as at SIGTERM.
    ShutDownInOrder,
    /// Killed by a signal (its default action), leaving its state dir behind or not.
    Killed {
        signal: i32,
        core_dumped: bool,
        state_left: bool,
    },
    /// Stopped (a job-control signal's default action): it answers nothing any more.
    Stopped,
    /// Anything else (an unexpected exit, or a failed check: the message).
    Other(String),
}

/// Starts a plain daemon with a build in flight, sends it `sigs` one after the other
/// and judges what became of it.
fn fate_after(sigs: &[Signal]) -> Fate {
    let mut d = PlainDaemon::start();
    let pid = d.pid();
    let in_flight = d.start_build(1, IN_FLIGHT);
    for &sig in sigs {
        signal(pid as u32, sig);
    }
    // A default action (termination, a stop) takes effect as soon as the daemon runs;
    // nothing signals that nothing happened, so this waits a while for either.
    let mut status = None;
    wait_until(Duration::from_millis(500), || {
        status = d.serve.child.try_wait().expect("try_wait");
        status.is_some() || host_proc(pid).is_some_and(|p| p.state == 'T')
    });
    if let Some(st) = status {
        if let Some(signal) = st.signal() {
            return Fate::Killed {
                signal,
                core_dumped: st.core_dumped(),
                state_left: !d.instance_dirs().is_empty(),
            };
        }
        let out = d.wait_exited(&in_flight);
        if st.code() == Some(0) && out.exited.is_some() && d.instance_dirs().is_empty() {
            return Fate::ShutDownInOrder;
        }
        return Fate::Other(format!(
            "exited ({st}); in-flight build: {:?}; state left: {:?}; stderr: {}",
            out.exited,
            d.instance_dirs(),
            d.serve.stderr.text()
        ));
    }
    if host_proc(pid).is_some_and(|p| p.state == 'T') {
        // Let it go on, and end it in order (no orphaned build left behind).
        signal(pid as u32, Signal::SIGCONT);
        signal(pid as u32, Signal::SIGTERM);
        let _ = d.serve.wait_timeout(Duration::from_secs(5));
        return Fate::Stopped;
    }
    check_in_flight(&d.wait_exited(&in_flight));
    let after = d.start_build(2, AFTER);
    check_after(&d.wait_exited(&after));
    signal(pid as u32, Signal::SIGTERM);
    let st = d.serve.wait_timeout(Duration::from_secs(5));
    if st.is_none_or(|st| st.code() != Some(0)) || !d.instance_dirs().is_empty() {
        return Fate::Other(format!(
            "served on, but SIGTERM then ended it with {st:?}, leaving {:?}",
            d.instance_dirs()
        ));
    }
    Fate::ServedOn
}

/// The stray signals whose default action leaves a process running.
const HARMLESS: [Signal; 4] = [Signal::SIGPIPE, Signal::SIGWINCH, Signal::SIGCHLD, Signal::SIGCONT];

#[test]
fn a_plain_tether_serve_serves_on_after_sigpipe_sigwinch_sigchld_and_sigcont() {
    assert_eq!(fate_after(&HARMLESS), Fate::ServedOn);
}

/// Only SIGTERM and SIGINT end a daemon; a plain one (not PID 1, so the kernel does not
/// drop signals for it) serves on after any other.
#[test]
fn a_plain_tether_serve_is_neither_killed_nor_stopped_by_stray_signals() {
    let others: Vec<Signal> = STRAY_SIGNALS.into_iter().filter(|s| !HARMLESS.contains(s)).collect();
    // One daemon per signal (a killed one cannot take the next), all at once.
    let fates: Vec<(Signal, Fate)> = std::thread::scope(|scope| {
        let handles: Vec<_> = others
            .iter()
            .map(|&sig| (sig, scope.spawn(move || fate_after(&[sig]))))
            .collect();
        handles
            .into_iter()
            .map(|(sig, h)| {
                let fate = h.join().unwrap_or_else(|e| {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                    Fate::Other(format!("check failed: {}", msg.unwrap_or_default()))
                });
                (sig, fate)
            })
            .collect()
    });
    for (sig, fate) in &fates {
        eprintln!("{sig}: {fate:?}");
    }
    let bad: Vec<&(Signal, Fate)> = fates.iter().filter(|(_, f)| *f != Fate::ServedOn).collect();
    assert!(bad.is_empty(), "killed, stopped or broken by: {bad:#?}");
}
